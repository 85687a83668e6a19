"""`flashops eval` (issue 15): its per-task answers are what `flashops serve` returns for the same prompts
through the OpenAI chat route (both modes), its figures follow from those answers, an evaluation that fails
mid-way records nothing in lineage, and bad input (a malformed suite line, a model or suite that does not
resolve) exits 2 naming it, before any decoding."""
from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from typer.testing import CliRunner

from flashops.cli.app import app

PROMPTS = [("abcdef", "g", "contains", "walk"), ("mnop", "q", "contains", "walk"), ("uvw", "x.*", "regex", "walk"),
           ("ghij", "klm", "exact", "exact")]


def letters_suite(path, thinking=None):
    path.write_text("".join(json.dumps({"prompt": p, "answer": a, "match": m, "domain": d, "thinking": thinking}) + "\n"
                            for p, a, m, d in PROMPTS))
    return f"file://{path}"


async def served_answers(uri: str, cache: str, asks: list[dict], max_tokens: int) -> list[str]:
    from flashops.serving.loading import ServeOptions, load_predictor
    from flashops.serving.server import create_app

    predictor = load_predictor(ServeOptions(model_uri=uri, name="letters", cache_dir=cache))
    out = []
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app([predictor])),
                                     base_url="http://test", timeout=300) as client:
            for a in asks:  # one at a time, as a user would
                r = await client.post("/openai/v1/chat/completions", json={
                    "model": "letters", "messages": [{"role": "user", "content": a["prompt"]}],
                    "max_tokens": max_tokens, "temperature": 0, "thinking": a["mode"] == "thinking"})
                assert r.status_code == 200, r.text
                out.append(r.json()["choices"][0]["message"]["content"])
    finally:
        await predictor.engine.aclose()
    return out


def test_eval_answers_equal_what_serve_returns(trained, tmp_path, monkeypatch):
    monkeypatch.setenv("FLASHOPS_HOME", str(tmp_path / "home"))
    uri = trained[3]
    answers_file = tmp_path / "answers.jsonl"
    out = CliRunner().invoke(app, ["eval", "--model", uri, "--suite", letters_suite(tmp_path / "letters.jsonl"),
                                   "--max-tokens", "6", "--json", "--no-record", "--answers", str(answers_file)])
    assert out.exit_code == 0, out.output
    result = json.loads(out.stdout.strip().splitlines()[-1])
    answers = [json.loads(line) for line in answers_file.read_text().splitlines()]
    assert [(a["mode"], a["prompt"]) for a in answers] == [(m, p) for m in ("thinking", "non-thinking")
                                                             for p, *_ in PROMPTS]
    served = asyncio.run(served_answers(uri, str(tmp_path / "cache"), answers, 6))
    assert [a["answer"] for a in answers] == served
    assert any(a["answer"] for a in answers)  # the letter model answers something in non-thinking mode

    # the figures are those answers' figures, per mode, with the keys the issue names
    suite = result["suites"][0]
    assert suite["name"].endswith("letters.jsonl") and suite["sha256"].startswith("sha256:")
    assert result["evaluated"] == uri and result["mtp_tokens"] == 0
    assert 0 < result["mtp_cost_ratio"] < 1  # measured: one dense MTP block against four MoE layers (mtpTokens: auto)
    for m in suite["modes"]:
        mine = [a for a in answers if a["mode"] == m["mode"]]
        assert m["accuracy"] == pytest.approx(sum(a["correct"] for a in mine) / len(mine))
        assert m["mean_tokens"] == pytest.approx(sum(a["tokens"] for a in mine) / len(mine))
        per_1k = 1000 * m["accuracy"] / m["mean_tokens"]
        assert m["accuracy_per_1k_tokens"] == pytest.approx(per_1k, rel=1e-3)
        assert set(m["acceptance_length"]) == {"1", "2", "3"}
        for k, v in m["acceptance_length"].items():  # the debug model has an MTP layer: 1 <= L <= k + 1
            assert 1.0 <= v <= int(k) + 1
        assert set(m["per_domain"]) == {"walk", "exact"} and m["tasks"] == 4
    non = [a for a in answers if a["mode"] == "non-thinking"]
    assert all(a["correct"] == (a["expected"] in a["answer"]) for a in non if a["match"] == "contains")


def test_an_evaluation_failing_midway_records_nothing(trained, tmp_path, monkeypatch):
    from flashops.api.lineage import open_lineage
    from flashops.cli.eval_commands import run_evaluation
    from flashops.serving.predictor import FlashPredictor

    uri = trained[3]
    lin = open_lineage(f"sqlite:///{tmp_path}/lineage.db")
    model_id = lin.add_model(None, uri, "letters", "v1")
    suite = letters_suite(tmp_path / "s.jsonl", thinking=False)
    real, calls = FlashPredictor.complete, []

    async def flaky(self, ids, params):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("the accelerator fell off the bus")
        return await real(self, ids, params)

    monkeypatch.setattr(FlashPredictor, "complete", flaky)
    with pytest.raises(RuntimeError, match="bus"):
        run_evaluation(uri, [suite], max_tokens=3, lineage=lin, progress=False)
    assert lin.evaluations(model_id) == []
    monkeypatch.setattr(FlashPredictor, "complete", real)
    done = run_evaluation(uri, [suite], max_tokens=3, lineage=lin, progress=False, name="letters-eval")
    recorded = lin.evaluations(model_id)
    assert [e["id"] for e in recorded] == [done["lineage_id"]] and recorded[0]["name"] == "letters-eval"
    assert recorded[0]["result"]["suites"] == done["suites"]


def test_bad_input_exits_2_naming_it(trained, tmp_path, monkeypatch):
    monkeypatch.setenv("FLASHOPS_HOME", str(tmp_path / "home"))
    uri = trained[3]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "answer": "b"}\n{"prompt": "a", "answer": "b", "match": "same"}\n')
    run = CliRunner().invoke
    out = run(app, ["eval", "--model", uri, "--suite", f"file://{bad}"])
    assert out.exit_code == 2, out.output
    assert f"file://{bad} line 2: field 'match': 'same' is not a match rule: use one of exact" in out.output
    out = run(app, ["eval", "--model", "no-such-pipeline", "--suite", "builtin:chat-smoke"])
    assert out.exit_code == 2 and "--model 'no-such-pipeline'" in out.output and "nothing found" in out.output
    out = run(app, ["eval", "--model", uri, "--suite", f"file://{tmp_path}/none.jsonl"])
    assert out.exit_code == 2 and f"suite 'file://{tmp_path}/none.jsonl': no such file" in out.output
    out = run(app, ["eval", "--model", uri, "--suite", "builtin:nope"])
    assert out.exit_code == 2 and "no such builtin suite" in out.output
    out = run(app, ["eval", "--model", f"file://{tmp_path}/models/x/v1", "--suite", "builtin:chat-smoke"])
    assert out.exit_code == 2 and f"file://{tmp_path}/models/x/v1" in out.output and "cannot be loaded" in out.output
    long = tmp_path / "long.jsonl"
    long.write_text(json.dumps({"prompt": "a" * 400, "answer": "b"}) + "\n")
    out = run(app, ["eval", "--model", uri, "--suite", f"file://{long}", "--max-tokens", "4"])
    assert out.exit_code == 2 and "line 1: field 'prompt'" in out.output and "context" in out.output
