"""Getting an OMERO image onto local disk, so the unchanged pipeline opens it as a file.

Why a local copy: the whole pipeline reads slides through ``open_slide(path)``. Slides OpenSlide
reads are downloaded as their original fileset (:func:`download_fileset`); others are written
once into a local pyramidal SVS from OMERO's pixels service (:func:`materialize_pixels`). Both
land in one cache folder shared by the workers of a machine::

    <cache_root>/<fileset id>/<paths as imported>   one folder per fileset (MIRAX, VMS layouts)
    <cache_root>/<fileset id>/.complete.json        written last: what was fetched and checked
    <cache_root>/<fileset id>.lock                  flock held while it is fetched or evicted
    <cache_root>/pixels-<image id>-<digest>.svs     a pixels-service image, written atomically
    <cache_root>/pixels-<image id>.lock             flock held while it is written or evicted

Slides are gigabytes and connections drop, so a file is fetched into ``<file>.part`` and a rerun
continues from the bytes already there; it is renamed into place only after its SHA-1 matches
what OMERO stored at import. A fileset counts as present only with its ``.complete.json``
marker, and the marker's mtime is its last use: the size limit evicts the least recently used
entries first, never one whose lock another worker holds. The limit is checked against what is
on disk, so concurrent downloads of different slides may overshoot it by what they have yet to
fetch. A reader that opened a slide keeps reading it if it is evicted meanwhile (POSIX keeps an
unlinked file alive while it is open).

Only a few gateway calls are used (``createRawFileStore``, ``getObject``, the pixels calls of
:mod:`omero_hwsi.omero.pixels`); the tests run this module against an in-process fake of them.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import math
import os
import re
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Final

from omero_hwsi._io import write_json_atomic
from omero_hwsi._types import ProgressFn, RGBArray
from omero_hwsi.errors import (
    InputError,
    MppError,
    OmeroPermissionError,
    ServiceError,
)
from omero_hwsi.omero.images import OmeroFile, OmeroImage
from omero_hwsi.omero.pixels import OmeroPixelsReader, open_pixels
from omero_hwsi.slide.reader import validate_mpp
from omero_hwsi.synthetic.svs import write_svs

__all__ = ["CHUNK_BYTES", "MARKER", "download_fileset", "materialize_pixels"]

logger = logging.getLogger(__name__)

CHUNK_BYTES: Final = 8 << 20
"""Bytes per ``RawFileStore.read``: large enough to amortise a round trip, far below Ice's
message size limit."""
MARKER: Final = ".complete.json"
PART_SUFFIX: Final = ".part"
TILE_PX: Final = 256
JPEG_QUALITY: Final = 90
"""Materialized slides are re-encoded JPEG: high quality keeps the copy within a few grey levels
of the server's pixels."""
MIN_LEVEL_PX: Final = 512
"""Materialized pyramids get a 4x coarser level while its long side stays at least this."""

_FILESET_DIR = re.compile(r"\d+")
_PIXELS_FILE = re.compile(r"pixels-(\d+)-[0-9a-f]+\.svs")


# -- locks -----------------------------------------------------------------------------------
@contextmanager
def _locked(path: Path, *, wait: bool = True) -> Iterator[bool]:
    """Hold an exclusive ``flock`` on ``path``; yields False at once when busy and not ``wait``.

    Lock files are never deleted: removing one while another worker waits on it would let two
    workers hold "the" lock at once.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# -- the cache's contents ----------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class _Entry:
    """One evictable thing in the cache: a fileset folder or a materialized slide."""

    path: Path
    lock: Path
    size: int
    last_used: float


def _stat(path: str | Path) -> os.stat_result | None:
    """``os.stat``, or None for a file another worker removed meanwhile."""
    try:
        return os.stat(path)
    except FileNotFoundError:
        return None


def _tree_size(folder: Path) -> tuple[int, float]:
    """Total bytes under ``folder`` and the newest mtime there (0 when empty)."""
    size, newest = 0, 0.0
    for root, _, names in os.walk(folder):
        for stat in filter(None, (_stat(os.path.join(root, name)) for name in names)):
            size += stat.st_size
            newest = max(newest, stat.st_mtime)
    return size, newest


def _entries(cache_root: Path) -> list[_Entry]:
    """Everything in the cache that eviction may remove, with its size and last use.

    A complete fileset was last used when its marker was touched; an incomplete one (a download
    in progress, or abandoned by a crashed worker) when a file in it last changed.
    """
    entries = []
    for child in cache_root.iterdir() if cache_root.is_dir() else ():
        if child.is_dir() and _FILESET_DIR.fullmatch(child.name):
            size, newest = _tree_size(child)
            marker = _stat(child / MARKER)
            entries.append(_Entry(child, cache_root / f"{child.name}.lock", size,
                                  marker.st_mtime if marker else newest))
        elif (match := _PIXELS_FILE.fullmatch(child.name)) and (stat := _stat(child)):
            entries.append(_Entry(child, cache_root / f"pixels-{match.group(1)}.lock",
                                  stat.st_size, stat.st_mtime))
    return entries


def _evict(entry: _Entry) -> bool:
    """Remove ``entry`` unless another worker holds its lock; True when it is gone."""
    with _locked(entry.lock, wait=False) as got:
        if not got:
            return False
        if entry.path.is_dir():
            # The marker goes first: a crash midway leaves an incomplete fileset, never a
            # complete-looking one with files missing.
            (entry.path / MARKER).unlink(missing_ok=True)
            shutil.rmtree(entry.path, ignore_errors=True)
        else:
            entry.path.unlink(missing_ok=True)
        logger.info("evicted %s (%d bytes) from the OMERO cache", entry.path.name, entry.size)
        return True


def _make_room(cache_root: Path, keep: Path, needed: int, max_bytes: int, what: str) -> None:
    """Evict least recently used entries until the others plus ``needed`` fit in ``max_bytes``.

    Raises:
        InputError: ``needed`` alone exceeds the limit.
        ServiceError: entries in use by other workers leave too little room (retry later).
    """
    if needed > max_bytes:
        raise InputError(f"{what}: {needed} bytes exceed the OMERO cache limit of {max_bytes} "
                         "bytes; raise HWSI_OMERO_CACHE_MAX_BYTES")
    others = sorted((e for e in _entries(cache_root) if e.path != keep),
                    key=lambda e: e.last_used)
    used = sum(e.size for e in others)
    for entry in others:
        if used + needed <= max_bytes:
            return
        if _evict(entry):
            used -= entry.size
    if used + needed > max_bytes:
        raise ServiceError(f"{what}: the OMERO cache {cache_root} holds {used} bytes in use by "
                           f"other jobs and {needed} more would exceed its limit of {max_bytes}; "
                           "retry later or raise HWSI_OMERO_CACHE_MAX_BYTES")


# -- downloads -----------------------------------------------------------------------------------
def _local_path(folder: Path, file: OmeroFile) -> Path:
    """Where ``file`` goes under ``folder``; a path escaping it is refused (server data)."""
    relative = PurePosixPath(file.path)
    if relative.is_absolute() or ".." in relative.parts or not relative.parts:
        raise ServiceError(f"OMERO file {file.id}: unsafe path {file.path!r} in its fileset")
    return folder.joinpath(*relative.parts)


def _file_record(file: OmeroFile) -> dict[str, Any]:
    return {"id": file.id, "path": file.path, "size": file.size, "sha1": file.sha1,
            "hasher": file.hasher, "verified": _checkable(file)}


def _checkable(file: OmeroFile) -> bool:
    return file.hasher.upper().startswith("SHA1") and bool(file.sha1)


def _complete(folder: Path, image: OmeroImage) -> bool:
    """True when ``folder`` holds a marker for exactly ``image``'s files, all present."""
    try:
        marker = json.loads((folder / MARKER).read_text(encoding="utf-8"))
        recorded = {(f["path"], f["size"], f["sha1"], f["hasher"]) for f in marker["files"]}
    except (OSError, ValueError, KeyError, TypeError):
        return False
    expected = {(f.path, f.size, f.sha1, f.hasher) for f in image.files}
    if recorded != expected:
        return False
    for file in image.files:
        try:
            if _local_path(folder, file).stat().st_size != file.size:
                return False
        except OSError:
            return False
    return True


def _service_error(err: Exception, message: str) -> ServiceError:
    """An Ice/OMERO exception as one line; OMERO's ``SecurityViolation`` as a permission error."""
    kind = OmeroPermissionError if type(err).__name__ == "SecurityViolation" else ServiceError
    return kind(f"{message} ({type(err).__name__}: {' '.join(str(err).split())[:200]})")


def _close(store: Any) -> None:
    """Close a server-side store; a failure to close must not hide the real error."""
    try:
        store.close()
    except Exception as err:
        logger.warning("closing an OMERO store failed: %s", type(err).__name__)


def _stream(conn: Any, file: OmeroFile, part: Path, offset: int, digest: Any, *,
            chunk_bytes: int, advance: Callable[[int], None]) -> None:
    """Append ``file``'s bytes from ``offset`` to ``part``, feeding ``digest``; fsync at end."""
    cannot_serve = f"{file.path}: OMERO cannot serve this file"
    try:
        store = conn.createRawFileStore()
    except Exception as err:
        raise _service_error(err, cannot_serve) from err
    try:
        try:
            store.setFileId(file.id, conn.SERVICE_OPTS)
        except Exception as err:
            raise _service_error(err, cannot_serve) from err
        with open(part, "ab") as out:
            while offset < file.size:
                try:
                    data = store.read(offset, min(chunk_bytes, file.size - offset))
                except Exception as err:
                    raise _service_error(err, f"{file.path}: download from OMERO stopped at "
                                         f"byte {offset} of {file.size}; rerun to resume"
                                         ) from err
                if not data:
                    raise ServiceError(f"{file.path}: OMERO's copy ended at byte {offset} of "
                                       f"{file.size}")
                out.write(data)
                digest.update(data)
                offset += len(data)
                advance(len(data))
            out.flush()
            os.fsync(out.fileno())
    except OSError as err:
        raise ServiceError(f"{part}: cannot write the download ({err.strerror}); free space "
                           "in the OMERO cache and rerun to resume") from err
    finally:
        _close(store)


def _fetch(conn: Any, file: OmeroFile, target: Path, *, chunk_bytes: int,
           advance: Callable[[int], None]) -> None:
    """Download ``file`` to ``target`` through ``<target>.part``, resuming and verifying.

    ``advance(n)`` is called with each number of bytes added, including those found already in
    the ``.part`` file.
    """
    part = target.with_name(target.name + PART_SUFFIX)
    target.parent.mkdir(parents=True, exist_ok=True)
    offset = part.stat().st_size if part.exists() else 0
    if offset > file.size:  # not from this file: start over
        part.unlink()
        offset = 0
    digest = hashlib.sha1(usedforsecurity=False)
    if offset:
        with open(part, "rb") as handle:
            for block in iter(lambda: handle.read(chunk_bytes), b""):
                digest.update(block)
        advance(offset)
    part.touch()  # an empty original file gets no read at all
    if offset < file.size:
        _stream(conn, file, part, offset, digest, chunk_bytes=chunk_bytes, advance=advance)
    if not _checkable(file):
        logger.warning("%s: OMERO recorded a %s hash, not SHA-1; the download is not verified",
                       file.path, file.hasher or "missing")
    elif digest.hexdigest() != file.sha1.lower():
        part.unlink()
        raise ServiceError(f"{file.path}: SHA-1 of the download ({digest.hexdigest()}) differs "
                           f"from OMERO's record ({file.sha1}); the copy was deleted, rerun to "
                           "fetch it again")
    os.replace(part, target)


def download_fileset(conn: Any, image: OmeroImage, *, cache_root: Path, max_bytes: int,
                     progress: ProgressFn | None = None,
                     chunk_bytes: int = CHUNK_BYTES) -> Path:
    """The local path of ``image``'s main file, downloading its fileset when not yet cached.

    Two workers pulling one fileset at once queue on its lock; the second finds it complete.
    Files already completed by an interrupted earlier call are kept, a ``.part`` is continued.

    Args:
        conn: a ``BlitzGateway`` acting as the user who may read the image.
        image: from :func:`~omero_hwsi.omero.images.resolve_images`.
        cache_root: the cache folder (``<data_dir>/omero-cache``).
        max_bytes: the cache's size limit (``HWSI_OMERO_CACHE_MAX_BYTES``).
        progress: called as ``progress("download", bytes_done, bytes_total)``.
        chunk_bytes: bytes per server read.

    Raises:
        InputError: the image has no original files, or its fileset alone exceeds ``max_bytes``.
        ServiceError: the server failed mid-download (rerun to resume), a file's SHA-1 does not
            match OMERO's record, or workers hold too much of the cache to make room.
        OmeroPermissionError: the server refused to serve a file to this user.
    """
    main = image.main_file
    if image.fileset_id is None or main is None:
        raise InputError(f"OMERO image {image.id} ({image.name}): has no original files to "
                         "download; read it through the pixels service")
    cache_root = Path(cache_root)
    folder = cache_root / str(image.fileset_id)
    targets = [(file, _local_path(folder, file)) for file in image.files]
    total = sum(file.size for file in image.files)
    with _locked(cache_root / f"{image.fileset_id}.lock"):
        if _complete(folder, image):
            os.utime(folder / MARKER)
            return _local_path(folder, main)
        if (folder / MARKER).exists():  # made for other files, or files went missing: restart
            (folder / MARKER).unlink()
            shutil.rmtree(folder)
        _make_room(cache_root, folder, total, max_bytes,
                   f"OMERO image {image.id} ({image.name})")
        done = 0

        def advance(n: int) -> None:
            nonlocal done
            done += n
            if progress is not None:
                progress("download", done, total)

        for file, target in targets:
            if target.is_file() and target.stat().st_size == file.size:
                advance(file.size)  # verified and renamed by an earlier, interrupted call
                continue
            _fetch(conn, file, target, chunk_bytes=chunk_bytes, advance=advance)
        write_json_atomic(folder / MARKER, {
            "image_id": image.id, "fileset_id": image.fileset_id, "total_bytes": total,
            "completed_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "files": [_file_record(file) for file in image.files]})
    return _local_path(folder, main)


# -- pixels-service images -------------------------------------------------------------------
def _levels(width: int, height: int) -> tuple[int, ...]:
    """Downsamples 1, 4, 16... while the coarsest level's long side stays >= MIN_LEVEL_PX."""
    downsamples = [1]
    while max(width, height) // (downsamples[-1] * 4) >= MIN_LEVEL_PX:
        downsamples.append(downsamples[-1] * 4)
    return tuple(downsamples)


class _Counting:
    """A renderer that reports ``progress("pixels", tiles_done, tiles_total)``."""

    def __init__(self, reader: OmeroPixelsReader, total: int, progress: ProgressFn) -> None:
        self._reader, self._total, self._progress = reader, total, progress
        self._done = 0
        self._lock = threading.Lock()

    def render(self, x0: float, y0: float, w: int, h: int, step: float) -> RGBArray:
        pixels = self._reader.render(x0, y0, w, h, step)
        with self._lock:
            self._done += 1
            done = self._done
        self._progress("pixels", min(done, self._total), self._total)
        return pixels


def _tile_count(width: int, height: int, downsamples: tuple[int, ...]) -> int:
    """Render calls ``write_svs`` makes: every tile of every level, plus the thumbnail."""
    return 1 + sum(math.ceil(width // d / TILE_PX) * math.ceil(height // d / TILE_PX)
                   for d in downsamples)


def _slide_mpp(recorded: float | None, mpp: float | None, name: str) -> float:
    """The MPP written into a materialized slide: OMERO's when plausible, else ``mpp``.

    OMERO's value wins over ``mpp`` because the file is named by content, not by options; a
    user's ``--mpp`` still applies when the pipeline opens the file (``open_slide(mpp=)``).
    """
    if recorded is not None:
        try:
            return validate_mpp(recorded, name=name, source="OMERO's pixel size")
        except MppError:
            if mpp is None:
                raise
    if mpp is None:
        raise MppError(f"{name}: no pixel size recorded; pass --mpp")
    return validate_mpp(float(mpp), name=name, source="--mpp")


def materialize_pixels(conn: Any, image: OmeroImage, *, cache_root: Path, mpp: float | None,
                       progress: ProgressFn | None = None) -> Path:
    """A local pyramidal SVS of ``image``'s pixels, read tile by tile from OMERO's pyramid.

    For images whose original files OpenSlide cannot read (``pixel_route(image) ==
    "pixels"``). The file is named by the image's content identity, so a rerun finds it; it
    appears atomically, and a lock keeps two workers from rendering the same image twice. Its
    MPP is OMERO's recorded pixel size, else ``mpp`` (checked on every call, also when the file
    is already cached, so a missing size is reported the same way each time). Materialized slides are counted and evicted
    by :func:`download_fileset`'s size limit like filesets.

    Raises:
        MppError: no plausible pixel size is recorded and ``mpp`` is None.
        InputError: the pixels are not 8-bit RGB.
        OmeroNotFoundError: the image is gone or invisible to this user.
        ServiceError: the server failed while pixels were read.
    """
    cache_root = Path(cache_root)
    target = cache_root / f"pixels-{image.id}-{image.files_sha256[:16]}.svs"
    name = f"OMERO image {image.id} ({image.name})"
    with open_pixels(conn, image.id) as reader:
        slide_mpp = _slide_mpp(reader.pixel_size_um, mpp, name)
        with _locked(cache_root / f"pixels-{image.id}.lock"):
            if target.is_file():
                os.utime(target)
                return target
            width, height = reader.dimensions
            downsamples = _levels(width, height)
            renderer: Any = reader
            if progress is not None:
                renderer = _Counting(reader, _tile_count(width, height, downsamples), progress)
            write_svs(target, width=width, height=height, mpp=slide_mpp,
                      downsamples=downsamples, tile_px=TILE_PX, quality=JPEG_QUALITY,
                      renderer=renderer)
    return target
