"""A sam-peft result for the Hugging Face stack: a merged checkpoint that the model's own class loads.

    sam-peft export out/rte/delta.safetensors --merged rte-merged [--base PATH_OR_NAME]
    AutoModelForSequenceClassification.from_pretrained("rte-merged")   # the fine-tuned model

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
from sam_peft.errors import UserError
from sam_peft.io import unwritable_folder_reason, write_error

# Config fields a Trainer delta records (hf.SparseFineTuning.save_delta) and the export restores.
CONFIG_FIELDS = ("architectures", "num_labels", "id2label", "label2id", "problem_type")
DELTA_FILE = "delta.safetensors"


def hf_record(model) -> dict:
    """What merged() needs to rebuild `model`'s class from its base: stored in a delta's metadata."""
    config = getattr(model, "config", None)
    record = {"architectures": [type(model).__name__]}
    if config is not None:
        record.update({k: getattr(config, k) for k in CONFIG_FIELDS[1:] if getattr(config, k, None) is not None})
    return record


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


def merged(delta_or_dir, out, base: str | None = None, log=print) -> Path:
    """Write base + delta as a plain Hugging Face checkpoint folder `out`; returns its path."""
    import transformers

    path = _delta_file(Path(delta_or_dir))
    meta = delta_lib.read_metadata(path)
    out = Path(out)
    if "hf" not in meta:
        raise UserError(f"{path}: records no Hugging Face model class (a delta of `sam-peft run`, or of an "
                        f"older sam-peft); merged export takes deltas of sam_peft.hf.SparseFineTuning")
    record = json.loads(meta["hf"])
    base = base or meta.get("base_model")
    if not base:
        raise UserError(f"{path}: records no base model; name it with --base")
    _check_out(out)
    arch = record["architectures"][0]
    cls = getattr(transformers, arch, None)
    if cls is None:
        raise UserError(f"{path}: model class '{arch}' is not in transformers {transformers.__version__}")
    fields = {k: record[k] for k in CONFIG_FIELDS if k in record}
    if "id2label" in fields:  # JSON made the integer keys strings
        fields["id2label"] = {int(k): v for k, v in fields["id2label"].items()}
    try:
        config = transformers.AutoConfig.from_pretrained(base, **fields)
        model = cls.from_pretrained(base, config=config)
    except (OSError, ValueError) as e:
        raise UserError(f"{base}: cannot load the base model ({str(e).splitlines()[0][:160]})") from None
    delta_lib.apply(model, path)  # one-line UserError if the base differs from the delta's
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(base)
    except (OSError, ValueError, TypeError):
        tokenizer = None
        log(f"{base}: no tokenizer to copy; {out} holds the model only")
    tmp = out.with_name(f".{out.name}.tmp-export")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if out.exists():
            out.rmdir()  # empty, checked above
        tmp.rename(out)
    except OSError as e:
        raise write_error(out, e) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
