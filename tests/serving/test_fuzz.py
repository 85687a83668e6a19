"""Schemathesis fuzzes every operation of the predictor's own OpenAPI document (KServe v1/v2, health,
OpenAI routes, whose request bodies the document spells out): no input may give a 500, and every answer is
a documented status code. The context is kept short (max_len 12) so every generation is cheap, and the
examples per operation are few, to stay within seconds."""
from __future__ import annotations

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis.checks import not_a_server_error

from flashops.serving.loading import ServeOptions, load_predictor
from flashops.serving.server import create_app


@pytest.fixture(scope="module")
def predictor_api(trained, tmp_path_factory):
    predictor = load_predictor(ServeOptions(model_uri=trained[3], name="letters", mtp_tokens=2, max_concurrency=2,
                                            max_len=12, cache_dir=str(tmp_path_factory.mktemp("cache"))))
    app = create_app([predictor])
    yield app, schemathesis.openapi.from_asgi("/openapi.json", app)


def test_the_openapi_document_describes_the_openai_bodies(predictor_api):
    app, _ = predictor_api
    doc = app.openapi()
    body = doc["paths"]["/openai/v1/chat/completions"]["post"]["requestBody"]["content"]["application/json"]
    assert body["schema"] == {"$ref": "#/components/schemas/ChatCompletionRequest"}
    chat = doc["components"]["schemas"]["ChatCompletionRequest"]
    assert {"messages", "logprobs", "top_logprobs", "thinking"} <= set(chat["properties"])
    assert "/openai/v1/models/{model_id}" in doc["paths"]


def test_no_input_gives_a_server_error(predictor_api):
    _, api = predictor_api
    failures = []
    for result in api.get_all_operations():
        operation = result.ok()

        @given(case=operation.as_strategy())
        @settings(max_examples=6, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate])
        def fuzz(case):
            case.call_and_validate(checks=[not_a_server_error])

        try:
            fuzz()
        except Exception as e:  # collect every operation's failures, then report them together
            failures.append(f"{operation.method.upper()} {operation.path}: {e}")
    assert not failures, "\n\n".join(failures)
