"""The static-bucket decode path (``backends/graphs.py``).

On CPU: the eager static path (the code a CUDA / NPU graph captures, run without capture) under the
Triton interpreter gives the dynamic path's logits and greedy tokens for batch sizes that are not
bucket sizes, padded rows never write the KV cache (unused block 0 holds NaN and must still hold
it), a bucket's token table keeps its tensors and plan whatever the step's lengths, and
``LLM(enforce_eager=False)`` on ``interpret`` runs its decode steps there with the same tokens.
Marked ``cuda`` / ``npu`` (skipped without the hardware; run with ``TRITON_INTERPRET=0``): graph
capture + replay equals the eager static path bit for bit and the dynamic path within bf16
tolerance for several batch sizes and contexts, and greedy ``generate`` with graphs equals
``enforce_eager=True``. Fresh random caches, tokens and lengths each run."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from test_device_kernels import DEVICES, _device_backend

from portable_xy import LLM, SamplingParams
from portable_xy.backends import AttnMetadata, Backend, get_backend
from portable_xy.backends.graphs import DecodeGraphRunner, graph_module, make_decode_graph_runner
from portable_xy.models.llama import LlamaForCausalLM
from portable_xy.models.loader import open_weights

pytest.importorskip("triton")

BLOCK = 16
CPU_MODEL = dict(vocab=128, hidden=64, inter=64, heads=4, kv_heads=2, head_dim=16, max_len=64, layers=1)  # interpreter
DEVICE_MODEL = dict(vocab=1024, hidden=256, inter=512, heads=8, kv_heads=2, head_dim=64, max_len=1024)


def write_tiny_llama(path: Path, vocab, hidden, inter, heads, kv_heads, head_dim, max_len, layers=2) -> str:
    """An HF Llama directory (config.json + safetensors) with random weights (norms around 1)."""
    from safetensors.torch import save_file

    cfg = dict(
        architectures=["LlamaForCausalLM"], vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
        max_position_embeddings=max_len, rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False,
    )  # fmt: skip
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,)}
    shapes["lm_head.weight"] = (vocab, hidden)
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "self_attn.q_proj.weight": (heads * head_dim, hidden),
            p + "self_attn.k_proj.weight": (kv_heads * head_dim, hidden),
            p + "self_attn.v_proj.weight": (kv_heads * head_dim, hidden),
            p + "self_attn.o_proj.weight": (hidden, heads * head_dim),
            p + "mlp.gate_proj.weight": (inter, hidden), p + "mlp.up_proj.weight": (inter, hidden),
            p + "mlp.down_proj.weight": (hidden, inter),
            p + "input_layernorm.weight": (hidden,), p + "post_attention_layernorm.weight": (hidden,),
        })  # fmt: skip
    g = torch.Generator().manual_seed(0)
    state = {
        name: (1 + 0.1 * torch.randn(shape, generator=g)) if "norm" in name else 0.2 * torch.randn(shape, generator=g)
        for name, shape in shapes.items()
    }
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(cfg))
    save_file(state, str(path / "model.safetensors"))
    return str(path)


def load_model(be: Backend, path: str, dtype: torch.dtype, max_len: int) -> LlamaForCausalLM:
    weights = open_weights(Path(path))
    return LlamaForCausalLM(weights.config, weights, be, dtype, max_len)


@pytest.fixture(scope="module")
def cpu_model_dir(tmp_path_factory) -> str:
    return write_tiny_llama(tmp_path_factory.mktemp("tiny-llama-graphs"), **CPU_MODEL)


@pytest.fixture(scope="module")
def setup(cpu_model_dir):
    """The interpret backend and the tiny fp32 Llama on it (small dims: the interpreter is slow)."""
    be = get_backend("interpret")
    return be, load_model(be, cpu_model_dir, torch.float32, CPU_MODEL["max_len"])


@pytest.fixture
def gen() -> torch.Generator:
    seed = int(os.environ.get("PXY_TEST_SEED", int.from_bytes(os.urandom(4), "little")))
    print(f"PXY_TEST_SEED={seed}")
    return torch.Generator().manual_seed(seed)


def nan_caches(model: LlamaForCausalLM, num_blocks: int, dtype: torch.dtype, gen) -> list:
    """Random K/V in blocks 1.., NaN in block 0 (never handed out by the tests), on the device."""
    c, dev = model.config, model.backend.device
    caches = []
    for _ in range(c.num_layers):
        kv = [torch.randn(num_blocks, BLOCK, c.num_kv_heads, c.head_dim, generator=gen).to(dev, dtype) for _ in "kv"]
        for t in kv:
            t[0] = float("nan")
        caches.append(tuple(kv))
    return caches


def random_tables(seq_lens: list[int], num_blocks: int, gen) -> list[list[int]]:
    """Distinct random blocks (never block 0) for each sequence's KV length."""
    perm = (1 + torch.randperm(num_blocks - 1, generator=gen)).tolist()
    out, used = [], 0
    for n in seq_lens:
        k = -(-n // BLOCK)
        out.append(perm[used : used + k])
        used += k
    return out


def decode_meta(tables: list[list[int]], seq_lens: list[int], device="cpu") -> AttnMetadata:
    """Token table of a decode step: sequence ``s`` (KV length ``seq_lens[s]`` after the step)
    feeds one token at position ``seq_lens[s] - 1``."""
    pos = [n - 1 for n in seq_lens]
    width = max(len(t) for t in tables)
    return AttnMetadata(
        query_start_loc=torch.arange(len(tables) + 1, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32, device=device),
        slot_mapping=torch.tensor([t[p // BLOCK] * BLOCK + p % BLOCK for t, p in zip(tables, pos)], device=device),
        positions=torch.tensor(pos, device=device),
        query_lens_cpu=[1] * len(tables),
        seq_lens_cpu=list(seq_lens),
    )


def runner_for(model: LlamaForCausalLM, caches: list, max_len: int, capture: bool) -> DecodeGraphRunner:
    c = model.config
    fwd = lambda ids, meta: model.forward(ids, meta, caches)  # noqa: E731
    return DecodeGraphRunner(model.backend, fwd, c.num_heads, c.num_kv_heads, BLOCK, max_len, capture=capture)


def dynamic_forward(model: LlamaForCausalLM, ids: torch.Tensor, meta: AttnMetadata, caches: list) -> torch.Tensor:
    model.backend.prepare(meta, model.config.num_heads, model.config.num_kv_heads, model.config.head_dim)
    return model.forward(ids, meta, caches)


def assert_same_caches(a: list, b: list, tol: float) -> None:
    """Same K/V everywhere (NaN where NaN), block 0 still all NaN in both."""
    for x, y in zip((t for kv in a for t in kv), (t for kv in b for t in kv)):
        torch.testing.assert_close(x, y, atol=tol, rtol=tol, equal_nan=True)
        assert x[0].isnan().all() and y[0].isnan().all()


# ---- CPU: the eager static path under the interpreter -------------------------------------------
@pytest.mark.parametrize("n", [3, 5])
def test_static_bucket_decode_matches_dynamic(setup, gen, n):
    """Two greedy decode steps of ``n`` sequences (padded to bucket 4 / 8) on the static path and
    on the dynamic path from the same caches: same logits, tokens and final caches."""
    be, model = setup
    max_len, num_blocks = CPU_MODEL["max_len"], 24
    start = torch.randint(1, max_len - 1, (n,), generator=gen).tolist()  # KV length before the steps
    tables = random_tables([s + 2 for s in start], num_blocks, gen)
    ids0 = torch.randint(3, CPU_MODEL["vocab"], (n,), generator=gen)
    dyn_caches = nan_caches(model, num_blocks, torch.float32, gen)
    st_caches = [(k.clone(), v.clone()) for k, v in dyn_caches]
    runner = runner_for(model, st_caches, max_len, capture=False)
    assert runner.bucket(n) == {3: 4, 5: 8}[n]
    got = {}
    for name in ("dynamic", "static"):
        ids, tokens, logits = ids0, [], []
        for step in range(2):
            meta = decode_meta(tables, [s + step + 1 for s in start])
            if name == "static":
                assert runner.can_run(meta)
                hidden = runner.forward(ids, meta)
            else:
                hidden = dynamic_forward(model, ids, meta, dyn_caches)
            assert hidden.shape == (n, model.config.hidden_size)
            logits.append(model.logits(hidden))
            ids = logits[-1].argmax(-1)
            tokens.append(ids.tolist())
        got[name] = (tokens, torch.stack(logits))
    assert got["static"][0] == got["dynamic"][0]
    torch.testing.assert_close(got["static"][1], got["dynamic"][1], atol=1e-4, rtol=1e-4)
    assert_same_caches(st_caches, dyn_caches, 1e-5)


def test_bucket_token_table_is_static(setup, gen):
    """Steps of 3 and 4 sequences with different lengths and table widths share bucket 4's token
    table: the same tensors (storage and shape) and the same fixed plan; padded rows get slot -1,
    seq_len 1 and zero block-table rows."""
    be, model = setup
    max_len = CPU_MODEL["max_len"]
    runner = runner_for(model, nan_caches(model, 24, torch.float32, gen), max_len, capture=False)
    seen = []
    for n, width in ((3, 1), (4, 4)):
        seq_lens = torch.randint((width - 1) * BLOCK + 1, width * BLOCK + 1, (n,), generator=gen).tolist()
        meta = decode_meta(random_tables(seq_lens, 24, gen), seq_lens)
        assert runner.load(torch.randint(3, CPU_MODEL["vocab"], (n,), generator=gen), meta) == 4
        sm = runner.static_meta(4)
        assert torch.equal(sm.seq_lens[:n], meta.seq_lens) and (sm.seq_lens[n:] == 1).all()
        assert torch.equal(sm.slot_mapping[:n], meta.slot_mapping) and (sm.slot_mapping[n:] == -1).all()
        assert torch.equal(sm.block_tables[:n, :width], meta.block_tables)
        assert (sm.block_tables[:n, width:] == 0).all() and (sm.block_tables[n:] == 0).all()
        fields = ("query_start_loc", "seq_lens", "block_tables", "slot_mapping", "positions")
        seen.append(([(getattr(sm, f).data_ptr(), getattr(sm, f).shape) for f in fields], sm.plan))
    assert seen[0][0] == seen[1][0] and seen[0][1] is seen[1][1]
    assert seen[0][0][2][1] == (4, max_len // BLOCK)


def test_can_run_only_decode_steps_that_fit(setup, gen):
    be, model = setup
    max_len = CPU_MODEL["max_len"]
    runner = runner_for(model, nan_caches(model, 24, torch.float32, gen), max_len, capture=False)
    assert runner.can_run(decode_meta([[1]] * 8, [5] * 8))
    assert not runner.can_run(decode_meta([[1]] * 9, [5] * 9))  # more than the largest bucket
    assert not runner.can_run(decode_meta([list(range(1, max_len // BLOCK + 2))], [max_len + 1]))  # too long
    prefill = decode_meta([[1], [2]], [3, 4])
    prefill.query_lens_cpu = [2, 1]
    assert not runner.can_run(prefill)


def test_enforce_eager_policy():
    """interpret: eager by default, the eager static path with enforce_eager=False; cpu: never."""
    interp, cpu = get_backend("interpret"), get_backend("cpu")
    args = (lambda ids, meta: ids, 4, 2, BLOCK, 64)
    assert make_decode_graph_runner(interp, *args, enforce_eager=None) is None
    assert make_decode_graph_runner(interp, *args, enforce_eager=True) is None
    static = make_decode_graph_runner(interp, *args, enforce_eager=False)
    assert static is not None and static.graphs is None and static.buckets == [1, 2, 4, 8]
    assert make_decode_graph_runner(cpu, *args, enforce_eager=False) is None


def test_npu_without_graph_capture_falls_back_or_fails_clearly(monkeypatch):
    """An NPU backend whose torch_npu cannot capture graphs: eager with a warning by default, a
    clear error with enforce_eager=False."""
    monkeypatch.setitem(sys.modules, "torch_npu", None)  # makes `import torch_npu` fail
    interp = get_backend("interpret")
    npu = Backend(SimpleNamespace(type="npu"), interp.profile)
    npu.static_decode = True
    args = (lambda ids, meta: ids, 4, 2, BLOCK, 64)
    with pytest.warns(UserWarning, match="torch_npu"):
        assert make_decode_graph_runner(npu, *args, enforce_eager=None) is None
    with pytest.raises(RuntimeError, match="torch_npu"):
        make_decode_graph_runner(npu, *args, enforce_eager=False)


def greedy(path: str, backend: str, enforce_eager, prompts, max_tokens: list[int], dtype: str, max_len: int, spy=None):
    """Greedy token ids per prompt (``max_tokens[i]`` each); ``spy(llm)`` may wrap the engine's
    graph runner first."""
    llm = LLM(
        path, backend=backend, dtype=dtype, max_model_len=max_len, skip_tokenizer_init=True,
        num_kv_blocks=4 * max_len // BLOCK, enforce_eager=enforce_eager,
    )  # fmt: skip
    assert (llm.engine.runner.graphs is None) == (enforce_eager is True)
    if spy is not None:
        spy(llm)
    params = [SamplingParams(temperature=0, max_tokens=m, min_tokens=m) for m in max_tokens]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


def test_llm_enforce_eager_false_runs_decodes_static(cpu_model_dir, gen):
    """``LLM(backend="interpret", enforce_eager=False)``: 3 sequences decode through the static
    path (bucket 4), with the tokens of ``enforce_eager=True``."""
    prompts = [torch.randint(3, CPU_MODEL["vocab"], (k,), generator=gen).tolist() for k in (2, 5, 9)]
    buckets = []

    def spy(llm):
        graphs = llm.engine.runner.graphs
        forward = graphs.forward
        graphs.forward = lambda ids, meta: (buckets.append(graphs.bucket(meta.num_stages)), forward(ids, meta))[1]

    args = (prompts, [3] * 3, "float32", CPU_MODEL["max_len"])
    static = greedy(cpu_model_dir, "interpret", False, *args, spy=spy)
    assert buckets == [4, 4]  # the two decode steps after the prefill step
    assert static == greedy(cpu_model_dir, "interpret", True, *args)


# ---- CUDA / NPU: capture + replay ----------------------------------------------------------------
def graph_backend(name: str) -> Backend:
    """The device backend; skips where it cannot capture graphs (a torch_npu without NPUGraph)."""
    be = _device_backend(name)
    try:
        graph_module(be.device)
    except RuntimeError as e:
        pytest.skip(str(e))
    return be


@pytest.mark.parametrize("name", DEVICES)
def test_graph_replay_matches_eager(name, tmp_path, gen):
    """bf16: for several batch sizes and contexts, a replayed graph gives the eager static path's
    logits and KV writes bit for bit and the dynamic path's within bf16 tolerance; block 0 (read by
    padded rows) stays NaN; one graph per bucket, replayed for every later step of that bucket."""
    be = graph_backend(name)
    max_len = DEVICE_MODEL["max_len"]
    model = load_model(be, write_tiny_llama(tmp_path / "m", **DEVICE_MODEL), torch.bfloat16, max_len)
    num_blocks = 1 + 64 * max_len // BLOCK
    caches = {k: nan_caches(model, num_blocks, torch.bfloat16, gen) for k in ("graph", "static", "dynamic")}
    base = [(k.clone(), v.clone()) for k, v in caches["graph"]]
    graph = runner_for(model, caches["graph"], max_len, capture=True)
    static = runner_for(model, caches["static"], max_len, capture=False)
    for n, ctx in ((1, 5), (3, 200), (3, 1000), (17, 64), (17, 999), (64, 1000), (2, 37)):
        seq_lens = torch.randint(1, ctx + 1, (n,), generator=gen).tolist()
        meta = decode_meta(random_tables(seq_lens, num_blocks, gen), seq_lens, be.device)
        ids = torch.randint(3, DEVICE_MODEL["vocab"], (n,), generator=gen).to(be.device)
        for kv in caches.values():
            for t, b in zip((t for pair in kv for t in pair), (t for pair in base for t in pair)):
                t.copy_(b)
        logits = {
            "graph": model.logits(graph.forward(ids, meta)),
            "static": model.logits(static.forward(ids, meta)),
            "dynamic": model.logits(dynamic_forward(model, ids, meta, caches["dynamic"])),
        }
        be.synchronize()
        assert torch.equal(logits["graph"], logits["static"]), (n, ctx)
        torch.testing.assert_close(logits["graph"], logits["dynamic"], atol=5e-2, rtol=5e-2)
        assert_same_caches(caches["graph"], caches["static"], 0.0)
        assert_same_caches(caches["graph"], caches["dynamic"], 5e-2)
    assert sorted(graph._graphs) == [1, 2, 4, 32, 64]


@pytest.mark.parametrize("name", DEVICES)
def test_generate_with_graphs_equals_eager(name, tmp_path, gen):
    """fp32 greedy ``generate`` of 7 prompts of 4..28 new tokens (decode batches shrink from 7 to 1,
    buckets 8, 4, 2, 1): graphs (the device default) give the tokens of ``enforce_eager=True``."""
    graph_backend(name)
    path = write_tiny_llama(tmp_path / "m", **dict(DEVICE_MODEL, max_len=512))
    prompts = [torch.randint(3, DEVICE_MODEL["vocab"], (k,), generator=gen).tolist() for k in (1, 3, 8, 20, 33, 70, 9)]
    outs = {eager: greedy(path, name, eager, prompts, list(range(4, 29, 4)), "float32", 512) for eager in (None, True)}
    assert outs[None] == outs[True]
