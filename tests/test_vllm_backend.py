"""The vllm backend on a real vLLM engine (CPU build, the tiny random Llama), in-process.

One engine serves the whole run (``vllm_backend`` in conftest; vLLM takes seconds to start)
with a KV budget small enough for memory to run out when a test wants it to. Every test leaves
the engine empty. Greedy decoding makes outputs comparable token for token.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from andes.policies.base import State
from andes.v1 import generation_pb2
from tests.conftest import VLLM_BLOCK_SIZE as BLOCK_SIZE
from tests.conftest import VLLM_KV_BLOCKS as KV_BLOCKS
from tests.vllm_support import PROMPTS, Run, fresh_progress, greedy, plan, spec
from worker.engine import Progress, RequestSpec


@pytest.fixture
def backend(vllm_backend: object) -> Iterator[object]:
    yield vllm_backend
    assert not vllm_backend.progress(), "a test left requests in the engine"  # type: ignore


def test_new_requests_wait_for_a_plan_then_run(backend: object) -> None:
    run = Run(backend)
    first = spec(PROMPTS[0], 8)
    backend.add([first])  # type: ignore[attr-defined]
    assert run.states() == {first.request_id: State.WAITING}
    assert not backend.has_work()  # type: ignore[attr-defined]
    backend.apply(plan(admit=(first.request_id,)))  # type: ignore[attr-defined]
    run.until_idle()
    assert len(run.tokens[first.request_id]) == 8
    assert run.finished == {first.request_id: generation_pb2.FINISH_REASON_LENGTH}


def test_preemptions_and_resumes_leave_greedy_outputs_unchanged(backend: object) -> None:
    reference = greedy(backend, PROMPTS, 40)
    run = Run(backend)
    specs = [spec(p, 40) for p in PROMPTS]
    ids = [s.request_id for s in specs]
    for s in specs:
        backend.add([s])  # type: ignore[attr-defined]
    backend.apply(plan(admit=tuple(ids)))  # type: ignore[attr-defined]
    preempted_at: dict[str, int] = {}
    while backend.has_work():  # type: ignore[attr-defined]
        run.step()
        states = run.states()
        if run.steps in (5, 12, 21):  # preempt two requests that are decoding
            victims = tuple(r for r in ids if states.get(r) == State.RUNNING)[:2]
            backend.apply(plan(preempt=victims))  # type: ignore[attr-defined]
            after = run.states()
            assert all(after[v] == State.PREEMPTED for v in victims)
            preempted_at.update(dict.fromkeys(victims, run.steps))
        if run.steps in (8, 15, 24):  # ... and bring them back a few steps later
            parked = tuple(r for r, s in states.items() if s == State.PREEMPTED)
            backend.apply(plan(resume=parked))  # type: ignore[attr-defined]
            # Queued again with the tokens they made before (states() checks every entry).
            assert all(run.states()[r] == State.QUEUED for r in parked)
        if run.steps == 30:  # pause one with its KV kept, resume it next step
            paused = tuple(r for r in ids if states.get(r) == State.RUNNING)[:1]
            backend.apply(plan(pause=paused))  # type: ignore[attr-defined]
            assert all(run.states()[p] == State.PAUSED for p in paused)
        if run.steps == 31:
            backend.apply(plan(resume=tuple(  # type: ignore[attr-defined]
                r for r, s in states.items() if s == State.PAUSED)))
        assert run.steps < 500
    assert len(preempted_at) >= 2, "the test must really preempt"
    assert [run.tokens[r] for r in ids] == reference
    assert not run.forced


def test_engine_initiated_preemptions_are_reported_and_parked(backend: object) -> None:
    # 6 requests of ~6 prompt + 60 output tokens need 3 blocks each at the end: 18 > 12.
    run = Run(backend)
    specs = [spec(f"request {i} says hi", 60, ignore_eos=True) for i in range(6)]
    ids = tuple(s.request_id for s in specs)
    for s in specs:
        backend.add([s])  # type: ignore[attr-defined]
    backend.apply(plan(admit=ids))  # type: ignore[attr-defined]
    while backend.has_work():  # type: ignore[attr-defined]
        outcome = run.step()
        states = run.states()
        for victim in outcome.forced_preemptions:
            # Parked: the engine does not take it back by itself.
            assert states[victim] in (State.PREEMPTED, State.WAITING)
        assert run.steps < 1000
    run.until_done()
    assert run.forced, "KV must have run out"
    assert sorted(run.finished) == sorted(ids)
    assert all(len(run.tokens[r]) == 60 for r in ids)


def test_a_paused_request_keeps_its_batch_slot_from_queued_ones(backend: Any) -> None:
    """vLLM admits into its batch up to a limit of its own and checks the batch against
    another: a pause lowers both, else a queued request takes the paused one's slot and
    vLLM's check fails the step."""
    run = Run(backend)
    specs = [spec(f"slot {i}", 20, ignore_eos=True) for i in range(10)]  # 8 batch slots
    backend.add(specs)
    backend.apply(plan(admit=tuple(s.request_id for s in specs)))
    run.step()
    running = [r for r, s in run.states().items() if s == State.RUNNING]
    assert len(running) == 8
    backend.apply(plan(pause=(running[0],)))
    for _ in range(3):
        run.step()
        states = list(run.states().values())
        assert (states.count(State.RUNNING), states.count(State.PAUSED)) == (7, 1)
    backend.apply(plan(resume=(running[0],)))
    run.until_done()
    assert len(run.finished) == 10 and all(len(t) == 20 for t in run.tokens.values())


def test_changes_keep_a_listing_of_the_held_requests_whole(backend: Any) -> None:
    """What an engine process sends its worker after a step: the requests with KV, listed
    afresh, and those without that may have moved. A listing kept up to date from these alone
    (less what finished or was cancelled) is, step by step, what the engine lists afresh,
    and its count agrees: through a queue for batch slots, admissions, engine preemptions,
    plans that preempt, pause and resume, and cancels."""
    run = Run(backend)
    view: dict[str, Progress] = {p.request_id: p for p in backend.progress()}

    def follow() -> None:
        with_kv, without_kv, count = backend.progress_changes()
        view.update((p.request_id, p) for p in (*with_kv, *without_kv))
        for gone in run.finished:
            view.pop(gone, None)
        assert len(view) - len(with_kv) == count
        assert sorted(view.values()) == sorted(fresh_progress(backend))

    # 12 x (prompt + 70 tokens) is more KV than 12 blocks of 32, and more than 8 batch slots.
    specs = [spec(PROMPTS[i % len(PROMPTS)], 70, ignore_eos=True) for i in range(12)]
    ids = [s.request_id for s in specs]
    backend.add(specs)
    follow()
    backend.apply(plan(admit=tuple(ids[:10])))
    follow()
    for _ in range(6):
        run.step()
        follow()
    running = [p.request_id for p in backend.progress() if p.state == State.RUNNING]
    backend.apply(plan(preempt=(running[0],), pause=(running[1],), admit=tuple(ids[10:])))
    follow()
    for _ in range(4):
        run.step()
        follow()
    queued = [p.request_id for p in backend.progress() if p.state == State.QUEUED]
    done = backend.cancel((running[2], *queued[:1]))
    for d in done:
        view.pop(d.request_id)
    follow()
    backend.apply(plan(resume=(running[1], running[0])))
    follow()
    while True:
        while backend.has_work():
            run.step()
            follow()
            assert run.steps < 2000
        states = run.states()
        if not states:
            break
        backend.apply(plan(resume=tuple(r for r, s in states.items() if s == State.PREEMPTED),
                           admit=tuple(r for r, s in states.items() if s == State.WAITING)))
        follow()
    assert run.forced, "KV must have run out"
    assert len(run.finished) == len(ids) - len(done)


def test_cancel_during_decode_frees_kv_at_once(backend: object) -> None:
    run = Run(backend)
    free_before = backend.kv_blocks_free  # type: ignore[attr-defined]
    long = spec("A long story begins here and goes on and on", 200, ignore_eos=True)
    backend.add([long])  # type: ignore[attr-defined]
    backend.apply(plan(admit=(long.request_id,)))  # type: ignore[attr-defined]
    for _ in range(20):
        run.step()
    held = {p.request_id: p.kv_blocks for p in backend.progress()}  # type: ignore
    assert held[long.request_id] >= 1
    assert backend.kv_blocks_free == free_before - held[long.request_id]  # type: ignore
    # Counted from the KV managers' own lists: the same as vLLM's block id lists.
    internal = backend._internal[long.request_id]  # type: ignore[attr-defined]
    manager = backend.scheduler.kv_cache_manager  # type: ignore[attr-defined]
    assert held[long.request_id] == sum(len(ids) for ids in manager.get_block_ids(internal))
    done = backend.cancel((long.request_id, long.request_id, "unknown"))  # type: ignore
    assert [(d.request_id, d.reason, d.generated_tokens) for d in done] == [
        (long.request_id, generation_pb2.FINISH_REASON_CANCELLED, 20)]
    # Freed within the iteration boundary: no step in between.
    assert backend.kv_blocks_free == free_before  # type: ignore[attr-defined]
    assert backend.progress() == []  # type: ignore[attr-defined]
    assert backend.cancel((long.request_id,)) == []  # type: ignore[attr-defined]


def test_cancel_of_held_and_parked_requests(backend: object) -> None:
    run = Run(backend)
    held, parked = spec("never admitted", 10), spec("preempted then cancelled", 30)
    backend.add([held])  # type: ignore[attr-defined]
    backend.add([parked])  # type: ignore[attr-defined]
    backend.apply(plan(admit=(parked.request_id,)))  # type: ignore[attr-defined]
    for _ in range(4):
        run.step()
    backend.apply(plan(preempt=(parked.request_id,)))  # type: ignore[attr-defined]
    assert run.states() == {held.request_id: State.WAITING, parked.request_id: State.PREEMPTED}
    done = backend.cancel((held.request_id, parked.request_id))  # type: ignore[attr-defined]
    assert {d.request_id for d in done} == {held.request_id, parked.request_id}
    assert backend.progress() == [] and not backend.has_work()  # type: ignore[attr-defined]


def test_stop_strings_end_the_response(backend: object) -> None:
    run = Run(backend)
    free = spec(PROMPTS[1], 40, ignore_eos=True)
    backend.add([free])  # type: ignore[attr-defined]
    backend.apply(plan(admit=(free.request_id,)))  # type: ignore[attr-defined]
    run.until_idle()
    text = run.text[free.request_id]
    stop = next(text[i:i + 3] for i in range(len(text) // 3, len(text) - 3)
                if text[i:i + 3].strip() == text[i:i + 3] and text.find(text[i:i + 3]) == i)
    stopped = spec(PROMPTS[1], 40, ignore_eos=True, stop=[stop])
    backend.add([stopped])  # type: ignore[attr-defined]
    backend.apply(plan(admit=(stopped.request_id,)))  # type: ignore[attr-defined]
    while stopped.request_id not in run.finished:
        run.step()
    assert run.finished[stopped.request_id] == generation_pb2.FINISH_REASON_STOP
    assert run.text[stopped.request_id] == text[: text.index(stop)]
    # The engine stopped computing it with the step that met the stop string (its KV is
    # free), and no token after the one that completed the stop string was streamed.
    assert not backend.has_work()  # type: ignore[attr-defined]
    assert backend.kv_blocks_free == backend.kv_blocks_total  # type: ignore[attr-defined]
    assert len(run.tokens[stopped.request_id]) < len(run.tokens[free.request_id])
    assert run.tokens[free.request_id][:len(run.tokens[stopped.request_id])] == run.tokens[
        stopped.request_id]


def test_incremental_text_is_the_decoded_response(backend: object) -> None:
    """Streamed text deltas add up to the tokenizer's decoding of all the tokens, so
    multi-byte characters split across tokens are never garbled."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(backend.config.model)  # type: ignore[attr-defined]
    run = Run(backend)
    specs = [spec(p, 48, ignore_eos=True, temperature=1.0, seed=i)
             for i, p in enumerate(PROMPTS)]
    for s in specs:
        backend.add([s])  # type: ignore[attr-defined]
    backend.apply(plan(admit=tuple(s.request_id for s in specs)))  # type: ignore[attr-defined]
    run.until_idle()
    for s in specs:
        assert run.text[s.request_id] == tokenizer.decode(
            run.tokens[s.request_id], skip_special_tokens=True)


def test_requests_that_cannot_run_fail_alone(backend: object) -> None:
    too_long = spec("word " * 300, 10)  # over max_model_len (256)
    done = backend.add([too_long])  # type: ignore[attr-defined]
    assert [(d.request_id, d.reason) for d in done] == [
        (too_long.request_id, generation_pb2.FINISH_REASON_ERROR)]
    assert greedy(backend, PROMPTS[:1], 4)[0]


def test_resumed_request_continues_from_published_tokens(backend: object) -> None:
    """A request moved from another worker recomputes prompt + published tokens and goes on
    exactly where greedy decoding would."""
    full = greedy(backend, PROMPTS[2:3], 30)[0]
    run = Run(backend)
    moved = spec(PROMPTS[2], 30)
    moved = RequestSpec(**{**moved.__dict__, "resume_from_tokens": 12,
                           "generated_token_ids": tuple(full[:12])})
    run.first_index[moved.request_id] = 12
    backend.add([moved])  # type: ignore[attr-defined]
    backend.apply(plan(admit=(moved.request_id,)))  # type: ignore[attr-defined]
    run.until_idle()
    assert run.tokens[moved.request_id] == full[12:]


def test_resumed_text_continues_what_the_client_received(tiny_model: str) -> None:
    """Whatever token a response was moved at (also inside a multi-byte character), the
    received text plus the resumed text is the text of the whole response."""
    from transformers import AutoTokenizer

    from worker.vllm_backend import ResumedText

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    token_ids = tokenizer.encode("naïve café → 東京 ✓ done", add_special_tokens=False)
    whole = tokenizer.decode(token_ids, skip_special_tokens=True)
    for cut in range(1, len(token_ids)):
        # The old worker's incremental text held back an incomplete trailing character.
        received = tokenizer.decode(token_ids[:cut], skip_special_tokens=True).rstrip("\ufffd")
        resumed = ResumedText(tokenizer, token_ids[:cut], received)
        rest = [resumed.extend([t], final=i == len(token_ids) - 1)
                for i, t in enumerate(token_ids[cut:], start=cut)]
        assert received + "".join(rest) == whole, cut


def test_measured_profile_describes_the_engine(backend: object) -> None:
    from worker.vllm_profile import measure_profile

    profile = measure_profile(backend)  # type: ignore[arg-type]
    profile.validate()
    assert profile.kv_blocks_total == KV_BLOCKS
    assert profile.block_size == BLOCK_SIZE
    assert profile.max_batch == 8
    assert profile.compute_s_per_token > 0
    assert backend.progress() == []  # type: ignore[attr-defined]


def test_unknown_vllm_versions_are_refused() -> None:
    from worker.vllm_scheduler import check_vllm_version

    check_vllm_version("0.32.0")
    with pytest.raises(RuntimeError, match=r"0\.33\.1 is not supported"):
        check_vllm_version("0.33.1")
