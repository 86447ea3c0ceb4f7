"""Dynamic batching: concurrent requests for one model version go into one onnxruntime run.

Triton's dynamic batcher, for one model version: the event loop only queues requests and hands back results;
each execution thread (`instances` of them, Triton's instance count) waits for the queue, takes everything
queued up to `max_batch_size` images as soon as it is free, runs it (onnxruntime releases the GIL, so the loop
keeps reading requests meanwhile) and hands the results back in one event-loop callback. An idle model starts
a request at once (no added delay at light load); while a run is in progress, new requests queue up and go
together in the next one. `max_queue_delay_us` optionally holds a batch back to let more requests join.

On CPU, small requests (`inline_images`, --inline-max-images) run on the event loop instead: every such request
queued during one loop iteration goes into one run at the start of the next (`_flush`), which costs less than a
thread hand-off (bench/README.md, "Request path"). Larger requests, and every run on CUDA, use the threads.

NOTE: small runs used to execute on the event loop one request at a time, inside the handler. Under load that
starved the loop: nothing could queue behind a run, every request ran alone (1.0 image per run at 32 concurrent
calls) and the server used ~1.5x the CPU per request; the deferred run of a whole iteration's requests does not.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future as ThreadFuture
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from serving.errors import DeadlineExceeded, ModelNotReady, Overloaded

log = logging.getLogger(__name__)


class BatchObserver(Protocol):
    """Receives what the batcher measured per run, on the event loop (metrics and statistics live elsewhere).

    `on_batch`: images and requests in one run, its duration, and the time spent joining the requests' inputs
    (`input_s`) and handing each its slice (`output_s`). `on_answers`: the answers of one run that went to clients
    (`probs` and `classes`, its argmax; not those of requests made with `client=False`, e.g. the canary's), each
    client request's time in the queue (`waits`) and the run's duration."""

    def on_batch(self, images: int, requests: int, seconds: float, input_s: float, output_s: float) -> None: ...

    def on_answers(self, probs: np.ndarray, classes: np.ndarray, waits: list[float], seconds: float) -> None: ...

    def on_shed(self, reason: str, count: int = 1) -> None: ...

    def on_queue_depth(self, images: int) -> None: ...


@dataclass(slots=True, eq=False)
class Run:
    """One onnxruntime run, shared by the answers of the requests it served (times: time.perf_counter())."""

    started: float  # taken off the queue
    joined: float  # inputs joined: the model starts
    ended: float  # the model is done
    images: int
    requests: int
    thread: str  # the execution thread, or the event loop's
    traced: list  # the `trace` objects of the requests that brought one (serving.tracing's spans)
    span: object = None  # its own span, once serving.tracing made one

    @property
    def seconds(self) -> float:
        return self.ended - self.joined


@dataclass(slots=True)
class Answer:
    """One request's share of a run."""

    probs: np.ndarray  # (n, 10) float32
    classes: np.ndarray  # (n,) int64: probs.argmax(axis=1)
    queue_s: float  # waiting for an execution thread
    run: Run  # the whole run it was part of

    @property
    def run_s(self) -> float:
        return self.run.seconds


@dataclass(slots=True, eq=False)
class _Pending:
    images: np.ndarray
    future: asyncio.Future
    deadline: float | None  # time.monotonic() after which the answer is useless
    client: bool  # its answer counts in the drift signals
    trace: object = None  # the request's span, when it is traced
    enqueued: float = field(default_factory=time.perf_counter)


@dataclass(slots=True)
class _Call:
    """A function to run on an execution thread (warm-up, verification): every run of a version on its thread."""

    fn: Callable[[], object]
    future: ThreadFuture


_STOP = object()
_LOOP = "event-loop"  # Run.thread of the runs made on the event loop (`_flush`)


class Batcher:
    """A bounded queue per model version, served by `instances` execution threads."""

    def __init__(
        self,
        run: Callable[[np.ndarray], np.ndarray],
        observer: BatchObserver,
        *,
        max_batch_size: int,
        max_queue_delay_us: int = 0,
        max_queue_images: int = 8192,
        instances: int = 1,
        name: str = "model",
        inline_images: int = 0,
    ) -> None:
        self._run = run
        # Requests of at most this many images run on the event loop, all that queued during one loop iteration
        # together (0: every run on an execution thread).
        self._inline_images = inline_images
        self._inline: list[_Pending] = []
        self._observer = observer
        self._max_batch = max_batch_size
        self._max_delay = max_queue_delay_us / 1e6
        self._max_queued = max_queue_images
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        # Images submitted and finished (answered or dropped), written by the event loop only, and taken off the
        # queue, by the execution threads under a lock. Waiting: submitted - taken; in the server: submitted -
        # finished.
        self._submitted = 0
        self._taken = 0
        self._taken_lock = threading.Lock()
        self._finished = 0
        self._closed = False
        self._room = asyncio.Event()  # set whenever a run ends: the queue may have room again
        self._threads = [
            threading.Thread(target=self._serve, name=f"ort-{name}-{i}", daemon=True) for i in range(instances)
        ]
        for thread in self._threads:
            thread.start()

    @property
    def queued_images(self) -> int:
        """Images waiting for an execution thread (Triton's queue: what runs is not counted)."""
        return self._submitted - self._taken

    @property
    def unanswered_images(self) -> int:
        """Images submitted and not answered yet (waiting or running)."""
        return self._submitted - self._finished

    @property
    def thread_ids(self) -> set[int]:
        return {t.ident for t in self._threads}

    def call(self, fn: Callable[[], object]) -> object:
        """Run `fn` on an execution thread and return its result (blocking; for loading, never on the loop)."""
        future: ThreadFuture = ThreadFuture()
        self._queue.put(_Call(fn, future))
        return future.result()

    async def infer(
        self,
        images: np.ndarray,
        deadline: float | None = None,
        client: bool = True,
        wait: bool = False,
        trace: object = None,
    ) -> Answer:
        """`images`' answer, computed in whichever batch they land in (`client`: a client's request, whose answer
        the drift signals count; `trace`: its span, listed in the answer's Run). A full queue refuses the request
        (Overloaded), or with `wait` (streams, which are slowed rather than refused) holds it until there is
        room."""
        if self._closed:
            raise ModelNotReady("this model version is being unloaded; retry")
        n = images.shape[0]
        while self._submitted - self._taken + n > self._max_queued:
            queued = self._submitted - self._taken
            if not wait or n > self._max_queued or self._closed:
                self._observer.on_shed("queue_full")
                raise Overloaded(f"queue full ({queued} images waiting, limit {self._max_queued}); retry later")
            self._room.clear()
            await self._room.wait()  # set after each run
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._submitted += n
        pending = _Pending(images, future, deadline, client, trace)
        if n <= self._inline_images and self._max_delay == 0:
            if not self._inline:
                loop.call_soon(self._flush)
            self._inline.append(pending)
        else:
            self._queue.put(pending)
        return await future

    async def drain(self) -> None:
        """Wait until everything queued has been answered (woken after each run, which sets `_room`)."""
        while self._submitted != self._finished:
            self._room.clear()
            await self._room.wait()
        # The last runs' answers were set before this check; one more turn of the loop lets the callers whose
        # futures they resolved (woken in FIFO order, before this task) take them.
        await asyncio.sleep(0)

    def close(self) -> None:
        """Refuse new requests; the execution threads answer what is queued, then end (daemons: not waited for)."""
        if not self._closed:
            self._closed = True
            self._queue.put(_STOP)
            self._room.set()  # waiting requests are refused now

    # ------------------------------------------------------------------ runs on the event loop

    def _flush(self) -> None:
        """Run the small requests queued since the last loop iteration, as few runs as max_batch_size and the
        dtypes allow, on the event loop itself.

        NOTE: a small run on the loop costs less than handing it to a thread: waking the thread and taking the GIL
        back from the busy loop costs several times the ~35 us of onnxruntime's work (bench/README.md, "Request
        path"). Deferred to the next iteration, a run takes every request whose handler ran in this one; a
        request per run, as before the execution threads, starved the loop."""
        pending, self._inline = self._inline, []
        for batch in _runs(pending, self._max_batch):
            self._take(batch)
            self._execute(batch, self._finish, _LOOP)

    def _take(self, batch: list[_Pending]) -> None:
        """Count `batch`'s images as taken off the queue (by an execution thread or the loop: one at a time)."""
        with self._taken_lock:
            self._taken += sum(p.images.shape[0] for p in batch)

    # ------------------------------------------------------------------ execution threads

    def _serve(self) -> None:
        carry = None
        while True:
            item = carry if carry is not None else self._queue.get()
            carry = None
            if item is _STOP:
                self._queue.put(_STOP)  # for the other threads
                return
            if isinstance(item, _Call):
                _call(item)
                continue
            batch, carry = self._gather(item)
            self._take(batch)
            try:
                finish = functools.partial(batch[0].future.get_loop().call_soon_threadsafe, self._finish)
                self._execute(batch, finish, threading.current_thread().name)
            except Exception:  # never lose the thread: the next requests would wait forever
                log.exception("execution thread: a run could not be handed back")

    def _gather(self, first: _Pending) -> tuple[list[_Pending], object]:
        """`first` and whatever else is queued, up to max_batch_size images of one dtype; the item that did not
        fit is carried over to the next run."""
        batch = [first]
        images = first.images.shape[0]
        dtype = first.images.dtype
        get = self._queue.get
        until = first.enqueued + self._max_delay if self._max_delay else 0.0
        while images < self._max_batch:
            try:
                if until:
                    remaining = until - time.perf_counter()
                    item = get(timeout=remaining) if remaining > 0 else get(block=False)
                else:
                    item = get(block=False)
            except queue.Empty:
                break
            if not isinstance(item, _Pending):  # a stop or a call: after this run
                return batch, item
            n = item.images.shape[0]
            if images + n > self._max_batch or item.images.dtype != dtype:
                return batch, item  # full, or UINT8 after FP32 (or the reverse): one run takes one dtype
            batch.append(item)
            images += n
        return batch, None

    def _execute(self, batch: list[_Pending], finish: Callable, thread: str) -> None:
        """Run the live requests of `batch` (expired and cancelled ones are dropped) on `thread` and hand the
        results to `finish` (on the event loop)."""
        start = time.perf_counter()
        now = time.monotonic()
        live = [p for p in batch if not p.future.done() and (p.deadline is None or now <= p.deadline)]
        if not live:
            finish(batch, live, None, Run(start, start, start, 0, 0, thread, []))
            return
        images = live[0].images if len(live) == 1 else np.concatenate([p.images for p in live])
        joined = time.perf_counter()
        try:
            result = self._run(images)
        except Exception as exc:
            result = self._isolate(live, exc)
        traced = [p.trace for p in live if p.trace is not None]
        finish(batch, live, result, Run(start, joined, time.perf_counter(), len(images), len(live), thread, traced))

    def _isolate(self, live: list[_Pending], exc: Exception) -> list:
        """A failed run of several requests is rerun one by one so that only the culprit fails."""
        if len(live) == 1:
            return [exc]
        log.warning("batch of %d requests failed (%s); retrying them one by one", len(live), exc)
        results = []
        for p in live:
            try:
                results.append(self._run(p.images))
            except Exception as one:
                results.append(one)
        return results

    # ------------------------------------------------------------------ back on the event loop

    def _finish(self, batch: list[_Pending], live: list[_Pending], result, run: Run) -> None:
        """Answer every request of a run (its slice, its failure, or a deadline for the expired)."""
        self._finished += sum(p.images.shape[0] for p in batch)
        try:
            self._settle(batch, live, result, run)
        finally:
            self._room.set()  # after the answers: drain() returns once every caller has its answer

    def _settle(self, batch: list[_Pending], live: list[_Pending], result, run: Run) -> None:
        if len(live) != len(batch):
            kept = {id(p) for p in live}
            now = time.monotonic()
            # Dropped: cancelled (the caller went away) or expired; gRPC usually cancels an expired call itself, so
            # an expired request is counted as shed for its deadline either way.
            expired = [p for p in batch if id(p) not in kept and p.deadline is not None and now > p.deadline]
            for p in expired:
                if not p.future.done():
                    p.future.set_exception(DeadlineExceeded("deadline passed while the request was queued"))
            if expired:
                self._observe(self._observer.on_shed, "deadline", len(expired))
        self._observe(self._observer.on_queue_depth, self._submitted - self._taken)
        if result is None:
            return
        if isinstance(result, list):  # failed batch, rerun one by one
            for p, one in zip(live, result, strict=True):
                if isinstance(one, Exception):
                    if not p.future.done():
                        p.future.set_exception(one)
                else:
                    alone = Run(run.started, run.joined, run.ended, p.images.shape[0], 1, run.thread, run.traced)
                    self._answer([p], one, alone, time.perf_counter())
            return
        self._answer(live, result, run, time.perf_counter())

    def _answer(self, live: list[_Pending], probs: np.ndarray, run: Run, now: float) -> None:
        classes = probs.argmax(axis=1)
        start = run.started
        if len(live) == 1:
            p = live[0]
            if not p.future.done():
                p.future.set_result(Answer(probs, classes, start - p.enqueued, run))
        else:
            offset = 0
            for p in live:
                n = p.images.shape[0]
                if not p.future.done():
                    end = offset + n
                    p.future.set_result(Answer(probs[offset:end], classes[offset:end], start - p.enqueued, run))
                offset += n
        # NOTE: after the answers: a failing observer must not leave callers waiting forever.
        self._observe(self._record, live, probs, classes, run, time.perf_counter() - now)

    def _record(self, live, probs, classes, run: Run, output_s: float) -> None:
        """The run's statistics, and the drift signals of the answers that went to clients."""
        seconds = run.seconds
        self._observer.on_batch(probs.shape[0], len(live), seconds, run.joined - run.started, output_s)
        waits = [run.started - p.enqueued for p in live if p.client]
        if len(waits) == len(live):
            self._observer.on_answers(probs, classes, waits, seconds)
        elif waits:
            rows = np.concatenate([np.full(p.images.shape[0], p.client) for p in live])
            self._observer.on_answers(probs[rows], classes[rows], waits, seconds)

    @staticmethod
    def _observe(method, *args) -> None:
        try:
            method(*args)
        except Exception:
            log.exception("recording a run's statistics failed; its answers were sent")


def _runs(pending: list[_Pending], max_images: int) -> list[list[_Pending]]:
    """`pending` in runs of one dtype and at most `max_images` images each, in arrival order within a dtype."""
    runs: list[list[_Pending]] = []
    sizes: list[int] = []
    filling: dict[np.dtype, int] = {}  # dtype -> the run its requests go to
    for p in pending:
        n = p.images.shape[0]
        i = filling.get(p.images.dtype)
        if i is None or sizes[i] + n > max_images:
            i = filling[p.images.dtype] = len(runs)
            runs.append([])
            sizes.append(0)
        runs[i].append(p)
        sizes[i] += n
    return runs


def _call(item: _Call) -> None:
    if not item.future.set_running_or_notify_cancel():
        return
    try:
        item.future.set_result(item.fn())
    except BaseException as exc:
        item.future.set_exception(exc)
