"""What a model repository holds: `<repository>/<model>/<version>/model.onnx` folders, and which of a model's
versions its version policy may serve."""

from __future__ import annotations

import logging
from pathlib import Path

from serving.config import ModelSettings, parse_version_policy

log = logging.getLogger(__name__)


def is_version(name: str) -> bool:
    """A version is named by ASCII digits: isdigit() alone admits '²', which int() refuses."""
    return name.isascii() and name.isdigit()


def scan(root: Path, single_name: str = "") -> dict[str, dict[int, Path]]:
    """Version directories on disk: integer-named folders holding a model.onnx (others are ignored).

    With `single_name`, a root that is itself one model (version folders, or a bare model.onnx as version 1: what
    KServe's storage initializer leaves in /mnt/models) is that model; a repository keeps its own names."""
    if single_name:
        versions = versions_in(root)
        if not versions and (root / "model.onnx").is_file():
            versions = {1: root}
        if versions:
            return {single_name: versions}
    found: dict[str, dict[int, Path]] = {}
    for model_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        try:
            versions = versions_in(model_dir)
        except PermissionError:  # e.g. a volume root's lost+found: not a model
            log.warning("skipping unreadable directory %s", model_dir)
            continue
        if versions:
            found[model_dir.name] = versions
    return found


def versions_in(model_dir: Path) -> dict[int, Path]:
    """One model's version folders: integer-named folders holding a model.onnx."""
    return {int(v.name): v for v in model_dir.iterdir() if is_version(v.name) and (v / "model.onnx").is_file()}


def policy_candidates(versions: dict[int, Path], settings: ModelSettings) -> tuple[list[int], int]:
    """The versions the version policy may serve, newest first ('latest:N' keeps the newest N that load), and
    how many of them to serve."""
    kind, numbers = parse_version_policy(settings.version_policy)
    candidates = sorted(versions, reverse=True)
    if kind == "specific":
        candidates = [v for v in candidates if v in numbers]
    return candidates, numbers[0] if kind == "latest" else len(candidates)
