"""The base generator G = warping network W + ID-preserving refinement network R (MetaPortrait §3.1).

Top-level attribute names are the official ones (`ladder_network`, `dense_motion_network`, `feature_encoder`,
`fuse_high_res`, `SPDAE_G`), so ``Generator(PRESETS["official"]).state_dict()`` has exactly the keys and shapes of
the released ``ckpt_base.pth.tar['generator']`` (tests/test_models.py checks this against the official listing).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Literal

import torch
from torch import nn

from metaportrait.config import ModelConfig
from metaportrait.models.blocks import Hourglass, deform_input, make_coordinate_grid, resize_map
from metaportrait.models.refine import SPADEGenerator, condition_maps
from metaportrait.models.warping import (
    DRIVING_LINES,
    MOTION_CHANNELS,
    PRIOR_CHANNELS,
    SOURCE_LINES,
    DenseMotionNetworkReg,
    LadderEncoder,
    build_motion_input,
)

Stage = Literal["warp", "full"]
NUM_OFFICIAL_KEYPOINTS = 58
PARTS = ("all", "warp", "refine", "decoder", "norms")  # `Generator.part_parameters`


class Generator(nn.Module):
    """Landmark-driven warp + identity-preserving refinement, built from a `ModelConfig`.

    Use `warp_parameters()` and `refine_parameters()` for the two optimiser groups (official: the warp group
    trains at 0.1x the learning rate).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        warp, refine = cfg.warp, cfg.refine
        identity_dim = cfg.identity_dim if cfg.use_identity else None

        # Warping network W.
        self.ladder_network = LadderEncoder(warp, MOTION_CHANNELS, cfg.norm, cfg.spectral_norm)
        flow_in = MOTION_CHANNELS + (PRIOR_CHANNELS if cfg.use_mesh_prior else 0)
        self.dense_motion_network = DenseMotionNetworkReg(warp, flow_in, cfg.norm)

        # Refinement network R. Official: the feature hourglass always uses affine InstanceNorm (`use_IN`).
        self.feature_encoder = Hourglass(
            block_expansion=refine.block_expansion,
            in_features=3,
            num_blocks=refine.num_blocks,
            max_features=refine.max_features,
            norm=cfg.norm,
            down_mode=refine.down_mode,
            dec_lease=refine.dec_lease,
        )
        level_channels = list(self.feature_encoder.level_channels)
        finest = min(refine.max_features, refine.block_expansion * 2**refine.dec_lease)
        self.fuse_high_res = nn.Conv2d(level_channels[-1], finest, 3, padding=1)
        level_channels[-1] = finest
        self.SPDAE_G = SPADEGenerator(refine, level_channels, identity_dim, cfg.norm, cfg.spectral_norm)

    # ------------------------------------------------------------------------------------------------------------

    def warp_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters of the warping network W (E_w and F_w)."""
        yield from self.ladder_network.parameters()
        yield from self.dense_motion_network.parameters()

    def refine_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters of the refinement network R (feature pyramid and decoder)."""
        yield from self.feature_encoder.parameters()
        yield from self.fuse_high_res.parameters()
        yield from self.SPDAE_G.parameters()

    def part_parameters(self, part: str) -> list[tuple[str, nn.Parameter]]:
        """Named parameters of one part of G, for fine-tuning a part only (`PARTS`): ``"all"``, ``"warp"`` (W),
        ``"refine"`` (R: feature pyramid and decoder), ``"decoder"`` (R's decoder `SPDAE_G` alone) or ``"norms"``
        (every bias and normalisation scale of W and R, i.e. the vector-shaped parameters: BitFit's split)."""
        if part == "norms":
            return [(name, p) for name, p in self.named_parameters() if sum(size > 1 for size in p.shape) <= 1]
        prefixes = {
            "all": ("",),
            "warp": ("ladder_network.", "dense_motion_network."),
            "refine": ("feature_encoder.", "fuse_high_res.", "SPDAE_G."),
            "decoder": ("SPDAE_G.",),
        }
        if part not in prefixes:
            raise ValueError(f"unknown part {part!r}; choose one of {PARTS}")
        return [(name, p) for name, p in self.named_parameters() if name.startswith(prefixes[part])]

    # ------------------------------------------------------------------------------------------------------------

    def forward(
        self,
        source: torch.Tensor,
        source_lines: torch.Tensor,
        driving_lines: torch.Tensor,
        identity: torch.Tensor | None = None,
        prior_grid: torch.Tensor | None = None,
        stage: Stage = "full",
        driving_keypoints: torch.Tensor | None = None,
        prior_masks: torch.Tensor | None = None,
        source_flow: torch.Tensor | None = None,
        source_levels: list[torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Animate ``source`` to follow the driving landmarks.

        Args:
            source: ``(B, 3, H, W)`` in [0, 1], H and W multiples of 32.
            source_lines, driving_lines: ``(B, 3, H, W)`` landmark-line images in [0, 1].
            identity: ``(B, identity_dim)`` source identity embedding; required iff ``use_identity`` and stage
                "full" (accepted and unused by stage "warp"); must be None when ``use_identity=False``.
            prior_grid: ``(B, H', W', 2)`` mesh-prior sampling grid, (x, y) in [-1, 1], align_corners=False;
                required iff ``use_mesh_prior`` (usually H' = H).
            stage: "warp" runs W only; "full" runs W and R.
            driving_keypoints: ``(B, 58, 2)`` official landmark subset in [-1, 1]; required iff the config uses
                gaze heat-maps or the mouth line (official preset) and stage "full"; must be None otherwise.
            prior_masks: ``(B, C, H', W')`` in [0, 1] at the prior grid's size, C = the config's
                `prior_mask_channels`, from `metaportrait.prior.masks.prior_masks`: the driving face (the
                residual flow is faded out there), the driving mouth opening (occlusion forced to 0 there) [, the
                mouth template's teeth and cavity (refine conditions)]; required iff ``prior_masks``.
            source_flow: `source_flow(source, source_lines)`, only with ``warp.subtract_source_flow``; computed
                here when not given (pass it to reuse it across the frames of one source).
            source_levels: `encode_source(source)`, computed here when not given; batch 1 or B (pass it to reuse
                the source's feature pyramid across the frames of one source: it depends on the source alone).
        Returns:
            ``deformation`` ``(B, h, w, 2)`` sampling grid; ``occlusion`` ``(B, 1, H, W)`` in (0, 1), 1 = source
            visible; ``warped`` ``(B, 3, H, W)`` source warped by the deformation, in [0, 1]; ``flow``
            ``(B, 2, h', w')`` learned offset. Stage "full" adds ``output`` ``(B, 3, H, W)`` in [0, 1], plus
            ``output_raw`` (tanh value, official output) or ``generated`` (synthesised image before the blend) and, with
            ``refine.gain_map_grid``, ``gain`` ``(B, 3, H, W)`` in [0.5, 1.5] (the warped image's, in the blend).
        """
        cfg = self.cfg
        self._check_inputs(source, source_lines, driving_lines, identity, prior_grid, stage, driving_keypoints)
        self._check_prior_masks(prior_masks, prior_grid)
        B, _, H, W = source.shape

        # 1. Warping network: motion code z_w, deformation and occlusion, warped source image.
        motion_input, motion_code = self._motion(source, source_lines, driving_lines, prior_grid)
        trust = None if prior_masks is None else prior_masks[:, :1]
        if cfg.warp.subtract_source_flow and source_flow is None:
            source_flow = self.source_flow(source, source_lines)
        elif source_flow is not None and not cfg.warp.subtract_source_flow:
            raise ValueError("source_flow is only used with warp.subtract_source_flow (the config says False)")
        out = self.dense_motion_network(motion_input, motion_code, (H, W), prior_grid, trust, source_flow)
        if prior_masks is not None:
            # The source has no mouth interior to show: the refinement synthesises it (stage full).
            mouth = resize_map(prior_masks[:, 1:2], (H, W))
            out["occlusion"] = out["occlusion"] * (1 - mouth)
        out["warped"] = deform_input(source, out["deformation"], cfg.warp.padding_mode)
        if stage == "warp":
            return out

        # 2. Source feature pyramid, coarsest first, warped by the same deformation.
        levels = self.encode_source(source) if source_levels is None else [
            level.expand(B, -1, -1, -1) for level in source_levels]
        warped_levels = [deform_input(level, out["deformation"], cfg.warp.padding_mode) for level in levels]

        # 3. Decoder conditioned on warped features, occlusion and landmarks, modulated by the identity.
        # The channels after face and synthesis band: mouth template [2] and eyelid band [1], as configured.
        extra = prior_masks[:, 2:] if prior_masks is not None and prior_masks.shape[1] > 2 else None
        # The warping network's input holds the line images resized (anti-aliased) to its size: not done twice.
        size = (cfg.warp.input_size, cfg.warp.input_size)
        resized = None
        if cfg.refine.antialias:
            resized = {size: (motion_input[:, SOURCE_LINES], motion_input[:, DRIVING_LINES])}
        conditions = condition_maps(
            warped_levels, out["occlusion"], source_lines, driving_lines, driving_keypoints, cfg.refine, extra, resized
        )
        logits, gain = self.SPDAE_G(conditions, identity, warped_levels[0])

        # 4. Output image in [0, 1] (see models/refine.py for the two compositions).
        if cfg.refine.output == "tanh":
            out["output_raw"] = torch.tanh(logits)
            out["output"] = out["output_raw"].clamp(0.0, 1.0)
        else:
            out["generated"] = torch.sigmoid(logits)
            occlusion, warped = out["occlusion"], out["warped"]
            if gain is not None:
                out["gain"] = gain
                warped = (warped * gain).clamp(0.0, 1.0)
            out["output"] = occlusion * warped + (1 - occlusion) * out["generated"]
        assert out["output"].shape == (B, 3, H, W), out["output"].shape
        return out

    def encode_source(self, source: torch.Tensor) -> list[torch.Tensor]:
        """The refinement's source feature pyramid, coarsest first: ``(B, C_l, H_l, W_l)`` per level (see `forward`)."""
        _, levels = self.feature_encoder(source, return_all=True)
        levels[-1] = self.fuse_high_res(levels[-1])
        return levels

    def source_flow(self, source: torch.Tensor, source_lines: torch.Tensor) -> torch.Tensor:
        """The warping network's flow head when the source drives itself: ``(B, 2, h, w)`` (see `forward`).

        No motion, so it should be zero; ``warp.subtract_source_flow`` subtracts it from every frame's flow. The
        mesh prior of a source driving itself is the identity grid.
        """
        B, _, H, W = source.shape
        prior_grid = None
        if self.cfg.use_mesh_prior:
            identity = make_coordinate_grid(H, W, "centers", device=source.device, dtype=source.dtype)
            prior_grid = identity[None].expand(B, -1, -1, -1)
        motion_input, motion_code = self._motion(source, source_lines, source_lines, prior_grid)
        return self.dense_motion_network.flow_head(motion_input, motion_code)

    def _motion(self, source, source_lines, driving_lines, prior_grid):
        """The warping network's input and its motion code z_w (shared by `forward` and `source_flow`)."""
        motion_input = build_motion_input(source, source_lines, driving_lines, prior_grid, self.cfg.warp)
        return motion_input, self.ladder_network(motion_input[:, :MOTION_CHANNELS])

    def _check_prior_masks(self, prior_masks, prior_grid):
        if self.cfg.prior_masks != (prior_masks is not None):
            raise ValueError(
                f"prior_masks is required iff the config's prior_masks (config: {self.cfg.prior_masks}, "
                f"prior_masks given: {prior_masks is not None})"
            )
        channels = self.cfg.prior_mask_channels()
        if prior_masks is not None and prior_masks.shape != (prior_grid.shape[0], channels, *prior_grid.shape[1:3]):
            raise ValueError(
                f"prior_masks must be (B, {channels}, H', W') at the prior grid's size {tuple(prior_grid.shape[:3])}, "
                f"got {tuple(prior_masks.shape)}"
            )

    def _check_inputs(self, source, source_lines, driving_lines, identity, prior_grid, stage, driving_keypoints):
        cfg = self.cfg
        if stage not in ("warp", "full"):
            raise ValueError(f"stage must be 'warp' or 'full', got {stage!r}")
        if source.dim() != 4 or source.shape[1] != 3:
            raise ValueError(f"source must be (B, 3, H, W), got {tuple(source.shape)}")
        B, _, H, W = source.shape
        if H % 32 or W % 32:
            raise ValueError(f"image size must be a multiple of 32, got {H}x{W}")
        for name, lines in (("source_lines", source_lines), ("driving_lines", driving_lines)):
            if lines.shape != source.shape:
                raise ValueError(f"{name} must have the source's shape {tuple(source.shape)}, got {tuple(lines.shape)}")
        if cfg.use_mesh_prior != (prior_grid is not None):
            raise ValueError(
                f"prior_grid is required iff use_mesh_prior (use_mesh_prior={cfg.use_mesh_prior}, "
                f"prior_grid given: {prior_grid is not None})"
            )
        if prior_grid is not None and (prior_grid.dim() != 4 or prior_grid.shape[0] != B or prior_grid.shape[3] != 2):
            raise ValueError(f"prior_grid must be (B={B}, H', W', 2), got {tuple(prior_grid.shape)}")
        # Stage "warp" does not use identity / keypoints, but accepts them so a trainer can pass one batch to both
        # stages; giving them to a model that never uses them is a caller bug and raises.
        if identity is None and stage == "full" and cfg.use_identity:
            raise ValueError("identity is required for stage='full' when use_identity=True")
        if identity is not None and not cfg.use_identity:
            raise ValueError("identity was given but this model has no identity branch (use_identity=False)")
        if identity is not None and identity.shape != (B, cfg.identity_dim):
            raise ValueError(f"identity must be (B={B}, {cfg.identity_dim}), got {tuple(identity.shape)}")
        uses_keypoints = cfg.refine.gaze_heatmap or cfg.refine.mouth_line
        if driving_keypoints is None and stage == "full" and uses_keypoints:
            raise ValueError(
                "driving_keypoints (the official 58-point subset in [-1, 1]) is required for stage='full' with this "
                "config (gaze heat-maps / mouth line)"
            )
        if driving_keypoints is not None and not uses_keypoints:
            raise ValueError("driving_keypoints was given but this config uses neither gaze heat-maps nor mouth line")
        if driving_keypoints is not None and driving_keypoints.shape != (B, NUM_OFFICIAL_KEYPOINTS, 2):
            raise ValueError(f"driving_keypoints must be (B={B}, 58, 2), got {tuple(driving_keypoints.shape)}")
        if cfg.refine.seed == "identity" and stage == "full" and (H, W) != (cfg.image_size, cfg.image_size):
            raise ValueError(f"this config's decoder starts at 4x4 from z_id and only works at {cfg.image_size}²")


def example_inputs(cfg: ModelConfig, batch: int = 2, size: int | None = None, seed: int = 0,
                   prior_noise: float = 0.03) -> dict[str, torch.Tensor]:
    """Random `Generator.forward` keyword inputs of the right shapes and ranges, for tests and benchmarks.

    Images and line images are uniform in [0, 1]; the prior grid (if the model uses one) is the identity grid
    plus ``prior_noise`` Gaussian noise; prior masks are uniform in [0, 1]; official keypoints lie inside [-0.8, 0.8].
    """
    size = size or cfg.image_size
    g = torch.Generator().manual_seed(seed)
    inputs = {
        "source": torch.rand(batch, 3, size, size, generator=g),
        "source_lines": torch.rand(batch, 3, size, size, generator=g),
        "driving_lines": torch.rand(batch, 3, size, size, generator=g),
    }
    if cfg.use_identity:
        inputs["identity"] = torch.randn(batch, cfg.identity_dim, generator=g)
    if cfg.use_mesh_prior:
        grid = make_coordinate_grid(size, size, "centers")[None].repeat(batch, 1, 1, 1)
        inputs["prior_grid"] = grid + prior_noise * torch.randn(batch, size, size, 2, generator=g)
    if cfg.prior_masks:
        inputs["prior_masks"] = torch.rand(batch, cfg.prior_mask_channels(), size, size, generator=g)
    if cfg.refine.gaze_heatmap or cfg.refine.mouth_line:
        inputs["driving_keypoints"] = torch.rand(batch, 58, 2, generator=g) * 1.6 - 0.8
    return inputs
