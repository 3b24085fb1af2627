"""Side-by-side comparison of result files: a table (text and Markdown) and PNG figures.

Runs are the columns and figures the rows, so two runs of the same workload (two servers, two
policies) read across. Files of ``andes sim`` are accepted too, since their rows use the same
keys: a measured run can be laid beside its simulated prediction. Figures: average QoE vs
rate (when a file holds a sweep), the QoE and TTFT CDFs, and one request's token timeline
against what its user expected.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from andes.qoe import TokenPacer
from loadgen.openloop import FloatArray
from loadgen.results import QOE_THRESHOLD, Row, read

TTFT_FLOOR_S = 1e-3
"""TTFTs are drawn on a log axis: clip below a millisecond."""

TABLE: tuple[tuple[str, str, str], ...] = (
    ("rate (req/s)", "rate", "g"),
    ("requests finished", "requests", "d"),
    ("avg QoE", "avg_qoe", ".3f"),
    ("p10 QoE", "p10_qoe", ".3f"),
    ("p50 QoE", "p50_qoe", ".3f"),
    ("QoE >= 0.9", "qoe_ge_0_9", ".3f"),
    ("QoE >= 0.95", "qoe_ge_0_95", ".3f"),
    ("perfect QoE", "perfect_qoe", ".3f"),
    ("TTFT p50 (s)", "ttft_p50_s", ".3f"),
    ("TTFT p90 (s)", "ttft_p90_s", ".3f"),
    ("TTFT p99 (s)", "ttft_p99_s", ".3f"),
    ("TDS p50 (tok/s)", "tds_p50", ".1f"),
    ("TPOT p50 (ms)", "tpot_p50_s", "ms"),
    ("ITL p50 (ms)", "itl_p50_s", "ms"),
    ("throughput (tok/s)", "throughput_tok_s", ".0f"),
    ("errors", "errors", "errors"),
    ("send lag p99 (ms)", "send_lag", "lag"),
    ("valid", "valid", "bool"),
    ("interrupted", "interrupted", "flag"),
)
"""(row label, result key, format) of the table."""


@dataclass(frozen=True)
class Run:
    """One column: a row of a result file."""

    label: str
    row: Row

    def qoe(self) -> FloatArray:
        return self._per_request("qoe")

    def ttft(self) -> FloatArray:
        return self._per_request("ttft_s")

    def _per_request(self, key: str) -> FloatArray:
        per_request = self.row.get("per_request")
        if isinstance(per_request, dict):  # andes sim --per-request: arrays by key
            values = per_request.get(key, [])
        elif isinstance(per_request, list):
            values = [r[key] for r in per_request if r.get(key) is not None and not r["error"]]
        else:
            values = []
        return np.asarray(values, dtype=np.float64)


def load_runs(paths: list[Path]) -> list[tuple[str, Row, list[Run]]]:
    """(label, document, its runs) per file; labels are file names without ``.json``."""
    loaded = []
    for path in paths:
        doc = read(path)
        rows: list[Row] = doc.get("results", [])
        runs = []
        for row in rows:
            parts = [path.stem]
            if "policy" in row:
                parts.append(str(row["policy"]))
            if len(rows) > 1 or "policy" in row:
                parts.append(f"{row['rate']:g}/s" if row.get("rate") is not None else "trace")
            runs.append(Run(" ".join(parts), row))
        loaded.append((path.stem, doc, runs))
    return loaded


def _cell(value: Any, fmt: str) -> str:
    if fmt == "errors":
        if not isinstance(value, dict) or not value:
            return "0"
        return ", ".join(f"{kind} {count}" for kind, count in sorted(value.items()))
    if fmt == "lag":
        p99 = value.get("p99_ms") if isinstance(value, dict) else None
        return "-" if p99 is None else f"{p99:.2f}"
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if fmt == "bool":
        return "yes" if value else "NO"
    if fmt == "flag":
        return "yes" if value else "no"
    if fmt == "ms":
        return f"{1e3 * value:.1f}"
    return format(value, fmt)


def table_cells(runs: list[Run]) -> list[list[str]]:
    header = ["", *(run.label for run in runs)]
    body = [[label, *(_cell(run.row.get(key), fmt) for run in runs)] for label, key, fmt in TABLE]
    return [header, *body]


def format_text(cells: list[list[str]]) -> str:
    widths = [max(len(line[i]) for line in cells) for i in range(len(cells[0]))]
    return "\n".join(
        "  ".join([line[0].ljust(widths[0])]
                  + [c.rjust(w) for c, w in zip(line[1:], widths[1:], strict=True)])
        for line in cells
    )


def format_markdown(cells: list[list[str]]) -> str:
    lines = ["| " + " | ".join(cells[0]) + " |",
             "|" + "|".join(["---"] + ["---:"] * (len(cells[0]) - 1)) + "|"]
    lines += ["| " + " | ".join(line) + " |" for line in cells[1:]]
    return "\n".join(lines)


def _figure(width: float = 7.0) -> tuple[Figure, Axes]:
    figure = Figure(figsize=(width, 4.5), layout="constrained")
    FigureCanvasAgg(figure)
    return figure, figure.subplots()


def _cdf(axes: Axes, values: FloatArray, label: str) -> None:
    ordered = np.sort(values)
    fraction = np.arange(1, ordered.size + 1) / max(ordered.size, 1)
    axes.step(ordered, fraction, where="post", label=label)


def plot_qoe_vs_rate(files: list[tuple[str, Row, list[Run]]], path: Path) -> None:
    figure, axes = _figure()
    for label, _, runs in files:
        points = sorted((r.row["rate"], r.row["avg_qoe"]) for r in runs
                        if r.row.get("rate") is not None and r.row.get("avg_qoe") is not None)
        if points:
            axes.plot(*zip(*points, strict=True), marker="o", label=label)
    axes.axhline(QOE_THRESHOLD, color="black", linestyle="--", linewidth=1)
    axes.set(title="Average QoE vs load", xlabel="arrival rate (requests/s)",
             ylabel="average QoE", ylim=(0.0, 1.02))
    axes.grid(alpha=0.3)
    axes.legend()
    figure.savefig(path, dpi=110)


def plot_cdfs(runs: list[Run], qoe_path: Path, ttft_path: Path) -> None:
    for path, title, xlabel, values in (
        (qoe_path, "QoE CDF (measured at the client)", "QoE", Run.qoe),
        (ttft_path, "TTFT CDF (measured at the client)", "TTFT (s)", Run.ttft),
    ):
        figure, axes = _figure()
        for run in runs:
            data = values(run)
            if data.size:
                _cdf(axes, np.maximum(data, TTFT_FLOOR_S) if values is Run.ttft else data,
                     run.label)
        axes.set(title=title, xlabel=xlabel, ylabel="fraction of requests")
        if values is Run.ttft:
            axes.set_xscale("log")
        axes.grid(alpha=0.3)
        axes.legend()
        figure.savefig(path, dpi=110)


def representative(runs: list[Run]) -> int | None:
    """The request index to draw: the median-QoE finished request of the first run that has
    timelines (the same index is the same request in every run of one workload and seed)."""
    for run in runs:
        per_request = run.row.get("per_request")
        if isinstance(per_request, list):
            done = [r for r in per_request if r.get("qoe") is not None and r["token_times_s"]]
            if done:
                done.sort(key=lambda r: r["qoe"])
                index: int = done[len(done) // 2]["index"]
                return index
    return None


def plot_timeline(runs: list[Run], index: int, path: Path) -> None:
    """Tokens received and shown (the client pacer) against the expected curve."""
    panels = []
    for run in runs:
        per_request = run.row.get("per_request")
        if isinstance(per_request, list):
            match = [r for r in per_request if r["index"] == index and r["token_times_s"]]
            if match:
                panels.append((run.label, match[0]))
    figure = Figure(figsize=(7.0 * max(len(panels), 1), 4.5), layout="constrained")
    FigureCanvasAgg(figure)
    for axes, (label, request) in zip(np.atleast_1d(figure.subplots(1, max(len(panels), 1))),
                                      panels, strict=False):
        times = np.asarray(request["token_times_s"])
        count = np.arange(1, times.size + 1)
        ttft, tds = request["expected_ttft_s"], request["expected_tds"]
        pacer = TokenPacer(ttft=ttft, tds=tds)
        shown = np.array([pacer.deliver(1, float(t))[0] for t in times])
        expected = ttft + np.arange(times.size) / tds
        axes.step(times, count, where="post", label="received")
        axes.step(shown, count, where="post", label="shown (paced at the expected TDS)")
        axes.plot(expected, count, linestyle="--", color="black", label="expected: ttft + i/tds")
        outcome = (f"QoE {request['qoe']:.3f}" if request.get("qoe") is not None
                   else f"failed: {request.get('error') or 'unknown'}")
        axes.set(title=f"{label}: request {index}, {outcome}",
                 xlabel="seconds since sent", ylabel="tokens")
        axes.grid(alpha=0.3)
        axes.legend()
    figure.savefig(path, dpi=110)


def write_report(paths: list[Path], out: Path) -> str:
    """Write ``report.md`` and the PNGs into ``out``; return the text table."""
    out.mkdir(parents=True, exist_ok=True)
    files = load_runs(paths)
    runs = [run for _, _, file_runs in files for run in file_runs]
    cells = table_cells(runs)
    images = []
    if any(len(file_runs) > 1 for _, _, file_runs in files):
        plot_qoe_vs_rate(files, out / "qoe_vs_rate.png")
        images.append(("Average QoE vs rate", "qoe_vs_rate.png"))
    plot_cdfs(runs, out / "qoe_cdf.png", out / "ttft_cdf.png")
    images += [("QoE CDF", "qoe_cdf.png"), ("TTFT CDF", "ttft_cdf.png")]
    index = representative(runs)
    if index is not None:
        plot_timeline(runs, index, out / "timeline.png")
        images.append((f"Token timeline of request {index}", "timeline.png"))
    lines = ["# Load generator report", "", "Files: " + ", ".join(f"`{p}`" for p in paths), "",
             format_markdown(cells), ""]
    for label, doc, _ in files:
        capacity = doc.get("capacity_at_qoe_0_9")
        if isinstance(capacity, int | float) and len(doc.get("results", [])) > 1:
            lines.append(f"- {label}: capacity at average QoE >= 0.9: {capacity:.2f} requests/s")
        if doc.get("valid") is False:
            lines.append(f"- {label}: INVALID: {doc.get('invalid_reason', '')}")
    lines.append("")
    lines += [f"## {title}\n\n![{title}]({name})\n" for title, name in images]
    (out / "report.md").write_text("\n".join(lines))
    return format_text(cells)
