"""Dynamic batching: concurrent requests for one model version are merged into one onnxruntime run."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from serving.errors import DeadlineExceeded, Overloaded

log = logging.getLogger(__name__)


class BatchObserver(Protocol):
    """Receives what the batcher measured per run (metrics and statistics live elsewhere).

    `on_batch`: images and requests in one onnxruntime run, its duration, and the time spent joining the
    requests' inputs (`input_s`) and handing each its slice of the output (`output_s`)."""

    def on_batch(self, images: int, requests: int, seconds: float, input_s: float, output_s: float) -> None: ...

    def on_shed(self, reason: str) -> None: ...

    def on_queue_depth(self, images: int) -> None: ...


@dataclass(slots=True)
class _Pending:
    images: np.ndarray
    future: asyncio.Future
    deadline: float | None  # time.monotonic() after which the answer is useless
    enqueued: float = field(default_factory=time.perf_counter)


class Batcher:
    """A bounded queue and one worker task that runs whatever is queued as one batch.

    When the model is idle a request runs at once (no added latency under light load); while a batch
    runs, new requests queue up and go together in the next run. `max_queue_delay_us` optionally holds
    a batch back to let more requests join.

    Small batches run on the event loop (`inline_max_images`), so nothing would ever queue behind them: a
    request arriving less than `merge_idle_us` after the previous run ended (the model is under load) therefore
    waits one event-loop turn (a `call_soon` flush), and every request that arrived in the same turn goes with
    it in one run. A request to a model idle for longer still runs at once.
    """

    def __init__(
        self,
        run: Callable[[np.ndarray], np.ndarray],
        observer: BatchObserver,
        max_batch_size: int,
        max_queue_delay_us: int = 0,
        max_queue_images: int = 8192,
        inline_max_images: int = 0,
        name: str = "model",
        merge_idle_us: int = 0,
    ) -> None:
        self._run = run
        self._observer = observer
        self._max_batch = max_batch_size
        self._max_delay = max_queue_delay_us / 1e6
        self._max_queued = max_queue_images
        self._inline_max = inline_max_images
        self._merge_idle = merge_idle_us / 1e6
        self._last_end = 0.0  # time.perf_counter() when the latest run ended
        self._flush_scheduled = False
        self._queue: deque[_Pending] = deque()
        self._queued_images = 0
        self._worker: asyncio.Task | None = None
        self._full = asyncio.Event()
        # One thread: batches of one version run one after another; onnxruntime parallelises inside.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"ort-{name}")

    @property
    def queued_images(self) -> int:
        return self._queued_images

    @property
    def busy(self) -> bool:
        return self._worker is not None

    async def infer(self, images: np.ndarray, deadline: float | None = None) -> tuple[np.ndarray, float, float]:
        """(probabilities, seconds queued, seconds of the run) for `images`, computed in whichever batch they
        land in (the run time is the whole batch's: every request in it waited for all of it)."""
        n = images.shape[0]
        if self._queued_images + n > self._max_queued:
            self._observer.on_shed("queue_full")
            raise Overloaded(
                f"queue full ({self._queued_images} images waiting, limit {self._max_queued}); retry later"
            )
        if (
            self._worker is None
            and n <= self._inline_max
            and (not self._merge_idle or time.perf_counter() - self._last_end > self._merge_idle)
        ):
            return self._run_now(images)
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._queue.append(_Pending(images, future, deadline))
        self._queued_images += n
        if self._queued_images >= self._max_batch:
            self._full.set()
        if self._worker is None:
            if self._queued_images <= self._inline_max and not self._max_delay:
                if not self._flush_scheduled:  # after the callbacks ready now: requests of this turn join
                    self._flush_scheduled = True
                    loop.call_soon(self._flush)
            else:
                self._worker = asyncio.create_task(self._work())
        return await future

    def _run_now(self, images: np.ndarray) -> tuple[np.ndarray, float, float]:
        """Idle model, small batch: compute in the caller, skipping queue, task and future (the light-load path).

        Nothing can interleave (no await), so the queue stays consistent."""
        start = time.perf_counter()
        probs = self._run(images)
        self._last_end = end = time.perf_counter()
        seconds = end - start
        self._observer.on_batch(images.shape[0], 1, seconds, 0.0, 0.0)
        return probs, 0.0, seconds

    def _flush(self) -> None:
        """Run what queued up during one event-loop turn, on the loop (small) or via the worker task (large)."""
        self._flush_scheduled = False
        while self._queue and self._worker is None:
            if self._queued_images > self._inline_max:
                self._worker = asyncio.create_task(self._work())
                return
            batch = self._take()
            if batch:
                self._finish(batch, *self._run_inline(batch))

    def _run_inline(self, batch: list[_Pending]) -> tuple:
        start = time.perf_counter()
        images = batch[0].images if len(batch) == 1 else np.concatenate([p.images for p in batch])
        joined = time.perf_counter()
        try:
            return images, self._run(images), start, joined
        except Exception as exc:
            return images, exc, start, joined

    async def drain(self) -> None:
        """Wait until everything queued has been answered."""
        while self._worker is not None:
            await asyncio.shield(self._worker)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._queue:
                if self._max_delay and self._queued_images < self._max_batch:
                    await self._wait_for_more()
                batch = self._take()
                if batch:
                    await self._execute(loop, batch)
        finally:
            self._worker = None

    async def _wait_for_more(self) -> None:
        remaining = self._queue[0].enqueued + self._max_delay - time.perf_counter()
        if remaining > 0:
            self._full.clear()
            try:
                await asyncio.wait_for(self._full.wait(), remaining)
            except TimeoutError:
                pass

    def _take(self) -> list[_Pending]:
        """Pop up to max_batch_size images' worth of live requests; expired ones are answered here."""
        batch: list[_Pending] = []
        images = 0
        now = time.monotonic()
        queue = self._queue
        while queue:
            item = queue[0]
            n = item.images.shape[0]
            if batch and (images + n > self._max_batch or item.images.dtype != batch[0].images.dtype):
                break  # full, or UINT8 after FP32 (or the reverse): one run takes one dtype; FIFO order kept
            queue.popleft()
            self._queued_images -= n
            if item.deadline is not None and now > item.deadline:
                self._observer.on_shed("deadline")
                # Usually the caller is gone already: gRPC cancels the handler when its deadline passes.
                if not item.future.done():
                    item.future.set_exception(DeadlineExceeded("deadline passed while the request was queued"))
                continue
            if item.future.done():  # the caller went away (cancelled)
                continue
            batch.append(item)
            images += n
        self._observer.on_queue_depth(self._queued_images)
        return batch

    async def _execute(self, loop: asyncio.AbstractEventLoop, batch: list[_Pending]) -> None:
        start = time.perf_counter()
        images = batch[0].images if len(batch) == 1 else np.concatenate([p.images for p in batch])
        joined = time.perf_counter()
        try:
            if images.shape[0] <= self._inline_max:
                # NOTE: a thread hand-off costs ~100 us, several times what a small batch of this MLP takes
                # to compute; small batches run right here and hold the event loop for tens of microseconds.
                probs = self._run(images)
            else:
                probs = await loop.run_in_executor(self._executor, self._run, images)
        except Exception as exc:
            probs = exc
        self._finish(batch, images, probs, start, joined)

    def _finish(self, batch: list[_Pending], images: np.ndarray, probs, start: float, joined: float) -> None:
        """Hand each request its slice of the run's output (or its failure)."""
        if isinstance(probs, Exception):
            if len(batch) > 1:
                # NOTE: isolate the failure: rerun each request alone (on the loop) so only the culprit fails.
                log.warning("batch of %d requests failed (%s); retrying them one by one", len(batch), probs)
                for item in batch:
                    self._finish([item], *self._run_inline([item]))
            elif not batch[0].future.done():
                batch[0].future.set_exception(probs)
            return
        self._last_end = ran = time.perf_counter()
        seconds = ran - joined
        offset = 0
        for item in batch:
            n = item.images.shape[0]
            if not item.future.done():
                item.future.set_result((probs[offset : offset + n], start - item.enqueued, seconds))
            offset += n
        self._observer.on_batch(images.shape[0], len(batch), seconds, joined - start, time.perf_counter() - ran)
