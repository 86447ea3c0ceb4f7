"""Dynamic batching on execution threads: merging, splitting, bounds, deadlines, failure isolation, threads."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from serving.batcher import Batcher
from serving.errors import DeadlineExceeded, ModelNotReady, Overloaded


class Recorder:
    def __init__(self):
        self.batches: list[tuple[int, int]] = []
        self.shed: list[str] = []
        self.runs: list[tuple[float, float, float]] = []

        self.answered: list[np.ndarray] = []

    def on_batch(self, images, requests, seconds, input_s, output_s):
        assert threading.current_thread() is threading.main_thread()  # observers run on the event loop
        self.batches.append((images, requests))
        self.runs.append((seconds, input_s, output_s))

    def on_answers(self, probs, classes, waits, seconds):
        assert len(waits) <= probs.shape[0] and seconds >= 0
        assert threading.current_thread() is threading.main_thread()
        np.testing.assert_array_equal(classes, probs.argmax(axis=1))
        self.answered.append(probs[:, 0])

    def on_shed(self, reason, count=1):
        self.shed += [reason] * count

    def on_queue_depth(self, images):
        pass


async def probs_of(call) -> np.ndarray:
    return (await call).probs


def model(x: np.ndarray) -> np.ndarray:
    """Row sums into 10 columns: each request's answer identifies its own input."""
    return np.repeat(x.sum(axis=1, keepdims=True), 10, axis=1)


class Gate:
    """A model that blocks until released, so tests decide when a batch finishes."""

    def __init__(self):
        self.release = threading.Event()
        self.started = threading.Event()

    def __call__(self, x):
        self.started.set()
        self.release.wait(10)
        return model(x)


async def test_idle_queue_runs_at_once_and_concurrent_requests_merge():
    rec = Recorder()
    gate = Gate()
    batcher = Batcher(gate, rec, max_batch_size=64)
    first = asyncio.create_task(batcher.infer(np.full((1, 4), 1.0)))
    await asyncio.to_thread(gate.started.wait, 5)  # ran immediately, alone
    rest = [asyncio.create_task(batcher.infer(np.full((n, 4), float(n)))) for n in (2, 3, 5)]
    await asyncio.sleep(0.01)
    gate.release.set()
    results = [r.probs for r in await asyncio.gather(first, *rest)]
    assert rec.batches == [(1, 1), (10, 3)]  # the three waiting requests went as one run
    for n, probs in zip((1, 2, 3, 5), results, strict=True):
        assert probs.shape == (n, 10)
        np.testing.assert_array_equal(probs, np.full((n, 10), 4.0 * n))
    batcher.close()


async def test_batches_never_exceed_max_batch_size():
    rec = Recorder()
    batcher = Batcher(model, rec, max_batch_size=8)
    sizes = [3, 5, 2, 7, 1, 8, 4] * 5
    results = [
        r.probs for r in await asyncio.gather(*(batcher.infer(np.full((n, 2), float(i))) for i, n in enumerate(sizes)))
    ]
    assert all(images <= 8 for images, _ in rec.batches)
    assert sum(images for images, _ in rec.batches) == sum(sizes)
    for i, (n, probs) in enumerate(zip(sizes, results, strict=True)):
        np.testing.assert_array_equal(probs, np.full((n, 10), 2.0 * i))
    batcher.close()


async def _a_full_queue(rec: Recorder, gate: Gate):
    """A batcher holding 6 images in its queue (its limit) behind a gated run of 4."""
    batcher = Batcher(gate, rec, max_batch_size=4, max_queue_images=6)
    running = asyncio.create_task(batcher.infer(np.ones((4, 2))))
    await asyncio.to_thread(gate.started.wait, 5)
    queued = [asyncio.create_task(batcher.infer(np.ones((3, 2)))) for _ in range(2)]
    await asyncio.sleep(0.01)
    return batcher, running, queued


async def test_full_queue_is_refused_with_overloaded():
    rec, gate = Recorder(), Gate()
    batcher, running, queued = await _a_full_queue(rec, gate)
    with pytest.raises(Overloaded, match="queue full"):
        await batcher.infer(np.ones((1, 2)))
    assert rec.shed == ["queue_full"]
    gate.release.set()
    await asyncio.gather(running, *queued)
    assert batcher.queued_images == 0
    batcher.close()


async def test_expired_deadline_is_dropped_before_compute():
    rec = Recorder()
    gate = Gate()
    batcher = Batcher(gate, rec, max_batch_size=16)
    running = asyncio.create_task(batcher.infer(np.ones((1, 2))))
    await asyncio.to_thread(gate.started.wait, 5)
    expired = asyncio.create_task(batcher.infer(np.ones((5, 2)), deadline=time.monotonic() + 0.01))
    alive = asyncio.create_task(batcher.infer(np.ones((2, 2)), deadline=time.monotonic() + 60))
    await asyncio.sleep(0.05)
    gate.release.set()
    with pytest.raises(DeadlineExceeded):
        await expired
    assert (await probs_of(alive)).shape == (2, 10)
    await running
    assert rec.shed == ["deadline"]
    assert rec.batches == [(1, 1), (2, 1)]  # the expired request never reached the model
    batcher.close()


async def test_a_failing_request_does_not_fail_its_batch_mates():
    """A failed run of several requests is retried one by one on the execution thread: only the culprit fails."""

    def picky(x):
        if np.isnan(x).any():
            raise ValueError("poison")
        return model(x)

    rec = Recorder()
    gate = Gate()
    run = lambda x: gate(x) if x[0, 0] == 7 else picky(x)  # noqa: E731
    batcher = Batcher(run, rec, max_batch_size=32)
    blocker = asyncio.create_task(batcher.infer(np.full((20, 2), 7.0)))
    await asyncio.to_thread(gate.started.wait, 5)
    good = [asyncio.create_task(batcher.infer(np.ones((2, 2)))) for _ in range(3)]
    bad = asyncio.create_task(batcher.infer(np.full((1, 2), np.nan)))
    await asyncio.sleep(0.01)
    gate.release.set()
    await blocker
    for task in good:
        assert (await probs_of(task)).shape == (2, 10)
    with pytest.raises(ValueError, match="poison"):
        await bad
    # The merged run of 7 images failed (not recorded); each request then ran alone and only the poison one failed.
    assert rec.batches == [(20, 1)] + [(2, 1)] * 3
    assert batcher.queued_images == 0
    batcher.close()


async def test_a_lone_failing_request_reaches_its_caller_and_the_batcher_stays_usable():
    rec = Recorder()

    def run(x):
        if np.isnan(x).any():
            raise ValueError("poison")
        return model(x)

    batcher = Batcher(run, rec, max_batch_size=16)
    with pytest.raises(ValueError, match="poison"):
        await batcher.infer(np.full((2, 2), np.nan))
    assert rec.batches == [] and batcher.queued_images == 0
    np.testing.assert_array_equal(await probs_of(batcher.infer(np.full((3, 2), 2.0))), np.full((3, 10), 4.0))
    assert rec.batches == [(3, 1)]
    batcher.close()


async def test_queue_delay_holds_a_partial_batch_and_releases_it_when_it_fills():
    """The first request finds the model idle; with a delay it is held (not run) while others join, and the
    batch goes as soon as it is full, long before the delay runs out."""
    rec = Recorder()
    batcher = Batcher(model, rec, max_batch_size=8, max_queue_delay_us=60_000_000)
    first = asyncio.create_task(batcher.infer(np.full((2, 2), 1.0)))
    await asyncio.sleep(0.05)  # without the delay this request would have run by now
    assert rec.batches == [] and not first.done()
    more = [asyncio.create_task(batcher.infer(np.full((2, 2), float(i)))) for i in (2, 3)]
    await asyncio.sleep(0.05)
    assert rec.batches == [] and batcher.queued_images == 6  # 6 of 8: still held
    last = asyncio.create_task(batcher.infer(np.full((2, 2), 4.0)))
    # Full: released at once. The guard is far below the 60 s delay, so a broken early release fails here.
    results = await asyncio.wait_for(asyncio.gather(first, *more, last), 20)
    assert rec.batches == [(8, 4)]
    for i, answer in enumerate(results, start=1):
        np.testing.assert_array_equal(answer.probs, np.full((2, 10), 2.0 * i))  # row sums: each answer is its own
    batcher.close()


async def test_queue_delay_releases_a_batch_that_never_fills():
    rec = Recorder()
    batcher = Batcher(model, rec, max_batch_size=8, max_queue_delay_us=100_000)
    first = asyncio.create_task(batcher.infer(np.ones((2, 2))))
    await asyncio.sleep(0.01)
    second = asyncio.create_task(batcher.infer(np.ones((3, 2))))
    await asyncio.wait_for(asyncio.gather(first, second), 20)
    assert rec.batches == [(5, 2)]  # held together for the delay, then run although 3 images short
    batcher.close()


async def test_a_cancelled_caller_without_deadline_is_skipped():
    rec = Recorder()
    gate = Gate()
    batcher = Batcher(gate, rec, max_batch_size=16)
    running = asyncio.create_task(batcher.infer(np.ones((1, 2))))
    await asyncio.to_thread(gate.started.wait, 5)
    gone = asyncio.create_task(batcher.infer(np.ones((5, 2))))
    kept = asyncio.create_task(batcher.infer(np.ones((2, 2))))
    await asyncio.sleep(0.01)
    gone.cancel()  # the client went away (gRPC cancels the handler): no deadline involved
    gate.release.set()
    await running
    assert (await probs_of(kept)).shape == (2, 10)
    assert gone.cancelled()
    assert rec.batches == [(1, 1), (2, 1)]  # the cancelled request's 5 images never reached the model
    assert rec.shed == [] and batcher.queued_images == 0
    batcher.close()


async def test_close_answers_what_is_queued_and_refuses_new_requests():
    """Unloading a version: what it accepted is answered (nothing lost), what comes after is refused."""
    rec = Recorder()
    gate = Gate()
    batcher = Batcher(gate, rec, max_batch_size=4)
    running = asyncio.create_task(batcher.infer(np.ones((4, 2))))
    await asyncio.to_thread(gate.started.wait, 5)
    queued = [asyncio.create_task(batcher.infer(np.ones((3, 2)))) for _ in range(2)]
    await asyncio.sleep(0.01)
    batcher.close()
    with pytest.raises(ModelNotReady, match="unloaded"):
        await batcher.infer(np.ones((1, 2)))
    gate.release.set()
    results = await asyncio.wait_for(asyncio.gather(running, *queued), 20)
    assert [r.probs.shape for r in results] == [(4, 10), (3, 10), (3, 10)]
    assert batcher.queued_images == 0
    for _ in range(100):  # the execution thread ends once the queue is empty
        if not any(t.is_alive() for t in batcher._threads):
            break
        await asyncio.sleep(0.05)
    assert not any(t.is_alive() for t in batcher._threads)


async def test_drain_waits_for_queued_work():
    rec = Recorder()
    batcher = Batcher(model, rec, max_batch_size=4)
    tasks = [asyncio.create_task(batcher.infer(np.ones((3, 2)))) for _ in range(5)]
    await asyncio.sleep(0)
    await batcher.drain()
    assert all(t.done() and not t.exception() for t in tasks)
    assert batcher.queued_images == 0
    batcher.close()


async def test_inference_never_runs_on_the_event_loop_without_inline_images():
    """Small or large, idle or busy: with inline_images 0 (CUDA, or --inline-max-images 0) every run happens on
    the version's execution threads."""
    rec = Recorder()
    threads = []

    def run(x):
        threads.append(threading.get_ident())
        return model(x)

    batcher = Batcher(run, rec, max_batch_size=64, instances=2)
    await batcher.infer(np.ones((1, 2)))  # idle model, batch of one
    await asyncio.gather(*(batcher.infer(np.ones((n, 2))) for n in (1, 2, 40, 1, 3)))
    assert threads and set(threads) <= batcher.thread_ids
    assert threading.get_ident() not in threads
    batcher.close()


async def test_call_runs_on_an_execution_thread_in_queue_order():
    rec = Recorder()
    batcher = Batcher(model, rec, max_batch_size=8)
    ran_on = await asyncio.to_thread(batcher.call, threading.get_ident)
    assert ran_on in batcher.thread_ids
    with pytest.raises(ZeroDivisionError):
        await asyncio.to_thread(batcher.call, lambda: 1 / 0)
    batcher.close()


async def test_an_idle_model_starts_a_request_at_once_and_busy_ones_batch():
    """No added delay at light load (the run starts before any other request could join); under load, everything
    queued while a run is in progress goes in the next run."""
    rec = Recorder()
    gate = Gate()
    batcher = Batcher(gate, rec, max_batch_size=64)
    first = asyncio.create_task(batcher.infer(np.ones((1, 3))))
    await asyncio.to_thread(gate.started.wait, 5)  # started with nothing else queued
    burst = [asyncio.create_task(batcher.infer(np.full((1, 3), float(i)))) for i in range(6)]
    await asyncio.sleep(0.01)
    assert not any(t.done() for t in burst)
    gate.release.set()
    answers = await asyncio.gather(first, *burst)
    assert rec.batches == [(1, 1), (6, 6)]
    for i, answer in enumerate(answers[1:]):
        np.testing.assert_array_equal(answer.probs, np.full((1, 10), 3.0 * i))
        assert answer.classes.shape == (1,)
    batcher.close()


async def test_two_instances_run_two_batches_at_once():
    rec = Recorder()
    both = threading.Barrier(2, timeout=5)

    def run(x):
        both.wait()  # each of the two runs waits for the other: they only finish if they run concurrently
        return model(x)

    batcher = Batcher(run, rec, max_batch_size=4, instances=2)
    a, b = await asyncio.wait_for(
        asyncio.gather(batcher.infer(np.ones((4, 2))), batcher.infer(np.full((4, 2), 2.0))), 10
    )
    np.testing.assert_array_equal(a.probs, np.full((4, 10), 2.0))
    np.testing.assert_array_equal(b.probs, np.full((4, 10), 4.0))
    assert rec.batches == [(4, 1), (4, 1)]
    batcher.close()


async def test_uint8_and_fp32_requests_never_share_a_run():
    rec = Recorder()
    gate = Gate()
    dtypes: list[set] = []

    def run(x):
        dtypes.append({x.dtype})
        return gate(x.astype(np.float64))

    batcher = Batcher(run, rec, max_batch_size=64)
    first = asyncio.create_task(batcher.infer(np.full((1, 4), 1.0, np.float32)))
    await asyncio.to_thread(gate.started.wait, 5)
    kinds = [np.float32, np.float32, np.uint8, np.uint8, np.float32]
    rest = [asyncio.create_task(batcher.infer(np.full((i + 1, 4), i + 1, k))) for i, k in enumerate(kinds)]
    await asyncio.sleep(0.01)
    gate.release.set()
    results = [r.probs for r in await asyncio.gather(first, *rest)]
    # FIFO order kept: fp32 x2 together, then the uint8 pair, then the last fp32 alone.
    assert rec.batches == [(1, 1), (3, 2), (7, 2), (5, 1)]
    assert [d.pop().name for d in dtypes] == ["float32", "float32", "uint8", "float32"]
    for i, probs in enumerate(results[1:]):
        np.testing.assert_array_equal(probs, np.full((i + 1, 10), 4.0 * (i + 1)))
    batcher.close()


async def test_each_request_learns_its_queue_wait_and_its_run_time():
    rec = Recorder()
    gate = Gate()
    batcher = Batcher(gate, rec, max_batch_size=64)
    first = asyncio.create_task(batcher.infer(np.ones((1, 4))))
    await asyncio.to_thread(gate.started.wait, 5)
    waiting = [asyncio.create_task(batcher.infer(np.ones((2, 4)))) for _ in range(2)]
    await asyncio.sleep(0.05)
    gate.release.set()
    a0, a1, a2 = await asyncio.gather(first, *waiting)
    (q0, r0), (q1, r1), (q2, r2) = ((a.queue_s, a.run_s) for a in (a0, a1, a2))
    assert rec.batches == [(1, 1), (4, 2)]
    (run0, _, _), (run1, joined, split) = rec.runs
    assert q0 < 0.05 <= q1 and q2 <= q1  # the two queued behind the gated run waited for it
    assert (r0, r1, r2) == (run0, run1, run1)  # both requests of the merged run report the whole run
    assert joined >= 0 and split >= 0
    batcher.close()


async def test_only_client_answers_reach_the_drift_signals():
    rec = Recorder()
    gate = Gate()
    batcher = Batcher(gate, rec, max_batch_size=64)
    first = asyncio.create_task(batcher.infer(np.full((1, 1), 1.0)))
    await asyncio.to_thread(gate.started.wait, 5)
    mixed = [
        asyncio.create_task(batcher.infer(np.full((n, 1), float(n)), client=n != 3)) for n in (2, 3, 4)
    ]  # one run: two client requests around a canary's
    await asyncio.sleep(0.01)
    gate.release.set()
    await asyncio.gather(first, *mixed)
    assert rec.batches == [(1, 1), (9, 3)]
    assert [a.tolist() for a in rec.answered] == [[1.0], [2.0, 2.0, 4.0, 4.0, 4.0, 4.0]]
    await batcher.infer(np.full((2, 1), 5.0), client=False)
    assert len(rec.answered) == 2  # a run of canary images only: no drift signal at all
    batcher.close()


async def test_a_failing_observer_does_not_keep_answers_from_their_callers(caplog):
    class Broken(Recorder):
        def on_answers(self, probs, classes, waits, seconds):
            raise RuntimeError("metrics broke")

    batcher = Batcher(model, Broken(), max_batch_size=8)
    answer = await asyncio.wait_for(batcher.infer(np.ones((2, 2))), 10)
    np.testing.assert_array_equal(answer.probs, np.full((2, 10), 2.0))
    assert "recording a run's statistics failed" in caplog.text
    batcher.close()


async def test_a_request_that_may_wait_waits_for_room_instead_of_being_refused():
    """Streams are slowed, not refused: with `wait` a request finding the queue full is queued once a run ends."""
    rec, gate = Recorder(), Gate()
    batcher, running, queued = await _a_full_queue(rec, gate)
    waiting = asyncio.create_task(batcher.infer(np.full((2, 2), 5.0), wait=True))
    await asyncio.sleep(0.05)
    assert not waiting.done() and rec.shed == []  # held, not refused
    with pytest.raises(Overloaded):
        await batcher.infer(np.ones((7, 2)), wait=True)  # could never fit: refused at once
    gate.release.set()
    await asyncio.gather(running, *queued)
    np.testing.assert_array_equal((await asyncio.wait_for(waiting, 10)).probs, np.full((2, 10), 10.0))
    batcher.close()


def test_model_config_reports_the_instance_count():
    """Triton's ModelConfig shows the execution threads per version as its instance group count."""
    from types import SimpleNamespace

    from serving.codec import model_config
    from serving.config import Settings
    from serving.protos import model_config_pb2 as mc

    settings = Settings(instance_count=3, model_repository="unused")
    mv = SimpleNamespace(
        name="mnist", provider="CPUExecutionProvider", settings=settings, model=SimpleNamespace(placement={})
    )
    config = model_config(mv)
    assert [(g.count, g.kind) for g in config.instance_group] == [(3, mc.ModelInstanceGroup.KIND_CPU)]


async def test_small_requests_of_one_loop_iteration_run_together_on_the_loop():
    """inline_images: requests queued in one loop iteration run as one run on the event loop, split by dtype and
    max_batch_size; a larger request goes to the execution thread."""
    rec = Recorder()
    ran: list[tuple[int, int, np.dtype]] = []

    def run(x):
        ran.append((threading.get_ident(), x.shape[0], x.dtype))
        return model(x.astype(np.float64))

    batcher = Batcher(run, rec, max_batch_size=8, inline_images=4)
    sizes = [(1, np.float32), (2, np.float32), (1, np.uint8), (4, np.float32), (3, np.float32), (6, np.float32)]
    calls = [batcher.infer(np.full((n, 2), n, dtype=dtype)) for n, dtype in sizes]
    answers = await asyncio.gather(*calls)
    for (n, _), answer in zip(sizes, answers, strict=True):
        np.testing.assert_array_equal(answer.probs, np.full((n, 10), 2.0 * n))
    loop_thread = threading.get_ident()
    on_loop = sorted((n, str(d)) for t, n, d in ran if t == loop_thread)
    # float32 1+2+4 fits in 8, then 3; uint8 alone; the 6-image request (> inline_images) on the thread
    assert on_loop == [(1, "uint8"), (3, "float32"), (7, "float32")], ran
    assert [(n, t in batcher.thread_ids) for t, n, _ in ran if t != loop_thread] == [(6, True)]
    assert sorted(rec.batches) == [(1, 1), (3, 1), (6, 1), (7, 3)]
    assert batcher.queued_images == 0 and batcher.unanswered_images == 0
    batcher.close()


async def test_a_failing_request_run_on_the_loop_fails_alone():
    rec = Recorder()

    def run(x):
        if (x < 0).any():
            raise ValueError("negative pixels")
        return model(x)

    batcher = Batcher(run, rec, max_batch_size=8, inline_images=4)
    good, bad = batcher.infer(np.ones((2, 2))), batcher.infer(-np.ones((1, 2)))
    results = await asyncio.gather(good, bad, return_exceptions=True)
    np.testing.assert_array_equal(results[0].probs, np.full((2, 10), 2.0))
    assert isinstance(results[1], ValueError)
    batcher.close()
