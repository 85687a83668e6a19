"""Prometheus metrics, in the default registry that kserve's `/metrics` route exports.

flashops_requests_total{model,route,status}       requests by outcome
flashops_prompt_tokens_total / _generated_tokens_total{model}
flashops_time_to_first_token_seconds{model}       histogram
flashops_decode_tokens_per_second{model}          throughput of the last engine step (all sequences)
flashops_draft_proposed_total / _accepted_total{model,position}   MTP acceptance per draft position
flashops_mean_acceptance_length{model}            tokens emitted per verification step (1 + accepted)
"""
from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

REQUESTS = Counter("flashops_requests", "requests by route and HTTP status", ["model", "route", "status"])
PROMPT_TOKENS = Counter("flashops_prompt_tokens", "prompt tokens processed", ["model"])
GENERATED_TOKENS = Counter("flashops_generated_tokens", "tokens generated", ["model"])
TTFT = Histogram("flashops_time_to_first_token_seconds", "time from admission to the first token", ["model"],
                 buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
TOKENS_PER_SECOND = Gauge("flashops_decode_tokens_per_second", "tokens/s of the last decode step", ["model"])
DRAFT_PROPOSED = Counter("flashops_draft_proposed", "MTP draft tokens proposed", ["model", "position"])
DRAFT_ACCEPTED = Counter("flashops_draft_accepted", "MTP draft tokens accepted", ["model", "position"])
VERIFY_STEPS = Counter("flashops_verify_steps", "speculative verification steps (one per sequence)", ["model"])
MEAN_ACCEPTANCE = Gauge("flashops_mean_acceptance_length", "mean tokens per verification step since start",
                        ["model"])


class ModelMetrics:
    """The metric children of one served model, plus running totals for the mean acceptance length."""

    def __init__(self, model: str):
        self.model = model
        self.steps = 0
        self.emitted = 0
        self.proposed_by_pos: dict[int, int] = {}
        self.accepted_by_pos: dict[int, int] = {}

    def request(self, route: str, status: int) -> None:
        REQUESTS.labels(self.model, route, str(status)).inc()

    def prompt(self, n: int) -> None:
        PROMPT_TOKENS.labels(self.model).inc(n)

    def generated(self, n: int) -> None:
        GENERATED_TOKENS.labels(self.model).inc(n)

    def first_token(self, seconds: float) -> None:
        TTFT.labels(self.model).observe(seconds)

    def throughput(self, tokens: int, seconds: float) -> None:
        if seconds > 0:
            TOKENS_PER_SECOND.labels(self.model).set(tokens / seconds)

    def verification(self, proposed: int, accepted: int) -> None:
        """One sequence's verify step: `proposed` drafts, the first `accepted` of them kept."""
        self.steps += 1
        self.emitted += accepted + 1
        VERIFY_STEPS.labels(self.model).inc()
        for pos in range(1, proposed + 1):
            DRAFT_PROPOSED.labels(self.model, str(pos)).inc()
            self.proposed_by_pos[pos] = self.proposed_by_pos.get(pos, 0) + 1
            if pos <= accepted:
                DRAFT_ACCEPTED.labels(self.model, str(pos)).inc()
                self.accepted_by_pos[pos] = self.accepted_by_pos.get(pos, 0) + 1
        MEAN_ACCEPTANCE.labels(self.model).set(self.mean_acceptance_length)

    @property
    def mean_acceptance_length(self) -> float:
        return self.emitted / self.steps if self.steps else 0.0

    def acceptance_by_position(self) -> dict[int, float]:
        return {p: self.accepted_by_pos.get(p, 0) / n for p, n in sorted(self.proposed_by_pos.items())}
