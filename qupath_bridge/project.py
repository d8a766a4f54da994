"""QuPath projects through paquo: analysis results in, pathologists' annotations out.

Why projects, beside dropping ``evidence.geojson`` on a slide: a project holds many slides with
their objects, opens in QuPath as it is, and lets ``hwsi analyze qupath:PROJECT`` read what was
drawn there and write the evidence back. paquo drives QuPath's own Java classes, so objects are
stored exactly as QuPath stores them; the price is a local QuPath install (``PAQUO_QUPATH_DIR``;
paquo 0.9 supports QuPath 0.2 to 0.6) and a JVM in the process.

This is the only module that imports paquo, and only inside functions: importing it is cheap and
works without QuPath, and a call that needs QuPath without one fails in one line naming
``PAQUO_QUPATH_DIR`` (:func:`require_qupath`). The paquo calls are kept thin; what to add (object
kind, class and colour, name, measurements, geometry, nucleus) is decided by pure functions
(:func:`read_result_evidence`, :func:`project_objects`) that run and are tested without QuPath.

paquo stores an object's name, class, measurements and (annotations only) description, not
QuPath's object ids or metadata. So the objects of one analysis carry its tag in their name
(``r3.p41 (HWSI 1a2b3c4d)``): exporting the same result again replaces them, while another
analysis of the same slide adds its own, as re-importing ``evidence.geojson`` does.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import unquote, urlparse

from shapely.geometry.base import BaseGeometry

from omero_hwsi._deps import require
from omero_hwsi.errors import (
    GeoJSONError,
    HwsiError,
    InputError,
    MissingExtraError,
    MissingResourceError,
    SlideNotFoundError,
)
from qupath_bridge.geojson import (
    QuPathObject,
    ReadOptions,
    analysis_regions,
    parse_objects,
    read_objects,
)

if TYPE_CHECKING:
    from paquo.classes import QuPathPathClass
    from paquo.hierarchy import QuPathPathObjectHierarchy
    from paquo.images import QuPathProjectImageEntry
    from paquo.pathobjects import QuPathPathAnnotationObject, QuPathPathDetectionObject
    from paquo.projects import QuPathProject

__all__ = [
    "PROJECT_FILE",
    "SOURCE_PREFIX",
    "ExportedResult",
    "ProjectImage",
    "ProjectObject",
    "ProjectObjectKind",
    "QuPathSource",
    "ResultEvidence",
    "add_evidence",
    "analysis_tag",
    "export_results",
    "file_uri_path",
    "is_analysis_object",
    "is_project",
    "object_name",
    "parse_source",
    "path_classes",
    "pick_images",
    "project_file",
    "project_images",
    "project_objects",
    "project_regions",
    "read_result_evidence",
    "require_qupath",
    "source_images",
]

logger = logging.getLogger(__name__)

SOURCE_PREFIX = "qupath:"
"""``hwsi analyze`` sources starting with this name a QuPath project (``qupath:DIR[#IMAGE]``)."""

PROJECT_FILE = "project.qpproj"
"""The project file QuPath writes in a project folder."""

SUPPORTED_QUPATH = "0.2 to 0.6"
"""The QuPath versions paquo 0.9 supports."""

_NEWEST_SUPPORTED = (0, 6)

RGB = tuple[int, int, int]

ProjectObjectKind = Literal["annotation", "tile", "detection", "cell"]
"""What a project object is added as: paquo's ``add_annotation``, ``add_tile``,
``add_detection`` or ``add_cell``."""

_KINDS: dict[str, ProjectObjectKind] = {
    "annotation": "annotation", "tile": "tile", "detection": "detection"}


# -- sources and paths (pure) ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class QuPathSource:
    """A ``qupath:PROJECT[#IMAGE NAME]`` source of ``hwsi analyze``.

    Attributes:
        project: the project folder, or its ``.qpproj`` file.
        image: the name of one image in the project (as QuPath shows it), or None for all.
    """

    project: Path
    image: str | None = None


def parse_source(text: str) -> QuPathSource | None:
    """The project (and image) a ``qupath:`` source names; None for any other source.

    The first ``#`` ends the project path, so image names may hold any character, ``#``
    included (project paths cannot).

    Raises:
        InputError: no project path, or nothing after ``#``.
    """
    if not text.startswith(SOURCE_PREFIX):
        return None
    path, hash_sign, image = text[len(SOURCE_PREFIX):].partition("#")
    if not path.strip():
        raise InputError(f"{text!r}: no QuPath project path; write qupath:PROJECT_DIR or "
                         "qupath:PROJECT_DIR#IMAGE_NAME")
    if hash_sign and not image.strip():
        raise InputError(f"{text!r}: empty image name after '#'; name an image of the project, "
                         "or leave out '#' to analyse every image")
    return QuPathSource(Path(path), image if hash_sign else None)


def is_project(path: Path) -> bool:
    """Whether ``path`` names a QuPath project (a folder, or a ``.qpproj`` file), not a file."""
    return path.is_dir() or path.suffix.lower() == ".qpproj"


def project_file(path: Path) -> Path:
    """The ``.qpproj`` file of a project given by its folder or by the file itself."""
    return path if path.suffix.lower() == ".qpproj" and not path.is_dir() else path / PROJECT_FILE


def file_uri_path(uri: str) -> Path | None:
    """The local file behind an image URI as QuPath writes it (``file:/data/a%20b.svs``).

    None for other schemes (OMERO, http): such images are not files hwsi can read.
    """
    parsed = urlparse(uri)
    if parsed.scheme != "file":
        return None
    path = unquote(parsed.path)
    if parsed.netloc and parsed.netloc != "localhost":  # a network share: //host/share/...
        path = f"//{parsed.netloc}{path}"
    return Path(path)


@dataclass(frozen=True, slots=True)
class ProjectImage:
    """One image entry of a QuPath project.

    Attributes:
        name: the image name QuPath shows (usually the file name).
        id: the entry id, unique within the project.
        uri: the image's URI, or None when the entry has several (paquo reads one).
        path: the local file behind ``uri``, or None when it is not a file URI.
    """

    name: str
    id: str
    uri: str | None
    path: Path | None


def pick_images(
    images: Sequence[ProjectImage], name: str | None, *, project: Path
) -> list[ProjectImage]:
    """The images to analyse: all of them, or the one named; each a readable local file.

    Checked before any analysis starts, so a bad name or a moved slide fails at once.

    Raises:
        InputError: no image of that name (the names are listed), several of that name, an
            empty project, or an image that is not a local file.
        SlideNotFoundError: an image's file is missing (moved since it was added).
    """
    if not images:
        raise InputError(f"{project}: the QuPath project has no images")
    chosen = list(images) if name is None else [images[_named(images, name, project)]]
    for image in chosen:
        if image.path is None:
            raise InputError(f"{project}: image {image.name!r} is not a local file "
                             f"({image.uri or 'several URIs'}); hwsi analyzes local files only")
        if not image.path.is_file():
            raise SlideNotFoundError(f"{project}: image {image.name!r}: {image.path} not found; "
                                     "fix the image path in QuPath (Project > Check URIs)")
    return chosen


def _named(images: Sequence[ProjectImage], name: str, project: Path) -> int:
    """Index of the one image called ``name``."""
    found = [n for n, image in enumerate(images) if image.name == name]
    if not found:
        names = [image.name for image in images]
        shown = ", ".join(repr(n) for n in names[:10]) + (", ..." if len(names) > 10 else "")
        raise InputError(f"{project}: no image named {name!r}; images: {shown}")
    if len(found) > 1:
        raise InputError(f"{project}: {len(found)} images are named {name!r}; rename them in "
                         "QuPath so that each name is unique")
    return found[0]


# -- result folders -> objects to add (pure) ------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class ProjectObject:
    """One object to add to an image's hierarchy, in paquo's terms.

    Attributes:
        kind: which paquo ``add_*`` call adds it.
        name: the object's name, ending with its analysis tag (see :func:`object_name`).
        classification: class names, base first (a derived class when there are several).
        class_color: the colour of the (last) class.
        geometry: the ROI, level-0 px.
        nucleus_geometry: a cell's nucleus (``kind == "cell"`` only).
        measurements: name -> value, NaN kept.
        description: what the annotation stands for (annotations only: paquo stores no
            metadata, and only annotations have a description).
    """

    kind: ProjectObjectKind
    name: str
    classification: tuple[str, ...] = ()
    class_color: RGB | None = None
    geometry: BaseGeometry
    nucleus_geometry: BaseGeometry | None = None
    measurements: dict[str, float] = field(default_factory=dict)
    description: str | None = None


@dataclass(frozen=True, slots=True)
class ResultEvidence:
    """What a project needs from one ``hwsi analyze`` result folder.

    Attributes:
        result_dir: the folder.
        slide_path: the analysed slide (a readable file: QuPath opens it to add it).
        tag: the analysis tag in the objects' names (:func:`analysis_tag`).
        objects: the evidence, regions first, as ``evidence.geojson`` orders it.
    """

    result_dir: Path
    slide_path: Path
    tag: str
    objects: tuple[ProjectObject, ...]


def analysis_tag(slide_key: str, created: str) -> str:
    """Eight hex digits naming one analysis: the slide's checksum (or id) and its time.

    The same pair as the evidence feature ids, so "the same analysis" means the same thing in
    a project as in a GeoJSON re-import.
    """
    return hashlib.sha256(f"{slide_key}/{created}".encode()).hexdigest()[:8]


def object_name(name: str, tag: str) -> str:
    """An object's name in the project: its own name followed by its analysis tag."""
    return f"{name} (HWSI {tag})" if name else f"(HWSI {tag})"


def is_analysis_object(name: str | None, tag: str) -> bool:
    """Whether an object's name says it was added for the analysis ``tag``."""
    return name is not None and name.endswith(f"(HWSI {tag})")


def project_objects(
    objects: Iterable[QuPathObject], *, tag: str, source: str = "input"
) -> list[ProjectObject]:
    """Read QuPath objects as objects to add to a project image, in the same order.

    Annotations, tiles and detections keep their type; a cell with a nucleus stays a cell
    (paquo's ``add_cell(roi, nucleus_roi=...)``), a cell without one becomes a detection.
    Metadata becomes an annotation's description, one ``key: value`` per line.

    Raises:
        GeoJSONError: an object QuPath cannot hold under an image (a TMA core, a root).
    """
    out: list[ProjectObject] = []
    for index, obj in enumerate(objects):
        kind = _kind(obj, index, source)
        out.append(ProjectObject(
            kind=kind,
            name=object_name(obj.name or "", tag),
            classification=obj.classification,
            class_color=obj.class_color,
            geometry=obj.geometry,
            nucleus_geometry=obj.nucleus_geometry if kind == "cell" else None,
            measurements=dict(obj.measurements),
            description=_description(obj.metadata) if kind == "annotation" else None,
        ))
    return out


def _kind(obj: QuPathObject, index: int, source: str) -> ProjectObjectKind:
    if obj.object_type == "cell":
        return "cell" if obj.nucleus_geometry is not None else "detection"
    kind = _KINDS.get(obj.object_type)
    if kind is None:
        raise GeoJSONError(f"{source}: feature {index}: a {obj.object_type} object cannot be "
                           "added to a project image")
    return kind


def _description(metadata: dict[str, str]) -> str | None:
    return "\n".join(f"{key}: {value}" for key, value in metadata.items()) or None


def path_classes(objects: Iterable[ProjectObject]) -> dict[tuple[str, ...], RGB | None]:
    """The classes the objects use, in first-use order, each with its first colour."""
    classes: dict[tuple[str, ...], RGB | None] = {}
    for obj in objects:
        if obj.classification and classes.get(obj.classification) is None:
            classes[obj.classification] = obj.class_color
    return classes


def read_result_evidence(
    result_dir: str | os.PathLike[str], *, options: ReadOptions | None = None
) -> ResultEvidence:
    """The slide, analysis tag and evidence objects of a result folder.

    ``result.json`` gives the slide (its provenance path, else ``slide.slide_path``) and the
    analysis (slide checksum and time); ``evidence.geojson`` gives the objects, read by the
    same reader as any QuPath file.

    Raises:
        InputError: not a result folder, or ``result.json`` without a slide path or time.
        SlideNotFoundError: the slide is not a file here (QuPath must open it).
        GeoJSONError: ``evidence.geojson`` is malformed.
    """
    folder = Path(result_dir)
    for name in ("result.json", "evidence.geojson"):
        if not (folder / name).is_file():
            raise InputError(f"{folder}: not an hwsi analyze result folder (no {name})")
    document = _result_document(folder / "result.json")
    recorded = document.get("slide")
    slide: dict[str, Any] = recorded if isinstance(recorded, dict) else {}
    created = document.get("created")
    if not isinstance(created, str) or not created:
        raise InputError(f"{folder / 'result.json'}: no 'created' time; not written by hwsi analyze")
    tag = analysis_tag(str(slide.get("checksum") or slide.get("slide_id") or ""), created)
    objects = read_objects(folder / "evidence.geojson", options=options)
    return ResultEvidence(
        result_dir=folder,
        slide_path=_readable_slide(folder, document, slide),
        tag=tag,
        objects=tuple(project_objects(objects, tag=tag, source=str(folder / "evidence.geojson"))),
    )


def _result_document(path: Path) -> dict[str, Any]:
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputError(f"{path}: not a readable result.json ({err})") from err
    if not isinstance(document, dict):
        raise InputError(f"{path}: not a result.json (expected a JSON object)")
    return document


def _readable_slide(folder: Path, document: dict[str, Any], slide: dict[str, Any]) -> Path:
    """The analysed slide's path; QuPath opens it when it is added, so it must be readable."""
    provenance = document.get("provenance")
    recorded = provenance.get("slide") if isinstance(provenance, dict) else None
    text = (recorded.get("path") if isinstance(recorded, dict) else None) or slide.get("slide_path")
    if not isinstance(text, str) or not text:
        raise InputError(f"{folder / 'result.json'}: no slide path recorded; re-run hwsi analyze")
    path = Path(text)
    if not path.is_file():
        raise SlideNotFoundError(f"{folder}: its slide {path} is not found; QuPath must open the "
                                 "slide to add it to a project: restore it there, or analyse it "
                                 "again at its new place")
    if not os.access(path, os.R_OK):
        raise InputError(f"{folder}: its slide {path} is not readable; QuPath must open it to add "
                         "it to a project")
    return path


# -- paquo ------------------------------------------------------------------------------------


@functools.cache
def require_qupath() -> str:
    """Start paquo with the local QuPath install (once per process); QuPath's version.

    Why a function: importing ``paquo.projects`` looks for QuPath and starts a JVM, and raises
    a bare ``ValueError("no valid qupath installation found")`` without one; every caller gets
    this one-line error instead, and nothing Java-side leaks out.

    Raises:
        MissingExtraError: paquo (the ``qupath`` extra) is not installed (exit 3).
        MissingResourceError: no usable QuPath install (exit 3).
    """
    require("paquo", extra="qupath", purpose="QuPath projects")
    try:
        import paquo.projects  # noqa: F401  (finds QuPath, starts the JVM)
        from paquo.java import qupath_version
    except ImportError as err:  # paquo installed without its JPype dependency
        raise MissingExtraError(f"QuPath projects need paquo and JPype ({_reason(err)}); install "
                                "them with: pip install 'omero-hwsi[qupath]'") from err
    except (ValueError, OSError, RuntimeError) as err:
        raise MissingResourceError(_no_qupath(err)) from err
    version = str(qupath_version) if qupath_version is not None else "unknown"
    if _version_tuple(version) > _NEWEST_SUPPORTED:
        logger.warning("QuPath %s is newer than paquo 0.9 supports (%s); projects may not open",
                       version, SUPPORTED_QUPATH)
    logger.info("QuPath %s started through paquo", version)
    return version


def _no_qupath(err: BaseException) -> str:
    configured = os.environ.get("PAQUO_QUPATH_DIR")
    found = (f"PAQUO_QUPATH_DIR={configured} is not a usable QuPath folder" if configured
             else "no QuPath install found and PAQUO_QUPATH_DIR is not set")
    return (f"QuPath projects need a local QuPath: {found} ({_reason(err)}); set "
            f"PAQUO_QUPATH_DIR to the QuPath folder (paquo 0.9 supports QuPath {SUPPORTED_QUPATH}), "
            "or drag evidence.geojson onto the slide in QuPath instead")


def _version_tuple(version: str) -> tuple[int, ...]:
    """``"0.6.0-rc2"`` -> ``(0, 6)``; unparsable -> ``()``, which is never "too new"."""
    match = re.match(r"(\d+)\.(\d+)", version)
    return (int(match[1]), int(match[2])) if match else ()


def _reason(err: BaseException) -> str:
    """The first line of an error's text (Java messages run over many lines)."""
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


@contextmanager
def _foreign(what: str) -> Iterator[None]:
    """Turn paquo's and Java's errors inside the block into one-line ``InputError``s."""
    import jpype

    try:
        yield
    except HwsiError:
        raise
    except (OSError, ValueError, RuntimeError, jpype.JException) as err:
        raise InputError(f"{what} ({_reason(err)})") from err


@contextmanager
def _project(path: Path, mode: Literal["r", "r+", "a"]) -> Iterator[QuPathProject]:
    """Open (``r``, ``r+``) or open-or-create (``a``) a project; the caller saves."""
    require_qupath()
    from paquo.projects import QuPathProject

    file = project_file(path)
    if not file.is_file():
        if mode != "a":
            raise InputError(f"{path}: not a QuPath project (no {file.name})")
        folder = file.parent
        if file.name != PROJECT_FILE or (folder.exists() and (
                not folder.is_dir() or any(not p.name.endswith(".backup") for p in folder.iterdir()))):
            raise InputError(f"{path}: not a QuPath project; give a project folder, or a new or "
                             "empty folder to create one in")
    with _foreign(f"{path}: QuPath cannot open the project"):
        project = QuPathProject(file, mode=mode)
    yield project


def _image(entry: QuPathProjectImageEntry) -> ProjectImage:
    try:
        uri: str | None = str(entry.uri)
    except (NotImplementedError, RuntimeError):  # several URIs (paquo reads one), or none
        uri = None
    return ProjectImage(name=entry.image_name, id=entry.entry_id, uri=uri,
                        path=None if uri is None else file_uri_path(uri))


def _entry(project: QuPathProject, name: str, path: Path) -> QuPathProjectImageEntry:
    entries = list(project.images)
    return entries[_named([_image(e) for e in entries], name, path)]


def project_images(project_dir: str | os.PathLike[str]) -> list[ProjectImage]:
    """The images of a project, in project order (read-only).

    Raises:
        MissingResourceError: no QuPath install (see :func:`require_qupath`).
        InputError: not a project, or QuPath cannot open it.
    """
    path = Path(project_dir)
    with _project(path, "r") as project, _foreign(f"{path}: cannot list the project's images"):
        return [_image(entry) for entry in project.images]


def source_images(source: QuPathSource) -> list[ProjectImage]:
    """The images a ``qupath:`` source stands for (:func:`pick_images` of the project's)."""
    return pick_images(project_images(source.project), source.image, project=source.project)


def project_regions(
    project_dir: str | os.PathLike[str],
    image_name: str,
    classes: Iterable[str] | None = None,
    *,
    options: ReadOptions | None = None,
) -> BaseGeometry:
    """The analysis regions drawn on one project image: its annotation areas, level-0 px.

    QuPath's own GeoJSON of the annotations is read by :func:`~qupath_bridge.geojson.parse_objects`
    and united by :func:`~qupath_bridge.geojson.analysis_regions`, so a project gives exactly
    the regions its GeoJSON export would (same class rule, same geometry checks and caps).

    Raises:
        MissingResourceError: no QuPath install.
        InputError: not a project, no image of that name.
        GeoJSONError: no annotation (of the classes) with an area; malformed geometry.
    """
    path = Path(project_dir)
    source = f"{path} [{image_name}]"
    with _project(path, "r") as project:
        entry = _entry(project, image_name, path)
        with _foreign(f"{source}: cannot read the annotations"):
            features = entry.hierarchy.to_geojson()
    objects = parse_objects(json.dumps(features), source=source, options=options)
    return analysis_regions(objects, classes, source=source)


@dataclass(frozen=True, slots=True)
class ExportedResult:
    """What exporting one result folder did.

    Attributes:
        result_dir: the result folder.
        image: the project image that holds its evidence.
        image_added: whether the slide was added to the project for it.
        replaced: objects of an earlier export of the same analysis, removed first.
        kept: objects of an earlier export left as they were (``overwrite_evidence=False``).
        added: objects added, by kind.
    """

    result_dir: Path
    image: ProjectImage
    image_added: bool
    replaced: int = 0
    kept: int = 0
    added: dict[str, int] = field(default_factory=dict)


def export_results(
    result_dirs: Iterable[str | os.PathLike[str]],
    project_dir: str | os.PathLike[str],
    *,
    overwrite_evidence: bool = True,
    options: ReadOptions | None = None,
) -> list[ExportedResult]:
    """Put the evidence of ``hwsi analyze`` result folders into a QuPath project.

    The project is created when the folder is new or empty. Each result's slide is found
    among the project's images by its file, or added (as a brightfield H&E image). Regions
    become annotations, patches tiles, nuclei detections (cells with a nucleus: cells), each
    with its class, colour, measurements and name; the classes join the project's class list.
    An earlier export of the same analysis is replaced (``overwrite_evidence``) or kept as it
    is; nothing is duplicated either way. Every folder is read and checked before the project
    is touched.

    Raises:
        InputError: a folder that is not a result, a slide that is not readable here, a
            folder that is neither a project nor empty, or a slide QuPath cannot open.
        MissingResourceError: no QuPath install (see :func:`require_qupath`).
    """
    results = [read_result_evidence(d, options=options) for d in result_dirs]
    if not results:
        raise InputError("no result folders to export")
    path = Path(project_dir)
    with _project(path, "a") as project:
        exported = []
        for result in results:
            entry, added = _slide_entry(project, result.slide_path)
            exported.append(_export(project, entry, result, image_added=added,
                                    overwrite=overwrite_evidence))
        _save(project, path)
    return exported


def add_evidence(
    project_dir: str | os.PathLike[str],
    image_name: str,
    result_dir: str | os.PathLike[str],
    *,
    options: ReadOptions | None = None,
) -> ExportedResult:
    """Add a result's evidence to one named image of an existing project (``--write-back``).

    An earlier export of the same analysis on that image is replaced.

    Raises:
        InputError: not a project, no image of that name, an image whose file is not the
            analysed slide, or a folder that is not a result.
        MissingResourceError: no QuPath install.
    """
    result = read_result_evidence(result_dir, options=options)
    path = Path(project_dir)
    with _project(path, "r+") as project:
        entry = _entry(project, image_name, path)
        image = _image(entry)
        if image.path is not None and not _same_file(image.path, result.slide_path):
            raise InputError(f"{result.result_dir}: analysed {result.slide_path}, but image "
                             f"{image_name!r} of {path} is {image.path}")
        exported = _export(project, entry, result, image_added=False, overwrite=True)
        _save(project, path)
    return exported


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a == b or os.path.samefile(a, b)
    except OSError:
        return False


def _slide_entry(project: QuPathProject, slide: Path) -> tuple[QuPathProjectImageEntry, bool]:
    """The project image of a slide file, added when absent; whether it was added."""
    target = slide.resolve()
    for entry in project.images:
        image = _image(entry)
        if image.path is not None and _same_file(image.path, target):
            return entry, False
    from paquo.images import QuPathImageType

    with _foreign(f"{slide}: QuPath cannot add the slide to the project"):
        entries = project.add_image(target, image_type=QuPathImageType.BRIGHTFIELD_H_E,
                                    return_list=True)
    if len(entries) > 1:
        logger.warning("%s: QuPath added %d images (series) for the file; the evidence goes on "
                       "the first, %r", slide, len(entries), entries[0].image_name)
    return entries[0], True


def _export(
    project: QuPathProject,
    entry: QuPathProjectImageEntry,
    result: ResultEvidence,
    *,
    image_added: bool,
    overwrite: bool,
) -> ExportedResult:
    """Replace (or keep) one analysis's objects on one image and save the image data."""
    image = _image(entry)
    with _foreign(f"{result.result_dir}: cannot add the evidence to image {image.name!r}"):
        hierarchy = entry.hierarchy
        annotations, detections = _analysis_objects(hierarchy, result.tag)
        earlier = len(annotations) + len(detections)
        if earlier and not overwrite:
            logger.info("%s: kept %d earlier object(s) of analysis %s", image.name, earlier,
                        result.tag)
            return ExportedResult(result.result_dir, image, image_added, kept=earlier)
        classes = _ensure_classes(project, path_classes(result.objects))
        _remove(hierarchy, annotations, detections)
        with hierarchy.no_autoflush():
            added: Counter[str] = Counter(_add(hierarchy, obj, classes) for obj in result.objects)
        entry.save()  # type: ignore[no-untyped-call]  # paquo leaves it unannotated
    logger.info("%s: added %d object(s) of analysis %s (%d replaced)", image.name,
                sum(added.values()), result.tag, earlier)
    return ExportedResult(result.result_dir, image, image_added, replaced=earlier,
                          added=dict(added))


def _analysis_objects(
    hierarchy: QuPathPathObjectHierarchy, tag: str
) -> tuple[list[QuPathPathAnnotationObject], list[QuPathPathDetectionObject]]:
    """An analysis's annotations and detections (tiles and cells included) on one image."""
    return ([a for a in hierarchy.annotations if is_analysis_object(a.name, tag)],
            [d for d in hierarchy.detections if is_analysis_object(d.name, tag)])


def _remove(
    hierarchy: QuPathPathObjectHierarchy,
    annotations: list[QuPathPathAnnotationObject],
    detections: list[QuPathPathDetectionObject],
) -> None:
    """Remove objects from an image (children kept: they may be the user's)."""
    if annotations:
        present_annotations = hierarchy.annotations
        present_annotations -= annotations
    if detections:
        present_detections = hierarchy.detections
        present_detections -= detections


def _ensure_classes(
    project: QuPathProject, wanted: dict[tuple[str, ...], RGB | None]
) -> dict[tuple[str, ...], QuPathPathClass]:
    """Path classes with the evidence colours, added to the project's class list."""
    from paquo.classes import QuPathPathClass

    made: dict[tuple[str, ...], QuPathPathClass] = {}
    for names, color in wanted.items():
        parent = None
        for name in names[:-1]:
            parent = QuPathPathClass(name, parent=parent)
        leaf = QuPathPathClass(names[-1], parent=parent)
        if color is not None:
            leaf.color = color
        made[names] = leaf
    present = list(project.path_classes)
    known = {c.id for c in present}
    project.path_classes = present + [c for c in made.values() if c.id not in known]
    return made


def _add(
    hierarchy: QuPathPathObjectHierarchy,
    obj: ProjectObject,
    classes: dict[tuple[str, ...], QuPathPathClass],
) -> ProjectObjectKind:
    """Add one object through paquo; its kind, for the summary."""
    path_class = classes.get(obj.classification)
    added: QuPathPathAnnotationObject | QuPathPathDetectionObject
    if obj.kind == "annotation":
        added = annotation = hierarchy.add_annotation(obj.geometry, path_class, obj.measurements)
        if obj.description:
            annotation.description = obj.description
    elif obj.kind == "tile":
        added = hierarchy.add_tile(obj.geometry, path_class, obj.measurements)
    elif obj.kind == "cell" and obj.nucleus_geometry is not None:
        added = hierarchy.add_cell(obj.geometry, path_class, obj.measurements,
                                   nucleus_roi=obj.nucleus_geometry)
    else:
        added = hierarchy.add_detection(obj.geometry, path_class, obj.measurements)
    added.name = obj.name
    return obj.kind


def _save(project: QuPathProject, path: Path) -> None:
    """Write the project file (image data was saved per image, only where it changed)."""
    with _foreign(f"{path}: cannot save the QuPath project"):
        project.save(images=False)
