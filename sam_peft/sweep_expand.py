"""Sweep expansion: one YAML file becomes the list of its runs, each a validated run config.

A sweep config holds the keys of a run config (model, data_dir, train, data, output_dir,
device, ...) as the base of every run, plus:

    tasks:   [cola, rte]          the tasks (a list; one name is also accepted)
    methods:                      one entry per table row: `name` plus the method's options,
      - name: sam                 and optionally, for this method's runs only,
        density: 0.005              train / data / model: overrides of the base
        train: {lr: 2.0e-5}         label: the row name in tables (default: the paper's
        label: SAM                         name of the method, e.g. full -> FullTuning)
        grid:                       grid: this entry's own grid (dotted run keys), e.g.
          method.burnin_steps: [500, 1000]   SAM's burn-in chosen on val (table --select-on val)
      - bitfit                    (a bare name is short for {name: bitfit})
    seeds:   10                   a count n (seeds 0..n-1) or a list of seeds; default 1
    grid:                         optional: every combination of these values
      method.density: [0.001, 0.01]
    base:    other.yaml           optional: start from another run or sweep config (path
                                  relative to this file); this file's keys win, mappings merge
    runs_per_gpu: 1               optional: runs sharing one GPU at a time (--runs-per-gpu wins)

Expansion order: grid x methods x tasks x seeds (the last varies fastest): all seeds of one
(method, task) cell run together, and a whole first grid point finishes before the second
starts. The per-method keys override the base; grid values override both. A method entry's own
`grid` multiplies that entry's runs only (after the sweep's grid).

Labels: a run's label is its method entry's `label` (default: the paper's method name) followed
by its grid values, e.g. "SAM density=0.001", so that each grid point is its own table row; the
entry's label alone is the run's `row` in sweep.json, which `table --select-on val` uses to pick,
per row and task, the grid point with the best mean val score.
Grid keys that name a seed (`seed` or `*_seed`, e.g. data.drop_seed in Table 2) are replicates,
like `seeds`: their runs share a row and count as repetitions in its mean and std.

Command-line overrides (`sam-peft sweep CONFIG key=value ...`) edit the sweep config as if
written in the file: `seeds=2`, `tasks=[rte]`, `train.max_steps=40` (the base), `grid.method.density=[0.01]`,
`methods.sam.burnin_steps=5` (the entries named or labelled `sam`), `methods=[{name: bitfit}]`.
A run config's `task`, `method`, `seed` and `label` are the sweep's to set: in a sweep file
they are errors, in a `base` file they are ignored.

Every run is validated before any starts; its id is identity.run_id (deterministic from the
resolved config), and it lands in `<output_dir>/<run_id>/`. The plan is written to
`<output_dir>/sweep.json` for the reports (rows, columns, planned run counts); it is the plan of
the latest sweep run into that directory, so the reports show that sweep (overrides included).

Executing the runs (plan, resume, summary) is sweep.py's.
"""

from __future__ import annotations

import copy
import difflib
import itertools
import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from sam_peft.config import RunConfig, parse_overrides, read_yaml, set_dotted
from sam_peft.errors import ConfigKeyError, UserError
from sam_peft.identity import run_id
from sam_peft.io import unwritable_folder_reason
from sam_peft.loader import build_config
from sam_peft.methods import method_class, method_display
from sam_peft.rundir import PlannedRun

ORDER = "grid x methods x tasks x seeds"
SWEEP_KEYS = ("tasks", "methods", "seeds", "grid", "base", "runs_per_gpu")
# Set per run by the sweep itself; the hint says what to write instead.
PER_RUN_KEYS = {"task": "tasks", "method": "methods", "seed": "seeds", "label": "a method entry's 'label'"}
# Keys of a method entry that override the base for that method's runs (the rest are method options).
METHOD_RUN_KEYS = ("train", "data", "model")
# Keys of a method entry that belong to the sweep, not to the run.
METHOD_SWEEP_KEYS = ("label", "grid")
# What a grid cannot vary: a sweep writes to one directory, tasks and seeds have their own keys,
# labels follow from the grid, and a different method is a different entry of `methods`.
GRID_FORBIDDEN_ROOTS = ("task", "seed", "label", "output_dir") + SWEEP_KEYS
GRID_FORBIDDEN_KEYS = ("method", "method.name")


@dataclass
class Sweep:
    source: str
    overrides: list[str]
    output_dir: Path
    runs: list[PlannedRun]
    runs_per_gpu: int | None = None  # the sweep file's setting (the command line's wins)
    notices: list[str] = field(default_factory=list)  # what the expansion did that the user should know

    def plan(self) -> dict:
        """The content of sweep.json."""
        return {
            "sweep": self.source,
            "overrides": self.overrides,
            "order": ORDER,
            "written_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "n_runs": len(self.runs),
            "labels": list(dict.fromkeys(r.label for r in self.runs)),
            "tasks": list(dict.fromkeys(r.cfg.task for r in self.runs)),
            "runs": [r.record() for r in self.runs],
        }


# ---------------------------------------------------------------- reading the sweep file


def _merge(base: dict, top: dict, origin: dict, prefix: tuple = ()) -> dict:
    """`top` over `base`: mappings merge key by key, anything else replaces (lists included).

    Where `top` replaces a value, the origins recorded for the base's value underneath go too.
    """
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value, origin, prefix + (key,))
        else:
            _forget_under(origin, prefix + (key,), keep_self=True)
            out[key] = value
    return out


def _forget_under(origin: dict, path: tuple, keep_self: bool = False) -> None:
    for p in [p for p in origin if p[: len(path)] == path and (len(p) > len(path) or not keep_self)]:
        del origin[p]


def _read_tree(path: Path, chain: tuple = ()) -> tuple[dict, dict]:
    """A sweep file with its `base` files merged in; origin: key path -> 'file:line'."""
    tree, lines = read_yaml(path)
    origin = {p: f"{path}:{n}" for p, n in lines.items()}
    base = tree.pop("base", None)
    if base is None:
        return tree, origin
    where = origin.get(("base",), str(path))
    if not isinstance(base, str) or not base:
        raise UserError(f"{where}: base: expected the path of a run or sweep config file")
    base_path = path.parent / base
    if base_path.resolve() in chain + (path.resolve(),):
        raise UserError(f"{where}: base '{base}' includes itself")
    if not base_path.is_file():
        raise UserError(f"{where}: base '{base}': no such file ({base_path})")
    base_tree, base_origin = _read_tree(base_path, chain + (path.resolve(),))
    # A run config as the base: the sweep decides each run's task, method, seed and label.
    for key in PER_RUN_KEYS:
        base_tree.pop(key, None)
    merged = _merge(base_tree, tree, base_origin)  # drops the base's origins under what this file replaces
    return merged, {**base_origin, **{p: o for p, o in origin.items() if p != ("base",)}}


def _apply_overrides(tree: dict, origin: dict, items: list[str]) -> None:
    """Command-line `key=value` edits of the sweep config (see the module docstring)."""
    for item, (key, value) in zip(items, parse_overrides(items)):
        where = f"override '{item}'"
        parts = key.split(".")
        if parts[0] == "base":
            raise UserError(f"{where}: 'base' can only be set in the sweep file")
        if parts[0] == "grid" and len(parts) > 1:
            grid = tree.setdefault("grid", {})
            if not isinstance(grid, dict):
                raise UserError(f"{where}: 'grid' is not a mapping")
            grid[".".join(parts[1:])] = value
            origin[("grid", ".".join(parts[1:]))] = where
        elif parts[0] == "methods" and len(parts) > 1:
            entries = tree.get("methods")
            if not isinstance(entries, list):
                raise UserError(f"{where}: the sweep has no list of 'methods'")
            names = [(_entry_name(e), e.get("label") if isinstance(e, dict) else None) for e in entries]
            hits = [i for i, (name, label) in enumerate(names)
                    if parts[1] in (name, label) or parts[1] == str(i)]
            if not hits:
                known = ", ".join(str(label or name) for name, label in names)
                raise UserError(f"{where}: no method entry named or labelled '{parts[1]}' (methods: {known})")
            for i in hits:
                if len(parts) == 2:
                    entries[i] = value
                    _forget_under(origin, ("methods", i))
                else:
                    if isinstance(entries[i], str):
                        entries[i] = {"name": entries[i]}
                    set_dotted(entries[i], ".".join(parts[2:]), value, where)
                    _forget_under(origin, ("methods", i, *parts[2:]))
                origin[("methods", i, *parts[2:])] = where
        else:
            set_dotted(tree, key, value, where)
            _forget_under(origin, tuple(parts))
            origin[tuple(parts)] = where


def _entry_name(entry) -> str | None:
    if isinstance(entry, str):
        return entry
    if isinstance(entry, dict) and isinstance(entry.get("name"), str):
        return entry["name"]
    return None


def _check_top_keys(tree: dict, origin: dict, source: str) -> None:
    run_keys = [k for k in RunConfig.model_fields if k not in PER_RUN_KEYS]
    if "task" in tree and "tasks" not in tree and "methods" not in tree:
        raise UserError(f"{origin.get(('task',), source)}: this is a run config (it has 'task', no 'tasks' or "
                        f"'methods'); run it with `sam-peft run {source}`")
    for key in tree:
        where = origin.get((key,), source)
        if key in PER_RUN_KEYS:
            raise UserError(f"{where}: '{key}' is set per run by a sweep; use {PER_RUN_KEYS[key]}")
        if key not in run_keys and key not in SWEEP_KEYS:
            guess = difflib.get_close_matches(str(key), run_keys + list(SWEEP_KEYS), n=1)
            hint = f" (did you mean '{guess[0]}'?)" if guess else ""
            raise UserError(f"{where}: unknown sweep key '{key}'{hint}")
    for key in ("tasks", "methods"):
        if key not in tree:
            raise UserError(f"{source}: missing required key '{key}'")


def _tasks(tree: dict, origin: dict, source: str) -> list[str]:
    tasks = tree["tasks"]
    where = origin.get(("tasks",), source)
    if isinstance(tasks, str):
        tasks = [tasks]
    if not isinstance(tasks, list) or not tasks or not all(isinstance(t, str) for t in tasks):
        raise UserError(f"{where}: tasks: expected a non-empty list of task names")
    if len(set(tasks)) != len(tasks):
        raise UserError(f"{where}: tasks: '{next(t for t in tasks if tasks.count(t) > 1)}' is listed twice")
    return tasks


def _seeds(tree: dict, origin: dict, source: str) -> list[int]:
    seeds = tree.get("seeds", 1)
    where = origin.get(("seeds",), source)
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        if seeds < 1:
            raise UserError(f"{where}: seeds: a count must be at least 1")
        return list(range(seeds))
    if (not isinstance(seeds, list) or not seeds
            or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)):
        raise UserError(f"{where}: seeds: expected a count or a non-empty list of integers")
    if len(set(seeds)) != len(seeds):
        raise UserError(f"{where}: seeds: {next(s for s in seeds if seeds.count(s) > 1)} is listed twice")
    return seeds


def _methods(tree: dict, origin: dict, source: str) -> list[dict]:
    entries = tree["methods"]
    if not isinstance(entries, list) or not entries:
        raise UserError(f"{origin.get(('methods',), source)}: methods: expected a non-empty list of method entries")
    out = []
    for i, entry in enumerate(entries):
        where = origin.get(("methods", i), origin.get(("methods",), source))
        if isinstance(entry, str):
            entry = {"name": entry}
        if not isinstance(entry, dict):
            raise UserError(f"{where}: methods[{i}]: expected a mapping with 'name' and the method's options")
        if not isinstance(entry.get("name"), str):
            raise UserError(f"{where}: methods[{i}]: expected 'name': a method's name")
        label = entry.get("label")
        if label is not None and (not isinstance(label, str) or not label.strip()):
            raise UserError(f"{origin.get(('methods', i, 'label'), where)}: methods[{i}].label: expected a name")
        for key in ("train", "data"):
            if key in entry and not isinstance(entry[key], dict):
                raise UserError(f"{origin.get(('methods', i, key), where)}: methods[{i}].{key}: expected a mapping")
        if "grid" in entry:
            _check_grid(entry["grid"], lambda key, i=i: origin.get(("methods", i, "grid", key),
                                                                    origin.get(("methods", i, "grid"), where)),
                        f"methods[{i}].grid")
        out.append(entry)
    return out


def _grid(tree: dict, origin: dict, source: str) -> dict[str, list]:
    grid = tree.get("grid") or {}
    _check_grid(grid, lambda key: origin.get(("grid", key), origin.get(("grid",), source)), "grid")
    return flatten_grid(grid)


def flatten_grid(grid: dict, prefix: str = "") -> dict:
    """Nested mappings of a grid as dotted keys: {method: {density: [..]}} -> {method.density: [..]}
    (an override such as methods.sam.grid.method.burnin_steps=[10] writes the nested form)."""
    out = {}
    for key, value in grid.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten_grid(value, dotted + "."))
        else:
            out[dotted] = value
    return out


def _check_grid(grid, where, name: str) -> None:
    """A grid: dotted run keys, each with a non-empty list of values; `where(key)` places a key."""
    if not isinstance(grid, dict):
        raise UserError(f"{where(None)}: {name}: expected a mapping of dotted keys to lists of values")
    for key, values in flatten_grid(grid).items():
        if not isinstance(key, str) or not all(key.split(".")):
            raise UserError(f"{where(key)}: {name}: '{key}' is not a dotted config key")
        if key in GRID_FORBIDDEN_KEYS or key.split(".")[0] in GRID_FORBIDDEN_ROOTS:
            raise UserError(f"{where(key)}: {name}: '{key}' cannot vary in a grid "
                            "(use tasks, seeds or methods; a sweep writes to one output_dir)")
        if not isinstance(values, list) or not values:
            raise UserError(f"{where(key)}: {name} '{key}': expected a non-empty list of values")


def is_replicate_key(key: str) -> bool:
    """Grid keys that are seeds repeat a cell instead of making a new row (e.g. data.drop_seed)."""
    last = key.split(".")[-1]
    return last == "seed" or last.endswith("_seed")


def show_value(value) -> str:
    return json.dumps(value) if not isinstance(value, str) else value


def _label(entry: dict, grid_values: dict) -> str:
    lasts = [k.split(".")[-1] for k in grid_values]
    parts = [entry.get("label") or method_display(entry["name"])]
    for key, value in grid_values.items():
        if is_replicate_key(key):
            continue
        # The short name (density=0.001) unless two grid keys end the same way.
        short = key.split(".")[-1] if lasts.count(key.split(".")[-1]) == 1 else key
        parts.append(f"{short}={show_value(value)}")
    return " ".join(parts)


# ---------------------------------------------------------------- expansion


def _entries_lacking_option(grid: dict, entries: list[dict]) -> dict[str, list[int]]:
    """grid key `method.X` -> the method entries whose method has no option X (e.g. a density
    grid and `full`). Only when some entry has it: a key no method knows stays an error."""
    def options(entry) -> set[str] | None:
        try:
            return set(method_class(entry["name"]).Options.model_fields)
        except ConfigKeyError:
            return None  # an unknown method: validating its runs reports it

    known = [options(e) for e in entries]
    out = {}
    for key in grid:
        parts = key.split(".")
        if parts[0] != "method" or len(parts) != 2:
            continue
        lacking = [i for i, opts in enumerate(known) if opts is not None and parts[1] not in opts]
        if lacking and len(lacking) < sum(opts is not None for opts in known):
            out[key] = lacking
    return out


def expand(tree: dict, origin: dict, source: str, notices: list[str] | None = None) -> list[PlannedRun]:
    """Every run of the sweep, validated, in the order grid x methods x tasks x seeds.
    What the user should know about the expansion is appended to `notices`."""
    _check_top_keys(tree, origin, source)
    tasks = _tasks(tree, origin, source)
    seeds = _seeds(tree, origin, source)
    entries = _methods(tree, origin, source)
    grid = _grid(tree, origin, source)

    base = {k: v for k, v in tree.items() if k not in SWEEP_KEYS}
    base_lines = {p: o for p, o in origin.items() if p[0] not in SWEEP_KEYS}
    seeds_at = [origin.get(("seeds", i), origin.get(("seeds",), source)) for i in range(len(seeds))]
    if "seeds" in tree and isinstance(tree["seeds"], int):
        seeds_at = [origin.get(("seeds",), source)] * len(seeds)

    runs: list[PlannedRun] = []
    lacking = _entries_lacking_option(grid, entries)
    for key, indices in lacking.items():
        names = list(dict.fromkeys(entries[i].get("label") or entries[i]["name"] for i in indices))
        if notices is not None:
            notices.append(f"grid {key}: {', '.join(names)} {'has' if len(names) == 1 else 'have'} no option "
                           f"'{key.split('.', 1)[1]}'; {'its runs do' if len(names) == 1 else 'their runs do'} "
                           "not vary it")
    combos = list(itertools.product(*grid.values()))
    for combo in combos:
        for i, entry in enumerate(entries):
            # A method without the option runs once, at the first grid point, not labelled with it.
            skip = [key for key, indices in lacking.items() if i in indices]
            if any(combo[list(grid).index(key)] != grid[key][0] for key in skip):
                continue
            own = flatten_grid(entry.get("grid") or {})
            for own_combo in itertools.product(*own.values()):
                grid_values = {**{key: value for key, value in zip(grid, combo) if key not in skip},
                               **dict(zip(own, own_combo))}
                run_tree, lines = _method_tree(base, base_lines, entry, i, origin, source)
                label = _label(entry, grid_values)
                for key, value in grid_values.items():
                    at = (origin.get(("methods", i, "grid", key), source) if key in own
                          else origin.get(("grid", key), source))
                    where = f"{at} (grid {key}={show_value(value)})"
                    set_dotted(run_tree, key, value, where)
                    lines[tuple(key.split("."))] = where
                for j, task in enumerate(tasks):
                    for seed, seed_at in zip(seeds, seeds_at):
                        tree_ = {**run_tree, "task": task, "seed": seed, "label": label}
                        lines_ = {**lines, ("task",): origin.get(("tasks", j), origin.get(("tasks",), source)),
                                  ("seed",): seed_at}
                        cfg = build_config(tree_, (), source, lines_)
                        runs.append(PlannedRun(cfg, run_id(cfg), label, grid_values, i, _label(entry, {})))
    _check_distinct(runs, entries, origin, source)
    return runs


def _method_tree(base: dict, base_lines: dict, entry: dict, i: int, origin: dict, source: str):
    """The base with one method entry applied: the run tree and its key -> place map."""
    tree = copy.deepcopy(base)
    lines = dict(base_lines)
    here = origin.get(("methods", i), origin.get(("methods",), source))
    for key in METHOD_RUN_KEYS:
        if key in entry:
            if isinstance(entry[key], dict) and isinstance(tree.get(key), dict):
                tree[key] = _merge(tree[key], copy.deepcopy(entry[key]), {})
            else:
                tree[key] = copy.deepcopy(entry[key])
    tree["method"] = {k: copy.deepcopy(v) for k, v in entry.items() if k not in METHOD_RUN_KEYS + METHOD_SWEEP_KEYS}
    lines[("method",)] = here
    for p, o in origin.items():
        if p[:2] == ("methods", i) and len(p) > 2:
            # methods[i].train.lr is the run's train.lr; methods[i].density is the run's method.density
            run_path = p[2:] if p[2] in METHOD_RUN_KEYS else ("method",) + p[2:]
            lines[run_path] = o
    return tree, lines


def _check_distinct(runs: list[PlannedRun], entries: list[dict], origin: dict, source: str) -> None:
    """No two runs may be the same run, and no two method entries may share a table row."""
    seen: dict[str, PlannedRun] = {}
    for r in runs:
        other = seen.setdefault(r.run_id, r)
        if other is not r:
            where = origin.get(("methods", r.entry), origin.get(("methods",), source))
            what = (f"methods[{other.entry}] and methods[{r.entry}]" if other.entry != r.entry
                    else f"methods[{r.entry}] with grid {other.grid} and {r.grid}")
            raise UserError(f"{where}: {what} give the same run ({r.run_id}): they must differ in what they compute")
    rows: dict[str, int] = {}
    for r in runs:
        first = rows.setdefault(r.label, r.entry)
        if first != r.entry:
            where = origin.get(("methods", r.entry), origin.get(("methods",), source))
            raise UserError(f"{where}: methods[{first}] and methods[{r.entry}] would share the table row "
                            f"'{r.label}'; give one of them a 'label'")


def load_sweep(path: str | Path, overrides: list[str] = ()) -> Sweep:
    """Read, override, expand and validate a sweep config. Raises UserError; writes nothing."""
    path = Path(path)
    tree, origin = _read_tree(path)
    overrides = list(overrides)
    _apply_overrides(tree, origin, overrides)
    notices: list[str] = []
    runs = expand(tree, origin, str(path), notices)
    output_dir = Path(runs[0].cfg.output_dir)
    unwritable = unwritable_folder_reason(output_dir)
    if unwritable:
        raise UserError(f"{origin.get(('output_dir',), str(path))}: output_dir '{output_dir}': {unwritable}")
    return Sweep(str(path), overrides, output_dir, runs, _runs_per_gpu(tree, origin, str(path)), notices)


def _runs_per_gpu(tree: dict, origin: dict, source: str) -> int | None:
    value = tree.get("runs_per_gpu")
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise UserError(f"{origin.get(('runs_per_gpu',), source)}: runs_per_gpu: expected a whole number, at least 1")
    return value
