"""LayerNorm removal with calibrated fine-tuning, on torch (imports torch; the ONNX side never imports it).

calibration  per-norm average per-token std (position 0 apart), measured with forward hooks
fakeln       FakeLN(x) = (x - mean(x)) / sigma * gamma + beta, a norm switchable between LN and FakeLN
gpt2         where the norms of a transformers GPT-2 are, split into MLP / attention q,k / v / final
schedule     the published removal order and optimisation recipe, scaled to any model size
data         deterministic token batches, split over ranks
trainer      the fine-tuning loop (one process or DistributedDataParallel), checkpoints and resume
fold         the real removal: FakeLN folded into the linears, centring into the stream's writers
export       ONNX export of the LN-free model, its norm-op count and its check on onnxruntime
"""
