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
