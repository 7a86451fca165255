"""``AsyncLLM`` on its own: requests that arrive mid-batch join the running batch and give the
offline tokens, streamed deltas add up to the final output, abort and an abandoned stream free
their blocks, a failing step fails only its requests, the waiting-queue bound, and shutdown."""

from __future__ import annotations

import asyncio
import time

import pytest
from tiny_models import random_prompts

from portable_xy import LLM, AsyncLLM, SamplingParams
from portable_xy.async_llm import EngineDeadError, EngineOverloadedError
from portable_xy.engine.llm_engine import EngineStepError
from portable_xy.sampling_params import RequestOutputKind

KW = dict(backend="cpu", dtype="float32", max_model_len=256)


def greedy(n: int, kind: RequestOutputKind = RequestOutputKind.CUMULATIVE) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, output_kind=kind)


@pytest.fixture(scope="module")
def engine(tiny_llama):
    eng = AsyncLLM(tiny_llama, **KW)
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def offline(tiny_llama):
    return LLM(tiny_llama, **KW)


def assert_idle(eng: AsyncLLM) -> None:
    """Nothing left in the engine, every block free (the engine thread settles within a step)."""
    for _ in range(200):
        if not eng.engine.has_unfinished_requests() and not eng._streams:
            break
        time.sleep(0.01)
    bm = eng.engine.bm
    assert not eng.engine.has_unfinished_requests() and not eng.engine.requests
    assert bm.num_free_blocks == len(bm.blocks)


def test_arrivals_mid_batch_join_and_match_offline(engine, offline):
    """B arrives while A decodes: B's first token comes before A's last (it joined the running
    batch), and both give exactly the offline greedy tokens."""
    a, b = random_prompts(2, [12, 30], seed=31)
    want = [o.outputs[0].token_ids for o in offline.generate(
        [{"prompt_token_ids": p} for p in (a, b)], [greedy(40), greedy(8)], use_tqdm=False)]  # fmt: skip
    events: list[tuple[str, int, bool]] = []
    got = {}

    async def main():
        go = asyncio.Event()

        async def run(name, prompt, n):
            async for out in engine.generate({"prompt_token_ids": prompt}, greedy(n), name):
                events.append((name, len(out.outputs[0].token_ids), out.finished))
                got[name] = out.outputs[0].token_ids
                if name == "A" and len(got["A"]) >= 5:
                    go.set()

        async def later():
            await go.wait()
            await run("B", b, 8)

        await asyncio.gather(run("A", a, 40), later())

    asyncio.run(main())
    assert [got["A"], got["B"]] == want
    first_b = next(i for i, e in enumerate(events) if e[0] == "B")
    last_a = max(i for i, e in enumerate(events) if e[0] == "A")
    assert first_b < last_a and events[last_a][2]
    assert_idle(engine)


def test_deltas_add_up_to_the_final_output(engine, offline):
    prompt = "The history of the printing press"
    want = offline.generate(prompt, greedy(24), use_tqdm=False)[0].outputs[0]

    async def collect(kind):
        outs = [o async for o in engine.generate(prompt, greedy(24, kind), f"k{int(kind)}")]
        return outs

    delta = asyncio.run(collect(RequestOutputKind.DELTA))
    cumulative = asyncio.run(collect(RequestOutputKind.CUMULATIVE))
    final = asyncio.run(collect(RequestOutputKind.FINAL_ONLY))
    assert len(delta) > 1 and len(final) == 1 and final[0].finished
    assert "".join(o.outputs[0].text for o in delta) == want.text == cumulative[-1].outputs[0].text
    assert [t for o in delta for t in o.outputs[0].token_ids] == want.token_ids == final[0].outputs[0].token_ids
    assert all(len(x.outputs[0].token_ids) <= len(y.outputs[0].token_ids) for x, y in zip(cumulative, cumulative[1:]))
    assert_idle(engine)


def test_abort_and_abandoned_streams_free_their_blocks(engine):
    p = random_prompts(1, [20], seed=5)[0]

    async def aborted():
        outs = []
        async for out in engine.generate({"prompt_token_ids": p}, greedy(200), "ab"):
            outs.append(out)
            if len(outs) == 3:
                await engine.abort("ab")
        return outs

    outs = asyncio.run(aborted())
    assert outs[-1].finished and outs[-1].outputs[0].finish_reason == "abort"
    assert len(outs[-1].outputs[0].token_ids) < 200
    assert_idle(engine)

    async def abandoned():
        async for out in engine.generate({"prompt_token_ids": p}, greedy(200), "gone"):
            if len(out.outputs[0].token_ids) >= 3:
                break  # the consumer goes away, as a disconnected client's stream does

    asyncio.run(abandoned())
    assert_idle(engine)


def test_a_failing_step_fails_only_its_requests(tiny_llama, offline, monkeypatch):
    """With one sequence running at a time, A's step raises: A fails with the error, B (waiting,
    not in that step) then runs to the offline tokens, and no block leaks."""
    eng = AsyncLLM(tiny_llama, max_num_seqs=1, **KW)
    try:
        a, b = random_prompts(2, [9, 14], seed=7)
        want_b = offline.generate({"prompt_token_ids": b}, greedy(6), use_tqdm=False)[0].outputs[0].token_ids
        real = eng.engine.runner.execute
        calls = {"n": 0}

        def flaky(batch):
            calls["n"] += 1
            if calls["n"] == 2:
                raise RuntimeError("injected device fault")
            return real(batch)

        monkeypatch.setattr(eng.engine.runner, "execute", flaky)

        async def run(name, prompt):
            return [o async for o in eng.generate({"prompt_token_ids": prompt}, greedy(6), name)]

        async def main():
            return await asyncio.gather(run("A", a), run("B", b), return_exceptions=True)

        res_a, res_b = asyncio.run(main())
        assert isinstance(res_a, EngineStepError) and "injected device fault" in str(res_a)
        assert res_a.request_ids == ["A"]
        assert res_b[-1].outputs[0].token_ids == want_b
        assert_idle(eng)
    finally:
        eng.shutdown()


def test_waiting_queue_bound_and_shutdown(tiny_llama):
    eng = AsyncLLM(tiny_llama, max_num_seqs=1, max_waiting_requests=1, **KW)
    p = random_prompts(1, [8], seed=2)[0]

    async def main():
        first = eng.generate({"prompt_token_ids": p}, greedy(100), "r1")
        await first.__anext__()  # r1 runs
        second = eng.generate({"prompt_token_ids": p}, greedy(100), "r2")
        task = asyncio.ensure_future(second.__anext__())  # r2 waits behind r1
        await asyncio.sleep(0.05)
        with pytest.raises(EngineOverloadedError, match="waiting queue is full"):
            await eng.generate({"prompt_token_ids": p}, greedy(4), "r3").__anext__()
        with pytest.raises(ValueError, match="already running"):
            await eng.generate({"prompt_token_ids": p}, greedy(4), "r1").__anext__()
        eng.shutdown()
        with pytest.raises(EngineDeadError):
            async for _ in first:
                pass
        with pytest.raises(EngineDeadError):
            await task

    asyncio.run(main())
    assert not eng._loop_thread.is_alive()
    bm = eng.engine.bm
    assert bm.num_free_blocks == len(bm.blocks) and not eng.engine.requests


def test_incremental_text_equals_the_full_decode(engine):
    """Sampled tokens of a random model include pieces of multi-byte characters: for every
    request, the streamed deltas add up to its tokens decoded whole."""

    async def run(i):
        p = SamplingParams(temperature=1.0, seed=100 + i, max_tokens=40, ignore_eos=True,
                           output_kind=RequestOutputKind.DELTA)  # fmt: skip
        return [o async for o in engine.generate({"prompt_token_ids": [5 + i, 9, 11]}, p, f"t-{i}")]

    async def main():
        return await asyncio.gather(*(run(i) for i in range(8)))

    texts = []
    for outs in asyncio.run(main()):
        ids = [t for o in outs for t in o.outputs[0].token_ids]
        texts.append(engine.engine.inputs.decode(ids))
        assert len(ids) == 40 and "".join(o.outputs[0].text for o in outs) == texts[-1]
    assert any(len(t.encode()) > len(t) for t in texts)  # multi-byte characters were exercised
    assert_idle(engine)


def test_streamed_deltas_never_split_a_character(engine):
    """Token by token, DELTA outputs of a text whose characters span several byte-level tokens
    (accents, CJK, an emoji) add up to the text, and no delta holds a broken character."""
    from portable_xy.engine.sequence import Request, Sequence
    from portable_xy.outputs import RequestMetrics

    text = "Größe: 世界 🙂 naïve café, 東京!"
    ids = engine.engine.inputs.encode(text, add_special_tokens=False)
    assert len(ids) > len(text.split())  # characters really are split across tokens
    out = engine.engine.output
    params = SamplingParams(max_tokens=len(ids), output_kind=RequestOutputKind.DELTA)
    seq = Sequence(0, "r", 0, [1, 2], params, None, RequestMetrics(0.0))
    req = Request("r", None, [1, 2], params, seq.metrics, [seq])
    deltas = []
    for t in ids:
        seq.token_ids.append(t)
        o = out.make_output(req)
        if o is not None:
            deltas.append(o.outputs[0].text)
    assert "".join(deltas) == engine.engine.inputs.decode(ids) == text
    assert all("\ufffd" not in d for d in deltas)
