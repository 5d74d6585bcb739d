"""Typed training configuration of the base model (`train_base`), and one recipe per model preset.

A run directory keeps its `TrainConfig` as ``train_config.json``; ``--resume`` rebuilds the run from it.

Recipes (`recipe(preset, stage, steps)`):

* ``official``: the released MetaPortrait settings (notes/official_metaportrait.md §2.4): 256², Adam 2e-4 with
  betas (0.5, 0.999), warp group at 0.1x (even in the warp stage), gradient clip 0.3, step decay x0.1 at 3/4 of
  training (epoch 45 of 60), loss weights perceptual 10 per layer on the warped image and on the output,
  eye/mouth 50, LSGAN 1, feature matching 10 per layer, ID 20. Those were tuned for a VGG19 perceptual loss;
  use ``perceptual_backbone="vgg19"`` with a user-given torchvision weight file to match them. The official
  model draws the official 669-point line images, which our MediaPipe-based prepared datasets cannot provide,
  so `train_base` refuses this preset today; the recipe records the settings.
* ``lite``: the CPU model trained from scratch at 128². Differences from official, and why:
  - the warp network trains at the full learning rate in stage ``warp`` (it starts from scratch here; the 0.1x
    of the official configs assumes a warp net that is already good), and at 0.1x in stage ``full``;
  - the perceptual backbone is ImageNet MobileNetV2 (the only ImageNet CNN available offline). Calibration on
    40 same-clip frame pairs at 128² (vox/styletalk crops, "copy" = compare two frames of one clip): per layer
    summed over the 4 pyramid scales its L1 terms are 1.36, 1.94, 1.63, 1.06 and 0.20, i.e. 0.3-0.5 per
    (layer, scale) for the first four layers, the same order as VGG19's in FOMM's logs. So the official
    balance between the official terms is kept. Every weight is divided by 10 (perceptual 1 per layer, ~6 on
    copy pairs) only to keep the logged numbers small: Adam does not see a global loss scale, and the 0.3
    gradient clip is active at every step either way (measured generator gradient norms 5-15 in the warp stage);
  - a pixel L1 term (official: none) on the output (x100) and on the warped image (x25): on copy pairs it
    equals the perceptual term (100 x 0.067 ~ 6.7), as in the CPU prototype (notes/feasibility.md §3), where
    it was what made the PSNR move within a one-hour budget;
  - eye and mouth losses are L1 inside the boxes (official: squared error) at x10 (official 50 / 10 = 5,
    doubled: the mouth is where the mesh-warp prior fails and the budget is short);
  - a face-region L1 (x50, on the warped image and the output, inside the driving face-oval hull): the
    whole-frame terms are dominated by hair and background, and the face is what the baselines get right;
  - on 64² crops around the driving mouth box, a perceptual loss (x2 per layer) and a local critic
    (`MouthDiscriminator`, LSGAN x1, feature matching x2), with the mouth-box L1 lowered to x15: the
    whole-frame losses alone paint the average mouth, a flat fill (docs/experiments.md, "Why a smooth fill").
* ``tiny``: ``lite`` at 64² with batch 2 and frequent logging/checkpoints, for tests.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Literal

from metaportrait.config import PRESETS, ModelConfig, MouthFill, _from_dict
from metaportrait.data.pairs import AugmentConfig

Stage = Literal["warp", "full"]
Backbone = Literal["mobilenet_v2", "vgg19"]
ClipWeighting = Literal["identity", "sqrt_frames"]
STAGES = ("warp", "full")


@dataclass(frozen=True)
class LossWeights:
    """Weights of the generator and discriminator losses (0 switches a term off)."""

    # FOMM perceptual pyramid: one weight per backbone feature map, summed over `pyramid_scales`.
    perceptual_warped: tuple[float, ...] = (10.0, 10.0, 10.0, 10.0, 10.0)  # warped source vs driving (both stages)
    perceptual_output: tuple[float, ...] = (10.0, 10.0, 10.0, 10.0, 10.0)  # output vs driving (stage full)
    pyramid_scales: tuple[float, ...] = (1.0, 0.5, 0.25, 0.125)
    l1_warped: float = 0.0  # mean |warped - driving| (not in the official code)
    l1_output: float = 0.0  # mean |output - driving| (stage full; not in the official code)
    # Mean squared error of the output (stage full; not in the official code): PSNR's own loss. L1 pulls toward the
    # median of what the driving frame may show, squared error toward its mean, which is what PSNR rewards.
    l2_output: float = 0.0
    # Eye and mouth: L1 inside the driving landmarks' boxes, divided by the box area, at full resolution only
    # (official: squared error at every pyramid scale; at 128² the 1/8 scale leaves 2 x 1 px eye boxes).
    eye: float = 50.0
    mouth: float = 50.0
    # L1 inside the driving face-oval hull, divided by its area, on the warped image and on the output (not in
    # the official code). The mesh prior is already good on the face; this keeps the learned residual flow from
    # trading face accuracy for background (measured: without it face-region L1 ends above the prior's).
    face: float = 0.0
    gan: float = 1.0  # LSGAN: G gets (1 - D(fake))², D gets (1 - D(real))² + D(fake)² (stage full)
    feature_matching: float = 10.0  # per discriminator layer, L1 between features of real and fake (stage full)
    identity: float = 20.0  # 1 - cos(E_id(output), E_id(source)) (stage full; disabled in the official release)
    # Not in the official code: LSGAN and feature matching (per layer) of a local critic on mouth crops
    # (`MouthDiscriminator`), which sees the driving lines of the crop too (stage full; 0 = no mouth critic).
    mouth_gan: float = 0.0
    mouth_feature_matching: float = 0.0
    # Not in the official code: the perceptual loss (every backbone layer at this weight) on the same mouth crops.
    mouth_perceptual: float = 0.0
    # Not in the official code: scale of the output's pixel terms (l1_output, l2_output, face, eye, mouth) inside the
    # band the model must synthesise (prior-mask channel 1: the mouth opening the source cannot supply). 1 = no change.
    synthesis_pixel: float = 1.0
    # Not in the official code: the same scale inside the eyelid band (the last prior-mask channel of a model with
    # RefineConfig.eyelid_band). None: synthesis_pixel there too. Unlike the mouth interior, a lid's colour is
    # knowable (the skin around it), so the pixel terms may keep their full weight there.
    eyelid_pixel: float | None = None

    def __post_init__(self):
        for name, value in dataclasses.asdict(self).items():
            values = value if isinstance(value, tuple) else (value,)
            if any(v is not None and v < 0 for v in values):
                raise ValueError(f"loss.{name} must be >= 0, got {value}")
        if self.mouth_feature_matching > 0 and self.mouth_gan == 0:
            raise ValueError("loss.mouth_feature_matching needs loss.mouth_gan > 0 (the mouth critic only trains then)")


@dataclass(frozen=True)
class TrainConfig:
    """Everything `train_base` needs besides the data and output folders (one default per setting)."""

    stage: Stage = "warp"  # "warp": train W alone on the warped image; "full": W + R with all losses and D
    preset: str = "lite"  # model preset (`metaportrait.config.PRESETS`)
    # Ablations (paper Table 3): change one property of the preset's model; None keeps the preset's value.
    landmark_topology: str | None = None  # "mediapipe478" (dense) or "sparse68" (sparse) line images
    use_identity: bool | None = None  # False: refinement without the identity branch
    prior_mouth: MouthFill | None = None  # how the mesh prior fills the mouth opening ("stretch" / "upper_lip")
    mouth_template: bool | None = None  # True: the refinement also sees `prior.mouth.mouth_template` (RefineConfig)
    subtract_source_flow: bool | None = None  # True: train with `WarpConfig.subtract_source_flow` (no new weights)
    smooth_upscale: bool | None = None  # True: `RefineConfig.smooth_upscale` (no new weights)
    # > 0: `RefineConfig.gain_map_grid` (a new zero-weight head: --init from a model without it starts unchanged)
    gain_map_grid: int | None = None
    prior_eyelids: bool | None = None  # True: `ModelConfig.prior_eyelids` (no new weights)
    prior_eyelid_fill: bool | None = None  # True: `ModelConfig.prior_eyelid_fill` (no new weights)
    prior_face_masked: bool | None = None  # True: `ModelConfig.prior_face_masked` (no new weights)
    eyelid_condition: bool | None = None  # True: `RefineConfig.eyelid_band` (the refinement also sees the lid band)
    # Capacity of the warping hourglass (`WarpConfig.block_expansion`, `max_features`); None keeps the preset's.
    # These change the weights' shapes: a run with them starts from scratch (or from a model of the same width).
    warp_block_expansion: int | None = None
    warp_max_features: int | None = None
    size: int = 128  # training crop side (frames are resized to it; a multiple of 32)
    batch_size: int = 8  # per process
    steps: int = 4000  # total optimiser steps (a resumed run continues up to this)
    # Optimisation.
    lr: float = 2e-4  # generator refinement group (and the base of the warp group)
    warp_lr_scale: float = 1.0  # warp group lr = lr * warp_lr_scale (official: 0.1)
    lr_discriminator: float = 2e-4
    betas: tuple[float, float] = (0.5, 0.999)
    lr_milestones: tuple[int, ...] = ()  # steps at which every lr is multiplied by lr_decay (official: 3/4)
    lr_decay: float = 0.1
    grad_clip: float = 0.3  # max global gradient norm, G and D separately
    grad_nan_bound: float = 1e5  # gradients go through nan_to_num(+-bound) before clipping (official)
    amp: bool = True  # float16 autocast + GradScaler; only used on CUDA
    # Losses and data.
    loss: LossWeights = field(default_factory=LossWeights)
    perceptual_backbone: Backbone = "mobilenet_v2"
    vgg19_weights: str | None = None  # torchvision vgg19-dcbb9e9d.pth, needed for perceptual_backbone="vgg19"
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    clip_weighting: ClipWeighting = "identity"  # see metaportrait.data.pairs
    # > 0: within a clip, draw the driving frame with weight 1 + this x its mouth opening (inner-lip gap / mouth
    # width, `motion.mouth_openness`), so wide-open mouths, where the model must synthesise the interior, come up
    # more often (10: a mouth open 0.6 comes 7x as often as a closed one). 0: uniform (runs before this field).
    open_mouth_weight: float = 0.0
    # > 0: the driving frame's weight also gets this x how far its eyes are closed against the clip's median
    # (blinks, for `ModelConfig.prior_eyelids`; 0: not, runs before this field).
    closed_eye_weight: float = 0.0
    num_workers: int = 0  # DataLoader workers per process (2 cores: 0 or 1)
    # Validation: self-reconstruction on held-out identities (first frame -> evenly spaced frames).
    val_identities: tuple[str, ...] = ()  # their clips are removed from training; empty = no validation
    val_pairs_per_clip: int = 8
    val_max_clips: int = 20
    # Bookkeeping (in steps).
    log_every: int = 20
    sample_every: int = 250
    checkpoint_every: int = 500
    val_every: int = 500
    # Start and reproducibility.
    # A run folder (its ``model/``) or a model folder whose warp network weights are loaded (stage warp: to
    # fine-tune them). Stage full only: with ``init_refine`` also its refinement network (it must come from a
    # full-stage run). ``init_refine_from``: the refinement network from this other full-stage run or model
    # instead (e.g. a new warp network under trained R).
    init: str | None = None
    init_refine: bool = False
    init_refine_from: str | None = None
    # Stage full: the refinement network's learning rate is 0 for this many first steps, so a new warp network
    # (and its occlusion map) adapts under a trained R before R moves.
    freeze_refine_steps: int = 0
    # > 0: validate and save an exponential moving average of the generator's weights (0.99: about the last
    # 100 steps), not the weights of the last step. 0: off (runs before this field existed).
    ema_decay: float = 0.0
    # Stage full with loss.mouth_gan > 0: which patches of the mouth crop the critic's LSGAN terms count. "crop":
    # all (equal weights). "synthesised": only those over the band the model must synthesise (prior-mask channel
    # 1), by coverage. Elsewhere output and real crops are nearly alike, which holds the critic at the
    # uninformative 0.5: its loss stayed at 0.49-0.50 (x its weight) in every earlier run.
    mouth_critic_region: Literal["crop", "synthesised"] = "crop"
    seed: int = 0
    threads: int = 2  # torch CPU threads per process

    def __post_init__(self):
        if self.stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {self.stage!r}")
        if self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; choose one of {sorted(PRESETS)}")
        if self.size % 32 or self.size < 32:
            raise ValueError(f"size must be a positive multiple of 32, got {self.size}")
        positive = ("batch_size", "steps", "log_every", "sample_every", "checkpoint_every", "val_every", "threads")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0 or self.lr_discriminator <= 0 or self.warp_lr_scale < 0:
            raise ValueError("lr and lr_discriminator must be > 0 and warp_lr_scale >= 0")
        if list(self.lr_milestones) != sorted(set(self.lr_milestones)) or any(m < 1 for m in self.lr_milestones):
            raise ValueError(f"lr_milestones must be increasing positive steps, got {self.lr_milestones}")
        if self.perceptual_backbone == "vgg19" and self.vgg19_weights is None:
            raise ValueError("perceptual_backbone='vgg19' needs vgg19_weights (torchvision's vgg19-dcbb9e9d.pth)")
        if (self.init_refine or self.init_refine_from is not None) and self.stage != "full":
            raise ValueError("init_refine and init_refine_from only apply to stage 'full' (stage warp trains W alone)")
        if self.init_refine and self.init is None:
            raise ValueError("init_refine needs init (the full-stage run to start from)")
        if self.freeze_refine_steps < 0 or (self.freeze_refine_steps and self.stage != "full"):
            raise ValueError("freeze_refine_steps must be >= 0 and only applies to stage 'full'")
        if self.mouth_critic_region not in ("crop", "synthesised"):
            raise ValueError(f"mouth_critic_region must be 'crop' or 'synthesised', got {self.mouth_critic_region!r}")
        if self.mouth_critic_region == "synthesised" and not (self.stage == "full" and self.loss.mouth_gan > 0):
            # Without a critic the choice would silently change nothing.
            raise ValueError("mouth_critic_region='synthesised' needs stage 'full' and loss.mouth_gan > 0 (a mouth critic)")
        if self.open_mouth_weight < 0 or self.closed_eye_weight < 0:
            raise ValueError(f"open_mouth_weight and closed_eye_weight must be >= 0, got {self.open_mouth_weight}, "
                             f"{self.closed_eye_weight}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.init_refine_from is not None and (self.init is None or self.init_refine):
            raise ValueError("init_refine_from needs init (for the warp network) and excludes init_refine")
        if any(w is not None and w < 1 for w in (self.warp_block_expansion, self.warp_max_features)):
            raise ValueError(f"warp_block_expansion and warp_max_features must be >= 1, got "
                             f"{self.warp_block_expansion}, {self.warp_max_features}")
        if self.num_workers < 0 or self.val_pairs_per_clip < 1 or self.val_max_clips < 1:
            raise ValueError("num_workers must be >= 0, val_pairs_per_clip and val_max_clips >= 1")
        # The model options (e.g. gain_map_grid) are checked by the model config they build: here, not at the
        # start of training, so the command line reports a bad one as one error line.
        self.model_config()

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe nested dict (tuples become lists)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Inverse of `to_dict`; unknown or missing keys raise ValueError naming them."""
        return _from_dict(cls, data, "train")

    def model_config(self) -> ModelConfig:
        """The preset's model config with this run's ablation changes applied."""
        changes = {
            "landmark_topology": self.landmark_topology, "use_identity": self.use_identity,
            "prior_mouth": self.prior_mouth, "prior_eyelids": self.prior_eyelids,
            "prior_eyelid_fill": self.prior_eyelid_fill, "prior_face_masked": self.prior_face_masked,
        }  # fmt: skip
        model = PRESETS[self.preset].replace(**{k: v for k, v in changes.items() if v is not None})
        if self.mouth_template is not None:
            model = model.replace(refine=dataclasses.replace(model.refine, mouth_template=self.mouth_template))
        if self.subtract_source_flow is not None:
            model = model.replace(warp=dataclasses.replace(model.warp, subtract_source_flow=self.subtract_source_flow))
        if self.smooth_upscale is not None:
            model = model.replace(refine=dataclasses.replace(model.refine, smooth_upscale=self.smooth_upscale))
        if self.eyelid_condition is not None:
            model = model.replace(refine=dataclasses.replace(model.refine, eyelid_band=self.eyelid_condition))
        if self.gain_map_grid is not None:
            model = model.replace(refine=dataclasses.replace(model.refine, gain_map_grid=self.gain_map_grid))
        widths = {"block_expansion": self.warp_block_expansion, "max_features": self.warp_max_features}
        if any(v is not None for v in widths.values()):
            model = model.replace(warp=dataclasses.replace(model.warp, **{k: v for k, v in widths.items() if v}))
        return model

    def replace(self, **changes: Any) -> TrainConfig:
        """A copy with some top-level fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


# Official weights divided by 10, plus pixel L1 and L1 eye/mouth (module docstring).
_LITE_LOSS = LossWeights(
    perceptual_warped=(1.0, 1.0, 1.0, 1.0, 1.0),
    perceptual_output=(1.0, 1.0, 1.0, 1.0, 1.0),
    l1_warped=25.0,
    l1_output=100.0,
    eye=10.0,
    mouth=15.0,
    face=50.0,
    gan=0.1,
    feature_matching=1.0,
    identity=2.0,
    mouth_gan=1.0,
    mouth_feature_matching=2.0,
    mouth_perceptual=2.0,
)

# Fine-tuning on one person (personalisation, and the inner loop of meta-training): the lite recipe's output terms
# (pixel, face, eye and mouth L1, which move PSNR, and the perceptual term for texture), without critics and without
# the identity loss (the model already takes the source's identity); the warped-image terms are off (the output's
# terms reach the warping network through the warped image the output is blended from).
PERSONAL_LOSS = dataclasses.replace(
    _LITE_LOSS, perceptual_warped=(0.0,) * 5, l1_warped=0.0, gan=0.0, feature_matching=0.0, identity=0.0,
    mouth_gan=0.0, mouth_feature_matching=0.0, mouth_perceptual=0.0,
)


def recipe(preset: str, stage: Stage, steps: int | None = None) -> TrainConfig:
    """The recommended `TrainConfig` of a model preset and stage (module docstring).

    Args:
        preset: ``"official"``, ``"lite"`` or ``"tiny"``.
        stage: ``"warp"`` or ``"full"``.
        steps: total steps (default: the recipe's); the lr decay milestone is placed at 3/4 of it.
    """
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    if preset == "official":
        steps = steps or 200_000
        return TrainConfig(
            stage=stage, preset=preset, size=256, batch_size=48, steps=steps, warp_lr_scale=0.1,
            lr_milestones=(max(1, steps * 3 // 4),), loss=LossWeights(), log_every=100, sample_every=2000,
            checkpoint_every=5000, val_every=5000,
        )  # fmt: skip
    if preset == "lite":
        # ~80 min on 2 idle cores: warp 1000 x 0.44 s + full 4000 x 1.03 s (measured at 128², batch 8). The warp
        # stage saturates within a few hundred steps on the mesh prior (val PSNR 24.7 -> 26.3 at step 100).
        steps = steps or (1000 if stage == "warp" else 4000)
        return TrainConfig(
            stage=stage, preset=preset, size=128, batch_size=8, steps=steps, lr=2e-4,
            warp_lr_scale=1.0 if stage == "warp" else 0.1, lr_milestones=(max(1, steps * 3 // 4),), loss=_LITE_LOSS,
            log_every=20, sample_every=250, checkpoint_every=250, val_every=500,
        )  # fmt: skip
    if preset == "tiny":
        steps = steps or 4
        return TrainConfig(
            stage=stage, preset=preset, size=64, batch_size=2, steps=steps, lr=2e-4,
            warp_lr_scale=1.0 if stage == "warp" else 0.1, lr_milestones=(max(1, steps * 3 // 4),), loss=_LITE_LOSS,
            log_every=1, sample_every=2, checkpoint_every=2, val_every=2, val_pairs_per_clip=2, val_max_clips=2,
        )  # fmt: skip
    raise ValueError(f"no training recipe for preset {preset!r}; choose one of {sorted(PRESETS)}")
