"""The settings class, `--help` and docs/configuration.md say the same thing."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from serving.config import GROUPS, Settings, flag

DOC = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"


def test_every_setting_is_in_exactly_one_group():
    grouped = [name for names in GROUPS.values() for name in names]
    assert sorted(grouped) == sorted(Settings.model_fields)
    assert len(grouped) == len(set(grouped))


def test_help_lists_every_flag_under_its_group():
    done = subprocess.run([sys.executable, "-m", "serving", "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    sections = re.split(r"^(\w+):$", done.stdout, flags=re.M)
    by_section = dict(zip(sections[1::2], sections[2::2], strict=True))
    for group, names in GROUPS.items():
        for name in names:
            assert flag(name) in by_section[group], (group, name)


def test_the_configuration_doc_covers_every_flag_and_invents_none():
    text = DOC.read_text()
    documented = set(re.findall(r"`(--[a-z0-9-]+)`", text))
    flags = {flag(name) for name in Settings.model_fields}
    booleans = {flag(n).replace("--", "--no-", 1) for n, f in Settings.model_fields.items() if f.annotation is bool}
    assert flags - documented == set(), "flags missing from docs/configuration.md"
    assert documented - flags - booleans - {"--help"} == set(), "docs/configuration.md names flags the server lacks"
