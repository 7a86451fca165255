"""portable_xy: a portable LLM inference engine with XY-Serve style meta-kernels in Triton."""

from .config import EngineConfig
from .llm import LLM
from .outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from .sampling_params import SamplingParams

__all__ = ["LLM", "EngineConfig", "CompletionOutput", "Logprob", "RequestMetrics", "RequestOutput", "SamplingParams"]
__version__ = "0.1.0"
