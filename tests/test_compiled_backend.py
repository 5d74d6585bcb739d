"""The ``compiled`` backend (metaportrait.compiled_backend): the eager generator's frames, one compiled batch size,
and clear errors for bad folders and failed builds."""

from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest
import torch
import torch._inductor.decomposition  # the tables the build changes and puts back
import torch._inductor.lowering

from metaportrait.compiled_backend import (
    META_FILE,
    PACKAGE_FILE,
    SR_PACKAGE_FILE,
    RECIPE,
    CompiledGenerator,
    build,
    compiled_sr_finish,
)
from metaportrait.config import PRESETS
from metaportrait.errors import InputError
from metaportrait.models.generator import Generator
from metaportrait.pipeline import Animator

TINY = PRESETS["tiny"]
SHA = "0" * 64


@pytest.fixture(scope="module")
def tiny_generator() -> Generator:
    torch.manual_seed(0)
    return Generator(TINY).eval()


@pytest.fixture(scope="module")
def astronaut() -> tuple[np.ndarray, np.ndarray]:
    from skimage import data

    from metaportrait.data.landmarks import landmarks_of_image

    image = data.astronaut()
    return image, landmarks_of_image(image, "astronaut")


def test_compiled_frames_match_eager_ones_with_padded_batches(tiny_generator, astronaut, tmp_path, monkeypatch):
    image, points = astronaut
    monkeypatch.setenv("CI", "1")  # Inductor is stricter about fallbacks on CI runners; users' runners too
    torch._inductor.decomposition.fast_random_decomps()  # the table's copy an earlier compilation would have made
    folder = build(tiny_generator, TINY, tmp_path / "compiled", SHA, batch=2, precision="fp32")
    with zipfile.ZipFile(folder / PACKAGE_FILE) as package:  # grid_sample is ATen's, not generated loops
        wrappers = [package.read(name) for name in package.namelist() if name.endswith("wrapper.cpp")]
    assert any(b"torch.ops.aten.grid_sampler_2d.default" in wrapper for wrapper in wrappers)
    compiled = CompiledGenerator(tiny_generator, folder, SHA, batch=2, precision="fp32")
    rng = np.random.default_rng(0)
    targets = [points + rng.normal(0, 1.5, points.shape).astype(np.float32) for _ in range(5)]
    eager = Animator(tiny_generator, TINY, batch_size=2)
    fast = Animator(compiled, TINY, batch_size=2)
    assert fast.fixed_batch == 2 and fast.precision == "fp32"
    expected = np.stack(list(eager.animate_landmarks(image, targets, source_landmarks=points)))
    got = np.stack(list(fast.animate_landmarks(image, targets, source_landmarks=points)))  # 1 and 5 targets padded
    assert got.shape == expected.shape == (5, *image.shape)
    assert np.abs(got.astype(int) - expected).max() <= 1  # fused arithmetic: at most a rounding step apart
    with pytest.raises(ValueError, match="batches of 2"):
        compiled(*[torch.zeros(3, 3, 64, 64)] * 3)
    # Another checkpoint, batch or precision than the build's is refused.
    with pytest.raises(InputError, match="compiled for another checkpoint"):
        CompiledGenerator(tiny_generator, folder, "1" * 64, batch=2, precision="fp32")
    with pytest.raises(InputError, match="compiled for another batch and precision"):
        CompiledGenerator(tiny_generator, folder, SHA, batch=4, precision="bf16")


def test_a_folder_without_a_build_or_with_a_corrupt_one_is_refused(tiny_generator, tmp_path):
    with pytest.raises(InputError, match="not a compiled network of this project"):
        CompiledGenerator(tiny_generator, tmp_path, SHA, batch=2, precision="fp32")
    meta = {"checkpoint_sha256": SHA, "batch": 2, "precision": "fp32", "torch": torch.__version__}
    (tmp_path / META_FILE).write_text(json.dumps(meta))  # a build of the first recipe: made before RECIPE existed
    with pytest.raises(InputError, match="compiled for another build recipe"):
        CompiledGenerator(tiny_generator, tmp_path, SHA, batch=2, precision="fp32")
    (tmp_path / META_FILE).write_text(json.dumps({**meta, "recipe": RECIPE}))
    (tmp_path / PACKAGE_FILE).write_bytes(b"not a package")
    with pytest.raises(InputError, match=f"{PACKAGE_FILE}: cannot be loaded"):
        CompiledGenerator(tiny_generator, tmp_path, SHA, batch=2, precision="fp32")


def test_a_failed_build_is_one_input_error_and_leaves_no_folder(tiny_generator, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found\nlong traceback")

    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", broken)
    with pytest.raises(InputError, match=r"--backend compiled: the generator could not be compiled "
                                         r"\(InvalidCxxCompiler: No working C\+\+ compiler found\)"):
        build(tiny_generator, TINY, tmp_path / "compiled", SHA, batch=2, precision="fp32")
    assert list(tmp_path.iterdir()) == []
    decompositions = torch._inductor.decomposition  # put back
    assert torch.ops.aten.grid_sampler_2d.default in decompositions.decompositions
    assert torch.ops.aten.grid_sampler_2d.default in decompositions.fast_random_decomps()
    assert torch.ops.aten.grid_sampler_2d.default not in torch._inductor.lowering.lowerings


def test_compiled_sr_finish_gives_the_eager_stream_and_other_batches_stay_eager(tmp_path):
    from metaportrait.config import SR_PRESETS
    from metaportrait.models.sr import TemporalSR
    from metaportrait.upscale import StreamingSR

    torch.manual_seed(0)
    model = TemporalSR(SR_PRESETS["tiny"]).eval()
    with torch.no_grad():  # non-zero heads, as after training
        model.detail_body.tail.weight.normal_(0, 0.1)
        for to_rgb in [model.stylegan_decoder.to_rgb1, *model.stylegan_decoder.to_rgbs]:
            to_rgb.modulated_conv.weight.normal_(0, 0.1)
    finish = compiled_sr_finish(model, SHA, batch=2, precision="fp32", folder=tmp_path / "sr")
    assert finish.fixed_batch == 2 and (tmp_path / "sr" / SR_PACKAGE_FILE).is_file()
    calls = []
    counted = lambda *args: calls.append(len(args[0])) or finish(*args)  # noqa: E731
    counted.fixed_batch = 2
    frames = [np.random.default_rng(i).integers(0, 255, (32, 32, 3), dtype=np.uint8) for i in range(13)]
    eager = np.stack(list(StreamingSR(model, chunk=2).upscale(frames)))
    fast = np.stack(list(StreamingSR(model, chunk=2, finish=counted).upscale(frames)))
    assert fast.shape == eager.shape == (13, 64, 64, 3)
    assert np.abs(fast.astype(int) - eager).max() <= 1
    # Steady-state calls (2 frames) ran compiled; the last frames, released together at the end, ran eager.
    assert calls and set(calls) == {2} and sum(calls) < 13
    # The cached build is reused; one for another checkpoint is refused.
    assert compiled_sr_finish(model, SHA, batch=2, precision="fp32", folder=tmp_path / "sr").fixed_batch == 2
    with pytest.raises(InputError, match="compiled for another checkpoint"):
        compiled_sr_finish(model, "1" * 64, batch=2, precision="fp32", folder=tmp_path / "sr")
