"""The model registry: HF ``architectures`` and GGUF ``general.architecture`` names -> the model
class that runs them and the family's config adapter.

A family is one model file under ``portable_xy/models/`` (its layers and ``forward``, plus the
class attributes the loader reads: the GGUF weight-name map, which GGUF Q/K weights llama.cpp
permuted, the shard plan) and one :class:`ModelEntry` per architecture name here. Shared layers
(weight loading with tensor-parallel slices and quantized blocks, vocab-parallel embedding and
head) are in ``layers.py``; RoPE variants in ``config.py``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


class UnsupportedModelError(ValueError):
    pass


@dataclass(frozen=True)
class ModelEntry:
    """One architecture name: ``model`` is ``"module:Class"`` under ``portable_xy.models`` (imported
    when first used; a dotted module is imported as it is), or the class itself (an out-of-tree
    model); ``adapt(hf_config) -> {field: value}`` the family's own config fields (and
    the place to refuse options the model file does not implement), ``gguf`` the GGUF
    ``general.architecture`` names that load as this architecture."""

    architecture: str
    model: str | type
    adapt: Callable[[dict[str, Any]], dict[str, Any]]
    gguf: tuple[str, ...] = ()

    def model_class(self) -> type:
        if isinstance(self.model, type):
            return self.model
        module, cls = self.model.split(":")
        return getattr(importlib.import_module(module if "." in module else f"portable_xy.models.{module}"), cls)


def _llama_family(**fixed: bool) -> Callable[[dict[str, Any]], dict[str, Any]]:
    def adapt(cfg: dict[str, Any]) -> dict[str, Any]:
        from .llama import llama_config

        return llama_config(cfg, **fixed)

    return adapt


def _moe_family(**fixed: bool) -> Callable[[dict[str, Any]], dict[str, Any]]:
    def adapt(cfg: dict[str, Any]) -> dict[str, Any]:
        from .moe import moe_config

        return moe_config(cfg, **fixed)

    return adapt


MODELS: dict[str, ModelEntry] = {
    e.architecture: e
    for e in (
        ModelEntry("LlamaForCausalLM", "llama:LlamaForCausalLM", _llama_family(), ("llama",)),
        ModelEntry("MistralForCausalLM", "llama:LlamaForCausalLM", _llama_family()),
        ModelEntry("Qwen2ForCausalLM", "llama:LlamaForCausalLM", _llama_family(qkv_bias=True), ("qwen2",)),
        ModelEntry("Qwen3ForCausalLM", "llama:LlamaForCausalLM", _llama_family(qk_norm=True), ("qwen3",)),
        # mixture of experts (moe.py); a GGUF "llama" with experts is a Mixtral ("+moe")
        ModelEntry(
            "MixtralForCausalLM", "moe:MixtralForCausalLM", _moe_family(always_renormalize=True), ("llama+moe",)
        ),  # fmt: skip
        ModelEntry(
            "Qwen2MoeForCausalLM", "moe:MoEForCausalLM", _moe_family(qkv_bias=True, shared_expert=True), ("qwen2moe",)
        ),  # fmt: skip
        ModelEntry("Qwen3MoeForCausalLM", "moe:MoEForCausalLM", _moe_family(qk_norm=True), ("qwen3moe",)),
        ModelEntry("OlmoeForCausalLM", "moe:MoEForCausalLM", _moe_family(qk_norm_full=True), ("olmoe",)),
    )
}


def register_model(entry: ModelEntry) -> None:
    """Add (or replace) an architecture: out-of-tree model files register themselves this way."""
    MODELS[entry.architecture] = entry


def supported_architectures() -> list[str]:
    return sorted(MODELS)


def gguf_architectures() -> dict[str, str]:
    """GGUF ``general.architecture`` -> HF architecture name."""
    return {g: e.architecture for e in MODELS.values() for g in e.gguf}


def entry_for(architectures: list[str], model_type: str | None = None) -> ModelEntry:
    """The entry of the first supported name in an HF config's ``architectures``."""
    for a in architectures:
        if a in MODELS:
            return MODELS[a]
    raise UnsupportedModelError(
        f"unsupported architecture {architectures or model_type!r}; supported: {supported_architectures()}"
    )


def entry_for_gguf(name: str | None, moe: bool = False) -> ModelEntry:
    """The entry of a GGUF ``general.architecture``; ``moe``: the file has experts (an entry
    registered as ``name+moe`` wins)."""
    archs = gguf_architectures()
    if moe and f"{name}+moe" in archs:
        return MODELS[archs[f"{name}+moe"]]
    if name not in archs:
        raise UnsupportedModelError(f"unsupported GGUF architecture {name!r}; supported: {sorted(archs)}")
    return MODELS[archs[name]]
