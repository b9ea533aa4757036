"""Atomic, safe checkpoints.

Files are written to a temporary file in the same directory, flushed and fsynced, then
renamed over the destination (and the directory fsynced): a crash or a full disk at any
moment leaves the previous checkpoint intact. Loading always uses
``torch.load(weights_only=True)``, which refuses pickles that would run code.

Every checkpoint bida writes carries a SHA-256 digest of its contents (tensor bytes and
plain data) under :data:`CHECKSUM_KEY`; every load checks it, so a file damaged on disk
(a flipped bit in a tensor, which the zip container does not notice) is refused by name
instead of training on. Files without a digest (older bida checkpoints, public weights)
load as before.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from .errors import BidaError, CheckpointError, RunDirError


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file, fsync, rename).

    Raises:
        RunDirError: the directory is not writable or the disk is full; ``path`` is untouched.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as err:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise RunDirError(f"cannot write {path}: {err.strerror or err}") from None
    _fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


# Reserved top-level key of a bida checkpoint: "sha256:<hex>" of everything else in it.
CHECKSUM_KEY = "_bida_checksum"


def _digest_tree(tree: Any, digest: "hashlib._Hash") -> None:
    """Feed a state tree (dicts in their order, sequences, tensors, plain values) to ``digest``.

    A tensor contributes its dtype, shape and raw bytes; a plain value its type and repr
    (exact for floats). The walk is the same before ``torch.save`` and after ``torch.load``.
    """
    if isinstance(tree, dict):
        digest.update(b"{%d" % len(tree))
        for key, value in tree.items():
            digest.update(f"{type(key).__name__}:{key!r}".encode())
            _digest_tree(value, digest)
        digest.update(b"}")
    elif isinstance(tree, (list, tuple)):
        digest.update(b"[%d" % len(tree))
        for value in tree:
            _digest_tree(value, digest)
        digest.update(b"]")
    elif isinstance(tree, torch.Tensor):
        t = tree.detach().cpu().contiguous()
        digest.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        if t.numel():
            digest.update(t.reshape(-1).view(torch.uint8).numpy())
    else:
        digest.update(f"{type(tree).__name__}:{tree!r}".encode())


def state_checksum(state: dict) -> str:
    """``sha256:<hex>`` of a checkpoint dict, :data:`CHECKSUM_KEY` left out."""
    digest = hashlib.sha256()
    _digest_tree({k: v for k, v in state.items() if k != CHECKSUM_KEY}, digest)
    return f"sha256:{digest.hexdigest()}"


def save_checkpoint(state: dict, path: Path) -> None:
    """Serialise ``state`` (tensors, numbers, strings, lists, dicts) with its checksum and
    write it atomically."""
    buf = io.BytesIO()
    torch.save({**state, CHECKSUM_KEY: state_checksum(state)}, buf)
    atomic_write_bytes(Path(path), buf.getvalue())


def rotate_checkpoint(path: Path, keep: Path) -> None:
    """Make ``keep`` a copy of the checkpoint ``path`` (the previous good one), atomically.

    A hard link into a temporary name renamed over ``keep``: ``path`` stays in place all the
    time and ``keep`` is always whole. Where links are not supported, ``path`` is renamed
    (resume then falls back to ``keep`` until the new ``path`` is written).
    """
    path, keep = Path(path), Path(keep)
    if not path.is_file():
        return
    tmp = keep.with_name(f".{keep.name}.tmp-{os.getpid()}")
    try:
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass
        try:
            os.link(path, tmp)
            os.replace(tmp, keep)
        except OSError:
            os.replace(path, keep)
    except OSError as err:
        raise RunDirError(f"cannot keep {path} as {keep}: {err.strerror or err}") from None
    _fsync_dir(keep.parent)


def remove_stale_temp_files(directory: Path) -> list[Path]:
    """Remove ``.<name>.tmp-<pid>`` files that a killed writer left in ``directory`` (its pid is gone)."""
    removed = []
    try:
        entries = list(Path(directory).iterdir())
    except OSError:
        return removed
    for p in entries:
        name, _, pid = p.name.rpartition(".tmp-")
        if not (name.startswith(".") and pid.isdigit()) or not p.is_file() or pid_alive(int(pid)):
            continue
        try:
            p.unlink()
            removed.append(p)
        except OSError:
            pass
    return removed


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists (this process counts as alive; another user's too)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


# torch.save writes a zip archive; files of torch < 1.6 (and raw pickles) start with the
# pickle protocol opcode. Anything else (an image, a text file) is not a checkpoint at all.
_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_PROTO = 0x80


def _check_checkpoint_magic(path: Path) -> None:
    """Refuse a file that is no ``torch.save`` output (e.g. a JPEG) with a message saying so."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(4)
    except OSError as err:
        raise CheckpointError(f"cannot read checkpoint {path}: {err.strerror or err}") from None
    if head and not head.startswith(_ZIP_MAGIC) and head[0] != _PICKLE_PROTO:
        raise CheckpointError(f"{path} is not a PyTorch checkpoint (expected a file written by torch.save, "
                              f"e.g. runs/NAME/checkpoints/last.pt)")


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Load a checkpoint safely.

    Raises:
        CheckpointError: missing, not a PyTorch checkpoint at all, truncated/corrupt, a
            checksum that does not match its contents, or a pickle that would execute code.
    """
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a directory, not a checkpoint file (e.g. {path / 'checkpoints' / 'last.pt'})")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    _check_checkpoint_magic(path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        if "weights_only" in str(err) or "Unsupported global" in str(err) or "GLOBAL" in str(err):
            raise CheckpointError(
                f"refusing to load {path}: it contains objects that could run code (only tensors and plain data are allowed)"
            ) from None
        raise CheckpointError(f"checkpoint {path} is corrupt: {first}") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt: {first}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} does not hold a dict")
    stored = state.pop(CHECKSUM_KEY, None)
    if stored is not None and stored != state_checksum(state):
        raise CheckpointError(f"checkpoint {path} is damaged: checksum mismatch (its contents changed after "
                              f"it was written)")
    return state


def ensure_writable(directory: Path) -> None:
    """Create ``directory`` and prove a file can be written there, before any long work.

    The probe file is removed whatever happens (a full disk creates it, then fails the write).

    Raises:
        RunDirError: naming the directory and the reason.
    """
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".write-test-{os.getpid()}"
        try:
            probe.write_text("ok")
        finally:
            probe.unlink(missing_ok=True)
    except OSError as err:
        raise RunDirError(f"output directory {directory} is not writable: {err.strerror or err}") from None
