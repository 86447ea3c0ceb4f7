"""A serving image's build stage replayed without a container engine: its own RUN steps in a venv.

The COPY instructions of the build stage lay the build context out in a staging directory (as Docker would under
WORKDIR), then every RUN after `python -m venv` runs there with the venv first on PATH — the dependency layer
(`requirements.py ... && pip install`), the project install, `pip check` and the image's smoke test. What the
image would hold is then exactly what the venv holds, so the server can be started from it with a Deployment's
args and env (tests/deploy/test_image_serves.py).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

from k8s_check import DOCKER, REPO, stages

BUILD = REPO / "build" / "image-venv"


def build_stage(dockerfile: Path) -> list[tuple[str, str]]:
    return stages(dockerfile)[0]


def _steps(dockerfile: Path) -> tuple[list[tuple[str, str]], list[str]]:
    """(COPY src/dst pairs, RUN commands after the venv is made) of the build stage."""
    copies, runs, venv_made = [], [], False
    for keyword, rest in build_stage(dockerfile):
        if keyword == "COPY" and not rest.startswith("--from"):
            *sources, dest = rest.split()
            copies += [(src, dest) for src in sources]
        elif keyword == "RUN":
            if "-m venv" in rest:
                venv_made = True
            elif venv_made and "training.data" not in rest:  # MNIST is cached already: data/
                runs.append(rest)
    return copies, runs


def _stage_context(dockerfile: Path, workdir: Path) -> None:
    copies, _ = _steps(dockerfile)
    for src, dest in copies:
        source = REPO / src.rstrip("/")
        into_dir = dest.endswith("/") or dest in (".", "./")
        target = workdir / dest.removeprefix("./")
        if source.is_dir():
            shutil.copytree(source, target, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            target = target / source.name if into_dir else target
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)


def build(dockerfile_name: str) -> Path:
    """The venv the image's build stage makes (reused while the Dockerfile and pins are unchanged); its path."""
    dockerfile = DOCKER / dockerfile_name
    key = hashlib.sha256(
        b"".join(p.read_bytes() for p in (dockerfile, REPO / "pyproject.toml", DOCKER / "requirements.py"))
    ).hexdigest()[:12]
    venv = BUILD / f"{dockerfile.stem}-{key}"
    workdir = BUILD / f"{dockerfile.stem}-src"
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    _stage_context(dockerfile, workdir)
    fresh = not (venv / "bin" / "python").exists()
    if fresh:
        shutil.rmtree(venv, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "PYTHON"))},
        "PATH": f"{venv / 'bin'}:{os.environ['PATH']}",
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
    }
    _, runs = _steps(dockerfile)
    for command in runs:
        if not fresh and "requirements.txt" in command and "pip install" in command:
            continue  # the dependency layer is cached, as Docker would cache it
        subprocess.run(["bash", "-o", "pipefail", "-c", command], cwd=workdir, env=env, check=True, timeout=1200)
    return venv
