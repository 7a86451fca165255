"""The OpenAI-compatible server for real: ``portable-xy serve`` in a subprocess on a free
127.0.0.1 port (uvicorn), driven by the official ``openai`` client and raw ``httpx``.

Checked: streaming and non-streaming agree; 16 concurrent greedy streams give the offline
``LLM.generate`` text (fp32); the SSE framing; every error has OpenAI's shape and status (400, 401,
404, 503) and the server still serves after each; a client that disconnects mid-stream frees its
blocks (``/metrics``); tokenize / detokenize; the vLLM metric names."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import time

import httpx
import pytest

from portable_xy import LLM, SamplingParams
from portable_xy.tools.bench import serve as bench_serve
from portable_xy.tools.bench.serve import serve_command, stop_server

openai = pytest.importorskip("openai")

KEY = "sk-test"
NAME = "tiny"


def start_server(model: str, *flags: str) -> tuple[subprocess.Popen, str]:
    cmd = serve_command(model, "--backend", "cpu", "--dtype", "float32", "--max-model-len", "256",
                        "--served-model-name", NAME, *flags)  # fmt: skip
    return bench_serve.start_server(cmd, {"TOKENIZERS_PARALLELISM": "false"}, timeout=180, capture=True)


@pytest.fixture(scope="module")
def server(tiny_llama):
    proc, url = start_server(tiny_llama, "--api-key", KEY)
    yield url
    stop_server(proc)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0)


def auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {KEY}"}


def metrics(url: str) -> dict[str, float]:
    text = httpx.get(url + "/metrics").text
    out = {}
    for line in text.splitlines():
        m = re.match(r"^(vllm:[a-z0-9_]+)(?:\{[^}]*\})? ([0-9.e+-]+)$", line)
        if m and "_bucket" not in m.group(1):
            out[m.group(1)] = out.get(m.group(1), 0.0) + float(m.group(2))
    return out


def wait_idle(url: str, timeout: float = 10.0) -> dict[str, float]:
    deadline = time.time() + timeout
    while True:
        m = metrics(url)
        if m["vllm:num_requests_running"] == m["vllm:num_requests_waiting"] == m["vllm:kv_cache_usage_perc"] == 0:
            return m
        if time.time() > deadline:
            return m
        time.sleep(0.05)


def still_serves(client) -> None:
    out = client.completions.create(model=NAME, prompt="Hello", max_tokens=3, temperature=0)
    assert out.choices[0].text is not None and out.usage.completion_tokens == 3


def test_models_health_version(server, client):
    assert [m.id for m in client.models.list().data] == [NAME]
    assert httpx.get(server + "/health").status_code == 200
    assert httpx.get(server + "/version").json()["version"]


def test_streaming_and_non_streaming_agree(client):
    kw = dict(model=NAME, max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
    full = client.completions.create(prompt="The quick brown fox", **kw)
    parts = list(client.completions.create(prompt="The quick brown fox", stream=True, **kw))
    assert "".join(p.choices[0].text for p in parts if p.choices) == full.choices[0].text
    assert parts[-1].choices[0].finish_reason == full.choices[0].finish_reason == "length"
    msgs = [{"role": "user", "content": "Tell me about tiles."}]
    chat = client.chat.completions.create(messages=msgs, **kw)
    chunks = list(client.chat.completions.create(messages=msgs, stream=True, stream_options={"include_usage": True},
                                                 **kw))  # fmt: skip
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == chat.choices[0].message.content and chat.choices[0].message.role == "assistant"
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12 == chat.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == chat.usage.prompt_tokens


def test_sse_framing_is_openai_s(server):
    body = {"model": NAME, "prompt": [5, 6, 7], "max_tokens": 3, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    with httpx.stream("POST", server + "/v1/completions", json=body, headers=auth()) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    chunks = [json.loads(e[len("data: ") :]) for e in events[:-2]]
    assert all(e.startswith("data: ") for e in events[:-1])
    assert all(c["object"] == "text_completion" and c["id"] == chunks[0]["id"] for c in chunks)
    assert chunks[-2]["choices"][0]["finish_reason"] == "length" and chunks[-1]["usage"]["completion_tokens"] == 3


def test_concurrent_greedy_streams_match_offline(server, tiny_llama):
    prompts = [f"Item {i}: a short story about the number {i * 7}" for i in range(16)]
    offline = LLM(tiny_llama, backend="cpu", dtype="float32", max_model_len=256)
    want = [
        o.outputs[0].text
        for o in offline.generate(
            prompts, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True), use_tqdm=False
        )
    ]
    aclient = openai.AsyncOpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0)

    async def one(p):
        stream = await aclient.completions.create(model=NAME, prompt=p, max_tokens=16, temperature=0, stream=True,
                                                  extra_body={"ignore_eos": True})  # fmt: skip
        return "".join([c.choices[0].text async for c in stream if c.choices])

    async def main():
        try:
            return await asyncio.gather(*(one(p) for p in prompts))
        finally:
            await aclient.close()

    assert asyncio.run(main()) == want


def test_n_seed_stop_and_logprobs(client):
    out = client.completions.create(model=NAME, prompt="Once upon a time", max_tokens=6, n=3, temperature=0.9,
                                    seed=11, logprobs=2)  # fmt: skip
    assert sorted(c.index for c in out.choices) == [0, 1, 2]
    again = client.completions.create(model=NAME, prompt="Once upon a time", max_tokens=6, n=3, temperature=0.9,
                                      seed=11, logprobs=2)  # fmt: skip
    assert [c.text for c in out.choices] == [c.text for c in again.choices]
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == 6 and all(v <= 0 for v in lp.token_logprobs)
    assert all(2 <= len(t) <= 3 for t in lp.top_logprobs)
    chat = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                                          temperature=0, logprobs=True, top_logprobs=2)  # fmt: skip
    entries = chat.choices[0].logprobs.content
    assert len(entries) == chat.usage.completion_tokens and all(len(e.top_logprobs) == 2 for e in entries)
    assert entries[0].top_logprobs[0].logprob >= entries[0].top_logprobs[1].logprob
    kw = dict(model=NAME, prompt=[5, 6, 7], max_tokens=20, temperature=0, extra_body={"ignore_eos": True})
    full = client.completions.create(**kw).choices[0].text
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    stopped = client.completions.create(stop=[stop], **kw).choices[0]
    assert stopped.finish_reason == "stop" and stopped.text == full[: full.index(stop)]
    echoed = client.completions.create(model=NAME, prompt="Echo me", max_tokens=2, temperature=0, echo=True)
    assert echoed.choices[0].text.startswith("Echo me")


def test_echo_with_logprobs_scores_the_prompt(client, tiny_llama):
    ids = [5, 6, 7, 8, 9]
    kw = dict(model=NAME, prompt=ids, max_tokens=3, temperature=0, echo=True, logprobs=2)
    lp = client.completions.create(**kw).choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(ids) + 3
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None  # nothing scores the first token
    assert all(2 <= len(t) <= 3 for t in lp.top_logprobs[1:])
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    # the prompt's logprobs are the engine's prompt_logprobs
    llm = LLM(tiny_llama, backend="cpu", dtype="float32", max_model_len=256)
    ref = llm.generate({"prompt_token_ids": ids}, SamplingParams(max_tokens=1, prompt_logprobs=2), use_tqdm=False)[0]
    for i in range(1, len(ids)):
        assert abs(lp.token_logprobs[i] - ref.prompt_logprobs[i][ids[i]].logprob) < 1e-4
    # streamed: the echo chunk carries the prompt's logprobs, then the tokens' come
    chunks = list(client.completions.create(stream=True, **kw))
    assert chunks[0].choices[0].logprobs.token_logprobs[1:] == lp.token_logprobs[1 : len(ids)]
    lps = [ch.choices[0].logprobs for ch in chunks[1:] if ch.choices and ch.choices[0].logprobs]
    assert [v for x in lps for v in x.token_logprobs] == lp.token_logprobs[len(ids) :]


BAD = [
    ("/v1/completions", {"prompt": "x", "temperature": -1}, 400, "temperature"),
    ("/v1/completions", {"prompt": "x", "n": 0}, 400, "n"),
    ("/v1/completions", {"prompt": "x", "top_p": 2}, 400, "top_p"),
    ("/v1/completions", {"prompt": "x", "max_tokens": "10"}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": 5}, 400, "prompt"),
    ("/v1/completions", {"prompt": []}, 400, "prompt"),
    ("/v1/completions", {"prompt": [10**9]}, 400, None),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"1": 3}}, 400, "logit_bias"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 1000}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": [7] * 300}, 400, "prompt"),
    ("/v1/completions", {"prompt": "x", "model": "nope"}, 404, "model"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages"),
    ("/v1/chat/completions", {"messages": "hi"}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, 400, None),
    ("/tokenize", {"tokens": [1]}, 400, None),
    ("/detokenize", {"tokens": [-4]}, 400, "tokens"),
]


@pytest.mark.parametrize("path,body,status,param", BAD, ids=[f"{p}:{sorted(b)}:{s}" for p, b, s, _ in BAD])
def test_bad_requests_get_openai_errors_and_the_server_carries_on(server, client, path, body, status, param):
    r = httpx.post(server + path, json=body, headers=auth())
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == status and err["message"]
    if param is not None:
        assert err["param"] == param, err
    still_serves(client)


def test_malformed_json_wrong_key_unknown_route(server, client):
    r = httpx.post(server + "/v1/completions", content=b"{not json", headers={**auth(), "content-type":
                                                                               "application/json"})  # fmt: skip
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        r = httpx.post(server + "/v1/completions", json={"prompt": "x"}, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == 401
    assert httpx.get(server + "/health").status_code == 200  # not behind the key
    r = httpx.get(server + "/v1/nothing-here", headers=auth())
    assert r.status_code == 404 and r.json()["error"]["type"] == "NotFoundError"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server + "/v1", api_key="wrong", max_retries=0).models.list()
    still_serves(client)


def test_disconnect_mid_stream_frees_its_blocks(server, client):
    body = {"model": NAME, "prompt": "A very long story", "max_tokens": 200, "temperature": 0, "stream": True,
            "ignore_eos": True}  # fmt: skip
    with httpx.stream("POST", server + "/v1/completions", json=body, headers=auth()) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6)]
        assert sum(ln.startswith("data: ") for ln in got) >= 3
        busy = metrics(server)
        assert busy["vllm:num_requests_running"] == 1 and busy["vllm:kv_cache_usage_perc"] > 0
    idle = wait_idle(server)
    assert idle["vllm:num_requests_running"] == 0 and idle["vllm:kv_cache_usage_perc"] == 0
    still_serves(client)


def test_tokenize_detokenize_and_metrics(server, client):
    tok = httpx.post(server + "/tokenize", json={"prompt": "hello world"}).json()
    assert tok["count"] == len(tok["tokens"]) > 0 and tok["max_model_len"] == 256
    assert httpx.post(server + "/detokenize", json={"tokens": tok["tokens"]}).json()["prompt"].endswith("hello world")
    chat_tok = httpx.post(server + "/tokenize", json={"messages": [{"role": "user", "content": "hi"}]}).json()
    assert chat_tok["count"] > tok["count"]
    before = metrics(server)
    out = client.completions.create(model=NAME, prompt="Count", max_tokens=5, temperature=0,
                                    extra_body={"ignore_eos": True})  # fmt: skip
    after = wait_idle(server)
    assert after["vllm:generation_tokens_total"] - before["vllm:generation_tokens_total"] == 5
    assert after["vllm:prompt_tokens_total"] - before["vllm:prompt_tokens_total"] == out.usage.prompt_tokens
    assert after["vllm:e2e_request_latency_seconds_count"] == before["vllm:e2e_request_latency_seconds_count"] + 1
    steps = after["vllm:iteration_tokens_total_count"] - before["vllm:iteration_tokens_total_count"]
    step_tokens = after["vllm:iteration_tokens_total_sum"] - before["vllm:iteration_tokens_total_sum"]
    assert steps == 5 and 5 <= step_tokens <= out.usage.prompt_tokens + 4  # a prefill step, then 4 decodes
    text = httpx.get(server + "/metrics").text
    for name in (
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
        "vllm:prompt_tokens_total",
        "vllm:generation_tokens_total",
        "vllm:time_to_first_token_seconds",
        "vllm:inter_token_latency_seconds",
        "vllm:e2e_request_latency_seconds",
        "vllm:prefix_cache_hits",
        "vllm:prefix_cache_queries",
        "vllm:spec_decode_num_accepted_tokens",
        "vllm:spec_decode_num_draft_tokens",
        'vllm:request_success_total{engine="0",finished_reason="length"',
    ):
        assert name in text, name  # fmt: skip


def test_full_waiting_queue_is_a_503(tiny_llama):
    proc, url = start_server(tiny_llama, "--max-num-seqs", "1", "--max-waiting-requests", "1")
    try:
        body = {"model": NAME, "prompt": "x", "max_tokens": 150, "temperature": 0, "ignore_eos": True,
                "stream": True}  # fmt: skip
        with httpx.stream("POST", url + "/v1/completions", json=body) as first:
            first_lines = first.iter_lines()  # kept: dropping the iterator would close the stream
            next(first_lines)
            with httpx.stream("POST", url + "/v1/completions", json=body) as second:
                assert second.status_code == 200
                deadline = time.time() + 10
                while metrics(url)["vllm:num_requests_waiting"] < 1 and time.time() < deadline:
                    time.sleep(0.05)
                third = httpx.post(url + "/v1/completions", json={**body, "stream": False})
                assert third.status_code == 503 and "waiting queue is full" in third.json()["error"]["message"]
        idle = wait_idle(url)
        assert idle["vllm:num_requests_running"] == idle["vllm:kv_cache_usage_perc"] == 0
        r = httpx.post(url + "/v1/completions", json={"model": NAME, "prompt": "x", "max_tokens": 2})
        assert r.status_code == 200
    finally:
        stop_server(proc)


def test_tensor_parallel_server_streams_a_chat(tiny_llama):
    """``--tensor-parallel-size 2``: a streamed chat equals the offline TP=1 greedy text; stopping
    the server stops its worker."""
    import psutil

    proc, url = start_server(tiny_llama, "--tensor-parallel-size", "2")
    try:
        workers = psutil.Process(proc.pid).children()
        assert any("spawn" in " ".join(w.cmdline()) and "resource_tracker" not in " ".join(w.cmdline())
                   for w in workers)  # fmt: skip
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        msgs = [{"role": "user", "content": "Tell me about tiles."}]
        chunks = list(client.chat.completions.create(model=NAME, messages=msgs, max_tokens=12, temperature=0,
                                                     stream=True, extra_body={"ignore_eos": True}))  # fmt: skip
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        offline = LLM(tiny_llama, backend="cpu", dtype="float32", max_model_len=256)
        want = offline.chat(msgs, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), use_tqdm=False)
        assert text == want[0].outputs[0].text
    finally:
        stop_server(proc)
    gone, alive = psutil.wait_procs(workers, timeout=15)
    assert alive == []
