"""Two gloo processes under torchrun give the losses of one process on the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ddp_worker import train

STEPS = 9


@pytest.mark.timeout(300)
def test_two_gloo_processes_match_one_process(tmp_path):
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    out = tmp_path / "ddp.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    worker = Path(__file__).with_name("ddp_worker.py")
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(worker),
         str(out), str(STEPS)],
        env=env, capture_output=True, text=True, timeout=280,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    ddp = json.loads(out.read_text())
    assert ddp["world"] == 2 and ddp["fake"] == 7
    single, _trainer = train(STEPS)
    ddp_ce = [r["ce"] for r in ddp["history"]["train"]]
    single_ce = [r["ce"] for r in single["train"]]
    assert len(ddp_ce) == len(single_ce) == STEPS
    assert ddp_ce[-1] < ddp_ce[0]
    # each rank trained on its own half of the batch: rank 0's local loss is not the global one
    assert all(abs(r["local_ce"] - r["ce"]) > 1e-4 for r in ddp["history"]["train"])
    assert all(r["local_ce"] == r["ce"] for r in single["train"])
    # same global batch, gradients averaged over ranks: equal up to the order of float sums
    assert ddp_ce == pytest.approx(single_ce, rel=1e-5, abs=1e-6)
    assert [e["val_ce"] for e in ddp["history"]["evals"]] == pytest.approx(
        [e["val_ce"] for e in single["evals"]], rel=1e-5)
    assert [r["removed"] for r in ddp["history"]["train"]] == [r["removed"] for r in single["train"]]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_command_under_torchrun_writes_once(tmp_path):
    from finetune_helpers import tiny_gpt2

    tiny_gpt2().save_pretrained(tmp_path / "gpt2")
    (tmp_path / "text").mkdir()
    for i in range(4):
        (tmp_path / "text" / f"d{i}.txt").write_text(" ".join(["a", "bb", "ccc\n"] * (200 + 50 * i)))
    script = tmp_path / "cmd.py"
    script.write_text(
        "import argparse, sys\nfrom normfold import remove_layernorm_command as c\n"
        "p = argparse.ArgumentParser(); c.add_parser(p.add_subparsers(dest='command'))\n"
        "sys.exit(c.run(p.parse_args(['remove-layernorm', *sys.argv[1:]])))\n")
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
         str(tmp_path / "gpt2"), "--data", str(tmp_path / "text"), "--out", str(tmp_path / "out"),
         "--steps", "8", "--batch", "4", "--seq", "16"],
        env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=280,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["world_size"] == 2 and report["onnx_verification"]["passed"]
