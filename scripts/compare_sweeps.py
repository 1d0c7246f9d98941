"""Behaviour unchanged? Compare two results folders of the same sweep, run by run.

    python scripts/compare_sweeps.py BEFORE AFTER

A refactor must leave every run as it was: the same run ids; result.json equal but for what
describes the process rather than the computation (times, pids, hosts, dates, peak memory);
metrics.jsonl and train_log.jsonl equal line by line; the delta files' tensors bitwise equal.
Prints one line per difference and a summary; exit status 0 when identical, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from safetensors.torch import load_file

# What a rerun of the same computation changes: when and where it ran, and how fast.
PROCESS_FIELDS = {"started_at", "finished_at", "wall_time_s", "timings", "pid", "host", "peak_mem_bytes",
                  "peak_mem_kind"}


def runs(folder: Path) -> dict[str, Path]:
    return {p.parent.name: p.parent for p in folder.glob("*/result.json")}


def compare_run(a: Path, b: Path) -> list[str]:
    out = []
    ra, rb = (json.loads((d / "result.json").read_text()) for d in (a, b))
    for key in sorted(set(ra) | set(rb)):
        if key not in PROCESS_FIELDS and ra.get(key) != rb.get(key):
            out.append(f"result.json {key}: {ra.get(key)!r} != {rb.get(key)!r}")
    for name in ("metrics.jsonl", "train_log.jsonl"):
        la, lb = ((d / name).read_text().splitlines() if (d / name).is_file() else None for d in (a, b))
        if la != lb:
            out.append(f"{name} differs")
    da, db = a / "delta.safetensors", b / "delta.safetensors"
    if da.is_file() != db.is_file():
        out.append("delta.safetensors present in one only")
    elif da.is_file():
        ta, tb = load_file(str(da)), load_file(str(db))
        if ta.keys() != tb.keys() or any(not ta[k].equal(tb[k]) for k in ta):
            out.append("delta tensors differ")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("before", type=Path)
    ap.add_argument("after", type=Path)
    a = ap.parse_args(argv)
    before, after = runs(a.before), runs(a.after)
    problems = [f"{r}: only in {a.before}" for r in sorted(set(before) - set(after))]
    problems += [f"{r}: only in {a.after}" for r in sorted(set(after) - set(before))]
    for r in sorted(set(before) & set(after)):
        problems += [f"{r}: {p}" for p in compare_run(before[r], after[r])]
    print("\n".join(problems) if problems else "")
    print(f"{len(set(before) & set(after))} runs in both, {len(set(before) ^ set(after))} in one only, "
          f"{len(problems)} differences")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
