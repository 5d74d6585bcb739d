"""ID-preserving refinement network: source feature pyramid + fused-norm SPADE decoder (`SPDAE_G`).

1. A feature hourglass (`feature_encoder`) runs on the *source* image; its decoder levels, coarsest first (the finest
   one passed through `fuse_high_res`), form a pyramid that is warped by the deformation: source *features* are
   moved, not only pixels, so the decoder can rebuild what a pixel warp smears (mouth interior, disocclusions).
2. Each pyramid level, with the occlusion map and landmark lines (official: plus gaze heat-maps and the mouth
   line), is the conditioning map of the decoder blocks at that resolution.
3. Every norm in the decoder fuses a SPADE motion branch with an identity AdaIN branch through a learned mask
   (`blocks.SPADE`); with ``use_identity=False`` the identity branch is absent.

Output, official (``output="tanh"``): the decoder starts from z_id (ConvTranspose 1 -> 4x4) and ends in tanh; the
tanh value is used directly as a [0, 1] image (the official code never maps (x + 1) / 2), so we clip it to [0, 1]
and also return the raw value for losses that match the official training.

Output, CPU presets (``seed="warped"``, ``output="occlusion_blend"``): the decoder starts from the warped coarsest
features and stops at half resolution (full-resolution convs would cost more than the rest of the model); a
sub-pixel conv (3x3 conv to 12 channels + pixel shuffle) synthesises the full-resolution ``generated`` image
(sigmoid, in [0, 1]). The output is ``occ * warped + (1 - occ) * generated``: where the warp net says the source
is visible the output reuses the sharp warped pixels for free, and where the source is missing (opened mouth,
revealed background) it is synthesised from the warped features. This gives the occlusion head a real training
signal (officially it is only a condition channel), keeps the output in [0, 1] by construction, and with the
occlusion bias starting at sigmoid(2) ≈ 0.88 the model starts close to the warped image. (With ``gain_map_grid``
the warped image is first multiplied by a smooth gain map and clipped to [0, 1]: shading is corrected without
softening the warped pixels.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from metaportrait.config import RefineConfig
from metaportrait.models.blocks import (
    Norm,
    SPADEResnetBlock,
    make_coordinate_grid,
    resize_map,
    spectral_norm_if,
)

# Positions in the official 58-point landmark subset (notes/official_metaportrait.md §3).
GAZE_POINTS = slice(29, 37)
MOUTH_X_POINTS = (14, 15)
MOUTH_Y_POINTS = (56, 57)
MOUTH_PAD = 5  # pixels, at the image resolution
GAZE_VARIANCE = 0.005  # in [-1, 1] coordinates


def pyramid_level_of_blocks(num_blocks: int, num_levels: int) -> list[int]:
    """Pyramid level conditioning each decoder block: the last blocks take the finest levels, earlier ones level 0.

    Official (7 blocks, 4 levels): [0, 0, 0, 0, 1, 2, 3].
    """
    return [max(0, num_levels - num_blocks + i) for i in range(num_blocks)]


def gaze_heatmap(keypoints: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Gaussian maps of the 8 gaze points (official `kp2gaussian`, variance 0.005, corner-inclusive grid).

    ``keypoints`` ``(B, 58, 2)`` in [-1, 1] -> ``(B, 8, *size)`` in (0, 1].
    """
    grid = make_coordinate_grid(*size, "corners", device=keypoints.device, dtype=keypoints.dtype)  # (h, w, 2)
    points = keypoints[:, GAZE_POINTS]  # (B, 8, 2)
    diff = grid[None, None] - points[:, :, None, None, :]  # (B, 8, h, w, 2)
    return torch.exp(-0.5 * (diff**2).sum(-1) / GAZE_VARIANCE)


def mouth_mask(keypoints: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Binary mouth box from the 58-point subset, padded 5 px, as the official dataset draws it.

    ``keypoints`` ``(B, 58, 2)`` in [-1, 1] -> ``(B, 1, h, w)`` of 0/1 floats.
    """
    h, w = size
    # int() truncation of the official code; trunc keeps it (and never calls .item()).
    left = torch.trunc((keypoints[:, MOUTH_X_POINTS[0], 0] + 1) * w / 2)
    right = torch.trunc((keypoints[:, MOUTH_X_POINTS[1], 0] + 1) * w / 2)
    top = torch.trunc((keypoints[:, MOUTH_Y_POINTS[0], 1] + 1) * h / 2)
    bottom = torch.trunc((keypoints[:, MOUTH_Y_POINTS[1], 1] + 1) * h / 2)
    xs = torch.arange(w, device=keypoints.device, dtype=keypoints.dtype)
    ys = torch.arange(h, device=keypoints.device, dtype=keypoints.dtype)
    in_x = (xs[None] >= (left - MOUTH_PAD)[:, None]) & (xs[None] <= (right + MOUTH_PAD)[:, None])  # (B, w)
    in_y = (ys[None] >= (top - MOUTH_PAD)[:, None]) & (ys[None] <= (bottom + MOUTH_PAD)[:, None])  # (B, h)
    return (in_y[:, :, None] & in_x[:, None, :]).to(keypoints.dtype)[:, None]


def extra_condition_channels(cfg: RefineConfig) -> int:
    """Channels added to each warped pyramid level: occlusion (1) [+ gaze 8] [+ lines 6] [+ mouth line 3]
    [+ mouth template 2] [+ eyelid band 1]."""
    return 1 + 8 * cfg.gaze_heatmap + 6 * cfg.landmark_lines + 3 * cfg.mouth_line + prior_condition_channels(cfg)


def prior_condition_channels(cfg: RefineConfig) -> int:
    """Prior-mask channels the decoder also reads (appended last): mouth template (2), eyelid band (1)."""
    return 2 * cfg.mouth_template + cfg.eyelid_band


def condition_maps(
    warped_levels: list[torch.Tensor],
    occlusion: torch.Tensor,
    source_lines: torch.Tensor,
    driving_lines: torch.Tensor,
    driving_keypoints: torch.Tensor | None,
    cfg: RefineConfig,
    prior_conditions: torch.Tensor | None = None,
    resized_lines: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> list[torch.Tensor]:
    """Concatenate, per pyramid level, [warped features, occlusion, gaze, source+driving lines, mouth line,
    mouth template, eyelid band].

    The order is the official one (checkpoint compatibility), then ``prior_conditions`` (``(B, C, H', W')``,
    ``C = prior_condition_channels(cfg)``, required iff ``C > 0``): the mouth template, then the eyelid band. Each
    is appended last when it is added, so zero weights on it leave a model trained without it unchanged. Each map
    has the level's resolution. ``resized_lines`` maps a size to the (source, driving) line images already resized
    to it as ``resize_map(..., cfg.antialias)`` would (the warping network's input holds them at its size).
    """
    channels = prior_condition_channels(cfg)
    given = 0 if prior_conditions is None else prior_conditions.shape[1]
    assert given == channels, f"prior_conditions needs {channels} channels (the config's), got {given}"
    if cfg.mouth_line:
        mouth_lines = driving_lines * mouth_mask(driving_keypoints, driving_lines.shape[2:])
    maps = []
    for level in warped_levels:
        size = level.shape[2:]
        parts = [level, resize_map(occlusion, size, cfg.antialias)]
        if cfg.gaze_heatmap:
            parts.append(gaze_heatmap(driving_keypoints, size))
        if cfg.landmark_lines:
            # Resized apart (the same maps as resizing them stacked): the source's lines are resized once.
            known = (resized_lines or {}).get(tuple(size))
            parts += list(known) if known is not None else [
                resize_map(source_lines, size, cfg.antialias), resize_map(driving_lines, size, cfg.antialias)]
        if cfg.mouth_line:
            parts.append(resize_map(mouth_lines, size, cfg.antialias))
        if channels:
            parts.append(resize_map(prior_conditions, size, cfg.antialias))
        maps.append(torch.cat(parts, dim=1))
    return maps


class SPADEGenerator(nn.Module):
    """The refinement decoder ("SPADE decoder G"; attribute name `SPDAE_G` keeps the official typo).

    Blocks, official: head_0 @4, G_middle_0 @8, G_middle_1 @16, up_0 @32, up_1 @64, up_2 @128, up_3 @256, with
    bilinear x2 upsampling in between, seeded by ``conv1`` = spectral-norm ConvTranspose2d(z_id -> 4x4). With
    ``seed="warped"`` only ``up_0, up_1, ...`` exist and ``conv1`` is a 3x3 conv on the warped coarsest features.

    ``forward(conditions, identity, seed_features)`` -> ``(B, 3, H, W)`` pre-activation image logits (the caller
    applies tanh or the occlusion blend).
    """

    def __init__(
        self,
        cfg: RefineConfig,
        level_channels: list[int],
        identity_dim: int | None,
        norm: Norm,
        spectral_norm: bool,
    ):
        super().__init__()
        self.cfg = cfg
        channels = cfg.block_channels
        num_blocks = len(channels) - 1
        head = ["head_0", "G_middle_0", "G_middle_1"] if cfg.seed == "identity" else []
        self.block_names = head + [f"up_{i}" for i in range(num_blocks - len(head))]
        self.block_levels = pyramid_level_of_blocks(num_blocks, len(level_channels))
        extra = extra_condition_channels(cfg)

        if cfg.seed == "identity":
            if identity_dim is None:
                raise ValueError("refine.seed='identity' needs the identity branch (use_identity=True)")
            self.conv1 = spectral_norm_if(nn.ConvTranspose2d(identity_dim, channels[0], 4), spectral_norm)
        else:
            self.conv1 = spectral_norm_if(nn.Conv2d(level_channels[0], channels[0], 3, padding=1), spectral_norm)
        for name, level, fin, fout in zip(self.block_names, self.block_levels, channels[:-1], channels[1:]):
            block = SPADEResnetBlock(
                fin,
                fout,
                label_nc=level_channels[level] + extra,
                identity_dim=identity_dim,
                hidden=cfg.spade_hidden,
                kernel=cfg.spade_kernel,
                norm=norm,
                spectral_norm=spectral_norm,
                param_kernel=cfg.spade_param_kernel,
            )
            setattr(self, name, block)
        # The last block runs at the finest pyramid level, H / 2**dec_lease; a sub-pixel conv (pixel shuffle) gives
        # the full-resolution image without any full-resolution convolution (official: dec_lease 0, a plain conv).
        self.upscale = 2**cfg.dec_lease
        self.conv_img = nn.Conv2d(channels[-1], 3 * self.upscale**2, 3, padding=1)
        if cfg.smooth_upscale:
            # Triangle filter = box(r) * box(r): symmetric (no shift), zero response at every period-r pattern.
            box = torch.ones(1, 1, self.upscale)
            tent_1d = F.conv1d(box, box, padding=self.upscale - 1).flatten()  # (2r - 1,), e.g. [1, 2, 1]
            tent = torch.outer(tent_1d, tent_1d)
            self.register_buffer("upscale_filter", (tent / tent.sum()).expand(3, 1, -1, -1).clone(), persistent=False)
        if cfg.gain_map_grid:
            # Zero weights: the gain starts at exactly 1, so a model trained without it starts out unchanged.
            self.conv_gain = nn.Conv2d(channels[-1], 3, 3, padding=1)
            nn.init.zeros_(self.conv_gain.weight)
            nn.init.zeros_(self.conv_gain.bias)

    def forward(
        self,
        conditions: list[torch.Tensor],
        identity: torch.Tensor | None,
        seed_features: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Decode image logits ``(B, 3, H, W)`` and, with ``gain_map_grid``, the warped image's gain map
        ``(B, 3, H, W)`` in [0.5, 1.5] (bilinear between the grid's cells; None without).

        Args:
            conditions: per pyramid level ``(B, level_channels[l] + extra, h_l, w_l)``, coarsest first.
            identity: ``(B, identity_dim)`` or None without the identity branch.
            seed_features: ``(B, level_channels[0], h_0, w_0)`` warped coarsest features (``seed="warped"``).
        """
        if self.cfg.seed == "identity":
            x = self.conv1(identity[:, :, None, None])  # (B, C0, 4, 4)
        else:
            x = self.conv1(seed_features)  # (B, C0, h_0, w_0)
        for i, (name, level) in enumerate(zip(self.block_names, self.block_levels)):
            if i > 0:
                x = F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)
            cond = resize_map(conditions[level], x.shape[2:])
            x = getattr(self, name)(x, cond, identity)
        features = F.leaky_relu(x, 0.2)
        gain = None
        if self.cfg.gain_map_grid:
            size = (features.shape[2] * self.upscale, features.shape[3] * self.upscale)
            cells = F.adaptive_avg_pool2d(self.conv_gain(features), self.cfg.gain_map_grid)
            gain = 1 + 0.5 * torch.tanh(F.interpolate(cells, size=size, mode="bilinear", align_corners=False))
        x = self.conv_img(features)  # (B, 3 * r * r, H / r, W / r)
        if self.upscale == 1:
            return x, gain
        x = F.pixel_shuffle(x, self.upscale)
        if self.cfg.smooth_upscale:
            pad = self.upscale - 1
            x = F.conv2d(F.pad(x, (pad, pad, pad, pad), mode="replicate"), self.upscale_filter, groups=3)
        return x, gain
