"""Figures of a sweep: QoE against load, and the spread behind the averages at one load.

Averages hide who is disappointed, so next to the QoE-vs-rate curves the figure shows the QoE
and TTFT distributions at one rate, chosen where the baseline (FCFS) still serves most users
reasonably: the highest rate at which its average QoE is at least 0.5. Past that point every
policy but the QoE-aware ones is saturated and the distributions say little more.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from andes.policies import POLICY_NAMES
from andes.sim.sweep import PER_REQUEST, QOE_THRESHOLD

BASELINE = "fcfs"
BASELINE_FLOOR = 0.5
"""The distribution panels use the highest rate where the baseline's average QoE is >= this."""

TTFT_FLOOR_S = 1e-3
"""TTFTs are drawn on a log axis: clip below a millisecond."""

COLORS = dict(zip(POLICY_NAMES, ("tab:gray", "tab:orange", "tab:green", "tab:blue", "tab:purple"),
                  strict=True))


def distribution_rate(results: list[dict[str, Any]]) -> float:
    """The rate at which the CDF panels are drawn (see the module docstring)."""
    rates: list[float] = [row["rate"] for row in results]
    baseline_ok: list[float] = [
        row["rate"] for row in results
        if row["policy"] == BASELINE and row["avg_qoe"] >= BASELINE_FLOOR
    ]
    return max(baseline_ok) if baseline_ok else max(rates)


def plot_sweep(report: dict[str, Any], path: str | Path) -> None:
    """Write the three-panel PNG of a :func:`andes.sim.sweep.sweep` report to ``path``."""
    results: list[dict[str, Any]] = report["results"]
    policies: list[str] = report["config"]["policies"]
    rate = distribution_rate(results)
    figure = Figure(figsize=(15, 4.5), layout="constrained")
    FigureCanvasAgg(figure)
    qoe_axes, qoe_cdf_axes, ttft_cdf_axes = figure.subplots(1, 3)

    for policy in policies:
        mine = sorted((row for row in results if row["policy"] == policy),
                      key=lambda row: row["rate"])
        style = {"color": COLORS.get(policy), "label": policy}
        qoe_axes.plot([row["rate"] for row in mine], [row["avg_qoe"] for row in mine],
                      marker="o", **style)
        at_rate = next(row for row in mine if row["rate"] == rate)
        per_request = at_rate[PER_REQUEST]
        _cdf(qoe_cdf_axes, per_request["qoe"], **style)
        _cdf(ttft_cdf_axes, np.maximum(per_request["ttft_s"], TTFT_FLOOR_S), **style)

    qoe_axes.axhline(QOE_THRESHOLD, color="black", linestyle="--", linewidth=1)
    qoe_axes.set(title="Average QoE vs load", xlabel="arrival rate (requests/s)",
                 ylabel="average QoE", ylim=(0.0, 1.02))
    qoe_cdf_axes.set(title=f"QoE CDF at {rate:g} requests/s", xlabel="QoE",
                     ylabel="fraction of requests", xlim=(0.0, 1.02))
    ttft_cdf_axes.set(title=f"TTFT CDF at {rate:g} requests/s", xlabel="TTFT (s)",
                      ylabel="fraction of requests", xscale="log")
    for axes in (qoe_axes, qoe_cdf_axes, ttft_cdf_axes):
        axes.grid(alpha=0.3)
        axes.legend()
    config = report["config"]
    figure.suptitle(f"{config['profile']}, {config['workload']}, {config['qoe_mix']} mix, "
                    f"{config['arrival']} arrivals")
    figure.savefig(path, dpi=110)


def _cdf(axes: Axes, values: np.ndarray, **style: Any) -> None:
    ordered = np.sort(values)
    fraction = np.arange(1, ordered.size + 1) / max(ordered.size, 1)
    axes.step(ordered, fraction, where="post", **style)
