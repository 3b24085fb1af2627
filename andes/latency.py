"""Latency model: how long an engine iteration takes, and what KV memory a worker has.

Every policy and the simulator price their decisions with the same model, so a plan made in
the simulator and a plan made by the scheduler service for a real worker disagree only where
the profile disagrees with the hardware. A profile is a JSON file in ``profiles/`` with its
provenance; workers measure and register their own.

The model is a roofline. One iteration processes ``decode_batch`` decode tokens whose requests
hold ``context_tokens`` KV entries in total, plus ``prefill_tokens`` prompt (or recompute)
tokens. It is bound either by memory traffic (weights once, plus every KV entry read) or by
compute (every processed token costs ``2 * params`` FLOPs; on a CPU, attention over every KV
entry read costs compute too), plus a fixed per-step overhead::

    t = step_overhead_s + max(weights_read_s + kv_read_s_per_token * context_tokens,
                              compute_s_per_token * decode_batch
                              + prefill_s_per_token * prefill_tokens
                              + attention_s_per_token * context_tokens)
"""

from __future__ import annotations

import json
import os
from dataclasses import MISSING, asdict, dataclass, field
from pathlib import Path
from typing import Any, overload

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]

PROFILES_DIR = Path(__file__).resolve().parent.parent / "profiles"


@dataclass(frozen=True)
class LatencyProfile:
    """One accelerator running one model: iteration costs and KV capacity."""

    name: str
    step_overhead_s: float
    """Fixed cost of one iteration (scheduling, kernel launches, sampling)."""
    weights_read_s: float
    """Memory time to stream the weights once: the floor of a decode step."""
    kv_read_s_per_token: float
    """Memory time to read one KV entry (all layers) during attention."""
    compute_s_per_token: float
    """Compute time per processed token (prefill or decode) at achievable FLOP/s."""
    swap_s_per_token: float
    """Time to move one token's KV between accelerator and host memory (one direction)."""
    block_size: int
    """Tokens per KV block."""
    kv_blocks_total: int
    """KV blocks available to requests after weights and activations."""
    max_batch: int
    """Most sequences in one iteration (vLLM's max_num_seqs)."""
    max_batched_tokens: int
    """Most tokens one iteration processes (vLLM's max_num_batched_tokens): caps prefill."""
    prefill_s_per_token: float | None = None
    """Compute time per prefill token when it differs from a decode token's (None: the
    same). On a GPU both are FLOP-bound alike; a CPU engine's decode token also pays per
    sequence work (sampling, metadata), so measured profiles set both."""
    attention_s_per_token: float = 0.0
    """Compute time per KV entry a decode token attends to. A GPU reads KV at memory speed
    (``kv_read_s_per_token``) and leaves it 0; a CPU engine's attention is compute that adds
    to the rest, so a batch of long contexts is slower than a batch of short ones."""
    provenance: dict[str, Any] = field(default_factory=dict, compare=False)
    """Where the numbers come from: hardware and model figures, sources, or measurement."""

    @property
    def prefill_per_token_s(self) -> float:
        """Compute seconds per prefilled (or recomputed) token."""
        if self.prefill_s_per_token is None:
            return self.compute_s_per_token
        return self.prefill_s_per_token

    @property
    def kv_capacity_tokens(self) -> int:
        return self.kv_blocks_total * self.block_size

    @overload
    def iteration_time(
        self, decode_batch: float, context_tokens: float, prefill_tokens: float = 0.0
    ) -> float: ...
    @overload
    def iteration_time(
        self,
        decode_batch: FloatArray,
        context_tokens: FloatArray | float,
        prefill_tokens: FloatArray | float = 0.0,
    ) -> FloatArray: ...
    def iteration_time(
        self,
        decode_batch: float | FloatArray,
        context_tokens: float | FloatArray,
        prefill_tokens: float | FloatArray = 0.0,
    ) -> float | FloatArray:
        """Seconds for one iteration; vectorized over any of its arguments."""
        memory = self.weights_read_s + self.kv_read_s_per_token * np.asarray(context_tokens)
        compute = (
            self.compute_s_per_token * np.asarray(decode_batch)
            + self.prefill_per_token_s * np.asarray(prefill_tokens)
            + self.attention_s_per_token * np.asarray(context_tokens)
        )
        t = self.step_overhead_s + np.maximum(memory, compute)
        if np.ndim(t) == 0:
            return float(t)
        return np.asarray(t, dtype=np.float64)

    @overload
    def token_latency(self, batch: float, mean_context: float) -> float: ...
    @overload
    def token_latency(self, batch: FloatArray, mean_context: float) -> FloatArray: ...
    def token_latency(
        self, batch: float | FloatArray, mean_context: float
    ) -> float | FloatArray:
        """Seconds between two tokens of one request in a steady decode batch of ``batch``."""
        b = np.asarray(batch, dtype=np.float64)
        return self.iteration_time(b, b * mean_context)

    def prefill_time(self, tokens: float) -> float:
        """Seconds to prefill ``tokens`` alone (one or several iterations)."""
        if tokens <= 0:
            return 0.0
        full_chunks, rest = divmod(float(tokens), float(self.max_batched_tokens))
        total = full_chunks * self.iteration_time(0.0, 0.0, float(self.max_batched_tokens))
        if rest > 0:
            total += self.iteration_time(0.0, 0.0, rest)
        return float(total)

    def recompute_time(self, context_tokens: float) -> float:
        """Cost of resuming a recompute-preempted request: re-prefill its whole context."""
        return self.prefill_time(context_tokens)

    def swap_time(self, context_tokens: float) -> float:
        """Cost of swapping one request's KV out (or in)."""
        return self.swap_s_per_token * context_tokens

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        if self.prefill_s_per_token is None:  # optional: profiles without it stay as they are
            del data["prefill_s_per_token"]
        if self.attention_s_per_token == 0.0:
            del data["attention_s_per_token"]
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LatencyProfile:
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown latency profile fields: {sorted(unknown)}")
        missing = {
            name for name, f in cls.__dataclass_fields__.items() if f.default is MISSING
            and f.default_factory is MISSING
        } - set(data)
        if missing:
            raise ValueError(f"latency profile is missing fields: {sorted(missing)}")
        profile = cls(**data)
        profile.validate()
        return profile

    def validate(self) -> None:
        for name in (
            "step_overhead_s",
            "weights_read_s",
            "kv_read_s_per_token",
            "compute_s_per_token",
            "swap_s_per_token",
            "prefill_per_token_s",
            "attention_s_per_token",
        ):
            value = getattr(self, name)
            if not (np.isfinite(value) and value >= 0):
                raise ValueError(f"profile {self.name}: {name} must be finite and >= 0")
        for name in ("block_size", "kv_blocks_total", "max_batch", "max_batched_tokens"):
            if getattr(self, name) <= 0:
                raise ValueError(f"profile {self.name}: {name} must be positive")


def profiles_dir() -> Path:
    return Path(os.environ.get("ANDES_PROFILES_DIR", PROFILES_DIR))


def list_profiles() -> list[str]:
    return sorted(p.stem for p in profiles_dir().glob("*.json"))


def load_profile(name_or_path: str | Path) -> LatencyProfile:
    """Load a profile by name (``a100-opt13b``) or by path to a JSON file."""
    path = Path(name_or_path)
    if path.suffix != ".json":
        path = profiles_dir() / f"{name_or_path}.json"
    if not path.exists():
        raise ValueError(
            f"unknown latency profile {str(name_or_path)!r}; known: {', '.join(list_profiles())}"
        )
    with path.open() as f:
        return LatencyProfile.from_json(json.load(f))
