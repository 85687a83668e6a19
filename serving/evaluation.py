"""Evaluate a model exactly as it is served: greedy decoding through the serving engine and predictor
(`build_predictor`, the chat template, the chat route's reasoning split), so an answer here is the answer
`flashops serve` gives to the same prompt through /openai/v1/chat/completions.

    model, cfg, codec = load_for_eval(model_uri="file:///.../models/quickstart/step-15")
    result = evaluate(model, cfg, codec, [chat_smoke()], EvalOptions(max_tokens=32))
    result["suites"][0]["modes"][0]["accuracy"]

Per suite and mode it measures accuracy, mean generated tokens, accuracy per 1k tokens, per-domain accuracy
and, when the model has an MTP layer, the MTP acceptance length at k = 1..3 (mean tokens emitted per
verification step with k drafts; greedy speculative decoding emits the same tokens, so the answers are
those of the answering pass). Suites and figures: flashops.api.evaluation.
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Callable, Sequence

from flashops.api.evaluation import ACCEPTANCE_K, MODES, ModeRun, Suite, SuiteTask, TaskOutcome, matches, suite_result
from flashops.serving.loading import (LoadError, ServeOptions, build_predictor, fetch, load_checkpoint_model,
                                      load_codec, load_model)
from flashops.serving.openai_routes import split_reasoning
from flashops.serving.protocol import OpenAIError


class EvalError(ValueError):
    """A suite task this model cannot run as asked (too long for its context, ...): a usage error, exit 2."""


@dataclass(frozen=True)
class EvalOptions:
    max_tokens: int = 64
    mtp_tokens: int = 0  # speculative depth of the answering pass (what the deployment serves with)
    acceptance: Sequence[int] = ACCEPTANCE_K  # k measured for the acceptance length; () skips it
    max_concurrency: int = 8  # the predictor's slots (a deployment's default)

    def __post_init__(self) -> None:
        if not 1 <= self.max_tokens <= 32768:
            raise EvalError(f"--max-tokens {self.max_tokens}: use 1..32768")
        if not 0 <= self.mtp_tokens <= 3:
            raise EvalError(f"--mtp-tokens {self.mtp_tokens}: use 0 (off) to 3")


def load_for_eval(model_uri: str | None = None, checkpoint_uri: str | None = None, quantization: str = "none",
                  cache_dir: str | None = None):
    """(model, config, codec) from a serving export (preferred: what is served) or a training checkpoint."""
    if model_uri:
        directory = fetch(model_uri, cache_dir)
        model, cfg = load_model(directory, quantization)
        return model, cfg, load_codec(directory)
    if not checkpoint_uri:
        raise LoadError("nothing to evaluate: give a model or checkpoint URI")
    from flashops.model.tokenizer import TokenizerCodec

    model, cfg = load_checkpoint_model(checkpoint_uri)
    return model, cfg, TokenizerCodec()


def evaluate(model, cfg, codec, suites: list[Suite], options: EvalOptions = EvalOptions(), *,
             name: str = "eval", on_task: Callable[[], None] | None = None,
             on_pass: Callable[[str, str, int, int], None] | None = None, answers: list | None = None) -> dict:
    """The result dict (flashops.api.evaluation: suites[].modes[]...). on_task() after every generation,
    on_pass(suite, mode, k, tasks) before each pass; `answers` (a list) gets one dict per task and mode.
    Raises before any decoding when a task cannot run."""
    has_mtp = getattr(model, "mtp", None) is not None
    if options.mtp_tokens and not has_mtp:
        raise EvalError(f"--mtp-tokens {options.mtp_tokens}: the model has no MTP layer (num_mtp_layers=0): use 0")
    ks = [options.mtp_tokens] + [k for k in (options.acceptance if has_mtp else ()) if k != options.mtp_tokens]
    probe = build_predictor(model, cfg, codec, ServeOptions(model_uri="-", max_concurrency=options.max_concurrency),
                            name)
    for suite in suites:  # every prompt fits, before any decoding
        for task in suite.tasks:
            for mode in task.modes:
                _request(probe, task, mode, options.max_tokens, suite.name)
    started = time.perf_counter()
    results = []
    for suite in suites:
        suite_started = time.perf_counter()
        runs = []
        for mode in MODES:
            tasks = suite.tasks_in(mode)
            if not tasks:
                continue
            run = ModeRun(mode, acceptance={k: None for k in (options.acceptance or ())})
            mode_started = time.perf_counter()
            for k in ks:
                if on_pass:
                    on_pass(suite.name, mode, k, len(tasks))
                predictor = build_predictor(model, cfg, codec, ServeOptions(
                    model_uri="-", mtp_tokens=k, max_concurrency=options.max_concurrency, max_queue=len(tasks)), name)
                texts = asyncio.run(_generate_all(predictor, tasks, mode, options.max_tokens, suite.name, on_task))
                if k == options.mtp_tokens:
                    run.outcomes = [_outcome(t, mode, text, n) for t, (text, n) in zip(tasks, texts)]
                    if answers is not None:
                        answers.extend({"suite": suite.name, "line": o.task.line, "mode": mode, "prompt": o.task.prompt,
                                        "expected": o.task.answer, "match": o.task.match, "answer": o.answer,
                                        "text": o.text, "tokens": o.tokens, "correct": o.correct}
                                       for o in run.outcomes)
                if k in run.acceptance:
                    m = predictor.metrics
                    run.acceptance[k] = m.emitted / m.steps if m.steps else None
            run.wall_s = time.perf_counter() - mode_started
            runs.append(run)
        results.append(suite_result(suite, runs, time.perf_counter() - suite_started))
    out = {"suites": results, "max_tokens": options.max_tokens, "mtp_tokens": options.mtp_tokens,
           "wall_s": round(time.perf_counter() - started, 3)}
    if has_mtp and options.acceptance:  # what mtpTokens: auto weighs the acceptance lengths against
        from flashops.serving.backend import JoyAIBackend, mtp_cost_ratio

        out["mtp_cost_ratio"] = round(mtp_cost_ratio(JoyAIBackend(model, slots=1, max_len=min(cfg.max_seq_len, 128))), 4)
    return out


def passes(suites: list[Suite], model, options: EvalOptions) -> int:
    """How many generations evaluate() runs (for a progress bar)."""
    has_mtp = getattr(model, "mtp", None) is not None
    ks = {options.mtp_tokens, *(options.acceptance if has_mtp else ())}
    return len(ks) * sum(len(t.modes) for s in suites for t in s.tasks)


def _outcome(task: SuiteTask, mode: str, text: str, tokens: int) -> TaskOutcome:
    _, answer = split_reasoning(text, mode == "thinking")
    return TaskOutcome(task, mode, answer, text, tokens, matches(task.match, answer, task.answer))


def _request(predictor, task: SuiteTask, mode: str, max_tokens: int, suite: str):
    """The chat route's request for this task: the same template, prompt ids and sampling checks."""
    prompt = predictor.codec.chat_prompt([{"role": "user", "content": task.prompt}], mode == "thinking")
    try:
        ids = predictor.prompt_ids(prompt)
        return ids, predictor.sampling(len(ids), max_tokens, temperature=0.0)
    except OpenAIError as e:
        raise EvalError(f"{suite} line {task.line}: field 'prompt' ({mode}): {e.message}") from None


async def _generate_all(predictor, tasks: list[SuiteTask], mode: str, max_tokens: int, suite: str,
                        on_task: Callable[[], None] | None) -> list[tuple[str, int]]:
    async def one(task: SuiteTask) -> tuple[str, int]:
        ids, params = _request(predictor, task, mode, max_tokens, suite)
        gen = await predictor.complete(ids, params)
        if on_task:
            on_task()
        return gen.text, gen.completion_tokens

    try:
        return list(await asyncio.gather(*(one(t) for t in tasks)))
    finally:
        await predictor.engine.aclose()
