"""`normfold remove-layernorm` on a saved tiny transformers GPT-2 directory."""

from __future__ import annotations

import argparse
import json

import numpy as np
import onnx
import pytest
import torch

from finetune_helpers import tiny_gpt2
from normfold import remove_layernorm_command as command
from normfold.errors import InputError
from normfold.finetune import export, fold
from normfold.runtime import make_session


def _run(*argv):
    parser = argparse.ArgumentParser()
    command.add_parser(parser.add_subparsers(dest="command"))
    return command.run(parser.parse_args(["remove-layernorm", *map(str, argv)]))


@pytest.fixture
def gpt2_dir(tmp_path):
    directory = tmp_path / "gpt2"
    tiny_gpt2().save_pretrained(directory)
    assert (directory / "model.safetensors").is_file()
    return directory


@pytest.fixture
def text_dir(tmp_path):
    directory = tmp_path / "text"
    directory.mkdir()
    rng = np.random.default_rng(0)
    words = ["def", "return", "self", "import", "class", "(", ")", ":", "\n", "    ", "x", "y", "=", "+"]
    for i in range(4):
        (directory / f"doc{i}.py").write_text(" ".join(rng.choice(words, size=600)))
    return directory


def test_command_writes_an_ln_free_checkpoint_and_its_onnx(tmp_path, gpt2_dir, text_dir):
    out = tmp_path / "out"
    assert _run(gpt2_dir, "--data", text_dir, "--out", out, "--steps", 8, "--batch", 4, "--seq", 16,
                "--eval-every", 4) == 0
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.onnx", "model.safetensors", "report.json"]
    report = json.loads((out / "report.json").read_text())
    assert report["onnx_verification"]["passed"]
    assert len(report["removal_steps"]) == 7 and max(report["removal_steps"].values()) < 8
    onnx_model = onnx.load(out / "model.onnx")
    assert export.norm_ops(onnx_model) == {}
    model = fold.load_ln_free(out)
    assert not fold.has_norm_modules(model)
    ids = np.random.default_rng(1).integers(0, 64, size=(4, 16))
    session = make_session(out / "model.onnx", optimize=False)
    with torch.no_grad():
        expected = model(torch.from_numpy(ids)).logits.numpy()
    actual = session.run(None, {session.get_inputs()[0].name: ids})[0]
    np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-4)
    assert not list(tmp_path.glob(".out*"))  # no staging directory left behind


def test_command_refuses_other_architectures(tmp_path, text_dir):
    from transformers import LlamaConfig

    directory = tmp_path / "llama"
    LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                num_attention_heads=4).save_pretrained(directory)
    with pytest.raises(InputError, match="'llama' model; remove-layernorm supports GPT-2 only"):
        _run(directory, "--data", text_dir, "--out", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_command_refuses_an_existing_output(tmp_path, gpt2_dir, text_dir):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(InputError, match="exists; pass --force"):
        _run(gpt2_dir, "--data", text_dir, "--out", out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


@pytest.mark.parametrize("argv, message", [
    (["--steps", "3"], "too few to remove 7 norms"),
    (["--gaps", "2,x,3"], "expected three positive integers"),
    (["--seq", "99"], "between 2 and the model's context 16"),
    (["--steps", "9", "--removal-start", "5"], "after the last step"),
    (["--device", "cuda:0"] if not torch.cuda.is_available() else ["--device", "tpu"], "--device"),
])
def test_command_bad_settings_write_nothing(tmp_path, gpt2_dir, text_dir, argv, message):
    with pytest.raises(InputError, match=message):
        _run(gpt2_dir, "--data", text_dir, "--out", tmp_path / "out", "--batch", 4, "--seq", 16, *argv)
    assert not (tmp_path / "out").exists()


def test_command_needs_a_model_and_data(tmp_path, gpt2_dir):
    with pytest.raises(InputError, match="no config.json"):
        _run(tmp_path, "--data", tmp_path, "--out", tmp_path / "out")
    with pytest.raises(InputError, match="no such file"):
        _run(gpt2_dir, "--data", tmp_path / "missing", "--out", tmp_path / "out")


def test_data_without_a_tokenizer_is_bytes_modulo_the_vocabulary_split_by_file(gpt2_dir, text_dir):
    data = command.read_data(text_dir, gpt2_dir, 64, 0.25)
    last = np.frombuffer((text_dir / "doc3.py").read_bytes(), dtype=np.uint8).astype(np.int64) % 64
    np.testing.assert_array_equal(data.val, last)
    assert len(data.train) + len(data.val) == sum(len(p.read_bytes()) for p in text_dir.iterdir())
    assert data.train.max() < 64 and data.train.min() >= 0


def test_command_writes_nothing_when_the_export_does_not_verify(tmp_path, gpt2_dir, text_dir, monkeypatch):
    from normfold.errors import VerificationError

    folded = fold.fold

    def broken_fold(model):
        ln_free = folded(model)
        with torch.no_grad():
            ln_free.lm_head.bias.add_(0.5)  # a wrong fold: the export no longer computes the fine-tuned model
        return ln_free

    monkeypatch.setattr(fold, "fold", broken_fold)
    with pytest.raises(VerificationError, match="differs from the fine-tuned model"):
        _run(gpt2_dir, "--data", text_dir, "--out", tmp_path / "out", "--steps", 7, "--batch", 2, "--seq", 8)
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out*"))
