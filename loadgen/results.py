"""Result documents: the figures of a run under the simulator's key names, and its validity.

A row holds :func:`andes.metrics.summarize`'s keys (the ones ``andes sim`` writes, so a
measured run and a simulated one compare key by key), the errors by kind, the client's send
lag, and every request's timeline. A run whose client could not keep its own schedule
measured the client, not the server: :func:`validity` marks it invalid.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from andes import __version__
from andes.metrics import capacity_at, summarize
from andes.v1 import generation_pb2
from loadgen.openloop import DriveResult, FloatArray, StreamRecord

LAG_P99_LIMIT_S = 0.010
"""A run is valid only if 99% of requests left within 10 ms of their intended time: beyond
that the load generator, not the server, shaped the offered load."""

QOE_THRESHOLD = 0.9
"""Capacity is the highest rate whose average QoE is at least this (as ``andes sim``)."""

SUMMARY_KEYS = (
    "requests", "avg_qoe", "p10_qoe", "p50_qoe", "qoe_ge_0_9", "qoe_ge_0_95", "perfect_qoe",
    "ttft_p50_s", "ttft_p90_s", "ttft_p99_s", "tds_p50", "tpot_p50_s", "itl_p50_s",
    "throughput_tok_s", "preemptions_per_request",
)
"""Every row has all of these (None where nothing finished to measure)."""

TIME_DECIMALS = 6
"""Timelines are written to the microsecond: finer is noise, and JSON stays small."""

Row = dict[str, Any]


def _ms(value: float) -> float | None:
    return round(1e3 * value, 3) if math.isfinite(value) else None


def lag_stats(send_lag_s: FloatArray) -> dict[str, float | None]:
    """Send lag percentiles in milliseconds (None when nothing was sent)."""
    send_lag_s = send_lag_s[np.isfinite(send_lag_s)]  # NaN: cancelled before it was sent
    if send_lag_s.size == 0:
        return {"p50_ms": None, "p99_ms": None, "max_ms": None}
    return {
        "p50_ms": _ms(float(np.percentile(send_lag_s, 50))),
        "p99_ms": _ms(float(np.percentile(send_lag_s, 99))),
        "max_ms": _ms(float(send_lag_s.max())),
    }


def validity(send_lag_s: FloatArray, limit_s: float = LAG_P99_LIMIT_S) -> tuple[bool, str]:
    """(valid, reason): invalid when the send lag's p99 exceeds ``limit_s``."""
    send_lag_s = send_lag_s[np.isfinite(send_lag_s)]
    if send_lag_s.size == 0:
        return True, ""
    p99 = float(np.percentile(send_lag_s, 99))
    if p99 <= limit_s:
        return True, ""
    return False, (
        f"send lag p99 {1e3 * p99:.1f} ms exceeds {1e3 * limit_s:g} ms: the load generator "
        "could not send on schedule, so it, not the server, shaped the load"
    )


def _finish_name(value: int) -> str:
    name: str = generation_pb2.FinishReason.Name(value) if value else ""
    return name.removeprefix("FINISH_REASON_").lower()


def timeline(record: StreamRecord) -> Row:
    """One request: what it asked for, what happened, and its token receipt times (seconds
    from its send)."""
    times = [round(t - record.sent_s, TIME_DECIMALS) for t in record.token_times]
    return {
        "index": record.index,
        "request_id": record.request_id,
        "intended_s": round(record.intended_s, TIME_DECIMALS),
        "sent_s": round(record.sent_s, TIME_DECIMALS),
        "expected_ttft_s": record.ttft_s,
        "expected_tds": record.tds,
        "max_tokens": record.max_tokens,
        "tokens": len(record.token_times),
        "ttft_s": times[0] if times else None,
        "qoe": record.qoe if record.completed else None,
        "finish_reason": _finish_name(record.finish_reason),
        "error": record.error,
        "error_detail": record.error_detail,
        "contiguous": record.indices_ok,
        "counted_by": record.counted_by,
        "usage_tokens": record.usage_tokens,
        "token_times_s": times,
    }


def run_row(result: DriveResult, rate: float | None, *, lag_limit_s: float = LAG_P99_LIMIT_S
            ) -> Row:
    """The row of one run at one rate (None: a trace replayed on its own clock)."""
    summary = summarize(result.outcomes(), result.itl_s())
    row: Row = {"rate": rate}
    row.update((key, summary.get(key)) for key in SUMMARY_KEYS)
    # The client cannot see preemptions; 0 would be a claim, null is the truth.
    row["preemptions_per_request"] = None
    valid, reason = validity(result.send_lag_s, lag_limit_s)
    row.update(
        sent=len(result.records),
        completed=sum(r.completed for r in result.records),
        errors=result.errors,
        streams_contiguous=all(r.indices_ok for r in result.records if r.completed),
        send_lag=lag_stats(result.send_lag_s),
        valid=valid,
        invalid_reason=reason,
        interrupted=result.interrupted,
        wall_s=round(result.wall_s, 3),
        per_request=[timeline(record) for record in result.records],
    )
    return row


def document(command: str, config: Row, rows: list[Row], *, interrupted: bool = False) -> Row:
    """The whole result file: config, one row per rate, capacity, validity. ``interrupted``:
    stopped early (rows of rates never started are absent)."""
    rated = [(row["rate"], row["avg_qoe"]) for row in rows
             if row["rate"] is not None and row["avg_qoe"] is not None]
    capacity = (capacity_at([r for r, _ in rated], [q for _, q in rated], QOE_THRESHOLD)
                if rated else None)
    reasons = [f"rate {row['rate']}: {row['invalid_reason']}" for row in rows if not row["valid"]]
    return {
        "tool": "andes-loadgen",
        "version": __version__,
        "command": command,
        "config": config,
        "results": rows,
        "capacity_at_qoe_0_9": capacity,
        "valid": not reasons,
        "invalid_reason": "; ".join(reasons),
        "interrupted": interrupted or any(row["interrupted"] for row in rows),
        "lag_p99_limit_ms": 1e3 * LAG_P99_LIMIT_S,
    }


def _finite_or_null(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _finite_or_null(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite_or_null(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write(path: Path, doc: Row) -> None:
    """Strict JSON (non-finite figures as null), written whole then renamed into place."""
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(_finite_or_null(doc), allow_nan=False) + "\n")
    temporary.replace(path)


def read(path: Path) -> Row:
    loaded: Row = json.loads(path.read_text())
    return loaded
