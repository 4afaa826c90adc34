"""Seeded transformer factories for the LayerNorm -> RMSNorm rewrites.

Every factory is ``fn(seed=0, **size_kwargs) -> torch.nn.Module``, returns a
module in eval mode whose ``forward`` returns one logits tensor, and carries
its example inputs as ``fn.input_shapes`` / ``fn.input_kinds`` / ``fn.vocab``
(see :class:`normfold.models.ModelSpec`). Token models take int64 ids of
shape (batch, seq); ``vit`` takes (batch, 3, 32, 32) images (its
``image_size`` knob changes the 32; pass matching inputs to ``to_onnx``).

All but ``tiny_gpt`` are ``transformers`` models built from a config (no hub
access) with eager attention, dropout off and ``initializer_range`` set to
``1/sqrt(width)`` so every projection has roughly unit gain. After the
library's own (seeded) initialisation every norm gets gamma ~ U(0.5, 1.5)
(and beta ~ N(0, 0.1) where it has one), every bias ~ N(0, 0.1), and every
row of the word (and learned position) embedding a constant shift drawn with
the table's own std, so the residual stream is clearly not zero-mean and a
wrongly recentred table shows. ``tiny_gpt`` is a plain-torch Pre-LN GPT with
architecture knobs, for property-based tests. The global torch RNG is left
untouched.

``transformers`` is imported only by the factories that need it.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

BATCH = 2
SEQ = 8
VOCAB = 101
IMAGE = (3, 32, 32)


def seeded(
    input_shapes: tuple[tuple[int, ...], ...], input_kinds: tuple[str, ...], vocab: int = 0
) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Turn ``build(generator, **size_kwargs)`` into a seeded, eval-mode factory.

    ``build`` runs with the torch RNG seeded by ``seed`` (inside ``fork_rng``)
    and gets its own ``torch.Generator`` for post-construction draws.
    """

    def decorate(build: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        @functools.wraps(build)
        def factory(seed: int = 0, **size_kwargs: Any) -> nn.Module:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                generator = torch.Generator().manual_seed(seed + 0x5EED)
                module = build(generator, **size_kwargs)
            return module.eval()

        del factory.__wrapped__  # the factory's signature is (seed, **size_kwargs)
        factory.input_shapes = input_shapes
        factory.input_kinds = input_kinds
        factory.vocab = vocab
        return factory

    return decorate


_TOKENS = (((BATCH, SEQ),), ("tokens",), VOCAB)


# --------------------------------------------------------------------------- weights


def is_layernorm(module: nn.Module) -> bool:
    """nn.LayerNorm (what every transformers model here uses for LayerNorm)."""
    return isinstance(module, nn.LayerNorm)


def is_rmsnorm(module: nn.Module) -> bool:
    """nn.RMSNorm or a transformers ``*RMSNorm`` class (e.g. LlamaRMSNorm)."""
    return isinstance(module, nn.RMSNorm) or type(module).__name__.endswith("RMSNorm")


def norms(module: nn.Module) -> list[nn.Module]:
    """LayerNorm and RMSNorm submodules, in definition order."""
    return [m for m in module.modules() if is_layernorm(m) or is_rmsnorm(m)]


@torch.no_grad()
def randomize_norms_and_biases(module: nn.Module, generator: torch.Generator) -> None:
    """Norm gamma ~ U(0.5, 1.5), norm beta ~ N(0, 0.1), every other bias ~ N(0, 0.1)."""
    for m in module.modules():
        weight, bias = getattr(m, "weight", None), getattr(m, "bias", None)
        if is_layernorm(m) or is_rmsnorm(m):
            if isinstance(weight, nn.Parameter):
                weight.copy_(torch.empty(weight.shape).uniform_(0.5, 1.5, generator=generator))
        if isinstance(bias, nn.Parameter):
            bias.copy_(torch.randn(bias.shape, generator=generator) * 0.1)


@torch.no_grad()
def shift_rows(table: torch.Tensor, generator: torch.Generator, scale: float = 1.0) -> None:
    """Add to each row of an embedding table a constant ~ N(0, scale * std(table))."""
    std = float(table.std()) * scale
    table.add_(torch.randn(table.shape[0], 1, generator=generator) * std)


# --------------------------------------------------------------------------- transformers wrappers


class TokenLogits(nn.Module):
    """Calls a transformers model on token ids and returns its logits only.

    A missing ``attention_mask`` becomes all ones, so no exporter traces the
    library's packed-sequence detection (``aten::diff``, which TorchScript
    cannot export).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, return_dict=False)[0]


class ImageLogits(nn.Module):
    """Calls a transformers vision model on pixel values and returns its logits only."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values, return_dict=False)[0]


def _hf_common(width: int) -> dict[str, Any]:
    return {"attn_implementation": "eager", "initializer_range": 1.0 / math.sqrt(width)}


def _finish(model: nn.Module, generator: torch.Generator, tables: list[torch.Tensor]) -> None:
    randomize_norms_and_biases(model, generator)
    for table in tables:
        shift_rows(table, generator)


@seeded(*_TOKENS)
def gpt2_tied(
    generator: torch.Generator, width: int = 32, depth: int = 2, heads: int = 4, vocab: int = VOCAB, seq: int = SEQ
) -> nn.Module:
    """GPT-2: Pre-LN, Conv1D projections, learned positions, tied input/output embedding."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=vocab, n_positions=seq, n_embd=width, n_layer=depth, n_head=heads,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
        tie_word_embeddings=True, **_hf_common(width),
    )  # fmt: skip
    model = GPT2LMHeadModel(config)
    _finish(model, generator, [model.transformer.wte.weight, model.transformer.wpe.weight])
    assert model.lm_head.weight is model.transformer.wte.weight
    return TokenLogits(model)


@seeded(((BATCH, *IMAGE),), ("normal",))
def vit(
    generator: torch.Generator,
    width: int = 32,
    depth: int = 2,
    heads: int = 4,
    patch: int = 8,
    num_classes: int = 10,
    image_size: int = IMAGE[1],
) -> nn.Module:
    """ViT on 3x32x32 images (3 x image_size x image_size): Conv patch embedding, CLS token, learned
    positions, Pre-LN, final LN, classifier on the CLS token. The MLP is 4 x width wide."""
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(
        hidden_size=width, num_hidden_layers=depth, num_attention_heads=heads, intermediate_size=4 * width,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, image_size=image_size, patch_size=patch,
        num_channels=IMAGE[0], num_labels=num_classes, **_hf_common(width),
    )  # fmt: skip
    model = ViTForImageClassification(config)
    _finish(model, generator, [])
    return ImageLogits(model)


@seeded(*_TOKENS)
def opt(
    generator: torch.Generator, width: int = 32, depth: int = 2, heads: int = 4, vocab: int = VOCAB, seq: int = SEQ
) -> nn.Module:
    """OPT: Pre-LN (do_layer_norm_before), ReLU MLP, learned positions with offset 2, tied head."""
    from transformers import OPTConfig, OPTForCausalLM

    config = OPTConfig(
        vocab_size=vocab, hidden_size=width, num_hidden_layers=depth, ffn_dim=4 * width,
        max_position_embeddings=seq, do_layer_norm_before=True, word_embed_proj_dim=width,
        dropout=0.0, attention_dropout=0.0, num_attention_heads=heads, pad_token_id=1, bos_token_id=2,
        eos_token_id=2, **_hf_common(width),
    )  # fmt: skip
    config.init_std = config.initializer_range
    model = OPTForCausalLM(config)
    decoder = model.model.decoder
    _finish(model, generator, [decoder.embed_tokens.weight, decoder.embed_positions.weight])
    return TokenLogits(model)


@seeded(*_TOKENS)
def bloom(
    generator: torch.Generator, width: int = 32, depth: int = 2, heads: int = 4, vocab: int = VOCAB
) -> nn.Module:
    """BLOOM: LayerNorm right after the word embedding, ALiBi, fused QKV, Pre-LN, tied head."""
    from transformers import BloomConfig, BloomForCausalLM

    config = BloomConfig(
        vocab_size=vocab, hidden_size=width, n_layer=depth, n_head=heads, hidden_dropout=0.0,
        attention_dropout=0.0, bos_token_id=0, eos_token_id=0, **_hf_common(width),
    )  # fmt: skip
    model = BloomForCausalLM(config)
    _finish(model, generator, [model.transformer.word_embeddings.weight])
    return TokenLogits(model)


@seeded(*_TOKENS)
def gpt_neox(
    generator: torch.Generator, width: int = 32, depth: int = 2, heads: int = 4, vocab: int = VOCAB, seq: int = SEQ
) -> nn.Module:
    """GPT-NeoX: parallel attention + MLP reading two LNs of the same stream, partial rotary, untied head."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    config = GPTNeoXConfig(
        vocab_size=vocab, hidden_size=width, num_hidden_layers=depth, num_attention_heads=heads,
        intermediate_size=4 * width, max_position_embeddings=seq, use_parallel_residual=True,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
        attention_dropout=0.0, hidden_dropout=0.0, bos_token_id=0, eos_token_id=0, **_hf_common(width),
    )  # fmt: skip
    model = GPTNeoXForCausalLM(config)
    _finish(model, generator, [model.gpt_neox.embed_in.weight])
    return TokenLogits(model)


@seeded(((BATCH, SEQ), (BATCH, SEQ)), ("tokens", "ones"), VOCAB)
def bert_post_ln(
    generator: torch.Generator, width: int = 32, depth: int = 2, heads: int = 4, vocab: int = VOCAB, seq: int = SEQ
) -> nn.Module:
    """BERT (Post-LN) with its MLM head (dense, GELU, LN, tied decoder); inputs ids and attention mask."""
    from transformers import BertConfig, BertForMaskedLM

    config = BertConfig(
        vocab_size=vocab, hidden_size=width, num_hidden_layers=depth, num_attention_heads=heads,
        intermediate_size=4 * width, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        max_position_embeddings=seq, pad_token_id=0, **_hf_common(width),
    )  # fmt: skip
    model = BertForMaskedLM(config)
    emb = model.bert.embeddings
    _finish(model, generator, [emb.word_embeddings.weight, emb.position_embeddings.weight])
    return TokenLogits(model)


@seeded(*_TOKENS)
def llama(
    generator: torch.Generator,
    width: int = 32,
    depth: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    vocab: int = VOCAB,
    seq: int = SEQ,
) -> nn.Module:
    """Llama: RMSNorm (upcast to fp32), no biases, SwiGLU, rotary, grouped-query attention, untied head."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab, hidden_size=width, intermediate_size=3 * width, num_hidden_layers=depth,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=seq,
        bos_token_id=0, eos_token_id=0, tie_word_embeddings=False, **_hf_common(width),
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    _finish(model, generator, [model.model.embed_tokens.weight])
    return TokenLogits(model)


# --------------------------------------------------------------------------- tiny_gpt


class CausalSelfAttention(nn.Module):
    """Fused-QKV multi-head causal attention, written out (no SDPA)."""

    def __init__(self, width: int, heads: int, seq: int, bias: bool) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width, bias=bias)
        self.proj = nn.Linear(width, width, bias=bias)
        self.register_buffer("causal", torch.ones(seq, seq, dtype=torch.bool).tril(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=-1)
        q, k, v = (z.reshape(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(c // self.heads))
        scores = scores.masked_fill(~self.causal[:t, :t], float("-inf"))
        y = scores.softmax(dim=-1) @ v
        return self.proj(y.transpose(1, 2).reshape(b, t, c))


class MLP(nn.Module):
    """GELU MLP (fc, GELU, proj) or SwiGLU MLP (proj(silu(gate(x)) * up(x)))."""

    def __init__(self, width: int, hidden: int, kind: str, bias: bool) -> None:
        super().__init__()
        if kind not in ("gelu", "swiglu"):
            raise ValueError(f"mlp must be 'gelu' or 'swiglu', got {kind!r}")
        self.kind = kind
        if kind == "gelu":
            self.fc = nn.Linear(width, hidden, bias=bias)
        else:
            self.gate = nn.Linear(width, hidden, bias=bias)
            self.up = nn.Linear(width, hidden, bias=bias)
        self.proj = nn.Linear(hidden, width, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "gelu":
            return self.proj(F.gelu(self.fc(x)))
        return self.proj(F.silu(self.gate(x)) * self.up(x))


class Block(nn.Module):
    """Pre-LN block: sequential x += attn(ln1(x)); x += mlp(ln2(x)), or parallel
    x += attn(ln1(x)) + mlp(ln2(x)) (``shared_ln``: one ln1(x) feeds both, GPT-J style)."""

    def __init__(
        self, width: int, heads: int, seq: int, bias: bool, parallel: bool, shared_ln: bool, mlp: str, hidden: int
    ) -> None:
        super().__init__()
        self.parallel = parallel
        self.ln1 = nn.LayerNorm(width, bias=bias)
        self.ln2 = None if shared_ln else nn.LayerNorm(width, bias=bias)
        self.attn = CausalSelfAttention(width, heads, seq, bias)
        self.mlp = MLP(width, hidden, mlp, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.parallel:
            h = self.ln1(x)
            return x + self.attn(h) + self.mlp(h if self.ln2 is None else self.ln2(x))
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class TinyGPT(nn.Module):
    """Pre-LN GPT: token + learned position embedding, blocks, final LN, LM head (tied or not)."""

    def __init__(
        self,
        width: int,
        depth: int,
        heads: int,
        vocab: int,
        seq: int,
        bias: bool,
        tied: bool,
        parallel: bool,
        shared_ln: bool,
        mlp: str,
        mlp_ratio: int,
    ) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab, width)
        self.wpe = nn.Embedding(seq, width)
        hidden = mlp_ratio * width
        self.blocks = nn.ModuleList(
            Block(width, heads, seq, bias, parallel, shared_ln, mlp, hidden) for _ in range(depth)
        )
        self.ln_f = nn.LayerNorm(width, bias=bias)
        self.lm_head = nn.Linear(width, vocab, bias=False)
        if tied:
            self.lm_head.weight = self.wte.weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.wte(input_ids) + self.wpe(positions)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))


@seeded(*_TOKENS)
def tiny_gpt(
    generator: torch.Generator,
    width: int = 32,
    depth: int = 2,
    heads: int = 4,
    vocab: int = VOCAB,
    seq: int = SEQ,
    *,
    bias: bool = True,
    tied: bool = True,
    parallel: bool = False,
    shared_ln: bool = False,
    mlp: str = "gelu",
    mlp_ratio: int = 4,
    embedding_shift: float = 1.0,
) -> nn.Module:
    """Plain-torch Pre-LN GPT (nn.LayerNorm everywhere, final LN on).

    ``bias`` switches the biases of every Linear and LayerNorm (nanoGPT's
    knob); ``tied`` ties the LM head to the token embedding; ``parallel``
    runs attention and MLP side by side on the same stream, reading two LNs
    (or one with ``shared_ln``); ``mlp`` is "gelu" or "swiglu" (hidden width
    ``mlp_ratio * width``). ``seq`` is the number of learned positions (the
    longest input). Weights ~ N(0, 1/fan_in) (residual output projections
    further / sqrt(2 depth)), embeddings ~ N(0, 1) plus a per-row constant ~
    N(0, embedding_shift), LN gamma ~ U(0.5, 1.5), biases ~ N(0, 0.1).
    """
    if shared_ln and not parallel:
        raise ValueError("shared_ln needs parallel=True")
    model = TinyGPT(width, depth, heads, vocab, seq, bias, tied, parallel, shared_ln, mlp, mlp_ratio)
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, nn.Linear) and not (tied and m is model.lm_head):
                std = 1.0 / math.sqrt(m.in_features)
                if name.endswith("proj"):
                    std /= math.sqrt(2 * depth)
                m.weight.copy_(torch.randn(m.weight.shape, generator=generator) * std)
            elif isinstance(m, nn.Embedding):
                m.weight.copy_(torch.randn(m.weight.shape, generator=generator))
        randomize_norms_and_biases(model, generator)
        for table in (model.wte.weight, model.wpe.weight):
            shift_rows(table, generator, embedding_shift)
    return model
