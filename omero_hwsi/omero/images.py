"""Which OMERO images an analysis covers, and how each one's pixels can be read.

Why this is more than ``getObject``: importing one SVS gives several OMERO Images in one
fileset: the pyramid and small associated images (label, macro, thumbnail). Analysing a label
image is meaningless, and selecting "the slide" in OMERO.web may select any of them. So every
selected image (directly, or through its Dataset or Project) is resolved to the pyramid image(s)
of its fileset; associated images are skipped and reported by name, and so are ids that do not
exist or that the user cannot see.

How pixels are read depends on the original files: when they are a format OpenSlide reads
(:data:`OPENSLIDE_EXTENSIONS`, checked against the reader Bio-Formats recorded at import), the
worker downloads the original fileset (keeping its folder layout: MIRAX and VMS slides are
several files) and opens it like a local slide; otherwise it reads tiles through OMERO's pixels
service (:mod:`omero_hwsi.omero.pixels`).

The identity of an image's content is the SHA-1 the server stored for each original file at
import, combined into :attr:`OmeroImage.files_sha256`: a job key needs no download.

Only the small gateway surface in ``docs/omero.md`` is used (the tests run this module against a
fake of it).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any, Final, Literal

from omero_hwsi.errors import InputError, check_choice

__all__ = [
    "ASSOCIATED_NAME",
    "DATA_TYPES",
    "OPENSLIDE_EXTENSIONS",
    "OPENSLIDE_READERS",
    "OmeroFile",
    "OmeroImage",
    "Resolution",
    "describe_image",
    "parse_omero_source",
    "pixel_route",
    "resolve_images",
    "unwrap",
]

DataType = Literal["Image", "Dataset", "Project"]
DATA_TYPES: Final = ("Image", "Dataset", "Project")

OPENSLIDE_EXTENSIONS: Final = (".svs", ".tif", ".tiff", ".ndpi", ".vms", ".scn", ".mrxs",
                               ".svslide", ".bif", ".dcm")
"""Main-file extensions of the formats OpenSlide 4 reads (Aperio, generic tiled / Philips /
Trestle TIFF, Hamamatsu NDPI and VMS, Leica SCN, 3DHistech MIRAX, Sakura, Ventana, DICOM)."""

OPENSLIDE_READERS: Final = ("svs", "aperio", "tiff", "ndpi", "hamamatsu", "scn", "leica",
                            "mirax", "3dhistech", "sakura", "ventana", "bif", "dicom", "philips",
                            "trestle")
"""Words in a Bio-Formats reader name that agree with an OpenSlide format. An OME-TIFF (reader
``OME-TIFF``) is read through the pixels service: OpenSlide sees only its first plane."""

ASSOCIATED_NAME: Final = re.compile(r"\[(label|macro|thumbnail|overview)( image)?\]\s*$",
                                    re.IGNORECASE)
"""Names Bio-Formats gives a slide's associated images (``CMU-1.svs [macro image]``)."""
ASSOCIATED_AREA_RATIO: Final = 1 / 64
"""An unnamed image this much smaller than its fileset's largest is an associated image too."""


@dataclass(frozen=True, slots=True)
class OmeroFile:
    """One original file of a fileset: path relative to the fileset, size, stored hash."""

    id: int
    path: str
    size: int
    sha1: str
    hasher: str = "SHA1-160"


@dataclass(frozen=True, slots=True)
class OmeroImage:
    """A pyramid image to analyse, as the submitting user sees it.

    Attributes:
        id: the OMERO Image id.
        name: its name (for messages and reports).
        group: the name of the group it belongs to (the job acts in it).
        fileset_id: its fileset (None for images made without an import, e.g. by scripts).
        files: the fileset's original files.
        format: the reader Bio-Formats used at import (``Aperio SVS``), if recorded.
        size: ``(width, height)`` of the full-resolution level in px.
    """

    id: int
    name: str
    group: str
    fileset_id: int | None
    files: tuple[OmeroFile, ...]
    format: str | None
    size: tuple[int, int]
    can_annotate: bool = True

    @property
    def files_sha256(self) -> str:
        """One digest of every original file's stored hash and path (the content identity)."""
        digest = hashlib.sha256()
        for f in sorted(self.files, key=lambda f: f.path):
            digest.update(f"{f.path}\0{f.hasher}\0{f.sha1}\0{f.size}\n".encode())
        return digest.hexdigest()

    @property
    def main_file(self) -> OmeroFile | None:
        """The file a reader opens: the one with a slide extension, else the largest."""
        slides = [f for f in self.files if f.path.lower().endswith(OPENSLIDE_EXTENSIONS)]
        pool = slides or list(self.files)
        return max(pool, key=lambda f: (f.path.lower().endswith(".mrxs"), f.size)) if pool else None


@dataclass(frozen=True, slots=True)
class Resolution:
    """The images to analyse and, one line each, what was skipped and why."""

    images: list[OmeroImage] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


def pixel_route(image: OmeroImage) -> Literal["download", "pixels"]:
    """``download`` (OpenSlide on the original files) or ``pixels`` (OMERO's pixels service)."""
    main = image.main_file
    if main is None or not main.path.lower().endswith(OPENSLIDE_EXTENSIONS):
        return "pixels"
    if main.path.lower().endswith((".ome.tif", ".ome.tiff")):
        return "pixels"
    reader = (image.format or "").lower()
    # "tiff" below also matches the OME-TIFF reader ("OME-TIFF", "OMETiff"), whose files may
    # end in a plain .tif: checked first, by the reader, not the file name.
    if re.sub(r"[^a-z]", "", reader).startswith("ometif"):
        return "pixels"
    if reader and not any(word in reader for word in OPENSLIDE_READERS):
        return "pixels"
    return "download"


def parse_omero_source(text: str) -> tuple[DataType, int]:
    """``omero:image/123``, ``omero:dataset/45``, ``omero:project/6`` -> (type, id).

    Raises:
        InputError: anything else.
    """
    match = re.fullmatch(r"omero:(image|dataset|project)/(\d+)", text.strip(), re.IGNORECASE)
    if not match:
        raise InputError(f"{text!r}: an OMERO source is omero:image/ID, omero:dataset/ID or "
                         "omero:project/ID")
    kind = match.group(1).capitalize()
    return kind, int(match.group(2))  # type: ignore[return-value]


def unwrap(value: Any) -> Any:
    """An rtype's value, a wrapper's value, or the value itself (None stays None): the one
    unwrapping of omero-py values in this package."""
    getter = getattr(value, "getValue", None)
    return unwrap(getter()) if callable(getter) else value


def _files(image: Any) -> tuple[OmeroFile, ...]:
    fileset = image.getFileset()
    if fileset is None:
        return ()
    raw = [(int(f.getId()), f"{f.getPath() or ''}{f.getName()}", int(f.getSize() or 0),
            str(f.getHash() or ""), str(unwrap(getattr(f, "getHasher", lambda: None)()) or ""))
           for f in fileset.listFiles()]
    if not raw:
        return ()
    parents = [PurePosixPath(path).parent.parts for _, path, _, _, _ in raw]
    common = 0
    while all(len(p) > common for p in parents) and len({p[common] for p in parents}) == 1:
        common += 1
    return tuple(OmeroFile(fid, str(PurePosixPath(*PurePosixPath(path).parts[common:])), size,
                           sha1, hasher or "SHA1-160")
                 for fid, path, size, sha1, hasher in raw)


def _format(image: Any) -> str | None:
    try:
        value = unwrap(image.getFormat())
    except AttributeError:
        return None
    return str(value) if value else None


def describe_image(image: Any) -> OmeroImage:
    """The :class:`OmeroImage` of an image wrapper (files, hashes, group, size, format)."""
    fileset = image.getFileset()
    group = image.getDetails().getGroup()
    return OmeroImage(
        id=int(image.getId()), name=str(image.getName()),
        group=str(group.getName()) if group is not None else "",
        fileset_id=int(fileset.getId()) if fileset is not None else None,
        files=_files(image), format=_format(image),
        size=(int(image.getSizeX()), int(image.getSizeY())),
        can_annotate=bool(image.canAnnotate()))


def _area(image: Any) -> int:
    return int(image.getSizeX()) * int(image.getSizeY())


def _pyramids(image: Any) -> tuple[list[Any], list[Any]]:
    """The pyramid images of ``image``'s fileset, and its associated images."""
    fileset = image.getFileset()
    members = list(fileset.copyImages()) if fileset is not None else [image]
    largest = max(_area(m) for m in members)
    associated = [m for m in members if ASSOCIATED_NAME.search(str(m.getName()))
                  or _area(m) < largest * ASSOCIATED_AREA_RATIO]
    ids = {int(m.getId()) for m in associated}
    pyramids = [m for m in members if int(m.getId()) not in ids]
    return pyramids, associated


def _images_of(conn: Any, data_type: DataType, object_id: int) -> tuple[list[Any], str | None]:
    """The images a selected object stands for, or why there are none."""
    obj = conn.getObject(data_type, object_id)
    if obj is None:
        return [], f"{data_type} {object_id}: not found, or not visible to you"
    if data_type == "Image":
        return [obj], None
    if data_type == "Dataset":
        images = list(obj.listChildren())
    else:
        images = [image for dataset in obj.listChildren() for image in dataset.listChildren()]
    if not images:
        return [], f"{data_type} {object_id} ({obj.getName()}): holds no images"
    return images, None


def resolve_images(conn: Any, data_type: str, ids: Iterable[int]) -> Resolution:
    """Resolve a selection (``Data_Type`` + ``IDs``) to pyramid images, each once, in order.

    Raises:
        InputError: an unknown data type, or no ids.
    """
    check_choice("Data_Type", data_type, DATA_TYPES)
    ids = [int(i) for i in ids]
    if not ids:
        raise InputError("no IDs selected")
    result = Resolution()
    seen: set[int] = set()
    reported: set[int] = set()
    for object_id in ids:
        images, problem = _images_of(conn, data_type, object_id)  # type: ignore[arg-type]
        if problem:
            result.skipped.append(problem)
        for image in images:
            pyramids, associated = _pyramids(image)
            for other in associated:
                if int(other.getId()) not in reported:
                    reported.add(int(other.getId()))
                    result.skipped.append(f"Image {other.getId()} ({other.getName()}): an "
                                          "associated image of a slide, not analysed")
            for pyramid in pyramids:
                if int(pyramid.getId()) not in seen:
                    seen.add(int(pyramid.getId()))
                    result.images.append(describe_image(pyramid))
    return result

