"""The ``vllm`` backend: a real vLLM V1 engine, in-process, executing the scheduler's plans.

One ``LLMEngine`` per worker process with the engine core in this process
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``), so its scheduler - :class:`PlanScheduler` - is an
object this backend can hand plans to between steps. Async scheduling is off so that the plan
for step N meets a state in which step N-1 has fully settled. vLLM objects are not
thread-safe: the loop calls every method from its one engine thread (``blocking``).

Tokenization happens here (vLLM's renderer) and so does detokenization, never splitting a
multi-byte character: for a byte-level BPE tokenizer by a table of each token's bytes
(:mod:`worker.byte_text`), else, and for responses with stop strings (which it matches), by
vLLM's incremental detokenizer. A step runs the engine core and decodes each request's new
tokens itself (:meth:`VllmBackend._decode`), not through vLLM's output processor, which also
builds a ``RequestOutput`` per request and step for callers this backend does not have: with
the tiny model on the CPU that cost about 0.8 ms of a 10 ms step. Start-up measures the
engine's own latency profile (:mod:`worker.vllm_profile`) and the scheduler plans this worker
with it.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from andes.latency import LatencyProfile
from andes.policies.base import State
from andes.v1 import generation_pb2
from worker.byte_text import ResponseText, byte_table
from worker.engine import Finished, PlanSpec, Progress, RequestSpec, StepOutcome, TokenRun

log = logging.getLogger(__name__)

FINISH_REASONS = {  # vLLM's FinishReason values (an IntEnum): STOP, LENGTH, ABORT
    0: generation_pb2.FINISH_REASON_STOP,
    1: generation_pb2.FINISH_REASON_LENGTH,
    2: generation_pb2.FINISH_REASON_CANCELLED,
}
"""Any other (ERROR, REPETITION) ends the request with an error."""
STOP = 0
"""vLLM's ``FinishReason.STOP`` (vLLM is imported only once its environment is set)."""


@dataclass(frozen=True)
class VllmConfig:
    """How to build the engine; every field maps to one vLLM setting."""

    model: str
    """A model directory (HF format); nothing is downloaded."""
    dtype: str = "auto"
    max_model_len: int = 2048
    max_num_seqs: int = 64
    """Most sequences per iteration (the profile's ``max_batch``)."""
    max_num_batched_tokens: int = 2048
    """Token budget of one iteration (prefill chunks plus decodes)."""
    num_gpu_blocks: int | None = None
    """Cap on KV blocks (vLLM's ``num_gpu_blocks_override``; honoured on CPU too)."""
    block_size: int | None = None
    """KV block size in tokens (vLLM's default: 16 on GPU, 128 on CPU)."""
    kv_cache_space_gib: float = 1.0
    """CPU only: memory reserved for KV (``VLLM_CPU_KVCACHE_SPACE``)."""
    kv_cache_memory_bytes: int | None = None
    """GPU: memory reserved for KV (vLLM's ``kv_cache_memory_bytes``)."""
    enforce_eager: bool = True
    seed: int = 0
    measure_profile: bool = True
    """Measure step times at start-up (else a flat default profile is registered)."""


def prepare_environment(config: VllmConfig) -> None:
    """Settings vLLM reads from the environment, before it is imported.

    ``OMP_NUM_THREADS`` defaults to all cores but one: the worker's own I/O, and on a small
    machine the gateway and Redis, need a core, and an OpenMP team that shares its cores with
    them waits at every barrier for its slowest thread (on 2 cores, 2 threads made the
    engine's steps 2-3x slower under load than 1 thread; docs/results.md)."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, len(os.sched_getaffinity(0)) - 1)))
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", f"{config.kv_cache_space_gib:g}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    os.environ.setdefault("DO_NOT_TRACK", "1")


class VllmBackend:
    """The worker's :class:`~worker.engine.Engine` over an in-process vLLM engine."""

    backend = "vllm"
    blocking = True
    needs_payload = True

    def __init__(self, config: VllmConfig) -> None:
        if not Path(config.model, "config.json").is_file():
            raise ValueError(f"--model {config.model!r} is not a model directory (no config.json)")
        prepare_environment(config)
        from vllm import EngineArgs, LLMEngine

        from worker.vllm_scheduler import PlanScheduler

        self.config = config
        self.model = Path(config.model).name
        engine_args: dict[str, Any] = {
            "model": config.model,
            "dtype": config.dtype,
            "max_model_len": config.max_model_len,
            "max_num_seqs": config.max_num_seqs,
            "max_num_batched_tokens": config.max_num_batched_tokens,
            "enforce_eager": config.enforce_eager,
            "seed": config.seed,
            "scheduler_cls": PlanScheduler,
            "async_scheduling": False,
            "enable_prefix_caching": True,
            # vLLM's own throughput statistics (built every step, logged every few seconds):
            # the worker reports its own metrics, and vLLM's offline `LLM` turns them off too.
            "disable_log_stats": True,
        }
        if config.num_gpu_blocks is not None:
            engine_args["num_gpu_blocks_override"] = config.num_gpu_blocks + 1  # + null block
        if config.block_size is not None:
            engine_args["block_size"] = config.block_size
        if config.kv_cache_memory_bytes is not None:
            engine_args["kv_cache_memory_bytes"] = config.kv_cache_memory_bytes
        started = time.monotonic()
        self._engine = LLMEngine.from_engine_args(EngineArgs(**engine_args))
        self.scheduler: PlanScheduler = self._engine.engine_core.engine_core.scheduler
        log.info("vLLM engine ready in %.1f s: %d KV blocks of %d tokens",
                 time.monotonic() - started, self.kv_blocks_total, self.block_size)
        self._internal: dict[str, str] = {}
        """Wire request id -> vLLM's internal id (vLLM appends a random suffix)."""
        self._external: dict[str, str] = {}
        """The inverse of ``_internal``."""
        self._emitted: dict[str, int] = {}
        """Wire request id -> index of its next token in the response."""
        self._resumed: dict[str, ResumedText] = {}
        """Requests moved here from another worker: their text is decoded here."""
        self._byte_table = self._tokenizer_byte_table()
        """Each token's bytes, where the tokenizer is byte-level (else None)."""
        self._texts: dict[str, ResponseText] = {}
        """vLLM's internal id -> the text of a response decoded from ``_byte_table`` (one
        without stop strings, not moved here)."""
        self._stalled = False
        """Runnable requests exist but the last step computed nothing: wait for a change."""
        self._waiting_entries: dict[State, dict[str, Progress]] = {
            state: {} for state in (State.QUEUED, State.WAITING, State.PREEMPTED)}
        """Per state without KV, vLLM's internal id -> the request's progress as last listed
        in it: kept until the request makes tokens (then dropped here)."""
        self._with_kv_listed: set[str] = set()
        """The requests with KV at the last ``progress_changes``."""
        from worker.vllm_profile import default_profile, measure_profile

        self.profile: LatencyProfile = (
            measure_profile(self) if config.measure_profile else default_profile(self)
        )

    # -- facts about the engine ----------------------------------------------------------

    @property
    def block_size(self) -> int:
        return int(self.scheduler.block_size)

    @property
    def kv_blocks_total(self) -> int:
        return self.scheduler.kv_blocks_total

    @property
    def kv_blocks_free(self) -> int:
        return self.scheduler.kv_blocks_free

    @property
    def max_num_seqs(self) -> int:
        return self.config.max_num_seqs

    def _tokenizer_byte_table(self) -> tuple[bytes, ...] | None:
        from vllm.v1.engine.detokenizer import uses_fast_detokenizer

        tokenizer = self._engine.get_tokenizer()
        if not uses_fast_detokenizer(tokenizer):
            return None
        table = byte_table(tokenizer._tokenizer, self._engine.model_config.get_vocab_size())
        log.info("responses without stop strings are decoded %s",
                 "by vLLM" if table is None else "from the byte-level vocabulary's bytes")
        return table

    def tokenize(self, text: str) -> list[int]:
        tokenizer = self._engine.get_tokenizer()
        return list(tokenizer.encode(text, add_special_tokens=True))

    # -- the engine interface ------------------------------------------------------------

    def holds(self, request_id: str) -> bool:
        return request_id in self._internal

    def add(self, specs: Sequence[RequestSpec]) -> list[Finished]:
        return [refused for spec in specs
                if spec.request_id not in self._internal and (refused := self._add(spec))]

    def _add(self, spec: RequestSpec) -> Finished | None:
        """Hand one request to vLLM; what it refuses, as finished with ERROR."""
        done = spec.resume_from_tokens
        left = spec.max_tokens - done
        try:
            prompt_ids = self._prompt_ids(spec)
            params = sampling_params(spec.payload or {}, left)
            # Decoded here from the bytes of its tokens, unless vLLM has to match stop strings.
            table = None if params.stop else self._byte_table
            if table is not None:
                params.detokenize = False
            prompt = self._engine.renderer.render_cmpl([{"prompt_token_ids": prompt_ids}])[0]
            internal = self._engine.add_request(
                spec.request_id, prompt, params, arrival_time=spec.arrival_unix_s
            )
        except Exception as err:
            # Too long for the model, bad sampling values, a malformed payload: whatever the
            # engine refuses, the request fails alone, with the reason in the worker's log.
            log.warning("request %s refused by the engine: %s", spec.request_id, err)
            return Finished(spec.request_id, generation_pb2.FINISH_REASON_ERROR, done)
        self._internal[spec.request_id] = internal
        self._external[internal] = spec.request_id
        self._emitted[spec.request_id] = done
        if done:
            self._resumed[spec.request_id] = ResumedText(
                self._engine.get_tokenizer(), spec.generated_token_ids, spec.generated_text
            )
        elif table is not None:
            self._texts[internal] = ResponseText(table)
        self._stalled = False
        return None

    def _prompt_ids(self, spec: RequestSpec) -> list[int]:
        payload = spec.payload or {}
        if raw_ids := payload.get(b"prompt_token_ids"):
            prompt = [int(t) for t in json.loads(raw_ids)]
        else:
            prompt = self.tokenize(payload.get(b"prompt", b"").decode())
        # Resumed from another worker: recompute the prompt plus what it already generated.
        return prompt + list(spec.generated_token_ids)

    def apply(self, plan: PlanSpec) -> None:
        def internal(ids: Iterable[str]) -> tuple[str, ...]:
            return tuple(self._internal[r] for r in ids if r in self._internal)

        self.scheduler.apply_plan(replace(
            plan, preempt=internal(plan.preempt), pause=internal(plan.pause),
            resume=internal(plan.resume), admit=internal(plan.admit),
        ))
        self._stalled = False

    def has_work(self) -> bool:
        return not self._stalled and self.scheduler.has_runnable()

    def step(self, now_s: float) -> StepOutcome:
        start = time.time()
        core_outputs = self._engine.engine_core.get_output().outputs
        outcome = StepOutcome(start_s=start, duration_s=0.0)
        self._decode(core_outputs, outcome)
        outcome.duration_s = time.time() - start
        record = self.scheduler.last_step
        self._stalled = not record.scheduled_tokens
        external = self._external
        outcome.scheduled_tokens = sum(record.scheduled_tokens.values())
        outcome.forced_preemptions = [external[r] for r in record.forced_preemptions
                                      if r in external]
        # A request that finished is not held any more (its end is in ``finished``): the
        # held ones changed only where the step moved some between queues.
        outcome.held_changed = record.moved
        return outcome

    def _decode(self, core_outputs: list[Any], outcome: StepOutcome) -> None:
        """The core's new tokens as the outcome's token runs and finishes: what vLLM's
        ``OutputProcessor.process_outputs`` does for a streamed request with neither
        logprobs nor statistics (detokenize, match stop strings, drop tokens after a stop
        string, abort a request its stop string ended), without building its outputs. It
        uses the output processor's request states as vLLM 0.32 keeps them
        (``worker.vllm_scheduler`` refuses other versions; the stop-string and text tests pin
        the behaviour). A response decoded here (``_texts``) leaves out the text of a token
        that stopped it (an end-of-sequence token), as vLLM's detokenizer does."""
        processor = self._engine.output_processor
        states = processor.request_states
        external = self._external
        texts = self._texts
        stopped: list[str] = []
        for output in core_outputs:
            internal = output.request_id
            state = states.get(internal)
            rid = external.get(internal)
            if state is None or rid is None:
                continue  # aborted meanwhile
            token_ids = output.new_token_ids
            reason = output.finish_reason
            response_text = texts.get(internal)
            detokenizer = state.detokenizer
            if response_text is None:
                tokens_before = detokenizer.num_output_tokens()
                if detokenizer.update(token_ids, reason == STOP) is not None:
                    reason = STOP
                    del token_ids[detokenizer.num_output_tokens() - tokens_before:]
            if token_ids:
                self._drop_waiting_entries(internal)
                index = self._emitted[rid]
                self._emitted[rid] = index + len(token_ids)
                final = reason is not None
                resumed = self._resumed.get(rid)
                if resumed is not None:
                    text = resumed.extend(token_ids, final=final)
                elif response_text is not None:
                    text = response_text.extend(
                        token_ids[:-1] if reason == STOP else token_ids, final=final)
                else:
                    text = detokenizer.get_next_output_text(final, True)
                outcome.tokens.append(TokenRun(rid, index, tuple(token_ids), text))
            if reason is not None:
                processor._finish_request(state)
                if not output.finished:
                    stopped.append(internal)
                outcome.finished.append(Finished(
                    rid, FINISH_REASONS.get(int(reason), generation_pb2.FINISH_REASON_ERROR),
                    self._forget(rid)))
        if stopped:
            self._engine.engine_core.abort_requests(stopped)

    def _forget(self, request_id: str) -> int:
        internal = self._internal.pop(request_id)
        del self._external[internal]
        self._texts.pop(internal, None)
        self._drop_waiting_entries(internal)
        self._resumed.pop(request_id, None)
        return self._emitted.pop(request_id)

    def cancel(self, request_ids: tuple[str, ...]) -> list[Finished]:
        held = [r for r in dict.fromkeys(request_ids) if r in self._internal]
        if not held:
            return []
        # Frees the KV blocks now: the scheduler's finish_requests runs inside the call.
        self._engine.abort_request(held)
        self._stalled = False
        return [
            Finished(rid, generation_pb2.FINISH_REASON_CANCELLED, self._forget(rid))
            for rid in held
        ]

    def progress(self) -> list[Progress]:
        # By queue rather than asking each request where it is: with a thousand held this
        # listing costs a few percent of a small model's step.
        sched = self.scheduler
        with_kv = self._with_kv()
        # A listing of all supersedes the changes noted so far (``progress_changes``).
        sched.take_moved()
        self._with_kv_listed = {p.request_id for p in with_kv}
        return [
            *with_kv,
            *self._listed_waiting(sched.waiting, State.QUEUED),
            *self._listed_waiting(sched.kv_holding_waiting, State.QUEUED),
            *self._listed_waiting(sched.held.values(), State.WAITING),
            *self._listed_waiting(sched.parked.values(), State.PREEMPTED),
        ]

    def progress_changes(self) -> tuple[list[Progress], list[Progress], int]:
        """The held requests that hold KV (running, paused), listed afresh; those without KV
        that may have joined, left or changed queue since the last call (the scheduler
        notes them, and a request that held KV then and holds none now is one); and how many
        are held without KV. An engine process sends its worker only what changed after
        most steps: this lists the batch and the few requests that moved, where listing
        every held request took 0.5 ms of a 9 ms step with a thousand queued (tiny model)."""
        sched = self.scheduler
        with_kv = self._with_kv()
        moved = sched.take_moved()
        listed = {p.request_id for p in with_kv}
        internal = self._internal
        moved.update(internal[rid] for rid in self._with_kv_listed - listed if rid in internal)
        self._with_kv_listed = listed
        without_kv = [entry for request_id in moved
                      if (entry := self._without_kv_entry(request_id)) is not None]
        return with_kv, without_kv, sched.without_kv_count()

    def _with_kv(self) -> list[Progress]:
        sched = self.scheduler
        external = self._external
        return [
            Progress(rid, self._emitted[rid], state, sched.kv_blocks_of(request.request_id))
            for requests, state in ((sched.running, State.RUNNING),
                                    (sched.paused.values(), State.PAUSED))
            for request in requests
            if (rid := external.get(request.request_id)) is not None
        ]

    def _without_kv_entry(self, request_id: str) -> Progress | None:
        """A held request's entry where it holds no KV (None: it holds some, or is gone)."""
        state = self.scheduler.without_kv_state(request_id)
        return None if state is None else self._waiting_entry(request_id, state)

    def _listed_waiting(self, requests: Iterable[Any], state: State) -> list[Progress]:
        """The progress of requests that hold no KV in ``state``. With a thousand of them
        (queued for a batch slot, or held back by the planner) building their entries after
        every step cost a tenth of a small model's step; an entry depends only on the
        request's tokens so far, which do not change while it waits, so it is kept until the
        request makes tokens."""
        return [entry for request in requests
                if (entry := self._waiting_entry(request.request_id, state)) is not None]

    def _waiting_entry(self, request_id: str, state: State) -> Progress | None:
        """The kept entry of a request without KV in ``state`` (None: not one of ours)."""
        kept = self._waiting_entries[state]
        entry = kept.get(request_id)
        if entry is None:
            rid = self._external.get(request_id)
            if rid is None:
                return None
            entry = kept[request_id] = Progress(rid, self._emitted[rid], state, 0)
        return entry

    def _drop_waiting_entries(self, internal: str) -> None:
        for kept in self._waiting_entries.values():
            kept.pop(internal, None)


class ResumedText:
    """The text of a request resumed from another worker's published tokens.

    vLLM decodes a request's output incrementally with the prompt as context; a resumed
    request's prompt is the original prompt plus the tokens already generated, which its
    detokenizer may fold into the first output's text (it does when the published tokens end
    inside a multi-byte character). So resumed requests are decoded here: the whole response
    so far, of which the new part is what the client has not received. A trailing U+FFFD (an
    incomplete character) is held back until the next token completes it or the response ends.
    Decoding the whole response per step costs O(length), paid only by moved requests.
    """

    def __init__(self, tokenizer: Any, token_ids: Iterable[int], text: str) -> None:
        self._tokenizer = tokenizer
        self._token_ids = list(token_ids)
        self._text = text
        """What the client has received."""

    def extend(self, token_ids: Iterable[int], *, final: bool) -> str:
        """The text the new tokens add to the response."""
        self._token_ids.extend(token_ids)
        decoded: str = self._tokenizer.decode(self._token_ids, skip_special_tokens=True)
        if decoded.endswith("\ufffd") and not final:
            return ""
        new = decoded[len(self._text):]
        self._text = decoded
        return new


def sampling_params(payload: Mapping[bytes, bytes], max_tokens: int) -> Any:
    """vLLM ``SamplingParams`` from the payload's ``sampling`` JSON (see gateway.payload)."""
    from vllm import SamplingParams

    sampling: dict[str, Any] = json.loads(payload.get(b"sampling", b"{}") or b"{}")
    options: dict[str, Any] = {
        "max_tokens": max_tokens,
        "stop": list(sampling.get("stop") or []),
        "ignore_eos": bool(sampling.get("ignore_eos", False)),
    }
    for name in ("temperature", "top_p", "seed"):
        if sampling.get(name) is not None:
            options[name] = sampling[name]
    if sampling.get("top_k"):
        options["top_k"] = int(sampling["top_k"])
    return SamplingParams(**options)
