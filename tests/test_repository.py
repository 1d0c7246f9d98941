"""The repository itself: no machine paths in code, tests, docs or configs; test data found by a
path relative to the project or an environment variable."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

import util

ROOT = Path(__file__).resolve().parents[1]
# Absolute paths of one machine: a home or root folder, this project's work tree, a temp folder.
MACHINE_PATH = re.compile(r"(?<![\w.~])/(?:work|root|home/\w+|Users/\w+|mnt/\w+)/")


def tracked_text_files() -> list[Path]:
    try:
        names = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    paths = [ROOT / n for n in names.splitlines()]
    return [p for p in paths if p.suffix in (".py", ".md", ".yaml", ".yml", ".sh", ".toml", ".txt", ".cfg") and
            p.is_file()]


def test_no_machine_paths_in_the_repository():
    found = [f"{p.relative_to(ROOT)}:{n}: {line.strip()}" for p in tracked_text_files()
             for n, line in enumerate(p.read_text(errors="replace").splitlines(), 1) if MACHINE_PATH.search(line)]
    assert not found, "\n".join(found)


def test_paper_splits_come_from_the_environment_or_beside_the_project(monkeypatch, tmp_path):
    monkeypatch.setenv("SAM_PEFT_PAPER_SPLITS", str(tmp_path))
    assert util.paper_splits_dir() == tmp_path
    monkeypatch.delenv("SAM_PEFT_PAPER_SPLITS")
    assert util.paper_splits_dir() == ROOT.parent / "shared" / "data" / "paper_splits"
