"""`sam-peft data prepare`: fetch the task data and lay it out the way jiant does.

Output layout under OUT (what sam_peft.data reads):

    OUT/configs/<task>_config.json      {"task", "paths": {"train", "test", "val"}, "name"}
    OUT/data/<task>/{train,val,test}.jsonl
    OUT/PREPARED.json                   where each task's files came from

Two sources:

- "paper" (default): the exact split files the paper's authors used, downloaded from their
  repository at a fixed commit and checked against sha256 pins kept in this file. A mirror
  (`base_url`) must have the layout of that repository's `data/tasks/` folder, i.e.
  `<base_url>/data/<task>/<split>.jsonl`; it may be http(s)://, file:// or a local directory.
- "hub": GLUE / SuperGLUE from the Hugging Face hub (needs the optional `datasets` package).
  The hub train split is cut 90/10 into train/val with a seeded permutation, and the hub
  validation split becomes test, because the official test labels are hidden.

Every file is written under a temporary name in its own folder and moved into place with
os.replace, so an interrupted run never leaves a half-written file under its real name.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import secrets
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
from tqdm import tqdm

from sam_peft import __version__
from sam_peft.errors import UserError
from sam_peft.tasks import TASKS

TASK_NAMES = tuple(TASKS)
SPLITS = ("train", "val", "test")

PAPER_REPO = "https://github.com/fuzihaofzh/AnalyzeParameterEfficientFinetune"
PAPER_COMMIT = "ea1a73b40dfe9aaa740bf1979caf0b87357d20f1"
PAPER_BASE_URL = (
    "https://raw.githubusercontent.com/fuzihaofzh/AnalyzeParameterEfficientFinetune/"
    f"{PAPER_COMMIT}/data/tasks/"
)

# Views of the task table (sam_peft.tasks.TASKS owns each task's sources).
PAPER_SHA256 = {name: spec.source.paper_sha256 for name, spec in TASKS.items()}
HUB_DATASETS = {name: spec.source.hub for name, spec in TASKS.items()}
HUB_VAL_FRACTION = 0.1

# Download behaviour; module-level so tests can shorten them.
TIMEOUT_S = 60.0
ATTEMPTS = 3
RETRY_WAIT_S = 2.0
CHUNK_BYTES = 1 << 16


def prepare_data(
    out: str | Path,
    source: str = "paper",
    tasks: list[str] | None = None,
    seed: int = 0,
    base_url: str | None = None,
    force: bool = False,
    progress: bool = True,
) -> Path:
    """Write the jiant-layout data for `tasks` (default: all seven) under `out`; return `out`.

    `seed` only affects source "hub" (the 90/10 train/val cut); `base_url` and `force` only
    affect source "paper". Raises UserError for bad arguments, failed downloads and
    checksum mismatches.
    """
    out = Path(out)
    task_list = _check_tasks(tasks)
    if source not in ("paper", "hub"):
        raise UserError(f"source: unknown source {source!r}; use 'paper' or 'hub'")
    if source == "hub" and base_url is not None:
        raise UserError("base_url: only used with source 'paper' (the hub source reads the Hugging Face hub)")
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a directory")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise UserError(f"seed: {seed!r} is not a whole number in [0, 2^32) (the split seed of --source hub)")

    # Folders this call may create; those it created and left empty go again if it fails.
    folders = [out, out / "data", out / "configs", *(out / "data" / task for task in task_list)]
    existed = {folder for folder in folders if folder.exists()}
    try:
        if source == "paper":
            provenance = _prepare_paper(out, task_list, base_url or PAPER_BASE_URL, force, progress)
        else:
            provenance = _prepare_hub(out, task_list, seed, progress)

        for task in task_list:
            _write_config(out, task)
        _write_prepared_record(out, provenance)
    except BaseException:
        for folder in sorted(set(folders) - existed, key=lambda f: len(f.parts), reverse=True):
            try:
                folder.rmdir()  # only if empty: files already verified stay for the next attempt
            except OSError:
                pass
        raise
    return out


def _check_tasks(tasks: list[str] | None) -> list[str]:
    if tasks is None:
        return list(TASK_NAMES)
    if isinstance(tasks, str):
        # A bare string would otherwise be iterated letter by letter.
        tasks = [tasks]
    if not tasks:
        raise UserError("tasks: empty list; leave it out to prepare all of " + ", ".join(TASK_NAMES))
    unknown = [t for t in tasks if t not in TASK_NAMES]
    if unknown:
        raise UserError(f"tasks: unknown task {unknown[0]!r}; known: " + ", ".join(TASK_NAMES))
    return list(dict.fromkeys(tasks))  # drop repeats, keep the order given


# ---------------------------------------------------------------- source "paper"


def _prepare_paper(out: Path, tasks: list[str], base_url: str, force: bool, progress: bool) -> dict:
    base = _normalise_base_url(base_url)
    provenance = {}
    for task in tasks:
        for split in SPLITS:
            url = f"{base}data/{task}/{split}.jsonl"
            dest = out / "data" / task / f"{split}.jsonl"
            _fetch_verified(url, dest, PAPER_SHA256[task][split], force, progress)
        provenance[task] = {
            "source": "paper",
            "repo": PAPER_REPO,
            "commit": PAPER_COMMIT,
            "base_url": base,
            "sha256": dict(PAPER_SHA256[task]),
        }
    return provenance


def _normalise_base_url(base_url: str) -> str:
    """Turn a URL or a local directory into a URL ending in '/'."""
    scheme = urllib.parse.urlsplit(base_url).scheme
    # A one-letter "scheme" is a Windows drive letter (C:\...), i.e. a local path.
    if len(scheme) <= 1:
        local = Path(base_url).expanduser()
        if not local.is_dir():
            raise UserError(f"{base_url}: base_url is neither a URL nor an existing directory")
        base_url = local.resolve().as_uri()
    return base_url if base_url.endswith("/") else base_url + "/"


def _fetch_verified(url: str, dest: Path, expected: str, force: bool, progress: bool) -> None:
    """Download `url` to `dest` unless a copy with the pinned sha256 is already there."""
    if dest.is_file() and not force:
        if _sha256_of(dest) == expected:
            _say(progress, f"{dest}: present, sha256 ok")
            return
        _say(progress, f"{dest}: sha256 differs from the pin, downloading again")

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_name(dest)
    try:
        got = _download(url, tmp, progress, label=f"{dest.parent.name}/{dest.name}")
        if got != expected:
            raise UserError(f"{url}: sha256 mismatch (expected {expected}, got {got})")
        os.replace(tmp, dest)
    finally:
        # Only verified bytes ever reach `dest`; whatever else was written goes away.
        tmp.unlink(missing_ok=True)


def _download(url: str, tmp: Path, progress: bool, label: str) -> str:
    """Stream `url` into `tmp` with retries; return the sha256 of what was written."""
    last_reason = "no attempt made"
    for attempt in range(1, ATTEMPTS + 1):
        try:
            return _download_once(url, tmp, progress, label)
        except urllib.error.HTTPError as err:
            last_reason = f"HTTP {err.code} {err.reason}"
            # Client errors (404, 403, ...) will not go away by asking again.
            if err.code < 500 and err.code != 429:
                break
        except (OSError, http.client.HTTPException) as err:
            # URLError, timeouts, refused or reset connections, truncated bodies.
            last_reason = _reason(err)
        if attempt < ATTEMPTS:
            time.sleep(RETRY_WAIT_S * attempt)
    raise UserError(f"{url}: download failed ({_one_line(last_reason)})")


def _download_once(url: str, tmp: Path, progress: bool, label: str) -> str:
    digest = hashlib.sha256()
    request = urllib.request.Request(url, headers={"User-Agent": f"sam-peft/{__version__}"})
    with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
        size = response.headers.get("Content-Length")
        total = int(size) if size and size.isdigit() else None
        # "wb" truncates what an earlier failed attempt may have left in tmp.
        with open(tmp, "wb") as sink, tqdm(
            total=total, unit="B", unit_scale=True, desc=label, disable=not progress, leave=True
        ) as bar:
            while True:
                chunk = response.read(CHUNK_BYTES)
                if not chunk:
                    break
                digest.update(chunk)
                _write_local(sink, chunk, tmp)
                bar.update(len(chunk))
    return digest.hexdigest()


def _write_local(sink, chunk: bytes, path: Path) -> None:
    # A local write failure (disk full, permissions) is not a network problem: report it as
    # such, and as a UserError so the download retry loop does not swallow it.
    try:
        sink.write(chunk)
    except OSError as err:
        raise UserError(f"{path}: cannot write ({err.strerror or err})") from err


def _reason(err: BaseException) -> str:
    if isinstance(err, urllib.error.URLError):
        inner = err.reason
        return inner if isinstance(inner, str) else _reason(inner)
    if isinstance(err, TimeoutError):
        return f"timed out after {TIMEOUT_S:g} s"
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    return f"{type(err).__name__}: {err}" if str(err) else type(err).__name__


def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


# ---------------------------------------------------------------- source "hub"


def _prepare_hub(out: Path, tasks: list[str], seed: int, progress: bool) -> dict:
    datasets = _import_datasets()
    provenance = {}
    for task in tasks:
        hub_id, config = HUB_DATASETS[task]
        where = f"{hub_id} ({config})"
        _say(progress, f"{task}: loading {where} from the Hugging Face hub")
        try:
            loaded = datasets.load_dataset(hub_id, config)
        except Exception as err:  # noqa: BLE001 - network, auth, missing repo: all end the same way
            raise UserError(f"{where}: cannot load ({_one_line(_reason(err))})") from err
        for hub_split in ("train", "validation"):
            if hub_split not in loaded:
                raise UserError(f"{where}: has no {hub_split!r} split (found: {', '.join(loaded)})")

        train_rows = [_convert(task, row, f"{where} train row {i}") for i, row in enumerate(loaded["train"])]
        test_rows = [_convert(task, row, f"{where} validation row {i}") for i, row in enumerate(loaded["validation"])]
        train_rows, val_rows = _split_train_val(train_rows, seed, where)

        for split, rows in (("train", train_rows), ("val", val_rows), ("test", test_rows)):
            _write_jsonl(out / "data" / task / f"{split}.jsonl", rows)
        _say(progress, f"{task}: wrote {len(train_rows)} train, {len(val_rows)} val, {len(test_rows)} test")

        provenance[task] = {
            "source": "hub",
            "hub_id": hub_id,
            "hub_config": config,
            "seed": seed,
            "split": (
                f"hub train -> numpy default_rng(seed).permutation -> first {HUB_VAL_FRACTION:.0%} val, "
                "rest train; hub validation -> test"
            ),
            "counts": {"train": len(train_rows), "val": len(val_rows), "test": len(test_rows)},
            "datasets_version": getattr(datasets, "__version__", "unknown"),
        }
    return provenance


def _import_datasets():
    try:
        import datasets
    except ImportError:
        raise UserError("--source hub needs the 'datasets' package: pip install 'sam-peft[hub]'") from None
    return datasets


def _split_train_val(rows: list[dict], seed: int, where: str) -> tuple[list[dict], list[dict]]:
    """Seeded 90/10 cut of the hub train split; the same seed always gives the same cut."""
    if len(rows) < 2:
        raise UserError(f"{where}: train split has {len(rows)} rows, too few to hold out a validation set")
    # At least one val row: early stopping needs something to evaluate on.
    n_val = max(1, round(len(rows) * HUB_VAL_FRACTION))
    order = np.random.default_rng(seed).permutation(len(rows))
    val = [rows[i] for i in order[:n_val]]
    train = [rows[i] for i in order[n_val:]]
    return train, val


# Hub class ids -> the label values the paper files use (index = hub id).
def _convert(task: str, row, where: str) -> dict:
    """One hub row -> one record in the paper files' format (the task table's hub_fields)."""
    source = TASKS[task].source
    try:
        label = _score(row) if source.hub_labels is None else _class(row, source.hub_labels)
        record = {"idx": int(row["idx"]), "label": label}
        for key, column in source.hub_fields.items():
            value = row[column]
            *parents, last = key.split(".")
            node = record
            for part in parents:  # "target.span1_index" nests under "target", as jiant's WSC files
                node = node.setdefault(part, {})
            node[last] = int(value) if last.endswith("_index") else value
        return record
    except KeyError as err:
        raise UserError(f"{where}: missing field {err.args[0]!r}") from None
    except (TypeError, ValueError) as err:
        raise UserError(f"{where}: {_one_line(str(err))}") from None


def _class(row, labels: tuple):
    value = row["label"]
    # bool is an int subclass; a True here would silently mean class 1.
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < len(labels):
        raise ValueError(f"label {value!r} is not a class id 0..{len(labels) - 1}")
    return labels[value]


def _score(row) -> float:
    value = row["label"]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 5.0:
        raise ValueError(f"label {value!r} is not a similarity score in 0..5")
    return float(value)


# ---------------------------------------------------------------- files


def _write_config(out: Path, task: str) -> None:
    # Same keys, order and relative paths as the authors' configs/<task>_config.json.
    config = {
        "task": task,
        "paths": {
            "train": f"../data/{task}/train.jsonl",
            "test": f"../data/{task}/test.jsonl",
            "val": f"../data/{task}/val.jsonl",
        },
        "name": task,
    }
    _write_text(out / "configs" / f"{task}_config.json", json.dumps(config, indent=2) + "\n")


def _write_prepared_record(out: Path, provenance: dict) -> None:
    """Merge this run's per-task provenance into OUT/PREPARED.json.

    Per task, because one folder can be filled by several runs (say, cola from the paper
    and then rte from the hub); the record must describe every task's files, not the last run.
    """
    path = out / "PREPARED.json"
    record = {"prepared_by": f"sam-peft {__version__}", "tasks": {}}
    if path.is_file():
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(old, dict) and isinstance(old.get("tasks"), dict):
                record["tasks"] = old["tasks"]
        except (OSError, ValueError):
            pass  # our own file, unreadable: it is rewritten from this run below
    record["tasks"].update(provenance)
    record["tasks"] = {t: record["tasks"][t] for t in sorted(record["tasks"])}
    _write_text(path, json.dumps(record, indent=2) + "\n")


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    # json.dumps defaults (ASCII escapes, ", " separators) match the paper files.
    _write_text(path, "".join(json.dumps(row) + "\n" for row in rows))


def _write_text(path: Path, text: str) -> None:
    """Atomic write; leaves the file alone (mtime included) when the content is unchanged."""
    data = text.encode("utf-8")
    if path.is_file() and path.read_bytes() == data:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_name(path)
    try:
        with open(tmp, "wb") as f:
            _write_local(f, data, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _temp_name(dest: Path) -> Path:
    # Same folder as dest so os.replace is a rename, never a cross-device copy; a random
    # part so two concurrent runs do not write into each other's file. Created by open()
    # (not mkstemp) so the final file gets the usual umask permissions, not 0600.
    return dest.with_name(f".{dest.name}.{secrets.token_hex(4)}.part")


def _say(progress: bool, message: str) -> None:
    if progress:
        print(message, file=sys.stderr, flush=True)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())
