"""Job identity: the idempotency key, the job id any client can compute, and content digests.

A job's key is the canonical JSON of everything that decides its outputs: the input's content
(the slide's SHA-256, as in feature-store keys and provenance; the regions file's), the task,
question, labels, evidence options, decoding (seed included), the analysis settings that change
results, and the model (folder name + SHA-256 of its files). Paths, users and output folders are
not in it: the same slide copied elsewhere, submitted by someone else, is the same job. The job
id is ``uuid5(JOB_NAMESPACE, key)``, so a client computes it without asking anyone and a second
submission finds the first job.

Hashing a multi-GB slide takes seconds, so digests are cached per file under
``<data_dir>/cache/sha256.json``, keyed by path and invalidated by size and modification time.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path
from typing import Any

from filelock import FileLock

from omero_hwsi._io import write_json_atomic
from omero_hwsi.errors import ModelFileNotFoundError

__all__ = ["JOB_NAMESPACE", "KEY_VERSION", "DigestCache", "canonical_json", "job_id_for",
           "model_identity"]

JOB_NAMESPACE = uuid.UUID("6f1c3a52-8d0e-5b7a-9c41-0a7e2d9b4f10")
"""Fixed namespace of job ids; changing it would give every job a new id."""

KEY_VERSION = 1
"""Version of the key's layout, part of the key: a new layout never collides with an old one."""


def canonical_json(obj: Any) -> str:
    """Sorted keys, no spaces, UTF-8 text, no NaN: the same object always gives the same text."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False)


def job_id_for(key: str) -> str:
    """The job id of a key: ``uuid5(JOB_NAMESPACE, key)`` as a string."""
    return str(uuid.uuid5(JOB_NAMESPACE, key))


def _stamp(files: list[Path]) -> list[list[Any]]:
    stamps: list[list[Any]] = []
    for file in files:
        info = file.stat()
        stamps.append([str(file), info.st_size, info.st_mtime_ns])
    return stamps


def _slide_files(path: Path) -> list[Path]:
    """The files :func:`slide_checksum` hashes (MIRAX data folders included)."""
    files = [path]
    sibling = path.with_suffix("")
    if sibling != path and sibling.is_dir():
        files += sorted(p for p in sibling.rglob("*") if p.is_file())
    return files


class DigestCache:
    """SHA-256 digests of files, remembered by path, size and modification time.

    Safe for several processes: the cache file is read and written under a file lock and
    replaced atomically; a lost or damaged cache only costs a new hash.
    """

    def __init__(self, folder: Path) -> None:
        self.path = folder / "sha256.json"
        self._lock = FileLock(str(folder / ".sha256.lock"))

    def _load(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def _lookup(self, name: str, stamp: list[list[Any]]) -> str | None:
        entry = self._load().get(name)
        if isinstance(entry, dict) and entry.get("stamp") == stamp:
            digest = entry.get("sha256")
            return digest if isinstance(digest, str) else None
        return None

    def _remember(self, name: str, stamp: list[list[Any]], digest: str) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._lock:
            data = self._load()
            data[name] = {"stamp": stamp, "sha256": digest}
            write_json_atomic(self.path, data, indent=None)

    def slide(self, path: str | os.PathLike[str]) -> str:
        """The slide's checksum as :func:`omero_hwsi.slide.local.slide_checksum` computes it."""
        from omero_hwsi.slide.local import slide_checksum

        main = Path(path).resolve()
        stamp = _stamp(_slide_files(main))
        name = f"slide:{main}"
        digest = self._lookup(name, stamp)
        if digest is None:
            digest = slide_checksum(main)
            self._remember(name, stamp, digest)
        return digest

    def file(self, path: str | os.PathLike[str]) -> str:
        """SHA-256 of one file's bytes."""
        file = Path(path).resolve()
        stamp = _stamp([file])
        name = f"file:{file}"
        digest = self._lookup(name, stamp)
        if digest is None:
            sha = hashlib.sha256()
            with file.open("rb") as handle:
                while chunk := handle.read(1 << 20):
                    sha.update(chunk)
            digest = sha.hexdigest()
            self._remember(name, stamp, digest)
        return digest


def model_identity(folder: str | os.PathLike[str], cache: DigestCache) -> dict[str, str]:
    """``{"id": folder name, "sha256": digest of every file in the folder}``.

    The digest covers weights, config, tokenizer and processor files (names and bytes), so a
    retrained model with the same config is another model; hidden files are ignored.

    Raises:
        ModelFileNotFoundError: not a model folder, or it changed while being read.
    """
    root = Path(folder).resolve()
    if not any((root / name).is_file() for name in ("config.json", "projector_config.json")):
        raise ModelFileNotFoundError(f"{root}: not a model folder (no config.json); pass --model DIR")
    sha = hashlib.sha256()
    try:
        for file in sorted(p for p in root.rglob("*") if p.is_file()):
            relative = file.relative_to(root)
            if any(part.startswith(".") for part in relative.parts):
                continue
            sha.update(f"{relative.as_posix()}\0{cache.file(file)}\n".encode())
    except FileNotFoundError as err:  # a file went away while the folder was being rewritten
        raise ModelFileNotFoundError(f"{root}: the model folder changed while it was read "
                                     f"({Path(str(err.filename)).name} went away); try again "
                                     "once it is complete") from err
    return {"id": root.name, "sha256": sha.hexdigest()}
