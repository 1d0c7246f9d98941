"""Files that appear whole or not at all: write to a temporary name, then rename.

A write that fails for want of space or permission (the disk is full, the folder is read-only)
raises WriteError: one line naming the file, and the temporary file is removed, so a full disk
keeps no half-written file holding the space. A temporary file left by a killed process
(`.NAME.tmp<pid>`, whose process no longer runs) is removed by the next write of NAME.

JSON is standard JSON: a number that is not finite (a diverged loss) is written as null.
"""

from __future__ import annotations

import glob
import hashlib
import json
import math
import os
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import yaml

from sam_peft.errors import WriteError


def temp_path(path: Path) -> Path:
    """This process's temporary name for `path`, in the same folder (so the rename is atomic)."""
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. another user's process: it exists
        return True
    return True


def remove_stale_temps(path: str | Path) -> None:
    """Remove the temporary files of `path` whose writing process no longer runs."""
    path = Path(path)
    prefix = f".{path.name}.tmp"
    for tmp in path.parent.glob(glob.escape(prefix) + "*"):
        pid = tmp.name[len(prefix):]
        if pid.isdigit() and int(pid) != os.getpid() and not _running(int(pid)):
            tmp.unlink(missing_ok=True)


def os_error_in(e: BaseException) -> OSError | None:
    """The OSError behind a failed write: `e` itself, one in its chain (torch.save wraps it in a
    RuntimeError), or one named in the message (safetensors says '... (os error 28)')."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError):
            return e
        named = re.search(r"os error (\d+)", str(e))
        if named:
            code = int(named.group(1))
            return OSError(code, os.strerror(code))
        e = e.__cause__ or e.__context__
    return None


def write_error(path: str | Path, e: OSError) -> WriteError:
    return WriteError(f"{path}: cannot write ({e.strerror or e})")


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yields a temporary path to write; renamed to `path` when the block ends without error,
    removed otherwise. A failure to write (no space, no permission) becomes a WriteError."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        remove_stale_temps(path)
        yield tmp
        os.replace(tmp, path)
    except Exception as e:
        cause = os_error_in(e)
        if cause is None:
            raise
        raise write_error(path, cause) from None
    finally:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass


def make_folder(path: str | Path) -> Path:
    """mkdir -p, or a WriteError naming the folder (a file in the way, no permission, no space)."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise WriteError(f"{path}: cannot create this folder, a file is in the way") from None
    except OSError as e:
        raise write_error(path, e) from None
    return path


def unwritable_folder_reason(path: str | Path) -> str | None:
    """Why files cannot be written into the folder `path` (created if missing), or None if they
    can: checked before any work starts, so that a bad output folder fails in one line at once."""
    path = Path(path)
    probe = path
    while not probe.exists():
        if probe.is_symlink():
            return f"{probe} is a broken link"
        probe = probe.parent
    if not probe.is_dir():
        return f"{probe} is a file, not a folder" if probe == path else f"{probe} is a file, not a folder, so {path} cannot be created"
    so = "" if probe == path else f", so {path} cannot be created"
    if hasattr(os, "statvfs") and os.statvfs(probe).f_flag & getattr(os, "ST_RDONLY", 1):
        return f"{probe} is on a read-only file system{so}"
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"{probe} is not writable by this user{so}"
    return None


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def plain(obj):
    """`obj` as standard JSON data: tensors and numpy scalars as numbers, paths as strings, and
    numbers that are not finite (nan, inf) as None, since JSON has no spelling for them."""
    if isinstance(obj, dict):
        return {k: plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item") and not isinstance(obj, (str, bytes)):
        return plain(obj.item())
    if obj is None or isinstance(obj, (str, int, bool)):
        return obj
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def dumps(obj, **kwargs) -> str:
    return json.dumps(plain(obj), allow_nan=False, **kwargs)


def atomic_write_json(path: str | Path, obj) -> None:
    atomic_write_text(path, dumps(obj, indent=2, sort_keys=False) + "\n")


def atomic_write_yaml(path: str | Path, obj) -> None:
    atomic_write_text(path, yaml.safe_dump(obj, sort_keys=False))


def append_jsonl(path: str | Path, record: dict) -> None:
    """One whole line per call, flushed to disk (a crash loses at most the line being written).
    A write that fails (no space) is undone: the file keeps its earlier lines and nothing else."""
    data = (dumps(record) + "\n").encode()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    except OSError as e:
        raise write_error(path, e) from None
    try:
        start = os.lseek(fd, 0, os.SEEK_END)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        except OSError as e:
            os.ftruncate(fd, start)
            raise write_error(path, e) from None
    finally:
        os.close(fd)


def atomic_torch_save(path: str | Path, obj) -> None:
    import torch

    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def read_jsonl_prefix(path: str | Path, max_step: int | None = None) -> list[dict]:
    """Records of a jsonl log, stopping at a line cut short by a crash (only the last line can be)
    and, if given, at the first record whose step is beyond max_step."""
    out = []
    path = Path(path)
    if not path.is_file():
        return out
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            break
        if max_step is not None and rec.get("step", 0) > max_step:
            break
        out.append(rec)
    return out


def truncate_jsonl(path: str | Path, max_step: int) -> None:
    """Keep the records up to max_step (resuming from a checkpoint taken at that step)."""
    path = Path(path)
    if path.is_file():
        records = read_jsonl_prefix(path, max_step)
        atomic_write_text(path, "".join(dumps(r) + "\n" for r in records))


# ---------------------------------------------------------------- identity by content

_SHA256: dict[tuple, str] = {}  # (path, size, mtime, inode) -> sha256: each file is read once per process


def file_sha256(path: str | Path) -> str:
    path = Path(path).resolve()
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns, st.st_ino)
    if key not in _SHA256:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        _SHA256[key] = digest.hexdigest()
    return _SHA256[key]


def folder_fingerprint(folder: str | Path) -> str:
    """sha256 over the relative names and contents of a folder's files (hidden ones left out, such
    as .git): the same files give the same fingerprint wherever the folder is and however its path
    is spelled."""
    folder = Path(folder)
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if any(part.startswith(".") for part in rel.parts) or not path.is_file():
            continue
        digest.update(f"{rel.as_posix()}\0{file_sha256(path)}\n".encode())
    return digest.hexdigest()


def read_json(path: str | Path) -> object:
    """A JSON file, or a one-line UserError naming it (not text, not JSON, unreadable)."""
    from sam_peft.errors import UserError

    path = Path(path)
    try:
        return json.loads(path.read_text())
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a text file") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON, truncated or corrupt ({e.msg} at line {e.lineno})") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror})") from None
