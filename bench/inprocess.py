"""In-process onnxruntime floor: the served model run directly (no gRPC), same batches and threads."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from bench.common import find_model, load_test_set
from training.data import to_model_input


def load_model(model_path: Path, device: str = "cpu", intra_op_threads: int = 0):
    """The server's own runtime wrapper (same session options) around model.onnx."""
    from serving.config import Settings
    from serving.runtime import OnnxModel

    return OnnxModel(model_path, Settings(device=device, intra_op_threads=intra_op_threads))


def _machine_busy() -> float:
    """Busy CPU seconds of the whole machine so far (all cores)."""
    import psutil

    t = psutil.cpu_times()
    return t.user + t.system + t.nice + getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0)


def _batches(images: np.ndarray, labels: np.ndarray, batch: int, dtype: str) -> tuple[list, np.ndarray]:
    """The model inputs of consecutive `batch`-image slices (UINT8 as they are, FP32 scaled), and the labels."""
    if len(images) < batch:
        reps = -(-batch // len(images))
        images, labels = np.tile(images, (reps, 1))[:batch], np.tile(labels, reps)[:batch]
    slices = [images[i * batch : (i + 1) * batch] for i in range(max(1, len(images) // batch))]
    return (slices if dtype == "UINT8" else [to_model_input(x) for x in slices]), labels


def _warm_up(run, seconds: float) -> None:
    end = time.perf_counter() + seconds
    i = 0
    while time.perf_counter() < end:
        run(i)
        i += 1


def measure(
    model, images: np.ndarray, labels: np.ndarray, batch: int, dtype: str, duration: float = 2.0,
    warmup: float = 0.3, max_runs: int = 0,
) -> dict:  # fmt: skip
    """Run batches back to back for `duration` seconds; UINT8 pixels go in as they are (the model scales them)."""
    inputs, labels = _batches(images, labels, batch, dtype)
    n_batches = len(inputs)

    def run(i: int) -> np.ndarray:
        return model.run(inputs[i % n_batches])

    _warm_up(run, warmup)
    lats, correct, answered = [], 0, 0
    machine0 = _machine_busy()
    cpu0, t0 = time.process_time(), time.perf_counter()
    end = t0 + duration
    i = 0
    while True:
        s = time.perf_counter()
        if s >= end or (max_runs and i >= max_runs):
            break
        probs = run(i)
        lats.append(time.perf_counter() - s)
        if i < n_batches:  # each image once
            correct += int((probs.argmax(axis=1) == labels[i * batch : (i + 1) * batch]).sum())
            answered += batch
        i += 1
    elapsed = time.perf_counter() - t0
    own = time.process_time() - cpu0
    other = _machine_busy() - machine0 - own
    lat = np.array(lats) * 1e3
    return {
        "batch": batch,
        "dtype": dtype,
        "runs": len(lats),
        "img_per_s": round(len(lats) * batch / elapsed, 1),
        "runs_per_s": round(len(lats) / elapsed, 1),
        "latency_ms": {
            "p50": round(float(np.percentile(lat, 50)), 4),
            "p99": round(float(np.percentile(lat, 99)), 4),
            "max": round(float(lat.max()), 4),
        },
        "accuracy": round(correct / answered, 5) if answered else None,
        "cpu_pct": round(100 * own / elapsed, 1),
        # CPU that other processes used meanwhile: a noisy neighbour makes this floor too low.
        "other_cpu_pct": round(max(0.0, 100 * other / elapsed), 1),
        "provider": model.provider,
    }


def format_table(results: list[dict], title: str = "") -> str:
    head = (
        f"{'batch':>6} {'dtype':<6}{'img/s':>11}{'runs/s':>9}{'p50ms':>9}{'p99ms':>9}{'acc':>8}{'CPU%':>6}"
        f"{'othCPU%':>8}{'threads':>8}  provider"
    )
    lines = ([title] if title else []) + [head, "-" * len(head)]
    for r in results:
        lat = r["latency_ms"]
        acc = f"{r['accuracy']:.4f}" if r["accuracy"] is not None else "-"
        lines.append(
            f"{r['batch']:>6} {r['dtype']:<6}{r['img_per_s']:>11.0f}{r['runs_per_s']:>9.0f}{lat['p50']:>9.3f}"
            f"{lat['p99']:>9.3f}{acc:>8}{r['cpu_pct']:>6.0f}{r.get('other_cpu_pct', 0):>8.0f}"
            f"{r.get('intra_op_threads') or 'default':>8}  {r['provider']}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.inprocess", description=__doc__)
    p.add_argument("--model-repository", default="model_repository")
    p.add_argument("--batch", default="1,256", help="comma-separated batch sizes")
    p.add_argument("--dtype", default="FP32,UINT8", help="FP32, UINT8 or both")
    p.add_argument("--duration", type=float, default=2.0)
    p.add_argument("--intra-op-threads", type=int, default=0, help="as the server's --intra-op-threads")
    p.add_argument("--device", choices=("cpu", "cuda", "auto"), default="cpu")
    p.add_argument("--data-dir", default="data")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    model = load_model(find_model(args.model_repository), args.device, args.intra_op_threads)
    images, labels = load_test_set(args.data_dir)
    results = [
        {**measure(model, images, labels, int(b), d, args.duration), "intra_op_threads": args.intra_op_threads}
        for b in args.batch.split(",")
        for d in args.dtype.split(",")
    ]
    print(format_table(results, f"in-process onnxruntime, intra_op_threads={args.intra_op_threads or 'default'}"))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
