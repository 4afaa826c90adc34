"""The fine-tuning loop of LayerNorm removal: one process, or DistributedDataParallel under torchrun.

Each step: the norms the schedule names become FakeLN (recalibrated first on fixed calibration batches,
identical on every rank), the learning rate follows the recipe, every rank runs its share of the
step's global batch (data.TokenData.train_batch) and DDP averages the gradients, so the update equals
the single-process one on the same global batch. Periodic evaluation on fixed validation batches.

Checkpoints are directories: model.safetensors (weights and every norm's scale and mode),
optimizer.safetensors (AdamW moments, by parameter name) and state.json (next step, history, settings).
Batches depend only on (seed, step) and the RNG is reseeded every step, so a resumed run reproduces
the uninterrupted one. Nothing is unpickled.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch import distributed as dist
from torch.nn import functional as F

from normfold.finetune import gpt2
from normfold.finetune.calibration import calibrate
from normfold.finetune.data import TokenData
from normfold.finetune.schedule import Recipe, RemovalSchedule, aux_loss


@dataclass
class TrainConfig:
    """Fine-tuning settings. remove=False is the control run: same recipe, LayerNorms kept."""

    steps: int = 300
    global_batch: int = 16
    seq: int = 128
    seed: int = 0
    remove: bool = True
    position0: str = "separate"
    recipe: Recipe = field(default_factory=Recipe)
    schedule: RemovalSchedule | None = None
    """None: RemovalSchedule.scaled(steps, layers)."""
    eval_every: int = 50
    eval_batches: int = 8
    eval_batch: int = 16
    calibration_batches: int = 4
    calibration_batch: int = 16
    checkpoint_every: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class History:
    """Per-step training records and evaluations ({"step", "val_ce"}, step = updates done)."""

    train: list[dict] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)


def distributed() -> tuple[int, int]:
    """(rank, world size); (0, 1) without an initialised process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_from_env() -> tuple[int, int]:
    """Initialises the process group under torchrun (WORLD_SIZE > 1): nccl on GPU, gloo on CPU."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return distributed()


class Trainer:
    """Fine-tunes a GPT-2 whose norms were made switchable (gpt2.install), removing them on schedule."""

    def __init__(self, model: nn.Module, data: TokenData, config: TrainConfig, *,
                 checkpoint_dir: str | os.PathLike | None = None) -> None:
        data.check(config.seq)
        self.model, self.data, self.config = model, data, config
        self.sites = gpt2.sites(model)
        self.norms = gpt2.norm_modules(model)
        self.final = self.norms["transformer.ln_f"]
        self.schedule = None
        self.removal = {}
        if config.remove:
            self.schedule = config.schedule or RemovalSchedule.scaled(config.steps, len(model.transformer.h))
            self.removal = self.schedule.steps_for(self.sites)
        late = {name: when for name, when in self.removal.items() if when >= config.steps}
        if late:
            name, when = next(iter(late.items()))
            raise ValueError(f"the removal schedule removes {name} at step {when}, after the last step "
                             f"({config.steps - 1}): give more steps or shorter gaps")
        self.rank, self.world = distributed()
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self.optimizer = config.recipe.optimizer(model)
        self.history = History()
        self.step = 0
        self.calibration = data.calibration_batches(config.calibration_batches, config.calibration_batch, config.seq)
        self.validation = data.val_batches(config.eval_batches, config.eval_batch, config.seq)
        self.device = next(model.parameters()).device
        if self.world > 1:  # buffers (norm scales) agree on every rank
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp = nn.parallel.DistributedDataParallel(model, device_ids=ids)
        else:
            self.ddp = model

    # ----------------------------------------------------------------------------------- the loop

    def run(self, *, resume: str | os.PathLike | None = None, stop_after: int | None = None) -> History:
        """Trains to config.steps (or stops once `stop_after` steps are done); returns the history."""
        if resume is not None:
            self.load(resume)
        else:
            calibrate(self.model, self.calibration, self.norms, position0=self.config.position0)
            self.history.evals.append({"step": 0, "val_ce": self.evaluate()})
        last = self.config.steps if stop_after is None else min(stop_after, self.config.steps)
        bar = _progress(self.step, self.config.steps, enabled=self.rank == 0)
        while self.step < last:
            record = self.train_step()
            bar.update(1)
            bar.set_postfix(loss=f"{record['ce']:.4f}", fake=record["fake"])
            done = self.step
            if done == self.config.steps or (self.config.eval_every and done % self.config.eval_every == 0):
                self.history.evals.append({"step": done, "val_ce": self.evaluate()})
            if self.checkpoint_dir is not None and self.config.checkpoint_every and (
                done % self.config.checkpoint_every == 0 or done == self.config.steps
            ):
                self.save(self.checkpoint_dir / f"step-{done:06d}")
        bar.close()
        return self.history

    def train_step(self) -> dict:
        """One optimisation step (removing the norms due at this step first); returns its record."""
        step, config = self.step, self.config
        due = [name for name, when in self.removal.items() if when == step]
        if due:
            chosen = {name: self.norms[name] for name in due}
            calibrate(self.model, self.calibration, chosen, position0=config.position0)
            for norm in chosen.values():
                norm.make_fake()
        lr = config.recipe.lr(step, config.steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        torch.manual_seed(config.seed * 1_000_003 + step * 1_009 + self.rank)
        inputs, targets = self.data.train_batch(step, config.global_batch, config.seq, seed=config.seed,
                                                rank=self.rank, world=self.world)
        inputs, targets = inputs.to(self.device), targets.to(self.device)
        self.model.train()
        captured = []
        handle = self.final.register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
        try:
            logits = _logits(self.ddp(inputs))
        finally:
            handle.remove()
        ce = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        aux = aux_loss(captured[0], self.final.sigma, self.final.eps)
        loss = ce + config.recipe.aux_weight * aux
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.recipe.grad_clip:
            nn.utils.clip_grad_norm_(self.model.parameters(), config.recipe.grad_clip)
        self.optimizer.step()
        ce_value, aux_value = _mean_over_ranks(torch.stack([ce.detach(), aux.detach()]), self.world).tolist()
        record = {"step": step, "lr": lr, "ce": ce_value, "aux": aux_value, "local_ce": float(ce.detach()),
                  "removed": due, "fake": sum(norm.is_fake for norm in self.norms.values())}
        self.history.train.append(record)
        self.step += 1
        return record

    def evaluate(self) -> float:
        """Mean cross-entropy (nats per token) over the fixed validation batches."""
        return validation_ce(self.model, self.validation)

    # ----------------------------------------------------------------------------------- checkpoints

    def save(self, directory: str | os.PathLike) -> Path:
        """Writes a checkpoint directory atomically (rank 0 writes; every rank waits)."""
        from safetensors.torch import save_file, save_model

        directory = Path(directory)
        if self.rank == 0:
            tmp = directory.with_name(f".{directory.name}.tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            save_model(self.model, str(tmp / "model.safetensors"))
            save_file(self._optimizer_tensors(), str(tmp / "optimizer.safetensors"))
            state = {"step": self.step, "history": asdict(self.history), "config": self.config.to_dict(),
                     "removal": self.removal}
            (tmp / "state.json").write_text(json.dumps(state, indent=1) + "\n")
            shutil.rmtree(directory, ignore_errors=True)
            os.replace(tmp, directory)
        if self.world > 1:
            dist.barrier()
        return directory

    def load(self, directory: str | os.PathLike) -> None:
        """Restores weights, norm modes and scales, optimizer moments, step and history."""
        from safetensors.torch import load_file, load_model

        directory = Path(directory)
        state = json.loads((directory / "state.json").read_text())
        load_model(self.model, str(directory / "model.safetensors"))
        tensors = load_file(str(directory / "optimizer.safetensors"))
        for name, param in self.model.named_parameters():
            keys = [k for k in tensors if k.startswith(f"{name}::")]
            if keys:
                self.optimizer.state[param] = {k.split("::", 1)[1]: tensors[k] for k in keys}
        self.step = int(state["step"])
        self.history = History(**state["history"])

    def _optimizer_tensors(self) -> dict[str, torch.Tensor]:
        tensors = {}
        for name, param in self.model.named_parameters():
            for key, value in self.optimizer.state.get(param, {}).items():
                tensors[f"{name}::{key}"] = torch.as_tensor(value).detach().contiguous().clone()
        return tensors


@torch.no_grad()
def validation_ce(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Mean next-token cross-entropy (nats per token) of `model` over (inputs, targets) batches, in eval mode."""
    was_training = model.training
    model.eval()
    total = 0.0
    device = next(model.parameters()).device
    for inputs, targets in batches:
        logits = _logits(model(inputs.to(device)))
        total += float(F.cross_entropy(logits.flatten(0, 1).double(), targets.to(device).flatten()))
    model.train(was_training)
    return total / len(batches)


def latest_checkpoint(directory: str | os.PathLike) -> Path | None:
    """The newest step-NNNNNN checkpoint in `directory`, if any."""
    found = sorted(Path(directory).glob("step-[0-9]*"))
    return found[-1] if found else None


def _logits(output) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output.logits


def _mean_over_ranks(values: torch.Tensor, world: int) -> torch.Tensor:
    if world > 1:
        values = values.clone()
        dist.all_reduce(values)
        values /= world
    return values


def _progress(start: int, total: int, *, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, desc="fine-tuning", unit="step",
                disable=not (enabled and sys.stderr.isatty()))
