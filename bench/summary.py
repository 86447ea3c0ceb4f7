"""From interleaved rounds to figures: each step's median and range over the rounds, each ratio's median and range
over the per-round ratios, and the goals judged on those medians."""

from __future__ import annotations

import statistics
from collections import Counter

from bench import perf_analyzer as pa
from bench.rounds import NOISY_OTHER_CPU_PCT, Rounds

FIGURES = ("req_per_s", "img_per_s", "server_cpu_us_per_req", "server_cpu_pct", "client_cpu_pct",
           "server_mean_batch_images", "infer_per_s", "p99_us", "avg_us")  # fmt: skip
LATENCIES = ("p50", "p90", "p99", "max")


def spread(values: list[float]) -> dict | None:
    """Median, min and max (None for no values)."""
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def step_row(results: list[dict]) -> dict:
    """One step over the rounds: every figure as its median (and `range`: min and max), errors and answers summed,
    the lowest accuracy, the most disturbed round's other-CPU."""
    keep = ("label", "step", "tool", "server", "batch", "dtype", "intra_op_threads", "provider")
    row = {k: results[0][k] for k in keep if k in results[0]}
    row["range"] = {}
    for fig in FIGURES:
        s = spread([r.get(fig) for r in results])
        if s is not None:
            row[fig], row["range"][fig] = s["median"], [s["min"], s["max"]]
    if "latency_ms" in results[0]:
        qs = [q for q in LATENCIES if all(q in r["latency_ms"] for r in results)]
        row["latency_ms"] = {q: statistics.median(r["latency_ms"][q] for r in results) for q in qs}
        row["range"]["p99_ms"] = [
            min(r["latency_ms"]["p99"] for r in results),
            max(r["latency_ms"]["p99"] for r in results),
        ]
    if "ok" in results[0]:
        row["ok"] = sum(r["ok"] for r in results)
        row["errors"] = dict(sum((Counter(r["errors"]) for r in results), Counter()))
        accuracy = [r["accuracy"] for r in results if r.get("accuracy") is not None]
        row["accuracy"] = min(accuracy) if accuracy else None
    if "rc" in results[0]:
        row["rc"] = max((r["rc"] for r in results), key=abs)
    row["other_cpu_pct"] = max((r.get("other_cpu_pct") or 0) for r in results)
    row["rounds"] = results
    return row


def rows(by_label: dict[str, list[dict]]) -> list[dict]:
    return [step_row(results) for results in by_label.values()]


def per_round_ratio(a: list[dict] | None, b: list[dict] | None, key) -> dict | None:
    """The ratio a/b of `key(result)` round by round (the same minutes), as median and range."""
    if not a or not b:
        return None
    return spread([key(x) / key(y) for x, y in zip(a, b, strict=False) if key(x) and key(y)])


def find(by_label: dict[str, list[dict]] | None, c: int, batch: int = 1, dtype: str = "FP32", stream: bool = False):
    """The rounds of the closed-loop step with these parameters (None when it was not measured)."""
    for results in (by_label or {}).values():
        st = results[0]["step"]
        if (st.get("mode") == "closed" and st["concurrency"] == c and st["batch"] == batch and st["dtype"] == dtype
                and st.get("stream", False) == stream):  # fmt: skip
            return results
    return None


def find_pa(by_label: dict[str, list[dict]] | None, c: int, batch: int = 1, streaming: bool = False):
    label = pa.PaStep(c, batch, streaming).label()
    return (by_label or {}).get(label)


def find_inprocess(by_label: dict[str, list[dict]] | None, batch: int, dtype: str):
    """The in-process rounds at `batch`/`dtype`, the faster thread setting's (the server's or onnxruntime's)."""
    same = [rs for rs in (by_label or {}).values() if rs[0]["batch"] == batch and rs[0]["dtype"] == dtype]
    return max(same, key=lambda rs: statistics.median(r["img_per_s"] for r in rs), default=None)


CPU = lambda r: r.get("server_cpu_us_per_req")  # noqa: E731
RPS = lambda r: r.get("req_per_s")  # noqa: E731
P99 = lambda r: r["latency_ms"]["p99"]  # noqa: E731
IMG = lambda r: r.get("img_per_s")  # noqa: E731
INFER = lambda r: r.get("infer_per_s")  # noqa: E731


def goal(text: str, ratio: dict | None, target: float, higher: bool, sources: list | None = None) -> dict:
    """One goal, judged on the median of the per-round ratios; NOISY when a round it rests on was disturbed."""
    value = None if ratio is None else round(ratio["median"], 3)
    met = None if value is None else (value >= target if higher else value <= target)
    other = max((r.get("other_cpu_pct") or 0 for rs in sources or [] for r in rs or []), default=0)
    rng = [round(ratio["min"], 3), round(ratio["max"], 3)] if ratio and "min" in ratio else None
    return {"goal": text, "value": value, "range": rng,
            "target": target, "met": met, "other_cpu_pct": other, "noisy": other > NOISY_OTHER_CPU_PCT}  # fmt: skip


REFERENCES = ("nocompute", "nocompute-tuned", "triton", "mlserver", "kserve")


def best_real(rounds: Rounds, c: int) -> str:
    """The real-server configuration with the best median batch-1 req/s at concurrency `c`."""
    reals = [n for n in rounds.steps if n.startswith("real")]
    return max(reals, key=lambda n: statistics.median(RPS(r) or 0 for r in (find(rounds.steps[n], c) or [{}])))


def ratio_rows(rounds: Rounds, concurrency: list[int]) -> list[dict]:
    """Every real configuration against every reference and peer, per concurrency: per-round ratios."""
    out = []
    for name in (n for n in rounds.steps if n.startswith("real")):
        for ref in (r for r in REFERENCES if r in rounds.steps):
            for c in concurrency:
                mine, theirs = find(rounds.steps[name], c), find(rounds.steps[ref], c)
                if mine and theirs:
                    out.append({
                        "server": name, "reference": ref, "concurrency": c,
                        "req_s": per_round_ratio(mine, theirs, RPS), "cpu": per_round_ratio(mine, theirs, CPU),
                        "p99": per_round_ratio(mine, theirs, P99),
                    })  # fmt: skip
    return out


def big_batch_rows(rounds: Rounds, args) -> list[dict]:
    """Real servers' big-batch img/s against in-process onnxruntime: the same dtype, and FP32 (the goals')."""
    inproc = rounds.steps.get("inprocess")
    fp32 = find_inprocess(inproc, args.big_batch, "FP32")
    out = []
    for name in (n for n in rounds.steps if n.startswith("real")):
        for dtype in ("UINT8", "FP32"):
            mine = find(rounds.steps[name], args.big_batch_concurrency, args.big_batch, dtype)
            same = find_inprocess(inproc, args.big_batch, dtype)
            if mine and same:
                out.append({
                    "server": name, "dtype": dtype, "batch": args.big_batch,
                    "vs_same_dtype": per_round_ratio(mine, same, IMG), "vs_fp32": per_round_ratio(mine, fp32, IMG),
                    "sources": [mine, fp32],
                })  # fmt: skip
    return out


def goals(rounds: Rounds, real: str, args) -> list[dict]:
    """The request path's goals, each on the median of its per-round ratios."""
    s, c = rounds.steps, 32 if 32 in args.concurrency else max(args.concurrency)
    real_c, nc_c, tri_c = find(s.get(real), c), find(s.get("nocompute"), c), find(s.get("triton"), c)
    real1, nc1 = find(s.get(real), 1), find(s.get("nocompute"), 1)
    out = [
        goal(f"unary c={c}: server CPU per request <= 0.75x Triton's (ratio)",
             per_round_ratio(real_c, tri_c, CPU), 0.75, False, [real_c, tri_c]),
        goal(f"unary c={c}: server CPU per request <= 1.5x the stock no-compute server's (ratio)",
             per_round_ratio(real_c, nc_c, CPU), 1.5, False, [real_c, nc_c]),
        goal(f"unary c={c}: req/s >= 1.25x Triton's (ratio)", per_round_ratio(real_c, tri_c, RPS), 1.25, True,
             [real_c, tri_c]),
        goal(f"unary c={c}: req/s >= 0.65x the stock no-compute server's (ratio)",
             per_round_ratio(real_c, nc_c, RPS), 0.65, True, [real_c, nc_c]),
        goal("unary c=1: p99 <= 1.3x the no-compute server's (ratio)", per_round_ratio(real1, nc1, P99), 1.3, False,
             [real1, nc1]),
    ]  # fmt: skip
    targets = {"UINT8": 0.8, "FP32": 0.6}
    for b in (b for b in big_batch_rows(rounds, args) if b["server"] == real):
        out.append(goal(
            f"batch {b['batch']} {b['dtype']} c={args.big_batch_concurrency}: img/s >= {targets[b['dtype']]}x "
            f"in-process onnxruntime FP32 batch {b['batch']} (ratio)", b["vs_fp32"], targets[b["dtype"]], True,
            b["sources"],
        ))  # fmt: skip
    return out + perf_goals(rounds)


def perf_goals(rounds: Rounds) -> list[dict]:
    """perf_analyzer: streaming against the no-compute server's unary, and every run's exit code and counts."""
    streams = {n: find_pa(rounds.perf.get(n), 16, streaming=True) for n in rounds.perf if n.startswith("real")}
    streams = {n: rs for n, rs in streams.items() if rs}
    name = max(streams, key=lambda n: statistics.median(INFER(r) or 0 for r in streams[n]), default=None)
    nc16 = find_pa(rounds.perf.get("nocompute"), 16)
    runs = [(n, r) for n, by_label in rounds.perf.items() for rs in by_label.values() for r in rs]
    passing = [r["rc"] == 0 and counts_match(n, r, rounds) is not False for n, r in runs]
    compared = sum(counts_match(n, r, rounds) is not None for n, r in runs)
    share = {"median": sum(passing) / len(passing)} if passing else None
    return [
        goal(f"perf_analyzer --streaming c=16 ({name}): infer/s >= 1.2x the no-compute server's unary c=16 (ratio)",
             per_round_ratio(streams.get(name), nc16, INFER), 1.2, True),
        goal(f"perf_analyzer runs exit 0 and server counts match the client's (runs passing / runs; counts compared "
             f"on {compared}: single-worker servers only)", share, 1.0, True),
    ]  # fmt: skip


def counts_match(name: str, r: dict, rounds: Rounds) -> bool | None:
    """perf_analyzer's client count against the server's statistics (None where it cannot compare: the no-compute
    servers keep none, and with several workers each keeps its own)."""
    if name.startswith("nocompute") or rounds.workers.get(name, 1) > 1:
        return None
    if "server_requests" not in r:
        return False
    return abs(r["server_requests"] - r["client_requests"]) <= pa.PaStep(**r["step"]).count_tolerance()
