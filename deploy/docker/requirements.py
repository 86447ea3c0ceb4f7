"""Print the pinned requirements of pyproject.toml extras, optionally with onnxruntime swapped for onnxruntime-gpu."""

from __future__ import annotations

import argparse
import re
import sys
import tomllib
from pathlib import Path

_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


def requirement_name(requirement: str) -> str:
    """The normalised distribution name of a requirement string (extras and version dropped)."""
    match = _NAME.match(requirement)
    if match is None:
        raise ValueError(f"not a requirement: {requirement!r}")
    return re.sub(r"[-_.]+", "-", match.group(1)).lower()


def requirements(pyproject: Path, extras: list[str], onnxruntime: str = "onnxruntime") -> list[str]:
    """The base dependencies plus `extras`, deduplicated, each pinned with `==`, ORT renamed if asked."""
    project = tomllib.loads(pyproject.read_text())["project"]
    optional = project.get("optional-dependencies", {})
    wanted = list(project.get("dependencies", []))
    for extra in extras:
        if extra not in optional:
            raise KeyError(f"pyproject.toml has no extra {extra!r} (has {sorted(optional)})")
        wanted += optional[extra]
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
    """CLI: requirements.py [--pyproject P] --extra serve [--onnxruntime onnxruntime-gpu]."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pyproject", type=Path, default=Path("pyproject.toml"))
    parser.add_argument("--extra", action="append", default=[], help="Extra to include (repeatable).")
    parser.add_argument(
        "--onnxruntime",
        default="onnxruntime",
        choices=["onnxruntime", "onnxruntime-gpu"],
        help="Distribution that provides the onnxruntime module.",
    )
    args = parser.parse_args(argv)
    sys.stdout.write("".join(line + "\n" for line in requirements(args.pyproject, args.extra, args.onnxruntime)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
