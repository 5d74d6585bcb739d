"""Temporal face super-resolution (256 -> 512): GFPGAN v1 "clean" with MetaPortrait's temporal window.

One code path for every `SRConfig` preset (``tiny``, ``lite``, ``official``):

1. the frames of a clip, ``(T, 3, H, W)`` in [0, 1], are processed as the batch dimension; mapped to [-1, 1] and
   resized (bilinear) to ``unet_size``;
2. degradation-removal U-Net: ``conv_body_first`` (1x1), down `ResBlock`s to 4x4, ``final_conv``, then up
   `ResBlock`s with additive skips. **Temporal layers** (``window_down.i`` after down block i,
   ``recurrent_forward.i`` after up block i, the official names): concat the features of frames t-1, t, t+1 (the
   edge frame replicated at the clip ends), conv3x3 -> LeakyReLU -> conv3x3 with the second conv zero-initialised,
   added to frame t's features. At initialisation the network is therefore exactly the per-frame network;
3. ``final_linear`` maps the 4x4 bottleneck to W+ latents (one per decoder layer, the mapping MLP is bypassed);
   each up level also gives SFT maps (``condition_scale`` / ``condition_shift``);
4. StyleGAN2 decoder (``stylegan_decoder``) with channel-split SFT: after the first modulated conv of each
   resolution that has a condition, half of the channels become ``F * scale + shift``; noise inputs are zero
   (official ``randomize_noise: zero``); a decoder that stops below ``output_size`` is resized (bilinear) to it;
5. ``residual`` presets add the decoder image to the bilinear or bicubic upsampling of the input, and their
   ``toRGB`` weights start at zero, so the untrained network outputs that upsampling;
6. with ``detail_channels`` a `DetailBody` at the input resolution (the frame window and the U-Net's finest
   features -> residual conv pairs -> pixel shuffle x2, last conv zero-initialised) adds its image there too, on a
   path around the decoder.

Output ``(T, 3, output_size, output_size)`` in [0, 1]. Module names mirror the official
``vgfpgan_gfpganv1_clean_unetwindow_arch.py`` so its state dict loads with strict=True (tests compare our keys and
shapes with ``tests/data/sr_temporal_gfpgan.tsv``). Modulated convs are computed unfused (modulate the input,
shared conv, demodulate the output), which is the same function as StyleGAN2's grouped conv and faster on CPU.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from metaportrait.config import SRConfig


def _lrelu(x: torch.Tensor) -> torch.Tensor:
    return F.leaky_relu(x, 0.2)


def _resize(x: torch.Tensor, size: int) -> torch.Tensor:
    if x.shape[-1] == size:
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)


def upsample(frames: torch.Tensor, cfg: SRConfig) -> torch.Tensor:
    """The plain upsampling to ``output_size`` that residual presets add their output to (not clamped)."""
    return F.interpolate(frames, size=(cfg.output_size,) * 2, mode=cfg.residual_mode, align_corners=False)


# ----------------------------------------------------------------------------------------------------------------
# U-Net parts


class ResBlock(nn.Module):
    """conv3x3 (C_in) -> LeakyReLU -> bilinear x0.5 or x2 -> conv3x3 (C_out) -> LeakyReLU, plus a 1x1 skip."""

    def __init__(self, in_channels: int, out_channels: int, mode: str):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, in_channels, 3, 1, 1)
        self.conv2 = nn.Conv2d(in_channels, out_channels, 3, 1, 1)
        self.skip = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.scale_factor = 0.5 if mode == "down" else 2.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = _lrelu(self.conv1(x))
        out = F.interpolate(out, scale_factor=self.scale_factor, mode="bilinear", align_corners=False)
        out = _lrelu(self.conv2(out))
        x = F.interpolate(x, scale_factor=self.scale_factor, mode="bilinear", align_corners=False)
        return out + self.skip(x)


def temporal_window(features: torch.Tensor) -> torch.Tensor:
    """``(T, C, H, W)`` -> ``(T, 3C, H, W)``: frames t-1, t, t+1 side by side, the edge frames replicated
    (frames [1, 2, 3] give the triplets (1, 1, 2), (1, 2, 3), (2, 3, 3))."""
    previous = torch.cat([features[:1], features[:-1]])
    following = torch.cat([features[1:], features[-1:]])
    return torch.cat([previous, features, following], dim=1)


class ConvReLUConv(nn.Module):
    """Temporal layer: conv3x3 (3C -> hidden) -> LeakyReLU -> conv3x3 (hidden -> C, zero-initialised), added as a
    residual to the centre frame's features."""

    def __init__(self, channels: int, hidden: int):
        super().__init__()
        self.conv1 = nn.Conv2d(3 * channels, hidden, 3, 1, 1)
        self.conv2 = nn.Conv2d(hidden, channels, 3, 1, 1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features + self.conv2(_lrelu(self.conv1(temporal_window(features))))


# ----------------------------------------------------------------------------------------------------------------
# StyleGAN2 decoder (BasicSR "clean" version: plain convs and linears, no equalised learning rate)


class NormStyleCode(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(torch.mean(x**2, dim=1, keepdim=True) + 1e-8)


class ModulatedConv2d(nn.Module):
    """StyleGAN2 modulated conv. ``weight`` is ``(1, out, in, k, k)`` as in the official layout."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, style_dim: int, demodulate: bool,
                 upsample: bool = False):
        super().__init__()
        self.demodulate = demodulate
        self.upsample = upsample
        self.padding = kernel_size // 2
        self.modulation = nn.Linear(style_dim, in_channels, bias=True)
        nn.init.kaiming_normal_(self.modulation.weight, a=0, mode="fan_in", nonlinearity="linear")
        nn.init.constant_(self.modulation.bias, 1.0)
        self.weight = nn.Parameter(
            torch.randn(1, out_channels, in_channels, kernel_size, kernel_size) / math.sqrt(in_channels * kernel_size**2)
        )

    def forward(self, x: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        b, c = x.shape[:2]
        scale = self.modulation(style)  # (B, C_in)
        if self.upsample:
            x = F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)
        weight = self.weight[0]
        out = F.conv2d(x * scale.view(b, c, 1, 1), weight, padding=self.padding)
        if self.demodulate:
            energy = scale.pow(2) @ weight.pow(2).sum(dim=(2, 3)).t()  # (B, C_out) = sum_i s_i^2 sum_k w_oik^2
            out = out * torch.rsqrt(energy + 1e-8).view(b, -1, 1, 1)
        return out


class StyleConv(nn.Module):
    """Modulated conv x sqrt(2) + (zero) noise + bias, LeakyReLU. ``weight`` is the noise strength (unused: the
    noise is zero), kept for the official layout."""

    def __init__(self, in_channels: int, out_channels: int, style_dim: int, upsample: bool):
        super().__init__()
        self.modulated_conv = ModulatedConv2d(in_channels, out_channels, 3, style_dim, True, upsample)
        self.weight = nn.Parameter(torch.zeros(1))
        self.bias = nn.Parameter(torch.zeros(1, out_channels, 1, 1))

    def forward(self, x: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        return _lrelu(self.modulated_conv(x, style) * 2**0.5 + self.bias)


class ToRGB(nn.Module):
    def __init__(self, in_channels: int, style_dim: int, upsample: bool):
        super().__init__()
        self.upsample = upsample
        self.modulated_conv = ModulatedConv2d(in_channels, 3, 1, style_dim, demodulate=False)
        self.bias = nn.Parameter(torch.zeros(1, 3, 1, 1))

    def forward(self, x: torch.Tensor, style: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        out = self.modulated_conv(x, style) + self.bias
        if skip is not None:
            if self.upsample:
                skip = F.interpolate(skip, scale_factor=2.0, mode="bilinear", align_corners=False)
            out = out + skip
        return out


class ConstantInput(nn.Module):
    def __init__(self, channels: int, size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(1, channels, size, size))

    def forward(self, batch: int) -> torch.Tensor:
        return self.weight.expand(batch, -1, -1, -1)


class StyleGAN2GeneratorCSFT(nn.Module):
    """StyleGAN2 synthesis network with channel-split SFT after the first conv of each conditioned resolution."""

    def __init__(self, cfg: SRConfig):
        super().__init__()
        channels = cfg.decoder_channels
        self.num_levels = len(channels)  # 4 .. decoder_side
        self.style_mlp = nn.Sequential(
            NormStyleCode(), *[m for _ in range(cfg.num_mlp) for m in (nn.Linear(cfg.style_dim, cfg.style_dim),
                                                                      nn.LeakyReLU(0.2))]
        )
        self.constant_input = ConstantInput(channels[0], 4)
        self.style_conv1 = StyleConv(channels[0], channels[0], cfg.style_dim, upsample=False)
        self.to_rgb1 = ToRGB(channels[0], cfg.style_dim, upsample=False)
        self.num_layers = 2 * (self.num_levels - 1) + 1
        self.num_latent = 2 * self.num_levels  # = 2 * log2(decoder_side) - 2
        self.style_convs = nn.ModuleList()
        self.to_rgbs = nn.ModuleList()
        for level in range(1, self.num_levels):
            self.style_convs.append(StyleConv(channels[level - 1], channels[level], cfg.style_dim, upsample=True))
            self.style_convs.append(StyleConv(channels[level], channels[level], cfg.style_dim, upsample=False))
            self.to_rgbs.append(ToRGB(channels[level], cfg.style_dim, upsample=True))
        if cfg.noise_buffers:
            self.noises = nn.Module()
            for index in range(self.num_layers):
                size = 2 ** ((index + 5) // 2)
                self.noises.register_buffer(f"noise{index}", torch.zeros(1, 1, size, size))

    def forward(self, latent: torch.Tensor, conditions: list[torch.Tensor]) -> torch.Tensor:
        """``latent`` ``(B, num_latent, style_dim)``; ``conditions`` [scale, shift] per level from 8 px up."""
        out = self.style_conv1(self.constant_input(latent.shape[0]), latent[:, 0])
        skip = self.to_rgb1(out, latent[:, 1])
        i = 1
        for conv1, conv2, to_rgb in zip(self.style_convs[::2], self.style_convs[1::2], self.to_rgbs):
            out = conv1(out, latent[:, i])
            if i < len(conditions):  # the U-Net may stop below decoder_side: the top levels are unconditioned
                same, modulated = torch.split(out, out.shape[1] // 2, dim=1)
                out = torch.cat([same, modulated * conditions[i - 1] + conditions[i]], dim=1)
            out = conv2(out, latent[:, i + 1])
            skip = to_rgb(out, latent[:, i + 2], skip)
            i += 2
        return skip


class DetailBody(nn.Module):
    """Detail at the input resolution: frames t-1, t, t+1 ``(T, 9, S, S)`` in [-1, 1] plus the U-Net's features at
    S (a 1x1 projection) -> ``channels`` -> ``blocks`` residual conv3x3 pairs -> 12 channels -> pixel shuffle ->
    ``(T, 3, 2S, 2S)``, an image residual in [-1, 1] units that is zero at initialisation."""

    def __init__(self, unet_channels: int, channels: int, blocks: int):
        super().__init__()
        self.head = nn.Conv2d(9, channels, 3, 1, 1)
        self.unet_projection = nn.Conv2d(unet_channels, channels, 1)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Conv2d(channels, channels, 3, 1, 1), nn.LeakyReLU(0.2),
                          nn.Conv2d(channels, channels, 3, 1, 1))
            for _ in range(blocks)
        )
        self.tail = nn.Conv2d(channels, 12, 3, 1, 1)
        nn.init.zeros_(self.tail.weight)
        nn.init.zeros_(self.tail.bias)

    def forward(self, window: torch.Tensor, unet_features: torch.Tensor) -> torch.Tensor:
        features = _lrelu(self.head(window) + self.unet_projection(unet_features))
        for block in self.blocks:
            features = features + block(features)
        return F.pixel_shuffle(self.tail(_lrelu(features)), 2)


# ----------------------------------------------------------------------------------------------------------------
# The network


class TemporalSR(nn.Module):
    """``(T, 3, input_size, input_size)`` in [0, 1] -> ``(T, 3, output_size, output_size)`` in [0, 1]."""

    def __init__(self, cfg: SRConfig):
        super().__init__()
        self.cfg = cfg
        unet = cfg.unet_channels  # unet_size .. 4
        self.conv_body_first = nn.Conv2d(3, unet[0], 1)
        self.conv_body_down = nn.ModuleList(ResBlock(unet[i], unet[i + 1], "down") for i in range(len(unet) - 1))
        self.final_conv = nn.Conv2d(unet[-1], unet[-1], 3, 1, 1)
        up = unet[::-1]  # 4 .. unet_size
        self.conv_body_up = nn.ModuleList(ResBlock(up[i], up[i + 1], "up") for i in range(len(up) - 1))
        self.toRGB = nn.ModuleList(nn.Conv2d(c, 3, 1) for c in up[1:])
        self.stylegan_decoder = StyleGAN2GeneratorCSFT(cfg)
        self.final_linear = nn.Linear(unet[-1] * 16, self.stylegan_decoder.num_latent * cfg.style_dim)
        self.condition_scale = nn.ModuleList(self._condition(c) for c in up[1:])
        self.condition_shift = nn.ModuleList(self._condition(c) for c in up[1:])
        if cfg.temporal:
            self.window_down = nn.ModuleList(ConvReLUConv(c, cfg.temporal_hidden * c) for c in unet[1:])
            self.recurrent_forward = nn.ModuleList(ConvReLUConv(c, cfg.temporal_hidden * c) for c in up[1:])
        if cfg.detail_channels:
            self.detail_body = DetailBody(up[-1], cfg.detail_channels, cfg.detail_blocks)
        if cfg.residual:  # the decoder image starts at zero: the untrained network is the plain upsampling
            for to_rgb in [self.stylegan_decoder.to_rgb1, *self.stylegan_decoder.to_rgbs]:
                nn.init.zeros_(to_rgb.modulated_conv.weight)

    @staticmethod
    def _condition(channels: int) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(channels, channels, 3, 1, 1), nn.LeakyReLU(0.2), nn.Conv2d(channels, channels, 3, 1, 1))

    def num_temporal_layers(self) -> int:
        """Temporal layers in sequence: frame t's output depends on frames t - n .. t + n for this n."""
        return len(self.window_down) + len(self.recurrent_forward) if self.cfg.temporal else 0

    def forward(self, frames: torch.Tensor, return_rgb: bool = False):
        """Args:
            frames: ``(T, 3, input_size, input_size)`` in [0, 1], consecutive frames of one clip.
            return_rgb: also return the U-Net's intermediate RGB images (8 px .. unet_size, in [-1, 1]).
        """
        cfg = self.cfg
        assert frames.ndim == 4 and frames.shape[1:] == (3, cfg.input_size, cfg.input_size), frames.shape
        feat = self.stem(frames * 2 - 1)
        skips = []
        for i, block in enumerate(self.conv_body_down):
            feat = block(feat)
            if cfg.temporal:
                feat = self.window_down[i](feat)
            skips.insert(0, feat)
        feat, latent = self.bottom(feat)
        conditions, rgbs = [], []
        for i, block in enumerate(self.conv_body_up):
            feat = block(feat + skips[i])
            if cfg.temporal:
                feat = self.recurrent_forward[i](feat)
            conditions.extend(self.condition_pair(i, feat))
            if return_rgb:
                rgbs.append(self.toRGB[i](feat))
        # feat: the U-Net's last up block, (T, C, input_size, input_size)
        windows = temporal_window(frames * 2 - 1) if cfg.detail_channels else None
        out = self.finish(latent, conditions, feat, windows, frames * 2 - 1)
        return (out, rgbs) if return_rgb else out

    # The U-Net's per-frame pieces, shared by `forward` (whole clips) and `SRStream` (streams); the temporal layers
    # between them are what the two run differently.

    def stem(self, frames: torch.Tensor) -> torch.Tensor:
        """``(T, 3, input_size, input_size)`` in [-1, 1] -> the first U-Net features at ``unet_size``."""
        return _lrelu(self.conv_body_first(_resize(frames, self.cfg.unet_size)))

    def bottom(self, feat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The deepest down features -> (the features the up path starts from, the decoder's latents ``(T,
        num_latent, style_dim)``)."""
        feat = _lrelu(self.final_conv(feat))
        # (shape[0], not len(): the ONNX export traces this with a dynamic frame count)
        return feat, self.final_linear(feat.flatten(1)).view(feat.shape[0], -1, self.cfg.style_dim)

    def condition_pair(self, level: int, feat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The decoder's SFT scale and shift from up level ``level``'s features."""
        return self.condition_scale[level](feat), self.condition_shift[level](feat)

    def finish(self, latent: torch.Tensor, conditions: list[torch.Tensor], finest: torch.Tensor,
               windows: torch.Tensor | None, frames: torch.Tensor) -> torch.Tensor:
        """Everything after the U-Net, frame by frame: the decoder's image from the latents ``(T, num_latent,
        style_dim)`` and SFT ``conditions``, the detail body's from the frame ``windows`` ``(T, 9, S, S)`` (None
        without a detail body) and the U-Net's ``finest`` features ``(T, C, S, S)``, the upsampled ``frames``
        ``(T, 3, S, S)``; inputs in [-1, 1] units -> ``(T, 3, output_size, output_size)`` in [0, 1]."""
        cfg = self.cfg
        image = _resize(self.stylegan_decoder(latent, conditions), cfg.output_size)
        if cfg.detail_channels:
            image = image + self.detail_body(windows, finest)
        if cfg.residual:
            image = image + upsample(frames, cfg)
        return ((image + 1) / 2).clamp(0, 1)


def count_flops(model: TemporalSR, frames: int = 1) -> float:
    """FLOPs (2 x multiply-adds, as torch's flop counter) per output frame, measured on a clip of ``frames``."""
    from torch.utils.flop_counter import FlopCounterMode

    size = model.cfg.input_size
    with FlopCounterMode(display=False) as counter:  # (under no_grad its module tracker fails on expand)
        model(torch.zeros(frames, 3, size, size))
    return counter.get_total_flops() / frames


# ----------------------------------------------------------------------------------------------------------------
# Streaming inference


class _Window:
    """One temporal layer over a stream: inputs go in as they come, and frame t's output comes out once frame t+1
    is in (or the stream has ended), with the clip-end frames replicated as in `temporal_window`."""

    def __init__(self, layer: Callable[[torch.Tensor], torch.Tensor]):
        self.layer = layer  # (T, 3C, H, W) frames t-1, t, t+1 side by side -> frame t's output
        self.held: torch.Tensor | None = None  # the last two inputs (frame 0 twice at the start)

    def push(self, inputs: torch.Tensor, final: bool) -> torch.Tensor:
        """``(n, C, H, W)`` new inputs (n may be 0) -> the outputs now computable, in order."""
        if self.held is None:
            if len(inputs) == 0:
                return inputs
            self.held = inputs[:1]  # frame -1 := frame 0
        frames = torch.cat([self.held, inputs]) if len(inputs) else self.held  # (an empty input may have any shape)
        if final:
            frames = torch.cat([frames, frames[-1:]])  # frame T := frame T - 1
        self.held = frames[-2:]
        if len(frames) < 3:
            return frames[:0]
        return self.layer(torch.cat([frames[:-2], frames[1:-1], frames[2:]], dim=1))


class SRStream:
    """Exact streaming inference of a `TemporalSR`: frames pushed in chunks of any size give, in order, the
    outputs the network gives on the whole clip at once (to float rounding), each frame computed once.

    Every temporal layer delays its stream by one frame, so frame t comes out once frame t + L is in, L =
    ``num_temporal_layers()`` (at least 1 with a detail body, whose frame window needs frame t + 1), or at the
    `push` with ``final``. Per frame the cost is the per-frame network's; the windowed alternative (chunks with
    context on both sides, `metaportrait.upscale.StreamingSR` with an integer context) computes the context frames
    again and is exact only with a context of L. Inputs ``(n, 3, input_size, input_size)`` in [0, 1]; outputs
    ``(k, 3, output_size, output_size)`` in [0, 1]. Call it under ``torch.no_grad()`` (and autocast, if wanted).
    """

    def __init__(self, model: TemporalSR, finish: Callable[..., torch.Tensor] | None = None):
        """``finish``: a faster `TemporalSR.finish` for batches of ``finish.fixed_batch`` frames (the compiled
        one, `metaportrait.compiled_backend.CompiledSRFinish`); other batches use the model's."""
        self.model = model
        self.finish = finish
        if model.cfg.temporal:
            self._down = [_Window(_centre_layer(layer)) for layer in model.window_down]
            self._up = [_Window(_centre_layer(layer)) for layer in model.recurrent_forward]
        else:
            self._down, self._up = [None] * len(model.conv_body_down), [None] * len(model.conv_body_up)
        self._frame_window = _Window(lambda window: window)  # the detail body's frames t-1, t, t+1
        # Results waiting for the slower streams they are combined with; every queue starts at frame 0.
        self._skips: list[list[torch.Tensor]] = [[] for _ in model.conv_body_down]  # per down level
        self._latents: list[torch.Tensor] = []
        self._conditions: list[list[torch.Tensor]] = [[] for _ in range(2 * len(model.conv_body_up))]
        self._finest: list[torch.Tensor] = []  # the last up level's features
        self._frames: list[torch.Tensor] = []  # the inputs, in [-1, 1]
        self._windows: list[torch.Tensor] = []  # their frame windows
        self.ended = False

    def push(self, frames: torch.Tensor, final: bool = False) -> torch.Tensor:
        """Add ``frames`` (``final``: the clip's last ones, possibly none) and return the outputs now complete."""
        model, cfg = self.model, self.model.cfg
        if self.ended:
            raise RuntimeError("SRStream.push after the final frames")
        assert frames.ndim == 4 and frames.shape[1:] == (3, cfg.input_size, cfg.input_size), frames.shape
        self.ended = final
        frames = frames * 2 - 1
        _put(self._frames, frames)
        if cfg.detail_channels:
            _put(self._windows, self._frame_window.push(frames, final))
        feat = model.stem(frames) if len(frames) else frames
        for i, block in enumerate(model.conv_body_down):
            feat = block(feat) if len(feat) else feat
            if self._down[i] is not None:
                feat = self._down[i].push(feat, final)
            _put(self._skips[i], feat)
        if len(feat):
            feat, latent = model.bottom(feat)
            self._latents.append(latent)
        for i, block in enumerate(model.conv_body_up):
            if len(feat):
                feat = block(feat + _take(self._skips[-1 - i], len(feat)))
            if self._up[i] is not None:
                feat = self._up[i].push(feat, final)
            if len(feat):
                scale, shift = model.condition_pair(i, feat)
                self._conditions[2 * i].append(scale)
                self._conditions[2 * i + 1].append(shift)
        _put(self._finest, feat)
        count = _queued(self._finest)
        if cfg.detail_channels:
            count = min(count, _queued(self._windows))
        if count == 0:
            return torch.zeros(0, 3, cfg.output_size, cfg.output_size)
        finish = self.finish if self.finish is not None and count == self.finish.fixed_batch else model.finish
        conditions = [_take(queue, count) for queue in self._conditions]
        windows = _take(self._windows, count) if cfg.detail_channels else None
        return finish(_take(self._latents, count), conditions, _take(self._finest, count), windows,
                      _take(self._frames, count))


def _centre_layer(layer: ConvReLUConv) -> Callable[[torch.Tensor], torch.Tensor]:
    """A `ConvReLUConv` on a ready-made window ``(T, 3C, H, W)``: its residual goes to the centre frame."""

    def apply(window: torch.Tensor) -> torch.Tensor:
        channels = window.shape[1] // 3
        return window[:, channels:2 * channels] + layer.conv2(_lrelu(layer.conv1(window)))

    return apply


def _put(queue: list[torch.Tensor], frames: torch.Tensor) -> None:
    if len(frames):  # (an empty batch may have any shape)
        queue.append(frames)


def _queued(queue: list[torch.Tensor]) -> int:
    return sum(len(part) for part in queue)


def _take(queue: list[torch.Tensor], count: int) -> torch.Tensor:
    """The first ``count`` (> 0) frames of a queue of frame batches, removed from it."""
    joined = torch.cat(queue) if len(queue) > 1 else queue[0]
    queue[:] = [joined[count:]] if len(joined) > count else []
    return joined[:count]
