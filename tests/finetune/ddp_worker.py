"""Run under torchrun by test_ddp.py: fine-tunes the tiny GPT-2 and writes rank 0's history as JSON.

    torchrun --standalone --nproc_per_node N ddp_worker.py OUT.json STEPS
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from finetune_helpers import tiny_data, tiny_gpt2  # noqa: E402

from normfold.finetune import gpt2  # noqa: E402
from normfold.finetune.schedule import Recipe, RemovalSchedule  # noqa: E402
from normfold.finetune.trainer import Trainer, TrainConfig, init_from_env  # noqa: E402

SCHEDULE = RemovalSchedule(start=1, gap_mlp=1, gap_qk=1, gap_v=1)


def train(steps: int) -> tuple[dict, Trainer]:
    """The run both sides compare: global batch 8, every norm removed by step 7."""
    model = tiny_gpt2()
    gpt2.install(model)
    config = TrainConfig(steps=steps, global_batch=8, seq=16, seed=11, schedule=SCHEDULE, eval_every=4,
                         eval_batches=2, eval_batch=4, calibration_batches=2, calibration_batch=4,
                         recipe=Recipe(lr_max=3e-3, lr_min=1e-3, warmup=2))
    trainer = Trainer(model, tiny_data(), config)
    return asdict(trainer.run()), trainer


def main() -> int:
    torch.set_num_threads(1)
    out, steps = Path(sys.argv[1]), int(sys.argv[2])
    rank, world = init_from_env()
    history, trainer = train(steps)
    if rank == 0:
        out.write_text(json.dumps({"world": world, "history": history,
                                   "fake": sum(n.is_fake for n in trainer.norms.values())}))
    torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
