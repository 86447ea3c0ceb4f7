"""`make bench`'s report: tables of medians and ranges over the rounds, the ratios, the goals, and the plot."""

from __future__ import annotations

from pathlib import Path


def _cell(value, rng, fmt: str) -> str:
    if value is None:
        return "-"
    return f"{value:{fmt}}" if not rng else f"{value:{fmt}} [{rng[0]:{fmt}}-{rng[1]:{fmt}}]"


def _spread(d: dict | None, fmt: str = ".2f") -> str:
    return "-" if not d else f"{d['median']:{fmt}} [{d['min']:{fmt}}-{d['max']:{fmt}}]"


def step_table(name: str, info: dict, rows: list[dict]) -> str:
    lines = [f"--- {name}: {' '.join(info.get('cmd', [])[1:]) or info.get('what', '')}",
             f"{'step':<34}{'req/s':>24}{'img/s':>12}{'CPU us/req':>20}{'p99 ms':>20}{'img/run':>9}"
             f"{'errors':>8}{'acc':>7}"]  # fmt: skip
    for r in rows:
        rng = r["range"]
        lines.append(
            f"{r['label']:<34}{_cell(r.get('req_per_s'), rng.get('req_per_s'), ',.0f'):>24}"
            f"{_cell(r.get('img_per_s'), None, ',.0f'):>12}"
            f"{_cell(r.get('server_cpu_us_per_req'), rng.get('server_cpu_us_per_req'), '.0f'):>20}"
            f"{_cell(r.get('latency_ms', {}).get('p99'), rng.get('p99_ms'), '.2f'):>20}"
            f"{_cell(r.get('server_mean_batch_images'), None, '.1f'):>9}{sum(r.get('errors', {}).values()):>8}"
            f"{_cell(r.get('accuracy'), None, '.3f'):>7}"
        )
    return "\n".join(lines)


def perf_table(name: str, rows: list[dict]) -> str:
    lines = [f"  perf_analyzer against {name}:", f"  {'step':<26}{'rc':>4}{'infer/s':>26}{'p99 ms':>10}"]
    for r in rows:
        p99 = "-" if r.get("p99_us") is None else f"{r['p99_us'] / 1e3:.2f}"
        infer = _cell(r.get("infer_per_s"), r["range"].get("infer_per_s"), ",.0f")
        lines.append(f"  {r['label']:<26}{r['rc']:>4}{infer:>26}{p99:>10}")
    return "\n".join(lines)


def ratio_table(report: dict) -> str:
    lines = ["--- ratios per round (median [min-max]): real server / reference, batch 1 FP32 closed loop",
             f"{'server':<10}{'reference':<17}{'c':>4}{'req/s':>20}{'CPU per request':>20}{'p99':>20}"]  # fmt: skip
    for r in report["ratios"]:
        lines.append(f"{r['server']:<10}{r['reference']:<17}{r['concurrency']:>4}{_spread(r['req_s']):>20}"
                     f"{_spread(r['cpu']):>20}{_spread(r['p99']):>20}")  # fmt: skip
    lines.append("--- big batches: real server img/s / in-process onnxruntime img/s (per round)")
    for b in report["big_batch"]:
        lines.append(f"{b['server']:<10} batch {b['batch']} {b['dtype']:<6} same dtype {_spread(b['vs_same_dtype'])}"
                     f"   vs FP32 {_spread(b['vs_fp32'])}")  # fmt: skip
    return "\n".join(lines)


def goal_lines(report: dict) -> str:
    lines = [f"--- goals (real server configuration: {report['best_real']}; median [range] of per-round ratios)"]
    for g in report["goals"]:
        state = "n/a" if g["met"] is None else ("MET" if g["met"] else "NOT MET")
        rng = f" [{g['range'][0]}-{g['range'][1]}]" if g.get("range") else ""
        noisy = f"  (NOISY: other processes used {g['other_cpu_pct']:.0f}% CPU meanwhile)" if g["noisy"] else ""
        lines.append(f"  [{state:>7}] {g['goal']}: {g['value']}{rng} (target {g['target']}){noisy}")
    if any(g["noisy"] for g in report["goals"]):
        lines.append("  Noisy figures were measured while other work competed for the CPUs: rerun on an idle machine.")
    return "\n".join(lines)


def print_report(report: dict) -> None:
    m = report["machine"]
    print(f"\n=== benchmark {report['timestamp']}: {m['nproc']} CPUs ({m['cpu_model']}), python {m['python']}, "
          f"grpcio {m['grpcio']}, onnxruntime {m['onnxruntime']}, load avg at start {m['loadavg_at_start']}; "
          f"{report['config']['rounds']} interleaved rounds, figures are medians [min-max] over them")  # fmt: skip
    for name, s in report["servers"].items():
        print("\n" + step_table(name, s, s["steps"]))
        if s.get("perf_analyzer"):
            print(perf_table(name, s["perf_analyzer"]))
    print(
        "\n" + step_table("in-process onnxruntime (no gRPC)", {"what": "the server's OnnxModel"}, report["inprocess"])
    )
    print("\n" + ratio_table(report))
    print("\n" + goal_lines(report))
    print(f"\nruntime {report['runtime_s']} s")


def plot(report: dict, path: Path) -> None:
    """Median throughput and p99 vs concurrency for every server (unary solid, streaming dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, s in report["servers"].items():
        for stream in (False, True):
            pts = sorted(
                (r["step"]["concurrency"], r["req_per_s"], r["latency_ms"]["p99"]) for r in s["steps"]
                if r["step"]["mode"] == "closed" and r["step"]["batch"] == 1 and r["step"].get("stream") == stream
            )  # fmt: skip
            if pts:
                cs, rps, p99 = zip(*pts, strict=True)
                style, label = ("--", f"{name} (stream)") if stream else ("-", name)
                ax1.plot(cs, rps, marker="o", ls=style, label=label)
                ax2.plot(cs, p99, marker="o", ls=style, label=label)
    for ax, ylabel in ((ax1, "requests/s (median of the rounds)"), (ax2, "p99 latency (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrency (closed loop, batch 1 FP32)")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    ax2.set_yscale("log")
    m = report["machine"]
    fig.suptitle(f"mnist serving benchmark {report['timestamp']} - {m['nproc']} CPUs {m['cpu_model']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
