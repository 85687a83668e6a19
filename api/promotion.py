"""Promotion gates and `mtpTokens: auto`: decided here, once, from recorded evaluations (torch-free, no I/O).

The operator (flashops.operator.reconcile) and `flashops serve -f` (flashops.cli.serve_commands) both call
`decide` with the deployment's `spec.promotion`, the candidate model's recorded evaluations and the evaluations
of the model served now; they only fetch the records (`recorded_evaluations`) and act on the answer.

    from flashops.api.promotion import decide, choose_mtp_tokens, recorded_evaluations
    d = decide(md.spec.promotion, candidate_evals, current_evals, candidate=uri, current=served_uri,
               mode="non-thinking", mtp_tokens=2)
    d.passed, d.message            # False, "promotion blocked: builtin:rl-heldout non-thinking accuracy 0.31 < min 0.4"
    d.checks[0].value, d.checks[0].threshold, d.checks[0].current
    k = choose_mtp_tokens(candidate_evals, mode="non-thinking")   # MtpChoice(k=2, speedups={...}, message)

An evaluation record is what `Lineage.evaluations(node)` returns (newest first): {"id", "created_at", "result"},
with result = `flashops eval --json`: {"suites": [{"name", "sha256", "modes": [{"mode", "accuracy", "mean_tokens",
"accuracy_per_1k_tokens", "acceptance_length": {"1": .., "2": .., "3": ..}, "mtp_cost_ratio": ..}]}]}.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Iterable

from flashops.api.spec import EVAL_MODES, PROMOTION_METRICS, PromotionRequirement, PromotionSpec

MAX_MTP_TOKENS = 3


# ----------------------------------------------------------------------------------------------- reading records


def _result(record: dict) -> dict:
    result = record.get("result") if isinstance(record, dict) else None
    return result if isinstance(result, dict) else (record if isinstance(record, dict) else {})


def _suite(record: dict, name: str) -> dict | None:
    for suite in _result(record).get("suites") or []:
        if isinstance(suite, dict) and suite.get("name") == name:
            return suite
    return None


def _mode(suite: dict, mode: str) -> dict | None:
    for entry in suite.get("modes") or []:
        if isinstance(entry, dict) and entry.get("mode") == mode:
            return entry
    return None


def _acceptance(entry: dict) -> dict[int, float]:
    """acceptance_length per k: {"1": 1.6, "2": 2.0} -> {1: 1.6, 2: 2.0} (a bare number names no k: ignored)."""
    raw = entry.get("acceptance_length")
    out: dict[int, float] = {}
    if isinstance(raw, dict):
        for k, v in raw.items():
            try:
                kk = int(k)
            except (TypeError, ValueError):
                continue
            if 1 <= kk <= MAX_MTP_TOKENS and _number(v) is not None:
                out[kk] = float(v)
    return out


def _number(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def suites_evaluated(records: Iterable[dict]) -> list[str]:
    names: list[str] = []
    for rec in records:
        for suite in _result(rec).get("suites") or []:
            if isinstance(suite, dict) and suite.get("name") and suite["name"] not in names:
                names.append(suite["name"])
    return names


@dataclass(frozen=True)
class Measured:
    """One metric of one model, suite and mode, and the record it came from."""

    value: float | None
    record_id: Any = None
    sha256: str | None = None
    problem: str | None = None  # why there is no value


def measure(records: list[dict], req: PromotionRequirement, mode: str, k: int | None, model: str,
            where: str) -> Measured:
    """The newest recorded value of `req` for `mode` (records newest first); `where` names the spec field."""
    for rec in records:
        suite = _suite(rec, req.suite)
        if suite is None:
            continue
        entry = _mode(suite, mode)
        if entry is None:
            modes = [m.get("mode") for m in suite.get("modes") or [] if isinstance(m, dict)]
            return Measured(None, rec.get("id"), suite.get("sha256"), (
                f"{where}.mode: suite {req.suite} was evaluated for {model} in mode(s) {', '.join(map(str, modes)) or 'none'}, "
                f"not {mode}: evaluate that mode (flashops eval --model {model} --suite {req.suite}) or set mode"))
        if req.metric == "acceptance_length":
            per_k = _acceptance(entry)
            kk = k or (max(per_k) if per_k else None)
            value = per_k.get(kk) if kk else None
            if value is None:
                return Measured(None, rec.get("id"), suite.get("sha256"), (
                    f"{where}.metric: no acceptance_length{f' at k={kk}' if kk else ''} is recorded for {model} on "
                    f"{req.suite} ({mode}): evaluate it with MTP (flashops eval --model {model} --suite {req.suite} "
                    "--mtp-tokens 3)"))
            return Measured(value, rec.get("id"), suite.get("sha256"))
        value = _number(entry.get(req.metric))
        if value is None:
            return Measured(None, rec.get("id"), suite.get("sha256"), (
                f"{where}.metric: the evaluation of {model} on {req.suite} ({mode}) has no {req.metric}"))
        return Measured(value, rec.get("id"), suite.get("sha256"))
    known = suites_evaluated(records)
    return Measured(None, None, None, (
        f"{where}.suite: {req.suite!r} was never evaluated for {model} "
        f"({'its evaluations cover ' + ', '.join(known) if known else 'it has no recorded evaluation'}): run "
        f"`flashops eval --model {model} --suite {req.suite}` (or an eval stage in its pipeline), or fix the suite name"))


# ----------------------------------------------------------------------------------------------- the gate


@dataclass(frozen=True)
class Check:
    """One requirement's numbers: the candidate's value, the threshold (min or max), the current model's value
    and what it requires (current +- minImprovement), and whether it passed."""

    suite: str
    mode: str
    metric: str
    value: float | None
    min: float | None = None
    max: float | None = None
    current: float | None = None
    required: float | None = None  # from compareTo: current (the bound the current model's value sets)
    k: int | None = None
    passed: bool = False
    problem: str | None = None

    def describe(self) -> str:
        name = f"{self.suite} {self.mode} {self.metric}" + (f"@k={self.k}" if self.k else "")
        if self.problem:
            return f"{name}: {self.problem}"
        parts = []
        if self.min is not None:
            parts.append(f"{'>=' if self.value is not None and self.value >= self.min else '<'} min {_fmt(self.min)}")
        if self.max is not None:
            parts.append(f"{'<=' if self.value is not None and self.value <= self.max else '>'} max {_fmt(self.max)}")
        if self.required is not None:
            better = PROMOTION_METRICS[self.metric] == "higher"
            ok = self.value is not None and (self.value >= self.required if better else self.value <= self.required)
            sign = (">=" if ok else "<") if better else ("<=" if ok else ">")
            parts.append(f"{sign} {_fmt(self.required)} (current model {_fmt(self.current)})")
        return f"{name} {_fmt(self.value)} " + ", ".join(parts) if parts else f"{name} {_fmt(self.value)}"

    def to_status(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass(frozen=True)
class Decision:
    passed: bool
    message: str
    candidate: str
    current: str | None = None
    checks: tuple[Check, ...] = field(default_factory=tuple)
    waiting: bool = False  # blocked because a record is missing (may still come), not because of the numbers

    def to_status(self) -> dict:
        """The typed status block (flashops.api.spec.PromotionStatus)."""
        out = {"passed": self.passed, "candidate": self.candidate, "message": self.message,
               "checks": [c.to_status() for c in self.checks]}
        if self.current:
            out["current"] = self.current
        return out


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.4g}"


def deployment_mode(thinking: bool) -> str:
    return EVAL_MODES[0] if thinking else EVAL_MODES[1]


def decide(gate: PromotionSpec | dict | None, candidate_evals: list[dict], current_evals: list[dict] | None, *,
           candidate: str, current: str | None = None, mode: str = "non-thinking",
           mtp_tokens: int | str | None = None, where: str = "spec.promotion") -> Decision:
    """Pass or block `candidate` (a model URI) under `gate`. `current` is the model served now (None: nothing is
    served yet, so only the thresholds count); the same model as the candidate always passes (it is served)."""
    if gate is None:
        return Decision(True, f"no promotion gate: serving {candidate}", candidate, current)
    if isinstance(gate, dict):
        gate = PromotionSpec.model_validate(gate)
    if current is not None and current == candidate:
        return Decision(True, f"{candidate} is the model served now", candidate, current)
    compare = gate.compare_to == "current" and current is not None
    checks: list[Check] = []
    for i, req in enumerate(gate.require):
        at = f"{where}.require[{i}]"
        m = req.mode or mode
        k = req.k or (mtp_tokens if isinstance(mtp_tokens, int) and mtp_tokens >= 1 else None)
        cand = measure(candidate_evals, req, m, k, candidate, at)
        kk = k if req.metric == "acceptance_length" else None
        if kk is None and req.metric == "acceptance_length" and cand.value is not None:
            kk = _largest_k(candidate_evals, req, m)
        base = dict(suite=req.suite, mode=m, metric=req.metric, value=cand.value, min=req.min, max=req.max, k=kk)
        if cand.problem:
            checks.append(Check(**base, problem=cand.problem))
            continue
        problems, cur_value, required = [], None, None
        if compare:
            cur = measure(current_evals or [], req, m, kk, current, at)  # type: ignore[arg-type]
            if cur.problem:
                checks.append(Check(**base, problem=(
                    f"cannot compare with the current model {current}: {cur.problem}; or set {where}.compareTo: none")))
                continue
            if cand.sha256 and cur.sha256 and cand.sha256 != cur.sha256:
                checks.append(Check(**base, current=cur.value, problem=(
                    f"{at}.suite: the candidate and the current model {current} were evaluated on different contents of "
                    f"{req.suite} (sha256 {cand.sha256[:12]} vs {cur.sha256[:12]}): evaluate the current model on "
                    f"this version (flashops eval --model {current} --suite {req.suite})")))
                continue
            cur_value = cur.value
            better = PROMOTION_METRICS[req.metric] == "higher"
            required = cur_value + gate.min_improvement if better else cur_value - gate.min_improvement  # type: ignore[operator]
            if (cand.value < required) if better else (cand.value > required):  # type: ignore[operator]
                problems.append("current")
        if req.min is not None and cand.value < req.min:  # type: ignore[operator]
            problems.append("min")
        if req.max is not None and cand.value > req.max:  # type: ignore[operator]
            problems.append("max")
        checks.append(Check(**base, current=cur_value, required=required, passed=not problems))
    failed = [c for c in checks if not c.passed]
    waiting = any(c.problem for c in failed)
    against = f" against the current model {current}" if compare else (
        " (no model is served yet: thresholds only)" if gate.compare_to == "current" else "")
    if failed:
        message = (f"promotion of {candidate} blocked" + (f"; {current} keeps serving" if current else "") + ": "
                   + "; ".join(c.describe() for c in failed))
        return Decision(False, message, candidate, current, tuple(checks), waiting)
    message = f"promotion gate passed for {candidate}{against}: " + "; ".join(c.describe() for c in checks)
    return Decision(True, message, candidate, current, tuple(checks))


def _largest_k(records: list[dict], req: PromotionRequirement, mode: str) -> int | None:
    for rec in records:
        suite = _suite(rec, req.suite)
        entry = _mode(suite, mode) if suite else None
        if entry is not None:
            per_k = _acceptance(entry)
            return max(per_k) if per_k else None
    return None


# ----------------------------------------------------------------------------------------------- mtpTokens: auto


@dataclass(frozen=True)
class MtpChoice:
    k: int
    message: str
    speedups: dict[int, float] = field(default_factory=dict)  # expected speedup per k (k=0: 1.0)
    cost_ratio: float | None = None


def choose_mtp_tokens(records: list[dict], *, mode: str = "non-thinking", fallback: int = 0,
                      suites: Iterable[str] | None = None) -> MtpChoice:
    """The k in 0..3 with the best expected speedup acceptance_length(k) / (1 + k * mtp_cost_ratio), from the
    newest evaluation record (newest first) that has acceptance lengths and a measured mtp_cost_ratio for `mode`
    (averaged over its suites, or over `suites`). No such record: `fallback` (0: speculation off), said so."""
    wanted = set(suites) if suites else None
    for rec in records:
        per_k: dict[int, list[float]] = {}
        costs: list[float] = []
        names = []
        for suite in _result(rec).get("suites") or []:
            if not isinstance(suite, dict) or (wanted and suite.get("name") not in wanted):
                continue
            entry = _mode(suite, mode)
            if entry is None:
                continue
            acc = _acceptance(entry)
            cost = _number(entry.get("mtp_cost_ratio", suite.get("mtp_cost_ratio", _result(rec).get("mtp_cost_ratio"))))
            if not acc:
                continue
            names.append(str(suite.get("name")))
            for k, v in acc.items():
                per_k.setdefault(k, []).append(v)
            if cost is not None:
                costs.append(cost)
        if not per_k:
            continue
        if not costs:
            return MtpChoice(fallback, (
                f"mtpTokens auto: evaluation lineage:{rec.get('id')} records acceptance lengths but no measured "
                f"mtp_cost_ratio (the cost of one MTP call relative to a main forward pass): using {fallback}; "
                "re-run flashops eval with --mtp-tokens to measure it"))
        cost = sum(costs) / len(costs)
        speedups = {0: 1.0}
        for k, values in sorted(per_k.items()):
            speedups[k] = (sum(values) / len(values)) / (1.0 + k * cost)
        best = max(speedups, key=lambda k: (round(speedups[k], 9), -k))  # ties: the smaller k
        table = ", ".join(f"k={k}: {s:.2f}x" for k, s in sorted(speedups.items()))
        return MtpChoice(best, (
            f"mtpTokens auto -> {best}: expected speedup acceptance_length(k) / (1 + k x {cost:.3g}) from evaluation "
            f"lineage:{rec.get('id')} ({mode}; {', '.join(names)}): {table}"), speedups, cost)
    return MtpChoice(fallback, (
        f"mtpTokens auto: no recorded evaluation with MTP acceptance lengths ({mode}) for this model: using "
        f"{fallback} (speculation {'off' if fallback == 0 else 'on'}); run flashops eval --model MODEL --suite SUITE "
        "--mtp-tokens 3 to measure them"))


# ----------------------------------------------------------------------------------------------- fetching records


def recorded_evaluations(lineage: Any, model: str) -> list[dict]:
    """The evaluations recorded for the served artifact `model` (a URI, lineage:<id> or name), newest first:
    Lineage.evaluations answers for a model with the checkpoint it was exported from too (the same weights).
    Unknown to lineage: []. Lineage outages propagate (the caller decides whether to wait)."""
    try:
        records = list(lineage.evaluations(model) or [])
    except LookupError:
        return []
    return sorted(records, key=lambda r: (_order(r.get("id")), str(r.get("created_at") or "")), reverse=True)


def _order(rid: Any) -> int:
    try:
        return int(str(rid).removeprefix("lineage:"))
    except ValueError:
        return 0
