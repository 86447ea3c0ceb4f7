"""Draw a trace: the request spans that one onnxruntime run served, with their phases, and the run itself.

    python scripts/trace_picture.py                      # start a traced server and a receiver, call, draw
    python scripts/trace_picture.py --spans spans.jsonl  # draw from spans a receiver wrote (bench.otlp_receiver)

The demo starts `python -m serving --max-queue-delay-us 2000` with tracing on (OTEL_TRACES_EXPORTER=otlp) against
bench.otlp_receiver, sends concurrent calls from tritonclient, each with its own W3C traceparent (as separate callers
would), keeps the exported spans (--keep) and draws the run that served the most traced calls (docs/trace.png). One
Python client process is slower than the server, so without the queue delay its calls seldom meet in one run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import otlp_receiver  # noqa: E402
from bench.common import load_test_set, start_serving  # noqa: E402

RUN = "onnxruntime run"
PHASES = [  # (from event, to event, label, colour)
    (None, "REQUEST_READ", "admission + read", "#bbbbbb"),
    ("REQUEST_READ", "QUEUE_START", "decode", "#8da0cb"),
    ("QUEUE_START", "COMPUTE_START", "queue", "#fc8d62"),
    ("COMPUTE_START", "COMPUTE_END", "run (shared)", "#66c2a5"),
    ("COMPUTE_END", "RESUMED", "waiting for the event loop", "#ffd92f"),
    ("RESUMED", "RESPONSE_ENCODED", "receipt, encode, record", "#e78ac3"),
    ("RESPONSE_ENCODED", None, "hand to gRPC", "#dddddd"),
]


async def _calls(url: str, images: np.ndarray, callers: int) -> None:
    import tritonclient.grpc.aio as tca

    async def one(client, i: int) -> None:
        x = images[i : i + 1].reshape(1, 784).astype(np.uint8)
        inp = tca.InferInput("input", [1, 784], "UINT8")
        inp.set_data_from_numpy(x)
        tp = f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-01"
        await client.infer("mnist", [inp], headers={"traceparent": tp}, request_id=f"caller-{i}")

    async with tca.InferenceServerClient(url) as client:
        for _ in range(5):  # a few bursts: the run with the most callers is drawn
            await asyncio.gather(*(one(client, i) for i in range(callers)))


def demo(repository: Path, data_dir: Path, keep: Path, callers: int, flags: list[str]) -> list[dict]:
    """Spans of `callers` concurrent traced calls to a real server (`flags`), exported to a receiver run here."""
    keep.unlink(missing_ok=True)
    receiver_server, receiver, port = otlp_receiver.start(out=keep)
    env = {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}"}
    server = start_serving(repository, keep.parent / "trace-demo-server.log", *flags, env=env)
    try:
        images, _ = load_test_set(data_dir)
        asyncio.run(_calls(server.target, images, callers))
    finally:
        server.stop()  # the drain flushes every span to the receiver
        receiver_server.stop(1)
    return receiver.spans


def busiest_run(spans: list[dict]) -> tuple[dict, list[dict]]:
    """The run span linked to the most request spans, and those request spans (by start)."""
    by_id = {s["span_id"]: s for s in spans}
    run = max((s for s in spans if s["name"] == RUN), key=lambda s: len(s["links"]))
    requests = [by_id[link["span_id"]] for link in run["links"] if link["span_id"] in by_id]
    return run, sorted(requests, key=lambda s: s["start_ns"])


def _phases(span: dict):
    """(start_ns, end_ns, label, colour) of each phase of a request span, from its events."""
    at = {e["name"]: e["time_ns"] for e in span["events"]}
    for start, end, label, colour in PHASES:
        t0 = span["start_ns"] if start is None else at.get(start)
        t1 = span["end_ns"] if end is None else at.get(end)
        if t0 is not None and t1 is not None and t1 >= t0:
            yield t0, t1, label, colour


def draw(run: dict, requests: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t0 = min(s["start_ns"] for s in requests + [run])
    us = lambda ns: (ns - t0) / 1e3  # noqa: E731
    fig, ax = plt.subplots(figsize=(12, 0.45 * (len(requests) + 2) + 1.2))
    labelled = set()
    for row, span in enumerate(requests):
        for a, b, label, colour in _phases(span):
            ax.barh(row, us(b) - us(a), left=us(a), color=colour, label=None if label in labelled else label)
            labelled.add(label)
    row = len(requests)
    ax.barh(row, us(run["end_ns"]) - us(run["start_ns"]), left=us(run["start_ns"]), color="#1b9e77", label=RUN)
    attrs = run["attributes"]
    names = [f"{s['attributes'].get('inference.request.id', '?')} (trace {s['trace_id'][:8]})" for s in requests]
    ax.set_yticks(range(row + 1), names + [f"run: {attrs['inference.run.images']} images, {attrs['thread.name']}"])
    ax.invert_yaxis()
    ax.set_xlabel("µs since the first span started")
    ax.set_title(
        f"One onnxruntime run served {attrs['inference.run.requests']} calls of {len(requests)} traced callers "
        f"(span links)", fontsize=10,
    )  # fmt: skip
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(True, axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--spans", type=Path, help="draw from this JSON-lines file instead of running the demo")
    p.add_argument("--keep", type=Path, default=ROOT / "build" / "trace-demo" / "spans.jsonl")
    p.add_argument("--model-repository", type=Path, default=ROOT / "model_repository")
    p.add_argument("--data-dir", type=Path, default=ROOT / "data")
    p.add_argument("--callers", type=int, default=12)
    p.add_argument(
        "--server-flags",
        default="--max-queue-delay-us 2000",
        help="the demo server's flags (default: a queue delay, so that one Python client's calls meet in a run)",
    )
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "trace.png")
    a = p.parse_args(argv)
    if a.spans:
        spans = [json.loads(line) for line in a.spans.read_text().splitlines() if line.strip()]
    else:
        a.keep.parent.mkdir(parents=True, exist_ok=True)
        spans = demo(a.model_repository.resolve(), a.data_dir, a.keep, a.callers, a.server_flags.split())
    run, requests = busiest_run(spans)
    draw(run, requests, a.out)
    print(f"{a.out}: run {run['span_id']} serving {len(requests)} traced calls ({len(spans)} spans)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
