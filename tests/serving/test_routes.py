"""The served app through its ASGI interface: KServe v1/v2, OpenAI routes (streaming too), metrics and
the error cases (unknown model, too-long prompt, bad parameters, overload, a client that goes away)."""
from __future__ import annotations

import asyncio
import json

import httpx
import pytest
import pytest_asyncio
import torch

from flashops.serving.loading import ServeOptions, load_predictor
from flashops.serving.server import create_app

pytestmark = pytest.mark.asyncio(loop_scope="module")


def greedy_text(trained, prompt: str, n: int) -> str:
    model, _, tok, _ = trained
    seq = tok.encode(prompt).ids
    with torch.inference_mode():
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq]), mtp=False).logits[0, -1].argmax()))
    return tok.decode(seq[len(tok.encode(prompt).ids):])


def client_for(app) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test", timeout=60)


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def served(trained, tmp_path_factory):
    options = ServeOptions(model_uri=trained[3], name="letters", mtp_tokens=2, max_concurrency=4, max_len=96,
                           cache_dir=str(tmp_path_factory.mktemp("cache")))
    predictor = load_predictor(options)
    async with client_for(create_app([predictor])) as client:
        yield client, predictor
    await predictor.engine.aclose()


def sse_events(body: str) -> list:
    events = [line[len("data: "):] for line in body.split("\n\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


async def test_kserve_v1_and_v2_protocols_generate_the_greedy_continuation(served, trained):
    client, _ = served
    expected = greedy_text(trained, "abc", 8)
    assert (await client.get("/v2/health/ready")).status_code == 200
    assert (await client.get("/v2/models/letters/ready")).json()["ready"] is True
    assert (await client.get("/v1/models/letters")).json()["ready"] is True
    v1 = await client.post("/v1/models/letters:predict",
                           json={"instances": [{"prompt": "abc", "max_tokens": 8, "temperature": 0}, "xyz"]})
    assert v1.status_code == 200, v1.text
    preds = v1.json()["predictions"]
    assert preds[0] == {"text": expected, "finish_reason": "length", "completion_tokens": 8}
    assert len(preds) == 2
    v2 = await client.post("/v2/models/letters/infer", json={
        "inputs": [{"name": "text_input", "shape": [1], "datatype": "BYTES", "data": ["abc"]}],
        "parameters": {"max_tokens": 8, "temperature": 0}})
    assert v2.status_code == 200, v2.text
    outputs = {o["name"]: o["data"] for o in v2.json()["outputs"]}
    assert outputs["text_output"] == [expected] and outputs["completion_tokens"] == [8]


async def test_openai_completion_plain_and_streamed_agree(served, trained):
    client, _ = served
    expected = greedy_text(trained, "klm", 12)
    assert [m["id"] for m in (await client.get("/openai/v1/models")).json()["data"]] == ["letters"]
    body = {"model": "letters", "prompt": "klm", "max_tokens": 12, "temperature": 0}
    plain = await client.post("/openai/v1/completions", json=body)
    assert plain.status_code == 200, plain.text
    out = plain.json()
    assert out["choices"][0]["text"] == expected and out["choices"][0]["finish_reason"] == "length"
    assert out["usage"] == {"prompt_tokens": 3, "completion_tokens": 12, "total_tokens": 15}
    streamed = await client.post("/openai/v1/completions",
                                 json={**body, "stream": True, "stream_options": {"include_usage": True}})
    assert streamed.headers["content-type"].startswith("text/event-stream")
    events = sse_events(streamed.text)
    assert "".join(e["choices"][0]["text"] for e in events if e["choices"]) == expected
    assert events[-1]["usage"]["completion_tokens"] == 12
    assert [e["choices"][0]["finish_reason"] for e in events if e["choices"]][-1] == "length"


async def test_stop_sequence_and_seeded_sampling(served, trained):
    client, _ = served
    full = greedy_text(trained, "abc", 12)
    stop = full[5]
    r = (await client.post("/openai/v1/completions", json={
        "model": "letters", "prompt": "abc", "max_tokens": 12, "temperature": 0, "stop": [stop]})).json()
    assert r["choices"][0] == {"index": 0, "text": full[: full.index(stop)], "finish_reason": "stop", "logprobs": None}
    sampled = {"model": "letters", "prompt": "abc", "max_tokens": 10, "temperature": 1.0, "seed": 7}
    a, b = [(await client.post("/openai/v1/completions", json=sampled)).json()["choices"][0]["text"] for _ in range(2)]
    assert a == b


async def test_chat_completion_with_thinking_switch_plain_and_streamed(served, trained):
    client, predictor = served
    messages = [{"role": "user", "content": "abc"}]
    body = {"model": "letters", "messages": messages, "max_tokens": 6, "temperature": 0}
    off = (await client.post("/openai/v1/chat/completions", json=body)).json()
    on = (await client.post("/openai/v1/chat/completions", json={**body, "thinking": True})).json()
    assert off["object"] == "chat.completion" and off["choices"][0]["message"]["role"] == "assistant"
    assert "reasoning_content" not in off["choices"][0]["message"]
    assert "reasoning_content" in on["choices"][0]["message"]  # thinking on: the text so far is reasoning
    # the template's thinking switch lives in the prompt: off closes the empty reasoning block
    assert off["usage"]["prompt_tokens"] - on["usage"]["prompt_tokens"] == len(predictor.codec.encode("</think>"))
    streamed = await client.post("/openai/v1/chat/completions", json={**body, "stream": True})
    events = sse_events(streamed.text)
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events)
    assert text == off["choices"][0]["message"]["content"]
    assert events[-1]["choices"][0]["finish_reason"] == "length"


async def test_metrics_report_requests_ttft_and_acceptance(served):
    client, _ = served
    await client.post("/openai/v1/completions", json={"model": "letters", "prompt": "abc", "max_tokens": 8,
                                                      "temperature": 0})
    text = (await client.get("/metrics")).text
    assert 'flashops_requests_total{model="letters",route="completions",status="200"}' in text
    assert 'flashops_time_to_first_token_seconds_count{model="letters"}' in text
    assert 'flashops_draft_accepted_total{model="letters",position="1"}' in text
    mal = [line for line in text.splitlines() if line.startswith('flashops_mean_acceptance_length{model="letters"}')]
    assert 1.0 < float(mal[0].split()[-1]) <= 3.0


@pytest.mark.parametrize("route,body,status,needle", [
    ("completions", {"model": "nope", "prompt": "a"}, 404, "model_not_found"),
    ("completions", {"model": "letters", "prompt": "ab" * 60}, 400, "context_length_exceeded"),
    ("completions", {"model": "letters", "prompt": "a", "max_tokens": 500}, 400, "max_tokens <= 95"),
    ("completions", {"model": "letters", "prompt": "a", "temperature": 3}, 400, "temperature"),
    ("completions", {"model": "letters", "prompt": "a", "max_token": 3}, 400, "max_token: unknown field"),
    ("completions", {"model": "letters", "prompt": "a", "n": 2}, 400, "n:"),
    ("chat/completions", {"model": "letters", "messages": [{"role": "robot", "content": "x"}]}, 400, "role"),
    ("chat/completions", {"model": "letters", "messages": []}, 400, "messages"),
])
async def test_bad_requests_get_openai_error_bodies(served, route, body, status, needle):
    client, _ = served
    r = await client.post(f"/openai/v1/{route}", json=body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and needle in json.dumps(error)


async def test_malformed_json_and_bad_kserve_payloads_are_4xx(served):
    client, _ = served
    r = await client.post("/openai/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = await client.post("/v1/models/letters:predict", json={"instances": [{"prompt": "a", "max_tokenz": 3}]})
    assert r.status_code == 400 and "max_tokenz" in r.text
    r = await client.post("/v2/models/letters/infer", json={
        "inputs": [{"name": "wrong", "shape": [1], "datatype": "BYTES", "data": ["a"]}]})
    assert r.status_code == 400 and "text_input" in r.text


async def test_overload_queues_then_rejects_with_429_and_recovers(trained, tmp_path):
    predictor = load_predictor(ServeOptions(model_uri=trained[3], name="letters", max_concurrency=1, max_queue=1,
                                            max_len=96, cache_dir=str(tmp_path)))
    async with client_for(create_app([predictor])) as client:
        body = {"model": "letters", "prompt": "abc", "max_tokens": 40, "temperature": 0}
        responses = await asyncio.gather(*(client.post("/openai/v1/completions", json=body) for _ in range(4)))
        codes = sorted(r.status_code for r in responses)
        assert codes.count(200) == 2 and codes.count(429) == 2  # one running, one queued, the rest refused
        refused = next(r for r in responses if r.status_code == 429)
        assert refused.json()["error"]["type"] == "rate_limit_error"
        assert refused.headers["retry-after"] == "1"  # clients (the openai package too) wait this long
        assert (await client.post("/openai/v1/completions", json=body)).status_code == 200
    await predictor.engine.aclose()


async def test_client_leaving_mid_stream_frees_its_slot(served):
    """Drive the ASGI app directly and disconnect after the first event: the stream must end without an
    error, the sequence must leave the batch and the limiter slot must come back."""
    client, predictor = served
    app = client._transport.app
    body = json.dumps({"model": "letters", "prompt": "abc", "max_tokens": 80, "temperature": 0,
                       "stream": True}).encode()
    sent, got_first = [], asyncio.Event()
    request_done = False

    async def receive():
        nonlocal request_done
        if not request_done:
            request_done = True
            return {"type": "http.request", "body": body, "more_body": False}
        await got_first.wait()
        return {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)
        if message["type"] == "http.response.body" and message.get("body"):
            got_first.set()

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/openai/v1/completions", "raw_path": b"/openai/v1/completions", "query_string": b"",
             "root_path": "", "headers": [(b"content-type", b"application/json"), (b"host", b"test")],
             "client": ("127.0.0.1", 1), "server": ("test", 80)}
    await asyncio.wait_for(app(scope, receive, send), timeout=30)
    assert sent[0]["status"] == 200
    chunks = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    assert chunks.count(b"data: ") < 80  # it stopped early
    for _ in range(100):
        if predictor.limiter.active == 0 and not predictor.engine._running:
            break
        await asyncio.sleep(0.05)
    assert predictor.limiter.active == 0 and not predictor.engine._running
    ok = await client.post("/openai/v1/completions", json={"model": "letters", "prompt": "abc", "max_tokens": 3})
    assert ok.status_code == 200
