"""Step-time model of one scheduler step (one forward pass over the step's token table), on the
roofline of ``backends/roofline.py``.

The model runs in fp16/bf16 (2 bytes per element) on ``tp`` devices (tensor parallelism, 1 = one
device). Each kernel takes ``max(flops / (peak_flops * flops_eff), bytes / (peak_bw * bw_eff))``
on one rank's shapes; a step is

    step_overhead + layers * (QKV + O + GateUp + Down + attention + 2 all-reduces)
                  + embedding all-reduce + LM head + logits gather

* Linear op ``[N, K]`` over the step's ``T`` tokens: ``2*T*N*K`` FLOPs; bytes = weights read once
  per step (``N*K``) plus activations in and out (``T*K + T*N``).
* Attention is one kernel over all stages of the step (Meta-Attention launches once per layer). A
  stage with ``q`` new tokens after ``h`` cached ones does ``4*d*heads*(q*h + q*(q+1)/2)`` FLOPs
  (QK^T and S*V over the causal area: token ``i`` sees ``h + i`` keys) and reads K and V for its
  ``h + q`` positions (``2*kv_heads*d*(h+q)`` elements) plus Q in and O out (``2*heads*d*q``).
* LM head ``[vocab, hidden]``: weights once, and only the rows of stages that sample a token.
* ``step_overhead``: a fixed host-side cost per step (scheduling, sampling, launches).
* Tensor parallelism (``tp > 1``, Megatron-style as ``models/sharding.py``): each rank runs the
  per-rank GEMM shapes (``shapes.gemm_shapes``), its heads' attention and ``vocab / tp`` LM-head
  rows. A ring all-reduce of ``S`` bytes takes ``latency + 2 (tp - 1) / tp * S / (link_bw *
  link_eff)`` (the profile's ``device.interconnect``: NVLink, HCCS); ``S = tokens * hidden * 2``
  after O and down in every layer and after the embedding; gathering the sampled rows' fp32
  logits takes ``latency + (tp - 1) / tp * S / (link_bw * link_eff)``.

Not modelled: norms, rotary, activations and residual adds (elementwise, a few % of the bytes),
kernel launch gaps inside the forward, tile padding, overlap of communication with compute.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from ...backends.profile import load_profile
from ...backends.roofline import Peaks, datasheet_peaks, gemm_cost
from ...backends.roofline import attention_cost as layer_attention_cost
from .shapes import MODELS, gemm_shapes, rank_heads

DTYPE_BYTES = 2

# from the models' config.json (num_hidden_layers, vocab_size)
LAYERS = {"llama2-7b": 32, "qwen2-7b": 28, "llama2-70b": 80, "qwen2.5-72b": 80}
VOCAB = {"llama2-7b": 32000, "qwen2-7b": 152064, "llama2-70b": 32000, "qwen2.5-72b": 152064}

# defaults of DeviceSpec: achieved fraction of the datasheet peaks, and the host cost of a step
FLOPS_EFF = 0.7
BW_EFF = 0.8
STEP_OVERHEAD_S = 2e-3
LINK_EFF = 0.8  # achieved fraction of the interconnect's datasheet bandwidth


@dataclass(frozen=True)
class DeviceSpec:
    """Peaks of one device (FLOP/s and bytes/s) and the model's derating factors."""

    name: str
    peak_flops: float
    peak_bw: float
    flops_eff: float = FLOPS_EFF
    bw_eff: float = BW_EFF
    step_overhead: float = STEP_OVERHEAD_S
    link_bw: float | None = None  # bytes/s per direction per device (None: no interconnect stated)
    link_latency: float = 0.0  # seconds per collective
    link_eff: float = LINK_EFF
    memory: float | None = None  # bytes of device memory (None: not stated)

    def all_reduce_time(self, nbytes: float, tp: int) -> float:
        """Ring all-reduce of ``nbytes`` over ``tp`` devices."""
        return self._collective(2.0 * (tp - 1) / tp * nbytes, tp)

    def gather_time(self, nbytes: float, tp: int) -> float:
        """Gather of ``nbytes`` in total (``nbytes / tp`` from each device) onto one device."""
        return self._collective((tp - 1) / tp * nbytes, tp)

    def _collective(self, wire_bytes: float, tp: int) -> float:
        if tp == 1:
            return 0.0
        if self.link_bw is None:
            raise ValueError(f"profile {self.name!r} states no device.interconnect: tensor parallelism needs it")
        return self.link_latency + wire_bytes / (self.link_bw * self.link_eff)

    def kernel_time(self, flops: float, nbytes: float) -> float:
        """Roofline time of one kernel: compute- or memory-bound, whichever is slower."""
        return Peaks(self.peak_flops, self.peak_bw).time(flops, nbytes, self.flops_eff, self.bw_eff)


def load_shipped(name: str):
    """The repository's profile ``vendor/arch`` (e.g. ``cuda/sm90``), ignoring tuned files."""
    vendor, _, arch = name.partition("/")
    return load_profile(vendor, arch or None, tuned=False)


def device_spec(
    profile: str, flops_eff: float = FLOPS_EFF, bw_eff: float = BW_EFF, step_overhead: float = STEP_OVERHEAD_S
) -> DeviceSpec:
    """The fp16 peak and HBM bandwidth of the shipped profile ``vendor/arch`` (e.g. ``cuda/sm90``)."""
    prof = load_shipped(profile)
    tflops, gbps = datasheet_peaks(prof, 2)
    if not tflops or not gbps:
        raise ValueError(f"profile {profile!r} has no device.peak_tflops.fp16 / device.peak_gbps")
    dev = prof.data.get("device") or {}
    link = dev.get("interconnect") or {}
    link_bw = float(link["gbps"]) * 1e9 if link.get("gbps") else None
    memory = float(dev["memory_gib"]) * 2**30 if dev.get("memory_gib") else None
    return DeviceSpec(profile, tflops * 1e12, gbps * 1e9, flops_eff, bw_eff, step_overhead, link_bw,
                      float(link.get("latency_us", 0.0)) * 1e-6, LINK_EFF, memory)  # fmt: skip


def weight_bytes(model: str, tp: int = 1) -> float:
    """fp16 weight bytes one of ``tp`` ranks holds (its layer shards, norms aside, and its share of
    an untied embedding and LM head)."""
    per_layer = sum(g.N * g.K for g in gemm_shapes(model, tp))
    return DTYPE_BYTES * (LAYERS[model] * per_layer + 2 * VOCAB[model] * MODELS[model].hidden / tp)


@dataclass(frozen=True)
class StageShape:
    """What the step-time model needs of a scheduler stage: ``q`` new tokens after ``history``
    cached ones; ``samples`` when the stage ends at the sequence's last token (LM head row)."""

    q: int
    history: int
    samples: bool


def linear_cost(tokens: int, n: int, k: int) -> tuple[float, float]:
    """(FLOPs, bytes) of ``tokens x k`` times ``k x n`` with the weights read once."""
    return gemm_cost(tokens, n, k, DTYPE_BYTES)


def attention_cost(model: str, stages: Iterable[StageShape], tp: int = 1) -> tuple[float, float]:
    """(FLOPs, bytes) of one layer's attention on one of ``tp`` ranks over the step's stages
    (causal area, K/V read)."""
    d = MODELS[model]
    hq, hkv = rank_heads(d, tp)
    return layer_attention_cost([(st.q, st.history) for st in stages], hq, hkv, d.head_dim, DTYPE_BYTES)


def step_time(model: str, device: DeviceSpec, stages: list[StageShape], tp: int = 1) -> float:
    """Modelled seconds of one step running ``stages`` on ``tp`` devices (see the module docstring)."""
    return sum(step_time_parts(model, device, stages, tp).values())


def step_time_parts(model: str, device: DeviceSpec, stages: list[StageShape], tp: int = 1) -> dict[str, float]:
    """:func:`step_time` split into ``overhead``, ``compute`` (per-rank kernels) and ``comm``."""
    tokens = sum(st.q for st in stages)
    hidden = MODELS[model].hidden
    layer = sum(device.kernel_time(*linear_cost(tokens, g.N, g.K)) for g in gemm_shapes(model, tp))
    layer += device.kernel_time(*attention_cost(model, stages, tp))
    sampled = sum(st.samples for st in stages)
    vocab = -(-VOCAB[model] // tp)
    head = device.kernel_time(*linear_cost(sampled, vocab, hidden)) if sampled else 0.0
    act = tokens * hidden * DTYPE_BYTES
    comm = (2 * LAYERS[model] + 1) * device.all_reduce_time(act, tp)
    comm += device.gather_time(sampled * VOCAB[model] * 4, tp) if sampled else 0.0
    return {"overhead": device.step_overhead, "compute": LAYERS[model] * layer + head, "comm": comm}
