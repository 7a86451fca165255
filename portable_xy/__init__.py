"""portable_xy: a portable LLM inference engine with XY-Serve style meta-kernels in Triton."""

from .async_llm import AsyncLLM
from .config import EngineConfig
from .llm import LLM
from .outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from .sampling_params import RequestOutputKind, SamplingParams

__all__ = [
    "LLM", "AsyncLLM", "EngineConfig", "CompletionOutput", "Logprob", "RequestMetrics", "RequestOutput",
    "RequestOutputKind", "SamplingParams",
]  # fmt: skip
__version__ = "0.1.0"
