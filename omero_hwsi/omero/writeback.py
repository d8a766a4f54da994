"""Write one analysis back onto its OMERO image, as the requesting user.

Order, and why:

1. check that the user can see the image and annotate it (before anything is changed);
2. delete what an earlier run of *this job* wrote (found by namespace and job marker): a rerun
   after a crash mid-write-back repairs it, and nothing else is ever touched;
3. the evidence regions as ROIs, saved in batches (QuPath's OMERO extension imports them as
   classified annotations; patches and nuclei stay in the GeoJSON, since viewers slow down
   with thousands of ROIs);
4. the evidence GeoJSON (``application/geo+json``), the report as Markdown (``text/plain``,
   which OMERO.web previews) and as self-contained HTML;
5. last, the provenance MapAnnotation: its presence marks a complete write-back.

Every object carries the job marker in its description; attachment names carry the image id
and the job id. The connection must be the user's own session (``omero_connection(user=...)``)
in the image's group, so OMERO's permissions decide what may be written.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from omero_hwsi.errors import InputError, OmeroNotFoundError, OmeroPermissionError
from omero_hwsi.omero.annotations import (
    NS_ANALYSIS,
    NS_EVIDENCE,
    NS_REPORT,
    attachment_name,
    job_marker,
    provenance_pairs,
    roi_marker,
)
from omero_hwsi.omero.images import unwrap
from omero_hwsi.omero.rois import roi_specs_from_features, to_omero_roi

__all__ = ["ROI_BATCH", "WriteBack", "WrittenObjects", "check_image_access", "delete_job_objects",
           "write_back"]

logger = logging.getLogger(__name__)

ROI_BATCH: Final = 200
"""ROIs saved per ``saveAndReturnArray`` call: large enough to be quick, small enough for
Ice's message size limit with detailed polygons."""

_ATTACHMENTS: Final = (("evidence.geojson", "application/geo+json", NS_EVIDENCE),
                       ("report.md", "text/plain", NS_REPORT),
                       ("report.html", "text/html", NS_REPORT))
_ANNOTATION_KINDS: Final = (("FileAnnotation", NS_EVIDENCE), ("FileAnnotation", NS_REPORT),
                            ("MapAnnotation", NS_ANALYSIS))
"""The annotation types and namespaces a write-back creates (what a rerun deletes)."""


@dataclass(frozen=True, slots=True)
class WriteBack:
    """What to write: the job, the image and the analysis's result folder."""

    image_id: int
    job_id: str
    result_dir: Path
    user: str
    model: str
    model_sha256: str
    input_sha256: str
    evidence_depth: str
    write_rois: bool = True


@dataclass
class WrittenObjects:
    """Ids of what a write-back created (and of what it deleted first)."""

    rois: list[int] = field(default_factory=list)
    files: dict[str, int] = field(default_factory=dict)
    provenance: int | None = None
    deleted_rois: int = 0
    deleted_annotations: int = 0

    def uris(self, server: str) -> list[str]:
        """One ``omero://<server>/<Type>/<id>`` per object, for the job ledger's outputs."""
        items = [f"omero://{server}/Roi/{i}" for i in self.rois]
        items += [f"omero://{server}/FileAnnotation/{i}" for i in self.files.values()]
        if self.provenance is not None:
            items.append(f"omero://{server}/MapAnnotation/{self.provenance}")
        return items


def check_image_access(conn: Any, image_id: int) -> Any:
    """The image, if the connection's user may see and annotate it.

    Raises:
        OmeroNotFoundError: no such image, or not visible to the user.
        OmeroPermissionError: the user may not annotate it.
    """
    image = conn.getObject("Image", image_id)
    if image is None:
        raise OmeroNotFoundError(f"OMERO Image {image_id}: not found, or not visible to this user")
    if not image.canAnnotate():
        raise OmeroPermissionError(f"OMERO Image {image_id} ({image.getName()}): this user may "
                                   "not annotate it, so results cannot be written back")
    return image


def delete_job_objects(conn: Any, image: Any, job_id: str) -> tuple[int, int]:
    """Delete the ROIs and annotations this job wrote on ``image`` earlier; returns the counts.

    Only objects in our namespaces whose description is this job's marker are deleted.
    Annotations are looked up by namespace and marker, not through the image's links: a run
    killed between saving an annotation and linking it leaves it unlinked, and the rerun must
    delete it too (a job writes onto one image only, so its marker finds nothing elsewhere).
    """
    marker = job_marker(job_id)
    rois = [int(unwrap(roi.getId())) for roi in conn.getRoiService().findByImage(
        int(image.getId()), None).rois if unwrap(roi.getDescription()) == roi_marker(job_id)]
    annotations = sorted({int(ann.getId()) for kind, ns in _ANNOTATION_KINDS
                          for ann in conn.getObjects(kind, attributes={"ns": ns,
                                                                       "description": marker})})
    if rois:
        conn.deleteObjects("Roi", rois, wait=True)
    if annotations:
        conn.deleteObjects("Annotation", annotations, wait=True)
    return len(rois), len(annotations)


def _evidence_features(result_dir: Path) -> list[dict[str, Any]]:
    path = result_dir / "evidence.geojson"
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise InputError(f"{path}: cannot read the evidence GeoJSON ({err})") from err
    return list(doc.get("features") or [])


def write_back(conn: Any, spec: WriteBack, *,
               progress: Callable[[str, int, int], None] | None = None) -> WrittenObjects:
    """Write ROIs, attachments and provenance for one analysis (see the module docstring).

    Raises:
        OmeroNotFoundError, OmeroPermissionError: as :func:`check_image_access`.
        InputError: the result folder lacks a file the write-back needs.
    """
    from omero.gateway import MapAnnotationWrapper

    image = check_image_access(conn, spec.image_id)
    result_file = spec.result_dir / "result.json"
    missing = [name for name, _, _ in _ATTACHMENTS if not (spec.result_dir / name).is_file()]
    if not result_file.is_file():
        missing.insert(0, "result.json")
    if missing:
        raise InputError(f"{spec.result_dir}: result file(s) missing: {', '.join(missing)}")
    result = json.loads(result_file.read_text(encoding="utf-8"))
    marker = job_marker(spec.job_id)
    written = WrittenObjects()
    written.deleted_rois, written.deleted_annotations = delete_job_objects(conn, image,
                                                                           spec.job_id)
    if spec.write_rois:
        rois = [to_omero_roi(roi, spec.image_id) for roi in
                roi_specs_from_features(_evidence_features(spec.result_dir),
                                        description=roi_marker(spec.job_id))]
        update = conn.getUpdateService()
        for start in range(0, len(rois), ROI_BATCH):
            saved = update.saveAndReturnArray(rois[start:start + ROI_BATCH], conn.SERVICE_OPTS)
            written.rois += [int(unwrap(roi.getId())) for roi in saved]
            if progress is not None:
                progress("rois", min(start + ROI_BATCH, len(rois)), len(rois))
    for name, mimetype, ns in _ATTACHMENTS:
        annotation = conn.createFileAnnfromLocalFile(
            str(spec.result_dir / name),
            origFilePathAndName=attachment_name(spec.image_id, spec.job_id, name),
            mimetype=mimetype, ns=ns, desc=marker)
        image.linkAnnotation(annotation)
        written.files[name] = int(annotation.getId())
    provenance = MapAnnotationWrapper(conn)
    provenance.setNs(NS_ANALYSIS)
    provenance.setDescription(marker)
    provenance.setValue(provenance_pairs(
        result, job_id=spec.job_id, model=spec.model, model_sha256=spec.model_sha256,
        evidence_depth=spec.evidence_depth, input_sha256=spec.input_sha256,
        image_id=spec.image_id, user=spec.user))
    provenance.save()
    image.linkAnnotation(provenance)
    written.provenance = int(provenance.getId())
    logger.info("OMERO Image %d: wrote %d ROI(s), %d file(s) and the provenance of job %s "
                "(deleted %d ROI(s) and %d annotation(s) of an earlier run)", spec.image_id,
                len(written.rois), len(written.files), spec.job_id, written.deleted_rois,
                written.deleted_annotations)
    return written
