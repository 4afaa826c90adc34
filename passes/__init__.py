"""The rewrite passes, one rewrite per module; `PASSES` maps each pass name to its class."""

from normfold.passes.fold_batchnorm import FoldBatchNorm

PASSES = {cls.name: cls for cls in (FoldBatchNorm,)}

__all__ = ["PASSES", "FoldBatchNorm"]
