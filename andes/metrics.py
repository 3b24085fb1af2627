"""Summary figures of a run, the same keys for the simulator and the load generator.

Definitions follow vLLM's benchmark (``vllm bench serve``): TTFT = first token - arrival;
TPOT = (E2E - TTFT) / (output tokens - 1) per request; ITL = gaps between consecutive chunks,
pooled. Delivered TDS is a request's own token rate after its first token. QoE is
:mod:`andes.qoe`; goodput is the fraction of requests at QoE >= 0.9 and >= 0.95.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]

PERFECT = 1.0 - 1e-9


@dataclass(frozen=True)
class RequestOutcomes:
    """One row per request that finished (struct of arrays)."""

    arrival_s: FloatArray
    first_token_s: FloatArray
    finish_s: FloatArray
    output_tokens: FloatArray
    qoe: FloatArray
    preemptions: FloatArray

    def __len__(self) -> int:
        return int(self.qoe.size)


def _pct(values: FloatArray, q: float) -> float:
    return float(np.percentile(values, q)) if values.size else float("nan")


def summarize(
    outcomes: RequestOutcomes, itl_s: FloatArray | None = None
) -> dict[str, Any]:
    """The headline figures of a run (DESIGN section 2)."""
    n = len(outcomes)
    if n == 0:
        return {"requests": 0}
    ttft = outcomes.first_token_s - outcomes.arrival_s
    decode_span = outcomes.finish_s - outcomes.first_token_s
    extra_tokens = outcomes.output_tokens - 1
    multi = extra_tokens > 0
    tpot = decode_span[multi] / extra_tokens[multi]
    tds = extra_tokens[multi] / np.maximum(decode_span[multi], 1e-9)
    makespan = float(outcomes.finish_s.max() - outcomes.arrival_s.min())
    summary: dict[str, Any] = {
        "requests": n,
        "avg_qoe": float(outcomes.qoe.mean()),
        "p10_qoe": _pct(outcomes.qoe, 10),
        "p50_qoe": _pct(outcomes.qoe, 50),
        "qoe_ge_0_9": float(np.mean(outcomes.qoe >= 0.9)),
        "qoe_ge_0_95": float(np.mean(outcomes.qoe >= 0.95)),
        "perfect_qoe": float(np.mean(outcomes.qoe >= PERFECT)),
        "ttft_p50_s": _pct(ttft, 50),
        "ttft_p90_s": _pct(ttft, 90),
        "ttft_p99_s": _pct(ttft, 99),
        "tds_p50": _pct(tds, 50),
        "tpot_p50_s": _pct(tpot, 50),
        "throughput_tok_s": float(outcomes.output_tokens.sum() / max(makespan, 1e-9)),
        "preemptions_per_request": float(outcomes.preemptions.mean()),
    }
    if itl_s is not None:
        summary["itl_p50_s"] = _pct(itl_s, 50)
    return summary


def capacity_at(rates: list[float], avg_qoe: list[float], threshold: float = 0.9) -> float:
    """Highest rate with average QoE >= threshold, interpolated between sweep points.

    Scans rates in ascending order and returns where the QoE curve first crosses below the
    threshold (linear interpolation); the highest rate if it never does; 0 if even the lowest
    rate is below it.
    """
    order = np.argsort(rates)
    r = np.asarray(rates, dtype=np.float64)[order]
    q = np.asarray(avg_qoe, dtype=np.float64)[order]
    if r.size == 0 or q[0] < threshold:
        return 0.0
    for i in range(1, r.size):
        if q[i] < threshold:
            frac = (q[i - 1] - threshold) / (q[i - 1] - q[i])
            return float(r[i - 1] + frac * (r[i] - r[i - 1]))
    return float(r[-1])
