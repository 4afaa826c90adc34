"""The folding arithmetic, written once, in float64; shared by the ONNX and torch.fx passes.

Inference-mode BatchNorm is the per-channel affine map BN(y)_c = s_c * y_c + t_c with
    s = gamma / sqrt(var + eps),    t = beta - s * mean.
Folding it into a linear producer y = W x + b (BN after) gives W' = diag(s) W, b' = s * b + t.
Folding it into a linear consumer z = W BN(x) + b (BN before) gives W' = W diag(s), b' = b + W t,
where "W t" sums over every input channel and kernel tap, which is exact only if no tap ever reads
padding (a padded tap would see 0 instead of t_c).

Every function takes and returns float64 arrays; callers cast back to the model dtype once.
"""

from __future__ import annotations

import numpy as np

def bn_scale_shift(gamma, beta, mean, var, eps: float) -> tuple[np.ndarray, np.ndarray]:
    """s = gamma / sqrt(var + eps), t = beta - s * mean (all float64)."""
    gamma, beta, mean, var = (np.asarray(a, dtype=np.float64).reshape(-1) for a in (gamma, beta, mean, var))
    scale = gamma / np.sqrt(var + np.float64(eps))
    return scale, beta - scale * mean


def scale_channels(weight: np.ndarray, scale: np.ndarray, *, axis: int, groups: int = 1) -> np.ndarray:
    """W' = W with channel c along `axis` multiplied by scale[c].

    With `groups` > 1 the channels are ConvTranspose's output channels and the weight has
    ConvTranspose's layout (C_in, C_out/G, k...): input channel i belongs to group g = i // (C_in/G),
    and W'[i, j, ...] = W[i, j, ...] * scale[g * C_out/G + j].
    """
    weight = np.asarray(weight, dtype=np.float64)
    if groups == 1:
        shape = [1] * weight.ndim
        shape[axis] = -1
        return weight * scale.reshape(shape)
    per_group = scale.reshape(groups, -1)
    factors = np.repeat(per_group, weight.shape[0] // groups, axis=0)
    return weight * factors.reshape(factors.shape + (1,) * (weight.ndim - 2))


def scale_input_channels(weight: np.ndarray, scale: np.ndarray, *, groups: int = 1) -> np.ndarray:
    """W' = W with input channel c multiplied by scale[c]; layout (C_out, C_in/G, k...).

    Output channel o of group g = o // (C_out/G) reads input channel g * C_in/G + j at W[o, j].
    """
    return weight * _input_channel_factors(weight, scale, groups)


def input_shift_bias(weight: np.ndarray, shift: np.ndarray, *, groups: int = 1) -> np.ndarray:
    """b_delta[o] = sum over j, k of W[o, j, k] * shift[g(o) * C_in/G + j]: the bias a constant input shift adds."""
    weight = np.asarray(weight, dtype=np.float64)
    shifted = weight * _input_channel_factors(weight, shift, groups)
    return shifted.reshape(weight.shape[0], -1).sum(axis=1)


def _input_channel_factors(weight: np.ndarray, per_channel: np.ndarray, groups: int) -> np.ndarray:
    weight = np.asarray(weight, dtype=np.float64)
    per_group = per_channel.reshape(groups, -1)
    factors = np.repeat(per_group, weight.shape[0] // groups, axis=0)
    return factors.reshape(factors.shape + (1,) * (weight.ndim - 2))


def affine_after_bias(bias: np.ndarray | None, scale: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """b' = s * b + t, the bias of a producer followed by the per-channel affine (s, t); b = 0 if absent."""
    if bias is None:
        return shift.copy()
    return scale * np.asarray(bias, dtype=np.float64) + shift


def recentre(array: np.ndarray, *, axis: int, width: int | None = None) -> np.ndarray:
    """a - mean_axis(a): every slice along `axis` made zero-mean (float64).

    A size-1 axis is first broadcast to `width` (a constant added uniformly along the width becomes 0).
    Applied to a weight along its output axis, y = x W' gives y - mean(y) 1 for every x:
    W' = W - (1/d) W 1 1^T for y = x W, the paper's A' = A - (1/d) 1 1^T A for y = A x.
    """
    array = np.asarray(array, dtype=np.float64)
    if width is not None and array.shape[axis] == 1 and width > 1:
        shape = list(array.shape)
        shape[axis] = width
        array = np.broadcast_to(array, shape)
    return array - array.mean(axis=axis, keepdims=True)


def crms_input_weight(weight: np.ndarray, gamma: np.ndarray, *, axis: int) -> np.ndarray:
    """The weight a linear reader of a CRMSNorm output needs, with the norm's gamma folded in.

    The norm output n is zero-mean, stored as its first d-1 elements, n_d = -sum_{i<d} n_i. With
    A = diag(gamma) W (rows along `axis` are input features), n A = sum_{i<d} n_i (A_i - A_d):
    A'_i = A_i - A_d for i < d (REFERENCE.md, Pre-CRMSNorm input projections).
    """
    scaled = scale_channels(weight, np.asarray(gamma, dtype=np.float64), axis=axis)
    width = scaled.shape[axis]
    head = np.take(scaled, np.arange(width - 1), axis=axis)
    last = np.take(scaled, [width - 1], axis=axis)
    return head - last


def fakeln_reader(weight: np.ndarray, bias: np.ndarray | None, gamma: np.ndarray, beta: np.ndarray | None,
                  sigma: float) -> tuple[np.ndarray, np.ndarray]:
    """A linear y = n W + b reading n = c / sigma * gamma + beta (FakeLN of a centred c), as y = c W' + b'.

    W is (in, out) (rows along input features): W' = diag(gamma / sigma) W, b' = b + beta W (b = 0 and
    beta = 0 when absent).
    """
    weight = np.asarray(weight, dtype=np.float64)
    scaled = scale_channels(weight, np.asarray(gamma, dtype=np.float64) / np.float64(sigma), axis=0)
    new_bias = np.zeros(weight.shape[1]) if bias is None else np.asarray(bias, dtype=np.float64).copy()
    if beta is not None:
        new_bias += np.asarray(beta, dtype=np.float64) @ weight
    return scaled, new_bias
