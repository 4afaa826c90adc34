"""Calibration of LayerNorm removal on onnxruntime: each LayerNorm's average per-token std.

A LayerNorm computes y = (x - mu(x)) / sigma(x) * gamma + beta per token, with
    sigma(x) = sqrt(mean((x - mu(x))^2) + eps)    over the width (last) axis.
Removal (passes/remove_layernorm.py) replaces sigma(x) by a constant measured here, over the
calibration set, in float64:
    sigma      = mean of sigma(x) over every token at positions >= 1,
    sigma_first = mean of sigma(x) over the tokens at position 0 (the first token along the sequence
                  axis, the axis before the width), whose std differs (BOS / attention sink), as
                  Heimersheim 2024 and Baroni et al. 2025 measure it.
A LayerNorm input of rank < 3 has no sequence axis: every token counts towards `sigma` and
`sigma_first` is None.

Calibration data is an .npz of arrays keyed by graph input name, each with a leading batch of
samples (read with allow_pickle=False); it is fed in chunks of the model's batch size when that is
static, else of DYNAMIC_CHUNK samples. Each LayerNorm's input (normfold.detect: fused or
decomposed) is exposed as an extra graph output of a copy of the model; the model is not changed.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import onnx_ir as ir

from normfold import runtime
from normfold.detect import NormSite, find_sites
from normfold.errors import InputError
from normfold.verification import load_inputs

DYNAMIC_CHUNK = 8
"""Samples per run when the model's batch dim is dynamic (bounds the memory of the outputs)."""
_ORT_DTYPES = {
    "tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16,
    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int8)": np.int8, "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
}


@dataclass
class LayerStats:
    """One LayerNorm's calibrated std: `sigma` (positions >= 1) and `sigma_first` (position 0)."""

    name: str
    input: str
    sigma: float
    sigma_first: float | None
    tokens: int
    relative_spread: float
    """std of the per-token sigma over its mean (positions >= 1): 0 means the removal is exact."""

    def to_dict(self) -> dict:
        return asdict(self)


def load_calibration(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Calibration inputs from an .npz (no pickled objects): at least one array, all with the same
    leading (sample) dim, numeric or bool."""
    if not os.path.isfile(path):
        raise InputError(f"{path}: calibration file not found")
    arrays = load_inputs(path)
    if not arrays:
        raise InputError(f"{path}: the calibration file holds no arrays")
    for name, array in arrays.items():
        if array.ndim == 0 or array.dtype.kind not in "biuf":
            raise InputError(f"{path}: calibration array {name!r} must be a numeric array with a leading batch "
                             f"dim, got {array.dtype} of shape {list(array.shape)}")
    counts = {name: array.shape[0] for name, array in arrays.items()}
    if len(set(counts.values())) != 1:
        raise InputError(f"{path}: calibration arrays have different sample counts {counts}")
    if not next(iter(counts.values())):
        raise InputError(f"{path}: the calibration arrays hold no samples")
    return arrays


def batches(session, inputs: Mapping[str, np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
    """The calibration inputs as feeds for `session`, in chunks of its static batch size (else DYNAMIC_CHUNK).

    Refuses missing or unknown input names, dtypes of another kind, and a sample count that is not a
    multiple of a static batch size."""
    metas = {meta.name: meta for meta in session.get_inputs()}
    missing = sorted(set(metas) - set(inputs))
    unknown = sorted(set(inputs) - set(metas))
    if missing or unknown:
        raise InputError("calibration data does not match the model's inputs: "
                         + "; ".join(part for part in (
                             f"missing {', '.join(map(repr, missing))}" if missing else "",
                             f"no model input named {', '.join(map(repr, unknown))}" if unknown else "") if part))
    feeds = {name: _as_input(name, np.asarray(inputs[name]), meta) for name, meta in metas.items()}
    count = next(iter(feeds.values())).shape[0]
    static = {meta.shape[0] for meta in metas.values() if meta.shape and isinstance(meta.shape[0], int)}
    size = min(static) if static else min(count, DYNAMIC_CHUNK)
    if static and count % size:
        raise InputError(f"calibration data has {count} samples, not a multiple of the model's batch size {size}")
    for start in range(0, count, size):
        yield {name: array[start:start + size] for name, array in feeds.items()}


def _as_input(name: str, array: np.ndarray, meta) -> np.ndarray:
    want = _ORT_DTYPES.get(meta.type)
    if want is None:
        raise InputError(f"calibration input {name!r}: model input type {meta.type} is not supported")
    want = np.dtype(want)
    if array.dtype.kind != want.kind and not (array.dtype.kind in "iu" and want.kind in "iu"):
        raise InputError(f"calibration input {name!r} is {array.dtype}, the model expects {want}")
    if want.kind in "iu" and array.size and (array.min() < np.iinfo(want).min or array.max() > np.iinfo(want).max):
        raise InputError(f"calibration input {name!r} has values outside the range of {want}")
    if array.ndim != len(meta.shape):
        raise InputError(f"calibration input {name!r} has rank {array.ndim}, the model expects {len(meta.shape)}")
    return np.ascontiguousarray(array.astype(want, copy=False))


def run_model(model: ir.Model, inputs: Mapping[str, np.ndarray], *, extra: Sequence[ir.Value] = (),
              provider: str = "cpu") -> Iterator[tuple[dict[str, np.ndarray], dict[str, np.ndarray]]]:
    """Runs a copy of `model`, with `extra` values (of `model`) as additional outputs, on the calibration
    inputs, with graph optimizations off; yields (feeds, {output name: array}) per chunk."""
    copy = model.clone()
    by_name = {}
    for node in copy.graph:
        for out in node.outputs:
            by_name[out.name] = out
            if not out.is_graph_output():  # onnxruntime infers them; annotations may be stale
                out.shape, out.type = None, None
    present = {v.name for v in copy.graph.outputs}
    for value in extra:
        twin = by_name.get(value.name)
        if twin is None or twin.name in present:
            continue
        copy.graph.outputs.append(twin)  # untyped: onnxruntime infers it
        present.add(twin.name)
    with runtime.model_file(copy) as path:
        session = runtime.make_session(path, provider=provider, optimize=False)
        names = [meta.name for meta in session.get_outputs()]
        for feeds in batches(session, inputs):
            try:
                arrays = session.run(None, feeds)
            except Exception as exc:  # onnxruntime's own exception types
                message = runtime.ort_error_message(exc)
                raise InputError(f"onnxruntime failed on the calibration data: {message}") from None
            yield feeds, dict(zip(names, arrays))


def calibrate(model: ir.Model, inputs: Mapping[str, np.ndarray], sites: Sequence[NormSite] | None = None,
              *, provider: str = "cpu") -> list[LayerStats]:
    """LayerStats for each LayerNorm site (default: every LayerNorm normfold.detect finds), in order."""
    sites = [s for s in (find_sites(model) if sites is None else sites) if s.kind == "LayerNorm"]
    for i, site in enumerate(sites):
        if not site.x.name:
            site.x.name = f"normfold_calibration_{i}"
    accumulators = [_Accumulator(site) for site in sites]
    for feeds, outputs in run_model(model, inputs, extra=[s.x for s in sites], provider=provider):
        for acc in accumulators:
            x = acc.site.x
            acc.add(feeds[x.name] if x.name in feeds else outputs[x.name] if x.name in outputs
                    else np.broadcast_to(x.const_value.numpy(), (1, *x.const_value.shape)))  # a constant
    return [acc.result() for acc in accumulators]


class _Accumulator:
    """Running sums of per-token sigma (and sigma^2) for one LayerNorm, position 0 and the rest apart."""

    def __init__(self, site: NormSite) -> None:
        self.site = site
        self.eps = float(site.epsilon or 0.0)
        self.sums = {"rest": np.zeros(3), "first": np.zeros(3)}  # count, sum, sum of squares

    def add(self, x: np.ndarray) -> None:
        x = np.asarray(x, dtype=np.float64)
        centred = x - x.mean(axis=-1, keepdims=True)
        sigma = np.sqrt(np.mean(centred * centred, axis=-1) + self.eps)
        groups = {"first": sigma[..., 0], "rest": sigma[..., 1:]} if sigma.ndim >= 2 else {"rest": sigma}
        for key, part in groups.items():
            self.sums[key] += (part.size, part.sum(), np.square(part).sum())

    def result(self) -> LayerStats:
        first, rest = self.sums["first"], self.sums["rest"]
        main = rest if rest[0] else first  # sequences of length 1: only position 0 was seen
        mean = main[1] / main[0]
        spread = np.sqrt(max(main[2] / main[0] - mean * mean, 0.0)) / mean if mean > 0 else 0.0
        return LayerStats(
            name=self.site.name, input=self.site.x.name, sigma=float(mean),
            sigma_first=float(first[1] / first[0]) if first[0] and rest[0] else None,
            tokens=int(first[0] + rest[0]), relative_spread=float(spread))
