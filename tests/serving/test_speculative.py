"""MTP speculative decoding: greedy output is plain greedy output token for token; sampling keeps the
plain sampler's distribution (the rejection rule alone, and end to end through the engine)."""
from __future__ import annotations

import asyncio
from collections import Counter

import pytest
import torch

from flashops.serving.backend import JoyAIBackend
from flashops.serving.engine import Engine
from flashops.serving.metrics import ModelMetrics
from flashops.serving.sampling import SamplingParams, token_probs
from flashops.serving.speculative import accept_greedy, accept_sampling


def test_greedy_rule_accepts_the_longest_matching_prefix_then_the_target_token():
    target = torch.full((4, 10), -5.0)
    for i, t in enumerate([3, 7, 2, 9]):
        target[i, t] = 5.0
    assert accept_greedy([3, 7, 5], target).tokens == [3, 7, 2]
    assert accept_greedy([3, 7, 2], target).tokens == [3, 7, 2, 9]
    assert accept_greedy([4, 7, 2], target).accepted == 0


def total_variation(a: Counter, b: Counter) -> float:
    na, nb = sum(a.values()), sum(b.values())
    return 0.5 * sum(abs(a[k] / na - b[k] / nb) for k in set(a) | set(b))


def test_rejection_rule_emits_tokens_distributed_as_the_target():
    """q (draft) deliberately far from p (target): the first emitted token must still follow p."""
    g = torch.Generator().manual_seed(0)
    p = torch.tensor([[0.5, 0.3, 0.1, 0.1, 0.0], [0.2, 0.2, 0.2, 0.2, 0.2]])
    q = torch.tensor([[0.05, 0.05, 0.1, 0.2, 0.6]])
    n = 20000
    first = Counter()
    for _ in range(n):
        d = int(torch.multinomial(q[0], 1, generator=g))
        first[accept_sampling([d], q, p, g).tokens[0]] += 1
    expected = Counter({i: int(p[0, i] * n) for i in range(5)})
    assert first[4] == 0  # p gives it no mass, so it is never emitted even though q proposes it most
    assert total_variation(first, expected) < 0.015


def _engine(model, mtp_tokens: int, slots: int = 8) -> Engine:
    return Engine(JoyAIBackend(model, slots=slots, max_len=128), lambda ids: "", None, mtp_tokens,
                  ModelMetrics(f"test-k{mtp_tokens}"))


async def _generate_all(engine: Engine, prompts: list[list[int]], params: SamplingParams) -> list[list[int]]:
    async def one(p):
        out = []
        async for chunk in engine.generate(p, params):
            out += chunk.token_ids
        return out

    try:
        return await asyncio.gather(*(one(p) for p in prompts))
    finally:
        await engine.aclose()


def _reference_greedy(model, prompt: list[int], n: int) -> list[int]:
    """Plain greedy without any cache: the whole sequence through model(tokens) each step."""
    seq = list(prompt)
    with torch.inference_mode():
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq]), mtp=False).logits[0, -1].argmax()))
    return seq[len(prompt):]


@pytest.mark.parametrize("k", [1, 2, 3])
def test_speculative_greedy_equals_plain_greedy_token_for_token(trained, k):
    model, _, tok, _ = trained
    prompts = [tok.encode(t).ids for t in ("abc", "klmnop", "xyza", "hijhi")]
    params = SamplingParams(max_tokens=20, temperature=0.0)
    plain = asyncio.run(_generate_all(_engine(model, 0), prompts, params))
    engine = _engine(model, k)
    spec = asyncio.run(_generate_all(engine, prompts, params))
    assert spec == plain
    assert plain[0] == _reference_greedy(model, prompts[0], 20)
    # on the trained model the drafts are mostly right, so the test exercises acceptance, not just rejection
    assert engine.metrics.mean_acceptance_length > 1.5


def chi_square_homogeneity_pvalue(a: Counter, b: Counter, min_expected: float = 5.0) -> float:
    """Two-sample chi-square test; outcomes too rare for the test are pooled into one."""
    na, nb = sum(a.values()), sum(b.values())
    common, rare_a, rare_b = [], 0, 0
    for key in set(a) | set(b):
        if (a[key] + b[key]) * min(na, nb) / (na + nb) >= min_expected:
            common.append((a[key], b[key]))
        else:
            rare_a, rare_b = rare_a + a[key], rare_b + b[key]
    if rare_a + rare_b:
        common.append((rare_a, rare_b))
    stat = 0.0
    for ca, cb in common:
        total = ca + cb
        for observed, n in ((ca, na), (cb, nb)):
            expected = total * n / (na + nb)
            stat += (observed - expected) ** 2 / expected
    df = len(common) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2.0, dtype=torch.float64),
                                         torch.tensor(stat / 2.0, dtype=torch.float64)))


@pytest.mark.slow
def test_speculative_sampling_matches_plain_sampling_distribution(trained):
    """Tokens 2-4 of sampled continuations (temperature 1.3, top-p 0.95): the speculative sampler
    (k=3; the MTP draft distribution differs from the main model's) against the plain sampler."""
    model, _, tok, _ = trained
    prompt = tok.encode("mnop").ids
    n = 400

    def samples(k: int, seed0: int) -> list[list[int]]:
        async def run():
            engine = _engine(model, k, slots=16)
            try:
                outs = []
                for start in range(0, n, 16):
                    outs += await asyncio.gather(*(
                        _collect(engine, prompt, SamplingParams(max_tokens=4, temperature=1.3, top_p=0.95,
                                                                seed=seed0 + i)) for i in range(start, start + 16)))
                return outs, engine.metrics
            finally:
                await engine.aclose()

        return asyncio.run(run())

    (plain, _), (spec, metrics) = samples(0, 0), samples(3, 10_000)
    assert metrics.steps > 0 and 1.0 < metrics.mean_acceptance_length < 4.0  # drafts both kept and rejected
    for position in (1, 2, 3):
        a, b = Counter(o[position] for o in plain), Counter(o[position] for o in spec)
        p_value = chi_square_homogeneity_pvalue(a, b)
        assert p_value > 1e-3, (position, p_value, a.most_common(4), b.most_common(4))


def test_chi_square_helper_detects_a_shifted_distribution():
    same = chi_square_homogeneity_pvalue(Counter({0: 300, 1: 200, 2: 100}), Counter({0: 290, 1: 205, 2: 105}))
    shifted = chi_square_homogeneity_pvalue(Counter({0: 300, 1: 200, 2: 100}), Counter({0: 200, 1: 250, 2: 150}))
    assert same > 0.5 and shifted < 1e-4


async def _collect(engine: Engine, prompt: list[int], params: SamplingParams) -> list[int]:
    out = []
    async for chunk in engine.generate(prompt, params):
        out += chunk.token_ids
    return out
