"""Step-time model of one scheduler step (one forward pass over the step's token table), on the
roofline of ``backends/roofline.py``.

The whole model runs on one device (TP = 1) in fp16/bf16 (2 bytes per element). Each kernel takes
``max(flops / (peak_flops * flops_eff), bytes / (peak_bw * bw_eff))``; a step is

    step_overhead + layers * (QKV + O + GateUp + Down + attention) + LM head

* Linear op ``[N, K]`` over the step's ``T`` tokens: ``2*T*N*K`` FLOPs; bytes = weights read once
  per step (``N*K``) plus activations in and out (``T*K + T*N``).
* Attention is one kernel over all stages of the step (Meta-Attention launches once per layer). A
  stage with ``q`` new tokens after ``h`` cached ones does ``4*d*heads*(q*h + q*(q+1)/2)`` FLOPs
  (QK^T and S*V over the causal area: token ``i`` sees ``h + i`` keys) and reads K and V for its
  ``h + q`` positions (``2*kv_heads*d*(h+q)`` elements) plus Q in and O out (``2*heads*d*q``).
* LM head ``[vocab, hidden]``: weights once, and only the rows of stages that sample a token.
* ``step_overhead``: a fixed host-side cost per step (scheduling, sampling, launches).

Not modelled: norms, rotary, activations and residual adds (elementwise, a few % of the bytes),
kernel launch gaps inside the forward, tile padding, and communication.
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
LAYERS = {"llama2-7b": 32, "qwen2-7b": 28, "qwen2.5-72b": 80}
VOCAB = {"llama2-7b": 32000, "qwen2-7b": 152064, "qwen2.5-72b": 152064}

# defaults of DeviceSpec: achieved fraction of the datasheet peaks, and the host cost of a step
FLOPS_EFF = 0.7
BW_EFF = 0.8
STEP_OVERHEAD_S = 2e-3


@dataclass(frozen=True)
class DeviceSpec:
    """Peaks of one device (FLOP/s and bytes/s) and the model's derating factors."""

    name: str
    peak_flops: float
    peak_bw: float
    flops_eff: float = FLOPS_EFF
    bw_eff: float = BW_EFF
    step_overhead: float = STEP_OVERHEAD_S

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
    tflops, gbps = datasheet_peaks(load_shipped(profile), 2)
    if not tflops or not gbps:
        raise ValueError(f"profile {profile!r} has no device.peak_tflops.fp16 / device.peak_gbps")
    return DeviceSpec(profile, tflops * 1e12, gbps * 1e9, flops_eff, bw_eff, step_overhead)


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


def attention_cost(model: str, stages: Iterable[StageShape]) -> tuple[float, float]:
    """(FLOPs, bytes) of one layer's attention over the step's stages (causal area, K/V read)."""
    d = MODELS[model]
    hq, hkv = rank_heads(d, 1)
    return layer_attention_cost([(st.q, st.history) for st in stages], hq, hkv, d.head_dim, DTYPE_BYTES)


def step_time(model: str, device: DeviceSpec, stages: list[StageShape]) -> float:
    """Modelled seconds of one step running ``stages`` (see the module docstring)."""
    tokens = sum(st.q for st in stages)
    layer = sum(device.kernel_time(*linear_cost(tokens, g.N, g.K)) for g in gemm_shapes(model, 1))
    layer += device.kernel_time(*attention_cost(model, stages))
    sampled = sum(st.samples for st in stages)
    head = device.kernel_time(*linear_cost(sampled, VOCAB[model], MODELS[model].hidden)) if sampled else 0.0
    return device.step_overhead + LAYERS[model] * layer + head
