"""Cheap fingerprints of the local folders a run trains on, so a resume can tell that one changed on disk.

A run record names its data and its base model by path; ``--resume_from_checkpoint`` on a folder whose files
changed since the run started would continue the run on other data (a split redrawn over the new file list
puts training images into the evaluation) or on other base weights (the checkpoints were evaluated on the old
ones). The record therefore also keeps a fingerprint of each local folder, compared before a run continues:

- a data folder: the sorted relative names and sizes of its files (only image files for an image folder; no
  file is read), digested, with the count per sub-folder so a change can be named (``red: 6 → 10 files``);
- a model folder: each config, code and weight file's size and a hash of it (a small file whole, a large one
  sampled at :data:`SAMPLES` evenly spaced blocks, about 1 MiB read per file).

Hub names, and anything that is not a local folder, are recorded by name only. Names starting with ``.`` are
left out, as the image loader leaves them out.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Collection, Iterable
from typing import Any

__all__ = ["SAMPLES", "fingerprint_changes", "folder_fingerprint", "model_fingerprint"]

#: Model files that make the base what it is (config, processor, tokenizer, code, weights); others (a
#: README, ``.gitattributes``) may change without changing the model.
MODEL_SUFFIXES = frozenset(
    {".json", ".py", ".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".model", ".txt"}
)
#: Blocks hashed in a large file, and their size; a file up to ``SAMPLES * BLOCK`` bytes is hashed whole.
SAMPLES = 64
BLOCK = 16 * 1024
#: Sub-folder counts are kept (to name what changed) for up to this many sub-folders.
MAX_FOLDERS = 2000


def _walk(root: str, suffixes: Collection[str] | None, exclude: Iterable[str]) -> Iterable[tuple[str, int]]:
    """(relative path with ``/``, size) of the files under ``root``, following linked folders once each."""
    skip = {os.path.realpath(p) for p in exclude}
    ends = tuple(suffixes) if suffixes is not None else None
    seen: set[str] = set()
    stack = [(root, "")]
    while stack:
        folder, prefix = stack.pop()
        real = os.path.realpath(folder)
        if real in seen or real in skip:
            continue
        seen.add(real)
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue
        for entry in entries:
            name = entry.name
            if name.startswith("."):
                continue
            try:
                if entry.is_dir():
                    stack.append((entry.path, f"{prefix}{name}/"))
                elif entry.is_file() and (ends is None or name.lower().endswith(ends)):
                    yield f"{prefix}{name}", entry.stat().st_size
            except OSError:
                continue


def folder_fingerprint(
    root: str | os.PathLike[str], suffixes: Collection[str] | None = None, exclude: Iterable[str] = ()
) -> dict[str, Any] | None:
    """The fingerprint of the files under ``root`` (None when it is not a folder): their count, total size,
    the digest of their sorted relative names and sizes, and the count per sub-folder (when there are at most
    :data:`MAX_FOLDERS`). Only the names and sizes are read (no file is opened).

    Args:
        root: The folder.
        suffixes: Only files with these (lower-case) suffixes count; None: every file.
        exclude: Folders left out (a run's output folder inside its data folder).
    """
    root = os.fspath(root)
    if not os.path.isdir(root):
        return None
    files = sorted(_walk(root, suffixes, exclude))
    digest = hashlib.sha256()
    folders: dict[str, int] = {}
    for name, size in files:
        digest.update(f"{name}\t{size}\n".encode("utf-8", "surrogateescape"))
        folder = name.rsplit("/", 1)[0] if "/" in name else "."
        folders[folder] = folders.get(folder, 0) + 1
    found: dict[str, Any] = {
        "files": len(files),
        "bytes": sum(size for _, size in files),
        "sha256": digest.hexdigest(),
    }
    if len(folders) <= MAX_FOLDERS:
        found["folders"] = folders
    return found


def _file_hash(path: str, size: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        if size <= SAMPLES * BLOCK:
            digest.update(fh.read())
        else:
            for i in range(SAMPLES):
                fh.seek((size - BLOCK) * i // (SAMPLES - 1))
                digest.update(fh.read(BLOCK))
    return digest.hexdigest()[:16]


def model_fingerprint(path: str | os.PathLike[str]) -> dict[str, str] | None:
    """``{file name: "size:hash"}`` for the files of a model folder that make the model (see
    :data:`MODEL_SUFFIXES`; a large file's hash is sampled), or None when ``path`` is not a folder (a hub
    name is its own identity)."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        return None
    found = {}
    for entry in sorted(os.scandir(path), key=lambda e: e.name):
        suffix = os.path.splitext(entry.name)[1].lower()
        if entry.name.startswith(".") or suffix not in MODEL_SUFFIXES or not entry.is_file():
            continue
        try:
            size = entry.stat().st_size
            found[entry.name] = f"{size}:{_file_hash(entry.path, size)}"
        except OSError as err:
            found[entry.name] = f"unreadable: {err.strerror}"
    return found


def _counted(n: int) -> str:
    return f"{n} file{'s' if n != 1 else ''}"


def _folder_change(old: dict[str, Any], new: dict[str, Any]) -> str:
    before, after = old.get("folders"), new.get("folders")
    moved = ""
    if isinstance(before, dict) and isinstance(after, dict):
        changed = [
            f"{name}: {before.get(name, 0)} → {after.get(name, 0)}"
            for name in sorted(set(before) | set(after))
            if before.get(name, 0) != after.get(name, 0)
        ]
        moved = ", ".join(changed[:4]) + (f" and {len(changed) - 4} more folders" if len(changed) > 4 else "")
    if old.get("files") != new.get("files"):
        gained = int(new.get("files", 0)) - int(old.get("files", 0))
        what = f"{_counted(abs(gained))} {'added' if gained > 0 else 'removed'}"
        return f"{what} ({moved})" if moved else what
    if moved:
        return f"files moved between folders ({moved})"
    return "files renamed, replaced or resized"


def _model_change(old: dict[str, Any], new: dict[str, Any]) -> str:
    parts = [f"{n} changed" for n in sorted(set(old) & set(new)) if old[n] != new[n]]
    parts += [f"{n} added" for n in sorted(set(new) - set(old))]
    parts += [f"{n} removed" for n in sorted(set(old) - set(new))]
    return ", ".join(parts[:4]) + (f" and {len(parts) - 4} more" if len(parts) > 4 else "")


def fingerprint_changes(
    previous: dict[str, Any], record: dict[str, Any], key: str = "fingerprint"
) -> list[str]:
    """What changed on disk between two run records' fingerprints (``record[key]``, ``{option: fingerprint}``,
    each option's value named by ``record[option]``), one string per changed folder; empty when nothing did,
    or when ``previous`` has no fingerprint (a record written before they existed) or names another folder."""
    old, new = previous.get(key), record.get(key)
    if not isinstance(old, dict) or not isinstance(new, dict):
        return []
    out = []
    for option in sorted(set(old) & set(new)):
        before, after = old[option], new[option]
        if before == after or previous.get(option) != record.get(option):
            continue  # another folder is a difference of the record itself
        if not isinstance(before, dict) or not isinstance(after, dict):
            continue
        detail = _folder_change(before, after) if "sha256" in after else _model_change(before, after)
        out.append(f"--{option} {record.get(option)!r} changed on disk since the run started: {detail}")
    return out
