"""An in-process fake of the BlitzGateway surface omero-hwsi uses (``docs/omero.md``).

No OMERO server can be installed in CI, so :mod:`omero_hwsi.omero` is tested against this fake.
It serves *real* data: original files are bytes of local files, pixels are numpy pyramids (e.g.
a real slide read with OpenSlide and downsampled), and what the write-back saves are the real
``omero.model`` objects (``RoiI`` with its shapes, ``MapAnnotationI``, ``FileAnnotationI``),
wrapped on the way out by omero-py's own ``MapAnnotationWrapper`` / ``FileAnnotationWrapper``.
omero-py is imported only by the calls that need it, so the read side works without it.

The surface, and nothing more (extend it here when code starts using more):

* connection: ``getObject("Image"|"Dataset"|"Project", id)`` (None when missing or not visible
  to the connection's user, or in another group than the session's), ``getObjects(
  "MapAnnotation"|"FileAnnotation", attributes={"ns": ..., "description": ...})``,
  ``getObjectsByAnnotations("Image", ann_ids)``, ``getUser().getName()``,
  ``getConfigService()`` (``getDatabaseUuid getVersion``), ``getAdminService()
  .getCurrentAdminPrivileges()`` (each ``getValue().getValue()`` a privilege name),
  ``suConn(user, group=None, ttl=...)`` (a view sharing the server's state, acting as ``user``
  in ``group``; None without the Sudo privilege or for an unknown user), ``c.enableKeepAlive(s)``,
  ``close()``, ``SERVICE_OPTS``; ``getSessionService()`` (``createUserSession(ttl_ms, idle_ms,
  group)`` -> a :class:`FakeUserSession` with ``getUuid().getValue()``, ``closeSession(s)``).
* joining by key (session-key mode): :func:`joining_gateway` makes the class to put in place of
  ``omero.gateway.BlitzGateway``: ``BlitzGateway(host=, port=, secure=)``, then
  ``connect(sUuid=key)`` joins the session ``createUserSession`` made (False for an unknown or
  killed key), and ``close(hard=True)`` kills it while ``close(hard=False)`` only detaches, as
  omero-py does. Like omero-py, it logs the key it joins on the ``omero.gateway`` logger.
* :class:`FakeImage`: ``getId getName getFileset getSizeX getSizeY canAnnotate getFormat
  getPrimaryPixels listAnnotations(ns=None) linkAnnotation(ann)``,
  ``getDetails().getGroup().getName()``; :class:`FakeContainer` (datasets, projects): ``getId
  getName listChildren listAnnotations linkAnnotation``.
* :class:`FakePixels`: ``getId getSizeX getSizeY getSizeC getPixelsType().getValue()
  getPhysicalSizeX()`` (a :class:`FakeLength` with ``getValue getUnit``, or None).
* :class:`FakeFileset`: ``getId listFiles copyImages``.
* :class:`FakeOriginalFile`: ``getId getPath getName getSize getHash getHasher().getValue()``.
* ``createRawFileStore()`` -> :class:`FakeRawFileStore`: ``setFileId(id, ctx) read(offset,
  length) close()``.
* ``createRawPixelsStore()`` -> :class:`FakeRawPixelsStore`: ``setPixelsId(id, bypass, ctx)
  getResolutionLevels getResolutionDescriptions setResolutionLevel getTileSize
  getTile(z, c, t, x, y, w, h) close()``, with OMERO's level numbering (the highest level is
  full resolution; descriptions list full resolution first) and big-endian tile bytes.
* writing: ``getRoiService().findByImage(image_id, None).rois``, ``getUpdateService()
  .saveAndReturnArray(objects, ctx)`` (``RoiI``) and ``.saveAndReturnObject(obj, ctx)`` (what
  ``MapAnnotationWrapper.save()`` calls), ``deleteObjects("Roi"|"Annotation", ids, wait=True)``,
  ``createFileAnnfromLocalFile(path, origFilePathAndName=, mimetype=, ns=, desc=)``.

State lives in plain attributes shared by every session view: ``images``, ``filesets``,
``files``, ``pixels``, ``datasets``, ``projects`` by id; ``rois`` and ``annotations`` (the saved
model objects by id), ``links`` (``(parent type, parent id, annotation id)``), ``owners`` (who
saved each ROI or annotation), ``file_bytes`` (the uploaded content by FileAnnotation id),
``writes`` (every write call in order, as ``(verb, what)``), ``users`` (name -> admin
privileges), ``sessions`` (the ``suConn`` and joined views), ``user_sessions`` (the live
sessions ``createUserSession`` made, by key) and the counters ``bytes_served``,
``tiles_served``, ``open_stores``. Per connection: ``user``, ``group``, ``ttl``, ``closed``,
``c.keepalive_s``.

Fault injection, each consumed once unless said otherwise:

* ``fail_reads[file_id] = offset``: the first ``read`` covering ``offset`` raises
  :class:`ConnectionLostException` (resume tests);
* ``forbidden_files``: ``setFileId`` raises :class:`SecurityViolation` (permanent);
* ``FakeOriginalFile.hash`` is a plain attribute: set it to a wrong value to fake corruption;
* ``read_delay_s``: every ``read`` sleeps this long (to make concurrent pulls overlap);
* ``fail_after_saves = n``: the next ``n`` write calls succeed and the one after raises
  :class:`ConnectionLostException` without writing (a worker killed mid-write-back); write calls
  are ``saveAndReturnArray``, ``saveAndReturnObject``, ``createFileAnnfromLocalFile``,
  ``linkAnnotation`` and ``deleteObjects``;
* ``FakeImage.can_annotate = False``: saving or linking onto it raises :class:`SecurityViolation`;
  ``FakeImage.hidden_from``: users who cannot see it (``getObject`` answers None).

The fake is stricter than a server where that catches bugs: a tile request must stay inside
the level and inside one server tile's size; asking for the resolution descriptions of an
image without a pyramid (costly on a real server) is an error; a closed connection refuses
every call; saved objects come back as copies (ids are on what the call returned, not on what
was passed); an ROI must have an image and a shape; linking one annotation twice, deleting an
object that does not exist or that another user owns, and ``deleteObjects`` without ``wait``
are errors.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import logging
import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt


class FakeServerError(Exception):
    """What the fake raises for a call a real server would refuse (``ApiUsageException``)."""


class ConnectionLostException(Exception):
    """Named like Ice's error for a dropped connection."""


class SecurityViolation(Exception):
    """Named like OMERO's permission error (the code maps it by name)."""


@dataclass(frozen=True)
class FakeValue:
    """An rtype/enum stand-in: ``getValue()`` returns ``value``."""

    value: Any

    def getValue(self) -> Any:
        return self.value


@dataclass(frozen=True)
class FakeLength:
    """``omero.model.LengthI``: a value and a unit name (``MICROMETER``...)."""

    value: float
    unit: str = "MICROMETER"

    def getValue(self) -> float:
        return self.value

    def getUnit(self) -> str:
        return self.unit


@dataclass
class FakeOriginalFile:
    """One original file; ``source`` is the local file whose bytes the server serves."""

    id: int
    path: str
    name: str
    source: Path
    size: int
    hash: str
    hasher: str = "SHA1-160"

    def getId(self) -> int:
        return self.id

    def getPath(self) -> str:
        return self.path

    def getName(self) -> str:
        return self.name

    def getSize(self) -> int:
        return self.size

    def getHash(self) -> str:
        return self.hash

    def getHasher(self) -> FakeValue:
        return FakeValue(self.hasher)


@dataclass
class FakeFileset:
    id: int
    files: list[FakeOriginalFile]
    images: list[FakeImage] = field(default_factory=list)

    def getId(self) -> int:
        return self.id

    def listFiles(self) -> list[FakeOriginalFile]:
        return list(self.files)

    def copyImages(self) -> list[FakeImage]:
        return list(self.images)


@dataclass
class FakePixels:
    """Primary pixels: ``levels`` are ``(H, W, C)`` arrays, full resolution first."""

    id: int
    levels: list[npt.NDArray[Any]]
    physical_size: FakeLength | None
    tile_size: tuple[int, int]

    def getId(self) -> int:
        return self.id

    def getSizeX(self) -> int:
        return int(self.levels[0].shape[1])

    def getSizeY(self) -> int:
        return int(self.levels[0].shape[0])

    def getSizeC(self) -> int:
        return int(self.levels[0].shape[2])

    def getPixelsType(self) -> FakeValue:
        return FakeValue(str(self.levels[0].dtype))

    def getPhysicalSizeX(self) -> FakeLength | None:
        return self.physical_size


@dataclass
class _Named:
    name: str

    def getName(self) -> str:
        return self.name


@dataclass
class _Details:
    group: _Named

    def getGroup(self) -> _Named:
        return self.group


class _Annotated:
    """``listAnnotations`` and ``linkAnnotation`` of images, datasets and projects."""

    kind: str
    id: int
    server: FakeGateway | None

    def _server(self) -> FakeGateway:
        if self.server is None:
            raise FakeServerError(f"{self.kind} {self.id} was not added through the fake")
        return self.server

    def _check_annotate(self) -> None:
        """Raise like OMERO when the object may not be annotated (overridden by images)."""

    def listAnnotations(self, ns: str | None = None) -> Iterator[Any]:
        gw = self._server()
        for kind, parent, ann_id in list(gw.links):
            if (kind, parent) == (self.kind, self.id):
                obj = gw.annotations[ann_id]
                if ns is None or _rvalue(obj.getNs()) == ns:
                    yield _wrap(gw, obj)

    def linkAnnotation(self, ann: Any) -> Any:
        """Link a saved annotation wrapper (saving it first if it is new, as omero-py does)."""
        gw = self._server()
        self._check_annotate()
        if not ann.getId():
            ann = _wrap(gw, gw.getUpdateService().saveAndReturnObject(ann._obj, gw.SERVICE_OPTS))
        ann_id = int(ann.getId())
        gw._write("link", f"{type(ann._obj).__name__.removesuffix('I')}:{ann_id} -> "
                          f"{self.kind}:{self.id}")
        if ann_id not in gw.annotations:
            raise FakeServerError(f"no Annotation:{ann_id}")
        if (self.kind, self.id, ann_id) in gw.links:
            raise FakeServerError(f"Annotation:{ann_id} is already linked to {self.kind}:{self.id}")
        gw.links.append((self.kind, self.id, ann_id))
        return ann


@dataclass(eq=False)
class FakeImage(_Annotated):
    id: int
    name: str
    size: tuple[int, int]
    group: str = "lab"
    fileset: FakeFileset | None = None
    pixels: FakePixels | None = None
    format: str | None = "SVS"
    can_annotate: bool = True
    hidden_from: set[str] = field(default_factory=set)
    server: FakeGateway | None = field(default=None, repr=False)
    kind: str = field(default="Image", init=False)

    def getId(self) -> int:
        return self.id

    def getName(self) -> str:
        return self.name

    def getFileset(self) -> FakeFileset | None:
        return self.fileset

    def getDetails(self) -> _Details:
        return _Details(_Named(self.group))

    def getSizeX(self) -> int:
        return self.size[0]

    def getSizeY(self) -> int:
        return self.size[1]

    def canAnnotate(self) -> bool:
        return self.can_annotate

    def getFormat(self) -> FakeValue | None:
        return None if self.format is None else FakeValue(self.format)

    def getPrimaryPixels(self) -> FakePixels | None:
        return self.pixels

    def _check_annotate(self) -> None:
        if not self.can_annotate:
            raise SecurityViolation(f"no annotate permission on Image:{self.id}")


@dataclass(eq=False)
class FakeContainer(_Annotated):
    """A Dataset (children: images) or a Project (children: datasets)."""

    kind: str
    id: int
    name: str
    children: list[Any]
    group: str = "lab"
    hidden_from: set[str] = field(default_factory=set)
    server: FakeGateway | None = field(default=None, repr=False)

    def getId(self) -> int:
        return self.id

    def getName(self) -> str:
        return self.name

    def listChildren(self) -> list[Any]:
        return list(self.children)


class FakeRawFileStore:
    """Serves one original file's bytes from its local ``source``."""

    def __init__(self, gateway: FakeGateway) -> None:
        self._gateway = gateway
        self._file: FakeOriginalFile | None = None

    def setFileId(self, file_id: int, ctx: Any = None) -> None:
        if file_id in self._gateway.forbidden_files:
            raise SecurityViolation(f"no read permission on OriginalFile:{file_id}")
        if file_id not in self._gateway.files:
            raise FakeServerError(f"no OriginalFile:{file_id}")
        self._file = self._gateway.files[file_id]

    def read(self, offset: int, length: int) -> bytes:
        gw, file = self._gateway, self._file
        if file is None:
            raise FakeServerError("setFileId was not called")
        if gw.read_delay_s:
            time.sleep(gw.read_delay_s)
        with gw.lock:
            fail_at = gw.fail_reads.get(file.id)
            if fail_at is not None and offset <= fail_at < offset + length:
                del gw.fail_reads[file.id]
                raise ConnectionLostException("connection lost")
        with open(file.source, "rb") as handle:
            handle.seek(offset)
            data = handle.read(length)
        with gw.lock:
            gw.bytes_served[file.id] = gw.bytes_served.get(file.id, 0) + len(data)
        return data

    def close(self) -> None:
        with self._gateway.lock:
            self._gateway.open_stores.remove(self)


@dataclass(frozen=True)
class ResolutionDescription:
    sizeX: int
    sizeY: int


class FakeRawPixelsStore:
    """Serves tiles of a :class:`FakePixels` pyramid, stateful like the real service."""

    def __init__(self, gateway: FakeGateway) -> None:
        self._gateway = gateway
        self._pixels: FakePixels | None = None
        self._level = 0

    def _require(self) -> FakePixels:
        if self._pixels is None:
            raise FakeServerError("setPixelsId was not called")
        return self._pixels

    def setPixelsId(self, pixels_id: int, bypass: bool, ctx: Any = None) -> None:
        if pixels_id not in self._gateway.pixels:
            raise FakeServerError(f"no Pixels:{pixels_id}")
        self._pixels = self._gateway.pixels[pixels_id]
        self._level = len(self._pixels.levels) - 1

    def getResolutionLevels(self) -> int:
        return len(self._require().levels)

    def getResolutionDescriptions(self) -> list[ResolutionDescription]:
        if len(self._require().levels) == 1:
            raise FakeServerError("descriptions of an image without a pyramid (expensive on a "
                                  "real server): use the pixels' size")
        return [ResolutionDescription(a.shape[1], a.shape[0]) for a in self._require().levels]

    def setResolutionLevel(self, level: int) -> None:
        if not 0 <= level < len(self._require().levels):
            raise FakeServerError(f"no resolution level {level}")
        self._level = level

    def getTileSize(self) -> list[int]:
        return list(self._require().tile_size)

    def getTile(self, z: int, c: int, t: int, x: int, y: int, w: int, h: int) -> bytes:
        pixels = self._require()
        level = pixels.levels[len(pixels.levels) - 1 - self._level]
        # Give other threads a chance to switch levels in between, as a real round trip would.
        time.sleep(0)
        tile_w, tile_h = pixels.tile_size
        inside = 0 <= x and 0 <= y and x + w <= level.shape[1] and y + h <= level.shape[0]
        if (z, t) != (0, 0) or not 0 <= c < level.shape[2] or not inside or w < 1 or h < 1:
            raise FakeServerError(f"bad tile request z={z} c={c} t={t} ({x}, {y}, {w}x{h}) on "
                                  f"a {level.shape[1]}x{level.shape[0]} level")
        if w > tile_w or h > tile_h:
            raise FakeServerError(f"tile {w}x{h} is larger than the tile size {tile_w}x{tile_h}")
        plane = np.ascontiguousarray(level[y : y + h, x : x + w, c])
        with self._gateway.lock:
            self._gateway.tiles_served += 1
        return plane.astype(plane.dtype.newbyteorder(">")).tobytes()

    def close(self) -> None:
        with self._gateway.lock:
            self._gateway.open_stores.remove(self)


def _rvalue(value: Any) -> Any:
    """An rtype's value (None stays None)."""
    return None if value is None else value.getValue()


def _wrap(conn: FakeGateway, obj: Any) -> Any:
    """omero-py's own wrapper of a saved annotation."""
    from omero.gateway import FileAnnotationWrapper, MapAnnotationWrapper

    wrapper = MapAnnotationWrapper if type(obj).__name__ == "MapAnnotationI" else \
        FileAnnotationWrapper
    return wrapper(conn, obj)


@dataclass
class FakeClient:
    """``conn.c``: records the keep-alive interval asked for."""

    keepalive_s: int | None = None

    def enableKeepAlive(self, seconds: int) -> None:
        self.keepalive_s = seconds


@dataclass(frozen=True)
class FakeConfigService:
    uuid: str
    version: str

    def getDatabaseUuid(self) -> str:
        return self.uuid

    def getVersion(self) -> str:
        return self.version


@dataclass(frozen=True)
class FakeAdminService:
    privileges: frozenset[str]

    def getCurrentAdminPrivileges(self) -> list[FakeValue]:
        return [FakeValue(FakeValue(name)) for name in sorted(self.privileges)]


@dataclass(frozen=True)
class FakeUserSession:
    """``omero.model.Session`` as ``createUserSession`` returns it: its key is its UUID."""

    uuid: str
    user: str
    group: str
    ttl_ms: int
    idle_ms: int

    def getUuid(self) -> FakeValue:
        return FakeValue(self.uuid)


class FakeSessionService:
    """``ISession``: a connection's user opens more sessions of their own, or closes them."""

    def __init__(self, gateway: FakeGateway) -> None:
        self._gateway = gateway

    def createUserSession(self, timeToLiveMilliseconds: int, timeToIdleMilliseconds: int,
                          defaultGroup: str) -> FakeUserSession:
        gw = self._gateway
        gw._check_open()
        session = FakeUserSession(str(uuid.uuid4()), gw.user, defaultGroup,
                                  timeToLiveMilliseconds, timeToIdleMilliseconds)
        gw.user_sessions[session.uuid] = session
        return session

    def closeSession(self, sess: FakeUserSession) -> int:
        gw = self._gateway
        gw._check_open()
        if gw.user_sessions.pop(sess.uuid, None) is None:
            raise FakeServerError("closing a session that is not open")
        return 0


@dataclass(frozen=True)
class FakeRoiResult:
    rois: list[Any]


class FakeRoiService:
    def __init__(self, gateway: FakeGateway) -> None:
        self._gateway = gateway

    def findByImage(self, image_id: int, options: Any) -> FakeRoiResult:
        gw = self._gateway
        gw._check_open()
        if options is not None:
            raise NotImplementedError("FakeRoiService.findByImage with options: extend the fake")
        if gw.getObject("Image", image_id) is None:
            return FakeRoiResult([])
        return FakeRoiResult([copy.deepcopy(roi) for roi in gw.rois.values()
                              if roi.getImage().getId().getValue() == int(image_id)])


class FakeUpdateService:
    """Saves ROIs and annotations, assigning ids like the server (on the returned copies)."""

    def __init__(self, gateway: FakeGateway) -> None:
        self._gateway = gateway

    def _saved(self, obj: Any) -> Any:
        from omero.model import IObject
        from omero.rtypes import rlong

        gw = self._gateway
        if not isinstance(obj, IObject):
            raise FakeServerError(f"not an omero.model object: {type(obj).__name__} (pass a "
                                  "wrapper's _obj)")
        kind = type(obj).__name__.removesuffix("I")
        saved = copy.deepcopy(obj)
        if kind == "Roi":
            image = saved.getImage()
            image_id = None if image is None else int(image.getId().getValue())
            target = None if image_id is None else gw.getObject("Image", image_id)
            if target is None:
                raise SecurityViolation(f"ROI on Image:{image_id}, not visible to {gw.user}")
            target._check_annotate()
            if not saved.copyShapes():
                raise FakeServerError("an ROI without shapes")
            saved.setId(rlong(gw._next_id()))
            for item in saved.copyShapes():
                item.setId(rlong(gw._next_id()))
            gw.rois[saved.getId().getValue()] = saved
        elif kind in ("MapAnnotation", "FileAnnotation"):
            saved.setId(rlong(gw._next_id()))
            gw.annotations[saved.getId().getValue()] = saved
        else:
            raise NotImplementedError(f"FakeUpdateService: saving a {kind}: extend the fake")
        gw.owners[saved.getId().getValue()] = gw.user
        return saved

    def saveAndReturnArray(self, objects: Sequence[Any], ctx: Any) -> list[Any]:
        kinds = sorted({type(obj).__name__.removesuffix("I") for obj in objects})
        self._gateway._write("save", f"{len(objects)} {'+'.join(kinds)}")
        return [self._saved(obj) for obj in objects]

    def saveAndReturnObject(self, obj: Any, ctx: Any) -> Any:
        self._gateway._write("save", type(obj).__name__.removesuffix("I"))
        return self._saved(obj)


class FakeGateway:
    """The fake ``BlitzGateway`` of ``user``; build its content with the ``add_*`` methods.

    ``suConn`` returns a :class:`_Session`: another connection to the same fake server.
    """

    def __init__(self, user: str = "ana", *, privileges: Iterable[str] = ()) -> None:
        # This connection.
        self.user = user
        self.group: str | None = None
        self.ttl: int | None = None
        self.closed = False
        self.c = FakeClient()
        self.SERVICE_OPTS: dict[str, str] = {}
        # The server, shared by every session view.
        self.users: dict[str, frozenset[str]] = {user: frozenset(privileges)}
        self.db_uuid = "5f0e2a8c-0000-4000-8000-00000000d0b1"
        self.version = "5.6.14-ice36"
        self.images: dict[int, FakeImage] = {}
        self.filesets: dict[int, FakeFileset] = {}
        self.files: dict[int, FakeOriginalFile] = {}
        self.pixels: dict[int, FakePixels] = {}
        self.datasets: dict[int, FakeContainer] = {}
        self.projects: dict[int, FakeContainer] = {}
        self.rois: dict[int, Any] = {}
        self.annotations: dict[int, Any] = {}
        self.links: list[tuple[str, int, int]] = []
        self.owners: dict[int, str] = {}
        self.file_bytes: dict[int, bytes] = {}
        self.writes: list[tuple[str, str]] = []
        self.sessions: list[_Session] = []
        self.user_sessions: dict[str, FakeUserSession] = {}
        self.bytes_served: dict[int, int] = {}
        self.tiles_served = 0
        self.open_stores: list[Any] = []
        self.fail_reads: dict[int, int] = {}
        self.forbidden_files: set[int] = set()
        self.read_delay_s = 0.0
        self.fail_after_saves: int | None = None
        self.lock = threading.Lock()
        self._ids = itertools.count(1)

    def _next_id(self) -> int:
        return next(self._ids)

    def _check_open(self) -> None:
        if self.closed:
            raise FakeServerError(f"the connection of {self.user} is closed")

    def _write(self, verb: str, what: str) -> None:
        """Count a write call: record it, or fail it as :attr:`fail_after_saves` says."""
        self._check_open()
        with self.lock:
            if self.fail_after_saves is not None:
                if self.fail_after_saves <= 0:
                    self.fail_after_saves = None
                    raise ConnectionLostException(f"connection lost before {verb} {what}")
                self.fail_after_saves -= 1
            self.writes.append((verb, what))

    def _visible(self, obj: FakeImage | FakeContainer) -> bool:
        return self.user not in obj.hidden_from and self.group in (None, obj.group)

    # -- the gateway surface -------------------------------------------------------------------
    def getObject(self, kind: str, object_id: int) -> Any:
        self._check_open()
        table: dict[int, Any] = {"Image": self.images, "Dataset": self.datasets,
                                 "Project": self.projects}.get(kind)  # type: ignore[assignment]
        if table is None:
            raise NotImplementedError(f"FakeGateway.getObject({kind!r}): extend the fake")
        obj = table.get(int(object_id))
        return obj if obj is not None and self._visible(obj) else None

    def getObjects(self, kind: str, attributes: dict[str, Any] | None = None) -> Iterator[Any]:
        self._check_open()
        if kind not in ("MapAnnotation", "FileAnnotation"):
            raise NotImplementedError(f"FakeGateway.getObjects({kind!r}): extend the fake")
        wanted = dict(attributes or {})
        unknown = set(wanted) - {"ns", "description"}
        if unknown:
            raise NotImplementedError(f"getObjects attributes {sorted(unknown)}: extend the fake")
        for obj in list(self.annotations.values()):
            if type(obj).__name__ == f"{kind}I" and all(
                    _rvalue(getattr(obj, f"get{k.capitalize()}")()) == v
                    for k, v in wanted.items()):
                yield _wrap(self, obj)

    def getObjectsByAnnotations(self, kind: str, annotation_ids: Iterable[int]) -> list[Any]:
        self._check_open()
        if kind != "Image":
            raise NotImplementedError(f"getObjectsByAnnotations({kind!r}): extend the fake")
        ids = {int(i) for i in annotation_ids}
        found = {parent for parent_kind, parent, ann in self.links
                 if parent_kind == "Image" and ann in ids}
        return [self.images[i] for i in sorted(found) if self._visible(self.images[i])]

    def getUser(self) -> _Named:
        self._check_open()
        return _Named(self.user)

    def getConfigService(self) -> FakeConfigService:
        self._check_open()
        return FakeConfigService(self.db_uuid, self.version)

    def getAdminService(self) -> FakeAdminService:
        self._check_open()
        return FakeAdminService(self.users[self.user])

    def suConn(self, username: str, group: str | None = None, ttl: int = 60000) -> _Session | None:
        """A connection as ``username``; None unless this user has Sudo and ``username`` exists."""
        self._check_open()
        if "Sudo" not in self.users[self.user] or username not in self.users:
            return None
        session = _Session(self, username, group, ttl)
        self.sessions.append(session)
        return session

    def getSessionService(self) -> FakeSessionService:
        self._check_open()
        return FakeSessionService(self)

    def close(self) -> None:
        self.closed = True

    def createRawFileStore(self) -> FakeRawFileStore:
        self._check_open()
        store = FakeRawFileStore(self)
        with self.lock:
            self.open_stores.append(store)
        return store

    def createRawPixelsStore(self) -> FakeRawPixelsStore:
        self._check_open()
        store = FakeRawPixelsStore(self)
        with self.lock:
            self.open_stores.append(store)
        return store

    def getRoiService(self) -> FakeRoiService:
        self._check_open()
        return FakeRoiService(self)

    def getUpdateService(self) -> FakeUpdateService:
        self._check_open()
        return FakeUpdateService(self)

    def deleteObjects(self, kind: str, ids: list[int], deleteAnns: bool = False,
                      deleteChildren: bool = False, dryRun: bool = False,
                      wait: bool = False) -> None:
        if not isinstance(ids, list) or not ids:
            raise AttributeError("Must be a list of object IDs")  # as omero-py
        if not wait:
            raise FakeServerError("deleteObjects without wait returns before the objects are "
                                  "gone; the fake supports wait=True only")
        table = {"Roi": self.rois, "Annotation": self.annotations}.get(kind)
        if table is None:
            raise NotImplementedError(f"FakeGateway.deleteObjects({kind!r}): extend the fake")
        self._write("delete", f"{kind}:{sorted(int(i) for i in ids)}")
        for object_id in map(int, ids):
            if object_id not in table:
                raise FakeServerError(f"no {kind}:{object_id}")
            if self.owners[object_id] != self.user:
                raise SecurityViolation(f"{self.user} may not delete {kind}:{object_id} of "
                                        f"{self.owners[object_id]}")
        for object_id in map(int, ids):
            del table[object_id]
            del self.owners[object_id]
            self.file_bytes.pop(object_id, None)
            self.links = [link for link in self.links if link[2] != object_id]

    def createFileAnnfromLocalFile(self, localPath: str, origFilePathAndName: str | None = None,
                                   mimetype: str | None = None, ns: str | None = None,
                                   desc: str | None = None) -> Any:
        """Upload ``localPath`` as a FileAnnotation (one write call, like one gateway call)."""
        from omero.model import FileAnnotationI, OriginalFileI
        from omero.rtypes import rlong, rstring

        path, _, name = (origFilePathAndName or localPath).rpartition("/")
        self._write("upload", name)
        data = Path(localPath).read_bytes()
        original = OriginalFileI()
        original.setId(rlong(self._next_id()))
        original.setPath(rstring(path))
        original.setName(rstring(name))
        original.setSize(rlong(len(data)))
        original.setHash(rstring(hashlib.sha1(data).hexdigest()))
        original.setMimetype(rstring(mimetype or "application/octet-stream"))
        annotation = FileAnnotationI()
        annotation.setFile(original)
        if desc:
            annotation.setDescription(rstring(desc))
        if ns:
            annotation.setNs(rstring(ns))
        saved = self.getUpdateService()._saved(annotation)
        self.file_bytes[saved.getId().getValue()] = data
        return _wrap(self, saved)

    # -- building content ------------------------------------------------------------------------
    def add_user(self, name: str, *, privileges: Iterable[str] = ()) -> None:
        """A user ``suConn`` can act as."""
        self.users[name] = frozenset(privileges)

    def add_fileset(self, files: Sequence[tuple[Path, str]], *, hasher: str = "SHA1-160",
                    server_dir: str = "user_2/2024-05/13/10-11-12.345") -> FakeFileset:
        """A fileset of local ``(source, path inside the fileset)`` files, hashed for real."""
        originals = []
        for source, relative in files:
            folder, _, name = f"{server_dir}/{relative}".rpartition("/")
            data = Path(source).read_bytes()
            digest = hashlib.sha1(data).hexdigest() if hasher.startswith("SHA1") else \
                hashlib.md5(data).hexdigest()
            original = FakeOriginalFile(self._next_id(), f"{folder}/", name, Path(source),
                                        len(data), digest, hasher)
            self.files[original.id] = original
            originals.append(original)
        fileset = FakeFileset(self._next_id(), originals)
        self.filesets[fileset.id] = fileset
        return fileset

    def add_pixels(self, levels: Sequence[npt.NDArray[Any]], *,
                   physical_size: FakeLength | None = FakeLength(0.499),
                   tile_size: tuple[int, int] = (256, 256)) -> FakePixels:
        """Pixels served from ``levels`` (``(H, W, C)``, full resolution first)."""
        pixels = FakePixels(self._next_id(), list(levels), physical_size, tile_size)
        self.pixels[pixels.id] = pixels
        return pixels

    def add_image(self, name: str, *, fileset: FakeFileset | None = None,
                  pixels: FakePixels | None = None, size: tuple[int, int] | None = None,
                  **attributes: Any) -> FakeImage:
        """An image in ``fileset``; its size is its pixels' unless given."""
        if size is None:
            size = (pixels.getSizeX(), pixels.getSizeY()) if pixels is not None else (1000, 1000)
        image = FakeImage(self._next_id(), name, size, fileset=fileset, pixels=pixels,
                          server=self, **attributes)
        self.images[image.id] = image
        if fileset is not None:
            fileset.images.append(image)
        return image

    def add_slide(self, source: Path, name: str, *, size: tuple[int, int],
                  associated: Sequence[str] = ("label image", "macro image"),
                  **attributes: Any) -> tuple[FakeImage, list[FakeImage]]:
        """An imported slide: one fileset holding ``source``, its pyramid image and small
        associated images named as Bio-Formats names them (``CMU-1.svs [macro image]``)."""
        fileset = self.add_fileset([(source, name)])
        pyramid = self.add_image(name, fileset=fileset, size=size, **attributes)
        others = [self.add_image(f"{name} [{kind}]", fileset=fileset, size=(400, 300),
                                 **attributes) for kind in associated]
        return pyramid, others

    def add_dataset(self, name: str, images: Sequence[FakeImage], **attributes: Any
                    ) -> FakeContainer:
        dataset = FakeContainer("Dataset", self._next_id(), name, list(images), server=self,
                                **attributes)
        self.datasets[dataset.id] = dataset
        return dataset

    def add_project(self, name: str, datasets: Sequence[FakeContainer], **attributes: Any
                    ) -> FakeContainer:
        project = FakeContainer("Project", self._next_id(), name, list(datasets), server=self,
                                **attributes)
        self.projects[project.id] = project
        return project

    def add_roi(self, roi: Any, *, owner: str) -> int:
        """Store an ``omero.model.RoiI`` drawn by ``owner`` (not a write call); its id."""
        from omero.rtypes import rlong

        saved = copy.deepcopy(roi)
        saved.setId(rlong(self._next_id()))
        for item in saved.copyShapes():
            item.setId(rlong(self._next_id()))
        self.rois[saved.getId().getValue()] = saved
        self.owners[saved.getId().getValue()] = owner
        return int(saved.getId().getValue())


class _Session(FakeGateway):
    """A ``suConn`` connection: its own user, group and state of closure; the server shared.

    Attributes other than the per-connection ones are read from and written to the gateway
    that opened it, so every view sees (and counts into) the same server.
    """

    _OWN = frozenset({"user", "group", "ttl", "closed", "c", "SERVICE_OPTS", "_server"})

    def __init__(self, server: FakeGateway, user: str, group: str | None, ttl: int) -> None:
        own = {"_server": server, "user": user, "group": group, "ttl": ttl, "closed": False,
               "c": FakeClient(), "SERVICE_OPTS": {}}
        for name, value in own.items():
            object.__setattr__(self, name, value)

    def __getattr__(self, name: str) -> Any:
        return getattr(object.__getattribute__(self, "_server"), name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in self._OWN:
            object.__setattr__(self, name, value)
        else:
            setattr(self._server, name, value)


def joining_gateway(server: FakeGateway) -> type[_Session]:
    """The ``BlitzGateway`` class of session-key mode, over ``server``'s sessions."""

    class JoinedGateway(_Session):
        """``BlitzGateway(host=, port=, secure=)`` and ``connect(sUuid=key)``: a view of the
        server as the user of the session ``key`` names, in its group; ``address`` and
        ``key`` record what it was given, ``hard_closed`` how it was closed."""

        _OWN = _Session._OWN | {"address", "key", "hard_closed"}

        def __init__(self, username: str | None = None, passwd: str | None = None, *,
                     host: str, port: int, secure: bool) -> None:
            super().__init__(server, "", None, 0)
            self.address = (host, port, secure)
            self.key: str | None = None
            self.hard_closed: bool | None = None
            self.closed = True  # until connected

        def connect(self, sUuid: str | None = None) -> bool:
            log = logging.getLogger("omero.gateway")  # what omero-py logs, key included
            log.debug(f"Connect attempt, sUuid={sUuid}, group=None, self.sUuid=None")
            session = server.user_sessions.get(sUuid or "")
            if session is None:
                return False
            self.user, self.group, self.ttl = session.user, session.group, session.ttl_ms
            self.key, self.closed = sUuid, False
            server.sessions.append(self)
            log.info("created connection (uuid=%s)", sUuid)  # lazy: the filter formats it
            return True

        def close(self, hard: bool = True) -> None:
            if hard and self.key is not None:
                server.user_sessions.pop(self.key, None)
            self.closed, self.hard_closed = True, hard

    return JoinedGateway


def pyramid_from_slide(path: Path, factors: Sequence[int] = (1, 2, 4)) -> list[npt.NDArray[Any]]:
    """Level 0 of a real slide (RGB) and its area-averaged downsamples by ``factors``.

    Sizes round down like OMERO's generated pyramids, so downsamples are not exact integers.
    """
    import openslide

    with openslide.OpenSlide(str(path)) as slide:
        full = np.asarray(slide.read_region((0, 0), 0, slide.dimensions).convert("RGB"))
    height, width = full.shape[:2]
    return [full if f == 1 else cv2.resize(full, (width // f, height // f),
                                           interpolation=cv2.INTER_AREA) for f in factors]
