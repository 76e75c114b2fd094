"""Health gates: pure functions from measured health to a verdict, with the values that decided it.

A wave is judged on ``Aggregate``s over one window: the devices on the new version (candidate) and
those still on the previous version (baseline). ``evaluate`` returns True (every gate passed), False
(a gate failed) or None (too few cases, or too few escalated cases answered by the cloud, on the new
version to judge yet), and one ``GateResult`` per gate with the measured value, the baseline's and the
limit that applied.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from shared.rollouts import GateResult, GateThresholds

__all__ = ["Aggregate", "evaluate", "failed_summary"]


@dataclass
class Aggregate:
    """Counts summed over devices and a window; ``p99`` is the case-weighted mean of device p99s."""

    devices: int = 0
    requests: int = 0
    errors: int = 0
    escalated: int = 0
    cloud_answers: int = 0
    agreed: int = 0
    p99_weighted: float = 0.0
    p99_weight: int = 0

    @property
    def error_rate(self) -> float | None:
        return self.errors / self.requests if self.requests else None

    @property
    def escalation_rate(self) -> float | None:
        return self.escalated / self.requests if self.requests else None

    @property
    def agreement(self) -> float | None:
        return self.agreed / self.cloud_answers if self.cloud_answers else None

    @property
    def p99_ms(self) -> float | None:
        return self.p99_weighted / self.p99_weight if self.p99_weight else None

    def add(self, *, requests: int, errors: int, escalated: int, cloud_answers: int, agreed: int,
            p99_ms: float | None) -> None:
        self.requests += requests
        self.errors += errors
        self.escalated += escalated
        self.cloud_answers += cloud_answers
        self.agreed += agreed
        if p99_ms is not None and requests > 0:
            self.p99_weighted += p99_ms * requests
            self.p99_weight += requests

    def to_dict(self) -> dict[str, float]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, float]) -> Aggregate:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})  # type: ignore[arg-type]


def evaluate(
    th: GateThresholds, cand: Aggregate, base: Aggregate | None, load_failures: list[str]
) -> tuple[bool | None, list[GateResult]]:
    """Judge the candidate against the baseline (None: no baseline with enough cases)."""
    results = [
        GateResult(
            name="load_failures",
            passed=len(load_failures) <= th.max_load_failures,
            value=len(load_failures),
            limit=th.max_load_failures,
            detail=("failed: " + ", ".join(load_failures[:10])) if load_failures else "",
        )
    ]
    if cand.requests < th.min_requests:
        wait = f"{cand.requests} case(s) on the new version so far; gates need {th.min_requests}"
        results += [GateResult(name=n, passed=None, detail=wait) for n in _NAMES]
    else:
        results += [
            _error_rate(th, cand, base),
            _escalation_rate(th, cand, base),
            _agreement(th, cand, base),
            _p99(th, cand, base),
        ]
    if any(r.passed is False for r in results):
        return False, results
    if cand.requests < th.min_requests or cand.cloud_answers < th.min_cloud_answers:
        # Agreement with the cloud is the one signal of a wrong answer: no verdict without it.
        return None, results
    return True, results


_NAMES = ("error_rate", "escalation_rate", "agreement", "p99_latency_ms")


def _error_rate(th: GateThresholds, cand: Aggregate, base: Aggregate | None) -> GateResult:
    value = cand.error_rate
    b = base.error_rate if base is not None else None
    limit = max(th.max_error_rate, (b or 0.0) + th.max_error_rate_increase) if b is not None else th.max_error_rate
    return GateResult(name="error_rate", passed=value is not None and value <= limit, value=value, baseline=b,
                      limit=limit, detail=f"{cand.errors} model failure(s) in {cand.requests} cases")


def _escalation_rate(th: GateThresholds, cand: Aggregate, base: Aggregate | None) -> GateResult:
    value = cand.escalation_rate
    b = base.escalation_rate if base is not None else None
    if b is None:
        return GateResult(name="escalation_rate", passed=None, value=value, detail="no baseline to compare with")
    limit = b + th.max_escalation_rate_increase
    return GateResult(name="escalation_rate", passed=value is not None and value <= limit, value=value,
                      baseline=b, limit=limit, detail=f"{cand.escalated} of {cand.requests} cases escalated")


def _agreement(th: GateThresholds, cand: Aggregate, base: Aggregate | None) -> GateResult:
    if cand.cloud_answers < th.min_cloud_answers:
        return GateResult(name="agreement", passed=None, value=cand.agreement,
                          detail=f"{cand.cloud_answers} cloud answer(s); need {th.min_cloud_answers} to judge")
    b = base.agreement if base is not None and base.cloud_answers >= th.min_cloud_answers else None
    limits = [x for x in (None if b is None else b - th.max_agreement_drop, th.min_agreement) if x is not None]
    detail = f"{cand.agreed} of {cand.cloud_answers} escalated cases: edge label == cloud label"
    if not limits:
        return GateResult(name="agreement", passed=None, value=cand.agreement, detail=detail + "; no baseline")
    limit = max(limits)
    value = cand.agreement
    return GateResult(name="agreement", passed=value is not None and value >= limit, value=value, baseline=b,
                      limit=limit, detail=detail)


def _p99(th: GateThresholds, cand: Aggregate, base: Aggregate | None) -> GateResult:
    value = cand.p99_ms
    b = base.p99_ms if base is not None else None
    limit = None if b is None else max(b * th.max_p99_latency_ratio, b + th.p99_latency_slack_ms)
    if th.max_p99_latency_ms is not None:
        limit = th.max_p99_latency_ms if limit is None else min(limit, th.max_p99_latency_ms)
    if value is None or limit is None:
        why = "no local latency reported" if value is None else "no baseline to compare with"
        return GateResult(name="p99_latency_ms", passed=None, value=value, baseline=b, detail=why)
    return GateResult(name="p99_latency_ms", passed=value <= limit, value=value, baseline=b, limit=limit)


def failed_summary(results: list[GateResult]) -> str:
    """'agreement 0.02 < limit 0.85; ...' for the gates that failed."""
    parts = []
    for r in results:
        if r.passed is False:
            op = ">=" if r.name == "agreement" else "<="
            parts.append(f"{r.name} {_num(r.value)} (needs {op} {_num(r.limit)}, baseline {_num(r.baseline)})")
    return "; ".join(parts)


def _num(v: float | None) -> str:
    return "-" if v is None else f"{v:.4g}"
