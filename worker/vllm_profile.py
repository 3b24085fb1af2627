"""The vllm backend measures its own latency profile at start-up.

The planner prices every plan with a :class:`~andes.latency.LatencyProfile`; for a real engine
the honest numbers are the engine's own, on this machine, with this model and these settings.
Start-up runs a few calibration batches through the engine (decode steps at several batch
sizes, one batch of long contexts, prefills of two lengths), fits ``step_overhead_s +
compute_s_per_token * batch + attention_s_per_token * context tokens + prefill_s_per_token *
prompt tokens`` by least squares on relative error, and registers the result with the
scheduler. A CPU engine's attention is compute, so the context term is what makes a batch of
long contexts slower than one of short ones (and what a planner needs to price the long
requests that are left when a burst drains). vLLM V1 has no
swap, so the swap cost is the recompute cost per token.

``python -m worker.vllm_profile --model DIR --out FILE.json`` writes the measured profile with
its measurements (this is how ``profiles/cpu-tiny.json`` is made).
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from andes.latency import LatencyProfile

if TYPE_CHECKING:
    from worker.vllm_backend import VllmBackend

log = logging.getLogger(__name__)

DECODE_BATCHES = (1, 4, 16, 64)
DECODE_STEPS = 12
"""Timed decode steps per batch size (the median is kept)."""
CALIBRATION_PROMPT = 8
"""Prompt tokens of a decode calibration request."""
SHORT_CONTEXT = CALIBRATION_PROMPT + DECODE_STEPS // 2
"""Mean context per request over the timed steps of a decode calibration."""
LONG_CONTEXT_BATCH = 4
"""Requests in the long-context decode calibration, which fill about half of KV."""
LONG_CONTEXT_MIN = 64
"""Below this many prompt tokens per request the long-context calibration is skipped."""


def _calibration_ids(n: int, salt: int) -> list[int]:
    # Distinct prompts (no prefix-cache hits) of ordinary token ids.
    return [3 + (salt * 7919 + i * 104729) % 1500 for i in range(n)]


def _run(backend: VllmBackend, prompts: list[list[int]], max_tokens: int,
         timed_steps: int) -> list[float]:
    """Admit ``prompts`` together, step until done; seconds of the steps after the first."""
    from vllm import SamplingParams

    from worker.engine import PlanSpec

    engine = backend._engine
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    ids = []
    for n, prompt in enumerate(prompts):
        rendered = engine.renderer.render_cmpl([{"prompt_token_ids": prompt}])[0]
        ids.append(engine.add_request(f"calibration-{time.monotonic_ns()}-{n}", rendered, params))
    backend.scheduler.apply_plan(PlanSpec(version=0, admit=tuple(ids)))
    times = []
    while engine.has_unfinished_requests():
        start = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - start)
        if len(times) > timed_steps + max_tokens + 8:
            break
    engine.abort_request(ids, internal=True)
    return times


def measure_step_times(backend: VllmBackend) -> dict[str, Any]:
    """Median decode step time per batch size and prefill step time per prompt length."""
    decode: dict[int, float] = {}
    kv_blocks = backend.kv_blocks_total
    per_request_blocks = -(-(CALIBRATION_PROMPT + DECODE_STEPS + 2) // backend.block_size)
    for batch in DECODE_BATCHES:
        if batch > backend.max_num_seqs or batch * per_request_blocks > kv_blocks:
            continue
        prompts = [_calibration_ids(CALIBRATION_PROMPT, batch * 1000 + i) for i in range(batch)]
        times = _run(backend, prompts, DECODE_STEPS + 1, DECODE_STEPS)
        # Step 0 prefills the prompts; the rest are pure decode steps of the whole batch.
        decode[batch] = statistics.median(times[1:])
    decode_long = _measure_long_context(backend)
    prefill: dict[int, float] = {}
    longest = min(backend.config.max_num_batched_tokens, backend.config.max_model_len - 4,
                  (kv_blocks - 1) * backend.block_size)
    for length in sorted({max(16, longest // 4), longest}):
        samples = [
            _run(backend, [_calibration_ids(length, 97 + length + r)], 1, 0)[0]
            for r in range(3)
        ]
        prefill[length] = statistics.median(samples)
    return {"decode_step_s_by_batch": decode, "prefill_step_s_by_tokens": prefill,
            "decode_step_s_by_context": decode_long}


def _measure_long_context(backend: VllmBackend) -> dict[str, Any]:
    """Median decode step of ``LONG_CONTEXT_BATCH`` requests whose contexts fill about half
    of KV (empty when KV or the model length is too small for that)."""
    batch = min(LONG_CONTEXT_BATCH, backend.max_num_seqs)
    half_kv = backend.kv_blocks_total * backend.block_size // 2
    length = min(half_kv // batch, backend.config.max_model_len // 2) - DECODE_STEPS - 2
    if length < LONG_CONTEXT_MIN:
        return {}
    prompts = [_calibration_ids(length, 50_000 + i) for i in range(batch)]
    times = _run(backend, prompts, DECODE_STEPS + 1, DECODE_STEPS)
    # The prompts' prefill may take several chunked steps; the last half are pure decode.
    return {"batch": batch, "context_tokens": batch * (length + DECODE_STEPS),
            "step_s": statistics.median(times[-(DECODE_STEPS // 2):])}


def calibration_steps(measured: dict[str, Any]) -> list[tuple[float, float, float, float]]:
    """(decode batch, context tokens, prefill tokens, seconds) of each measured calibration
    step: what the fit explains and what a profile's predictions are checked against."""
    steps = [(float(b), float(b) * SHORT_CONTEXT, 0.0, t)
             for b, t in measured["decode_step_s_by_batch"].items()]
    if long := measured.get("decode_step_s_by_context"):
        steps.append((float(long["batch"]), float(long["context_tokens"]), 0.0, long["step_s"]))
    return steps + [(0.0, 0.0, float(n), t)
                    for n, t in measured["prefill_step_s_by_tokens"].items()]


def fit_profile(backend: VllmBackend, measured: dict[str, Any], name: str) -> LatencyProfile:
    """``t = overhead + decode_cost * batch + attention_cost * context + prefill_cost *
    tokens``, least squares on relative error (decode and prefill tokens cost differently on
    a CPU). Without a long-context measurement the attention cost is 0."""
    rows = [(1.0, *step) for step in calibration_steps(measured)]
    long = measured.get("decode_step_s_by_context")
    table = np.array(rows)
    seconds = table[:, 4]
    columns = [0, 1, 2, 3] if long else [0, 1, 3]
    design = table[:, columns] / seconds[:, None]
    solution, *_ = np.linalg.lstsq(design, np.ones_like(seconds), rcond=None)
    fitted = dict(zip(columns, (float(x) for x in solution), strict=True))
    decode, prefill = max(fitted[1], 1e-9), max(fitted[3], 1e-9)
    attention = max(fitted.get(2, 0.0), 0.0)
    return LatencyProfile(
        name=name,
        step_overhead_s=max(fitted[0], 0.0),
        weights_read_s=0.0,
        kv_read_s_per_token=0.0,
        compute_s_per_token=decode,
        swap_s_per_token=prefill,  # no swap in vLLM V1: moving KV back is a recompute
        block_size=backend.block_size,
        kv_blocks_total=backend.kv_blocks_total,
        max_batch=backend.max_num_seqs,
        max_batched_tokens=backend.config.max_num_batched_tokens,
        prefill_s_per_token=prefill,
        attention_s_per_token=attention,
    )


def profile_name(backend: VllmBackend) -> str:
    return f"vllm-{platform.machine()}-{backend.model}"


def measure_profile(backend: VllmBackend) -> LatencyProfile:
    started = time.monotonic()
    measured = measure_step_times(backend)
    profile = fit_profile(backend, measured, profile_name(backend))
    log.info("measured latency profile in %.1f s: overhead %.2f ms, %.1f us/token",
             time.monotonic() - started, profile.step_overhead_s * 1e3,
             profile.compute_s_per_token * 1e6)
    return profile


def default_profile(backend: VllmBackend) -> LatencyProfile:
    """A flat guess (5 ms per step, 50 us per token) when measuring is turned off."""
    return LatencyProfile(
        name=profile_name(backend), step_overhead_s=0.005, weights_read_s=0.0,
        kv_read_s_per_token=0.0, compute_s_per_token=5e-5, swap_s_per_token=5e-5,
        block_size=backend.block_size, kv_blocks_total=backend.kv_blocks_total,
        max_batch=backend.max_num_seqs,
        max_batched_tokens=backend.config.max_num_batched_tokens,
    )


def main(argv: list[str] | None = None) -> int:
    from worker.vllm_backend import VllmBackend, VllmConfig

    parser = argparse.ArgumentParser(prog="python -m worker.vllm_profile", description=__doc__)
    parser.add_argument("--model", required=True, help="model directory")
    parser.add_argument("--out", required=True, help="profile JSON to write")
    parser.add_argument("--name", default="", help="profile name (default: the file's stem)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument("--max-num-batched-tokens", type=int, default=512)
    parser.add_argument("--max-model-len", type=int, default=1024)
    parser.add_argument("--kv-blocks", type=int, default=None)
    parser.add_argument("--block-size", type=int, default=None)
    parser.add_argument("--kv-cache-space-gib", type=float, default=1.0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    config = VllmConfig(
        model=args.model, dtype=args.dtype, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=args.max_model_len,
        num_gpu_blocks=args.kv_blocks, block_size=args.block_size,
        kv_cache_space_gib=args.kv_cache_space_gib,
        measure_profile=False,
    )
    backend = VllmBackend(config)
    measured = measure_step_times(backend)
    out = Path(args.out)
    profile = fit_profile(backend, measured, args.name or out.stem)
    predicted: dict[str, Any] = {
        "decode": {b: profile.iteration_time(float(b), float(b) * SHORT_CONTEXT)
                   for b in measured["decode_step_s_by_batch"]},
        "prefill": {n: profile.iteration_time(0.0, 0.0, float(n))
                    for n in measured["prefill_step_s_by_tokens"]},
    }
    if long := measured["decode_step_s_by_context"]:
        predicted["decode_long_context"] = profile.iteration_time(
            float(long["batch"]), float(long["context_tokens"]))
    errors = [abs(profile.iteration_time(batch, context, prefill) / seconds - 1)
              for batch, context, prefill, seconds in calibration_steps(measured)]
    import vllm

    document = {
        **asdict(profile),
        "provenance": {
            "kind": "measured",
            "command": "python -m worker.vllm_profile " + " ".join(sys.argv[1:] if argv is None
                                                                  else argv),
            "engine": f"vLLM {vllm.__version__}, in-process, eager, PlanScheduler",
            "machine": {"platform": platform.platform(), "processor": platform.processor(),
                        "cpus": _cpu_count()},
            "config": {k: v for k, v in asdict(config).items() if k != "model"},
            "model": backend.model,
            "measurements": measured,
            "fit": {
                "method": "t = step_overhead_s + compute_s_per_token * decode batch + "
                          "attention_s_per_token * context tokens + prefill_s_per_token * "
                          "prefill tokens, least squares on relative error",
                "predicted": predicted,
                "max_relative_error": round(max(errors), 3),
            },
        },
    }
    out.write_text(json.dumps(document, indent=2) + "\n")
    print(json.dumps({"profile": str(out), "max_relative_error": round(max(errors), 3)}))
    return 0


def _cpu_count() -> int:
    import os

    return len(os.sched_getaffinity(0))


if __name__ == "__main__":
    sys.exit(main())
