"""Loading a run config: the schema of config.py, checked against the task table and the method
registry (the task exists, the method's options are valid, its burn-in leaves a main phase).

config.py sits on the bottom floor and knows neither; every run config the CLI, a run or a
sweep builds comes through `build_config` here, so no unchecked config reaches a run. Errors
are config.py's one-liners: file and line of the offending key, or the override that set it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Literal, get_args, get_origin

from pydantic import ValidationError

from sam_peft.config import RunConfig, format_validation_error, locate, parse_overrides, read_yaml, set_dotted
from sam_peft.errors import ConfigKeyError, UserError
from sam_peft.methods import method_class, validate_method_options
from sam_peft.tasks import get_task

# Keys only a sweep config has (see sweep_expand.py): a run config holding one is a sweep config.
SWEEP_ONLY_KEYS = ("tasks", "methods", "seeds", "grid")


def load_config(path: str | Path | None, overrides: list[str] = (), base: dict | None = None) -> RunConfig:
    """Read a run config (YAML file and/or a base mapping), apply `key=value` overrides, validate."""
    tree: dict = dict(base or {})
    lines: dict[tuple, int] = {}
    source = "<config>"
    if path is not None:
        tree, lines = read_yaml(path)
        source = str(path)
        sweep_keys = [k for k in SWEEP_ONLY_KEYS if k in tree]
        if sweep_keys:
            raise UserError(f"{source}:{lines.get((sweep_keys[0],), 1)}: this is a sweep config (it has "
                            f"'{sweep_keys[0]}'); run it with `sam-peft sweep {source}`")
    return build_config(tree, overrides, source, lines)


def build_config(tree: dict, overrides=(), source="<config>", lines=None) -> RunConfig:
    tree = json.loads(json.dumps(tree))  # deep copy, plain types
    over_src: dict[str, str] = {}
    for item, (key, value) in zip(overrides, parse_overrides(list(overrides))):
        set_dotted(tree, key, value, f"override '{item}'")
        over_src[key] = item
    try:
        cfg = RunConfig.model_validate(tree)
        check_task_and_method(cfg)  # only once the schema holds, as a model validator would run
        return cfg
    except ValidationError as err:
        raise UserError(format_validation_error(err, source, lines or {}, over_src)) from None
    except ConfigKeyError as err:
        # Raised by a check: unknown task or method, a method option's value.
        where = locate(tuple(err.key.split(".")), source, lines or {}, over_src)
        raise UserError(f"{where}: {err.message}") from None


def check_task_and_method(cfg: RunConfig) -> None:
    """The task must be known and the method's options valid; fills in the method's defaults."""
    try:
        get_task(cfg.task)
    except UserError as e:
        raise ConfigKeyError("task", str(e)) from None
    given = cfg.method
    _check_method_booleans(given)
    cfg.method = validate_method_options(given)
    for key, value in given.items():
        check_strict_value(f"method.{key}", value, cfg.method.get(key))
    burnin = method_class(cfg.method["name"]).Options.model_validate(cfg.method).training_burnin()
    if burnin >= cfg.train.max_steps:
        raise ConfigKeyError("method.burnin_steps", f"method.burnin_steps: its {burnin} training steps leave "
                             f"no main-phase step under train.max_steps {cfg.train.max_steps}")


def _takes_bool(annotation) -> bool:
    if annotation is bool:
        return True
    if get_origin(annotation) is Literal:
        return any(isinstance(a, bool) for a in get_args(annotation))
    return any(_takes_bool(a) for a in get_args(annotation))


def _check_method_booleans(given: dict) -> None:
    """`density: true` must not reach the method's own (lax) validation, which reads it as 1."""
    if not isinstance(given.get("name"), str):
        return
    try:
        fields = method_class(given["name"]).Options.model_fields
    except ConfigKeyError:
        return  # an unknown method: validate_method_options says so
    for key, value in given.items():
        if isinstance(value, bool) and key in fields and not _takes_bool(fields[key].annotation):
            raise ConfigKeyError(f"method.{key}", f"key 'method.{key}': expected a number, got the boolean "
                                                  f"{str(value).lower()}")


def check_strict_value(key: str, given, validated) -> None:
    """What Strict does for the run config's own sections, for a method's options (validated by
    the method's own model): a boolean or a string that became a number, or a number that is
    not finite, is an error naming the key."""
    if isinstance(given, (list, tuple)) and isinstance(validated, (list, tuple)):
        for i, (g, v) in enumerate(zip(given, validated)):
            check_strict_value(f"{key}.{i}", g, v)
        return
    if isinstance(given, bool) and not isinstance(validated, bool):
        raise ConfigKeyError(key, f"key '{key}': expected a number, got the boolean {str(given).lower()}")
    if isinstance(given, str) and isinstance(validated, (int, float)) and not isinstance(validated, bool):
        raise ConfigKeyError(key, f"key '{key}': expected a number, got the string {given!r}")
    if isinstance(validated, float) and not math.isfinite(validated):
        raise ConfigKeyError(key, f"key '{key}': expected a finite number, got {validated}")
