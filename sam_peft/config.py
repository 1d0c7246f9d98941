"""Run configuration: schema, YAML loading, dotted overrides and one-line validation errors.

A run config is a YAML mapping. Every key has a default except `task`; `method` is a mapping
with `name` and that method's own options. Errors name the file and line of the offending key,
or the override that introduced it, and suggest the closest known key.

This module is the schema only, on the bottom floor: loader.py builds run configs from it and
checks them against the task table and the method registry (the method's own Options model);
identity.py turns a config into its run id.
"""

from __future__ import annotations

import difflib
import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from sam_peft.errors import ConfigKeyError, UserError

# Seeds feed torch, numpy and Python generators (and seed + epoch the data order): a 32-bit
# range fits them all.
SEED_LIMIT = 2**32


class Strict(BaseModel):
    """Base for config sections: unknown keys are errors, and types are strict: `true` is not 1,
    2.5 is not a whole number, and `.inf` or `.nan` is not a number anywhere."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class TrainConfig(Strict):
    # The paper's protocol (its authors' scripts/train.sh): batch 16, lr 1e-4, 256 tokens, eval every 500 steps,
    # stop after 40 evaluations without improvement once 20,000 steps are done.
    batch_size: int = Field(16, ge=1)
    eval_batch_size: int = Field(64, ge=1)
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    adam_betas: tuple[float, float] = (0.9, 0.999)  # each in [0, 1), as torch's AdamW requires
    adam_eps: float = Field(1e-8, gt=0)
    # Warmup is a proportion of the schedule's horizon, then linear decay to 0 at its end. The
    # horizon is max_steps, or `schedule_epochs` epochs of the train split when set: the authors'
    # jiant script set 10,000 epochs, so its lr barely ramped within the steps that ran (it stopped
    # at max_steps long before). `warmup_steps` sets a fixed warmup count instead of the proportion.
    warmup: float = Field(0.1, ge=0, lt=1)
    warmup_steps: int | None = Field(None, ge=0)
    schedule_epochs: int | None = Field(None, ge=1)
    max_steps: int = Field(40000, ge=1)
    eval_every: int = Field(500, ge=1)
    patience: int = Field(40, ge=1)
    min_steps: int = Field(20000, ge=0)
    max_seq_len: int = Field(256, ge=8)
    grad_clip: float = Field(1.0, ge=0)  # 0 disables clipping
    # None: the whole val split at every evaluation. The authors' code used the first 500.
    val_subset: int | None = Field(None, ge=1)
    # None: train metrics on the whole train split; N: on its first N examples (a cheaper check of fit).
    train_eval_subset: int | None = Field(None, ge=1)
    # auto: bf16 autocast on a GPU that has it and on a CPU with native bf16 (AVX512-BF16 or AMX),
    # where it left the stand-in's means over seeds unchanged (README, `train.precision`); fp32 elsewhere.
    # bf16 on a CPU is used as asked (emulated, and much slower, without those instructions).
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    # false (default): a fresh seeded shuffle every epoch, as jiant's shuffled train set. true:
    # length-grouped batches, faster (less padding) but many pairs of examples share a batch again
    # from one epoch to the next, which removes part of the seed-to-seed variance.
    group_by_length: bool = False
    compile: bool = False  # torch.compile the encoder (GPU; slow to start)
    dropout: float | None = Field(None, ge=0, lt=1)  # None: the encoder config's hidden dropout
    # The task head's initialisation: torch's nn.Linear default (as jiant's heads), or HF's
    # normal(0, initializer_range) with zero biases.
    head_init: Literal["torch_default", "hf_normal"] = "torch_default"
    # Train loss every N steps to train_log.jsonl (0: off). None: max(1, min(50, max_steps // 100)),
    # so that a short run still gets a curve of about 100 points.
    log_every: int | None = Field(None, ge=0)
    # Save the training state for resuming: "eval" at every evaluation, N every N steps, 0 never.
    checkpoint_every: Annotated[int, Field(ge=0)] | Literal["eval"] = "eval"
    tensorboard: bool = False  # also write curves to <run_dir>/tb

    @field_validator("adam_betas", mode="before")
    @classmethod
    def _betas_from_yaml_list(cls, value):
        return tuple(value) if isinstance(value, list) else value  # YAML has lists, not tuples

    @field_validator("adam_betas")
    @classmethod
    def _betas_in_range(cls, value):
        if not all(0 <= b < 1 for b in value):
            raise ValueError(f"each beta must be in [0, 1), got {list(value)}")
        return value

    @model_validator(mode="after")
    def _one_warmup(self):
        if self.schedule_epochs is not None and self.warmup_steps is not None:
            raise ConfigKeyError("train.schedule_epochs",
                                 "key 'train.schedule_epochs': train.warmup_steps is set too; the schedule's warmup "
                                 "is train.warmup x its horizon of schedule_epochs epochs: set one of them")
        return self

    @model_validator(mode="after")
    def _scale_log_every(self):
        if self.log_every is None:
            self.log_every = max(1, min(50, self.max_steps // 100))
        return self


class DataConfig(Strict):
    # Table 2 (data perturbation): remove a seeded random fraction of the train split.
    drop_fraction: float = Field(0.0, ge=0, lt=1)
    drop_seed: int = Field(0, ge=0, lt=SEED_LIMIT)


class RunConfig(Strict):
    model: str = "roberta-base"  # Hugging Face name or local path, or "tiny" (random, offline)
    data_dir: str = "data"  # jiant layout; "demo" = the built-in example data
    task: str
    method: dict[str, Any] = Field(default_factory=lambda: {"name": "sam"})
    seed: int = Field(0, ge=0, lt=SEED_LIMIT)
    label: str | None = None  # display name in tables and plots (default: the method name)
    output_dir: str = "runs"
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # torch intra-op threads for this run (None: torch's default). Float results can depend on
    # it, so executors set it explicitly to give every run the same number wherever it runs.
    threads: int | None = Field(None, ge=1)
    train: TrainConfig = Field(default_factory=TrainConfig)
    data: DataConfig = Field(default_factory=DataConfig)


# ---------------------------------------------------------------- loading and overrides


class ConfigLoader(yaml.SafeLoader):
    """YAML for config files and overrides: SafeLoader, but a key given twice in one mapping is an
    error (plain YAML keeps the last one silently), and `1e-4` is a number as in YAML 1.2 (PyYAML
    reads an exponent without a decimal point as a string)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            first: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # `<<: *anchor` merges; keys written here may override merged ones
                key = self.construct_object(key_node, deep=True)
                try:
                    earlier = first.setdefault(key, key_node)
                except TypeError:
                    continue  # an unhashable key: the constructor below reports it
                if earlier is not key_node:
                    raise DuplicateKeyError(key, earlier.start_mark, key_node.start_mark)
        return super().construct_mapping(node, deep)


ConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


class DuplicateKeyError(yaml.constructor.ConstructorError):
    def __init__(self, key, first_mark, mark):
        super().__init__(None, None, f"key '{key}' is given twice in one mapping (first at line {first_mark.line + 1})",
                         mark)


def load_yaml_text(text: str):
    return yaml.load(text, Loader=ConfigLoader)  # noqa: S506 - ConfigLoader is a SafeLoader


def parse_overrides(items: list[str]) -> list[tuple[str, Any]]:
    """`a.b=value` strings -> (dotted key, YAML-typed value)."""
    out = []
    for item in items:
        if "=" not in item:
            raise UserError(f"override '{item}': expected key=value, e.g. method.density=0.01")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key or any(not part for part in key.split(".")):
            raise UserError(f"override '{item}': empty key")
        try:
            value = load_yaml_text(raw) if raw.strip() else ""
        except DuplicateKeyError as e:
            raise UserError(f"override '{item}': {e.problem.split(' (first')[0]}") from None
        except yaml.YAMLError as e:
            # Anything else that is not YAML is meant as a plain string (label=a: b), unless it
            # opens a list, a mapping or a quote that it never closes.
            opener = raw.strip()[:1]
            what = {"[": "list", "{": "mapping", '"': "quoted string", "'": "quoted string"}.get(opener)
            if what:
                problem = getattr(e, "problem", None) or str(e).splitlines()[0]
                example = f"; e.g. {key}=[a, b]" if what == "list" else ""
                raise UserError(f"override '{item}': malformed {what} ({problem}){example}") from None
            value = raw
        out.append((key, value))
    return out


def set_dotted(tree: dict, key: str, value: Any, where: str) -> None:
    node = tree
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise UserError(f"{where}: '{part}' is not a mapping")
        node = child
    node[parts[-1]] = value


def key_lines(text: str) -> dict[tuple, int]:
    """Map each key path of a YAML mapping to its 1-based line, for error messages."""
    lines: dict[tuple, int] = {}

    def walk(node, path):
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                p = path + (k.value,)
                lines[p] = k.start_mark.line + 1
                walk(v, p)
        elif isinstance(node, yaml.SequenceNode):
            for i, v in enumerate(node.value):
                lines[path + (i,)] = v.start_mark.line + 1
                walk(v, path + (i,))

    try:
        walk(yaml.compose(text), ())
    except yaml.YAMLError:
        pass
    return lines


def read_yaml(path: str | Path) -> tuple[dict, dict[tuple, int]]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such config file")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror})") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise UserError(f"{path}:{line}: not UTF-8 text (byte 0x{data[e.start]:02x}); save the file as UTF-8") from None
    try:
        tree = load_yaml_text(text)
    except DuplicateKeyError as e:
        raise UserError(f"{path}:{e.problem_mark.line + 1}: {e.problem}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise UserError(f"{path}{line}: invalid YAML ({problem})") from None
    if tree is None:
        tree = {}
    if not isinstance(tree, dict):
        raise UserError(f"{path}: expected a mapping of config keys at the top level")
    return tree, key_lines(text)


def _known_keys(model: type[BaseModel]) -> list[str]:
    return list(model.model_fields)


def _model_at(path: tuple) -> type[BaseModel] | None:
    """The pydantic model that owns the mapping at `path` in a run config."""
    node: type[BaseModel] = RunConfig
    for part in path:
        field = node.model_fields.get(part) if isinstance(part, str) else None
        ann = getattr(field, "annotation", None)
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            node = ann
        else:
            return None
    return node


def locate(loc: tuple, source: str, lines: dict, overrides: dict[str, str] | None = None) -> str:
    """Where the key at `loc` came from: its override, else the line of its nearest listed ancestor.

    A `lines` value is normally a line number of `source`; it may also be a ready-made place
    (a string), which is how a sweep points each run key back at the sweep file line or the
    command-line override that set it.
    """
    for n in range(len(loc), 0, -1):  # an override replaced everything below its key
        dotted = ".".join(str(x) for x in loc[:n])
        if overrides and dotted in overrides:
            return f"override '{overrides[dotted]}'"
    dotted = ".".join(str(x) for x in loc)
    below = [item for key, item in (overrides or {}).items() if key.startswith(dotted + ".")]
    if below and loc not in lines:  # an override created this key (`trian.lr=...` makes `trian`)
        return f"override '{below[0]}'"
    for n in range(len(loc), 0, -1):
        if loc[:n] in lines:
            at = lines[loc[:n]]
            return at if isinstance(at, str) else f"{source}:{at}"
    return source


def format_validation_error(
    err: ValidationError,
    source: str,
    lines: dict[tuple, int | str],
    overrides: dict[str, str] | None = None,
    prefix: tuple = (),
    known_keys=None,
) -> str:
    """First pydantic error -> 'file:line: key 'a.b': message (did you mean ...?)'."""
    e = err.errors()[0]
    loc = prefix + tuple(x for x in e["loc"] if not (isinstance(x, str) and x.startswith("function-")))
    dotted = ".".join(str(x) for x in loc)
    where = locate(loc, source, lines, overrides)
    if e["type"] == "extra_forbidden":
        parent = loc[:-1]
        known = known_keys(parent) if known_keys else None
        if known is None:
            model = _model_at(parent)
            known = _known_keys(model) if model else []
        guess = [ALIASES[loc[-1]]] if ALIASES.get(loc[-1]) in known else difflib.get_close_matches(str(loc[-1]), known, n=1)
        hint = f" (did you mean '{'.'.join(map(str, parent + (guess[0],)))}'?)" if guess else ""
        return f"{where}: unknown key '{dotted}'{hint}"
    if e["type"] == "missing":
        return f"{where}: missing required key '{dotted}'"
    msg = message_of(e)
    return f"{where}: key '{dotted}': {msg}" if dotted else f"{where}: {msg}"


_EXPECTED = {"int_type": "a whole number", "float_type": "a number", "bool_type": "true or false",
             "string_type": "a string", "tuple_type": "a list", "dict_type": "a mapping"}


# Names other tools give these settings (HF TrainingArguments, run_glue, common usage): an unknown
# key spelled so is answered with ours.
ALIASES = {"learning_rate": "lr", "per_device_train_batch_size": "batch_size", "train_batch_size": "batch_size",
           "per_device_eval_batch_size": "eval_batch_size", "max_seq_length": "max_seq_len",
           "max_length": "max_seq_len", "max_grad_norm": "grad_clip", "warmup_ratio": "warmup",
           "num_steps": "max_steps", "eval_steps": "eval_every", "logging_steps": "log_every",
           "early_stopping_patience": "patience", "adam_epsilon": "adam_eps", "sparsity": "density",
           "model_name_or_path": "model", "output": "output_dir", "data": "data_dir"}


def message_of(e: dict) -> str:
    """pydantic's message, said in the config's own terms (strict types: what was given instead)."""
    kind, given = e["type"], e.get("input")
    if kind == "finite_number":
        return f"expected a finite number, got {given}"
    bounds = {"greater_than": ("gt", "greater than"), "greater_than_equal": ("ge", "greater than or equal to"),
              "less_than": ("lt", "less than"), "less_than_equal": ("le", "less than or equal to")}
    if kind in bounds:
        key, words = bounds[kind]
        return f"expected a number {words} {(e.get('ctx') or {}).get(key)}, got {json.dumps(given)}"
    if kind in ("float_parsing", "int_parsing", "int_from_float"):  # lax models (a method's options)
        what = "a whole number" if kind.startswith("int") else "a number"
        return f"expected {what}, got {json.dumps(given) if not isinstance(given, str) else repr(given)}"
    if kind in _EXPECTED:
        if isinstance(given, bool):
            return f"expected {_EXPECTED[kind]}, got the boolean {str(given).lower()}"
        if isinstance(given, str):
            return f"expected {_EXPECTED[kind]}, got the string {given!r}"
        if isinstance(given, (int, float, list, dict)) or given is None:
            return f"expected {_EXPECTED[kind]}, got {json.dumps(given)}"
    return e["msg"].removeprefix("Value error, ")


def config_dict(cfg: RunConfig) -> dict:
    """The resolved config as plain YAML-able data (defaults filled in)."""
    return json.loads(cfg.model_dump_json())
