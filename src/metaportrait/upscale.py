"""Face super-resolution at inference: a streamed sliding window over a video's 256 face crops.

::

    from metaportrait.upscale import StreamingSR, load_sr

    sr = StreamingSR(load_sr(True))  # the bundled lite network (or a folder / official .pth file)
    for face512, payload in sr.stream((face256, payload) for ...):
        ...

`StreamingSR.stream` gives each frame the output the network gives on the whole video in one clip, with memory
flat in video length. By default (``context=None``) a `TemporalSR` streams through `SRStream`: ``chunk`` frames
per call, each frame computed once, each output ready ``num_temporal_layers()`` frames after its input. With an
integer ``context`` (and for drop-ins such as the ONNX network, which run whole clips) it runs windows instead:
chunks of ``chunk`` frames with ``context`` extra frames on each side (edge frames replicated only at the true
ends of the video, as the network does inside a clip), keeping the middle outputs. That costs ``(chunk + 2 *
context) / chunk`` times as much and equals the whole clip only with a context of the number of temporal layers;
smaller contexts trade exactness for speed (docs/results.md, "Super-resolution", measures the difference).

`upscale_video` is `metaportrait upscale`: any face video, the face tracked and cropped as `metaportrait animate`
does, each crop super-resolved and pasted back at the frame's resolution.
"""

from __future__ import annotations

import importlib.resources
import time
from collections import deque
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from metaportrait.errors import InputError
from metaportrait.models.sr import SRStream, TemporalSR

BUNDLED_SR = "assets/models/sr_lite"  # inside the metaportrait package
DEFAULT_CHUNK = 4  # streamed: smaller chunks run as fast (caches) in less memory (bundled network: 0.7 vs 1 GB at 16)
DEFAULT_CONTEXT = None  # exact streaming
# The ONNX network runs whole clips: windows of 16 frames with 4 frames of context, near the exact result.
ONNX_SR_CHUNK, ONNX_SR_CONTEXT = 16, 4


def bundled_sr() -> Path:
    return Path(str(importlib.resources.files("metaportrait") / BUNDLED_SR))


def sr_weights(path: str | Path | bool) -> Path:
    """Where the SR weights of ``--sr PATH`` are: ``True`` / ``"default"`` the bundled folder, else ``path``."""
    return bundled_sr() if path is True or str(path) == "default" else Path(path)


def load_sr(path: str | Path | bool):
    """The SR network: ``True`` / ``"default"`` the bundled lite one, a `save_sr_model` folder, or an official
    BasicSR-style ``.pth`` file (`metaportrait.io.convert_official.load_official_sr`).

    Raises:
        InputError: no weights there (or none bundled), or a file that is not a valid SR checkpoint.
    """
    from metaportrait.io.checkpoint import load_sr_model

    bundled = path is True or str(path) == "default"
    path = sr_weights(path)
    if bundled and not (path / "model.safetensors").is_file():
        raise InputError(path, "no super-resolution weights are bundled with this install; pass --sr FOLDER")
    if path.is_file():
        from metaportrait.io.convert_official import load_official_sr

        return load_official_sr(path)
    if not path.exists():
        raise InputError(path, "super-resolution checkpoint not found")
    return load_sr_model(path)[0]


class StreamingSR:
    """Super-resolution of a stream of ``uint8 (S, S, 3)`` crops (``S`` = the network's input): exact streaming
    by default, sliding windows with an integer ``context`` (see the module's docstring)."""

    def __init__(self, model: torch.nn.Module, chunk: int = DEFAULT_CHUNK, context: int | None = DEFAULT_CONTEXT,
                 precision: str = "fp32", finish=None):
        """Args:
            model: a `metaportrait.models.sr.TemporalSR`.
            chunk: output frames per network call.
            context: ``None``: exactly the result of one clip (a `TemporalSR` streams through `SRStream`, each
                frame once; another model gets its full temporal reach as context); an integer: windows with
                that many frames of context on each side of a chunk.
            precision: ``"fp32"``, or ``"bf16"``: the network under CPU bfloat16 autocast (the convolutions in
                bfloat16; the bicubic base image the residual is added to stays float32).
            finish: with exact streaming, a faster `TemporalSR.finish` for calls of ``finish.fixed_batch`` frames
                (`metaportrait.compiled_backend.compiled_sr_finish`, built for this ``precision``; best with
                ``chunk`` equal to that batch).
        """
        if chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {chunk}")
        if precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be 'fp32' or 'bf16', got {precision!r}")
        self.precision = precision
        self.seconds = 0.0  # time spent in the network so far (for the pipeline's per-stage times)
        self.model = model.eval()
        self.chunk = chunk
        self.exact_stream = context is None and isinstance(model, TemporalSR)
        self.finish = finish
        self.context = model.num_temporal_layers() if context is None else context
        if self.context < 0:
            raise ValueError(f"context must be >= 0, got {context}")
        self.input_size = model.cfg.input_size
        self.output_size = model.cfg.output_size

    def stream(self, items: Iterable[tuple[np.ndarray, Any]]) -> Iterator[tuple[np.ndarray, Any]]:
        """``(crop, payload)`` pairs in video order -> ``(upscaled crop, payload)`` pairs in the same order."""
        if self.exact_stream:
            yield from self._stream_exact(items)
            return
        buffer: deque[tuple[np.ndarray, Any]] = deque()  # frames first - context .. first + chunk + context
        first = 0  # video index of the next frame to output
        offset = 0  # video index of buffer[0]
        for item in items:
            self._check(item[0])
            buffer.append(item)
            if offset + len(buffer) >= first + self.chunk + self.context:
                yield from self._emit(buffer, offset, first, first + self.chunk)
                first += self.chunk
                while offset < first - self.context:
                    buffer.popleft()
                    offset += 1
        end = offset + len(buffer)
        while first < end:
            yield from self._emit(buffer, offset, first, min(end, first + self.chunk))
            first += self.chunk

    def _stream_exact(self, items: Iterable[tuple[np.ndarray, Any]]) -> Iterator[tuple[np.ndarray, Any]]:
        stream = SRStream(self.model, finish=self.finish)
        crops: list[np.ndarray] = []
        payloads: deque[Any] = deque()  # of the frames pushed and not yet out
        for crop, payload in items:
            self._check(crop)
            crops.append(crop)
            payloads.append(payload)
            if len(crops) == self.chunk:
                for out in self._run(stream.push, crops, final=False):
                    yield out, payloads.popleft()
                crops = []
        for out in self._run(stream.push, crops, final=True):
            yield out, payloads.popleft()

    def _check(self, crop: np.ndarray) -> None:
        if crop.shape != (self.input_size, self.input_size, 3) or crop.dtype != np.uint8:
            raise ValueError(f"expected uint8 ({self.input_size}, {self.input_size}, 3) crops, got "
                             f"{crop.dtype} {crop.shape}")

    def _run(self, network, crops: list[np.ndarray], **kwargs) -> np.ndarray:
        """``network`` on ``uint8 (n, S, S, 3)`` crops, timed, under the precision -> ``uint8`` outputs."""
        size = self.input_size
        clip = torch.from_numpy(np.stack(crops)) if crops else torch.zeros(0, size, size, 3, dtype=torch.uint8)
        clip = clip.permute(0, 3, 1, 2).float() / 255
        begin = time.perf_counter()
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            out = network(clip, **kwargs).float()
        self.seconds += time.perf_counter() - begin
        return (out.permute(0, 2, 3, 1) * 255).round().clamp(0, 255).to(torch.uint8).numpy()

    def upscale(self, frames: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
        """Just the upscaled crops of a stream of crops."""
        for out, _ in self.stream((f, None) for f in frames):
            yield out

    def _emit(self, buffer, offset: int, first: int, stop: int):
        """Run the network on buffer frames ``first - context .. stop + context`` (video indices, clipped to what
        is buffered) and yield the outputs of ``first .. stop``."""
        start = max(offset, first - self.context)
        end = min(offset + len(buffer), stop + self.context)
        window = [buffer[i - offset] for i in range(start, end)]
        out = self._run(self.model, [f for f, _ in window])
        for index in range(first, stop):
            yield out[index - start], window[index - start][1]


def upscale_video(frames: Iterable[np.ndarray], sr: StreamingSR, fps: float, crop_output: bool = False,
                  name: str | Path = "<video>", feather: float = 0.1) -> Iterator[np.ndarray]:
    """Super-resolve the face of every frame: ``uint8 (H, W, 3)`` frames -> the same frames with the face region
    replaced from the 512 crop (or, with ``crop_output``, the 512 crops). The crop box is tracked and smoothed as
    in `metaportrait.pipeline.Animator`.

    Raises:
        NoFaceError: no face in any frame (before any output).
    """
    from metaportrait.data.face import BoxSmoother, CropBox, crop, paste_back
    from metaportrait.data.landmarks import iter_tracked

    boxes = BoxSmoother(fps)

    def crops():
        for frame, points, _ in iter_tracked(frames, smooth=True, fps=fps, name=name):
            box = boxes(CropBox.from_landmarks(points))
            yield crop(frame, box, sr.input_size), (frame, box)

    for face, (frame, box) in sr.stream(crops()):
        yield face if crop_output else paste_back(frame, face, box, feather=feather)
