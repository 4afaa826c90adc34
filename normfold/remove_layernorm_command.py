"""`normfold remove-layernorm MODEL_DIR --data PATH --out OUT_DIR`: a LayerNorm-free GPT-2 by fine-tuning.

Loads a local transformers GPT-2 directory (config.json + model.safetensors, no hub access), fine-tunes it
on local text while its LayerNorms become FakeLN on the published schedule (normfold.finetune), folds
them away and writes OUT_DIR with:
    config.json, model.safetensors   the LN-free checkpoint (normfold.finetune.fold.load_ln_free loads it)
    model.onnx                       its ONNX export (opset 18), with no normalization op
    report.json                      validation cross-entropy before / after, removal steps, verification
The ONNX model is verified on onnxruntime against the fine-tuned torch model (fp32 fold tolerances)
before anything is written; OUT_DIR appears whole or not at all. torch is imported only when it runs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from normfold.errors import InputError, VerificationError

TOKENIZER_FILES = ("tokenizer.json", "vocab.json")


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Adds the remove-layernorm subcommand to `subparsers` (from ArgumentParser.add_subparsers)."""
    p = subparsers.add_parser(
        "remove-layernorm", help="fine-tune a local GPT-2 without LayerNorm and export it (approximate)",
        description="Removes every LayerNorm of a local transformers GPT-2 by calibrated fine-tuning "
                    "(FakeLN, published schedule), folds them away and writes the checkpoint and its ONNX export.")
    p.add_argument("model_dir", type=Path, metavar="MODEL_DIR",
                   help="transformers GPT-2 directory (config.json + weights)")
    p.add_argument("--data", type=Path, required=True, metavar="PATH", help="a text file or a directory of them")
    p.add_argument("--out", type=Path, required=True, metavar="OUT_DIR", help="output directory (must not exist)")
    p.add_argument("--force", action="store_true", help="replace an existing OUT_DIR")
    p.add_argument("--steps", type=int, default=300, help="fine-tuning steps (default 300)")
    p.add_argument("--batch", type=int, default=8, help="global batch, in sequences (default 8)")
    p.add_argument("--seq", type=int, help="sequence length (default: min(128, the model's context))")
    p.add_argument("--lr-max", type=float, default=6e-4)
    p.add_argument("--lr-min", type=float, default=3e-4)
    p.add_argument("--warmup", type=int, help="warmup steps (default: 25 / 300 of the run)")
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--aux-weight", type=float, default=0.1, help="weight of the final norm's std loss")
    p.add_argument("--removal-start", type=int, help="first removal step (default: the published one, scaled)")
    p.add_argument("--gaps", metavar="MLP,QK,V", help="steps between removals per stage (default: 2,2,3 scaled)")
    p.add_argument("--position0", choices=["separate", "shared"], default="separate",
                   help="position 0 keeps its own calibrated scale (default) or shares the others'")
    p.add_argument("--val-fraction", type=float, default=0.1, help="held-out share of the data (by file)")
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--checkpoint-dir", type=Path, help="write resumable checkpoints here")
    p.add_argument("--checkpoint-every", type=int, default=50)
    p.add_argument("--resume", type=Path, metavar="CHECKPOINT", help="resume from a checkpoint directory")
    p.add_argument("--device", default="auto",
                   help="cpu, cuda, cuda:N or auto (default: this rank's GPU when there is one, else cpu)")
    p.add_argument("--seed", type=int, default=0)
    return p


def run(args: argparse.Namespace) -> int:
    """Runs the command; InputError (exit 2) on bad input, VerificationError (exit 1) if the export differs."""
    out = _check_paths(args)
    try:
        import transformers  # noqa: F401

        from normfold.finetune import export, fold, gpt2
        from normfold.finetune.schedule import Recipe, RemovalSchedule
        from normfold.finetune.trainer import Trainer, TrainConfig, init_from_env, validation_ce
    except ImportError as exc:
        raise InputError(f"remove-layernorm needs torch, safetensors and transformers: {exc}") from None
    model = load_gpt2(args.model_dir)
    seq = args.seq or min(128, model.config.n_positions)
    if not 2 <= seq <= model.config.n_positions:
        raise InputError(f"--seq {seq} must be between 2 and the model's context {model.config.n_positions}")
    data = read_data(args.data, args.model_dir, model.config.vocab_size, args.val_fraction)
    layers = model.config.n_layer
    try:
        schedule = _schedule(args, layers, RemovalSchedule)
        recipe = Recipe(lr_max=args.lr_max, lr_min=args.lr_min, weight_decay=args.weight_decay,
                        aux_weight=args.aux_weight,
                        warmup=args.warmup if args.warmup is not None else max(1, round(args.steps * 25 / 300)))
        config = TrainConfig(steps=args.steps, global_batch=args.batch, seq=seq, seed=args.seed,
                             position0=args.position0, recipe=recipe, schedule=schedule, eval_every=args.eval_every,
                             eval_batch=args.batch, calibration_batch=args.batch,
                             checkpoint_every=args.checkpoint_every if args.checkpoint_dir else 0)
        rank, world = init_from_env()
        model.to(_device(args.device))
        gpt2.install(model)
        trainer = Trainer(model, data, config, checkpoint_dir=args.checkpoint_dir)
    except ValueError as exc:
        raise InputError(str(exc)) from None
    if args.resume is not None and not (args.resume / "state.json").is_file():
        raise InputError(f"{args.resume}: not a checkpoint directory (no state.json)")
    history = trainer.run(resume=args.resume)
    model.cpu()
    ln_free = fold.fold(model)
    if world > 1:
        import torch.distributed

        torch.distributed.destroy_process_group()
    if rank != 0:
        return 0
    batch, _ = trainer.validation[0]
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.", dir=out.parent) as tmp:
        staging = Path(tmp) / "out"
        staging.mkdir()
        onnx_model = export.export_onnx(ln_free, staging / "model.onnx", batch=batch.shape[0], seq=seq)
        check = export.verify_onnx(model, staging / "model.onnx", batch)
        if not check.passed:
            raise VerificationError(f"the LN-free ONNX export differs from the fine-tuned model: {check.message}")
        onnx_norms = export.norm_ops(onnx_model)
        if onnx_norms:
            raise VerificationError(f"the LN-free ONNX export still holds normalization ops: {onnx_norms}")
        fold.save_ln_free(ln_free, staging)
        report = {
            "validation_ce_before": history.evals[0]["val_ce"],
            "validation_ce_after": validation_ce(ln_free, trainer.validation),
            "evals": history.evals, "removal_steps": trainer.removal, "settings": config.to_dict(),
            "world_size": world,
            "onnx_verification": {"passed": check.passed, "max_abs_error": check.max_abs_error,
                                  "rtol": check.rtol, "atol": check.atol},
        }
        (staging / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        _publish(staging, out, force=args.force)
    print(f"LayerNorm removed: validation cross-entropy {report['validation_ce_before']:.4f} -> "
          f"{report['validation_ce_after']:.4f} nats/token after {args.steps} steps; ONNX verified "
          f"(max abs error {check.max_abs_error:.2e}); wrote {out}", file=sys.stderr)
    return 0


def load_gpt2(model_dir: Path):
    """GPT2LMHeadModel from a local directory, dropout off; InputError for anything else."""
    from transformers import AutoConfig, GPT2LMHeadModel

    try:
        config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise InputError(f"{model_dir}: cannot read the transformers config: {str(exc).splitlines()[0]}") from None
    if config.model_type != "gpt2":
        raise InputError(f"{model_dir}: a {config.model_type!r} model; remove-layernorm supports GPT-2 only")
    for key in ("resid_pdrop", "embd_pdrop", "attn_pdrop"):
        setattr(config, key, 0.0)
    try:
        model = GPT2LMHeadModel.from_pretrained(model_dir, config=config, local_files_only=True,
                                                attn_implementation="eager")
    except (OSError, ValueError, RuntimeError) as exc:
        raise InputError(f"{model_dir}: cannot load the GPT-2 weights: {str(exc).splitlines()[0]}") from None
    return model.float()


def read_data(path: Path, model_dir: Path, vocab: int, val_fraction: float):
    """TokenData from a text file or every file under a directory (sorted), split by file.

    With a tokenizer in MODEL_DIR (tokenizer.json or vocab.json) the text is tokenized by it; otherwise
    tokens are bytes modulo the vocabulary size.
    """
    import numpy as np

    from normfold.finetune.data import byte_ids, split_documents

    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file() and not
                                                 any(part.startswith(".") for part in p.relative_to(path).parts))
    if not files:
        raise InputError(f"{path}: no data files")
    if not 0 < val_fraction < 1:
        raise InputError(f"--val-fraction {val_fraction} must be between 0 and 1")
    tokenizer = None
    if any((model_dir / name).is_file() for name in TOKENIZER_FILES):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    documents = []
    for file in files:
        raw = file.read_bytes()
        if tokenizer is None:
            documents.append(byte_ids(raw, vocab))
        else:
            documents.append(np.asarray(tokenizer(raw.decode("utf-8", errors="replace"))["input_ids"], dtype=np.int64))
    documents = [d for d in documents if len(d)]
    if not documents:
        raise InputError(f"{path}: the data files are empty")
    return split_documents(documents, val_fraction)


def _check_paths(args: argparse.Namespace) -> Path:
    if not (args.model_dir / "config.json").is_file():
        raise InputError(f"{args.model_dir}: not a transformers model directory (no config.json)")
    if not args.data.exists():
        raise InputError(f"{args.data}: no such file or directory")
    out = args.out.absolute()
    if out.exists() and not args.force:
        raise InputError(f"{args.out} exists; pass --force to replace it")
    if out.exists() and not out.is_dir():
        raise InputError(f"{args.out} exists and is not a directory")
    if not out.parent.is_dir():
        raise InputError(f"{args.out}: directory {out.parent} does not exist")
    if args.steps < 1 or args.batch < 1:
        raise InputError("--steps and --batch must be at least 1")
    return out


def _device(name: str):
    import torch

    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise InputError(f"--device {name!r}: not a device (cpu, cuda, cuda:N or auto)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {name}: CUDA is not available")
    return device


def _schedule(args: argparse.Namespace, layers: int, schedule_cls):
    if args.removal_start is None and args.gaps is None:
        return None  # scaled from the published one by the trainer
    default = schedule_cls.scaled(args.steps, layers)
    gaps = (default.gap_mlp, default.gap_qk, default.gap_v)
    if args.gaps is not None:
        try:
            gaps = tuple(int(g) for g in args.gaps.split(","))
        except ValueError:
            gaps = ()
        if len(gaps) != 3 or min(gaps) < 1:
            raise InputError(f"--gaps {args.gaps!r}: expected three positive integers MLP,QK,V")
    start = default.start if args.removal_start is None else args.removal_start
    return schedule_cls(start=start, gap_mlp=gaps[0], gap_qk=gaps[1], gap_v=gaps[2])


def _publish(staging: Path, out: Path, *, force: bool) -> None:
    """Moves the finished staging directory to `out` (an existing one is replaced only with force)."""
    old = None
    if out.exists():
        if not force:
            raise InputError(f"{out} exists; pass --force to replace it")
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    os.replace(staging, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
