"""The fine-tuning loop: each removal stage on schedule, learning, checkpoints and an exact resume."""

from __future__ import annotations

import json

import pytest
import torch

from finetune_helpers import tiny_data, tiny_gpt2
from normfold.finetune import gpt2
from normfold.finetune.schedule import Recipe, RemovalSchedule
from normfold.finetune.trainer import Trainer, TrainConfig, latest_checkpoint

SCHEDULE = RemovalSchedule(start=1, gap_mlp=1, gap_qk=1, gap_v=2)
"""2 layers: MLP norms at steps 1, 2; q/k at 3, 4; v at 5, 7; final at 9."""


def _trainer(steps=10, checkpoint_dir=None, **kwargs):
    model = tiny_gpt2()
    gpt2.install(model)
    config = TrainConfig(steps=steps, global_batch=4, seq=16, seed=5, schedule=SCHEDULE, eval_every=5,
                         eval_batches=2, eval_batch=4, calibration_batches=2, calibration_batch=4,
                         recipe=Recipe(lr_max=3e-3, lr_min=1e-3, warmup=2), **kwargs)
    return Trainer(model, tiny_data(), config, checkpoint_dir=checkpoint_dir)


def test_each_stage_is_removed_in_the_published_order():
    trainer = _trainer()
    trainer.run(stop_after=0)  # calibrates every norm, evaluates; no step yet
    expected = {1: ["transformer.h.0.ln_2"], 2: ["transformer.h.1.ln_2"],
                3: ["transformer.h.0.attn.c_attn.norm_qk"], 4: ["transformer.h.1.attn.c_attn.norm_qk"],
                5: ["transformer.h.0.attn.c_attn.norm_v"], 7: ["transformer.h.1.attn.c_attn.norm_v"],
                9: ["transformer.ln_f"]}
    fake = set()
    for step in range(10):
        record = trainer.train_step()
        assert record["removed"] == expected.get(step, [])
        fake |= set(record["removed"])
        assert {name for name, n in trainer.norms.items() if n.is_fake} == fake
        assert record["fake"] == len(fake)
    assert len(fake) == 7


def test_removal_recalibrates_the_norm_on_the_current_model():
    trainer = _trainer()
    trainer.run(stop_after=8)
    norm = trainer.norms["transformer.ln_f"]
    before = float(norm.sigma)
    trainer.train_step()  # step 8: nothing; step 9 removes ln_f after recalibrating it
    trainer.train_step()
    assert norm.is_fake and float(norm.sigma) != before


def test_control_run_keeps_every_norm_and_both_runs_learn():
    removed, control = _trainer(steps=30), _trainer(steps=30, remove=False)
    for trainer in (removed, control):
        history = trainer.run()
        assert history.evals[-1]["val_ce"] < history.evals[0]["val_ce"] - 0.3
        assert [e["step"] for e in history.evals] == [0, 5, 10, 15, 20, 25, 30]
    assert not any(n.is_fake for n in control.norms.values())
    assert all(n.is_fake for n in removed.norms.values())


def test_resume_from_a_checkpoint_gives_the_uninterrupted_losses(tmp_path):
    full = _trainer()
    expected = full.run()
    first = _trainer(checkpoint_dir=tmp_path, checkpoint_every=4)
    first.run(stop_after=6)  # checkpoint at step 4, then 2 more steps that the resumed run redoes
    checkpoint = latest_checkpoint(tmp_path)
    assert checkpoint.name == "step-000004"
    assert sorted(p.name for p in checkpoint.iterdir()) == ["model.safetensors", "optimizer.safetensors", "state.json"]
    assert json.loads((checkpoint / "state.json").read_text())["step"] == 4
    resumed = _trainer()
    history = resumed.run(resume=checkpoint)
    assert [r["ce"] for r in history.train] == [r["ce"] for r in expected.train]
    assert history.evals == expected.evals
    assert sum(n.is_fake for n in resumed.norms.values()) == 7
    final = full.model.state_dict()
    for name, value in resumed.model.state_dict().items():
        assert torch.equal(value, final[name]), name


def test_resume_without_the_optimizer_state_differs(tmp_path):
    """The resume test can fail: dropping the AdamW moments changes the losses."""
    expected = _trainer().run()
    _trainer(checkpoint_dir=tmp_path, checkpoint_every=4).run(stop_after=4)
    resumed = _trainer()
    resumed.load(latest_checkpoint(tmp_path))
    resumed.optimizer.state.clear()
    history = resumed.run()
    assert [r["ce"] for r in history.train][5:] != [r["ce"] for r in expected.train][5:]


def test_global_batch_must_split_evenly_over_ranks():
    with pytest.raises(ValueError, match="not divisible"):
        tiny_data().train_batch(0, 5, 16, world=2)
