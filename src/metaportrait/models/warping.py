"""Warping network W: motion encoder E_w (`LadderEncoder`) + flow/occlusion network F_w (`DenseMotionNetworkReg`).

Both read the "motion input": the source image and the source and driving landmark-line images (9 channels), resized
to ``WarpConfig.input_size``. E_w turns it into a unit-norm motion code z_w; F_w is an hourglass whose every block
is FiLM-modulated by z_w, with two heads: a dense flow and an occlusion map (1 = the source pixel is visible).

Official preset: the flow is an offset in pixels of the 64x64 head output, added to FOMM's corner-inclusive
identity grid. Mesh-prior presets (``use_mesh_prior``): F_w also sees the source warped by the piecewise-affine
mesh prior (3 channels) and the prior's offset from the identity grid (2 channels), and its flow is a *residual*
added to the prior grid. The flow head's last conv starts at zero, so at step 0 the deformation is exactly the
prior (or the identity grid without a prior): training starts from the mesh-warp baseline, which the CPU prototype
found worth ~1,300 steps (notes/feasibility.md §3).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from metaportrait.config import WarpConfig
from metaportrait.models.blocks import (
    Hourglass,
    LayerNorm2d,
    Norm,
    deform_input,
    make_coordinate_grid,
    resize_grid,
    resize_map,
    spectral_norm_if,
)

MOTION_CHANNELS = 9  # source RGB + source lines + driving lines
SOURCE_LINES, DRIVING_LINES = slice(3, 6), slice(6, 9)  # their channels in `build_motion_input`'s output
PRIOR_CHANNELS = 5  # source warped by the prior (3) + prior offset in input pixels (2)


def build_motion_input(
    source: torch.Tensor,
    source_lines: torch.Tensor,
    driving_lines: torch.Tensor,
    prior_grid: torch.Tensor | None,
    cfg: WarpConfig,
) -> torch.Tensor:
    """Stack the inputs of E_w and F_w at ``cfg.input_size``.

    Args:
        source, source_lines, driving_lines: ``(B, 3, H, W)`` in [0, 1].
        prior_grid: ``(B, H', W', 2)`` mesh-prior sampling grid, or None.
    Returns:
        ``(B, 9, S, S)``, or ``(B, 14, S, S)`` with the prior: [source, source lines, driving lines,
        source warped by the prior, prior offset (x, y) in pixels of S].
    """
    size = (cfg.input_size, cfg.input_size)
    # Anti-aliased shrinking: 1-px landmark lines would otherwise break up when 256 -> 128.
    source_small = resize_map(source, size, antialias=True)
    parts = [
        source_small,
        resize_map(source_lines, size, antialias=True),
        resize_map(driving_lines, size, antialias=True),
    ]
    if prior_grid is not None:
        grid = resize_grid(prior_grid, size)  # (B, S, S, 2)
        parts.append(deform_input(source_small, grid, cfg.padding_mode))
        identity = make_coordinate_grid(*size, "centers", device=grid.device, dtype=grid.dtype)
        # Offsets in pixels of the input (a few units), a better-scaled input than normalised coordinates (~0.05).
        parts.append((grid - identity).permute(0, 3, 1, 2) * (cfg.input_size / 2))
    return torch.cat(parts, dim=1)


class LadderEncoder(nn.Module):
    """Motion encoder E_w: stride-2 3x3 convs from ``input_size``² to 4², then a linear layer and L2 normalisation.

    Official: 9 -> 64 -> 128 -> 256 -> 512 -> 512 -> 512 at 256² with spectral norm and InstanceNorm (the conv bias
    is dropped because the norm cancels it), LeakyReLU(0.2) between layers, ``fc`` 8192 -> 512.

    ``forward(x (B, in_channels, S, S))`` -> ``(B, motion_dim)`` unit-norm motion code.
    """

    def __init__(self, cfg: WarpConfig, in_channels: int, norm: Norm, spectral_norm: bool):
        super().__init__()
        self.input_size = cfg.input_size
        self.num_layers = len(cfg.encoder_channels)
        fin = in_channels
        for i, fout in enumerate(cfg.encoder_channels, start=1):
            conv = spectral_norm_if(nn.Conv2d(fin, fout, 3, stride=2, padding=1, bias=norm == "none"), spectral_norm)
            layers = [conv] if norm == "none" else [conv, nn.InstanceNorm2d(fout, affine=False)]
            setattr(self, f"layer{i}", nn.Sequential(*layers))  # official names layer1..layer6
            fin = fout
        self.fc = nn.Linear(fin * 4 * 4, cfg.motion_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.shape[2:] == (self.input_size, self.input_size), x.shape
        for i in range(1, self.num_layers + 1):
            x = F.leaky_relu(getattr(self, f"layer{i}")(x), 0.2)
        code = self.fc(x.flatten(1))
        return code / (code.norm(dim=-1, keepdim=True) + 1e-5)


class DenseMotionNetworkReg(nn.Module):
    """Flow/occlusion network F_w: a motion-code-modulated hourglass with a flow head and an occlusion head.

    Heads (official names `reger`, `occlusion_net`): LayerNorm2d -> LeakyReLU(0.1) -> conv.
    """

    def __init__(self, cfg: WarpConfig, in_channels: int, norm: Norm):
        super().__init__()
        self.cfg = cfg
        self.hourglass = Hourglass(
            block_expansion=cfg.block_expansion,
            in_features=in_channels,
            num_blocks=cfg.num_blocks,
            max_features=cfg.max_features,
            norm=norm,
            down_mode=cfg.down_mode,
            dec_lease=cfg.dec_lease,
            code_dim=cfg.motion_dim,
            film_hidden=cfg.film_hidden,
            same_blocks=cfg.same_blocks,
        )
        width, k = self.hourglass.out_filters, cfg.head_kernel
        self.reger = nn.Sequential(LayerNorm2d(width), nn.LeakyReLU(0.1), nn.Conv2d(width, 2, k, padding=k // 2))
        self.occlusion_net = nn.Sequential(
            LayerNorm2d(width), nn.LeakyReLU(0.1), nn.Conv2d(width, 1, k, padding=k // 2)
        )
        # Start from the prior / identity grid and from a chosen visibility (see module docstring).
        nn.init.zeros_(self.reger[2].weight)
        nn.init.zeros_(self.reger[2].bias)
        nn.init.zeros_(self.occlusion_net[2].weight)
        nn.init.constant_(self.occlusion_net[2].bias, cfg.occlusion_init_bias)

    def forward(
        self,
        motion_input: torch.Tensor,
        motion_code: torch.Tensor,
        image_size: tuple[int, int],
        prior_grid: torch.Tensor | None = None,
        prior_trust: torch.Tensor | None = None,
        flow_bias: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Estimate the backward deformation (driving -> source) and the occlusion map.

        Args:
            motion_input: ``(B, C_in, S, S)`` from `build_motion_input`.
            motion_code: ``(B, motion_dim)`` from `LadderEncoder`.
            image_size: ``(H, W)`` of the images; the occlusion map is upsampled to it.
            prior_grid: ``(B, H', W', 2)`` mesh prior; the deformation is then returned at ``(H', W')``.
            prior_trust: ``(B, 1, H', W')`` in [0, 1], 1 where the prior is kept as is (the residual is
                multiplied by ``1 - prior_trust``); only with a prior.
            flow_bias: ``(B, 2, h, w)`` subtracted from the flow head's output (`flow_head`), in its units.
        Returns:
            ``deformation`` ``(B, h, w, 2)`` sampling grid in [-1, 1] (x, y) (``h = S / 2**dec_lease`` without a
            prior); ``flow`` ``(B, 2, h, w)`` the learned offset in normalised units; ``occlusion`` ``(B, 1, H, W)``
            in (0, 1).
        """
        features = self.hourglass(motion_input, motion_code)
        flow = self.reger(features)  # (B, 2, h, w), pixels of the h x w flow grid
        if flow_bias is not None:
            if flow_bias.shape != flow.shape:
                raise ValueError(f"flow_bias must be {tuple(flow.shape)}, got {tuple(flow_bias.shape)}")
            flow = flow - flow_bias
        _, _, h, w = flow.shape
        if self.cfg.identity_grid == "corners":
            pixel = flow.new_tensor([2 / (w - 1), 2 / (h - 1)])
        else:
            pixel = flow.new_tensor([2 / w, 2 / h])
        flow = flow * pixel[None, :, None, None]
        if prior_grid is None:
            grid = make_coordinate_grid(h, w, self.cfg.identity_grid, device=flow.device, dtype=flow.dtype)
            deformation = grid[None] + flow.permute(0, 2, 3, 1)
        else:
            # Upsample the smooth residual, not the prior, so that a zero residual reproduces the prior exactly.
            residual = resize_map(flow, prior_grid.shape[1:3])
            if prior_trust is not None:
                assert prior_trust.shape == (flow.shape[0], 1, *prior_grid.shape[1:3]), prior_trust.shape
                residual = residual * (1 - prior_trust)
            deformation = prior_grid + residual.permute(0, 2, 3, 1)
        occlusion = torch.sigmoid(self.occlusion_net(features))
        occlusion = resize_map(occlusion, image_size)
        return {"deformation": deformation, "flow": flow, "occlusion": occlusion}

    def flow_head(self, motion_input: torch.Tensor, motion_code: torch.Tensor) -> torch.Tensor:
        """The flow head's raw output ``(B, 2, h, w)``, pixels of the flow grid (what ``flow_bias`` removes)."""
        return self.reger(self.hourglass(motion_input, motion_code))
