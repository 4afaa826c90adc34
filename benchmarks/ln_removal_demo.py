"""LayerNorm removal on a GPT-2 trained here: validation cross-entropy with and without LN.

Trains a small Pre-LN GPT-2 (transformers, from a config, seeded) from scratch on the Python standard
library's source (byte-level, validation held out by file: normfold.models.lm_data), then compares
    (a) the trained model,
    (b) every LN replaced at once by FakeLN with calibrated scales, no fine-tuning,
    (c) LN removed while fine-tuning (normfold.finetune, the published schedule scaled down),
    (d) the control: fine-tuned with LN, same recipe and steps,
and folds (c) into a model with no normalization at all, exports it to ONNX and evaluates it on
onnxruntime. Writes benchmarks/results/ln_removal.md (table), ln_removal.png (loss curves) and
ln_removal.json (raw numbers).

    python benchmarks/ln_removal_demo.py            # the full run (~20 min on one busy CPU core)
    python benchmarks/ln_removal_demo.py --quick    # a smoke run in about a minute
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.nn import functional as F

from normfold.finetune import export, fold, gpt2
from normfold.finetune.calibration import calibrate
from normfold.finetune.schedule import Recipe, RemovalSchedule
from normfold.finetune.trainer import Trainer, TrainConfig, validation_ce
from normfold.models.lm_data import VOCAB, stdlib_bytes

RESULTS = Path(__file__).resolve().parent / "results"


def build_model(width: int, layers: int, heads: int, seq: int, seed: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=VOCAB, n_positions=seq, n_embd=width, n_layer=layers, n_head=heads,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
                        attn_implementation="eager")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return GPT2LMHeadModel(config)


def pretrain(model, data, args) -> list[float]:
    """Plain next-token training from scratch (AdamW, warmup + cosine); returns the per-step losses."""
    recipe = Recipe(lr_max=args.pretrain_lr, lr_min=args.pretrain_lr / 10, warmup=100, weight_decay=0.1)
    optimizer = recipe.optimizer(model)
    model.train()
    losses = []
    for step in range(args.pretrain_steps):
        for group in optimizer.param_groups:
            group["lr"] = recipe.lr(step, args.pretrain_steps)
        inputs, targets = data.train_batch(step, args.batch, args.seq, seed=1000 + args.seed)
        loss = F.cross_entropy(model(inputs).logits.flatten(0, 1), targets.flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
        if step % 100 == 0:
            print(f"pretrain step {step}: loss {loss:.4f}", flush=True)
    return losses


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--pretrain-steps", type=int, default=2000)
    parser.add_argument("--pretrain-lr", type=float, default=2e-3)
    parser.add_argument("--finetune-steps", type=int, default=500)
    parser.add_argument("--lr-max", type=float, default=6e-4)
    parser.add_argument("--lr-min", type=float, default=3e-4)
    parser.add_argument("--eval-batches", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke run")
    args = parser.parse_args(argv)
    if args.quick:
        args.width, args.layers, args.seq, args.batch = 32, 2, 32, 8
        args.pretrain_steps, args.finetune_steps, args.eval_batches = 60, 40, 4
    torch.set_num_threads(args.threads)
    began = time.time()
    data = stdlib_bytes()
    validation = data.val_batches(args.eval_batches, args.batch, args.seq)

    model = build_model(args.width, args.layers, args.heads, args.seq, args.seed)
    pretrain_losses = pretrain(model, data, args)
    results = {"a_trained": validation_ce(model, validation)}
    print(f"(a) trained: {results['a_trained']:.4f}", flush=True)

    at_once = copy.deepcopy(model)
    gpt2.install(at_once)
    norms = gpt2.norm_modules(at_once)
    calibrate(at_once, data.calibration_batches(4, args.batch, args.seq), norms)
    for norm in norms.values():
        norm.make_fake()
    results["b_removed_no_finetune"] = validation_ce(at_once, validation)
    print(f"(b) FakeLN, no fine-tuning: {results['b_removed_no_finetune']:.4f}", flush=True)

    recipe = Recipe(lr_max=args.lr_max, lr_min=args.lr_min, warmup=max(1, args.finetune_steps * 25 // 300))
    schedule = RemovalSchedule.scaled(args.finetune_steps, args.layers)
    runs = {}
    for key, remove in (("c_removed_finetuned", True), ("d_control_finetuned_with_ln", False)):
        tuned = copy.deepcopy(model)
        gpt2.install(tuned)
        config = TrainConfig(steps=args.finetune_steps, global_batch=args.batch, seq=args.seq, seed=args.seed + 1,
                             remove=remove, recipe=recipe, schedule=schedule, eval_every=max(1, args.finetune_steps // 10),
                             eval_batches=args.eval_batches, eval_batch=args.batch, calibration_batch=args.batch)
        trainer = Trainer(tuned, data, config)
        runs[key] = (tuned, trainer.run(), trainer)
        results[key] = runs[key][1].evals[-1]["val_ce"]
        print(f"({key[0]}) {key}: {results[key]:.4f}", flush=True)

    tuned, history, trainer = runs["c_removed_finetuned"]
    ln_free = fold.fold(tuned)
    results["c_folded_torch"] = validation_ce(ln_free, validation)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ln_free.onnx"
        onnx_model = export.export_onnx(ln_free, path, batch=args.batch, seq=args.seq)
        results["c_onnx_onnxruntime"] = export.onnx_cross_entropy(path, validation)
        check = export.verify_onnx(tuned, path, validation[0][0])
        norm_ops = export.norm_ops(onnx_model)
        ops = sorted({node.op_type for node in onnx_model.graph.node})
    results["gap_c_minus_d"] = results["c_removed_finetuned"] - results["d_control_finetuned_with_ln"]
    meta = {
        "model": f"GPT-2 (transformers), width {args.width}, {args.layers} layers, {args.heads} heads, "
                 f"context {args.seq}, vocab {VOCAB} (bytes)",
        "tokens_pretrain": args.pretrain_steps * args.batch * args.seq,
        "tokens_finetune": args.finetune_steps * args.batch * args.seq,
        "validation_tokens": args.eval_batches * args.batch * args.seq,
        "schedule": {**schedule.to_dict(), "removal_steps": trainer.removal},
        "recipe": recipe.to_dict(),
        "onnx_vs_torch": {"passed": check.passed, "max_abs_error": check.max_abs_error, "rtol": check.rtol,
                          "atol": check.atol},
        "onnx_norm_ops": norm_ops,
        "onnx_op_types": ops,
        "threads": args.threads,
        "seconds": round(time.time() - began, 1),
        "args": {k: str(v) for k, v in vars(args).items()},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "ln_removal.json").write_text(json.dumps({"results": results, "meta": meta}, indent=2) + "\n")
    (args.out / "ln_removal.md").write_text(table(results, meta))
    plot(args.out / "ln_removal.png", pretrain_losses, runs, trainer.removal)
    print(table(results, meta))
    return 0 if check.passed and not norm_ops else 1


def table(results: dict, meta: dict) -> str:
    r = results
    check = meta["onnx_vs_torch"]
    lines = [
        "# LayerNorm removal on a GPT-2 trained here",
        "",
        f"{meta['model']}; trained from scratch on {meta['tokens_pretrain'] / 1e6:.1f}M tokens of the Python standard",
        f"library's source, fine-tuned on {meta['tokens_finetune'] / 1e6:.2f}M more; validation: "
        f"{meta['validation_tokens']:,} tokens of held-out files.",
        f"Produced by `benchmarks/ln_removal_demo.py` in {meta['seconds'] / 60:.1f} min ({meta['threads']} CPU thread).",
        "",
        "| model | validation CE (nats/byte) |",
        "|---|---|",
        f"| (a) trained, with LN | {r['a_trained']:.4f} |",
        f"| (b) LN removed, no fine-tuning (FakeLN, calibrated scales) | {r['b_removed_no_finetune']:.4f} |",
        f"| (c) LN removed with fine-tuning | {r['c_removed_finetuned']:.4f} |",
        f"| (d) control: fine-tuned with LN, same steps | {r['d_control_finetuned_with_ln']:.4f} |",
        f"| (c) - (d) | {r['gap_c_minus_d']:+.4f} |",
        f"| (c) folded, no norm module (torch) | {r['c_folded_torch']:.4f} |",
        f"| (c) folded, exported ONNX on onnxruntime | {r['c_onnx_onnxruntime']:.4f} |",
        "",
        f"The exported LN-free ONNX holds no normalization op ({meta['onnx_norm_ops'] or 'none found'}); "
        f"its logits match the fine-tuned FakeLN torch model: {'passed' if check['passed'] else 'FAILED'}, "
        f"max abs error {check['max_abs_error']:.2e} (rtol {check['rtol']:g}, atol {check['atol']:.2e}).",
        f"Removal steps: {meta['schedule']['removal_steps']}.",
        "",
    ]
    return "\n".join(lines)


def plot(path: Path, pretrain_losses: list[float], runs: dict, removal: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    left.plot(_smooth(pretrain_losses), color="black")
    left.set(title="pre-training (train CE, smoothed)", xlabel="step", ylabel="nats/byte")
    colours = {"c_removed_finetuned": "tab:red", "d_control_finetuned_with_ln": "tab:blue"}
    labels = {"c_removed_finetuned": "(c) LN removed", "d_control_finetuned_with_ln": "(d) with LN"}
    for key, (_model, history, _trainer) in runs.items():
        right.plot(_smooth([r["ce"] for r in history.train]), color=colours[key], alpha=0.6, label=f"{labels[key]} train")
        right.plot([e["step"] for e in history.evals], [e["val_ce"] for e in history.evals], "o-", color=colours[key],
                   label=f"{labels[key]} validation")
    stages = {}
    for name, step in removal.items():
        stage = "final" if name.endswith("ln_f") else name.rsplit(".", 1)[-1].replace("ln_2", "mlp").replace("norm_", "")
        stages.setdefault(stage, []).append(step)
    for stage, steps in stages.items():
        right.axvspan(min(steps), max(steps) + 0.5, alpha=0.12, color="grey")
        right.text(min(steps), right.get_ylim()[1], stage, va="top", fontsize=8)
    right.set(title="fine-tuning (shaded: LN removal stages)", xlabel="step", ylabel="nats/byte")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _smooth(values: list[float], width: int = 20) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= width:
            total -= values[i - width]
        out.append(total / min(i + 1, width))
    return out


if __name__ == "__main__":
    sys.exit(main())
