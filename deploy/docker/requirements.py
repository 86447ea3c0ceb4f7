"""Print the pinned requirements of pyproject.toml extras, with onnxruntime or onnxruntime-gpu of the same version.

The one onnxruntime pin lives in pyproject.toml's `runtime` extra. `--device auto` (what `make` passes) picks
onnxruntime-gpu (with the CUDA/cuDNN wheels) when `nvidia-smi -L` lists a GPU, else onnxruntime; the two are
never installed together (both provide the `onnxruntime` module). Used by the Makefile and the Dockerfiles.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")
_EXTRAS = re.compile(r"\[([^\]]*)\]")
DISTRIBUTIONS = {"cpu": "onnxruntime", "cuda": "onnxruntime-gpu"}
# What `--device cuda` installs: the CUDA 13 runtime and cuDNN 9 come as pip wheels (loaded by
# onnxruntime.preload_dlls()), so the machine needs only the NVIDIA driver. The GPU image uses
# `--onnxruntime onnxruntime-gpu` instead: its base image already has CUDA and cuDNN.
DEVICE_REQUIREMENT = {"cpu": "onnxruntime", "cuda": "onnxruntime-gpu[cuda,cudnn]"}
# ... with those CUDA wheels pinned by pyproject.toml's `cuda` extra (onnxruntime-gpu's extras leave them open).
DEVICE_EXTRAS = {"cpu": [], "cuda": ["cuda"]}


def requirement_name(requirement: str) -> str:
    """The normalised distribution name of a requirement string (extras and version dropped)."""
    match = _NAME.match(requirement)
    if match is None:
        raise ValueError(f"not a requirement: {requirement!r}")
    return re.sub(r"[-_.]+", "-", match.group(1)).lower()


def gpu_listing() -> str:
    """What `nvidia-smi -L` prints ('' when there is no nvidia-smi or it fails: no usable NVIDIA GPU)."""
    if shutil.which("nvidia-smi") is None:
        return ""
    try:
        done = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return done.stdout if done.returncode == 0 else ""


def _cuda_host():
    """serving/cuda_host.py (standard library only), imported from the repository root: `make` runs this file
    before any package is installed. Imported only when a device is chosen (the Dockerfiles copy this file alone)."""
    root = str(Path(__file__).resolve().parents[2])
    if root not in sys.path:
        sys.path.insert(0, root)
    import serving.cuda_host

    return serving.cuda_host


def driver_problem() -> str | None:
    """Why this host's NVIDIA driver cannot run CUDA, or None."""
    return _cuda_host().driver_problem()


def choose_device(device: str, listing: str | None = None, problem=driver_problem) -> tuple[str, str]:
    """(cpu|cuda, why) for DEVICE=auto|cpu|cuda; auto is cuda when the `nvidia-smi -L` listing names a GPU and
    the driver can run CUDA (`problem()` is None), else cpu, saying why."""
    if device in DISTRIBUTIONS:
        return device, f"DEVICE={device}"
    if device != "auto":
        raise ValueError(f"DEVICE must be auto, cpu or cuda, got {device!r}")
    gpus = [line for line in (gpu_listing() if listing is None else listing).splitlines() if line.startswith("GPU ")]
    if not gpus:
        return "cpu", "DEVICE=auto: no NVIDIA GPU listed by nvidia-smi -L"
    listed = f"nvidia-smi lists {len(gpus)} GPU(s): {gpus[0].strip()}"
    why_not = problem()
    if why_not:
        return "cpu", f"DEVICE=auto: {listed}, but {_cuda_host().explain(why_not)}. Installing the CPU build"
    return "cuda", f"DEVICE=auto: {listed}"


def _expand(project: dict, extras: list[str], seen: set[str]) -> list[str]:
    """The requirements of `extras`, a self-reference like `mnist-serving[runtime]` replaced by that extra's."""
    optional = project.get("optional-dependencies", {})
    own = requirement_name(project["name"]) if "name" in project else None
    out: list[str] = []
    for extra in extras:
        if extra in seen:
            continue
        seen.add(extra)
        if extra not in optional:
            raise KeyError(f"pyproject.toml has no extra {extra!r} (has {sorted(optional)})")
        for requirement in optional[extra]:
            if requirement_name(requirement) == own:
                match = _EXTRAS.search(requirement)
                inner = [e.strip() for e in match.group(1).split(",")] if match else []
                out += _expand(project, inner, seen)
            else:
                out.append(requirement)
    return out


def requirements(pyproject: Path, extras: list[str], onnxruntime: str = "onnxruntime") -> list[str]:
    """The base dependencies plus `extras`, deduplicated, each pinned with `==`, ORT renamed if asked."""
    project = tomllib.loads(pyproject.read_text())["project"]
    wanted = list(project.get("dependencies", [])) + _expand(project, extras, set())
    out: dict[str, str] = {}
    for requirement in wanted:
        requirement = requirement.strip()
        if "==" not in requirement:
            raise ValueError(f"unpinned requirement in pyproject.toml: {requirement!r}")
        name = requirement_name(requirement)
        if name == "onnxruntime" and onnxruntime != "onnxruntime":
            # Same version, other distribution: the GPU build provides the same `onnxruntime` module.
            requirement = onnxruntime + requirement[requirement.index("==") :]
            name = requirement_name(requirement)
        if out.setdefault(name, requirement) != requirement:
            raise ValueError(f"conflicting pins for {name}: {out[name]!r} and {requirement!r}")
    return list(out.values())


def main(argv: list[str] | None = None) -> int:
    """CLI: requirements.py [--pyproject P] --extra serve [--onnxruntime onnxruntime-gpu | --device auto]."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pyproject", type=Path, default=Path("pyproject.toml"))
    parser.add_argument("--extra", action="append", default=[], help="Extra to include (repeatable).")
    which = parser.add_mutually_exclusive_group()
    which.add_argument(
        "--onnxruntime",
        choices=sorted(DISTRIBUTIONS.values()),
        help="Distribution that provides the onnxruntime module (default: onnxruntime).",
    )
    which.add_argument(
        "--device",
        choices=["auto", *DISTRIBUTIONS],
        help="Choose the distribution for this machine (auto: onnxruntime-gpu when nvidia-smi lists a GPU).",
    )
    parser.add_argument("--print-device", action="store_true", help="Print only the chosen device (cpu or cuda).")
    args = parser.parse_args(argv)
    onnxruntime = args.onnxruntime or "onnxruntime"
    if args.device:
        device, why = choose_device(args.device)
        if args.print_device and args.device == "cuda" and (why_not := driver_problem()):
            print(f"DEVICE=cuda: {_cuda_host().explain(why_not)}", file=sys.stderr)
            return 1
        onnxruntime = DEVICE_REQUIREMENT[device]
        args.extra += DEVICE_EXTRAS[device]
        print(f"onnxruntime distribution: {onnxruntime} ({why}; override with DEVICE=cpu|cuda)", file=sys.stderr)
        if args.print_device:
            print(device)
            return 0
    elif args.print_device:
        parser.error("--print-device needs --device")
    sys.stdout.write("".join(line + "\n" for line in requirements(args.pyproject, args.extra, onnxruntime)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
