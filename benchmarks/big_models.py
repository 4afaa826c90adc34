#!/usr/bin/env python3
"""Big Pre-LN transformer models for the conversion-cost benchmark, built cheaply and streamed to disk.

    python benchmarks/big_models.py OUT.onnx --mb 2200 [--width 2048] [--seed 0] [--embedded]

The graph is written directly with onnx-ir (no torch, no export): token ids [1, seq] -> embedding
Gather -> `depth` Pre-LN blocks -> final LayerNormalization -> LM head MatMul, where each block is

    x = x + (LN1(x) @ W_attn + b_attn)                   (a linear token-wise stand-in for attention)
    x = x + (Relu(LN2(x) @ W_up + b_up) @ W_down + b_down)

so every norm reads the residual stream and every write to it is a linear projection: the structure
normfold's LayerNorm passes rewrite. Weights are seeded N(0, 1/fan_in) float32. With external data
(the default) each tensor is generated, appended to OUT.onnx.data and dropped, so building a model of
several GB needs the memory of its largest tensor only; the depth is chosen to reach about --mb.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

OPSET = 18
EPSILON = 1e-5


def parameter_bytes(width: int, depth: int, vocab: int) -> int:
    """float32 bytes of the model's weights: embedding and head (vocab x width each), and per block
    W_attn (width^2), W_up and W_down (4 width^2 each), plus the small vectors."""
    per_block = 9 * width * width + 4 * width + 2 * width + 4 * width
    return 4 * (2 * vocab * width + depth * per_block + 2 * width)


def depth_for(mb: float, width: int, vocab: int) -> int:
    """The number of blocks that brings the model closest to `mb` megabytes (at least 1)."""
    fixed = parameter_bytes(width, 0, vocab)
    block = parameter_bytes(width, 1, vocab) - fixed
    return max(1, round((mb * 1e6 - fixed) / block))


class _Writer:
    """Makes initializers: appended to one external data file (aligned to 4 KiB), or kept in memory."""

    def __init__(self, model_path: Path, rng: np.random.Generator, external: bool) -> None:
        self.rng = rng
        self.base_dir = str(model_path.parent.resolve())
        self.location = model_path.name + ".data"
        self.file = open(model_path.parent / self.location, "wb") if external else None  # noqa: SIM115
        self.initializers: list[ir.Value] = []

    def weight(self, name: str, shape: tuple[int, ...], scale: float | None = None, offset: float = 0.0):
        """offset + scale * N(0, 1), scale 1/sqrt(fan_in) by default."""
        array = self.rng.standard_normal(shape, dtype=np.float32)
        array *= np.float32(scale if scale is not None else 1.0 / np.sqrt(shape[0]))
        array += np.float32(offset)
        if self.file is None or array.nbytes < 1024:
            tensor = ir.tensor(array, name=name)
        else:
            offset = self.file.seek(0, os.SEEK_END)
            pad = -offset % 4096
            self.file.write(b"\0" * pad)
            self.file.write(array.tobytes())
            tensor = ir.ExternalTensor(self.location, offset + pad, array.nbytes, ir.DataType.FLOAT,
                                       shape=ir.Shape(shape), name=name, base_dir=self.base_dir)
        value = ir.Value(name=name, shape=ir.Shape(shape), type=ir.TensorType(ir.DataType.FLOAT), const_value=tensor)
        self.initializers.append(value)
        return value

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def build_pre_ln(path: str | os.PathLike, *, mb: float | None = None, width: int = 2048, depth: int | None = None,
                 vocab: int = 32000, seq: int = 16, seed: int = 0, external: bool = True) -> Path:
    """Writes a Pre-LN transformer (see the module docstring) to `path`; returns the path."""
    path = Path(path)
    if depth is None:
        depth = depth_for(mb if mb is not None else 100, width, vocab)
    rng = np.random.default_rng(seed)
    w = _Writer(path, rng, external)
    nodes: list[ir.Node] = []

    def op(op_type: str, *inputs, **attributes) -> ir.Value:
        node = ir.node(op_type, list(inputs), attributes=attributes, name=f"{op_type}_{len(nodes)}")
        node.outputs[0].name = f"{op_type.lower()}_{len(nodes)}"
        nodes.append(node)
        return node.outputs[0]

    def layernorm(x: ir.Value, prefix: str) -> ir.Value:
        gamma = w.weight(f"{prefix}.weight", (width,), scale=0.1, offset=1.0)
        beta = w.weight(f"{prefix}.bias", (width,), scale=0.1)
        return op("LayerNormalization", x, gamma, beta, axis=-1, epsilon=EPSILON)

    def linear(x: ir.Value, prefix: str, fan_in: int, fan_out: int) -> ir.Value:
        weight = w.weight(f"{prefix}.weight", (fan_in, fan_out))
        bias = w.weight(f"{prefix}.bias", (fan_out,), scale=0.02)
        return op("Add", op("MatMul", x, weight), bias)

    try:
        ids = ir.Value(name="input_ids", shape=ir.Shape([1, seq]), type=ir.TensorType(ir.DataType.INT64))
        x = op("Gather", w.weight("embed.weight", (vocab, width), scale=1.0), ids, axis=0)
        for i in range(depth):
            x = op("Add", x, linear(layernorm(x, f"h{i}.ln1"), f"h{i}.attn", width, width))
            up = op("Relu", linear(layernorm(x, f"h{i}.ln2"), f"h{i}.up", width, 4 * width))
            x = op("Add", x, linear(up, f"h{i}.down", 4 * width, width))
        head = w.weight("head.weight", (width, vocab))
        logits = op("MatMul", layernorm(x, "ln_f"), head)
        logits.name = "logits"
        logits.type, logits.shape = ir.TensorType(ir.DataType.FLOAT), ir.Shape([1, seq, vocab])
    finally:
        w.close()
    graph = ir.Graph([ids], [logits], nodes=nodes, initializers=w.initializers, opset_imports={"": OPSET},
                     name="pre_ln_transformer")
    model = ir.Model(graph, ir_version=10, producer_name="normfold-benchmarks")
    proto = ir.serde.serialize_model(model)
    if external:
        onnx.save(proto, str(path))
    else:
        onnx.save(proto, str(path), save_as_external_data=proto.ByteSize() > 2**31 - 1)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--mb", type=float, default=100, help="approximate size in MB (sets the depth)")
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--embedded", action="store_true", help="weights inside the .onnx (models under 2 GB)")
    args = parser.parse_args(argv)
    path = build_pre_ln(args.out, mb=args.mb, width=args.width, vocab=args.vocab, seed=args.seed,
                        external=not args.embedded)
    total = sum(p.stat().st_size for p in path.parent.glob(path.name + "*"))
    print(f"{path}: {total / 1e6:.0f} MB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
