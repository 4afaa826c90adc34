"""The real removal: a GPT-2 whose every norm is FakeLN becomes a GPT-2 with no normalization at all.

FakeLN(x)_t = c_t / sigma_t * gamma + beta with c_t = x_t - mean(x_t) is linear in x, so
  1. the centring moves into the writers of the residual stream: the token and position embeddings
     and every branch's output projection are recentred along their output axis (foldmath.recentre),
     so the stream is zero-mean everywhere and c_t = x_t;
  2. gamma / sigma and beta fold into each reader (foldmath.fakeln_reader): c_attn (q,k columns with
     the q/k norm, v columns with the v norm), the MLP's c_fc, and the LM head (untied from the
     embedding, which was recentred, and given a bias);
  3. position 0's own scale becomes a constant factor sigma / sigma0 on the reader's output row 0,
     y_0 = (x_0 W') * r + b' (absent when sigma0 == sigma).
The result computes the FakeLN model's function up to rounding; its ONNX export holds no norm op.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from normfold import foldmath
from normfold.errors import InputError
from normfold.finetune import gpt2
from normfold.finetune.fakeln import SwitchableNorm

MARKER = "normfold_layernorm_free"
"""config.json key of an LN-free checkpoint."""


class FoldedLinear(nn.Module):
    """Replaces a linear reader of FakeLN with y = (x W) * r + b, r scaling position 0's row only."""

    def __init__(self, in_features: int, out_features: int, *, position0: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(in_features, out_features))
        self.bias = nn.Parameter(torch.zeros(out_features))
        self.register_buffer("position0_scale", torch.ones(out_features) if position0 else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x @ self.weight
        if self.position0_scale is not None:
            y = torch.cat([y[..., :1, :] * self.position0_scale, y[..., 1:, :]], dim=-2)
        return y + self.bias


@torch.no_grad()
def fold(model: nn.Module) -> nn.Module:
    """A copy of `model` (every norm FakeLN, see gpt2.install) with no normalization module left."""
    norms = gpt2.norm_modules(model)
    real = [name for name, norm in norms.items() if not norm.is_fake]
    if real:
        raise InputError(f"cannot remove the LayerNorms: {len(real)} are still real ({real[0]}, ...); "
                         "fine-tune until every norm is FakeLN")
    out = copy.deepcopy(model)
    transformer = out.transformer
    out.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone())
    out.config.tie_word_embeddings = False
    _recentre_(transformer.wte.weight, axis=1)
    _recentre_(transformer.wpe.weight, axis=1)
    for block in transformer.h:
        for proj in (block.attn.c_proj, block.mlp.c_proj):
            _recentre_(proj.weight, axis=1)
            _recentre_(proj.bias, axis=0)
        split = block.attn.c_attn
        width = split.linear.weight.shape[0]
        columns = [(split.norm_qk, slice(0, 2 * width)), (split.norm_v, slice(2 * width, 3 * width))]
        block.attn.c_attn = _folded(split.linear.weight, split.linear.bias, columns)
        block.mlp.c_fc = _folded(block.mlp.c_fc.weight, block.mlp.c_fc.bias, [(block.ln_2, slice(None))])
        block.ln_1 = nn.Identity()
        block.ln_2 = nn.Identity()
    head = model.lm_head.weight.detach().T
    out.lm_head = _folded(head, None, [(transformer.ln_f, slice(None))])
    transformer.ln_f = nn.Identity()
    return out


def _folded(weight: torch.Tensor, bias: torch.Tensor | None,
            columns: list[tuple[SwitchableNorm, slice]]) -> FoldedLinear:
    """FoldedLinear for weight (in, out) whose output columns read the given FakeLNs."""
    w = weight.detach().double().cpu().numpy()
    b = None if bias is None else bias.detach().double().cpu().numpy()
    new_w, new_b, scale = np.empty_like(w), np.empty(w.shape[1]), np.ones(w.shape[1])
    for norm, cols in columns:
        gamma = norm.weight.detach().double().cpu().numpy()
        beta = None if norm.bias is None else norm.bias.detach().double().cpu().numpy()
        new_w[:, cols], new_b[cols] = foldmath.fakeln_reader(w[:, cols], None if b is None else b[cols], gamma, beta,
                                                             float(norm.sigma))
        scale[cols] = float(norm.sigma) / float(norm.sigma0)
    layer = FoldedLinear(*w.shape, position0=bool(np.any(scale != 1.0))).to(weight.device)
    dtype = weight.dtype
    layer.weight.copy_(torch.from_numpy(new_w).to(dtype))
    layer.bias.copy_(torch.from_numpy(new_b).to(dtype))
    if layer.position0_scale is not None:
        layer.position0_scale.copy_(torch.from_numpy(scale).to(dtype))
    return layer


def _recentre_(param: torch.Tensor, *, axis: int) -> None:
    recentred = foldmath.recentre(param.detach().double().cpu().numpy(), axis=axis)
    param.copy_(torch.from_numpy(recentred).to(param.device, param.dtype))


def has_norm_modules(model: nn.Module) -> bool:
    """Whether any LayerNorm, RMSNorm or switchable norm is left in `model`."""
    return any(isinstance(m, (nn.LayerNorm, nn.RMSNorm, SwitchableNorm)) for m in model.modules())


# --------------------------------------------------------------------------- checkpoints


def save_ln_free(model: nn.Module, directory: str | os.PathLike) -> None:
    """Writes config.json (marked LN-free) and model.safetensors into an existing `directory`."""
    from safetensors.torch import save_model

    directory = Path(directory)
    config = model.config.to_dict()
    config[MARKER] = {"position0_scaled": sorted(_position0_modules(model))}
    (directory / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    save_model(model, str(directory / "model.safetensors"))


def load_ln_free(directory: str | os.PathLike) -> nn.Module:
    """Loads a checkpoint written by save_ln_free (no hub access, no unpickling)."""
    from safetensors.torch import load_model
    from transformers import GPT2Config, GPT2LMHeadModel

    directory = Path(directory)
    raw = json.loads((directory / "config.json").read_text())
    if MARKER not in raw:
        raise InputError(f"{directory}: not an LN-free checkpoint written by normfold (no {MARKER} in config.json)")
    scaled = set(raw[MARKER]["position0_scaled"])
    config = GPT2Config.from_pretrained(directory, local_files_only=True)
    model = GPT2LMHeadModel(config)
    transformer = model.transformer
    width, vocab = config.n_embd, config.vocab_size
    for i, block in enumerate(transformer.h):
        prefix = f"transformer.h.{i}"
        hidden = block.mlp.c_fc.weight.shape[1]
        block.attn.c_attn = FoldedLinear(width, 3 * width, position0=f"{prefix}.attn.c_attn" in scaled)
        block.mlp.c_fc = FoldedLinear(width, hidden, position0=f"{prefix}.mlp.c_fc" in scaled)
        block.ln_1 = nn.Identity()
        block.ln_2 = nn.Identity()
    transformer.ln_f = nn.Identity()
    model.lm_head = FoldedLinear(width, vocab, position0="lm_head" in scaled)
    load_model(model, str(directory / "model.safetensors"))
    return model.eval()


def _position0_modules(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, FoldedLinear) and m.position0_scale is not None]
