"""Verification tolerances that fit the execution provider the candidate runs on.

The reference always runs on CPU with every graph optimization off. A candidate on a GPU provider
carries that provider's own rounding on top of the rewrite's, so each output's default
(rtol, atol-before-scaling) is the elementwise max of the rewrite's row for the output dtype
(verification.TOLERANCES) and the floor of the provider's arithmetic, its *precision*:

    precision  when                                           floor (rtol, atol)  why
    fp32       CPU                                            none                the rewrite's own row
    fp32-gpu   CUDA with TF32 off; TensorRT with              (1e-4, 1e-4)        GPU kernels sum in other orders
               NVIDIA_TF32_OVERRIDE=0                                             and cuDNN may pick Winograd/FFT
                                                                                  convolutions: REFERENCE's fp32
                                                                                  LN->RMSNorm row
    tf32       CUDA with use_tf32 on; TensorRT fp32           (1e-2, 1e-2)        TF32 rounds matmul and conv
               (TensorRT builds TF32 kernels by default and                       operands to fp16's 10-bit
               onnxruntime has no option to stop it)                              mantissa: the fp16 row
    fp16       TensorRT with trt_fp16_enable                  (1e-2, 1e-2)        the fp16 row
    bf16       TensorRT with trt_bf16_enable                  (3e-2, 3e-2)        the bf16 row
    int8       TensorRT with trt_int8_enable                  none: give atol     quantization error depends on
                                                              and rtol            the calibration, not on a dtype

CUDA and TF32: onnxruntime's CUDA provider turns TF32 on by default (use_tf32=1). For verification
normfold turns it off unless the user set use_tf32 (`for_verification`): with TF32 the check could
only hold fp16 tolerances, 100x looser than a fold's, and would let a folding error of 1e-3 through.
Verifying in true fp32 keeps the fp32 rows meaningful; `use_tf32=1` verifies as deployed, with tf32
tolerances. Benchmarks keep onnxruntime's defaults. Explicit atol/rtol (global or per output)
override all of this.
"""

from __future__ import annotations

import os
from dataclasses import replace

from normfold.errors import InputError
from normfold.runtime import ProviderChoice

FLOORS: dict[str, tuple[float, float] | None] = {
    "fp32": None,
    "fp32-gpu": (1e-4, 1e-4),
    "tf32": (1e-2, 1e-2),
    "fp16": (1e-2, 1e-2),
    "bf16": (3e-2, 3e-2),
    "int8": None,
}
"""(rtol, atol-before-scaling) floor of each precision (see module docstring)."""


def for_verification(choice: ProviderChoice) -> ProviderChoice:
    """`choice` with CUDA's TF32 off unless the user set use_tf32 (CUDA also runs under TensorRT)."""
    if choice.used == "cpu" or "use_tf32" in choice.options:
        return choice
    return replace(choice, options={**choice.options, "use_tf32": "False"})


def precision(choice: ProviderChoice) -> str:
    """The coarsest arithmetic `choice` may run a float32 model in: a key of FLOORS."""
    if choice.used == "cpu":
        return "fp32"
    options = choice.options
    tf32_off = os.environ.get("NVIDIA_TF32_OVERRIDE") == "0"
    if choice.used == "tensorrt":
        for key, name in (("trt_int8_enable", "int8"), ("trt_bf16_enable", "bf16"), ("trt_fp16_enable", "fp16")):
            if _on(options.get(key)):
                return name
        return "fp32-gpu" if tf32_off else "tf32"
    return "fp32-gpu" if tf32_off or not _on(options.get("use_tf32", "True")) else "tf32"


def widen(row: tuple[float, float], precision_name: str) -> tuple[float, float]:
    """The default (rtol, atol) of an output: its dtype row, widened to the precision's floor."""
    if precision_name == "int8":
        raise InputError("TensorRT int8 (trt_int8_enable) quantizes the model, so its outputs have no default "
                         "tolerance: give --atol and --rtol (or a --tolerance per output)")
    floor = FLOORS[precision_name]
    if floor is None:
        return row
    return max(row[0], floor[0]), max(row[1], floor[1])


def _on(value: str | None) -> bool:
    return value is not None and value.strip().lower() in ("true", "1")
