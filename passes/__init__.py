"""The rewrite passes, one rewrite per module; `PASSES` maps each pass name to its class."""

from normfold.passes.emit_rmsnorm import EmitRMSNorm
from normfold.passes.fold_batchnorm import FoldBatchNorm
from normfold.passes.fold_norm_affine import FoldNormAffine
from normfold.passes.layernorm_to_crmsnorm import LayerNormToCRMSNorm
from normfold.passes.layernorm_to_rmsnorm import LayerNormToRMSNorm
from normfold.passes.remove_layernorm import RemoveLayerNorm

PASSES = {
    cls.name: cls
    for cls in (FoldBatchNorm, LayerNormToRMSNorm, LayerNormToCRMSNorm, EmitRMSNorm, FoldNormAffine, RemoveLayerNorm)
}

__all__ = ["PASSES", "EmitRMSNorm", "FoldBatchNorm", "FoldNormAffine", "LayerNormToCRMSNorm", "LayerNormToRMSNorm", "RemoveLayerNorm"]
