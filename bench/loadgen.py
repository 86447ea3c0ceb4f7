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
from serving.config import NUM_CLASSES

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


async def _run_async(target: str, step: Step, requests, labels, part: int, parts: int, start_at: float) -> dict:
    """Run this process's share of a step; returns raw samples (times in ns on this process's clock)."""
    import grpc

    share = _share(step, part, parts)
    if share == 0:
        return _empty()
    # Several connections: SO_REUSEPORT server workers each get some (the kernel spreads connections, not calls).
    n_channels = step.channels or min(share if step.mode == "closed" else MAX_CHANNELS, MAX_CHANNELS)
    if step.stream and not step.channels:
        n_channels = min(share, STREAMS_PER_PROCESS)  # several requests in flight on each stream
    # A private subchannel pool per channel: separate TCP connections (SO_REUSEPORT spreads them over workers).
    # Round robin: a target listing several servers (ipv4:a,b) spreads the calls; one server: no difference.
    options = [("grpc.use_local_subchannel_pool", 1), ("grpc.lb_policy_name", "round_robin")]
    channels = [grpc.aio.insecure_channel(target, options=options) for _ in range(n_channels)]
    calls = [ch.unary_unary(INFER_METHOD) for ch in channels]  # bytes in, bytes out: no client serialization
    try:
        await asyncio.wait_for(asyncio.gather(*(ch.channel_ready() for ch in channels)), step.timeout)
    except TimeoutError:
        await asyncio.gather(*(ch.close() for ch in channels))
        return {**_empty(), "errors": {"UNAVAILABLE": 1}, "connect_failed": True}

    n_req = len(requests)
    starts, lats, codes, kept = [], [], [], []
    clock = time.perf_counter_ns
    # Wait for the common wall-clock start so several client processes load the server together.
    await asyncio.sleep(max(0.0, start_at - time.time()))
    t0 = clock()
    warm_end = t0 + int(step.warmup * 1e9)
    end = warm_end + int(step.duration * 1e9)
    cpu_marks: dict[str, float] = {}

    async def cpu_sampler():
        await asyncio.sleep(step.warmup)
        cpu_marks["start"], cpu_marks["start_wall"] = time.process_time(), time.perf_counter()
        await asyncio.sleep(step.duration)
        cpu_marks["end"], cpu_marks["end_wall"] = time.process_time(), time.perf_counter()

    sampler = asyncio.create_task(cpu_sampler())
    lag_ns = 0

    async def one(idx: int, call, t_ref: int) -> None:
        try:
            resp = await call(requests[idx], timeout=step.timeout)
            code = "OK"
        except grpc.aio.AioRpcError as exc:
            resp, code = None, exc.code().name
        done = clock()
        starts.append(t_ref)
        lats.append(done - t_ref)
        codes.append(code)
        if resp is not None and len(kept) < ACCURACY_SAMPLE:
            kept.append((idx, resp))

    first = part * n_req // parts  # each client process starts on other images
    if step.stream:
        from serving.protos import grpc_service_pb2 as pb

        counter = [first]
        budget = [_share_requests(step.max_requests, part, parts) if step.max_requests else math.inf]
        call_timeout = step.warmup + step.duration + step.timeout + 5

        async def streamer(channel, slots: int) -> None:
            call = channel.stream_stream(STREAM_METHOD)(timeout=call_timeout)
            sent: dict[str, tuple[int, int]] = {}
            seq = 0

            async def send() -> None:
                nonlocal seq
                idx = counter[0] % n_req
                counter[0] += 1
                budget[0] -= 1
                seq += 1
                key = str(seq)
                sent[key] = (clock(), idx)
                # Serialized protobufs concatenate as a merge: this sets the request id without re-encoding.
                await call.write(requests[idx] + pb.ModelInferRequest(id=key).SerializeToString())

            try:
                for _ in range(slots):
                    if budget[0] > 0 and clock() < end:
                        await send()
                while sent:
                    raw = await call.read()
                    if raw is grpc.aio.EOF:
                        break
                    done = clock()
                    resp = pb.ModelStreamInferResponse.FromString(raw)
                    t_ref, idx = sent.pop(resp.infer_response.id)
                    starts.append(t_ref)
                    lats.append(done - t_ref)
                    codes.append(resp.error_message.split(":", 1)[0] if resp.error_message else "OK")
                    if not resp.error_message and len(kept) < ACCURACY_SAMPLE:
                        kept.append((idx, resp.infer_response))
                    if budget[0] > 0 and done < end:
                        await send()
                await call.done_writing()
            except grpc.aio.AioRpcError as exc:
                code = exc.code().name
            else:
                code = "UNAVAILABLE"  # the server ended the stream with requests unanswered
            for t_ref, _ in sent.values():
                starts.append(t_ref)
                lats.append(clock() - t_ref)
                codes.append(code)

        if step.window:  # streams of `window` in flight each, taking the connections in turn
            slots = [min(step.window, share - k) for k in range(0, share, step.window)]
        else:  # one stream per connection
            slots = [share // n_channels + (i < share % n_channels) for i in range(n_channels)]
        await asyncio.gather(*(streamer(channels[i % n_channels], k) for i, k in enumerate(slots) if k))
    elif step.mode == "closed":
        bounded = step.max_requests > 0
        budget = [_share_requests(step.max_requests, part, parts)]
        counter = [first]

        async def worker(w: int) -> None:
            call = calls[w % n_channels]
            while clock() < end and not (bounded and budget[0] <= 0):
                budget[0] -= 1
                idx = counter[0] % n_req
                counter[0] += 1
                await one(idx, call, clock())

        await asyncio.gather(*(worker(w) for w in range(share)))
    else:
        # Global schedule slot g is due at t0 + g/rate; this process sends slots part, part+parts, ...
        slots = int((step.warmup + step.duration) * step.rate)
        if step.max_requests:
            slots = min(slots, step.max_requests)
        sem = asyncio.Semaphore(step.max_outstanding)
        tasks = []

        async def limited(idx: int, call, t_sched: int) -> None:
            async with sem:  # waiting for a slot is part of the latency: it is measured from the schedule
                await one(idx, call, t_sched)

        for i, g in enumerate(range(part, slots, parts)):
            t_sched = t0 + int(g * 1e9 / step.rate)
            delay = t_sched - clock()
            if delay > 0:
                await asyncio.sleep(delay / 1e9)
            lag_ns = max(lag_ns, clock() - t_sched)
            tasks.append(asyncio.create_task(limited((first + i) % n_req, calls[i % n_channels], t_sched)))
        await asyncio.gather(*tasks)

    finished = clock()
    if not sampler.done():
        cpu_marks["end"], cpu_marks["end_wall"] = time.process_time(), time.perf_counter()
        sampler.cancel()
        cpu_marks.setdefault("start", cpu_marks["end"])
        cpu_marks.setdefault("start_wall", cpu_marks["end_wall"])
    await asyncio.gather(*(ch.close() for ch in channels))

    correct = answered = 0
    for idx, resp in kept:
        correct += correct_answers(resp, labels[idx]) if isinstance(resp, bytes) else _correct(resp, labels[idx])
        answered += len(labels[idx])
    return {
        "starts": np.array(starts, dtype=np.int64) - t0,
        "lats": np.array(lats, dtype=np.int64),
        "codes": codes,
        "warm_end": warm_end - t0,
        "end": end - t0,
        "finished": finished - t0,
        "cpu_s": cpu_marks["end"] - cpu_marks["start"],
        "cpu_wall_s": cpu_marks["end_wall"] - cpu_marks["start_wall"],
        "correct": correct,
        "answered": answered,
        "max_lag_ns": lag_ns,
    }


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

    def pct(q: float) -> float | None:
        return round(float(np.percentile(lat, q)), 4) if lat.size else None

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
        "latency_ms": {
            "p50": pct(50),
            "p90": pct(90),
            "p99": pct(99),
            "max": round(float(lat.max()), 4) if lat.size else None,
            "mean": round(float(lat.mean()), 4) if lat.size else None,
        },  # fmt: skip
        "accuracy": round(sum(p["correct"] for p in parts) / answered, 5) if answered else None,
        "answered_images": answered,
        "client_procs": client_procs,
        "client_cpu_pct": round(sum(cpu), 1),
        "client_cpu_pct_per_proc": [round(c, 1) for c in cpu],
    }
    if step.mode == "open":
        result["max_send_lag_ms"] = round(max(p["max_lag_ns"] for p in parts) / 1e6, 3)
    return result


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
