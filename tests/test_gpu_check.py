"""scripts/gpu_check.sh as far as a CPU can check it: --prepare builds the carried folder, and
--cpu-dry-run runs the whole script (CUDA tests collected and skipped, the benchmark, a packed
study at toy size) and writes at most 8 files to $OUT. The GPU run itself needs the GPU machine."""

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "gpu_check.sh"


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OUT", "PYTHONPATH")}
    env.update(PYTHON=sys.executable, OMP_NUM_THREADS="1", **extra)
    return env


def _run(args, env, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def carry(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("carry") / "gpu_carry"
    # The built-in demo data stands in for the authors' splits, which CI does not have.
    proc = _run(["--prepare", "--no-wheels", "--no-model", "--demo-data"], _env(GPU_CHECK_CARRY=str(folder)),
                timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return folder


def test_prepare_builds_the_carried_folder_and_checks_its_size(carry):
    manifest = json.loads((carry / "MANIFEST.json").read_text())
    assert (carry / "paper_splits.tar.gz").is_file()
    with tarfile.open(carry / "paper_splits.tar.gz") as tar:
        names = tar.getnames()
    # every task's three splits travel
    for task in ("cola", "stsb", "mrpc", "rte", "cb", "copa", "wsc"):
        assert any(n.endswith(f"{task}/train.jsonl") for n in names), task
    size = sum(p.stat().st_size for p in carry.rglob("*") if p.is_file())
    assert size < 64 * 2**20
    assert manifest  # the manifest lists what was carried


def test_bad_usage_is_one_line_and_exit_2():
    proc = _run(["--prepare", "--cpu-dry-run"], _env())
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    proc = _run(["--bogus"], _env())
    assert proc.returncode == 2 and "unknown argument" in proc.stderr


def test_the_device_mode_refuses_to_run_without_out_or_on_demo_data(carry, tmp_path):
    proc = _run([], _env(GPU_CHECK_CARRY=str(carry)))
    assert proc.returncode == 2 and "OUT is not set" in proc.stderr
    proc = _run([], _env(GPU_CHECK_CARRY=str(carry), OUT=str(tmp_path / "out")))
    assert proc.returncode == 2 and "demo data" in proc.stderr


@pytest.mark.slow
def test_cpu_dry_run_runs_every_part_and_writes_at_most_8_files(carry, tmp_path):
    out = tmp_path / "out"
    env = _env(GPU_CHECK_CARRY=str(carry), OUT=str(out), GPU_CHECK_WORK=str(tmp_path / "work"),
               GPU_CHECK_STUDY_TASKS="cb")
    proc = _run(["--cpu-dry-run"], env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "GPU CHECK PASSED" in proc.stdout
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8 and {"gpu_check.log", "summary.json", "bench.json", "study_runs.tar.gz"} <= set(files)
    summary = json.loads((out / "summary.json").read_text())
    assert summary  # the summary records the parts and how they ended
    with tarfile.open(out / "study_runs.tar.gz") as tar:
        results = [n for n in tar.getnames() if n.endswith("result.json")]
    assert len(results) == 2  # FullTuning and SAM on CB, seed 0: the dry run's study
