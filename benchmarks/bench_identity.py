"""Speed of the pretrained components: identity embeddings and the perceptual pyramid loss.

Run ``python benchmarks/bench_identity.py [--threads N]``; prints one JSON object. Importable:
``run(threads=2) -> dict`` (the `metaportrait bench` command calls it).

Measured after a warm-up with ``torch.set_num_threads(threads)``; each entry is ``{"median": ms, "best": ms}``
over ``repeats`` runs (the machine is shared, so the best run is the better estimate of the code's speed and
the median of what a busy machine gives):
* ``embed_ms_batch8``: identity embeddings of a batch of 8 (256x256 images -> MediaPipe-landmark alignment ->
  dlib ResNet), no gradient; ``embed_per_s_batch8`` is the same as embeddings per second.
* ``id_loss_fwd_bwd_ms_batch8``: the same with a backward pass to the images (the ID loss in training).
* ``perceptual_fwd_bwd_ms``: `PerceptualPyramidLoss` (MobileNetV2, 4 scales) forward + backward for one
  256x256 prediction/target pair, and for a batch of 8 at 128x128.
Landmarks are measured once on scikit-image's astronaut (the face is the same in every batch item; speed
does not depend on the content).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F


def _time_ms(function: Callable[[], object], repeats: int) -> dict[str, float]:
    function()  # warm-up (allocations, oneDNN kernel selection)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append((time.perf_counter() - start) * 1000.0)
    return {"median": round(statistics.median(times), 1), "best": round(min(times), 1)}


def _astronaut_batch(batch: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(batch, 3, size, size) astronaut face crops in [0, 1] and their (batch, 478, 2) landmarks."""
    from skimage import data

    from metaportrait.data.landmarks import landmarks_of_image

    image = data.astronaut()[20:276, 100:356]  # 256x256 around the face
    landmarks = torch.from_numpy(landmarks_of_image(image, "astronaut"))[None]
    tensor = torch.from_numpy(image.copy()).permute(2, 0, 1)[None].float() / 255.0
    if size != tensor.shape[-1]:
        landmarks = landmarks * (size / tensor.shape[-1])
        tensor = F.interpolate(tensor, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return tensor.expand(batch, -1, -1, -1).contiguous(), landmarks.expand(batch, -1, -1).contiguous()


def run(threads: int = 2, repeats: int = 7) -> dict:
    """Measure with ``threads`` torch threads; returns a JSON-ready dict (times in ms)."""
    from metaportrait.losses.perceptual import MobileNetV2Features, PerceptualPyramidLoss
    from metaportrait.models.identity import IdentityEncoder, cosine_distance

    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        encoder = IdentityEncoder.from_dlib()
        images, landmarks = _astronaut_batch(8, 256)

        def embed() -> None:
            with torch.no_grad():
                encoder.embed(images, landmarks)

        embed_ms = _time_ms(embed, repeats)
        target = encoder.embed(images, landmarks).detach()

        def id_loss_step() -> None:
            prediction = images.clone().requires_grad_(True)
            cosine_distance(encoder.embed(prediction, landmarks), target).mean().backward()

        id_loss_ms = _time_ms(id_loss_step, repeats)

        loss = PerceptualPyramidLoss(MobileNetV2Features())
        perceptual_ms = {}
        for name, (batch, size) in {"batch1_256": (1, 256), "batch8_128": (8, 128)}.items():
            generator = torch.Generator().manual_seed(0)
            wanted = torch.rand(batch, 3, size, size, generator=generator)
            start = torch.rand(batch, 3, size, size, generator=generator)

            def perceptual_step() -> None:
                prediction = start.clone().requires_grad_(True)
                loss(prediction, wanted).backward()

            perceptual_ms[name] = _time_ms(perceptual_step, repeats)
    finally:
        torch.set_num_threads(old_threads)
    return {
        "threads": threads,
        "torch": torch.__version__,
        "machine": platform.machine(),
        "embed_ms_batch8": embed_ms,
        "embed_per_s_batch8": {key: round(8 * 1000.0 / value, 1) for key, value in embed_ms.items()},
        "id_loss_fwd_bwd_ms_batch8": id_loss_ms,
        "perceptual_fwd_bwd_ms": perceptual_ms,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    print(json.dumps(run(args.threads, args.repeats), indent=2))


if __name__ == "__main__":
    main()
