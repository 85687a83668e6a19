"""What the official openai client and the KServe v1/v2 protocols found (issue 17, items 14-18): a missing
models.retrieve route and non-OpenAI error bodies, lax type coercion, 500s and silent defaults on KServe,
real OpenAI fields called misspellings, logprobs, and a 429 without Retry-After."""
from __future__ import annotations

import json

import httpx
import pytest
import pytest_asyncio
import torch

from flashops.serving.loading import ServeOptions, load_predictor
from flashops.serving.server import create_app

pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def served(trained, tmp_path_factory):
    options = ServeOptions(model_uri=trained[3], name="letters", mtp_tokens=2, max_concurrency=2, max_len=96,
                           cache_dir=str(tmp_path_factory.mktemp("cache")))
    predictor = load_predictor(options)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app([predictor])), base_url="http://test",
                                 timeout=120) as client:
        yield client
    await predictor.engine.aclose()


def openai_error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


# ---------------------------------------------------------------------- item 14

async def test_models_retrieve_and_openai_error_bodies_for_404_and_405(served):
    card = (await served.get("/openai/v1/models/letters")).json()
    assert card["id"] == "letters" and card["object"] == "model" and card["max_model_len"] == 96
    assert openai_error(await served.get("/openai/v1/models/nope"), 404)["code"] == "model_not_found"
    assert openai_error(await served.get("/openai/v1/no/such/route"), 404)["code"] == "not_found"
    err = openai_error(await served.get("/openai/v1/completions"), 405)
    assert err["code"] == "method_not_allowed" and "GET" in err["message"]
    assert openai_error(await served.delete("/openai/v1/models"), 405)
    assert "detail" in (await served.get("/v1/no/such/route")).json()  # KServe's own routes keep their shape


# ---------------------------------------------------------------------- item 15

@pytest.mark.parametrize("route,field,value", [
    ("completions", "max_tokens", True), ("completions", "max_tokens", "8"), ("completions", "temperature", "0"),
    ("completions", "stream", "yes"), ("chat/completions", "thinking", "yes"), ("chat/completions", "thinking", 1),
])
async def test_strict_types_are_not_coerced(served, route, field, value):
    body = {"model": "letters", "max_tokens": 2, field: value}
    body.update({"prompt": "abc"} if route == "completions" else {"messages": [{"role": "user", "content": "a"}]})
    err = openai_error(await served.post(f"/openai/v1/{route}", json=body), 400)
    assert err["param"] == field and repr(value) in err["message"], err


# ---------------------------------------------------------------------- item 16

@pytest.mark.parametrize("instance,field", [
    ({"prompt": ""}, "instances[1].prompt"), ({"prompt": "a", "stop": 5}, "instances[1].stop"),
    ({"prompt": "a", "max_tokens": 0}, "instances[1].max_tokens"),
    ({"prompt": "a", "max_tokens": True}, "instances[1].max_tokens"),
    ({"prompt": "a", "temperature": "hot"}, "instances[1].temperature"),
])
async def test_kserve_v1_bad_instances_are_400_naming_the_field(served, instance, field):
    r = await served.post("/v1/models/letters:predict", json={"instances": ["abc", instance]})
    assert r.status_code == 400 and field in r.json()["error"], r.text


def v2(data, shape, parameters=None, extra_inputs=()):
    return {"inputs": [{"name": "text_input", "shape": shape, "datatype": "BYTES", "data": data}, *extra_inputs],
            "parameters": parameters or {"max_tokens": 2}}


@pytest.mark.parametrize("body,needle", [
    (v2(["abc"], [2]), "inputs.text_input.shape: [2] does not match its data (1 element(s))"),
    (v2(["abc", "d"], [1]), "inputs.text_input.shape"),
    (v2([""], [1]), "inputs.text_input.data[0]: the prompt is empty"),
    (v2(["abc"], [1], {"stop": 5}), "parameters.stop"),
    (v2(["abc"], [1], {"max_tokens": 0}), "parameters.max_tokens"),
    (v2(["abc"], [1], extra_inputs=[{"name": "text_input", "shape": [1], "datatype": "BYTES", "data": ["x"]}]),
     "'text_input' given more than once"),
])
async def test_kserve_v2_mismatches_and_duplicates_are_400_naming_the_field(served, body, needle):
    r = await served.post("/v2/models/letters/infer", json=body)
    assert r.status_code == 400 and needle in r.json()["error"], r.text


# ---------------------------------------------------------------------- item 17

@pytest.mark.parametrize("route,field,value", [
    ("completions", "n", 2), ("completions", "echo", True), ("completions", "suffix", "xyz"),
    ("completions", "best_of", 3), ("completions", "logit_bias", {"50": 5}),
    ("chat/completions", "response_format", {"type": "json_object"}), ("chat/completions", "n", 2),
    ("chat/completions", "tools", [{"type": "function", "function": {"name": "f"}}]),
])
async def test_real_openai_fields_are_not_supported_not_misspelled(served, route, field, value):
    body = {"model": "letters", "max_tokens": 2, field: value}
    body.update({"prompt": "abc"} if route == "completions" else {"messages": [{"role": "user", "content": "a"}]})
    err = openai_error(await served.post(f"/openai/v1/{route}", json=body), 400)
    assert err["param"] == field and "not supported by this server" in err["message"], err
    assert "spelling" not in err["message"]
    # the neutral value is accepted (SDKs send n=1, echo=false, ...)
    neutral = {"n": 1, "echo": False, "suffix": None, "best_of": 1, "logit_bias": {}, "response_format": {"type": "text"},
               "tools": []}[field]
    assert (await served.post(f"/openai/v1/{route}", json={**body, field: neutral})).status_code == 200
    typo = openai_error(await served.post(f"/openai/v1/{route}", json={
        **{k: v for k, v in body.items() if k != field}, "max_tokenz": 2}), 400)
    assert "check the spelling" in typo["message"]


def reference_logprobs(trained, prompt: str, generated: list[int]) -> torch.Tensor:
    """log-softmax of the model, one plain forward per generated position (no cache, no MTP)."""
    model, _, tok, _ = trained
    seq = tok.encode(prompt).ids
    rows = []
    with torch.inference_mode():
        for t in generated:
            rows.append(torch.log_softmax(model(torch.tensor([seq]), mtp=False).logits[0, -1].float(), -1))
            seq.append(t)
    return torch.stack(rows)


async def test_completion_logprobs_are_the_models_log_softmax(served, trained):
    _, _, tok, _ = trained
    r = await served.post("/openai/v1/completions", json={"model": "letters", "prompt": "abc", "max_tokens": 6,
                                                           "temperature": 0.8, "seed": 3, "logprobs": 3})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    lp = choice["logprobs"]
    generated = tok.encode(choice["text"]).ids
    assert "".join(lp["tokens"]) == choice["text"] and len(lp["token_logprobs"]) == len(generated) == 6
    ref = reference_logprobs(trained, "abc", generated)
    chosen = ref[torch.arange(6), torch.tensor(generated)]
    assert torch.allclose(torch.tensor(lp["token_logprobs"]), chosen, atol=1e-3), (lp["token_logprobs"], chosen)
    for row, top in zip(ref, lp["top_logprobs"]):
        values, ids = row.topk(3)
        assert [tok.decode([i]) for i in ids.tolist()] == list(top)
        assert torch.allclose(torch.tensor(list(top.values())), values, atol=1e-3)
    assert lp["text_offset"] == [sum(len(t) for t in lp["tokens"][:i]) for i in range(6)]


async def test_chat_logprobs_and_top_logprobs(served, trained):
    _, _, tok, _ = trained
    body = {"model": "letters", "messages": [{"role": "user", "content": "abc"}], "max_tokens": 4, "temperature": 0,
            "thinking": False, "logprobs": True, "top_logprobs": 2}
    r = await served.post("/openai/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    content = r.json()["choices"][0]["logprobs"]["content"]
    assert len(content) == 4
    for entry in content:
        assert entry["logprob"] <= 0 and entry["bytes"] == list(entry["token"].encode())
        assert len(entry["top_logprobs"]) == 2
        # greedy: the chosen token is the most likely one, with the same log-probability
        assert entry["top_logprobs"][0]["token"] == entry["token"]
        assert abs(entry["top_logprobs"][0]["logprob"] - entry["logprob"]) < 1e-6
    without = await served.post("/openai/v1/chat/completions", json={**body, "logprobs": False, "top_logprobs": None})
    assert without.json()["choices"][0].get("logprobs") is None
    err = openai_error(await served.post("/openai/v1/chat/completions", json={**body, "logprobs": False}), 400)
    assert "top_logprobs needs logprobs" in err["message"]
    err = openai_error(await served.post("/openai/v1/chat/completions", json={**body, "stream": True}), 400)
    assert err["param"] == "logprobs" and "not supported by this server" in err["message"]
    err = openai_error(await served.post("/openai/v1/completions", json={"model": "letters", "prompt": "a",
                                                                         "logprobs": 6}), 400)
    assert err["param"] == "logprobs"
    assert json.dumps(err)
