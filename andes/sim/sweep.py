"""Simulated load sweeps: every policy at every arrival rate, on the same requests.

A point is named by strings and numbers only (:class:`RunConfig`, a policy name, a rate), so it
can be shipped to a worker process and rebuilt there; every point draws its workload from the
same seed, so the i-th request has the same lengths and QoE targets at every rate and under
every policy. Result rows hold only figures the seed determines (no wall-clock timings): a
rerun reproduces them exactly, whatever the number of processes.
"""

from __future__ import annotations

import math
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from andes.latency import load_profile
from andes.metrics import capacity_at
from andes.policies import make_policy
from andes.sim.simulator import SimConfig, simulate
from andes.workload import Workload, make_workload

QOE_THRESHOLD = 0.9
"""Capacity is the highest rate at which the average QoE stays at or above this."""

TIMING_FIELDS = ("planner_ms_per_plan", "wall_seconds")
"""Summary figures that depend on the machine, left out of result rows."""

PER_REQUEST = "per_request"
"""Row key of the per-request arrays, kept for plots and written only on request."""

Row = dict[str, Any]


@dataclass(frozen=True)
class RunConfig:
    """Everything but the policy and the rate that a simulated run is made of."""

    profile: str
    workload: str
    qoe_mix: str
    arrival: str
    duration_s: float | None = None
    num_requests: int | None = None
    workers: int = 1
    seed: int = 0

    def make_workload(self, rate: float) -> Workload:
        return make_workload(
            self.workload,
            self.qoe_mix,
            self.arrival,
            rate,
            duration_s=self.duration_s,
            num_requests=self.num_requests,
            seed=self.seed,
        )

    def check(self, policies: list[str], rates: list[float]) -> None:
        """Raise ValueError for anything that would make a point fail, before any runs."""
        load_profile(self.profile)
        for policy in policies:
            make_policy(policy)
        if not rates:
            raise ValueError("give at least one rate")
        if self.workers < 1:
            raise ValueError(f"need at least one worker, got {self.workers}")
        lowest = min(rates)
        if len(self.make_workload(lowest)) == 0:
            raise ValueError(
                f"no request arrives within {self.duration_s:g} s at {lowest:g} requests/s; "
                "raise the duration"
            )


def run_point(config: RunConfig, policy: str, rate: float) -> Row:
    """Simulate ``policy`` at ``rate``: the summary row, with per-request QoE and TTFT."""
    result = simulate(
        config.make_workload(rate),
        make_policy(policy),
        SimConfig(profile=load_profile(config.profile), num_workers=config.workers),
    )
    summary = result.summary()
    row: Row = {"policy": policy, "rate": rate}
    row.update((k, v) for k, v in summary.items() if k != "policy" and k not in TIMING_FIELDS)
    outcomes = result.outcomes
    row[PER_REQUEST] = {
        "qoe": outcomes.qoe,
        "ttft_s": outcomes.first_token_s - outcomes.arrival_s,
    }
    return row


def sweep(config: RunConfig, policies: list[str], rates: list[float], jobs: int = 1) -> Row:
    """Every (policy, rate) point, policy-major in the given order, and each policy's capacity.

    With ``jobs`` > 1 the points run in that many processes; the order of results does not
    depend on which finishes first.
    """
    points = [(policy, rate) for policy in policies for rate in rates]
    if jobs <= 1 or len(points) == 1:
        rows = [run_point(config, policy, rate) for policy, rate in points]
    else:
        with ProcessPoolExecutor(max_workers=min(jobs, len(points))) as pool:
            rows = list(
                pool.map(
                    run_point,
                    [config] * len(points),
                    [policy for policy, _ in points],
                    [rate for _, rate in points],
                )
            )
    capacity = {}
    for policy in policies:
        mine = [row for row in rows if row["policy"] == policy]
        capacity[policy] = capacity_at(
            [row["rate"] for row in mine], [row["avg_qoe"] for row in mine], QOE_THRESHOLD
        )
    return {
        "config": {**asdict(config), "policies": policies, "rates": rates},
        "results": rows,
        "capacity_at_qoe_0_9": capacity,
    }


def json_document(report: Row, *, per_request: bool = False) -> Row:
    """``report`` as strict JSON values: arrays as lists (or dropped), non-finite as null."""
    results = []
    for row in report["results"]:
        kept = {k: v for k, v in row.items() if k != PER_REQUEST}
        if per_request:
            kept[PER_REQUEST] = {k: v.tolist() for k, v in row[PER_REQUEST].items()}
        results.append(kept)
    document: Row = _finite_or_null({**report, "results": results})
    return document


def _finite_or_null(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _finite_or_null(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite_or_null(v) for v in value]
    if isinstance(value, float | np.floating) and not math.isfinite(value):
        return None
    return value


Column = tuple[str, str, str]
"""Header, row key and format of one table column."""

SWEEP_COLUMNS: tuple[Column, ...] = (
    ("policy", "policy", "s"),
    ("rate", "rate", "g"),
    ("requests", "requests", "d"),
    ("avg_qoe", "avg_qoe", ".3f"),
    ("p10_qoe", "p10_qoe", ".3f"),
    ("qoe>=0.9", "qoe_ge_0_9", ".3f"),
    ("ttft_p90_s", "ttft_p90_s", ".2f"),
    ("throughput_tok_s", "throughput_tok_s", ".0f"),
    ("preemptions/req", "preemptions_per_request", ".3f"),
)


def format_table(rows: list[Row], columns: tuple[Column, ...] = SWEEP_COLUMNS) -> str:
    """Rows as an aligned plain-text table, one line per row under a header."""
    cells = [[header for header, _, _ in columns]]
    for row in rows:
        cells.append([_cell(row.get(key), fmt) for _, key, fmt in columns])
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    # Names to the left, figures to the right.
    return "\n".join(
        "  ".join(
            [line[0].ljust(widths[0])]
            + [cell.rjust(width) for cell, width in zip(line[1:], widths[1:], strict=True)]
        )
        for line in cells
    )


def _cell(value: Any, fmt: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return format(value, fmt)
