"""Per-run deltas: what fine-tuning changed, as a small safetensors file, and applying it back.

Layout of delta.safetensors (format "sam-peft-delta/1"):
- `NAME` (whole tensor): the head, parameters a method added (adapters, LoRA), and eligible
  tensors where more than half of the entries changed (storing indices would cost more).
- `NAME::index` + `NAME::delta`: flat indices (int32 when they fit) of the entries of a
  pretrained tensor that differ from theta0, and theta - theta0 at them.
- `NAME::fix_index` + `NAME::fix_value`: the rare entries where theta0 + (theta - theta0)
  does not round back to theta in the parameter's dtype (the subtraction was inexact); their
  exact values. Together these make `apply` bit-exact.
Metadata records the base model, task, method and the resolved run config, and a fingerprint
of the base weights so that applying a delta to another base fails loudly.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save as save_bytes

from sam_peft.errors import UserError
from sam_peft.io import atomic_path

FORMAT = "sam-peft-delta/1"


def base_fingerprint(theta0: dict[str, torch.Tensor]) -> str:
    """Cheap identity of the base weights: shapes and float64 sums per tensor."""
    h = hashlib.sha256()
    for name in sorted(theta0):
        t = theta0[name].detach()
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(repr(round(float(t.double().sum()), 6)).encode())
        h.update(repr(round(float(t.double().abs().sum()), 6)).encode())
    return h.hexdigest()[:16]


def tokenizer_fingerprint(tokenizer) -> str:
    """Identity of a tokenizer's vocabulary (the `tiny` base differs per task only in this)."""
    vocab = sorted(tokenizer.get_vocab().items())
    return hashlib.sha256(json.dumps(vocab).encode()).hexdigest()[:16]


def changed_entries(p: torch.Tensor, p0: torch.Tensor) -> torch.Tensor:
    """Flat indices where p differs from p0 (bitwise for floats: NaN != NaN counts as changed)."""
    return torch.nonzero(p.detach().reshape(-1) != p0.reshape(-1)).squeeze(1)


def build(model: torch.nn.Module, theta0: dict[str, torch.Tensor], base_names: set[str]) -> tuple[dict, dict]:
    """Tensors for the delta and counts: n_changed over theta0's (eligible) tensors.

    Pretrained tensors outside theta0 (ineligible, frozen) must not have changed.
    """
    tensors: dict[str, torch.Tensor] = {}
    n_changed = 0
    n_whole = 0
    for name, p in model.named_parameters():
        p = p.detach()
        if name in theta0:
            p0 = theta0[name]
            idx = changed_entries(p, p0)
            n_changed += idx.numel()
            if idx.numel() == 0:
                continue
            if 2 * idx.numel() > p.numel():
                tensors[name] = p.cpu().contiguous()
                n_whole += 1
                continue
            flat, flat0 = p.reshape(-1), p0.reshape(-1)
            diff = flat[idx] - flat0[idx]
            exact = (flat0[idx] + diff) == flat[idx]
            itype = torch.int32 if p.numel() < 2**31 else torch.int64
            tensors[f"{name}::index"] = idx.to(itype).cpu()
            tensors[f"{name}::delta"] = diff.cpu().contiguous()
            if not bool(exact.all()):
                bad = idx[~exact]
                tensors[f"{name}::fix_index"] = bad.to(itype).cpu()
                tensors[f"{name}::fix_value"] = flat[bad].cpu().contiguous()
        elif name in base_names:
            continue  # frozen pretrained tensor; run.py checks it is untouched
        else:
            tensors[name] = p.cpu().contiguous()  # head and added modules, whole
    return tensors, {"n_changed": n_changed, "n_whole_tensors": n_whole}


def save(path: str | Path, tensors: dict, metadata: dict) -> int:
    """Write atomically; returns the file size in bytes."""
    path = Path(path)
    meta = {"format": FORMAT, **{k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}}
    if not tensors:  # safetensors cannot write an empty file; keep a marker tensor
        tensors = {"__empty__": torch.zeros(0)}
    data = _deterministic(save_bytes(tensors, metadata=meta))
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return path.stat().st_size


def _deterministic(raw: bytes) -> bytes:
    """The same file with its JSON header's keys sorted. safetensors writes the header from a hash
    map, so its key order (and so the file's bytes and size) changed from one process to the next;
    sorted, the same delta is the same bytes. Offsets are relative to the data, which stays as is."""
    n = int.from_bytes(raw[:8], "little")
    header = json.dumps(json.loads(raw[8:8 + n]), sort_keys=True, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # the format pads the header to a multiple of 8 bytes
    return len(header).to_bytes(8, "little") + header + raw[8 + n:]


def read_metadata(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such delta file")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # safetensors raises its own error types for corrupt files
        raise UserError(f"{path}: not a readable safetensors file ({str(e).splitlines()[0][:120]})") from None
    if meta.get("format") != FORMAT:
        raise UserError(f"{path}: not a sam-peft delta (format {meta.get('format')!r})")
    return meta


@torch.no_grad()
def apply(model: torch.nn.Module, path: str | Path, check_base: bool = True, tokenizer=None) -> dict:
    """Load a delta into a model built from the same base (and wrapped by the same method)."""
    path = Path(path)
    meta = read_metadata(path)
    if check_base and tokenizer is not None and "tokenizer_fingerprint" in meta:
        if tokenizer_fingerprint(tokenizer) != meta["tokenizer_fingerprint"]:
            raise UserError(f"{path}: made with a different tokenizer than '{meta.get('base_model')}' gives now")
    params = dict(model.named_parameters())
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
        names = {k.split("::")[0] for k in keys} - {"__empty__"}
        missing = sorted(n for n in names if n not in params)
        if missing:
            raise UserError(f"{path}: tensor '{missing[0]}' has no parameter in the rebuilt model")
        if check_base and "base_fingerprint" in meta:
            theta0 = {n: params[n] for n in json.loads(meta.get("eligible", "[]")) if n in params}
            if theta0 and base_fingerprint(theta0) != meta["base_fingerprint"]:
                raise UserError(f"{path}: made from a different base model than '{meta.get('base_model')}' gives now")
        for name in sorted(names):
            p = params[name]
            if name in keys:
                value = f.get_tensor(name)
                if tuple(value.shape) != tuple(p.shape):
                    raise UserError(f"{path}: '{name}' has shape {tuple(value.shape)}, the model {tuple(p.shape)}")
                p.copy_(value.to(p.device, p.dtype))
                continue
            flat = p.view(-1)
            idx = f.get_tensor(f"{name}::index").long().to(p.device)
            if idx.numel() and (int(idx.max()) >= flat.numel() or int(idx.min()) < 0):
                raise UserError(f"{path}: '{name}' has indices outside the parameter's {flat.numel()} entries")
            flat[idx] = flat[idx] + f.get_tensor(f"{name}::delta").to(p.device, p.dtype)
            if f"{name}::fix_index" in keys:
                fix = f.get_tensor(f"{name}::fix_index").long().to(p.device)
                flat[fix] = f.get_tensor(f"{name}::fix_value").to(p.device, p.dtype)
    return meta


def _flat(tree: dict, prefix: str = "") -> dict:
    """Nested keys as dotted ones: {"train": {"lr": x}} -> {"train.lr": x}."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def check_delta_belongs(delta_path: Path, meta: dict, cfg, result: dict) -> None:
    """The delta must be this run folder's own: another run's delta of the same base (another
    seed, method or density, copied in) would load and evaluate without a word.

    Its metadata records the run id and the resolved config: the config must agree with the
    folder's config.yaml on every key both have that changes what a run computes (a key only one has
    comes from another sam-peft version; data_dir is compared through the run id), and the run id
    with the folder's result.json."""
    # Here, not at the top: the library (lib.py) reads and applies deltas without run configs.
    from sam_peft.config import config_dict
    from sam_peft.identity import PRESENTATION_KEYS

    theirs_id = meta.get("run_id")
    try:
        theirs = json.loads(meta.get("config", "null"))
    except ValueError:
        theirs = None
    if isinstance(theirs, dict):
        mine, other = _flat(config_dict(cfg)), _flat(theirs)
        for key in [k for k in mine if k in other and k not in PRESENTATION_KEYS and k != "data_dir"]:
            if mine[key] != other[key]:
                raise UserError(f"{delta_path}: the delta of another run ({theirs_id}): its {key} is "
                                f"{json.dumps(other[key])}, this folder's config.yaml has {json.dumps(mine[key])}")
    ours_id = result.get("run_id") if isinstance(result, dict) else None
    if theirs_id and ours_id and theirs_id != ours_id:
        raise UserError(f"{delta_path}: the delta of run {theirs_id}, but this folder holds run {ours_id} "
                        "(result.json)")


# Config fields a Trainer delta records (hf.SparseFineTuning.save_delta) and the export restores.
CONFIG_FIELDS = ("architectures", "num_labels", "id2label", "label2id", "problem_type")


def hf_record(model) -> dict:
    """What export.merged() needs to rebuild `model`'s class from its base: stored in a delta's metadata."""
    config = getattr(model, "config", None)
    record = {"architectures": [type(model).__name__]}
    if config is not None:
        record.update({k: getattr(config, k) for k in CONFIG_FIELDS[1:] if getattr(config, k, None) is not None})
    return record
