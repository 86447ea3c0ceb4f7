"""Load generator: closed-loop concurrency sweeps and open-loop constant rate against a V2 gRPC server."""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import multiprocessing
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from bench.common import INFER_METHOD, MODEL_NAME, STREAM_METHOD, NonLoopbackTarget, check_target, load_test_set
from serving.contract import NUM_CLASSES

# Responses kept per client process for the accuracy check (decoded after the step, off the clock).
ACCURACY_SAMPLE = 50_000
DTYPES = ("FP32", "UINT8")
MAX_CHANNELS = 8
STREAMS_PER_PROCESS = 2  # streaming steps: connections (one stream each) per client process


@dataclass(frozen=True)
class Step:
    """One measurement: closed loop at `concurrency`, or open loop at `rate` requests/s."""

    mode: str = "closed"  # "closed" or "open"
    concurrency: int = 1
    rate: float = 0.0
    batch: int = 1
    dtype: str = "FP32"
    duration: float = 3.0
    warmup: float = 0.5
    max_requests: int = 0  # 0: bounded by time only
    timeout: float = 10.0
    channels: int = 0  # connections per client process; 0: min(concurrency, 8) (open loop: 8; streams: 2)
    max_outstanding: int = 1024  # open loop: in-flight cap per client process (later requests wait, on the clock)
    model: str = MODEL_NAME
    stream: bool = False  # closed loop over ModelStreamInfer: one stream per connection, `concurrency` in flight
    window: int = 0  # streams: requests in flight per stream (0: one stream per connection, the in-flight spread)

    def __post_init__(self) -> None:
        if self.mode not in ("closed", "open"):
            raise ValueError(f"mode must be closed or open, got {self.mode}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype}")
        if self.mode == "closed" and not 1 <= self.concurrency <= 1024:
            raise ValueError(f"concurrency must be 1..1024, got {self.concurrency}")
        if self.mode == "open" and self.rate <= 0:
            raise ValueError("open loop needs a rate > 0")
        if self.stream and self.mode != "closed":
            raise ValueError("streaming steps are closed loop")
        if self.window < 0 or (self.window and not self.stream):
            raise ValueError("window (in flight per stream) is for streaming steps, >= 0")
        if self.batch < 1 or self.duration <= 0 or self.warmup < 0 or self.max_requests < 0:
            raise ValueError("batch >= 1, duration > 0, warmup >= 0, max_requests >= 0")

    def label(self) -> str:
        load = f"c={self.concurrency}" if self.mode == "closed" else f"rate={self.rate:g}/s"
        window = f" window={self.window}" if self.window else ""
        return f"{'stream' if self.stream else self.mode} {load}{window} batch={self.batch} {self.dtype}"


# ---------------------------------------------------------------- requests


def build_requests(
    images: np.ndarray, labels: np.ndarray, batch: int, dtype: str, model: str = MODEL_NAME
) -> tuple[list[bytes], list[np.ndarray]]:
    """Serialized ModelInferRequests over consecutive test images (each image once), and their labels."""
    from serving.protos import grpc_service_pb2 as pb

    n_req = max(1, len(images) // batch)
    if len(images) < batch:  # fewer images than one batch: repeat them
        reps = math.ceil(batch / len(images))
        images, labels = np.tile(images, (reps, 1))[:batch], np.tile(labels, reps)[:batch]
    outputs = [pb.ModelInferRequest.InferRequestedOutputTensor(name="probabilities")]
    tensor = pb.ModelInferRequest.InferInputTensor(name="input", datatype=dtype, shape=[batch, images.shape[1]])
    serialized, batch_labels = [], []
    for i in range(n_req):
        x = images[i * batch : (i + 1) * batch]
        raw = x.astype(np.uint8).tobytes() if dtype == "UINT8" else (x.astype("<f4") / np.float32(255.0)).tobytes()
        req = pb.ModelInferRequest(model_name=model, inputs=[tensor], outputs=outputs, raw_input_contents=[raw])
        serialized.append(req.SerializeToString())
        batch_labels.append(labels[i * batch : (i + 1) * batch].astype(np.int64))
    return serialized, batch_labels


def correct_answers(response: bytes, labels: np.ndarray) -> int:
    """How many images of one ModelInferResponse were answered with their label (argmax of probabilities)."""
    from serving.protos import grpc_service_pb2 as pb

    return _correct(pb.ModelInferResponse.FromString(response), labels)


def _correct(resp, labels: np.ndarray) -> int:
    for i, out in enumerate(resp.outputs):
        if out.name == "probabilities":
            if resp.raw_output_contents:
                probs = np.frombuffer(resp.raw_output_contents[i], dtype="<f4").reshape(-1, NUM_CLASSES)
            else:  # typed contents (MLServer, KServe)
                probs = np.array(out.contents.fp32_contents, dtype=np.float32).reshape(-1, NUM_CLASSES)
            return int((probs.argmax(axis=1) == labels).sum())
        if out.name == "predicted_class":
            pred = np.frombuffer(resp.raw_output_contents[i], dtype="<i8")
            return int((pred == labels).sum())
    raise ValueError("response has neither probabilities nor predicted_class")


# ---------------------------------------------------------------- one client process


class _Part:
    """One client process's share of a step: its connections, its samples (times in ns on this process's clock)
    and the three ways of sending (closed loop, open loop, streams)."""

    def __init__(self, target: str, step: Step, requests, labels, part: int, parts: int) -> None:
        self.target, self.step, self.requests, self.labels = target, step, requests, labels
        self.share = _share(step, part, parts)
        self.part, self.parts = part, parts
        self.starts: list[int] = []
        self.lats: list[int] = []
        self.codes: list[str] = []
        self.kept: list = []
        self.clock = time.perf_counter_ns
        self.next_image = part * len(requests) // parts  # each client process starts on other images
        self.budget = _share_requests(step.max_requests, part, parts) if step.max_requests else math.inf
        self.lag_ns = 0
        self.cpu_marks: dict[str, float] = {}

    async def connect(self) -> bool:
        """The connections, ready (False when they were not within the step's timeout)."""
        import grpc

        step = self.step
        # Several connections: SO_REUSEPORT server workers each get some (the kernel spreads connections, not calls).
        n = step.channels or min(self.share if step.mode == "closed" else MAX_CHANNELS, MAX_CHANNELS)
        if step.stream and not step.channels:
            n = min(self.share, STREAMS_PER_PROCESS)  # several requests in flight on each stream
        # A private subchannel pool per channel: separate TCP connections (SO_REUSEPORT spreads them over workers).
        # Round robin: a target listing several servers (ipv4:a,b) spreads the calls; one server: no difference.
        options = [("grpc.use_local_subchannel_pool", 1), ("grpc.lb_policy_name", "round_robin")]
        self.channels = [grpc.aio.insecure_channel(self.target, options=options) for _ in range(n)]
        self.calls = [ch.unary_unary(INFER_METHOD) for ch in self.channels]  # bytes in and out: no serialization
        try:
            await asyncio.wait_for(asyncio.gather(*(ch.channel_ready() for ch in self.channels)), step.timeout)
        except TimeoutError:
            await self.close()
            return False
        return True

    async def close(self) -> None:
        await asyncio.gather(*(ch.close() for ch in self.channels))

    def take(self) -> int:
        """The next request's index (every test image once before any repeats)."""
        idx = self.next_image % len(self.requests)
        self.next_image += 1
        self.budget -= 1
        return idx

    def record(self, t_ref: int, done: int, code: str, idx: int, resp) -> None:
        self.starts.append(t_ref)
        self.lats.append(done - t_ref)
        self.codes.append(code)
        if resp is not None and len(self.kept) < ACCURACY_SAMPLE:
            self.kept.append((idx, resp))

    async def one(self, idx: int, call, t_ref: int) -> None:
        import grpc

        try:
            resp = await call(self.requests[idx], timeout=self.step.timeout)
            code = "OK"
        except grpc.aio.AioRpcError as exc:
            resp, code = None, exc.code().name
        self.record(t_ref, self.clock(), code, idx, resp)

    async def run(self, start_at: float) -> dict:
        # Wait for the common wall-clock start so several client processes load the server together.
        await asyncio.sleep(max(0.0, start_at - time.time()))
        self.t0 = self.clock()
        self.warm_end = self.t0 + int(self.step.warmup * 1e9)
        self.end = self.warm_end + int(self.step.duration * 1e9)
        sampler = asyncio.create_task(self._sample_cpu())
        if self.step.stream:
            await self.streams()
        elif self.step.mode == "closed":
            await asyncio.gather(*(self.worker(w) for w in range(self.share)))
        else:
            await self.open_loop()
        finished = self.clock()
        if not sampler.done():
            self._mark("end")
            sampler.cancel()
            self.cpu_marks.setdefault("start", self.cpu_marks["end"])
            self.cpu_marks.setdefault("start_wall", self.cpu_marks["end_wall"])
        await self.close()
        return self.result(finished)

    def _mark(self, which: str) -> None:
        self.cpu_marks[which], self.cpu_marks[f"{which}_wall"] = time.process_time(), time.perf_counter()

    async def _sample_cpu(self) -> None:
        await asyncio.sleep(self.step.warmup)
        self._mark("start")
        await asyncio.sleep(self.step.duration)
        self._mark("end")

    async def worker(self, w: int) -> None:
        """Closed loop: the next request as soon as the last one returns."""
        call = self.calls[w % len(self.calls)]
        while self.clock() < self.end and self.budget > 0:
            await self.one(self.take(), call, self.clock())

    async def open_loop(self) -> None:
        """Global schedule slot g is due at t0 + g/rate; this process sends slots part, part+parts, ..."""
        step = self.step
        slots = int((step.warmup + step.duration) * step.rate)
        if step.max_requests:
            slots = min(slots, step.max_requests)
        sem = asyncio.Semaphore(step.max_outstanding)

        async def limited(idx: int, call, t_sched: int) -> None:
            async with sem:  # waiting for a slot is part of the latency: it is measured from the schedule
                await self.one(idx, call, t_sched)

        tasks = []
        for i, g in enumerate(range(self.part, slots, self.parts)):
            t_sched = self.t0 + int(g * 1e9 / step.rate)
            delay = t_sched - self.clock()
            if delay > 0:
                await asyncio.sleep(delay / 1e9)
            self.lag_ns = max(self.lag_ns, self.clock() - t_sched)
            idx = (self.next_image + i) % len(self.requests)
            tasks.append(asyncio.create_task(limited(idx, self.calls[i % len(self.calls)], t_sched)))
        await asyncio.gather(*tasks)

    async def streams(self) -> None:
        step, n = self.step, len(self.channels)
        if step.window:  # streams of `window` in flight each, taking the connections in turn
            slots = [min(step.window, self.share - k) for k in range(0, self.share, step.window)]
        else:  # one stream per connection
            slots = [self.share // n + (i < self.share % n) for i in range(n)]
        await asyncio.gather(*(_Stream(self, self.channels[i % n]).run(k) for i, k in enumerate(slots) if k))

    def result(self, finished: int) -> dict:
        correct = answered = 0
        for idx, resp in self.kept:
            labels = self.labels[idx]
            correct += correct_answers(resp, labels) if isinstance(resp, bytes) else _correct(resp, labels)
            answered += len(labels)
        t0, marks = self.t0, self.cpu_marks
        return {
            "starts": np.array(self.starts, dtype=np.int64) - t0, "lats": np.array(self.lats, dtype=np.int64),
            "codes": self.codes, "warm_end": self.warm_end - t0, "end": self.end - t0, "finished": finished - t0,
            "cpu_s": marks["end"] - marks["start"], "cpu_wall_s": marks["end_wall"] - marks["start_wall"],
            "correct": correct, "answered": answered, "max_lag_ns": self.lag_ns,
        }  # fmt: skip


class _Stream:
    """One ModelStreamInfer stream of a part: `slots` requests in flight, matched to their answers by id."""

    def __init__(self, part: _Part, channel) -> None:
        step = part.step
        self.part, self.sent, self.seq = part, {}, 0
        self.call = channel.stream_stream(STREAM_METHOD)(timeout=step.warmup + step.duration + step.timeout + 5)

    async def send(self) -> None:
        from serving.protos import grpc_service_pb2 as pb

        idx = self.part.take()
        self.seq += 1
        key = str(self.seq)
        self.sent[key] = (self.part.clock(), idx)
        # Serialized protobufs concatenate as a merge: this sets the request id without re-encoding.
        await self.call.write(self.part.requests[idx] + pb.ModelInferRequest(id=key).SerializeToString())

    def more(self, now: int) -> bool:
        return self.part.budget > 0 and now < self.part.end

    async def run(self, slots: int) -> None:
        import grpc

        part = self.part
        try:
            for _ in range(slots):
                if self.more(part.clock()):
                    await self.send()
            while self.sent:
                if not await self.receive():
                    break
            await self.call.done_writing()
        except grpc.aio.AioRpcError as exc:
            code = exc.code().name
        else:
            code = "UNAVAILABLE"  # the server ended the stream with requests unanswered
        for t_ref, idx in self.sent.values():
            part.record(t_ref, part.clock(), code, idx, None)

    async def receive(self) -> bool:
        """One answer (and the next request sent in its place); False when the server ended the stream."""
        import grpc

        from serving.protos import grpc_service_pb2 as pb

        raw = await self.call.read()
        if raw is grpc.aio.EOF:
            return False
        done = self.part.clock()
        resp = pb.ModelStreamInferResponse.FromString(raw)
        t_ref, idx = self.sent.pop(resp.infer_response.id)
        error = resp.error_message
        self.part.record(
            t_ref, done, error.split(":", 1)[0] if error else "OK", idx, None if error else resp.infer_response
        )
        if self.more(done):
            await self.send()
        return True


async def _run_async(target: str, step: Step, requests, labels, part: int, parts: int, start_at: float) -> dict:
    """Run this process's share of a step; returns raw samples (times in ns on this process's clock)."""
    me = _Part(target, step, requests, labels, part, parts)
    if me.share == 0:
        return _empty()
    if not await me.connect():
        return {**_empty(), "errors": {"UNAVAILABLE": 1}, "connect_failed": True}
    return await me.run(start_at)


def _share(step: Step, part: int, parts: int) -> int:
    """Concurrency (closed) or 1/0 (open: has schedule slots) for client process `part`."""
    if step.mode == "closed":
        return step.concurrency // parts + (part < step.concurrency % parts)
    return 1


def _share_requests(total: int, part: int, parts: int) -> int:
    return total // parts + (part < total % parts) if total else 0


def _empty() -> dict:
    z = np.zeros(0, dtype=np.int64)
    return {"starts": z, "lats": z, "codes": [], "warm_end": 0, "end": 0, "finished": 0, "cpu_s": 0.0,
            "cpu_wall_s": 0.0, "correct": 0, "answered": 0, "max_lag_ns": 0}  # fmt: skip


def run_part(target: str, step: Step, requests, labels, part: int = 0, parts: int = 1, start_at: float = 0.0) -> dict:
    return asyncio.run(_run_async(target, step, requests, labels, part, parts, start_at))


# ---------------------------------------------------------------- merging and reporting


def summarize(step: Step, parts: list[dict], client_procs: int) -> dict:
    """Merge the client processes' samples into one result (exact percentiles over all samples)."""
    codes = Counter(c for p in parts for c in p["codes"])
    for p in parts:
        codes.update(p.get("errors", {}))  # e.g. a client that could not connect at all
    ok_total = codes.pop("OK", 0)
    lat_ms, done_in_window, windows = [], 0, []
    for p in parts:
        if not len(p["lats"]):
            continue
        ok = np.array([c == "OK" for c in p["codes"]], dtype=bool)
        done = p["starts"] + p["lats"]
        measured = p["starts"] >= p["warm_end"]
        if not measured.any():  # a request-bounded step that ended inside the warm-up: use everything
            measured[:] = True
            lo, hi = 0, int(done.max())
        else:
            lo, hi = p["warm_end"], min(p["end"], int(done.max()))
        lat_ms.append(p["lats"][measured & ok] / 1e6)
        done_in_window += int((ok & (done >= lo) & (done <= hi)).sum())
        windows.append((hi - lo) / 1e9)
    lat = np.concatenate(lat_ms) if lat_ms else np.zeros(0)
    window = max(windows) if windows else 0.0
    req_s = done_in_window / window if window > 0 else 0.0
    answered = sum(p["answered"] for p in parts)
    cpu = [100.0 * p["cpu_s"] / p["cpu_wall_s"] if p["cpu_wall_s"] > 0 else 0.0 for p in parts]
    result = {
        "step": asdict(step),
        "label": step.label(),
        "requests": ok_total + sum(codes.values()),
        "ok": ok_total,
        "errors": dict(codes),
        "measured": int(lat.size),
        "window_s": round(window, 3),
        "req_per_s": round(req_s, 1),
        "img_per_s": round(req_s * step.batch, 1),
        "latency_ms": latency_summary(lat),
        "accuracy": round(sum(p["correct"] for p in parts) / answered, 5) if answered else None,
        "answered_images": answered,
        "client_procs": client_procs,
        "client_cpu_pct": round(sum(cpu), 1),
        "client_cpu_pct_per_proc": [round(c, 1) for c in cpu],
    }
    if step.mode == "open":
        result["max_send_lag_ms"] = round(max(p["max_lag_ns"] for p in parts) / 1e6, 3)
    return result


def latency_summary(lat: np.ndarray) -> dict:
    """p50/p90/p99/max/mean of latencies in ms (None each when there are none)."""
    if not lat.size:
        return dict.fromkeys(("p50", "p90", "p99", "max", "mean"))
    out = {f"p{q}": round(float(np.percentile(lat, q)), 4) for q in (50, 90, 99)}
    return {**out, "max": round(float(lat.max()), 4), "mean": round(float(lat.mean()), 4)}


def _cell(result: dict, key: str, spec: str) -> str:
    """An optional figure of a step result, formatted, or "-" where the server did not report it."""
    value = result.get(key)
    return "-" if value is None else format(value, spec)


def format_table(results: list[dict], title: str = "") -> str:
    """Fixed-width table of step results."""
    head = (
        f"{'step':<34}{'req/s':>9}{'img/s':>10}{'p50ms':>8}{'p90ms':>8}{'p99ms':>8}{'maxms':>8}"
        f"{'errors':>8}{'acc':>8}{'cliCPU%':>8}{'srvCPU%':>8}{'othCPU%':>8}{'srv us/req':>11}{'img/run':>8}"
    )
    lines = [title] if title else []
    lines += [head, "-" * len(head)]
    for r in results:
        lat = r["latency_ms"]
        ms = [f"{v:.2f}" if v is not None else "-" for v in (lat["p50"], lat["p90"], lat["p99"], lat["max"])]
        acc = f"{r['accuracy']:.4f}" if r["accuracy"] is not None else "-"
        srv, oth, per_req, per_run = (
            _cell(r, key, spec)
            for key, spec in (("server_cpu_pct", ".0f"), ("other_cpu_pct", ".0f"), ("server_cpu_us_per_req", ".0f"),
                              ("server_mean_batch_images", ".2f"))
        )  # fmt: skip
        lines.append(
            f"{r['label']:<34}{r['req_per_s']:>9.0f}{r['img_per_s']:>10.0f}"
            + "".join(f"{m:>8}" for m in ms)
            + f"{sum(r['errors'].values()):>8}{acc:>8}{r['client_cpu_pct']:>8.0f}{srv:>8}{oth:>8}{per_req:>11}"
            + f"{per_run:>8}"
        )
        if r["errors"]:
            lines.append(f"{'':<34}errors by code: {r['errors']}")
    return "\n".join(lines)


# ---------------------------------------------------------------- client processes


def _client_main(conn, data_path: str) -> None:
    """A persistent client process: ("prepare", step) builds requests, ("run", ...) runs its share."""
    with np.load(data_path) as data:
        images, labels = data["images"], data["labels"]
    cache: dict[tuple, tuple] = {}
    while True:
        msg = conn.recv()
        if msg is None:
            return
        try:
            if msg[0] == "prepare":
                step = msg[1]
                key = (step.batch, step.dtype, step.model)
                if key not in cache:
                    cache.clear()  # one request set at a time keeps memory bounded
                    cache[key] = build_requests(images, labels, step.batch, step.dtype, step.model)
                conn.send("ready")
            else:
                _, target, step, part, parts, start_at = msg
                conn.send(run_part(target, step, *cache[(step.batch, step.dtype, step.model)], part, parts, start_at))
        except Exception as exc:  # report, do not hang the parent
            conn.send({"exception": repr(exc)})


class LoadGenerator:
    """Runs steps from `client_procs` separate processes (1: in this process) and merges their samples."""

    def __init__(
        self, target: str, images: np.ndarray, labels: np.ndarray, client_procs: int = 1, allow_remote: bool = False
    ) -> None:
        self.target = check_target(target, allow_remote)
        self.images, self.labels = images, labels
        self.client_procs = max(1, client_procs)
        self._procs: list = []
        self._cache: dict[tuple, tuple] = {}
        self._tmp: tempfile.TemporaryDirectory | None = None

    def start(self) -> LoadGenerator:
        if self.client_procs > 1 and not self._procs:
            # The images go through a file, not the spawn pipe: a child that dies while starting cannot block us.
            self._tmp = tempfile.TemporaryDirectory(prefix="bench-loadgen-")
            data_path = str(Path(self._tmp.name) / "test_set.npz")
            np.savez(data_path, images=self.images, labels=self.labels)
            ctx = multiprocessing.get_context("spawn")
            for _ in range(self.client_procs):
                parent, child = ctx.Pipe()
                proc = ctx.Process(target=_client_main, args=(child, data_path), daemon=True)
                proc.start()
                child.close()  # only the child holds its end: sends fail instead of hanging if it dies
                self._procs.append((proc, parent))
        return self

    def close(self, wait: float = 5.0) -> None:
        """End the client processes: each finishes what it is doing within `wait` seconds, or is killed."""
        for _proc, conn in self._procs:
            try:
                conn.send(None)
            except (BrokenPipeError, OSError):
                pass
        for proc, _ in self._procs:
            proc.join(wait)
            if proc.is_alive():
                proc.kill()
                proc.join(1)
        self._procs = []
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> LoadGenerator:
        return self.start()

    def __exit__(self, exc_type, *_) -> None:
        self.close(wait=5.0 if exc_type is None else 0.0)  # interrupted mid-step: no waiting for the step

    def retarget(self, target: str, allow_remote: bool = False) -> None:
        self.target = check_target(target, allow_remote)

    def run(self, step: Step, on_window=None) -> dict:
        """Run one step and return its merged summary; on_window(t_start, t_end) gets the measured
        window in time.time() seconds before the load starts (to sample server CPU over the same window)."""
        if self.client_procs == 1:
            key = (step.batch, step.dtype, step.model)
            if key not in self._cache:
                self._cache.clear()
                self._cache[key] = build_requests(self.images, self.labels, step.batch, step.dtype, step.model)
            start_at = time.time() + 0.05
            if on_window:
                on_window(start_at + step.warmup, start_at + step.warmup + step.duration)
            parts = [run_part(self.target, step, *self._cache[key], 0, 1, start_at)]
        else:
            self.start()
            for _, conn in self._procs:
                conn.send(("prepare", step))
            self._collect(step, 120)
            start_at = time.time() + 0.25  # every process connects, then all start together
            if on_window:
                on_window(start_at + step.warmup, start_at + step.warmup + step.duration)
            for i, (_, conn) in enumerate(self._procs):
                conn.send(("run", self.target, step, i, self.client_procs, start_at))
            parts = self._collect(step, step.warmup + step.duration + step.timeout + 60)
        return summarize(step, parts, self.client_procs)

    def _collect(self, step: Step, timeout: float) -> list:
        deadline = time.monotonic() + timeout
        answers = []
        for proc, conn in self._procs:
            while not conn.poll(0.2):
                if not proc.is_alive() or time.monotonic() > deadline:
                    raise RuntimeError(f"client process {proc.pid} died or hung during {step.label()}")
            answer = conn.recv()
            if isinstance(answer, dict) and "exception" in answer:
                raise RuntimeError(f"client process failed during {step.label()}: {answer['exception']}")
            answers.append(answer)
        return answers


# ---------------------------------------------------------------- CLI


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def _args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.loadgen", description=__doc__)
    p.add_argument("--target", default="127.0.0.1:8001", help="server host:port (loopback only by default)")
    p.add_argument("--allow-remote", action="store_true", help="allow a non-loopback target")
    p.add_argument("--concurrency", default="1,8,32,64", help="closed-loop sweep, comma-separated (1..64)")
    p.add_argument("--rate", type=float, default=0.0, help="open loop at this many requests/s instead")
    p.add_argument("--batch", type=int, default=1, help="images per request")
    p.add_argument("--dtype", choices=DTYPES, default="FP32")
    p.add_argument("--duration", type=float, default=3.0, help="measured seconds per step")
    p.add_argument("--warmup", type=float, default=0.5, help="unmeasured seconds before each step")
    p.add_argument("--max-requests", type=int, default=0, help="stop a step after this many requests (0: no bound)")
    p.add_argument("--timeout", type=float, default=10.0, help="per-request deadline (s)")
    p.add_argument("--channels", type=int, default=0, help="connections per client process (0: min(c, 8))")
    p.add_argument("--max-outstanding", type=int, default=1024, help="open loop: in-flight cap per process")
    p.add_argument("--client-procs", type=int, default=1, help="client processes sharing the load")
    p.add_argument("--stream", action="store_true", help="closed loop over ModelStreamInfer (one stream/connection)")
    p.add_argument("--window", type=int, default=0, help="--stream: in flight per stream (0: one stream/connection)")
    p.add_argument("--model", default=MODEL_NAME)
    p.add_argument("--data-dir", default="data")
    p.add_argument("--json", type=Path, help="also write the results here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    try:
        check_target(args.target, args.allow_remote)
    except (NonLoopbackTarget, ValueError) as exc:
        print(f"refused: {exc}", file=sys.stderr)
        return 2
    common = dict(
        batch=args.batch, dtype=args.dtype, duration=args.duration, warmup=args.warmup,
        max_requests=args.max_requests, timeout=args.timeout, channels=args.channels,
        max_outstanding=args.max_outstanding, model=args.model, stream=args.stream, window=args.window,
    )  # fmt: skip
    if args.rate > 0:
        steps = [Step(mode="open", rate=args.rate, **common)]
    else:
        steps = [Step(mode="closed", concurrency=c, **common) for c in _ints(args.concurrency)]
    images, labels = load_test_set(args.data_dir)
    results = []
    with LoadGenerator(args.target, images, labels, args.client_procs, args.allow_remote) as gen:
        for step in steps:
            results.append(gen.run(step))
            print(f"done: {step.label()}: {results[-1]['req_per_s']:.0f} req/s", file=sys.stderr, flush=True)
    print(format_table(results, f"target {args.target}, {args.client_procs} client process(es)"))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
    return 1 if any(r["errors"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
