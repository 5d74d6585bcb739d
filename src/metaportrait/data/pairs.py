"""Training and validation pairs for the base model: (source frame, driving frame) of one clip, self-reenactment.

Each sample is built from a prepared dataset (`metaportrait.data.dataset.PreparedDataset`, layout in
docs/contracts.md) in five steps:

1. **Choose** a clip and two frames with a face (`RandomPairs`), or take a fixed pair (`FixedPairs`).
2. **Augment** both frames with the *same* parameters (`AugmentConfig`): a horizontal flip (with the MediaPipe
   landmark indices mirrored, `MIRROR_INDEX`), a small zoom/shift around the crop centre, and a colour jitter.
   Image and landmarks go through the same geometric map, so they stay consistent; source and driving get
   the same map, so the motion between them is the real one.
3. **Resize** to the training size (the dataset may store 256² crops and we train at 128²).
4. **Draw** the landmark line images (`metaportrait.data.drawing`) and, if asked, the piecewise-affine mesh
   prior (`metaportrait.prior.build_prior`) at the flow resolution.
5. **Measure** the eye and mouth boxes and the face mask (for the region losses and the face-region metric).

Sampling is a pure function of ``(seed, index)``: sample ``index`` always gives the same pair and the same
augmentation, whichever process or DataLoader worker draws it. `StepSampler` hands out indices by training
step and rank, so resuming at step ``n`` only needs ``n``, and runs are reproducible with any number of workers.

Clip weighting (`RandomPairs`): the training pool is skewed (MEAD actors contribute ten clips each, Obama six;
see notes/feasibility.md), so by default identities are drawn uniformly and, within an identity, a clip with
probability proportional to sqrt(frames). ``"sqrt_frames"`` draws clips with probability proportional to
sqrt(frames) over the whole pool (the feasibility prototype's choice).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Sampler

from metaportrait.data.dataset import PreparedClip
from metaportrait.data.drawing import draw_landmark_image
from metaportrait.io.image import frames_to_tensor
from metaportrait.prior import PriorOptions, build_prior
from metaportrait.prior.masks import face_mask
from metaportrait.prior.mouth import MouthFill

if TYPE_CHECKING:
    from metaportrait.config import ModelConfig

NUM_LANDMARKS = 478

# ---------------------------------------------------------------------------------------------------------
# Mirror symmetry of the MediaPipe face mesh
# ---------------------------------------------------------------------------------------------------------

# Points on the face's symmetry plane (they mirror onto themselves).
_MIDLINE = (0, 1, 2, 4, 5, 6, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 94, 151, 152, 164, 168, 175, 195, 197,
            199, 200)  # fmt: skip


def _mirror_index() -> np.ndarray:
    """``MIRROR_INDEX[i]`` is the point that lands where point ``i`` was after a horizontal flip of the face.

    MediaPipe numbers the 468 mesh points so that the off-midline points below 248 and the points 248..467,
    each in increasing order, are mirror pairs; the iris of one eye (468 centre, 469..472 rim) mirrors onto
    the other's (473 centre, 474..477) with the rim order reversed horizontally. We derived the table by
    running FaceMesh on 39 images and on their mirror images and matching the points (Hungarian assignment
    on the mirrored coordinates): every point got a majority vote for this index, the result is an
    involution, and it maps each of MediaPipe's left contours (eye, brow, iris) exactly onto the right one.
    """
    left = [i for i in range(248) if i not in _MIDLINE]
    right = list(range(248, 468))
    assert len(left) == len(right) == 220
    index = np.arange(NUM_LANDMARKS)
    index[left], index[right] = right, left
    iris_right, iris_left = (468, 469, 470, 471, 472), (473, 476, 475, 474, 477)
    index[list(iris_right)], index[list(iris_left)] = iris_left, iris_right
    return index


MIRROR_INDEX = _mirror_index()

# Regions of the eye and mouth losses: MediaPipe's eye contours (with the irises) and the outer lip contour.
# "Right"/"left" are the subject's, as in MediaPipe (the right eye is on the image's left).
RIGHT_EYE_POINTS = (33, 7, 163, 144, 145, 153, 154, 155, 133, 246, 161, 160, 159, 158, 157, 173, 468, 469, 470, 471,
                    472)  # fmt: skip
LEFT_EYE_POINTS = tuple(int(MIRROR_INDEX[i]) for i in RIGHT_EYE_POINTS)
MOUTH_POINTS = (61, 146, 91, 181, 84, 17, 314, 405, 321, 375, 291, 409, 270, 269, 267, 0, 37, 39, 40, 185)
REGIONS = ("right_eye", "left_eye", "mouth")
# Box padding in pixels at 256² (the official eye/mouth "enhance" loss pads 3 and 5 px); scaled with the size.
_REGION_PADDING_AT_256 = (3.0, 3.0, 5.0)


def flip_landmarks(landmarks: np.ndarray, width: int) -> np.ndarray:
    """Landmarks of the horizontally flipped image: mirror x (pixel i spans [i, i+1)) and swap left/right points.

    Args:
        landmarks: ``(..., 478, 2)`` ``(x, y)`` pixels.
        width: image width in pixels.
    """
    flipped = landmarks[..., MIRROR_INDEX, :].copy()
    flipped[..., 0] = width - flipped[..., 0]
    return flipped


def region_boxes(landmarks: np.ndarray, size: int) -> np.ndarray:
    """Eye and mouth boxes of one face: ``float32`` ``(3, 4)`` rows ``(x0, y0, x1, y1)`` in pixels, order `REGIONS`.

    Each box is the bounding box of the region's points grown by 3 px (eyes) or 5 px (mouth) at 256²,
    scaled with ``size``, and clipped to the image.
    """
    boxes = np.empty((3, 4), dtype=np.float32)
    for row, (points, pad) in enumerate(zip((RIGHT_EYE_POINTS, LEFT_EYE_POINTS, MOUTH_POINTS), _REGION_PADDING_AT_256)):
        pad = pad * size / 256.0
        region = landmarks[list(points)]
        boxes[row, :2] = region.min(axis=0) - pad
        boxes[row, 2:] = region.max(axis=0) + pad
    return np.clip(boxes, 0.0, float(size))


def box_masks(boxes: torch.Tensor, height: int, width: int, box_size: int) -> torch.Tensor:
    """Binary masks of boxes, at any resolution.

    Args:
        boxes: ``(B, R, 4)`` ``(x0, y0, x1, y1)`` in pixels of a ``box_size`` x ``box_size`` image.
        height, width: mask size; boxes are scaled by ``width / box_size`` and ``height / box_size``.
        box_size: side of the image the boxes were measured on.

    Returns:
        ``float32`` ``(B, R, height, width)``: 1 where the pixel centre lies inside the box.
    """
    assert boxes.ndim == 3 and boxes.shape[-1] == 4, boxes.shape
    xs = (torch.arange(width, device=boxes.device, dtype=torch.float32) + 0.5) * (box_size / width)
    ys = (torch.arange(height, device=boxes.device, dtype=torch.float32) + 0.5) * (box_size / height)
    x0, y0, x1, y1 = (boxes[..., k, None] for k in range(4))  # each (B, R, 1)
    inside_x = (xs >= x0) & (xs <= x1)  # (B, R, W)
    inside_y = (ys >= y0) & (ys <= y1)  # (B, R, H)
    return (inside_y[..., :, None] & inside_x[..., None, :]).float()  # (B, R, H, W)


def box_crops(images: torch.Tensor, boxes: torch.Tensor, box_size: int, out_size: int, grow: float = 1.2) -> torch.Tensor:
    """Square crops around boxes, resampled to ``out_size`` (bilinear, differentiable, edges repeated).

    Args:
        images: ``(B, C, H, W)``.
        boxes: ``(B, 4)`` ``(x0, y0, x1, y1)`` in pixels of a ``box_size`` x ``box_size`` image (one per image).
        box_size: side of the image the boxes were measured on.
        out_size: side of the crops.
        grow: crop side = ``grow`` x the box's longer side, centred on the box.

    Returns:
        ``(B, C, out_size, out_size)``.
    """
    assert images.ndim == 4 and boxes.shape == (images.shape[0], 4), (images.shape, boxes.shape)
    centre = (boxes[:, :2] + boxes[:, 2:]) / box_size - 1.0  # (B, 2) in [-1, 1] (x, y)
    half = grow * (boxes[:, 2:] - boxes[:, :2]).amax(dim=1).clamp_min(1.0) / box_size  # (B,) half side in [-1, 1] units
    theta = torch.zeros(images.shape[0], 2, 3, device=images.device, dtype=images.dtype)
    theta[:, 0, 0], theta[:, 1, 1] = half, half
    theta[:, :, 2] = centre
    grid = F.affine_grid(theta, [images.shape[0], images.shape[1], out_size, out_size], align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


# ---------------------------------------------------------------------------------------------------------
# Augmentation
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AugmentConfig:
    """Paired augmentation: one draw of these parameters is applied to both frames of a pair."""

    flip: float = 0.5  # probability of a horizontal flip (landmark indices mirrored with MIRROR_INDEX)
    scale: float = 0.06  # zoom factor drawn uniformly from [1 - scale, 1 + scale], about the crop centre
    translate: float = 0.04  # shift in x and y drawn uniformly from [-translate, translate] x crop size
    brightness: float = 0.15  # multiply by a factor in [1 - b, 1 + b]
    contrast: float = 0.15  # scale the deviation from the source's mean grey by a factor in [1 - c, 1 + c]
    saturation: float = 0.15  # blend with the grey image by a factor in [1 - s, 1 + s]

    def __post_init__(self):
        if not 0.0 <= self.flip <= 1.0:
            raise ValueError(f"augment.flip is a probability, got {self.flip}")
        for name in ("scale", "translate", "brightness", "contrast", "saturation"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"augment.{name} must be in [0, 1), got {value}")


NO_AUGMENT = AugmentConfig(flip=0.0, scale=0.0, translate=0.0, brightness=0.0, contrast=0.0, saturation=0.0)


@dataclass(frozen=True)
class _Draw:
    """One random draw of the augmentation parameters."""

    flip: bool
    scale: float
    shift: tuple[float, float]  # fraction of the crop size
    brightness: float
    contrast: float
    saturation: float

    @staticmethod
    def sample(config: AugmentConfig, rng: np.random.Generator) -> _Draw:
        # Always consume the same number of draws, so changing one probability does not reshuffle the rest.
        u = rng.uniform(-1.0, 1.0, size=7)
        return _Draw(
            flip=bool((u[0] + 1.0) / 2.0 < config.flip),
            scale=1.0 + config.scale * float(u[1]),
            shift=(config.translate * float(u[2]), config.translate * float(u[3])),
            brightness=1.0 + config.brightness * float(u[4]),
            contrast=1.0 + config.contrast * float(u[5]),
            saturation=1.0 + config.saturation * float(u[6]),
        )


_GREY_WEIGHTS = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R 601 luma, as torchvision


def _geometry(frames: np.ndarray, landmarks: np.ndarray, draw: _Draw, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Flip, resize to ``size`` and zoom/shift ``(N, S, S, 3)`` frames and their ``(N, 478, 2)`` landmarks alike."""
    source_size = frames.shape[1]
    landmarks = landmarks.astype(np.float32)
    if draw.flip:
        frames = frames[:, :, ::-1]
        landmarks = flip_landmarks(landmarks, source_size)
    if source_size != size:
        # INTER_AREA: a proper box filter when shrinking (our usual 256 -> 128); landmarks scale exactly.
        interpolation = cv2.INTER_AREA if size < source_size else cv2.INTER_LINEAR
        frames = np.stack([cv2.resize(np.ascontiguousarray(f), (size, size), interpolation=interpolation)
                           for f in frames])  # fmt: skip
        landmarks = landmarks * (size / source_size)
    if draw.scale != 1.0 or draw.shift != (0.0, 0.0):
        # p' = c + scale * (p - c) + shift in continuous pixel coordinates (pixel i spans [i, i+1)).
        centre = size / 2.0
        tx, ty = draw.shift[0] * size, draw.shift[1] * size
        matrix = np.array(
            [[draw.scale, 0.0, centre * (1 - draw.scale) + tx], [0.0, draw.scale, centre * (1 - draw.scale) + ty]],
            dtype=np.float64,
        )
        # OpenCV puts pixel centres at integers: conjugate the map by the half-pixel shift.
        cv_matrix = matrix.copy()
        cv_matrix[:, 2] += matrix[:, :2].sum(axis=1) * 0.5 - 0.5
        frames = np.stack(
            [
                cv2.warpAffine(np.ascontiguousarray(f), cv_matrix, (size, size), flags=cv2.INTER_LINEAR,
                               borderMode=cv2.BORDER_REPLICATE)  # fmt: skip
                for f in frames
            ]
        )
        landmarks = landmarks @ matrix[:, :2].T.astype(np.float32) + matrix[:, 2].astype(np.float32)
    return np.ascontiguousarray(frames), landmarks


def _colour(frames: np.ndarray, draw: _Draw) -> np.ndarray:
    """The same colour jitter on ``(N, H, W, 3)`` uint8 frames; the contrast pivot is the first frame's mean grey."""
    if draw.brightness == 1.0 and draw.contrast == 1.0 and draw.saturation == 1.0:
        return frames
    x = frames.astype(np.float32) * draw.brightness
    pivot = float((x[0] @ _GREY_WEIGHTS).mean())
    x = pivot + draw.contrast * (x - pivot)
    grey = (x @ _GREY_WEIGHTS)[..., None]
    x = grey + draw.saturation * (x - grey)
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------------------
# Samples
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PairOptions:
    """What a sample holds besides the two frames; follows the model being trained."""

    size: int  # training crop side in pixels
    topology: str = "mediapipe478"  # landmark line drawing (`metaportrait.data.drawing.TOPOLOGIES`)
    # Side of the mesh prior grid, None = no prior. The generator warps with the (prior + learned residual) grid
    # at the prior's resolution, so the inference pipeline passes it at the image size; so do we by default.
    prior_size: int | None = None
    prior_masks: bool = False  # also the prior masks (`metaportrait.prior.masks`) of the driving face, at its size
    prior_mouth: MouthFill = "stretch"  # how the prior grid and masks fill the mouth opening
    mouth_template: bool = False  # prior masks also hold the `mouth_template` (RefineConfig.mouth_template)
    eyelids: bool = False  # the masks' synthesis channel also covers the eyelid band (ModelConfig.prior_eyelids)
    eyelid_fill: bool = False  # the prior grid fills closing eyes' lids from above (ModelConfig.prior_eyelid_fill)
    eyelid_channel: bool = False  # prior masks also hold the eyelid band alone, last (RefineConfig.eyelid_band)
    face_masked: bool = False  # the prior grid is the identity outside the faces (ModelConfig.prior_face_masked)
    line_thickness: int = 1  # px (`ModelConfig.line_thickness`)

    def __post_init__(self):
        if self.size < 16:
            raise ValueError(f"size must be at least 16 px, got {self.size}")
        if self.prior_masks and self.prior_size is None:
            raise ValueError("prior_masks needs a prior_size")
        if self.mouth_template and not self.prior_masks:
            raise ValueError("mouth_template needs prior_masks (it is stored as prior-mask channels 2-3)")
        if self.eyelids and not self.prior_masks:
            raise ValueError("eyelids needs prior_masks (the band is part of prior-mask channel 1)")
        if self.eyelid_channel and not self.eyelids:
            raise ValueError("eyelid_channel needs eyelids (the band is synthesised where it is given)")
        if self.prior_size is not None and self.prior_size < 4:
            raise ValueError(f"prior_size must be at least 4, got {self.prior_size}")

    @property
    def prior(self) -> PriorOptions:
        """The options of the mesh prior (used with ``prior_size``)."""
        return PriorOptions(mouth=self.prior_mouth, eyelid_fill=self.eyelid_fill, face_masked=self.face_masked,
                            masks=self.prior_masks, template=self.mouth_template, eyelids=self.eyelids,
                            eyelid_channel=self.eyelid_channel)  # fmt: skip

    @classmethod
    def for_model(cls, cfg: ModelConfig, size: int) -> PairOptions:
        """The samples a model takes at ``size``: its lines, and its prior and masks at the image size (the
        generator warps at the prior's resolution, and so does the inference pipeline)."""
        return cls(
            size=size,
            topology=cfg.landmark_topology,
            prior_size=size if cfg.use_mesh_prior else None,
            prior_masks=cfg.prior_masks,
            prior_mouth=cfg.prior_mouth,
            mouth_template=cfg.refine.mouth_template,
            eyelids=cfg.prior_eyelids,
            eyelid_channel=cfg.refine.eyelid_band,
            eyelid_fill=cfg.prior_eyelid_fill,
            face_masked=cfg.prior_face_masked,
            line_thickness=cfg.line_thickness(size),
        )


def make_pair(
    frames: np.ndarray,
    landmarks: np.ndarray,
    options: PairOptions,
    augment: AugmentConfig,
    rng: np.random.Generator,
) -> dict[str, torch.Tensor]:
    """One training sample from a source and a driving frame.

    Args:
        frames: ``uint8`` ``(2, S, S, 3)``: source, driving.
        landmarks: ``float32`` ``(2, 478, 2)`` pixels of the ``S``-px frames.
        options: output size, line topology, mesh prior.
        augment: augmentation ranges (`NO_AUGMENT` for validation).
        rng: draws the augmentation.

    Returns:
        ``source``, ``driving``, ``source_lines``, ``driving_lines``: ``(3, s, s)`` in [0, 1];
        ``source_landmarks``, ``driving_landmarks``: ``(478, 2)`` pixels of the ``s``-px images;
        ``boxes``: ``(3, 4)`` eye/eye/mouth boxes of the driving face (`region_boxes`);
        ``face_mask``: ``(1, s, s)`` 1 inside the driving face-oval hull;
        ``prior_grid``: ``(p, p, 2)`` mesh warp grid (only when ``options.prior_size``);
        ``prior_masks``: ``(2, p, p)`` driving face and synthesis band, then the mouth template (2) and the eyelid
        band (1) when the options ask (only when ``options.prior_masks``).
    """
    assert frames.shape[0] == 2 and frames.dtype == np.uint8 and landmarks.shape == (2, NUM_LANDMARKS, 2)
    draw = _Draw.sample(augment, rng)
    size = options.size
    frames, landmarks = _geometry(frames, landmarks, draw, size)
    frames = _colour(frames, draw)
    lines = np.stack([draw_landmark_image(points, size, size, options.topology, options.line_thickness)
                      for points in landmarks])  # fmt: skip
    images = frames_to_tensor(np.concatenate([frames, lines]))  # (4, 3, s, s): source, driving, their lines
    sample = {
        "source": images[0],
        "driving": images[1],
        "source_lines": images[2],
        "driving_lines": images[3],
        "source_landmarks": torch.from_numpy(landmarks[0].copy()),
        "driving_landmarks": torch.from_numpy(landmarks[1].copy()),
        "boxes": torch.from_numpy(region_boxes(landmarks[1], size)),
        "face_mask": torch.from_numpy(face_mask(landmarks[1], size, size, 0.0, 0.0))[None],
    }
    if options.prior_size is not None:
        # Landmarks in prior-grid pixels: the grid is resolution-free ([-1, 1]), so scale them, not the grid.
        scale = options.prior_size / size
        prior = build_prior(landmarks[0] * scale, landmarks[1] * scale, options.prior_size, options.prior)
        sample["prior_grid"] = torch.from_numpy(prior.grid)
        if prior.masks is not None:
            sample["prior_masks"] = torch.from_numpy(prior.masks)
    return sample


class RandomPairs(Dataset):
    """Random same-clip (source, driving) pairs with augmentation; sample ``index`` is a pure function of
    ``(seed, index)``. Use with `StepSampler` (the dataset has no natural length)."""

    def __init__(
        self,
        clips: Sequence[PreparedClip],
        options: PairOptions,
        augment: AugmentConfig,
        seed: int,
        weighting: Literal["identity", "sqrt_frames"] = "identity",
        open_mouth_weight: float = 0.0,
        closed_eye_weight: float = 0.0,
    ):
        """Args:
            clips: clips of a `PreparedDataset`; clips with fewer than two face frames are left out.
            options, augment: see `make_pair`.
            seed: base seed of the sample stream.
            weighting: clip sampling (module docstring).
            open_mouth_weight: > 0: the driving frame is drawn with weight 1 + this x its mouth opening
                (`motion.mouth_openness`), the source uniformly from the other frames; 0: both uniformly.
            closed_eye_weight: > 0: the driving frame's weight also gets this x how far its eyes are closed
                (1 - `motion.eye_openness` / the clip's median, clipped to [0, 1]): blinks come up more often.
        """
        self.clips = [clip for clip in clips if len(clip.usable_frames) >= 2]
        if not self.clips:
            raise ValueError("no clip has two frames with a face: nothing to train on")
        self.usable = [clip.usable_frames for clip in self.clips]
        self.options = options
        self.augment = augment
        self.seed = seed
        root = np.sqrt([len(usable) for usable in self.usable])
        if weighting == "sqrt_frames":
            weights = root
        elif weighting == "identity":
            identities = [clip.identity for clip in self.clips]
            per_identity = {name: 0.0 for name in identities}
            for name, r in zip(identities, root):
                per_identity[name] += r
            weights = np.array([r / per_identity[name] for name, r in zip(identities, root)])
        else:
            raise ValueError(f"unknown clip weighting {weighting!r}; choose 'identity' or 'sqrt_frames'")
        self.cumulative = np.cumsum(weights / weights.sum())
        if open_mouth_weight < 0 or closed_eye_weight < 0:
            raise ValueError(f"open_mouth_weight and closed_eye_weight must be >= 0, got {open_mouth_weight}, "
                             f"{closed_eye_weight}")
        self.driving_cumulative = None  # per clip: cumulative driving-frame probabilities over `usable`
        if open_mouth_weight > 0 or closed_eye_weight > 0:
            from metaportrait.motion import eye_openness, mouth_openness

            self.driving_cumulative = []
            for clip, usable in zip(self.clips, self.usable):
                eyes = eye_openness(clip.landmarks[usable])
                closure = np.clip(1.0 - eyes / max(float(np.median(eyes)), 1e-6), 0.0, 1.0)
                frame_weights = (1.0 + open_mouth_weight * np.clip(mouth_openness(clip.landmarks[usable]), 0.0, None)
                                 + closed_eye_weight * closure)  # fmt: skip
                self.driving_cumulative.append(np.cumsum(frame_weights / frame_weights.sum()))

    def __len__(self) -> int:
        # The stream is unbounded; this length only bounds what `StepSampler` may ask for.
        return 2**62

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng([self.seed, int(index)])
        position = min(int(np.searchsorted(self.cumulative, rng.random(), side="right")), len(self.clips) - 1)
        clip = self.clips[position]
        source, driving = self.choose_frames(position, rng)
        frames = np.stack([clip.frames[source], clip.frames[driving]])
        landmarks = np.stack([clip.landmarks[source], clip.landmarks[driving]])
        return make_pair(frames, landmarks, self.options, self.augment, rng)

    def choose_frames(self, position: int, rng: np.random.Generator) -> tuple[int, int]:
        """(source, driving): two different usable frames of clip ``position``."""
        usable = self.usable[position]
        if self.driving_cumulative is None:
            source, driving = rng.choice(usable, size=2, replace=False)
            return int(source), int(driving)
        at = min(int(np.searchsorted(self.driving_cumulative[position], rng.random(), side="right")), len(usable) - 1)
        other = (at + rng.integers(1, len(usable))) % len(usable)  # any other frame, uniformly
        return int(usable[other]), int(usable[at])


class FixedPairs(Dataset):
    """A fixed list of pairs without augmentation, for validation: per clip the first usable frame is the
    source and ``per_clip`` driving frames are spread evenly over the rest (the feasibility protocol)."""

    def __init__(self, clips: Sequence[PreparedClip], options: PairOptions, per_clip: int = 8):
        self.clips = list(clips)
        self.options = options
        self.pairs: list[tuple[int, int, int]] = []  # (clip position, source frame, driving frame)
        for position, clip in enumerate(self.clips):
            usable = clip.usable_frames
            if len(usable) < 2:
                continue
            picks = np.unique(np.linspace(1, len(usable) - 1, per_clip).round().astype(int))
            self.pairs += [(position, int(usable[0]), int(usable[k])) for k in picks]
        if not self.pairs:
            raise ValueError("no validation clip has two frames with a face")

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        position, source, driving = self.pairs[index]
        clip = self.clips[position]
        frames = np.stack([clip.frames[source], clip.frames[driving]])
        landmarks = np.stack([clip.landmarks[source], clip.landmarks[driving]])
        return make_pair(frames, landmarks, self.options, NO_AUGMENT, np.random.default_rng(0))


class StepSampler(Sampler[int]):
    """Sample indices for training steps ``start_step, ..., end_step - 1`` of one rank.

    Step ``s`` of rank ``r`` (of ``world_size``) takes indices ``(s * world_size + r) * batch_size + j``,
    ``j < batch_size``: every rank sees different pairs, and resuming at step ``s`` continues the same stream.
    """

    def __init__(self, start_step: int, end_step: int, batch_size: int, rank: int = 0, world_size: int = 1):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        self.start_step, self.end_step = start_step, end_step
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size

    def __len__(self) -> int:
        return max(0, self.end_step - self.start_step) * self.batch_size

    def __iter__(self) -> Iterator[int]:
        for step in range(self.start_step, self.end_step):
            first = (step * self.world_size + self.rank) * self.batch_size
            yield from range(first, first + self.batch_size)
