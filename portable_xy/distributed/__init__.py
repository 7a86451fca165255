"""Tensor parallelism on torch.distributed (NCCL on CUDA, RCCL on ROCm, HCCL on Ascend, gloo on CPU).

=================  ======================================================================
module             what
=================  ======================================================================
``group.py``       one rank's collectives (activations) and per-step messages (control)
``executor.py``    starting workers (spawn, or torchrun / ``env://``), watching, stopping
=================  ======================================================================
"""

from ..models.sharding import ShardPlan, check_tensor_parallel  # which rank holds what: the models'
from .group import TensorParallelError, TPGroup

__all__ = ["ShardPlan", "TPGroup", "TensorParallelError", "check_tensor_parallel"]
