"""Tensor parallelism on torch.distributed (NCCL on CUDA, RCCL on ROCm, HCCL on Ascend, gloo on CPU).

=================  ======================================================================
module             what
=================  ======================================================================
``sharding.py``    which heads, MLP rows and vocabulary rows each rank holds
``group.py``       one rank's collectives (activations) and per-step messages (control)
``executor.py``    starting workers (spawn, or torchrun / ``env://``), watching, stopping
=================  ======================================================================
"""

from .group import TensorParallelError, TPGroup
from .sharding import ShardPlan, check_tensor_parallel

__all__ = ["ShardPlan", "TPGroup", "TensorParallelError", "check_tensor_parallel"]
