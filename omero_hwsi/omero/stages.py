"""The OMERO ends of a job: pull the image before ``prepare``, write back after ``write``.

Why a module of its own: the job tasks (:mod:`omero_hwsi.jobs.tasks`) stay the same for every
source; for an OMERO job they call :func:`pull_for_job` to get a local slide (and, on request,
the image's own ROIs as analysis regions) and :func:`write_back_for_job` to put the results on
the image. Both open a session *as the job's user* in the image's group through the service
account (:func:`omero_hwsi.omero.connect.omero_connection`): no user credential is ever in a
message or the ledger, only the user and group names. In session-key mode both join the
session Run Analysis opened for the job instead; the write-back, the job's last use of it,
deletes its key and ends it once the results are written.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from omero_hwsi.errors import InputError
from omero_hwsi.omero.connect import omero_connection
from omero_hwsi.omero.images import describe_image
from omero_hwsi.omero.rois import image_regions
from omero_hwsi.omero.writeback import WriteBack, check_image_access, write_back
from omero_hwsi.settings import Settings

__all__ = ["OMERO_CACHE", "pull_for_job", "write_back_for_job"]

OMERO_CACHE = "omero-cache"
"""Folder under ``HWSI_DATA_DIR`` holding downloaded filesets and materialised pixels."""

Progress = Callable[[str, int, int], None]


def pull_for_job(settings: Settings, *, job_id: str, user: str, params: dict[str, Any],
                 staging: Path, progress: Progress | None = None) -> tuple[Path, Path | None]:
    """The job's image as a local slide file, and its ROIs as a regions GeoJSON if asked.

    The user's access is checked before anything is read; the image must still hold the
    files it held at submission (same stored hashes), else the job would not be the one
    its key names.

    Raises:
        OmeroNotFoundError, OmeroPermissionError: the image is gone or may not be annotated.
        InputError: the image changed since submission, or ``restrict_to_rois`` found no ROI.
        ServiceError: the download failed its checksum, or OMERO is unreachable.
    """
    from omero_hwsi.omero.pull import download_fileset, materialize_pixels

    omero = params["omero"]
    cache_root = settings.data_dir / OMERO_CACHE
    with omero_connection(settings, user=user, group=omero["group"] or None,
                          job_id=job_id) as conn:
        image = describe_image(check_image_access(conn, int(omero["image"])))
        if image.files_sha256 != omero["files_sha256"]:
            raise InputError(f"OMERO Image {image.id} ({image.name}): its files changed after "
                             "the job was submitted; run the analysis again")
        if omero["route"] == "download":
            slide = download_fileset(conn, image, cache_root=cache_root,
                                     max_bytes=settings.omero_cache_max_bytes, progress=progress)
        else:
            slide = materialize_pixels(conn, image, cache_root=cache_root,
                                       mpp=params.get("mpp"), progress=progress)
        regions = None
        if omero.get("restrict_to_rois"):
            found = image_regions(conn, image.id, staging / "omero-regions.geojson")
            if found is None:
                raise InputError(f"OMERO Image {image.id} ({image.name}): Restrict_To_ROIs was "
                                 "asked but the image has no ROI with an area")
            regions, digest = found
            if omero.get("rois_sha256") and digest != omero["rois_sha256"]:
                raise InputError(f"OMERO Image {image.id} ({image.name}): its ROIs changed "
                                 "after the job was submitted; run the analysis again")
    return slide, regions


def write_back_for_job(settings: Settings, *, job_id: str, user: str, params: dict[str, Any],
                       model: str, input_sha256: str, out_dir: Path) -> list[str]:
    """Write the result folder onto the job's image; returns ``omero://`` URIs of the objects.

    In session-key mode a successful write-back also deletes the job's key and kills its
    session; a failed one keeps both for the stage's rerun (the session's TTL bounds them).
    """
    omero = params["omero"]
    spec = WriteBack(image_id=int(omero["image"]), job_id=job_id, result_dir=out_dir, user=user,
                     model=model, model_sha256=params["model"]["sha256"],
                     input_sha256=input_sha256, evidence_depth=params["evidence"],
                     write_rois=bool(omero.get("write_rois", True)))
    with omero_connection(settings, user=user, group=omero["group"] or None, job_id=job_id,
                          end_session=True) as conn:
        written = write_back(conn, spec)
    return written.uris(omero["server"])

