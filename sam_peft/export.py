"""A sam-peft result for the Hugging Face stack: a merged checkpoint, or a PEFT SHiRA adapter.

    sam-peft export out/rte/delta.safetensors --merged rte-merged [--base PATH_OR_NAME]
    AutoModelForSequenceClassification.from_pretrained("rte-merged")   # the fine-tuned model
    sam-peft export out/rte --peft rte-shira                            # PeftModel.from_pretrained(base, ...)

A delta written by the Trainer integration (hf.SparseFineTuning) records what the export needs:
the model class (config.architectures), the labels (num_labels, id2label, label2id,
problem_type) and the base model's name or path; `--base` names the base where it moved. The
base is loaded with that class and config, the delta applied (its base fingerprint checked), and
the model saved with `save_pretrained` with the base's tokenizer where it has one. The folder is
written beside OUT under a temporary name and renamed when complete: a failure leaves nothing.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from sam_peft import delta as delta_lib
from sam_peft.delta import CONFIG_FIELDS
from sam_peft.errors import UserError
from sam_peft.io import unwritable_folder_reason, write_error

DELTA_FILE = "delta.safetensors"


def _delta_file(path: Path) -> Path:
    if path.is_dir():
        if (path / DELTA_FILE).is_file():
            return path / DELTA_FILE
        raise UserError(f"{path}: no {DELTA_FILE} in this folder")
    return path


def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out}: exists and is not an empty folder; name a new one")
    reason = unwritable_folder_reason(out.parent)
    if reason:
        raise UserError(f"{out}: cannot be written ({reason})")


def _source(delta_or_dir, base: str | None):
    """(delta path, metadata, HF record, base) of a Trainer delta, or a one-line UserError."""
    path = _delta_file(Path(delta_or_dir))
    meta = delta_lib.read_metadata(path)
    if "hf" not in meta:
        raise UserError(f"{path}: records no Hugging Face model class (a delta of `sam-peft run`, or of an "
                        f"older sam-peft); export takes deltas of sam_peft.hf.SparseFineTuning")
    base = base or meta.get("base_model")
    if not base:
        raise UserError(f"{path}: records no base model; name it with --base")
    return path, meta, json.loads(meta["hf"]), base


def _load_base(path: Path, record: dict, base: str):
    """The base model, built with the class and labels the delta records."""
    import transformers

    arch = record["architectures"][0]
    cls = getattr(transformers, arch, None)
    if cls is None:
        raise UserError(f"{path}: model class '{arch}' is not in transformers {transformers.__version__}")
    fields = {k: record[k] for k in CONFIG_FIELDS if k in record}
    if "id2label" in fields:  # JSON made the integer keys strings
        fields["id2label"] = {int(k): v for k, v in fields["id2label"].items()}
    try:
        config = transformers.AutoConfig.from_pretrained(base, **fields)
        return cls.from_pretrained(base, config=config)
    except (OSError, ValueError) as e:
        raise UserError(f"{base}: cannot load the base model ({str(e).splitlines()[0][:160]})") from None


def _write_folder(out: Path, write) -> Path:
    """`write(folder)` into a temporary folder beside `out`, renamed to `out` when complete."""
    tmp = out.with_name(f".{out.name}.tmp-export")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        write(tmp)
        if out.exists():
            out.rmdir()  # empty, checked before
        tmp.rename(out)
    except OSError as e:
        raise write_error(out, e) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def is_run_dir(path) -> bool:
    """A run directory of `sam-peft run` (its config beside the delta), not a Trainer's output."""
    return (Path(path) / "config.yaml").is_file() and (Path(path) / "result.json").is_file()


def merged(delta_or_dir, out, base: str | None = None, log=print) -> Path:
    """Write base + delta as a plain Hugging Face checkpoint folder `out`; returns its path. A run
    directory of `sam-peft run` goes to run_export (the encoder, and the head beside it)."""
    import transformers

    if is_run_dir(delta_or_dir):
        if base:
            raise UserError(f"{delta_or_dir}: a run directory rebuilds its base from its config.yaml; drop --base")
        return run_export(delta_or_dir, out)
    path, _, record, base = _source(delta_or_dir, base)
    out = Path(out)
    _check_out(out)
    model = _load_base(path, record, base)
    delta_lib.apply(model, path)  # one-line UserError if the base differs from the delta's
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(base)
    except Exception as e:  # no tokenizer files; transformers' errors here vary by version and model
        tokenizer = None
        log(f"{base}: no tokenizer to copy ({type(e).__name__}); {out} holds the model only")

    def write(folder: Path) -> None:
        model.save_pretrained(folder)
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)

    return _write_folder(out, write)


HEAD_FILE = "head.safetensors"


def run_export(run_dir, out) -> Path:
    """A `sam-peft run` result as files the Hugging Face stack reads: the fine-tuned encoder as a
    plain checkpoint (`AutoModel.from_pretrained(out)`), its tokenizer, and the task head, whose
    jiant-style shape (pooler -> dense -> tanh -> out_proj; span pooling for WSC) matches no
    `*ForSequenceClassification` class, as head.safetensors with the task in its metadata.
    load_run_export(out) rebuilds the whole model. Needs the run's data, as `sam-peft eval` does
    (the `tiny` model's tokenizer is trained on it)."""
    import contextlib

    from safetensors.torch import save_file

    from sam_peft.run import rebuild_run

    out = Path(out)
    _check_out(out)
    built, _ = rebuild_run(run_dir, "test")
    method = built.method
    if method.category == "added":
        raise UserError(f"{run_dir}: a {method.name} run adds modules to the encoder, which AutoModel cannot load; "
                        f"`sam-peft eval` rebuilds it from the base and the delta")
    if not isinstance(method.eval_weights(built.model, "test"), contextlib.nullcontext):
        raise UserError(f"{run_dir}: the {method.name} run's evaluations see other weights than the trained ones "
                        f"(e.g. Mixout's eval_reset), which a checkpoint cannot hold")
    spec, model = built.spec, built.model
    meta = {"format": "sam-peft-head/1", "task": spec.name, "kind": spec.kind,
            "labels": json.dumps(list(spec.labels or ())), "head": type(model.head).__name__}

    def write(folder: Path) -> None:
        model.encoder.save_pretrained(folder)
        built.tokenizer.save_pretrained(folder)
        save_file({k: v.detach().cpu().contiguous() for k, v in model.head.state_dict().items()},
                  str(folder / HEAD_FILE), metadata=meta)

    return _write_folder(out, write)


def load_run_export(folder):
    """The TaskModel of a run_export folder: AutoModel's encoder and the head from head.safetensors."""
    from safetensors import safe_open
    from safetensors.torch import load_file
    from transformers import AutoModel

    from sam_peft.model import TaskModel
    from sam_peft.tasks import get_task

    folder = Path(folder)
    with safe_open(str(folder / HEAD_FILE), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != "sam-peft-head/1":
        raise UserError(f"{folder / HEAD_FILE}: not a sam-peft head file")
    model = TaskModel(AutoModel.from_pretrained(folder), get_task(meta["task"]))
    model.head.load_state_dict(load_file(str(folder / HEAD_FILE)))
    return model.eval()


def _read_entries(path: Path) -> tuple[dict, dict]:
    """({name: (sorted flat indices, deltas)}, {name: whole tensor}) of a delta file."""
    from safetensors import safe_open

    sparse, whole = {}, {}
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
        for name in sorted({k.split("::")[0] for k in keys} - {"__empty__"}):
            if name in keys:
                whole[name] = f.get_tensor(name)
            else:
                sparse[name] = (f.get_tensor(f"{name}::index").long(), f.get_tensor(f"{name}::delta"))
    return sparse, whole


def peft_shira(delta_or_dir, out, base: str | None = None, log=print) -> Path:
    """Write a Trainer delta as a PEFT SHiRA adapter folder `out` (PeftModel.from_pretrained(base, out)).

    SHiRA holds nn.Linear weights only, with r x (in + out) entries in every adapted layer and one r
    for all: r is the smallest that holds the densest layer, and each layer is padded with unchosen
    entries of value 0. Whole trained modules (the task head) go to `modules_to_save`. Entries
    outside Linear weights are refused (export those deltas with `merged`). The adapter adds each
    value to the base weight, so about 3% of entries land one float32 rounding away from the trained
    value (sam-peft's own deltas store those exactly).
    """
    import math

    import torch
    from torch import nn

    if is_run_dir(delta_or_dir):
        raise UserError(f"{delta_or_dir}: a `sam-peft run` result, whose jiant-style head fits no model class PEFT "
                        f"adapts; export it with --merged (the encoder, and the head beside it)")
    try:
        from peft import ShiraConfig, get_peft_model
    except ImportError:
        raise UserError("--peft needs the `peft` package: pip install peft") from None
    path, meta, record, base = _source(delta_or_dir, base)
    out = Path(out)
    _check_out(out)
    model = _load_base(path, record, base)
    eligible = set(json.loads(meta.get("eligible", "[]")))
    named, modules = dict(model.named_parameters()), dict(model.named_modules())
    theta0 = {n: named[n] for n in eligible if n in named}
    if theta0 and delta_lib.base_fingerprint(theta0) != meta.get("base_fingerprint"):
        raise UserError(f"{path}: made from a different base model than '{base}' gives now")
    sparse, whole = _read_entries(path)

    def linear(name: str) -> nn.Linear | None:
        module = modules.get(name.rpartition(".")[0])
        return module if name.endswith(".weight") and isinstance(module, nn.Linear) else None

    outside = {n: int(idx.numel()) for n, (idx, _) in sparse.items() if linear(n) is None}
    outside.update({n: named[n].numel() for n in whole if n in eligible})  # eligible tensors stored whole
    if outside:
        where = ", ".join(f"{n}: {c:,}" for n, c in sorted(outside.items(), key=lambda x: -x[1])[:3])
        raise UserError(f"{path}: {sum(outside.values()):,} entries in {len(outside)} tensors lie outside nn.Linear "
                        f"weights ({where}{', ...' if len(outside) > 3 else ''}), which SHiRA cannot hold; "
                        f"export with --merged, or select among Linear weights only")
    heads = sorted({n.rpartition(".")[0] for n in whole})
    for head in heads:
        own = {f"{head}.{p}" for p, _ in modules[head].named_parameters(recurse=False)}
        if not own <= set(whole):
            raise UserError(f"{path}: module '{head}' trained only in part; SHiRA saves whole modules")
    layers = {n: linear(n) for n in sparse}
    r = max(math.ceil(idx.numel() / (m.in_features + m.out_features)) for n, m in layers.items()
            for idx in [sparse[n][0]])
    too_small = [n for n, m in layers.items() if r * (m.in_features + m.out_features) > m.weight.numel()]
    if too_small:
        raise UserError(f"{path}: SHiRA's r = {r} needs more entries than '{too_small[0]}' has; export with --merged")
    masks, values = {}, {}
    for name, module in layers.items():
        idx, delta = sparse[name]
        want = r * (module.in_features + module.out_features)
        taken = torch.zeros(module.weight.numel(), dtype=torch.bool)
        taken[idx] = True
        pad = torch.nonzero(~taken).squeeze(1)[: want - idx.numel()]  # unchosen entries, value 0
        chosen = torch.sort(torch.cat([idx, pad])).values
        value = torch.zeros(module.weight.numel(), dtype=torch.float32)
        value[idx] = delta.float()
        masks[id(module)] = taken.index_fill_(0, pad, True).view_as(module.weight)
        values[name.rpartition(".")[0]] = value[chosen]
    with torch.no_grad():
        for name, tensor in whole.items():
            named[name].copy_(tensor)  # the head's trained values, then copied into modules_to_save
    config = ShiraConfig(r=r, target_modules=sorted(values), modules_to_save=heads or None)
    config.mask_fn = lambda base_layer, r, **kwargs: masks[id(base_layer)].to(base_layer.weight.dtype)
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, value in values.items():
            layer = peft_model.base_model.model.get_submodule(name)
            layer.shira_weight["default"].copy_(value.to(layer.shira_weight["default"].dtype))
    return _write_folder(out, peft_model.save_pretrained)
