"""Where the LayerNorms of a transformers GPT-2 are, and their switchable replacements.

install() rewires a GPT2LMHeadModel in place so every LN can be switched to FakeLN on its own:
    block.ln_1 -> Identity, block.attn.c_attn -> SplitQKV(norm_qk, norm_v, c_attn)   (stages "qk", "v")
    block.ln_2 -> SwitchableNorm                                                        (stage "mlp")
    transformer.ln_f -> SwitchableNorm                                                  (stage "final")
With every norm real the model computes exactly what it computed before.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from normfold.errors import InputError
from normfold.finetune.fakeln import SplitQKV, SwitchableNorm

STAGES = ("mlp", "qk", "v", "final")
"""The published removal order."""


@dataclass(frozen=True)
class NormSite:
    """One switchable norm: its module path, its stage and its layer (None for the final norm)."""

    name: str
    stage: str
    layer: int | None


def check_gpt2(model: nn.Module) -> None:
    """Raises InputError unless `model` is a (Pre-LN) transformers GPT2LMHeadModel."""
    if type(model).__name__ != "GPT2LMHeadModel":
        raise InputError(f"LayerNorm removal supports GPT-2 (GPT2LMHeadModel) only, got {type(model).__name__}")
    if getattr(model.config, "add_cross_attention", False):
        raise InputError("LayerNorm removal does not support GPT-2 with cross-attention")


def install(model: nn.Module) -> list[NormSite]:
    """Replaces every LN of a GPT2LMHeadModel by a switchable one (in place); returns the sites in removal order."""
    check_gpt2(model)
    transformer = model.transformer
    for block in transformer.h:
        if isinstance(block.ln_1, nn.LayerNorm):
            block.attn.c_attn = SplitQKV(block.ln_1, block.attn.c_attn)
            block.ln_1 = nn.Identity()
        if isinstance(block.ln_2, nn.LayerNorm):
            block.ln_2 = SwitchableNorm(block.ln_2)
    if isinstance(transformer.ln_f, nn.LayerNorm):
        transformer.ln_f = SwitchableNorm(transformer.ln_f)
    return sites(model)


def sites(model: nn.Module) -> list[NormSite]:
    """The switchable norms of an installed model in the published removal order."""
    layers = range(len(model.transformer.h))
    found = [NormSite(f"transformer.h.{i}.ln_2", "mlp", i) for i in layers]
    found += [NormSite(f"transformer.h.{i}.attn.c_attn.norm_qk", "qk", i) for i in layers]
    found += [NormSite(f"transformer.h.{i}.attn.c_attn.norm_v", "v", i) for i in layers]
    found.append(NormSite("transformer.ln_f", "final", None))
    for site in found:
        if not isinstance(model.get_submodule(site.name), SwitchableNorm):
            raise InputError(f"{site.name} is not a switchable norm (call gpt2.install first)")
    return found


def norm_modules(model: nn.Module) -> dict[str, SwitchableNorm]:
    """Site name -> its SwitchableNorm, in removal order."""
    return {site.name: model.get_submodule(site.name) for site in sites(model)}
