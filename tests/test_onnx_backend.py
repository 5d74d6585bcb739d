"""ONNX Runtime backend (metaportrait.onnx_backend): the same frames as torch, and clear errors for bad folders."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from metaportrait.config import PRESETS
from metaportrait.errors import InputError
from metaportrait.models.generator import Generator, example_inputs
from metaportrait.onnx_backend import META_FILE, ONNX_FILE, OnnxGenerator, export

TINY = PRESETS["tiny"]


@pytest.fixture(scope="module")
def tiny_generator() -> Generator:
    torch.manual_seed(0)
    return Generator(TINY).eval()


def test_a_folder_without_an_export_is_refused(tiny_generator, tmp_path):
    with pytest.raises(InputError, match="not an ONNX export"):
        OnnxGenerator(tiny_generator, tmp_path, "0" * 64)


def test_an_export_of_another_checkpoint_is_refused(tiny_generator, tmp_path):
    (tmp_path / META_FILE).write_text(json.dumps({"checkpoint_sha256": "1" * 64, "inputs": ["source"]}))
    with pytest.raises(InputError, match="another checkpoint"):
        OnnxGenerator(tiny_generator, tmp_path, "0" * 64)


def test_a_corrupt_model_file_is_refused(tiny_generator, tmp_path):
    (tmp_path / META_FILE).write_text(json.dumps({"checkpoint_sha256": "0" * 64, "inputs": ["source"]}))
    (tmp_path / ONNX_FILE).write_bytes(b"not a model")
    with pytest.raises(InputError, match="cannot be loaded by ONNX Runtime"):
        OnnxGenerator(tiny_generator, tmp_path, "0" * 64)


@pytest.mark.slow  # the export takes about a minute on 2 cores
def test_export_gives_the_torch_frames_at_any_batch(tiny_generator, tmp_path):
    folder = export(tiny_generator, TINY, tmp_path / "onnx", "0" * 64)
    backend = OnnxGenerator(tiny_generator, folder, "0" * 64, threads=1)
    for batch in (1, 3):
        inputs = example_inputs(TINY, batch=batch, seed=batch)
        # One portrait for every frame, as in the pipeline: source, its lines and its identity have batch 1.
        source = {"source": inputs["source"][:1], "source_lines": inputs["source_lines"][:1],
                  "identity": inputs["identity"][:1]}
        with torch.no_grad():
            expected = tiny_generator(**{**inputs, **{k: v.expand(batch, *v.shape[1:]) for k, v in source.items()}})
        got = backend(**{**inputs, **source})
        for name in ("output", "occlusion", "deformation"):
            np.testing.assert_allclose(got[name].numpy(), expected[name].numpy(), atol=1e-5, err_msg=name)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["onnx"]  # no staging folder left behind


def test_export_onnx_refuses_an_existing_folder_in_one_line(tmp_path, capsys):
    from metaportrait.cli import main

    (tmp_path / "out").mkdir()
    assert main(["export-onnx", "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {tmp_path / 'out'}: already exists; choose a new folder"]
    assert main(["export-onnx", "--checkpoint", str(tmp_path / "missing"), "--output", str(tmp_path / "o2")]) == 2
    assert "checkpoint folder not found" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_export_onnx_writes_the_source_encoder_and_the_sr_network(tiny_generator, tmp_path):
    from metaportrait.cli import main
    from metaportrait.config import SR_PRESETS
    from metaportrait.io.checkpoint import checkpoint_sha256, save_model, save_sr_model
    from metaportrait.models.sr import TemporalSR
    from metaportrait.onnx_backend import SOURCE_FILE, SR_FILE, SR_FOLDER, OnnxSR

    save_model(tmp_path / "model", tiny_generator, TINY)
    torch.manual_seed(0)
    sr = TemporalSR(SR_PRESETS["tiny"]).eval()
    save_sr_model(tmp_path / "sr_model", sr, SR_PRESETS["tiny"])
    out = tmp_path / "exported"
    assert main(["export-onnx", "--checkpoint", str(tmp_path / "model"), "--sr", str(tmp_path / "sr_model"),
                 "--output", str(out)]) == 0
    assert {ONNX_FILE, SOURCE_FILE, META_FILE, SR_FOLDER} <= {p.name for p in out.iterdir()}
    backend = OnnxGenerator(tiny_generator, out, checkpoint_sha256(tmp_path / "model"), threads=1)
    source = torch.rand(1, 3, TINY.image_size, TINY.image_size)
    with torch.no_grad():
        expected = tiny_generator.encode_source(source)
    got = backend.encode_source(source)  # in ONNX Runtime
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-5)
    assert (out / SR_FOLDER / SR_FILE).is_file()
    onnx_sr = OnnxSR(sr, out / SR_FOLDER, checkpoint_sha256(tmp_path / "sr_model"), threads=1)
    for frames in (1, 3, 6):  # 1: below the export's minimum, run in torch
        clip = torch.rand(frames, 3, sr.cfg.input_size, sr.cfg.input_size)
        with torch.no_grad():
            np.testing.assert_allclose(onnx_sr(clip).numpy(), sr(clip).numpy(), atol=1e-4)
    with pytest.raises(InputError, match="another SR checkpoint"):
        OnnxSR(sr, out / SR_FOLDER, "1" * 64)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exported", "model", "sr_model"]  # no staging left
