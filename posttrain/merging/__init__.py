"""Model merging, tensor by tensor (mergekit's design): the methods (`methods`, one registered function each,
on the arithmetic of `ops`), the stream that feeds them slices of safetensors shards (`stream`), the
coefficient search (`search`) and which tensors of two models correspond (`compat`). The merge and transfer
stages (posttrain.stages.merge, .transfer, sharing posttrain.stages.combine) are built on these.
"""
from posttrain.merging import methods  # noqa: F401  (every merge method registers in MERGE_METHODS here)
