"""Random Pre-LN (and Post-LN) transformers written directly as ONNX (onnx.helper + numpy, no torch).

`build(Config(...))` or `build(**knobs)` returns a `TransformerCase`: a ModelProto (static shapes unless
`dynamic`) with int64 token ids `ids` (batch, seq) as its only input and `logits` (batch, seq, vocab)
as its output (plus the residual sum `h{i}` itself when `stream_output=i`), the LayerNorms' names and
the seeded arrays. Every model builds in a few milliseconds; weights come from
numpy.random.default_rng(seed). `run` executes a model on onnxruntime; `exact_outputs` evaluates it in
float64 with onnx's reference evaluator (the ground truth the tests measure conversions against).

Dataflow, as the exporters write it:
    h = Gather(E, ids) [+ pos]                      token table E (vocab, d), + embedding_offset everywhere
    [h = LN_emb(h)]                                 embedding_ln (BLOOM)
    per block (Pre-LN):     h = h + attn(LN1(h));  h = h + mlp(LN2(h))
              (neox):       h = (attn(LN1(h)) + mlp(LN2(h))) + h
              (phi):        x = LN1(h);  h = (h + attn(x)) + mlp(x)
              (Post-LN):    h = LN1(h + attn(h));  h = LN2(h + mlp(h))
    logits = head(LN_f(h))                          LN_f omitted for Post-LN or final_ln=False

Knobs (Config):
- d, depth, heads (must divide d), vocab, seq, batch, mlp_ratio;
- bias: biases on every projection (random N(0, 0.1) plus `bias_offset` on the output projections);
- tied: "none" (own head weight), "transpose" (head MatMul reads Transpose(E): the same initializer
  as the token Gather), "gemm" (Gemm(transB=1) reads E itself), "copy" (a transposed copy of E, as
  constant folding leaves it);
- parallel: "none", "neox" (two LNs per block), "phi" (one LN shared by both branches);
- mlp: "gelu" (the Erf spelling exporters write below opset 20) or "swiglu" (x Sigmoid(x) gate);
- ln_spelling: "fused" (LayerNormalization, opset 17..23), "decomposed" (ReduceMean, Sub, Pow,
  ReduceMean, Add, Sqrt, Div, Mul, Add, as the TorchScript exporter writes it: axes as attribute
  below opset 18, as input from 18),
  "decomposed_mul" (Mul(d, d) instead of Pow), "reciprocal" (Mul by Reciprocal(Sqrt(.)));
- fused_qkv: one (d, 3d) projection and a Split, else three projections;
- proj: "matmul" (MatMul + Add) or "gemm" (Reshape -> Gemm -> Reshape, like HF GPT-2's Conv1D);
- pos: "gather" (Gather of a position table with constant position ids), "const" (a (1, seq, d)
  constant), "none";
- embedding_ln, post_ln, final_ln;
- dtype: "float32" or "float16"; fp16 decomposed LNs compute their statistics in float32 between
  Casts, with the affine in float16 after the Cast back (`fp16_affine="outside"`, as torch's
  TorchScript exporter writes it) or in float32 before it ("inside");
- embedding_offset: added to every entry of the token table (and position table), so the residual
  stream has a large mean (REFERENCE.md: shifted inputs stress recentring);
- stream_output=i: the residual stream after block i is also a graph output `h{i}`;
- raw_reader=i: block i's value projection reads the raw stream instead of LN1's output, so the
  mean of that stream value is observable;
- dynamic: `ids` has symbolic dims (batch, seq), as exporters write with dynamic axes: reshapes use
  0/-1 or a shape computed from Shape(ids), position ids come from Range, the causal mask and a
  constant position table are sliced to the sequence length (feed explicit inputs to verify);
- dropout: inference-mode Dropout (opset 13 form) on the embeddings and each branch output, as
  exporters of models in eval mode sometimes leave it;
- positive_axes: decomposed LNs reduce over axes=[rank-1] (here 2 or 1) instead of [-1];
- flat_ln: each LN reads a (batch*seq, d) Reshape of the stream and is reshaped back after, as some
  exporters flatten tokens around norms.

`opset` defaults to 17 for fused LNs and 13 for decomposed ones; any of 13..23 is valid (17..23 for
fused), with the IR version onnx shipped with that opset.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field, replace

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

IR_FOR_OPSET = {13: 7, 14: 7, 15: 8, 16: 8, 17: 8, 18: 8, 19: 9, 20: 9, 21: 10, 22: 10, 23: 11}
LN_SPELLINGS = ("fused", "decomposed", "decomposed_mul", "reciprocal")
TIED = ("none", "transpose", "gemm", "copy")
PARALLEL = ("none", "neox", "phi")


@dataclass(frozen=True)
class Config:
    """The knobs of one random transformer (see module docstring)."""

    d: int = 16
    depth: int = 2
    heads: int = 2
    vocab: int = 23
    seq: int = 5
    batch: int = 2
    mlp_ratio: int = 2
    bias: bool = True
    tied: str = "none"
    parallel: str = "none"
    mlp: str = "gelu"
    ln_spelling: str = "fused"
    opset: int | None = None
    fused_qkv: bool = False
    proj: str = "matmul"
    pos: str = "gather"
    embedding_ln: bool = False
    post_ln: bool = False
    final_ln: bool = True
    dtype: str = "float32"
    fp16_affine: str = "outside"
    embedding_offset: float = 0.0
    bias_offset: float = 0.0
    stream_output: int | None = None
    raw_reader: int | None = None
    eps: float = 1e-5
    dynamic: bool = False
    dropout: bool = False
    positive_axes: bool = False
    flat_ln: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if self.d % self.heads:
            raise ValueError(f"heads={self.heads} does not divide d={self.d}")
        if self.tied not in TIED or self.parallel not in PARALLEL or self.ln_spelling not in LN_SPELLINGS:
            raise ValueError(f"bad knob in {self}")
        if self.mlp not in ("gelu", "swiglu") or self.proj not in ("matmul", "gemm") or \
                self.pos not in ("gather", "const", "none") or self.dtype not in ("float32", "float16"):
            raise ValueError(f"bad knob in {self}")
        if self.post_ln and self.parallel != "none":
            raise ValueError("post_ln with parallel blocks is not a real architecture")
        if self.ln_spelling == "fused" and self.resolved_opset < 17:
            raise ValueError("LayerNormalization needs opset >= 17")
        if self.resolved_opset not in IR_FOR_OPSET:
            raise ValueError(f"opset {self.resolved_opset} is outside 13..23")
        for knob in ("stream_output", "raw_reader"):
            index = getattr(self, knob)
            if index is not None and not 0 <= index < self.depth:
                raise ValueError(f"{knob}={index} needs a block index below depth={self.depth}")

    @property
    def resolved_opset(self) -> int:
        if self.opset is not None:
            return self.opset
        return 17 if self.ln_spelling == "fused" else 13

    @property
    def layernorms(self) -> int:
        """How many LayerNorms the model has."""
        per_block = 1 if self.parallel == "phi" else 2
        return self.depth * per_block + int(self.embedding_ln) + int(self.final_ln and not self.post_ln)

    def label(self) -> str:
        default = Config()
        parts = [f"{k}={getattr(self, k)}" for k in self.__dataclass_fields__
                 if getattr(self, k) != getattr(default, k)]
        return ",".join(parts) or "default"


@dataclass
class TransformerCase:
    """A built model and the facts the tests check against."""

    config: Config
    model: onnx.ModelProto
    ln_names: list[str]
    """Name prefix of every LayerNorm (its fused node's name, or the prefix of its decomposed nodes)."""
    head_weight: str
    """The initializer the head reads (the token table itself when tied)."""
    arrays: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.config.dtype)

    @property
    def tolerance(self) -> tuple[float, float]:
        """(rtol, atol before scaling) from REFERENCE.md for LN -> RMSNorm."""
        return (1e-2, 1e-2) if self.config.dtype == "float16" else (1e-4, 1e-4)

    def __repr__(self) -> str:
        return f"TransformerCase({self.config.label()})"


class _Builder:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.dt = np.dtype(cfg.dtype)
        self.elem = helper.np_dtype_to_tensor_dtype(self.dt)
        self.rng = np.random.default_rng(cfg.seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.arrays: dict[str, np.ndarray] = {}
        self.ln_names: list[str] = []
        self.opset = cfg.resolved_opset
        self._count = itertools.count()
        self._consts: dict[tuple, str] = {}

    # -- primitives -------------------------------------------------------------------------------
    def init(self, name: str, array: np.ndarray) -> str:
        array = np.asarray(array)
        self.inits.append(numpy_helper.from_array(array, name))
        self.arrays[name] = array
        return name

    def const(self, array, dtype=None) -> str:
        """A shared small constant initializer (scalars, shapes, axes)."""
        array = np.asarray(array, dtype=dtype if dtype is not None else self.dt)
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in self._consts:
            self._consts[key] = self.init(f"const_{len(self._consts)}", array)
        return self._consts[key]

    def node(self, op: str, inputs, name: str, n_out: int = 1, **attrs) -> str | list[str]:
        outputs = [f"{name}_out{i}" if n_out > 1 else f"{name}_out" for i in range(n_out)]
        self.nodes.append(helper.make_node(op, list(inputs), outputs, name=name, **attrs))
        return outputs if n_out > 1 else outputs[0]

    def weight(self, name: str, shape, scale: float | None = None, offset: float = 0.0) -> str:
        scale = 1.0 / np.sqrt(shape[0]) if scale is None else scale
        return self.init(name, (self.rng.normal(0.0, scale, size=shape) + offset).astype(self.dt))

    def shape_with(self, *tail: int) -> str:
        """A Reshape target (batch, seq, *tail): constant, or computed from Shape(ids) when dynamic."""
        c = self.cfg
        if not c.dynamic:
            return self.const([c.batch, c.seq, *tail], np.int64)
        key = ("shape_with", tail)
        if key not in self._consts:
            self._consts[key] = self.node("Concat", [self.ids_shape(), self.const(list(tail), np.int64)],
                                          f"shape_bs_{'x'.join(map(str, tail))}", axis=0)
        return self._consts[key]

    def ids_shape(self) -> str:
        if ("ids_shape",) not in self._consts:
            self._consts[("ids_shape",)] = self.node("Shape", ["ids"], "ids_shape")
        return self._consts[("ids_shape",)]

    def seq_len(self) -> str:
        """The sequence length as a 1-D tensor [S] (dynamic models only)."""
        if ("seq_len",) not in self._consts:
            self._consts[("seq_len",)] = self.node(
                "Slice", [self.ids_shape(), self.const([1], np.int64), self.const([2], np.int64)], "seq_len")
        return self._consts[("seq_len",)]

    # -- layers ----------------------------------------------------------------------------------
    def linear(self, x: str, din: int, dout: int, name: str, *, out_proj: bool = False) -> str:
        w = self.weight(f"{name}.weight", (din, dout))
        b = None
        if self.cfg.bias:
            offset = self.cfg.bias_offset if out_proj else 0.0
            b = self.init(f"{name}.bias", (self.rng.normal(0.0, 0.1, size=dout) + offset).astype(self.dt))
        return self.apply_linear(x, w, b, din, dout, name)

    def apply_linear(self, x: str, w: str, b: str | None, din: int, dout: int, name: str, trans_b: int = 0) -> str:
        c = self.cfg
        if c.proj == "gemm" or trans_b:
            flat = self.node("Reshape", [x, self.const([-1, din], np.int64)], f"{name}/flatten")
            inputs = [flat, w] + ([b] if b is not None else [])
            y = self.node("Gemm", inputs, f"{name}/gemm", transB=trans_b)
            return self.node("Reshape", [y, self.shape_with(dout)], f"{name}/unflatten")
        y = self.node("MatMul", [x, w], f"{name}/matmul")
        return self.node("Add", [y, b], f"{name}/bias") if b is not None else y

    def reduce_mean(self, x: str, name: str) -> str:
        axis = (1 if self.cfg.flat_ln else 2) if self.cfg.positive_axes else -1
        if self.opset >= 18:
            return self.node("ReduceMean", [x, self.const([axis], np.int64)], name, keepdims=1)
        return self.node("ReduceMean", [x], name, axes=[axis], keepdims=1)

    def dropout(self, x: str, name: str) -> str:
        return self.node("Dropout", [x], f"{name}/dropout") if self.cfg.dropout else x

    def layernorm(self, x: str, name: str) -> str:
        if not self.cfg.flat_ln:
            return self._layernorm(x, name)
        flat = self.node("Reshape", [x, self.const([-1, self.cfg.d], np.int64)], f"{name}/flatten")
        return self.node("Reshape", [self._layernorm(flat, name), self.shape_with(self.cfg.d)], f"{name}/unflatten")

    def _layernorm(self, x: str, name: str) -> str:
        c = self.cfg
        self.ln_names.append(name)
        d = c.d
        gamma = self.rng.uniform(0.5, 1.5, size=d)
        beta = self.rng.normal(0.0, 0.1, size=d)
        if c.ln_spelling == "fused":
            g = self.init(f"{name}.weight", gamma.astype(self.dt))
            b = self.init(f"{name}.bias", beta.astype(self.dt))
            return self.node("LayerNormalization", [x, g, b], name, axis=-1, epsilon=c.eps)
        low = self.dt == np.float16
        affine_dt = np.float32 if (low and c.fp16_affine == "inside") else self.dt
        g = self.init(f"{name}.weight", gamma.astype(affine_dt))
        b = self.init(f"{name}.bias", beta.astype(affine_dt))
        h = self.node("Cast", [x], f"{name}/cast_in", to=TensorProto.FLOAT) if low else x
        stat_dt = np.float32 if low else self.dt
        mean = self.reduce_mean(h, f"{name}/mean")
        centred = self.node("Sub", [h, mean], f"{name}/sub")
        if c.ln_spelling == "decomposed_mul":
            square = self.node("Mul", [centred, centred], f"{name}/square")
        else:
            square = self.node("Pow", [centred, self.const(2.0, stat_dt)], f"{name}/pow")
        var = self.reduce_mean(square, f"{name}/var")
        std = self.node("Sqrt", [self.node("Add", [var, self.const(c.eps, stat_dt)], f"{name}/add_eps")],
                        f"{name}/sqrt")
        if c.ln_spelling == "reciprocal":
            y = self.node("Mul", [centred, self.node("Reciprocal", [std], f"{name}/reciprocal")], f"{name}/div")
        else:
            y = self.node("Div", [centred, std], f"{name}/div")
        if low and c.fp16_affine == "outside":
            y = self.node("Cast", [y], f"{name}/cast_out", to=self.elem)
        y = self.node("Mul", [y, g], f"{name}/mul_gamma")
        y = self.node("Add", [y, b], f"{name}/add_beta")
        if low and c.fp16_affine == "inside":
            y = self.node("Cast", [y], f"{name}/cast_out", to=self.elem)
        return y

    def attention(self, x: str, name: str, raw: str | None = None) -> str:
        c = self.cfg
        d, heads = c.d, c.heads
        dh = d // heads
        if c.fused_qkv and raw is None:
            qkv = self.linear(x, d, 3 * d, f"{name}.qkv")
            q, k, v = self.node("Split", [qkv, self.const([d, d, d], np.int64)], f"{name}/split", n_out=3, axis=-1)
        else:
            q = self.linear(x, d, d, f"{name}.q")
            k = self.linear(x, d, d, f"{name}.k")
            v = self.linear(raw if raw is not None else x, d, d, f"{name}.v")
        split_shape = self.const([0, 0, heads, dh], np.int64) if c.dynamic else \
            self.const([c.batch, c.seq, heads, dh], np.int64)
        q = self.node("Transpose", [self.node("Reshape", [q, split_shape], f"{name}/q_heads")], f"{name}/q_t",
                      perm=[0, 2, 1, 3])
        k = self.node("Transpose", [self.node("Reshape", [k, split_shape], f"{name}/k_heads")], f"{name}/k_t",
                      perm=[0, 2, 3, 1])
        v = self.node("Transpose", [self.node("Reshape", [v, split_shape], f"{name}/v_heads")], f"{name}/v_t",
                      perm=[0, 2, 1, 3])
        scores = self.node("MatMul", [q, k], f"{name}/scores")
        scores = self.node("Mul", [scores, self.const(1.0 / np.sqrt(dh))], f"{name}/scale")
        scores = self.node("Add", [scores, self.mask()], f"{name}/mask")
        probs = self.node("Softmax", [scores], f"{name}/softmax", axis=-1)
        ctx = self.node("MatMul", [probs, v], f"{name}/context")
        ctx = self.node("Transpose", [ctx], f"{name}/ctx_t", perm=[0, 2, 1, 3])
        merged = self.const([0, 0, d], np.int64) if c.dynamic else self.const([c.batch, c.seq, d], np.int64)
        ctx = self.node("Reshape", [ctx, merged], f"{name}/merge_heads")
        return self.dropout(self.linear(ctx, d, d, f"{name}.out", out_proj=True), f"{name}.out")

    def mask(self) -> str:
        c = self.cfg
        full = self.const(np.triu(np.full((c.seq, c.seq), -1e4), k=1))
        if not c.dynamic:
            return full
        if ("mask",) not in self._consts:
            ends = self.node("Concat", [self.seq_len(), self.seq_len()], "mask_ends", axis=0)
            self._consts[("mask",)] = self.node("Slice", [full, self.const([0, 0], np.int64), ends], "causal_mask")
        return self._consts[("mask",)]

    def mlp(self, x: str, name: str) -> str:
        c = self.cfg
        f = c.mlp_ratio * c.d
        if c.mlp == "swiglu":
            gate = self.linear(x, c.d, f, f"{name}.gate")
            up = self.linear(x, c.d, f, f"{name}.up")
            silu = self.node("Mul", [gate, self.node("Sigmoid", [gate], f"{name}/sigmoid")], f"{name}/silu")
            hidden = self.node("Mul", [silu, up], f"{name}/glu")
        else:
            up = self.linear(x, c.d, f, f"{name}.fc")
            erf = self.node("Erf", [self.node("Div", [up, self.const(np.sqrt(2.0))], f"{name}/gelu_div")],
                            f"{name}/gelu_erf")
            half = self.node("Add", [erf, self.const(1.0)], f"{name}/gelu_add")
            hidden = self.node("Mul", [self.node("Mul", [up, half], f"{name}/gelu_mul"), self.const(0.5)],
                               f"{name}/gelu_half")
        return self.dropout(self.linear(hidden, f, c.d, f"{name}.proj", out_proj=True), f"{name}.proj")

    def block(self, h: str, i: int) -> str:
        c = self.cfg
        name = f"blk{i}"
        raw = h if c.raw_reader == i else None
        if c.post_ln:
            h = self.layernorm(self.node("Add", [h, self.attention(h, f"{name}.attn")], f"{name}/attn_residual"),
                               f"{name}.ln1")
            return self.layernorm(self.node("Add", [h, self.mlp(h, f"{name}.mlp")], f"{name}/mlp_residual"),
                                  f"{name}.ln2")
        if c.parallel == "neox":
            a = self.attention(self.layernorm(h, f"{name}.ln1"), f"{name}.attn", raw)
            m = self.mlp(self.layernorm(h, f"{name}.ln2"), f"{name}.mlp")
            return self.node("Add", [self.node("Add", [a, m], f"{name}/branches"), h], f"{name}/residual")
        if c.parallel == "phi":
            x = self.layernorm(h, f"{name}.ln1")
            a = self.attention(x, f"{name}.attn", raw)
            h = self.node("Add", [h, a], f"{name}/attn_residual")
            return self.node("Add", [h, self.mlp(x, f"{name}.mlp")], f"{name}/mlp_residual")
        h = self.node("Add", [h, self.attention(self.layernorm(h, f"{name}.ln1"), f"{name}.attn", raw)],
                      f"{name}/attn_residual")
        return self.node("Add", [h, self.mlp(self.layernorm(h, f"{name}.ln2"), f"{name}.mlp")],
                         f"{name}/mlp_residual")

    def _rename(self, old: str, new: str) -> None:
        for node in self.nodes:
            node.input[:] = [new if v == old else v for v in node.input]
            node.output[:] = [new if v == old else v for v in node.output]

    def build(self) -> TransformerCase:
        c = self.cfg
        table = (self.rng.normal(0.0, 1.0, size=(c.vocab, c.d)) + c.embedding_offset).astype(self.dt)
        self.init("wte", table)
        h = self.node("Gather", ["wte", "ids"], "embed_tokens", axis=0)
        if c.pos != "none":
            pos_table = (self.rng.normal(0.0, 0.5, size=(c.seq, c.d)) + c.embedding_offset).astype(self.dt)
            if c.pos == "gather":
                self.init("wpe", pos_table)
                if c.dynamic:
                    seq = self.node("Squeeze", [self.seq_len(), self.const([0], np.int64)], "seq_scalar")
                    ids = self.node("Range", [self.const(0, np.int64), seq, self.const(1, np.int64)], "position_ids")
                else:
                    ids = self.const(np.arange(c.seq), np.int64)
                pos = self.node("Gather", ["wpe", ids], "embed_positions", axis=0)
            else:
                pos = self.init("wpe", pos_table[None])
                if c.dynamic:
                    starts, axes = self.const([0], np.int64), self.const([1], np.int64)
                    pos = self.node("Slice", [pos, starts, self.seq_len(), axes], "wpe_slice")
            h = self.node("Add", [h, pos], "embed_add")
        h = self.dropout(h, "embed")
        if c.embedding_ln:
            h = self.layernorm(h, "emb_ln")
        extra_outputs = []
        for i in range(c.depth):
            h = self.block(h, i)
            if c.stream_output == i:
                extra_outputs.append(h)
        if c.final_ln and not c.post_ln:
            h = self.layernorm(h, "ln_f")
        if c.tied == "none":
            head = self.weight("lm_head.weight", (c.d, c.vocab))
            logits = self.apply_linear(h, head, None, c.d, c.vocab, "lm_head")
        elif c.tied == "transpose":
            head = "wte"
            table_t = self.node("Transpose", ["wte"], "lm_head/transpose", perm=[1, 0])
            logits = self.apply_linear(h, table_t, None, c.d, c.vocab, "lm_head")
        elif c.tied == "gemm":
            head = "wte"
            logits = self.apply_linear(h, "wte", None, c.d, c.vocab, "lm_head", trans_b=1)
        else:
            head = self.init("lm_head.weight", np.ascontiguousarray(table.T))
            logits = self.apply_linear(h, head, None, c.d, c.vocab, "lm_head")
        self.nodes.append(helper.make_node("Identity", [logits], ["logits"], name="logits_identity"))
        batch, seq = (["batch", "seq"] if c.dynamic else [c.batch, c.seq])
        outputs = [helper.make_tensor_value_info("logits", self.elem, [batch, seq, c.vocab])]
        for value in extra_outputs:  # the residual sum itself becomes the graph output h{i}
            self._rename(value, f"h{c.stream_output}")
            outputs.append(helper.make_tensor_value_info(f"h{c.stream_output}", self.elem, [batch, seq, c.d]))
        graph = helper.make_graph(
            self.nodes, "transformer",
            [helper.make_tensor_value_info("ids", TensorProto.INT64, [batch, seq])],
            outputs, self.inits,
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", self.opset)],
                                  ir_version=IR_FOR_OPSET[self.opset], producer_name="normfold-tests")
        return TransformerCase(c, model, list(self.ln_names), head, dict(self.arrays))


def build(config: Config | None = None, **knobs) -> TransformerCase:
    """Builds the transformer `config` describes (knobs override its fields)."""
    config = replace(config or Config(), **knobs)
    return _Builder(config).build()


def random_ids(case: TransformerCase, seed: int = 0) -> np.ndarray:
    c = case.config
    return np.random.default_rng(seed).integers(0, c.vocab, size=(c.batch, c.seq)).astype(np.int64)


def validate(case: TransformerCase, ids: np.ndarray | None = None) -> list[np.ndarray]:
    """Checks a built model: onnx.checker (full, with shape inference) and a run on onnxruntime giving
    finite logits of shape (batch, seq, vocab) in the model dtype. Returns the outputs."""
    c = case.config
    onnx.checker.check_model(case.model, full_check=True)
    ids = random_ids(case) if ids is None else ids
    outputs = run(case.model, ids)
    expected = (ids.shape[0], ids.shape[1], c.vocab)
    if outputs[0].shape != expected or outputs[0].dtype != np.dtype(c.dtype):
        raise AssertionError(f"logits {outputs[0].dtype}{outputs[0].shape}, expected {c.dtype}{expected}")
    if not all(np.isfinite(o).all() for o in outputs):
        raise AssertionError("non-finite outputs")
    return outputs


def run(model: onnx.ModelProto, ids: np.ndarray, *, optimize: bool = False) -> list[np.ndarray]:
    """Runs a model on onnxruntime's CPU provider (graph optimizations off unless asked)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"ids": ids})


_FLOATS = (TensorProto.FLOAT, TensorProto.FLOAT16)


def float64_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """The same model computing in float64: float initializers, Casts to float and float outputs become
    double. Run it with `exact_logits` (onnx's reference evaluator; onnxruntime lacks double Erf)."""
    wide = onnx.ModelProto()
    wide.CopyFrom(model)
    for i, tensor in enumerate(wide.graph.initializer):
        if tensor.data_type in _FLOATS:
            array = numpy_helper.to_array(tensor).astype(np.float64)
            wide.graph.initializer[i].CopyFrom(numpy_helper.from_array(array, tensor.name))
    for node in wide.graph.node:
        for attr in node.attribute:
            if attr.name == "to" and attr.i in _FLOATS:
                attr.i = TensorProto.DOUBLE
    for out in wide.graph.output:
        if out.type.tensor_type.elem_type in _FLOATS:
            out.type.tensor_type.elem_type = TensorProto.DOUBLE
    return wide


def exact_outputs(model: onnx.ModelProto, ids: np.ndarray) -> list[np.ndarray]:
    """The model's outputs computed in float64 (the ground truth a conversion is measured against)."""
    from onnx.reference import ReferenceEvaluator

    return ReferenceEvaluator(float64_model(model)).run(None, {"ids": ids})
