"""``hwsi jobs ...`` and ``hwsi worker``: the job system's commands, kept apart from cli.py.

Each command parses options, calls one function of :mod:`omero_hwsi.jobs.client` (or starts a
worker) and prints: results on stdout (job ids, one per line; tables, CSV, JSON), notes on
stderr. ``hwsi jobs submit`` takes the sources and options of ``hwsi analyze`` through the same
parser, so a command line moves from one to the other by changing the verb. Nothing here
imports torch.
"""

from __future__ import annotations

import csv
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table

from omero_hwsi import _cli_common as _cli
from omero_hwsi.errors import InputError, check_choice

if TYPE_CHECKING:
    from shapely.geometry.base import BaseGeometry

    from omero_hwsi.jobs.client import OmeroJobInput
    from omero_hwsi.jobs.ledger import Job
    from omero_hwsi.settings import Settings

__all__ = ["jobs_app", "worker"]

jobs_app = typer.Typer(help="Queue analyses for workers and follow them (job ledger).",
                       no_args_is_help=True)
stdout = Console(soft_wrap=True)

UserOption = Annotated[str | None, typer.Option("--user", help="Requesting user recorded with "
                                                "the job (default: the OS user).")]


def _regions_file(geometry: BaseGeometry, settings: Settings) -> Path:
    """A project image's annotation regions as a content-addressed GeoJSON in the data dir."""
    import hashlib
    import tempfile

    from qupath_bridge.geojson import write_regions

    folder = settings.data_dir / "jobs" / "regions"
    folder.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=".regions-", suffix=".geojson", dir=folder)
    os.close(fd)
    temp = Path(name)
    try:
        write_regions(geometry, temp)
        digest = hashlib.sha256(temp.read_bytes()).hexdigest()
        target = folder / f"{digest}.geojson"
        os.replace(temp, target)
    finally:
        temp.unlink(missing_ok=True)
    return target


@jobs_app.command("submit")
@_cli._handle_errors
def jobs_submit(
    slides: _cli.SourcesArgument,
    out: Annotated[Path | None, typer.Option("--out", help="Folder for the result files (one "
                                             "slide) or one sub-folder per slide (default: "
                                             "HWSI_DATA_DIR/results/<job id>).")] = None,
    task: _cli.TaskOption = "vqa",
    question: _cli.QuestionOption = None,
    labels: _cli.LabelsOption = None,
    evidence: _cli.EvidenceOption = "cell",
    evidence_method: _cli.EvidenceMethodOption = "occlusion",
    regions: _cli.RegionsOption = None,
    regions_from_annotations: _cli.RegionsFromAnnotationsOption = False,
    classes: _cli.ClassOption = None,
    write_back: _cli.WriteBackOption = False,
    model: Annotated[Path | None, typer.Option("--model", help="Model folder, at the same path "
                                               "on every worker (default: HWSI_MODEL, else "
                                               "the embedded demo model).")] = None,
    mpp: _cli.MppOption = None,
    seed: _cli.SeedOption = None,
    max_new_tokens: _cli.MaxNewTokensOption = 256,
    user: UserOption = None,
) -> None:
    """Queue one analysis job per slide for the workers; prints the job ids, one per line.

    Takes the sources and options of `hwsi analyze`, and OMERO sources (omero:image/ID,
    omero:dataset/ID, omero:project/ID) whose results workers write back to OMERO as --user
    (the OMERO user; needs HWSI_OMERO_* settings; --regions-from-annotations analyses only
    inside the image's own ROIs). Submitting the same slide, question, options and model again
    prints the same job id and queues nothing (notes on stderr).
    """
    from omero_hwsi.jobs.client import JobInput, JobRequest, submit
    from omero_hwsi.plan import output_dirs
    from qupath_bridge.geojson import ReadOptions

    settings = _cli._settings()
    request = JobRequest(
        task=task, question=question,
        labels=tuple(x.strip() for x in labels.split(",") if x.strip()) if labels else (),
        evidence=evidence, evidence_method=evidence_method, regions=regions, mpp=mpp,
        max_new_tokens=max_new_tokens, seed=seed)
    remote = [s for s in slides if s.strip().lower().startswith("omero:")]
    local = [s for s in slides if s not in remote]
    items = (_cli._analysis_slides(local, from_annotations=regions_from_annotations,
                                   classes=classes or [], write_back=write_back,
                                   regions=regions, options=ReadOptions.from_settings(settings))
             if local else [])
    if remote and not local and (classes or write_back):
        raise InputError("--class and --write-back are for QuPath project sources; OMERO "
                         "results are always written back")
    targets: list[Path | None] = (list(output_dirs([i.path for i in items], out)) if out
                                  else [None] * len(items))
    inputs: list[JobInput | OmeroJobInput] = [
        JobInput(item.path, out_dir=target,
                 regions=None if item.regions is None else _regions_file(item.regions, settings),
                 qupath_project=item.project if write_back else None,
                 qupath_image=item.image if write_back else None)
        for item, target in zip(items, targets, strict=True)]
    labels_of = [item.label for item in items]
    if remote:
        for label, item in _omero_inputs(remote, settings=settings, user=user,
                                         restrict=regions_from_annotations, out=out):
            labels_of.append(label)
            inputs.append(item)
    for label, submission in zip(labels_of, submit(inputs, request, settings=settings,
                                                   model=model, user=user), strict=True):
        job = submission.job
        note = (f"queued as job {job.id}" if submission.created else
                f"already submitted as job {job.id} ({job.state}; results in {job.out_dir})")
        _cli.stderr.print(f"{label}: {note}", markup=False, highlight=False, soft_wrap=True)
        typer.echo(job.id)


def _omero_inputs(sources: list[str], *, settings: Settings, user: str | None, restrict: bool,
                  out: Path | None) -> list[tuple[str, OmeroJobInput]]:
    """The pyramid images OMERO sources stand for, as ``user`` sees them (skips on stderr)."""
    from omero_hwsi.jobs.client import default_user
    from omero_hwsi.omero.connect import omero_connection
    from omero_hwsi.omero.images import parse_omero_source, resolve_images
    from omero_hwsi.omero.script_actions import job_inputs
    from omero_hwsi.omero.session_keys import session_key_mode

    if session_key_mode(settings):
        raise InputError("OMERO sources need the Sudo service account; in session-key mode "
                         "(HWSI_OMERO_SESSION_TTL_SECONDS > 0) queue them with the HWSI > Run "
                         "Analysis script, which opens each job's session as its user")
    parsed = [parse_omero_source(text) for text in sources]  # refuse typos before connecting
    found: list[tuple[str, OmeroJobInput]] = []
    with omero_connection(settings, user=user or default_user()) as conn:
        for kind, object_id in parsed:
            resolution = resolve_images(conn, kind, [object_id])
            accepted, skipped = job_inputs(conn, resolution.images, write_rois=True,
                                           restrict_to_rois=restrict, out=out)
            for line in resolution.skipped + skipped:
                _cli.stderr.print(f"skipped {line}", markup=False, highlight=False)
            known = {item.image.id for _, item in found}  # each image once over all sources
            found += [(f"omero:image/{item.image.id} ({item.image.name})", item)
                      for item in accepted if item.image.id not in known]
    if not found:
        raise InputError(f"nothing to analyse in {', '.join(sources)}")
    return found


def _describe(job: Job) -> dict[str, str]:
    return {"job": job.id, "state": job.state, "stage": job.stage,
            "progress": f"{100 * job.progress:.0f}%", "attempts": str(job.attempts),
            "task": job.task, "input": job.input, "user": job.user, "model": job.model,
            "out_dir": job.out_dir,
            "heartbeat": job.heartbeat.isoformat(timespec="seconds") if job.heartbeat else "-",
            "created": job.created.isoformat(timespec="seconds"),
            "updated": job.updated.isoformat(timespec="seconds"), "error": job.error or "-"}


def _table(jobs: list[Job], title: str | None = None) -> Table:
    table = Table(title=title)
    for column in ("job", "state", "stage", "progress", "task", "input", "user", "updated (UTC)"):
        table.add_column(column, overflow="fold")
    for job in jobs:
        row = _describe(job)
        table.add_row(job.id[:8], job.state, job.stage, row["progress"], job.task,
                      Path(job.input).name, job.user, f"{job.updated:%Y-%m-%d %H:%M}")
    return table


@jobs_app.command("status")
@_cli._handle_errors
def jobs_status(
    job: Annotated[str | None, typer.Argument(help="Job id (or a unique prefix); default: "
                                              "every queued and running job.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Show a job's state, stage, progress, heartbeat, error and outputs (or all active jobs)."""
    from omero_hwsi.jobs.client import list_jobs, outputs, status

    settings = _cli._settings()
    if job is None:
        active = list_jobs(settings=settings, states=("queued", "running"))
        if as_json:
            typer.echo(json.dumps([j.to_dict() for j in active], indent=2))
        elif active:
            stdout.print(_table(active))
        else:
            _cli.stderr.print("no queued or running jobs", highlight=False)
        return
    found = status(job, settings=settings)
    files = outputs(found.id, settings=settings)
    if as_json:
        typer.echo(json.dumps({**found.to_dict(), "outputs": [f.path for f in files]}, indent=2))
        return
    for name, value in _describe(found).items():
        typer.echo(f"{name:>9}: {value}")
    for item in files:
        typer.echo(f"   output: {item.path}")


@jobs_app.command("cancel")
@_cli._handle_errors
def jobs_cancel(
    job: Annotated[str, typer.Argument(help="Job id (or a unique prefix).")],
    user: UserOption = None,
) -> None:
    """Cancel a queued or running job (a running task stops at its next progress step)."""
    from omero_hwsi.jobs.client import cancel

    found, changed = cancel(job, settings=_cli._settings(), user=user)
    note = "cancelled" if changed else f"already {found.state}: nothing to cancel"
    _cli.stderr.print(f"job {found.id}: {note}", highlight=False)
    typer.echo(found.id)


@jobs_app.command("retry")
@_cli._handle_errors
def jobs_retry(
    job: Annotated[str, typer.Argument(help="Job id (or a unique prefix).")],
    user: UserOption = None,
) -> None:
    """Queue a failed, cancelled or dead-letter job again, from its first stage."""
    from omero_hwsi.jobs.client import retry

    found = retry(job, settings=_cli._settings(), user=user)
    _cli.stderr.print(f"job {found.id}: queued again", highlight=False)
    typer.echo(found.id)


@jobs_app.command("log")
@_cli._handle_errors
def jobs_log(job: Annotated[str, typer.Argument(help="Job id (or a unique prefix).")]) -> None:
    """Every change of a job: time (UTC), state, stage, worker, user, message."""
    from omero_hwsi.jobs.client import events

    for event in events(job, settings=_cli._settings()):
        typer.echo("\t".join((event.time.isoformat(timespec="seconds"), event.state, event.stage,
                              event.worker, event.user, event.message)))


@jobs_app.command("list")
@_cli._handle_errors
def jobs_list(
    since: Annotated[str | None, typer.Option("--since", help="Created within a duration (24h, "
                                              "7d) or since an ISO date/time (UTC).")] = None,
    state: Annotated[list[str] | None, typer.Option("--state", help="Only jobs in this state "
                                                    "(repeat): queued, running, succeeded, "
                                                    "failed, cancelled, dead_letter.")] = None,
    user: Annotated[str | None, typer.Option("--user", help="Only jobs of this user.")] = None,
    output_format: Annotated[str, typer.Option("--format", help="table, csv or json.")] = "table",
) -> None:
    """The lab manager's view: every job, oldest first, as a table, CSV or JSON."""
    from omero_hwsi.jobs.client import CSV_COLUMNS, csv_row, list_jobs, parse_since

    check_choice("--format", output_format, ("table", "csv", "json"))
    jobs = list_jobs(settings=_cli._settings(), since=parse_since(since) if since else None,
                     states=[s for value in state or [] for s in value.split(",") if s],
                     user=user)
    if output_format == "csv":
        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow(CSV_COLUMNS)
        writer.writerows(csv_row(job) for job in jobs)
    elif output_format == "json":
        typer.echo(json.dumps([job.to_dict() for job in jobs], indent=2))
    else:
        stdout.print(_table(jobs, title=f"{len(jobs)} job(s)"))


@jobs_app.command("prune")
@_cli._handle_errors
def jobs_prune(
    older_than: Annotated[str, typer.Option("--older-than", help="Delete ended jobs not updated "
                                            "for this long (30d, 12h).")],
) -> None:
    """Delete ended jobs (and their events and output records) from the ledger; files stay.

    Prints the number of jobs deleted.
    """
    from omero_hwsi.jobs.client import parse_duration, prune

    jobs, messages = prune(settings=_cli._settings(), older_than=parse_duration(older_than))
    note = f"deleted {jobs} job(s)" + (f" and {messages} delivered broker message(s)"
                                       if messages else "")
    _cli.stderr.print(note, highlight=False)
    typer.echo(str(jobs))


@_cli._handle_errors
def worker(
    queues: Annotated[str, typer.Option("--queues", "-Q", help="Comma-separated queues to serve: "
                                        "cpu, gpu, io.")] = "cpu,gpu,io",
    concurrency: Annotated[int, typer.Option("--concurrency", "-c", min=1, help="Pool processes "
                                             "(one per GPU on GPU nodes).")] = 1,
    name: Annotated[str | None, typer.Option("--name", "-n", help="Worker node name (default: "
                                             "<queues>-<pid>@<host>).")] = None,
) -> None:
    """Run a Celery worker (prefork pool) for the job queues; stops on Ctrl-C or SIGTERM.

    Without HWSI_BROKER_URL it uses the embedded single-machine transport in HWSI_DATA_DIR.
    The reconciler runs in every worker (see docs/workers.md).
    """
    from omero_hwsi.jobs.app import create_app, is_embedded
    from omero_hwsi.jobs.routing import QUEUES

    settings = _cli._settings()
    chosen = [q.strip() for q in queues.split(",") if q.strip()]
    unknown = [q for q in chosen if q not in QUEUES]
    if unknown or not chosen:
        raise InputError(f"--queues must name some of {', '.join(QUEUES)}, got {queues!r}")
    app = create_app(settings, worker=True)
    argv = ["worker", "--pool", "prefork", "--concurrency", str(concurrency),
            "--queues", ",".join(chosen),
            "--hostname", name or f"{'-'.join(chosen)}-{os.getpid()}@%h",
            "--loglevel", settings.log_level.upper()]
    if is_embedded(settings):  # no broadcast on the SQLite transport
        argv += ["--without-gossip", "--without-mingle", "--without-heartbeat"]
    app.worker_main(argv)
