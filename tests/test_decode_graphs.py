"""The static-bucket decode path (``backends/graphs.py``) on CPU: the eager static path (the code a
CUDA / NPU graph captures, run without capture) under the Triton interpreter gives the dynamic
path's logits and greedy tokens for batch sizes that are not bucket sizes, padded rows never write
the KV cache (unused blocks hold NaN and must still hold it), and a bucket's token table keeps its
tensors and plan whatever the step's lengths. Fresh random caches, tokens and lengths each run."""

from __future__ import annotations

import os

import pytest
import torch

from portable_xy.backends import AttnMetadata, get_backend
from portable_xy.backends.graphs import DecodeGraphRunner, make_decode_graph_runner
from portable_xy.models.config import ModelConfig

pytest.importorskip("triton")

VOCAB, BLOCK, NUM_BLOCKS, MAX_LEN = 128, 16, 24, 64


def tiny_weights(c: ModelConfig, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Random HF-named weights (norms around 1) for ``c``."""
    h, i, d = c.hidden_size, c.intermediate_size, c.head_dim
    shapes = {
        "model.embed_tokens.weight": (c.vocab_size, h),
        "model.norm.weight": (h,),
        "lm_head.weight": (c.vocab_size, h),
    }
    for layer in range(c.num_layers):
        p = f"model.layers.{layer}."
        shapes.update({
            p + "self_attn.q_proj.weight": (c.num_heads * d, h), p + "self_attn.k_proj.weight": (c.num_kv_heads * d, h),
            p + "self_attn.v_proj.weight": (c.num_kv_heads * d, h), p + "self_attn.o_proj.weight": (h, c.num_heads * d),
            p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h), p + "mlp.down_proj.weight": (h, i),
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
        })  # fmt: skip
    return {
        name: 1 + 0.1 * torch.randn(shape, generator=gen) if "norm" in name else 0.2 * torch.randn(shape, generator=gen)
        for name, shape in shapes.items()
    }


@pytest.fixture(scope="module")
def setup():
    """The interpret backend and a tiny random fp32 Llama on it (the interpreter is slow: small
    dims, 128-token vocabulary)."""
    from portable_xy.models.llama import LlamaForCausalLM

    c = ModelConfig(
        architecture="LlamaForCausalLM", vocab_size=VOCAB, hidden_size=64, intermediate_size=64, num_layers=2,
        num_heads=4, num_kv_heads=2, head_dim=16, rms_norm_eps=1e-6, rope_theta=10000.0,
        max_position_embeddings=MAX_LEN, tie_word_embeddings=False, qkv_bias=False, qk_norm=False,
    )  # fmt: skip
    be = get_backend("interpret")
    return be, LlamaForCausalLM(c, tiny_weights(c, torch.Generator().manual_seed(0)), be, torch.float32, MAX_LEN)


@pytest.fixture
def gen() -> torch.Generator:
    seed = int(os.environ.get("PXY_TEST_SEED", int.from_bytes(os.urandom(4), "little")))
    print(f"PXY_TEST_SEED={seed}")
    return torch.Generator().manual_seed(seed)


def nan_caches(model, gen):
    """Random K/V in blocks 1.., NaN in block 0 (never handed out below)."""
    c = model.config
    caches = []
    for _ in range(c.num_layers):
        kv = [torch.randn(NUM_BLOCKS, BLOCK, c.num_kv_heads, c.head_dim, generator=gen) for _ in range(2)]
        for t in kv:
            t[0] = float("nan")
        caches.append(tuple(kv))
    return caches


def decode_meta(tables: list[list[int]], seq_lens: list[int]) -> AttnMetadata:
    """Token table of a decode step: sequence ``s`` (KV length ``seq_lens[s]`` after the step)
    feeds one token at position ``seq_lens[s] - 1``."""
    pos = [n - 1 for n in seq_lens]
    width = max(len(t) for t in tables)
    return AttnMetadata(
        query_start_loc=torch.arange(len(tables) + 1, dtype=torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32),
        slot_mapping=torch.tensor([t[p // BLOCK] * BLOCK + p % BLOCK for t, p in zip(tables, pos)]),
        positions=torch.tensor(pos),
        query_lens_cpu=[1] * len(tables),
        seq_lens_cpu=list(seq_lens),
    )


def runner_for(be, model, caches) -> DecodeGraphRunner:
    c = model.config
    fwd = lambda ids, meta: model.forward(ids, meta, caches)  # noqa: E731
    return DecodeGraphRunner(be, fwd, c.num_heads, c.num_kv_heads, BLOCK, MAX_LEN, capture=False)


@pytest.mark.parametrize("n", [3, 5])
def test_static_bucket_decode_matches_dynamic(setup, gen, n):
    """Two greedy decode steps of ``n`` sequences (padded to bucket 4 / 8) on the static path and
    on the dynamic path from the same caches: same logits, tokens and final caches; block 0 (read
    by the padded rows, written by none) still NaN."""
    be, model = setup
    c = model.config
    start = torch.randint(1, MAX_LEN - 1, (n,), generator=gen).tolist()  # KV length before the steps
    perm = (1 + torch.randperm(NUM_BLOCKS - 1, generator=gen)).tolist()
    tables = [perm[i * 4 : i * 4 + -(-(s + 2) // BLOCK)] for i, s in enumerate(start)]
    ids0 = torch.randint(3, VOCAB, (n,), generator=gen)
    dyn_caches = nan_caches(model, gen)
    st_caches = [(k.clone(), v.clone()) for k, v in dyn_caches]
    runner = runner_for(be, model, st_caches)
    assert runner.bucket(n) == {3: 4, 5: 8}[n]
    tokens = {}
    for name, caches in (("dynamic", dyn_caches), ("static", st_caches)):
        ids, out, logits = ids0, [], []
        for step in range(2):
            meta = decode_meta(tables, [s + step + 1 for s in start])
            if name == "static":
                assert runner.can_run(meta)
                hidden = runner.forward(ids, meta)
            else:
                be.prepare(meta, c.num_heads, c.num_kv_heads)
                hidden = model.forward(ids, meta, caches)
            assert hidden.shape == (n, c.hidden_size)
            logits.append(model.logits(hidden))
            ids = logits[-1].argmax(-1)
            out.append(ids.tolist())
        tokens[name] = (out, torch.stack(logits))
    assert tokens["static"][0] == tokens["dynamic"][0]
    torch.testing.assert_close(tokens["static"][1], tokens["dynamic"][1], atol=1e-4, rtol=1e-4)
    for (dk, dv), (sk, sv) in zip(dyn_caches, st_caches):
        torch.testing.assert_close(sk, dk, atol=1e-5, rtol=1e-5, equal_nan=True)
        torch.testing.assert_close(sv, dv, atol=1e-5, rtol=1e-5, equal_nan=True)
        assert sk[0].isnan().all() and sv[0].isnan().all()


def test_bucket_token_table_is_static(setup, gen):
    """Steps of 3 and 4 sequences with different lengths and table widths share bucket 4's token
    table: the same tensors (storage and shape) and the same fixed plan; padded rows get slot -1,
    seq_len 1 and zero block-table rows."""
    be, model = setup
    runner = runner_for(be, model, nan_caches(model, gen))
    seen = []
    for n, width in ((3, 1), (4, 4)):
        tables = [(1 + torch.randperm(NUM_BLOCKS - 1, generator=gen)[:width]).tolist() for _ in range(n)]
        seq_lens = torch.randint(1, width * BLOCK + 1, (n,), generator=gen).tolist()
        meta = decode_meta(tables, seq_lens)
        assert runner.load(torch.randint(3, VOCAB, (n,), generator=gen), meta) == 4
        sm = runner.static_meta(4)
        assert torch.equal(sm.seq_lens[:n], meta.seq_lens) and (sm.seq_lens[n:] == 1).all()
        assert (sm.slot_mapping[n:] == -1).all() and (sm.block_tables[n:] == 0).all()
        assert torch.equal(sm.block_tables[:n, :width], meta.block_tables) and (sm.block_tables[:n, width:] == 0).all()
        fields = ("query_start_loc", "seq_lens", "block_tables", "slot_mapping", "positions")
        seen.append(([(getattr(sm, f).data_ptr(), getattr(sm, f).shape) for f in fields], sm.plan))
    assert seen[0][0] == seen[1][0] and seen[0][1] is seen[1][1]
    assert seen[0][0][2][1] == (4, MAX_LEN // BLOCK)


def test_can_run_only_decode_steps_that_fit(setup, gen):
    be, model = setup
    runner = runner_for(be, model, nan_caches(model, gen))
    assert runner.can_run(decode_meta([[1]] * 8, [5] * 8))
    assert not runner.can_run(decode_meta([[1]] * 9, [5] * 9))  # more than the largest bucket
    wide = decode_meta([list(range(1, MAX_LEN // BLOCK + 2))], [MAX_LEN + 1])
    assert not runner.can_run(wide)  # longer than the graphs' block tables
    prefill = decode_meta([[1], [2]], [3, 4])
    prefill.query_lens_cpu = [2, 1]
    assert not runner.can_run(prefill)


def test_enforce_eager_policy():
    """interpret: eager by default, the eager static path with enforce_eager=False; cpu: never."""
    interp, cpu = get_backend("interpret"), get_backend("cpu")
    args = (lambda ids, meta: ids, 4, 2, BLOCK, MAX_LEN)
    assert make_decode_graph_runner(interp, *args, enforce_eager=None) is None
    assert make_decode_graph_runner(interp, *args, enforce_eager=True) is None
    static = make_decode_graph_runner(interp, *args, enforce_eager=False)
    assert static is not None and static.graphs is None and static.buckets == [1, 2, 4, 8]
    assert make_decode_graph_runner(cpu, *args, enforce_eager=False) is None
