"""What the OMERO scripts in ``scripts/omero/HWSI/`` do, as functions of a connection.

Why here and not in the scripts: the server runs a script file in a child of its own Python,
with no package of ours on the path but what is installed there, and a script cannot be unit
tested without a server. So each script only declares its parameters, calls one function of
this module with its connection and inputs, and sets the outputs; the functions run in the
tests against a fake gateway.

This module imports omero-py only inside functions and never imports torch: an OMERO server
needs omero-hwsi with the ``jobs`` extra (Celery client, SQLAlchemy ledger models, psycopg),
nothing more.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from omero_hwsi.errors import HwsiError, InputError, check_choice
from omero_hwsi.jobs.client import (
    EVIDENCE_DEPTHS,
    JobRequest,
    OmeroJobInput,
    Submission,
    list_jobs,
    parse_since,
    retry,
    submit,
)
from omero_hwsi.jobs.ledger import STATES, Job
from omero_hwsi.omero.annotations import NS_ANALYSIS
from omero_hwsi.omero.images import DATA_TYPES, OmeroImage, resolve_images
from omero_hwsi.omero.rois import regions_digest
from omero_hwsi.omero.session_keys import (
    close_user_sessions,
    open_user_sessions,
    session_key,
    session_key_mode,
    write_session_key,
)
from omero_hwsi.settings import Settings

__all__ = ["INDEX_COLUMNS", "SCRIPT_TASKS", "ReportIndex", "ScriptOutcome", "attach_index",
           "job_inputs", "job_status", "report_index", "report_index_script", "run_analysis",
           "script_error"]

SCRIPT_TASKS: Final = ("report", "vqa", "caption", "classify")
RESTARTABLE: Final = ("failed", "cancelled", "dead_letter")
"""Run_Analysis on an image whose job ended in one of these states runs that job again."""
"""Tasks offered in OMERO.web (``retrieve`` compares slides with texts: a CLI task)."""


@dataclass(frozen=True, slots=True)
class ScriptOutcome:
    """What a script shows: the Activities ``Message`` and its other outputs."""

    message: str
    job_ids: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    outputs: dict[str, Any] = field(default_factory=dict)


def _text(inputs: Mapping[str, Any], name: str) -> str | None:
    value = inputs.get(name)
    return str(value).strip() or None if value is not None else None


def _request(inputs: Mapping[str, Any]) -> JobRequest:
    """The analysis options of the Run_Analysis form, checked as ``hwsi analyze`` checks them.

    Raises:
        InputError: an option outside its vocabulary, a VQA without question, a
            classification with fewer than two labels.
    """
    task = _text(inputs, "Task") or "report"
    check_choice("Task", task, SCRIPT_TASKS)
    question = _text(inputs, "Question")
    labels = tuple(x.strip() for x in (_text(inputs, "Labels") or "").split(",") if x.strip())
    if task == "vqa" and not question:
        raise InputError("Task vqa needs a Question")
    if task == "classify" and len(labels) < 2:
        raise InputError("Task classify needs at least two comma-separated Labels")
    depth = _text(inputs, "Evidence_Depth") or "region"
    check_choice("Evidence_Depth", depth, EVIDENCE_DEPTHS)
    return JobRequest(task=task, question=question, labels=labels, evidence=depth)


def job_inputs(conn: Any, images: Sequence[OmeroImage], *, write_rois: bool,
               restrict_to_rois: bool, out: Path | None = None,
               ) -> tuple[list[OmeroJobInput], list[str]]:
    """The images that can be analysed as jobs, and one line per image that cannot.

    An image the user may not annotate cannot take the results; with ``restrict_to_rois``,
    an image without a ROI of its own has nothing to analyse. ``out`` gives each image the
    result folder ``out/image-<id>`` (default: the job's folder under the data dir).
    """
    server = str(conn.getConfigService().getDatabaseUuid())
    accepted: list[OmeroJobInput] = []
    skipped: list[str] = []
    for image in images:
        if not image.can_annotate:
            skipped.append(f"Image {image.id} ({image.name}): you may not annotate it, so its "
                           "results could not be written back")
            continue
        digest = regions_digest(conn, image.id) if restrict_to_rois else None
        if restrict_to_rois and digest is None:
            skipped.append(f"Image {image.id} ({image.name}): no ROI with an area to restrict "
                           "the analysis to")
            continue
        accepted.append(OmeroJobInput(
            image, server=server, write_rois=write_rois, restrict_to_rois=restrict_to_rois,
            rois_sha256=digest, out_dir=None if out is None else out / f"image-{image.id}"))
    return accepted, skipped


def run_analysis(conn: Any, inputs: Mapping[str, Any], *, settings: Settings,
                 model: Path | None = None) -> ScriptOutcome:
    """Run_Analysis: validate, resolve the selection to pyramid images, queue one job each.

    Returns at once: workers do the analysis and the write-back as the requesting user, in
    each image's group. Images the user cannot annotate are refused here, before queueing.
    An image whose job exists and ended failed, cancelled or in dead letter has that job run
    again (``retry``): for a user, running the analysis again is how to recover.

    In session-key mode one session of the user is opened per image (in its group) before
    anything is queued, so a refusal queues nothing; each job this call creates or restarts
    gets its key stored for the workers, and the sessions of jobs that are queued, running or
    done are closed again (those keep their own key).

    Raises:
        InputError: bad options or a selection with nothing to analyse.
        HwsiError: the ledger, the broker, the model or (session-key mode) a new session
            cannot be had (one line).
    """
    request = _request(inputs)
    data_type = _text(inputs, "Data_Type") or "Image"
    check_choice("Data_Type", data_type, DATA_TYPES)
    ids = [int(i) for i in inputs.get("IDs") or []]
    resolution = resolve_images(conn, data_type, ids)
    inputs_, skipped = job_inputs(conn, resolution.images,
                                  write_rois=bool(inputs.get("Write_ROIs", True)),
                                  restrict_to_rois=bool(inputs.get("Restrict_To_ROIs", False)))
    skipped = resolution.skipped + skipped
    if not inputs_:
        raise InputError("nothing to analyse: " + ("; ".join(skipped) or "no images selected"))
    user = str(conn.getUser().getName())
    images = [item.image for item in inputs_]
    sessions = (open_user_sessions(conn, settings, [image.group for image in images])
                if session_key_mode(settings) else [])
    kept: set[int] = set()
    try:
        jobs = submit(inputs_, request, settings=settings, model=model, user=user)
        restarted = [index for index, s in enumerate(jobs)
                     if not s.created and s.job.state in RESTARTABLE]
        for index, (submission, session) in enumerate(zip(jobs, sessions)):
            if submission.created or index in restarted:
                write_session_key(settings, submission.job.id, session_key(session))
                kept.add(index)
        for index in restarted:  # running it again means again: retry an ended-badly job
            jobs[index] = Submission(retry(jobs[index].job.id, settings=settings, user=user),
                                     False)
    finally:
        close_user_sessions(conn, [s for i, s in enumerate(sessions) if i not in kept])
    new = sum(1 for s in jobs if s.created)
    lines = [f"Queued {len(jobs)} analys{'is' if len(jobs) == 1 else 'es'} "
             f"({new} new, "
             + (f"{len(restarted)} restarted after failing or being cancelled, "
                if restarted else "")
             + f"{len(jobs) - new - len(restarted)} already known); results appear on each image "
             "as ROIs, an evidence GeoJSON, a report and key-value provenance. "
             "Research use only."]
    lines += [f"{image.name}: job {s.job.id} ({s.job.state})" for image, s in zip(images, jobs)]
    lines += [f"skipped {line}" for line in skipped]
    job_ids = [s.job.id for s in jobs]
    return ScriptOutcome("\n".join(lines), job_ids, skipped, {"Job_IDs": "\n".join(job_ids)})


def script_error(err: Exception) -> str:
    """The Message for a failed script: our one-line errors as they are, others named."""
    if isinstance(err, HwsiError):
        return f"Error: {err}"
    return f"Error: {type(err).__name__}: {err}"



STATUS_LIMIT: Final = 50
"""Most jobs listed by Job_Status (newest first)."""


def _job_line(job: Job) -> str:
    line = (f"{job.id[:8]}  {job.state:<11} {job.stage:<8} {job.progress:4.0%}  "
            f"{job.input}  updated {job.updated:%Y-%m-%d %H:%M} UTC")
    return f"{line}  error: {job.error}" if job.error else line


def job_status(conn: Any, inputs: Mapping[str, Any], *, settings: Settings) -> ScriptOutcome:
    """Job_Status: the state and progress of the user's recent jobs, newest first.

    Raises:
        InputError: a bad ``Since`` or ``State``.
    """
    user = str(conn.getUser().getName())
    since = parse_since(_text(inputs, "Since") or "7d")
    state = _text(inputs, "State")
    states: tuple[str, ...] = ()
    if state and state != "any":
        check_choice("State", state, STATES)
        states = (state,)
    jobs = list_jobs(settings=settings, since=since, states=states, user=user)[::-1]
    shown = jobs[:STATUS_LIMIT]
    head = (f"{len(jobs)} job(s) of {user} since {since:%Y-%m-%d %H:%M} UTC"
            + (f" in state {state}" if states else "")
            + (f"; the newest {STATUS_LIMIT} shown" if len(jobs) > STATUS_LIMIT else ""))
    return ScriptOutcome("\n".join([head, *map(_job_line, shown)]), [j.id for j in shown])


INDEX_COLUMNS: Final = ("image_id", "image_name", "state", "task", "model", "analysed",
                        "requested_by", "answer", "job_id", "link")
"""The columns of the Report_Index CSV, in this order."""


@dataclass(frozen=True, slots=True)
class ReportIndex:
    """The Report_Index CSV and what it covers."""

    csv_text: str
    rows: int
    images: int
    message: str


def _image_link(settings: Settings, image_id: int) -> str:
    base = settings.omero_web_url.rstrip("/")
    return f"{base}/webclient/?show=image-{image_id}" if base else ""


def _scope_images(conn: Any, data_type: str, ids: list[int], whole_group: bool) -> list[Any]:
    """The images whose analyses the index lists, each once."""
    if whole_group:
        annotations = list(conn.getObjects("MapAnnotation", attributes={"ns": NS_ANALYSIS}))
        if not annotations:
            return []
        images = conn.getObjectsByAnnotations("Image", [int(a.getId()) for a in annotations])
    else:
        check_choice("Data_Type", data_type, ("Project", "Dataset"))
        images = []
        for object_id in ids:
            obj = conn.getObject(data_type, object_id)
            if obj is None:
                raise InputError(f"{data_type} {object_id}: not found, or not visible to you")
            datasets = list(obj.listChildren()) if data_type == "Project" else [obj]
            images += [image for dataset in datasets for image in dataset.listChildren()]
    unique: dict[int, Any] = {}
    for image in images:
        unique.setdefault(int(image.getId()), image)
    return [unique[i] for i in sorted(unique)]


def report_index(conn: Any, inputs: Mapping[str, Any], *, settings: Settings) -> ReportIndex:
    """Report_Index: one CSV row per analysis of the images in scope, for lab managers.

    Completed analyses come from the provenance key-values on the images (what was written);
    jobs not (yet) written back come from the ledger (queued, running, failed, ...).

    Raises:
        InputError: a Data_Type other than Project or Dataset, or unknown ids.
    """
    whole_group = bool(inputs.get("Whole_Group", False))
    data_type = _text(inputs, "Data_Type") or "Project"
    ids = [int(i) for i in inputs.get("IDs") or []]
    if not whole_group and not ids:
        raise InputError("select a Project or Dataset (IDs), or set Whole_Group")
    images = _scope_images(conn, data_type, ids, whole_group)
    rows: list[list[str]] = []
    written: set[str] = set()
    for image in images:
        image_id = int(image.getId())
        for annotation in image.listAnnotations(ns=NS_ANALYSIS):
            values = dict((str(k), str(v)) for k, v in annotation.getValue())
            written.add(values.get("job id", ""))
            rows.append([str(image_id), str(image.getName()), "succeeded",
                         values.get("task", ""), values.get("model", ""),
                         values.get("analysed", ""), values.get("requested by", ""),
                         values.get("answer", ""), values.get("job id", ""),
                         _image_link(settings, image_id)])
    # Image ids are per server and one ledger may serve several: match the server too.
    server = str(conn.getConfigService().getDatabaseUuid())
    by_input = {f"omero:image/{int(image.getId())}": image for image in images}
    for job in list_jobs(settings=settings):
        image = by_input.get(job.input)
        if (image is None or job.id in written
                or (job.params.get("omero") or {}).get("server") != server):
            continue
        image_id = int(image.getId())
        rows.append([str(image_id), str(image.getName()), job.state, job.task, job.model,
                     job.updated.isoformat(timespec="seconds"), job.user,
                     job.error or "", job.id, _image_link(settings, image_id)])
    rows.sort(key=lambda r: (int(r[0]), r[5], r[8]))
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(INDEX_COLUMNS)
    writer.writerows(rows)
    scope = "the whole group" if whole_group else f"{data_type} {', '.join(map(str, ids))}"
    message = (f"{len(rows)} analys{'is' if len(rows) == 1 else 'es'} of "
               f"{len({r[0] for r in rows})} image(s) in {scope}")
    return ReportIndex(buffer.getvalue(), len(rows), len(images), message)


NS_REPORT_INDEX: Final = "omero-hwsi/report-index"


def attach_index(conn: Any, index: ReportIndex, *, target: tuple[str, int] | None,
                 folder: Path) -> Any:
    """Save the index CSV as a FileAnnotation, linked to ``target`` (type, id) when given.

    ``folder`` is a scratch folder for the file OMERO uploads (the script's temp dir).
    """
    from datetime import UTC, datetime

    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    name = (f"hwsi-report-index-{target[0].lower()}-{target[1]}-{stamp}.csv" if target
            else f"hwsi-report-index-group-{stamp}.csv")
    path = folder / name
    path.write_text(index.csv_text, encoding="utf-8")
    annotation = conn.createFileAnnfromLocalFile(
        str(path), origFilePathAndName=name, mimetype="text/csv", ns=NS_REPORT_INDEX,
        desc=index.message)
    if target is not None:
        obj = conn.getObject(target[0], target[1])
        if obj is not None:
            obj.linkAnnotation(annotation)
    return annotation


def report_index_script(conn: Any, inputs: Mapping[str, Any], *,
                        settings: Settings) -> ScriptOutcome:
    """Report_Index: the index CSV, attached to the first selected container (or to none for
    the whole group), as the ``File_Annotation`` output (a download link in OMERO.web)."""
    import tempfile

    index = report_index(conn, inputs, settings=settings)
    ids = inputs.get("IDs") or []
    target = (None if inputs.get("Whole_Group") or not ids
              else (_text(inputs, "Data_Type") or "Project", int(ids[0])))
    with tempfile.TemporaryDirectory() as folder:
        annotation = attach_index(conn, index, target=target, folder=Path(folder))
    return ScriptOutcome(index.message, outputs={"File_Annotation": annotation._obj})
