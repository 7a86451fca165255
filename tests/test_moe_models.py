"""Mixture-of-experts families (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE) against HF transformers:
fp32 greedy tokens across mixed prefill / decode steps, the prefix cache and n-gram speculation;
TP=2 and EP=2 against TP=1 on gloo; GGUF expert tensors (stacked, quantized) and transformers 5's
fused 3D expert tensors."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from test_tensor_parallel import assert_same_or_near_tie, greedy, wait_no_children
from tiny_models import TINY_MOE_VARIANTS, hf_greedy, make_tiny_moe, random_prompts

from portable_xy import LLM, SamplingParams
from portable_xy.backends.cpu import CpuBackend
from portable_xy.distributed import check_tensor_parallel
from portable_xy.models.loader import load_model_config

NEW = 24
ENGINE = dict(backend="cpu", dtype="float32", max_model_len=256)


def moe_prompts() -> list[list[int]]:
    """Mixed lengths (the long ones are chunked next to others' decodes), two sharing a prefix,
    one repeating a pattern (n-gram drafts)."""
    shared = random_prompts(1, [40], seed=5)[0]
    return random_prompts(4, [1, 9, 61, 5], seed=7) + [shared + [11, 12], shared + [13]] + [list(range(600, 612)) * 4]


def tokens(outs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outs]


def run(llm: LLM, prompts: list[list[int]]):
    # ignore_eos, not min_tokens (which masks EOS as HF's min_new_tokens does): n-gram speculation
    # is off for requests with min_tokens; these models seldom pick EOS greedily
    params = SamplingParams(temperature=0, max_tokens=NEW, ignore_eos=True)
    return llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)


@pytest.mark.parametrize("variant", list(TINY_MOE_VARIANTS))
def test_moe_greedy_matches_hf_mixed_steps_prefix_cache_and_ngram(variant, tiny_moe_models):
    path = tiny_moe_models[variant]
    prompts = moe_prompts()
    expected = hf_greedy(path, prompts, NEW)
    llm = LLM(path, max_num_batched_tokens=48, **ENGINE)
    assert tokens(run(llm, prompts)) == expected
    hits = llm.get_metrics()["prefix_cache_hit_tokens"]
    assert tokens(run(llm, prompts)) == expected  # the same prompts again: served from the prefix cache
    assert llm.get_metrics()["prefix_cache_hit_tokens"] > hits
    spec = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3}
    llm = LLM(path, max_num_batched_tokens=48, speculative_config=spec, **ENGINE)
    assert tokens(run(llm, prompts)) == expected
    assert llm.get_metrics()["spec_draft_tokens"] > 0


def test_parity_catches_a_dropped_routing_weight(tiny_moe_models, monkeypatch):
    """The parity check above fails when the second expert of each token is dropped."""
    path = tiny_moe_models["mixtral"]
    prompts = moe_prompts()[:3]
    expected = hf_greedy(path, prompts, NEW)
    route = CpuBackend.moe_route

    def dropped(self, logits, top_k, renormalize):
        w, ids = route(self, logits, top_k, renormalize)
        return w * torch.tensor([1.0] + [0.0] * (top_k - 1)), ids

    monkeypatch.setattr(CpuBackend, "moe_route", dropped)
    assert tokens(run(LLM(path, **ENGINE), prompts)) != expected


def test_moe_layers_use_their_experts(tiny_moe_models):
    """Skewed routing still spreads tokens over several experts, and dense layers stay dense."""
    llm = LLM(tiny_moe_models["qwen3_moe"], **ENGINE)
    model = llm.engine.runner.model
    seen = set()
    route = model.backend.moe_route

    def spy(logits, top_k, renormalize):
        w, ids = route(logits, top_k, renormalize)
        seen.update(ids.flatten().tolist())
        return w, ids

    model.backend.moe_route = spy
    run(llm, moe_prompts()[:3])
    assert len(seen) >= 4
    assert type(model.layers[0].mlp).__name__ == "DenseMLP"  # mlp_only_layers=[0]
    assert type(model.layers[1].mlp).__name__ == "SparseMoE"


@pytest.mark.parametrize("variant", ["qwen2_moe", "olmoe"])
def test_tp2_and_ep2_match_tp1(variant, tiny_moe_models):
    """Qwen2-MoE (shared expert, split like a dense MLP) and OLMoE (q/k norm over the whole width,
    all-reduced across ranks): experts split on their intermediate dim, then dealt whole."""
    prompts = [{"prompt_token_ids": p} for p in moe_prompts()]
    ref_outs = greedy(LLM(tiny_moe_models[variant], max_num_batched_tokens=64, **ENGINE), prompts, logprobs=5)
    for ep in (False, True):
        llm = LLM(tiny_moe_models[variant], tensor_parallel_size=2, enable_expert_parallel=ep,
                  max_num_batched_tokens=64, **ENGINE)  # fmt: skip
        try:
            assert_same_or_near_tie(ref_outs, greedy(llm, prompts))
        finally:
            llm.shutdown()
    assert wait_no_children() == []


def test_expert_parallel_settings_are_checked(tiny_moe_models, tiny_llama):
    with pytest.raises(ValueError, match="needs a mixture-of-experts model"):
        LLM(tiny_llama, enable_expert_parallel=True, **ENGINE)
    cfg = load_model_config(Path(tiny_moe_models["qwen2_moe"]))
    check_tensor_parallel(cfg, 4, expert_parallel=True)
    with pytest.raises(ValueError, match=r"expert parallel size 4 does not divide the model's num_experts=6"):
        check_tensor_parallel(dataclasses.replace(cfg, num_experts=6), 4, expert_parallel=True)
    with pytest.raises(ValueError, match=r"tensor parallel size 4 does not divide .* moe_intermediate_size=66"):
        check_tensor_parallel(dataclasses.replace(cfg, moe_intermediate_size=66), 4)
    with pytest.raises(ValueError, match=r"size 4 does not divide the model's shared_expert_intermediate_size=90"):
        check_tensor_parallel(dataclasses.replace(cfg, shared_expert_intermediate_size=90), 4, expert_parallel=True)


def test_fused_3d_expert_tensors_load_like_per_expert_ones(tiny_moe_models, tmp_path):
    """transformers 5's on-disk fused layout (``experts.gate_up_proj [E, 2I, H]``,
    ``experts.down_proj [E, H, I]``) gives the same tokens as the per-expert layout."""
    from safetensors.torch import load_file, save_file

    src = Path(tiny_moe_models["qwen3_moe"])
    state = load_file(src / "model.safetensors")
    fused = {}
    for name, t in state.items():
        if ".experts." not in name:
            fused[name] = t
    for layer in range(1, 3):
        p = f"model.layers.{layer}.mlp.experts."
        gate_up = [torch.cat([state[f"{p}{e}.gate_proj.weight"], state[f"{p}{e}.up_proj.weight"]]) for e in range(8)]
        fused[p + "gate_up_proj"] = torch.stack(gate_up)
        fused[p + "down_proj"] = torch.stack([state[f"{p}{e}.down_proj.weight"] for e in range(8)])
    for f in src.iterdir():
        if f.suffix != ".safetensors":
            (tmp_path / f.name).write_bytes(f.read_bytes())
    save_file(fused, tmp_path / "model.safetensors", metadata={"format": "pt"})
    prompts = moe_prompts()[:3]
    assert tokens(run(LLM(str(tmp_path), **ENGINE), prompts)) == tokens(run(LLM(str(src), **ENGINE), prompts))


def write_moe_gguf(hf_dir: str, path: Path, expert_type: str, arch: str = "qwen3moe") -> None:
    """A GGUF of an HF Qwen3-MoE (``qwen3moe``) or Mixtral (``llama`` with experts, Q/K rows in
    llama.cpp's permuted order) checkpoint, experts stacked per layer as llama.cpp writes them
    (``ffn_{gate,up,down}_exps`` [E, N, K]) in ``expert_type``."""
    from gguf import GGMLQuantizationType, GGUFWriter
    from gguf.quants import quantize
    from safetensors.torch import load_file

    cfg = json.loads((Path(hf_dir) / "config.json").read_text())
    mc = load_model_config(Path(hf_dir))
    state = {k: v.float().numpy() for k, v in load_file(Path(hf_dir) / "model.safetensors").items()}
    if arch == "llama":  # Mixtral's names as the other families'
        state = {k.replace("block_sparse_moe", "mlp").replace(".w1.", ".gate_proj.").replace(".w3.", ".up_proj.")
                 .replace(".w2.", ".down_proj."): v for k, v in state.items()}  # fmt: skip
    a, e = arch, mc.num_experts
    w = GGUFWriter(str(path), a)
    for key, val in [("block_count", mc.num_layers), ("embedding_length", mc.hidden_size),
                     ("feed_forward_length", mc.moe_intermediate_size), ("attention.head_count", mc.num_heads),
                     ("attention.head_count_kv", mc.num_kv_heads), ("attention.key_length", mc.head_dim),
                     ("vocab_size", mc.vocab_size), ("context_length", 256), ("expert_count", e),
                     ("expert_used_count", mc.num_experts_per_tok),
                     ("expert_feed_forward_length", mc.moe_intermediate_size)]:  # fmt: skip
        w.add_uint32(f"{a}.{key}", val)
    w.add_float32(f"{a}.attention.layer_norm_rms_epsilon", cfg["rms_norm_eps"])
    w.add_float32(f"{a}.rope.freq_base", mc.rope_theta)
    names = {"input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
             "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
             "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
             "self_attn.q_norm.weight": "attn_q_norm.weight", "self_attn.k_norm.weight": "attn_k_norm.weight",
             "mlp.gate.weight": "ffn_gate_inp.weight"}  # fmt: skip
    w.add_tensor("token_embd.weight", state["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", state["model.norm.weight"])
    w.add_tensor("output.weight", state["lm_head.weight"])
    heads = {"self_attn.q_proj.weight": mc.num_heads, "self_attn.k_proj.weight": mc.num_kv_heads}
    for i in range(mc.num_layers):
        p = f"model.layers.{i}."
        for hf, gg in names.items():
            if p + hf in state:
                t = state[p + hf]
                if arch == "llama" and hf in heads:  # llama.cpp's RoPE pairs adjacent dims
                    n = heads[hf]
                    t = t.reshape(n, 2, t.shape[0] // n // 2, -1).swapaxes(1, 2).reshape(t.shape)
                w.add_tensor(f"blk.{i}.{gg}", np.ascontiguousarray(t))
        for part, gg in (("gate_proj", "ffn_gate_exps"), ("up_proj", "ffn_up_exps"), ("down_proj", "ffn_down_exps")):
            stacked = np.stack([state[f"{p}mlp.experts.{j}.{part}.weight"] for j in range(e)])
            if expert_type == "F32":
                w.add_tensor(f"blk.{i}.{gg}.weight", stacked)
            else:
                qt = getattr(GGMLQuantizationType, expert_type)
                w.add_tensor(f"blk.{i}.{gg}.weight", quantize(stacked, qt), raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def qwen3_moe_all_sparse(tmp_path_factory, tokenizer_dir) -> str:
    """Qwen3-MoE with every layer sparse (GGUF has no mlp_only_layers) and 64-wide experts (whole
    quantization blocks)."""
    return make_tiny_moe("qwen3_moe", tmp_path_factory.mktemp("qwen3-moe-sparse"), tokenizer_dir, mlp_only_layers=[])


@pytest.mark.parametrize("arch", ["qwen3moe", "llama"])
def test_gguf_stacked_experts_match_hf(qwen3_moe_all_sparse, tiny_moe_models, tmp_path, arch):
    """GGUF ``qwen3moe`` and ``llama`` with experts (Mixtral) against HF on the same weights."""
    hf_dir = qwen3_moe_all_sparse if arch == "qwen3moe" else tiny_moe_models["mixtral"]
    path = tmp_path / "moe-f32.gguf"
    write_moe_gguf(hf_dir, path, "F32", arch)
    prompts = moe_prompts()[:4]
    gguf = LLM(str(path), skip_tokenizer_init=True, **ENGINE)
    want = "Qwen3MoeForCausalLM" if arch == "qwen3moe" else "MixtralForCausalLM"
    assert gguf.engine.runner.model.config.architecture == want
    assert tokens(run(gguf, prompts)) == hf_greedy(hf_dir, prompts, NEW)


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_1"])
def test_gguf_quantized_experts_stay_quantized_and_agree(qwen3_moe_all_sparse, tmp_path, qtype):
    """bf16 on the C kernels with the experts kept in their blocks (int8 activations): for the
    same routing, the experts' output agrees with the dequantized fp32 model's within the
    activation rounding (both read the same blocks), layer by layer."""
    from portable_xy.backends import cpu_native

    if cpu_native.load() is None:
        pytest.skip("the quantized CPU kernels need a C compiler (cpu_native)")
    path = tmp_path / f"moe-{qtype}.gguf"
    write_moe_gguf(qwen3_moe_all_sparse, path, qtype)
    q = LLM(str(path), skip_tokenizer_init=True, backend="cpu", dtype="bfloat16", max_model_len=256)
    ref = LLM(str(path), skip_tokenizer_init=True, **ENGINE)
    qm, rm = q.engine.runner.model, ref.engine.runner.model
    assert type(qm.layers[0].mlp.w13[0]).__name__ == "_QuantCpuWeight"
    g = torch.Generator().manual_seed(0)
    x = torch.randn(37, qm.config.hidden_size, generator=g)
    c = rm.config
    for lq, lr in zip(qm.layers, rm.layers):
        w, ids = rm.backend.moe_route(rm.backend.linear(x, lr.mlp.router), c.num_experts_per_tok, c.norm_topk_prob)
        got = qm.backend.fused_moe(x.bfloat16(), lq.mlp.w13, lq.mlp.w2, w, ids).float()
        want = rm.backend.fused_moe(x, lr.mlp.w13, lr.mlp.w2, w, ids)
        err = (got - want).norm() / want.norm()
        assert err < 0.03, f"relative error {err:.4f}"


def test_weights_are_owned_not_the_checkpoints_memory_map(tiny_moe_models):
    """safetensors hands out tensors on the file's memory map; the model keeps copies, so that the
    kernel cannot drop its weights under memory pressure and read them back from disk mid-step."""
    maps = Path("/proc/self/maps")
    if not maps.exists():
        pytest.skip("needs /proc/self/maps (Linux) to see which mapping holds a tensor")
    llm = LLM(tiny_moe_models["mixtral"], **ENGINE)  # fp32 checkpoint, fp32 model: no conversion copy
    layer = llm.engine.runner.model.layers[0]
    regions = []
    for line in maps.read_text().splitlines():
        span, *rest = line.split()
        if rest and rest[-1].endswith(".safetensors"):
            regions.append([int(x, 16) for x in span.split("-")])
    for t in (layer.input_norm, layer.mlp.w13[0], layer.mlp.w2[0], layer.o_proj):
        assert not any(a <= t.data_ptr() < b for a, b in regions)
