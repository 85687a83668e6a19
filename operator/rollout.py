"""Which model a ModelDeployment's InferenceService serves, and with how many MTP draft tokens: the operator's side
of the promotion gate. The decision itself is flashops.api.promotion.decide (shared with `flashops serve -f`);
this module only fetches the recorded evaluations through lineage and shapes the answer for the status.

    plan = plan_rollout(ext, md, candidate="s3://.../models/quickstart/step-40", served=<the ISVC's model or None>,
                        old_status=body.get("status"))
    plan.model          # what to serve now: the candidate if it passed, else the model served now (None: nothing yet)
    plan.decision       # flashops.api.promotion.Decision, None when no decision was needed (no gate, same model)
    plan.mtp_tokens     # speculative.mtpTokens: auto resolved (None when the spec gives a number)

A failed gate never takes the served model down: it keeps serving and condition PromotionBlocked says why, with
the numbers. With canaryTrafficPercent the passing model becomes KServe's canary (the new revision gets that share,
the last rolled-out one the rest) until canaryTrafficPercent is removed or set to 100.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from flashops.api import spec as S
from flashops.api.promotion import Decision, MtpChoice, choose_mtp_tokens, decide, deployment_mode, recorded_evaluations
from flashops.operator.integrations import Integrations, LineageProblem

CONDITION = "PromotionBlocked"


@dataclass(frozen=True)
class Rollout:
    model: str | None
    decision: Decision | None = None
    mtp_tokens: int | None = None
    mtp_choice: str | None = None
    canary_model: str | None = None
    previous_model: str | None = None

    @property
    def blocked(self) -> bool:
        return self.decision is not None and not self.decision.passed


def plan_rollout(ext: Integrations, md: S.ModelDeployment, candidate: str, served: str | None,
                 old_status: dict | None) -> Rollout:
    old = old_status or {}
    spec = md.spec
    mode = deployment_mode(spec.thinking)
    cache: dict[str, list[dict]] = {}

    def evals(uri: str) -> list[dict]:
        if uri not in cache:
            cache[uri] = recorded_evaluations(ext, uri)
        return cache[uri]

    decision: Decision | None = None
    model: str | None = candidate
    if spec.promotion is not None and candidate != served:
        if not ext.lineage_enabled:
            decision = Decision(False, (
                f"promotion of {candidate} blocked: spec.promotion reads the model's recorded evaluations from lineage, "
                "and this operator has no lineage (set FLASHOPS_LINEAGE_URL, helm value lineage.url), or remove "
                "spec.promotion"), candidate, served, waiting=True)
        else:
            try:
                current = evals(served) if served and spec.promotion.compare_to == "current" else None
                decision = decide(spec.promotion, evals(candidate), current, candidate=candidate, current=served,
                                  mode=mode, mtp_tokens=spec.speculative.mtp_tokens)
            except LineageProblem as e:
                decision = Decision(False, f"promotion of {candidate} waits: cannot read its recorded evaluations "
                                           f"yet: {e}", candidate, served, waiting=True)
        if not decision.passed:
            model = served

    mtp_tokens = mtp_choice = None
    if spec.speculative.mtp_tokens == S.MTP_AUTO and model is not None:
        if model == served and old.get("mtpTokens") is not None:
            mtp_tokens, mtp_choice = int(old["mtpTokens"]), old.get("mtpChoice")  # decided when it was rolled out
        else:
            choice = _choose(ext, evals, model, mode)
            mtp_tokens, mtp_choice = choice.k, choice.message

    pct = spec.canary_traffic_percent
    canary = previous = None
    if model is not None and pct is not None and pct < 100:
        if served and model != served:
            canary, previous = model, served  # KServe: the new revision gets pct, the last rolled-out one the rest
        elif old.get("canaryModel") == model:
            canary, previous = model, (old.get("promotion") or {}).get("current")
    return Rollout(model, decision, mtp_tokens, mtp_choice, canary, previous)


def _choose(ext: Integrations, evals: Any, model: str, mode: str) -> MtpChoice:
    if not ext.lineage_enabled:
        return choose_mtp_tokens([], mode=mode)  # says: nothing recorded, 0
    try:
        return choose_mtp_tokens(evals(model), mode=mode)
    except LineageProblem as e:
        choice = choose_mtp_tokens([], mode=mode)
        return MtpChoice(choice.k, f"{choice.message} (lineage unavailable: {e})")


def canary_note(plan: Rollout, percent: int | None) -> str:
    if not plan.canary_model:
        return ""
    rest = f", {100 - (percent or 0)}% stay on {plan.previous_model}" if plan.previous_model else ""
    return (f"canary: {percent}% of requests go to {plan.canary_model}{rest}; set canaryTrafficPercent: 100 (or "
            "remove it) to promote it fully")


def promotion_condition(plan: Rollout, previous: list[dict] | None, now: str) -> dict:
    """The PromotionBlocked condition (only on deployments with spec.promotion): True with the numbers while a
    candidate is blocked; False once the candidate is served. lastTransitionTime moves only when status flips."""
    old = next((c for c in previous or [] if c.get("type") == CONDITION), None)
    if plan.blocked:
        status, reason, message = "True", "WaitingForEvaluation" if plan.decision.waiting else "GateFailed", \
            plan.decision.message  # type: ignore[union-attr]
    elif plan.decision is not None:
        status, reason, message = "False", "GatePassed", plan.decision.message
    elif old is not None and old.get("status") == "False":
        return old  # nothing new to decide: the served model is the candidate
    else:
        status, reason, message = "False", "Serving", f"{plan.model} is served" if plan.model else "nothing to promote"
    since = old["lastTransitionTime"] if old and old.get("status") == status and old.get("lastTransitionTime") else now
    return {"type": CONDITION, "status": status, "reason": reason, "message": message, "lastTransitionTime": since}
