"""Per-request timings and the summary, with the definitions of vLLM's serving benchmark:

- TTFT: from sending the request to receiving the first non-empty token chunk.
- ITL: each gap between successive token chunks after the first.
- TPOT: (E2E - TTFT) / (output tokens - 1), per request (requests with one token have none).
- E2E: from sending to the final message.
- Throughput: completed requests / duration; output tokens / duration; (prompt + output) / duration.
- Goodput: requests per second that met every SLO given (TTFT, TPOT, E2E).
- Prefix hit rate: prompt tokens served from a replica's prefix cache / prompt tokens (tpserve.v1).
Token counts come from the server (token ids in tpserve.v1, `output_tokens` in KServe).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np


@dataclass(slots=True)
class RequestRecord:
    ok: bool = False
    status: str = "OK"
    prompt_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens the server's prefix cache served (tpserve.v1 reports them)
    ttft: float | None = None
    e2e: float | None = None
    itl: list[float] = field(default_factory=list)

    @property
    def tpot(self) -> float | None:
        if not self.ok or self.output_tokens < 2 or self.ttft is None:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)


def stats(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    a = np.asarray(values) * 1e3  # milliseconds
    return {"mean_ms": float(a.mean()), "median_ms": float(np.median(a)), "p90_ms": float(np.percentile(a, 90)),
            "p95_ms": float(np.percentile(a, 95)), "p99_ms": float(np.percentile(a, 99))}


def meets(r: RequestRecord, slo: dict[str, float | None]) -> bool:
    if not r.ok:
        return False
    checks = {"ttft": r.ttft, "tpot": r.tpot, "e2e": r.e2e}
    for key, limit_ms in slo.items():
        if limit_ms is None:
            continue
        v = checks[key]
        if v is not None and v * 1e3 > limit_ms:
            return False
    return True


def summarize(records: list[RequestRecord], duration: float, slo: dict[str, float | None]) -> dict:
    ok = [r for r in records if r.ok]
    errors: dict[str, int] = {}
    for r in records:
        if not r.ok:
            errors[r.status] = errors.get(r.status, 0) + 1
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.prompt_tokens for r in ok)
    good = sum(meets(r, slo) for r in records)
    return {
        "completed": len(ok), "failed": len(records) - len(ok), "errors_by_status": errors,
        "duration_s": duration,
        "request_throughput": len(ok) / duration if duration else 0.0,
        "output_token_throughput": out_tokens / duration if duration else 0.0,
        "total_token_throughput": (in_tokens + out_tokens) / duration if duration else 0.0,
        "goodput_requests": good, "goodput": good / duration if duration else 0.0, "slo_ms": slo,
        "ttft": stats([r.ttft for r in ok if r.ttft is not None]),
        "tpot": stats([r.tpot for r in ok if r.tpot is not None]),
        "itl": stats([g for r in ok for g in r.itl]),
        "e2e": stats([r.e2e for r in ok if r.e2e is not None]),
        "prompt_tokens": in_tokens, "output_tokens": out_tokens,
        "prefix_hit_rate": sum(r.cached_tokens for r in ok) / in_tokens if in_tokens else 0.0,
    }


def record_dict(r: RequestRecord) -> dict:
    d = asdict(r)
    d["tpot"] = r.tpot
    return d
