"""`make` installs onnxruntime-gpu where nvidia-smi lists a GPU, onnxruntime elsewhere: one pin, never both."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "deploy" / "docker" / "requirements.py"
EVERYTHING = ["serve", "train", "dev"]  # what `make venv` installs

_spec = importlib.util.spec_from_file_location("requirements_script", SCRIPT)
reqs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(reqs)

H200 = "GPU 0: NVIDIA H200 (UUID: GPU-5e1f0c1a-0000-0000-0000-000000000000)\n"


@pytest.mark.parametrize(
    ("device", "listing", "expected"),
    [
        ("auto", H200, "cuda"),
        ("auto", H200 + H200.replace("GPU 0", "GPU 1"), "cuda"),
        ("auto", "", "cpu"),  # no nvidia-smi, or it failed
        ("auto", "No devices were found\n", "cpu"),
        ("cpu", H200, "cpu"),  # the override wins both ways
        ("cuda", "", "cuda"),
    ],
)
def test_device_choice(device, listing, expected):
    chosen, why = reqs.choose_device(device, listing, problem=lambda: None)  # a driver that can run CUDA 13
    assert chosen == expected and why.startswith(f"DEVICE={device}")


def test_auto_takes_the_cpu_build_when_the_listed_gpu_cannot_run_cuda():
    chosen, why = reqs.choose_device("auto", H200, problem=lambda: "the NVIDIA driver supports CUDA 12.4")
    assert chosen == "cpu" and "but CUDA cannot run here: the NVIDIA driver supports CUDA 12.4" in why
    assert "DEVICE=cpu" in why


def test_unknown_device_is_refused():
    with pytest.raises(ValueError, match="DEVICE must be auto, cpu or cuda"):
        reqs.choose_device("rocm", "")


def as_dict(requirements: list[str]) -> dict[str, str]:
    return {reqs.requirement_name(r): r.split("==")[1] for r in requirements}


def test_each_device_gets_exactly_one_onnxruntime_of_the_one_pinned_version():
    text = (REPO / "pyproject.toml").read_text()
    assert len(re.findall(r'"onnxruntime(-gpu)?==', text)) == 1, "onnxruntime must be pinned in one place"
    cpu = as_dict(reqs.requirements(REPO / "pyproject.toml", EVERYTHING, "onnxruntime"))
    gpu = as_dict(reqs.requirements(REPO / "pyproject.toml", EVERYTHING, "onnxruntime-gpu"))
    assert "onnxruntime-gpu" not in cpu and "onnxruntime" not in gpu
    version = cpu.pop("onnxruntime")
    assert gpu.pop("onnxruntime-gpu") == version
    assert gpu == cpu  # nothing else differs
    make_gpu = reqs.requirements(REPO / "pyproject.toml", EVERYTHING, reqs.DEVICE_REQUIREMENT["cuda"])
    assert [r for r in make_gpu if r.startswith("onnxruntime")] == [f"onnxruntime-gpu[cuda,cudnn]=={version}"]
    for extra in ("serve", "train"):  # both reach the pin through the `runtime` extra
        assert "onnxruntime" in as_dict(reqs.requirements(REPO / "pyproject.toml", [extra]))


def test_no_other_pinned_package_requires_a_distribution_named_onnxruntime():
    """onnxruntime-gpu provides the module but not the pip name: a dependant would make `pip check` fail on GPU."""
    checked = []
    for requirement in reqs.requirements(REPO / "pyproject.toml", EVERYTHING):
        name = reqs.requirement_name(requirement)
        if name == "onnxruntime":
            continue
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        for dependency in dist.requires or []:
            if "extra ==" in dependency:
                continue
            assert reqs.requirement_name(dependency) not in {"onnxruntime", "onnxruntime-gpu"}, (
                f"{name} requires {dependency!r}: the GPU environment would fail pip check"
            )
        checked.append(name)
    assert "tf2onnx" in checked and "tritonclient" in checked and len(checked) > 20


def test_cli_prints_the_choice_and_the_gpu_set():
    done = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--pyproject",
            str(REPO / "pyproject.toml"),
            "--extra",
            "serve",
            "--device",
            "cuda",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    # With the CUDA 13 runtime and cuDNN as pip wheels: no system CUDA needed, only the driver.
    assert "onnxruntime-gpu[cuda,cudnn]==" in done.stdout and "onnxruntime==" not in done.stdout
    assert "nvidia-cublas==" in done.stdout and "nvidia-cuda-runtime==13.0." in done.stdout
    assert "onnxruntime distribution: onnxruntime-gpu[cuda,cudnn] (DEVICE=cuda" in done.stderr


@pytest.mark.skipif(shutil.which("make") is None, reason="no make")
def test_makefile_records_the_choice_and_reinstalls_only_when_it_changes(tmp_path, fake_driver):
    venv = tmp_path / "venv"
    choice = venv / ".device"
    # DEVICE=cuda checks the driver before anything is installed: a libcuda.so.1 that reports CUDA 13.0.
    env = {**os.environ, "LD_LIBRARY_PATH": fake_driver(13000)}

    def make(*args: str) -> str:
        done = subprocess.run(
            ["make", "--no-print-directory", f"VENV={venv}", *args], cwd=REPO, capture_output=True, text=True, env=env
        )
        assert done.returncode == 0, done.stderr
        return done.stdout + done.stderr

    out = make(str(choice), "DEVICE=cuda")
    assert choice.read_text() == "cuda\n" and "onnxruntime distribution: onnxruntime-gpu" in out
    before = choice.stat().st_mtime_ns
    make(str(choice), "DEVICE=cuda")
    assert choice.stat().st_mtime_ns == before  # same choice: the venv is not reinstalled
    make(str(choice), "DEVICE=cpu")
    assert choice.read_text() == "cpu\n"
    # The install step (dry run): requirements for the recorded choice, the other distribution removed first.
    plan = make("-n", "venv", "DEVICE=cpu")
    assert "--device $(cat" in plan and "pip uninstall --quiet --yes onnxruntime onnxruntime-gpu" in plan
    assert "pip check" in plan


def _resolve(requirements: list[str], tmp_path: Path) -> dict[str, str]:
    """What pip would install for `requirements` in an empty environment (resolved against the package index,
    wheels' metadata only, nothing installed): name -> version. pip refuses a set with a conflict."""
    listing, report = tmp_path / "requirements.txt", tmp_path / "report.json"
    listing.write_text("\n".join(requirements) + "\n")
    done = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
         "--report", str(report), "--requirement", str(listing)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    installs = json.loads(report.read_text())["install"]
    return {reqs.requirement_name(i["metadata"]["name"]): i["metadata"]["version"] for i in installs}


@pytest.mark.parametrize(
    ("extras", "onnxruntime"),
    [
        (EVERYTHING + reqs.DEVICE_EXTRAS["cuda"], reqs.DEVICE_REQUIREMENT["cuda"]),  # `make venv` on a GPU machine
        (["serve"], "onnxruntime-gpu"),  # the GPU serving image (serving.Dockerfile; CUDA from its base image)
    ],
    ids=["make-venv-cuda", "gpu-image"],
)
@pytest.mark.slow  # pip resolves against the index
def test_the_gpu_sets_resolve_without_conflicts(extras, onnxruntime, tmp_path):
    """The GPU environments are never installed on this CPU machine (onnxruntime-gpu with CUDA and cuDNN is
    gigabytes), but pip resolves them here: a pin that conflicts with onnxruntime-gpu or its CUDA wheels fails
    this test instead of a GPU user's `make run` or the image build (where `pip check` runs)."""
    requirements = reqs.requirements(REPO / "pyproject.toml", extras, onnxruntime)
    resolved = _resolve(requirements, tmp_path)
    pinned = as_dict(requirements)
    version = pinned["onnxruntime-gpu"]
    assert resolved["onnxruntime-gpu"] == version and "onnxruntime" not in resolved
    assert all(resolved[name] == v for name, v in pinned.items()), "pip picked another version of a pin"
    if "cuda" in onnxruntime:  # the CUDA runtime and cuDNN come as wheels: no system CUDA needed
        assert {"nvidia-cuda-runtime", "nvidia-cudnn-cu13", "nvidia-cublas"} <= set(resolved), sorted(resolved)
        # ... every one of them pinned (cuBLAS and nvJitLink arrive only as dependencies of other wheels)
        unpinned = sorted(name for name in resolved if name.startswith("nvidia-") and name not in pinned)
        assert not unpinned, f"CUDA wheels pip chose the version of: {unpinned}"
