"""Shared fixtures: tiny random Llama / Qwen2 / Qwen3 checkpoints written with HF
``save_pretrained`` (no hub access), the SmolLM2 tokenizer, and engines built on them."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Triton decides at import time whether @triton.jit functions are interpreted: every in-process
# kernel run in this suite uses the interpreter on CPU tensors (CUDA compilation checks run in
# subprocesses, see tests/test_aot.py).
os.environ.setdefault("TRITON_INTERPRET", "1")

from tiny_models import TINY_MOE_VARIANTS, TINY_VARIANTS, make_tiny_model, make_tiny_moe  # noqa: E402


@pytest.fixture(scope="session")
def smollm2_path():
    from portable_xy.models.loader import default_model_path

    return default_model_path()


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory, smollm2_path):
    """The SmolLM2 tokenizer (from the GGUF) saved as a plain HF tokenizer directory."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(smollm2_path.parent), gguf_file=smollm2_path.name)
    out = tmp_path_factory.mktemp("tokenizer")
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, tokenizer_dir) -> dict[str, str]:
    return {v: make_tiny_model(v, tmp_path_factory.mktemp(f"tiny-{v}"), tokenizer_dir) for v in TINY_VARIANTS}


@pytest.fixture(scope="session")
def tiny_moe_models(tmp_path_factory, tokenizer_dir) -> dict[str, str]:
    return {v: make_tiny_moe(v, tmp_path_factory.mktemp(f"tiny-{v}"), tokenizer_dir) for v in TINY_MOE_VARIANTS}


@pytest.fixture(scope="session")
def tiny_llama(tiny_models) -> str:
    return tiny_models["llama"]


@pytest.fixture(scope="session")
def tiny_llm(tiny_llama):
    """A cpu-backend fp32 engine on the tiny Llama, shared by tests that only read from it."""
    from portable_xy import LLM

    return LLM(tiny_llama, backend="cpu", dtype="float32", max_model_len=512)
