"""Typed configurations. A checkpoint carries its `ModelConfig` as JSON, so loading never asks for flags.

`PRESETS` holds the three model sizes that share one code path:

* ``tiny``: the lite structure with ~30 k parameters at 64², for tests only.
* ``lite``: the CPU model (1.45 M parameters, 2.09 GFLOPs per 256² frame), trained at 128² and run at 256²
  with the same weights. It uses the mesh-flow prior, no normalisation layers, and composes its output from
  the warped image and a synthesised image, gated by the occlusion map.
* ``official``: the exact MetaPortrait base generator, so that ``ckpt_base.pth.tar`` loads with strict=True.

Training settings live in a separate ``TrainConfig`` (in ``metaportrait.train``), not here.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Literal, get_args, get_type_hints

Norm = Literal["instance", "none"]
LandmarkTopology = Literal["mediapipe478", "sparse68", "official669"]
MouthFill = Literal["stretch", "upper_lip"]  # `metaportrait.prior.mouth.MouthFill`
# Arithmetic of the per-frame generator call (`metaportrait.pipeline.Animator`); here so that the CLI can list the
# choices without importing torch.
Precision = Literal["auto", "fp32", "bf16"]


@dataclass(frozen=True)
class WarpConfig:
    """Motion encoder E_w (official `LadderEncoder`) and flow/occlusion network F_w (`DenseMotionNetworkReg`)."""

    input_size: int = 256  # the motion networks see their input resized to this (official: 256, what E_w requires)
    encoder_channels: tuple[int, ...] = (64, 128, 256, 512, 512, 512)  # stride-2 3x3 convs down to 4x4
    motion_dim: int = 512  # size of the unit-norm motion code z_w
    block_expansion: int = 64  # hourglass width: level i has min(max_features, block_expansion * 2**(i+1)) channels
    max_features: int = 1024
    num_blocks: int = 5  # hourglass depth (downsamplings)
    dec_lease: int = 2  # decoder stops this many levels early: the flow comes out at input_size / 2**dec_lease
    same_blocks: bool = True  # official `Lwarp`: an extra conv+FiLM after every down/up block
    film_hidden: int = 128  # hidden size of the MLP mapping z_w to each block's (gamma, beta)
    down_mode: Literal["pool", "stride"] = "pool"  # official: conv at full res then AvgPool; "stride" is 4x cheaper
    head_kernel: int = 7  # flow / occlusion head conv size
    identity_grid: Literal["corners", "centers"] = "corners"  # official grid includes the corners (FOMM quirk)
    occlusion_init_bias: float = 0.0  # logit of the occlusion map at initialisation (1 = source visible)
    padding_mode: Literal["reflection", "border", "zeros"] = "reflection"  # grid_sample padding (official: reflection)
    # True: subtract from every frame's flow the flow the network predicts when the source drives itself
    # (`Generator.source_flow`, computed once per source). That flow should be zero; what it is instead is a
    # per-source bias that blurs and shifts hair and background under any motion (not in the official code).
    subtract_source_flow: bool = False

    def __post_init__(self):
        _check(self.input_size % 32 == 0, f"warp.input_size must be a multiple of 32, got {self.input_size}")
        expected = (self.input_size // 4).bit_length() - 1  # number of stride-2 convs from input_size to 4
        _check(
            len(self.encoder_channels) == expected and self.input_size == 4 << expected,
            f"warp.encoder_channels needs {expected} entries to go from {self.input_size}² to 4² "
            f"(input_size must be 4 * 2**k), got {len(self.encoder_channels)}",
        )
        _check(0 <= self.dec_lease < self.num_blocks, "warp.dec_lease must be in [0, num_blocks)")
        _check(self.head_kernel % 2 == 1, "warp.head_kernel must be odd")


@dataclass(frozen=True)
class RefineConfig:
    """ID-preserving refinement: source feature pyramid (`feature_encoder`, `fuse_high_res`) + decoder `SPDAE_G`."""

    # Source feature pyramid: an hourglass on the source image; its decoder outputs are the pyramid levels.
    block_expansion: int = 64
    max_features: int = 512
    num_blocks: int = 3
    dec_lease: int = 0  # 0: the finest level is full resolution (official); 1: it is half resolution
    down_mode: Literal["pool", "stride"] = "pool"
    # Decoder: channels entering each fused-norm residual block, then the output width of the last block.
    seed: Literal["identity", "warped"] = "identity"  # official: start from z_id at 4x4; "warped": from warped feats
    block_channels: tuple[int, ...] = (512, 512, 512, 512, 256, 128, 64, 32)
    spade_hidden: int = 128  # hidden width of the SPADE conditioning convs
    spade_kernel: int = 3  # conv size of the shared SPADE conv and of the attention-mask conv
    spade_param_kernel: int = 3  # conv size of the SPADE gamma / beta convs (1 is much cheaper at full width)
    landmark_lines: bool = True  # condition on source + driving landmark-line images (6 channels)
    gaze_heatmap: bool = True  # official only: 8 Gaussian maps of the driving gaze points (needs driving_keypoints)
    mouth_line: bool = True  # official only: driving lines inside the driving mouth box (needs driving_keypoints)
    antialias: bool = False  # anti-alias when shrinking condition maps (official: plain bilinear)
    # Also condition on `metaportrait.prior.mouth.mouth_template` (2 channels: teeth, cavity of the driving opening),
    # given as prior-mask channels 2-3; needs ModelConfig.prior_masks.
    mouth_template: bool = False
    # Also condition on `metaportrait.prior.eyelids.eyelid_band` (1 channel: the lid skin a closing driving eye
    # shows), given as the last prior-mask channel; needs ModelConfig.prior_eyelids. Without it the decoder sees
    # the lid band only as forced occlusion, the same signal as the mouth band, and paints lids in mouth colours.
    eyelid_band: bool = False
    # With dec_lease > 0: a fixed triangle filter ([1, 2, 1] for r = 2) after the sub-pixel upscale by r (no
    # weights). The pixel shuffle predicts each of the r x r sub-pixel phases with its own filter; where they
    # disagree (the synthesised mouth band) the image gets a period-r checkerboard, which this filter removes.
    smooth_upscale: bool = False
    # > 0 (occlusion_blend only): the decoder also predicts a smooth per-channel gain on the warped image, one value
    # per cell of a gain_map_grid x gain_map_grid grid, upsampled bilinearly, in [0.5, 1.5]. It lets the network
    # correct low-frequency shading of the warped pixels without blending in its softer synthesis. 0: no gain map.
    gain_map_grid: int = 0
    output: Literal["tanh", "occlusion_blend"] = "tanh"
    # "tanh": official; the decoder's tanh output is used as the image (values < 0 are clipped).
    # "occlusion_blend": out = occ * warped + (1 - occ) * sigmoid(decoder), see models/refine.py.

    def __post_init__(self):
        _check(len(self.block_channels) >= 2, "refine.block_channels needs at least two entries")
        _check(self.spade_kernel % 2 == 1 and self.spade_param_kernel % 2 == 1, "refine SPADE kernels must be odd")
        _check(0 <= self.dec_lease < self.num_blocks, "refine.dec_lease must be in [0, num_blocks)")
        _check(not self.smooth_upscale or self.dec_lease > 0, "refine.smooth_upscale needs dec_lease > 0")
        _check(self.gain_map_grid >= 0, f"refine.gain_map_grid must be >= 0, got {self.gain_map_grid}")
        _check(self.gain_map_grid == 0 or self.output == "occlusion_blend",
               "refine.gain_map_grid needs output='occlusion_blend' (the gain applies to the warped image it blends)")
        num_decoder_blocks = len(self.block_channels) - 1
        if self.seed == "identity":
            _check(num_decoder_blocks >= 4, "refine.seed='identity' needs the 3 head/middle blocks + 1 up block")
        else:
            # Seeded at the coarsest pyramid level, each block doubles the resolution up to the finest level.
            _check(
                num_decoder_blocks == self.num_blocks - self.dec_lease + 1,
                f"refine.seed='warped' needs num_blocks - dec_lease + 1 = {self.num_blocks - self.dec_lease + 1} "
                f"decoder blocks, got {num_decoder_blocks}",
            )
        _check(
            self.output == "tanh" or self.seed == "warped",
            "refine.output='occlusion_blend' is designed for seed='warped' (it needs the full-res warped image)",
        )


@dataclass(frozen=True)
class DiscriminatorConfig:
    """Multi-scale patch discriminator (official `MultiScaleDiscriminator`, FOMM/pix2pix style)."""

    scales: tuple[float, ...] = (1.0,)
    block_expansion: int = 32
    max_features: int = 512
    num_blocks: int = 4
    norm: Norm = "instance"  # official: InstanceNorm2d(affine=True) on blocks 1..num_blocks-1

    def __post_init__(self):
        _check(len(self.scales) >= 1 and all(0 < s <= 1 for s in self.scales), "discriminator.scales must be in (0, 1]")


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild a `Generator` (and its discriminator) from a checkpoint."""

    image_size: int = 256  # training/reference resolution; the lite model runs at any multiple of 32
    landmark_topology: LandmarkTopology = "official669"  # which landmark set the line images are drawn from
    identity_dim: int = 256  # 128 for our dlib encoder, 256 for the official (Microsoft-internal) one
    use_identity: bool = True  # False: ablation without the identity (AdaIN) branch in the refinement norms
    use_mesh_prior: bool = False  # True: F_w refines a piecewise-affine mesh warp given as `prior_grid`
    # True (needs use_mesh_prior): the forward also takes `prior_masks` (`metaportrait.prior.masks`): the learned
    # residual flow is faded out inside the driving face, where the mesh is exact, and the output is synthesised
    # (occlusion forced to 0) inside the driving mouth opening, where the source has no pixels.
    prior_masks: bool = False
    # How the mesh prior fills a driving mouth opening (`metaportrait.prior.mouth.MouthFill`): "stretch" the
    # source's opening over it, or keep the source's interior "upper_lip"-anchored and synthesise the rest.
    # Without a mesh prior it has no effect.
    prior_mouth: MouthFill = "stretch"
    # True (needs prior_masks): the synthesis channel of the prior masks also covers the eyelid skin a closing
    # driving eye shows and the source hides (`metaportrait.prior.eyelids`), so blinks are synthesised, not the
    # source's lash line stretched over the lowered lid. No weights change.
    prior_eyelids: bool = False
    # True (needs use_mesh_prior): the mesh prior fills the lid a closing driving eye lowers from the skin above
    # it (`metaportrait.prior.eyelids.fill_lids`) instead of stretching the lash line over it. No weights change.
    prior_eyelid_fill: bool = False
    # True (needs use_mesh_prior): the mesh prior is the identity outside the (dilated, feathered) driving and source
    # face hulls, as in the "mesh-warp" baseline, instead of moving hair, neck and background with a ring at 1.4x
    # the face oval; the learned residual flow then moves them from rest. No weights change.
    prior_face_masked: bool = False
    # Image side at which the landmark lines are 1 px wide; at other sides the width scales with it (rounded, at
    # least 1 px), so a model trained at 128² sees lines of the same relative width at 256² (its warp network's
    # 128² input otherwise shows them at half strength). None: 1 px at every size (official, and lite: measured
    # on the lite model, 2-px lines at 256² kept PSNR and worsened the face L1; docs/model_card.md).
    line_reference_size: int | None = None
    norm: Norm = "instance"  # parameter-free normalisation in E_w, F_w and the fused norms of SPDAE_G
    spectral_norm: bool = True  # official: spectral norm on E_w convs and on every SPDAE_G conv
    warp: WarpConfig = field(default_factory=WarpConfig)
    refine: RefineConfig = field(default_factory=RefineConfig)
    discriminator: DiscriminatorConfig = field(default_factory=DiscriminatorConfig)

    def __post_init__(self):
        _check(self.image_size % 32 == 0, f"image_size must be a multiple of 32, got {self.image_size}")
        _check(
            self.use_identity or self.refine.seed == "warped",
            "use_identity=False needs refine.seed='warped' (the 'identity' seed is built from z_id)",
        )
        if self.refine.seed == "identity":
            # The decoder starts at 4x4 and doubles per block; it must end at the finest pyramid level.
            end = 4 * 2 ** (len(self.refine.block_channels) - 2) * 2**self.refine.dec_lease
            _check(end == self.image_size, f"refine.seed='identity' with these blocks only works at {end}², "
                   f"got image_size={self.image_size}")
        _check(not self.prior_masks or self.use_mesh_prior, "prior_masks needs use_mesh_prior")
        _check(not self.refine.mouth_template or self.prior_masks, "refine.mouth_template needs prior_masks")
        _check(not self.prior_eyelids or self.prior_masks, "prior_eyelids needs prior_masks")
        _check(not self.prior_eyelid_fill or self.use_mesh_prior, "prior_eyelid_fill needs use_mesh_prior")
        _check(not self.prior_face_masked or self.use_mesh_prior, "prior_face_masked needs use_mesh_prior")
        _check(not self.refine.eyelid_band or self.prior_eyelids, "refine.eyelid_band needs prior_eyelids")
        _check(self.line_reference_size is None or self.line_reference_size >= 16,
               f"line_reference_size must be None or >= 16, got {self.line_reference_size}")
        _check(
            not self.prior_masks or self.refine.output == "occlusion_blend",
            "prior_masks needs refine.output='occlusion_blend' (it gates the occlusion blend)",
        )
        needs_keypoints = self.refine.gaze_heatmap or self.refine.mouth_line
        _check(
            not needs_keypoints or self.landmark_topology == "official669",
            "refine.gaze_heatmap / mouth_line use the official 58-point subset: landmark_topology must be official669",
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe nested dict (tuples become lists)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Inverse of `to_dict`. Unknown or missing keys raise ValueError naming them, except fields added after
        checkpoints were published (`ADDED_FIELDS`), which take their default: the behaviour before they existed."""
        return _from_dict(cls, data, "model")

    def line_thickness(self, size: int) -> int:
        """Width in pixels of the landmark lines drawn on a ``size`` x ``size`` image for this model."""
        if self.line_reference_size is None:
            return 1
        return max(1, round(size / self.line_reference_size))

    def prior_mask_channels(self) -> int:
        """Channels of the generator's ``prior_masks`` input: face, synthesis band [+ teeth, cavity] [+ eyelid
        band]; 0 without."""
        return (2 + 2 * self.refine.mouth_template + self.refine.eyelid_band) if self.prior_masks else 0

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with some top-level fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


# Fields added after checkpoints were published, per dataclass: a missing one takes its default, which keeps the
# behaviour the checkpoint was trained with.
ADDED_FIELDS: dict[str, frozenset[str]] = {
    "ModelConfig": frozenset({"prior_masks", "line_reference_size", "prior_mouth", "prior_eyelids",
                             "prior_eyelid_fill", "prior_face_masked"}),
    "TrainConfig": frozenset({"init_refine", "prior_mouth", "init_refine_from", "freeze_refine_steps", "ema_decay",
                              "mouth_critic_region", "mouth_template", "open_mouth_weight",
                              "subtract_source_flow", "smooth_upscale", "prior_eyelids",
                              "closed_eye_weight", "eyelid_condition", "prior_eyelid_fill",
                              "prior_face_masked", "warp_block_expansion", "warp_max_features",
                              "gain_map_grid"}),
    "LossWeights": frozenset({"mouth_gan", "mouth_feature_matching", "mouth_perceptual", "synthesis_pixel",
                              "l2_output", "eyelid_pixel"}),
    "RefineConfig": frozenset({"mouth_template", "smooth_upscale", "eyelid_band", "gain_map_grid"}),
    "WarpConfig": frozenset({"subtract_source_flow"}),
}


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _from_dict(cls: type, data: dict[str, Any], where: str):
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected an object, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    missing = sorted(set(fields) - set(data) - ADDED_FIELDS.get(cls.__name__, frozenset()))
    if unknown or missing:
        raise ValueError(f"{where}: unknown keys {unknown}, missing keys {missing} (allowed: {sorted(fields)})")
    hints = get_type_hints(cls)
    kwargs = {}
    for name, value in data.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _from_dict(hint, value, f"{where}.{name}")
        elif getattr(hint, "__origin__", None) is tuple:
            kwargs[name] = tuple(value)
        elif getattr(hint, "__origin__", None) is Literal and value not in get_args(hint):
            raise ValueError(f"{where}.{name}: {value!r} is not one of {get_args(hint)}")
        elif hint is float and isinstance(value, int):
            kwargs[name] = float(value)
        else:
            kwargs[name] = value
    return cls(**kwargs)


# The official generator, exactly (config/meta_portrait_256_eval.yaml of the MetaPortrait release).
_OFFICIAL = ModelConfig()

# The CPU model. Widths were chosen by measuring FLOPs and step time (benchmarks/bench_model.py).
_LITE = ModelConfig(
    image_size=256,
    landmark_topology="mediapipe478",
    identity_dim=128,
    use_identity=True,
    use_mesh_prior=True,
    prior_masks=True,
    prior_mouth="upper_lip",
    # line_reference_size stays None: 2-px lines at 256² measured no PSNR gain and a worse face L1 (model card).
    # InstanceNorm measured +10-20% on the lite training step (128², batch 8, 1 thread) for little expected gain at
    # this size; FiLM / SPADE modulations work on the raw activations instead.
    norm="none",
    spectral_norm=False,
    warp=WarpConfig(
        input_size=128,
        encoder_channels=(16, 32, 64, 128, 128),
        motion_dim=128,
        # Width 16 / max 128 (was 8 / 64): the warp network's capacity is what moved validation PSNR (+0.1 dB at
        # 3000 warp steps, docs/experiments.md), for +0.6 GFLOPs; the narrower one saturated at 26.8 dB.
        block_expansion=16,
        max_features=128,
        num_blocks=4,
        dec_lease=1,
        same_blocks=False,
        film_hidden=64,
        down_mode="stride",
        head_kernel=5,
        identity_grid="centers",
        occlusion_init_bias=2.0,
        padding_mode="border",
    ),
    refine=RefineConfig(
        block_expansion=6,
        max_features=64,
        num_blocks=3,
        dec_lease=1,
        down_mode="stride",
        seed="warped",
        block_channels=(64, 32, 16, 16),
        spade_hidden=16,
        spade_kernel=3,
        spade_param_kernel=1,
        landmark_lines=True,
        gaze_heatmap=False,
        mouth_line=False,
        antialias=True,
        output="occlusion_blend",
    ),
    discriminator=DiscriminatorConfig(
        scales=(1.0, 0.5), block_expansion=16, max_features=256, num_blocks=4, norm="none"
    ),
)

# Same structure as lite with a handful of channels, for fast tests at 64².
_TINY = dataclasses.replace(
    _LITE,
    image_size=64,
    warp=dataclasses.replace(
        _LITE.warp, input_size=64, encoder_channels=(4, 8, 8, 8), motion_dim=8, block_expansion=2, max_features=8,
        film_hidden=8, head_kernel=3,
    ),
    refine=dataclasses.replace(
        _LITE.refine, block_expansion=2, max_features=8, block_channels=(8, 8, 4, 4), spade_hidden=4,
    ),
    discriminator=DiscriminatorConfig(scales=(1.0, 0.5), block_expansion=2, max_features=8, num_blocks=3, norm="none"),
)

PRESETS: dict[str, ModelConfig] = {"tiny": _TINY, "lite": _LITE, "official": _OFFICIAL}


# ----------------------------------------------------------------------------------------------------------------
# Temporal super-resolution (models/sr.py)


@dataclass(frozen=True)
class SRConfig:
    """Temporal face super-resolution: a U-Net with temporal layers modulating a StyleGAN2-style decoder (CS-SFT).

    Channel tuples are per resolution: ``unet_channels`` from ``unet_size`` down to 4, ``decoder_channels`` from 4
    up to ``decoder_size`` (``output_size`` unless a preset stops its decoder lower). At every decoder resolution
    that the U-Net also has (8 to ``unet_size``), the U-Net's width must be half the decoder's (channel-split SFT
    modulates one half of the decoder features).
    """

    input_size: int = 256  # side of the input frames
    output_size: int = 512  # side of the output frames
    # side of the decoder's image (0 = output_size); a smaller one is upsampled (bilinear) before it is added
    decoder_size: int = 0
    unet_size: int = 512  # the input is resized (bilinear) to this before the U-Net (official: x2 to 512)
    unet_channels: tuple[int, ...] = (32, 64, 128, 256, 256, 256, 256, 256)
    decoder_channels: tuple[int, ...] = (512, 512, 512, 512, 512, 256, 128, 64)
    style_dim: int = 512  # width of the W+ latents the U-Net bottleneck predicts (one per decoder layer)
    num_mlp: int = 8  # StyleGAN2 mapping MLP layers (kept for the official layout; bypassed, latents are given)
    temporal: bool = True  # temporal layers after every U-Net block (window of frames t-1, t, t+1)
    temporal_hidden: int = 3  # hidden width of a temporal conv pair in multiples of C (official: 3C -> 3C -> C)
    residual: bool = False  # output = upsampling of the input + decoder image (decoder starts at zero)
    residual_mode: Literal["bilinear", "bicubic"] = "bilinear"  # the upsampling the residual is added to
    # residual presets: a detail body at the input resolution, around the modulated decoder: the window of frames
    # t-1, t, t+1 (9 channels) and the U-Net's finest features (1x1) -> detail_channels -> detail_blocks residual
    # conv pairs -> 12 channels -> pixel shuffle x2, added to the output (zero at init). 0 = none.
    detail_channels: int = 0
    detail_blocks: int = 2
    noise_buffers: bool = True  # keep StyleGAN2's per-layer noise buffers (official layout; noise itself is zero)

    def __post_init__(self):
        for name in ("input_size", "output_size", "unet_size"):
            value = getattr(self, name)
            _check(value >= 8 and value & (value - 1) == 0, f"sr.{name} must be a power of two >= 8, got {value}")
        _check(self.unet_size <= self.output_size, "sr.unet_size must be at most output_size")
        _check(self.decoder_size == 0 or (self.unet_size <= self.decoder_size <= self.output_size
                                          and self.decoder_size & (self.decoder_size - 1) == 0),
               "sr.decoder_size must be 0 or a power of two from unet_size to output_size")
        levels_unet = self.unet_size.bit_length() - 2  # 4, 8, ..., unet_size
        levels_decoder = self.decoder_side.bit_length() - 2
        _check(len(self.unet_channels) == levels_unet,
               f"sr.unet_channels needs {levels_unet} entries ({self.unet_size} down to 4), got {len(self.unet_channels)}")
        _check(len(self.decoder_channels) == levels_decoder,
               f"sr.decoder_channels needs {levels_decoder} entries (4 up to {self.decoder_side}), "
               f"got {len(self.decoder_channels)}")
        for level in range(1, levels_unet):  # resolutions 8 .. unet_size carry SFT conditions
            unet = self.unet_channels[levels_unet - 1 - level]
            decoder = self.decoder_channels[level]
            _check(2 * unet == decoder,
                   f"sr: at {4 << level} px the U-Net width ({unet}) must be half the decoder width ({decoder})")
        _check(self.temporal_hidden >= 1, "sr.temporal_hidden must be >= 1")
        _check(not self.detail_channels or (self.residual and self.unet_size == self.input_size
                                            and self.output_size == 2 * self.input_size),
               "sr.detail_channels needs residual=True, unet_size == input_size and output_size == 2 * input_size")
        _check(self.detail_channels >= 0 and self.detail_blocks >= 0,
               "sr.detail_channels and detail_blocks must be >= 0")
        _check(self.num_mlp >= 0 and self.style_dim >= 1, "sr.num_mlp must be >= 0 and style_dim >= 1")

    @property
    def scale(self) -> int:
        return self.output_size // self.input_size

    @property
    def decoder_side(self) -> int:
        """Side of the decoder's image."""
        return self.decoder_size or self.output_size

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SRConfig:
        return _from_dict(cls, data, "sr")

    def replace(self, **changes: Any) -> SRConfig:
        return dataclasses.replace(self, **changes)


# GFPGAN v1 clean + temporal window, exactly (sr_temporal_gfpgan.tsv): U-Net at 512 after a bilinear x2.
_SR_OFFICIAL = SRConfig()

# The CPU model: a narrow U-Net on the 256 input (temporal conv pairs 3C -> C -> C) whose features condition a
# narrow decoder that stops at 256, plus a detail body at 256 px (24 channels, two residual conv pairs, pixel
# shuffle to 512) that sees the window of frames and the U-Net's finest features. Decoder and body add to the
# bicubic upsampling, so the untrained network is bicubic. Earlier lite forms, all trained from scratch, stayed at
# bicubic: the U-Net on the input resized to 512 with 4 channels there, and a single conv from those 512-px
# features (experiments, 2026-12-07). Trained from scratch.
_SR_LITE = SRConfig(
    unet_size=256,
    unet_channels=(4, 8, 16, 16, 16, 16, 16),
    decoder_size=256,
    decoder_channels=(32, 32, 32, 32, 32, 16, 8),
    style_dim=64,
    num_mlp=0,
    temporal_hidden=1,
    residual=True,
    residual_mode="bicubic",
    noise_buffers=False,
    detail_channels=24,
    detail_blocks=2,
)

# The lite structure at 32 -> 64 with a few channels, for tests.
_SR_TINY = dataclasses.replace(
    _SR_LITE, input_size=32, output_size=64, unet_size=32, unet_channels=(4, 4, 4, 4),
    decoder_size=32, decoder_channels=(8, 8, 8, 8), style_dim=8, detail_channels=4, detail_blocks=1,
)

SR_PRESETS: dict[str, SRConfig] = {"tiny": _SR_TINY, "lite": _SR_LITE, "official": _SR_OFFICIAL}
