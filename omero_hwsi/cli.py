"""The ``hwsi`` command line (typer + rich).

Results (paths, JSON) go to stdout, logs and progress bars to stderr. Errors users can cause
print one red line and exit with their class's code (2 input, 3 missing resource, 4 service,
5 job); anything else is a bug and shows its traceback.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, get_args

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from omero_hwsi import __version__

# Shared with cli_jobs.py (see _cli_common.py for why they live there).
from omero_hwsi._cli_common import (
    QUPATH_REGIONS_FILE,
    ClassOption,
    EvidenceMethodOption,
    EvidenceOption,
    LabelsOption,
    MaxNewTokensOption,
    MppOption,
    QuestionOption,
    RegionsFromAnnotationsOption,
    RegionsOption,
    SeedOption,
    SourcesArgument,
    TaskOption,
    WriteBackOption,
    _analysis_slides,
    _handle_errors,
    _settings,
    stderr,
)
from omero_hwsi._types import ProgressFn
from omero_hwsi.errors import HwsiError, InputError, SlideOpenError, check_choice
from omero_hwsi.settings import Settings

if TYPE_CHECKING:
    from shapely.geometry.base import BaseGeometry

    from qupath_bridge.geojson import ReadOptions
    from qupath_bridge.project import ExportedResult

app = typer.Typer(
    name="hwsi",
    help="Hierarchical MLLM analysis of whole-slide images (research use only).",
    pretty_exceptions_enable=False,
    no_args_is_help=True,
    add_completion=False,
)


@contextmanager
def _progress_bar(description: str) -> Iterator[ProgressFn]:
    """A rich progress bar on stderr, adapted to the stages' ``progress(stage, done, total)``."""
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn())
    with Progress(*columns, console=stderr, transient=False) as bar:
        tasks: dict[str, Any] = {}

        def update(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(f"{description} {stage}", total=total)
            bar.update(tasks[stage], completed=done, total=total)

        yield update


@app.command()
@_handle_errors
def info(
    slide: Annotated[Path, typer.Argument(help="Slide file.")],
    mpp: MppOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Describe a slide: size, pyramid levels, vendor, objective power and MPP."""
    from omero_hwsi.slide.local import open_slide

    settings = _settings()
    with open_slide(slide, mpp=mpp, mpp_tolerance=settings.mpp_tolerance) as reader:
        data = reader.info.to_dict()
    if as_json:
        typer.echo(json.dumps(data, indent=2))
        return
    typer.echo(f"{data['name']}: {data['width']} x {data['height']} px, "
               f"{data['mpp']:.4g} um/px ({data['mpp_source']}), backend {data['backend']}")
    typer.echo(f"vendor: {data['vendor'] or 'unknown'}; objective power: "
               f"{data['objective_power'] if data['objective_power'] is not None else 'unknown'}")
    for level, ((w, h), ds, lmpp) in enumerate(
        zip(data["level_dimensions"], data["level_downsamples"], data["level_mpp"], strict=True)
    ):
        typer.echo(f"  level {level}: {w} x {h} px, downsample {ds:.4g}, {lmpp:.4g} um/px")


def _grid(settings: Settings) -> Any:
    from omero_hwsi.slide.grid import GridSpec

    return GridSpec(target_mpp=settings.target_mpp, region_px=settings.region_px,
                    patch_px=settings.patch_px, min_tissue_fraction=settings.min_tissue_fraction)


def _config(settings: Settings, workers: int | None) -> Any:
    from omero_hwsi.features.extract import ExtractionConfig

    return ExtractionConfig(
        n_candidates=settings.candidates_per_region, k=settings.patches_per_region,
        workers=settings.extract_workers if workers is None else workers,
    )


def _expand(slides: list[Path]) -> list[tuple[Path, bool]]:
    """Files as given (explicit) and the regular files inside given folders (from_folder)."""
    out: list[tuple[Path, bool]] = []
    for path in slides:
        if path.is_dir():
            out += [(p, True) for p in sorted(path.iterdir())
                    if p.is_file() and not p.name.startswith(".")]
        else:
            out.append((path, False))
    return out


WorkersOption = Annotated[
    int | None,
    typer.Option("--workers", min=0, help="Extraction worker processes (0 = in-process)."),
]


@app.command()
@_handle_errors
def extract(
    slides: Annotated[list[Path], typer.Argument(help="Slide files or folders of slides.")],
    out: Annotated[Path | None, typer.Option("--out", help="Feature-store root "
                                             "(default: HWSI_FEATURE_DIR).")] = None,
    mpp: MppOption = None,
    workers: WorkersOption = None,
) -> None:
    """Extract hierarchical features of slides into resumable feature stores.

    Prints one store path per slide on stdout. Finished stores are reused; interrupted ones
    resume where they stopped.
    """
    from omero_hwsi.features.extract import extract_slide

    settings = _settings()
    root = out or settings.features_path
    failures: list[HwsiError] = []
    for path, from_folder in _expand(slides):
        try:
            with _progress_bar(path.name) as progress:
                result = extract_slide(
                    path, root, grid=_grid(settings), config=_config(settings, workers), mpp=mpp,
                    mpp_tolerance=settings.mpp_tolerance, progress=progress,
                )
        except SlideOpenError as err:
            if from_folder:
                logging.getLogger(__name__).info("skipping %s: %s", path, err)
                continue
            failures.append(err)
            stderr.print(f"[red]error:[/red] {err}", highlight=False, soft_wrap=True)
            continue
        except HwsiError as err:
            failures.append(err)
            stderr.print(f"[red]error:[/red] {err}", highlight=False, soft_wrap=True)
            continue
        note = "already complete" if result.already_complete else (
            f"{result.regions} region(s), {result.patches} patch(es), {result.nuclei} nuclei, "
            f"{result.seconds:.1f} s" + (f", resumed after {result.regions_resumed}"
                                          if result.regions_resumed else ""))
        stderr.print(f"{path.name}: {note}", highlight=False)
        typer.echo(str(result.path))
    if failures:
        raise typer.Exit(failures[0].exit_code)


@app.command()
@_handle_errors
def tiles(
    slide: Annotated[Path, typer.Argument(help="Slide file.")],
    out: Annotated[Path, typer.Option("--out", help="Folder for the GeoJSON files and picture.")],
    mpp: MppOption = None,
    workers: WorkersOption = None,
) -> None:
    """Write tissue, regions, patches and nuclei as QuPath GeoJSON, plus an overview picture.

    Features are extracted (or reused) in HWSI_FEATURE_DIR; nuclei are those of the selected
    patches. Geometry is clipped to the slide; padded boxes are kept in a ``box`` property.
    """
    from omero_hwsi.features.extract import extract_slide
    from omero_hwsi.features.store import load_features
    from omero_hwsi.results.tiles import write_tiles
    from omero_hwsi.slide.local import open_slide
    from omero_hwsi.slide.reader import plan_for, read_thumbnail

    settings = _settings()
    with _progress_bar(slide.name) as progress:
        result = extract_slide(
            slide, settings.features_path, grid=_grid(settings), config=_config(settings, workers),
            mpp=mpp, mpp_tolerance=settings.mpp_tolerance, progress=progress,
        )
    features = load_features(result.path)
    with open_slide(slide, mpp=mpp, mpp_tolerance=settings.mpp_tolerance) as reader:
        width, height = reader.dimensions
        thumb_mpp = max(reader.mpp, 2.0, max(width, height) * reader.mpp / 2048)
        picture = read_thumbnail(reader, thumb_mpp)
        level0_per_px = plan_for(reader, thumb_mpp).level0_per_px
    for path in write_tiles(features, out, picture, level0_per_px):
        typer.echo(str(path))


def _check_evidence_options(evidence: str, method: str) -> None:
    """``--evidence`` and ``--evidence-method``, checked against the evidence vocabulary."""
    from omero_hwsi.inference.evidence import EvidenceDepth
    from omero_hwsi.results.schema import EvidenceMethod

    check_choice("--evidence", evidence, get_args(EvidenceDepth))
    check_choice("--evidence-method", method, get_args(EvidenceMethod))


@app.command()
@_handle_errors
def ask(
    store: Annotated[list[Path], typer.Option("--store", help="Feature store folder (repeat for "
                                              "several slides; from `hwsi extract`).")],
    model: Annotated[Path, typer.Option("--model", help="Model folder (save_pretrained layout).")],
    question: Annotated[str | None, typer.Option("--question", "-q", help="The question (default "
                                                 "per task for report, caption, classify).")] = None,
    task: TaskOption = "vqa",
    label: Annotated[list[str] | None, typer.Option("--label", help="A candidate label for "
                                                    "classify (repeat).")] = None,
    text: Annotated[list[str] | None, typer.Option("--text", help="A text to match for retrieve "
                                                   "(repeat).")] = None,
    evidence: EvidenceOption = "cell",
    evidence_method: EvidenceMethodOption = "occlusion",
    max_new_tokens: MaxNewTokensOption = 256,
    sample: Annotated[bool, typer.Option("--sample", help="Sample instead of greedy decoding "
                                         "(needs --seed).")] = False,
    seed: Annotated[int | None, typer.Option("--seed", help="Seed for --sample.")] = None,
    temperature: Annotated[float, typer.Option("--temperature")] = 1.0,
    top_p: Annotated[float, typer.Option("--top-p")] = 1.0,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Slides per batch.")] = 4,
    device: Annotated[str | None, typer.Option("--device", help="cpu or cuda (default: cuda "
                                               "when available).")] = None,
    out: Annotated[Path | None, typer.Option("--out", help="Write the JSON results here "
                                             "instead of stdout.")] = None,
) -> None:
    """Ask a model about slides; answers come with the regions, patches and nuclei behind them.

    Prints (or writes) a JSON list with one result per slide: answer, label probabilities
    (classify), evidence with hierarchy ids, level-0 geometry and method, the model and the
    decoding settings. Research use only.
    """
    from omero_hwsi._io import write_json_atomic
    from omero_hwsi.analysis import evidence_budget
    from omero_hwsi.features.store import load_features
    from omero_hwsi.inference import Decoding, HwsiPipeline

    settings = _settings()
    _check_evidence_options(evidence, evidence_method)
    if task == "retrieve" and not text:
        raise InputError("retrieve needs at least one --text")
    slides = [load_features(path) for path in store]
    decoding = Decoding(max_new_tokens=max_new_tokens, do_sample=sample, seed=seed,
                        temperature=temperature, top_p=top_p)
    pipeline = HwsiPipeline.from_pretrained(model, device=device)
    payload: Any
    if task == "retrieve":
        assert text is not None
        payload = pipeline.retrieve(slides, text).to_dict()
    else:
        budget = evidence_budget(settings)
        with _progress_bar("ask") as progress:
            results = pipeline.ask(
                slides, question, task=task, labels=label, evidence=evidence,  # type: ignore[arg-type]
                evidence_method=evidence_method, budget=budget,  # type: ignore[arg-type]
                decoding=decoding, batch_size=batch_size, progress=progress,
            )
        for result in results:
            best = result.top("region", 1)
            where = f" (strongest region {best[0].id}, {best[0].score:+.3f})" if best else ""
            stderr.print(f"{result.slide['slide_id']}: {result.answer}{where}", highlight=False,
                         soft_wrap=True)
        payload = [r.to_dict() for r in results]
    if out is not None:
        write_json_atomic(out, payload)
        typer.echo(str(out))
    else:
        typer.echo(json.dumps(payload, indent=2))


def _describe_export(exported: ExportedResult) -> str:
    """One line on what an export into a QuPath project did."""
    image = exported.image.name + (" (added to the project)" if exported.image_added else "")
    if exported.kept:
        return f"{exported.result_dir}: {image}: kept its {exported.kept} earlier object(s)"
    counts = ", ".join(f"{n} {kind}(s)" for kind, n in exported.added.items()) or "no objects"
    replaced = f", replacing {exported.replaced} earlier" if exported.replaced else ""
    return f"{exported.result_dir}: {image}: {counts}{replaced}"


@app.command()
@_handle_errors
def analyze(
    slides: SourcesArgument,
    out: Annotated[Path, typer.Option("--out", help="Folder for the result files (one slide), or "
                                      "for one sub-folder per slide.")],
    task: TaskOption = "vqa",
    question: QuestionOption = None,
    labels: LabelsOption = None,
    evidence: EvidenceOption = "cell",
    evidence_method: EvidenceMethodOption = "occlusion",
    regions: RegionsOption = None,
    regions_from_annotations: RegionsFromAnnotationsOption = False,
    classes: ClassOption = None,
    write_back: WriteBackOption = False,
    model: Annotated[Path | None, typer.Option("--model", help="Model folder (default: HWSI_MODEL, "
                                               "else the embedded demo model).")] = None,
    mpp: MppOption = None,
    seed: SeedOption = None,
    max_new_tokens: MaxNewTokensOption = 256,
    device: Annotated[str | None, typer.Option("--device", help="cpu or cuda (default: cuda "
                                               "when available).")] = None,
) -> None:
    """Analyse slides end to end: features, answer, evidence, and files for a pathologist.

    Per slide: result.json, evidence.geojson (drag onto the slide in QuPath), report.md,
    report.html (self-contained) and overlay.png. Prints each output folder on stdout.
    QuPath project sources need a QuPath install (PAQUO_QUPATH_DIR; docs/qupath.md).
    Research use only.
    """
    from omero_hwsi.analysis import AnalysisRequest, analyze_slide, default_model, output_dirs
    from omero_hwsi.inference import Decoding, HwsiPipeline
    from omero_hwsi.inference.pipeline import Task
    from qupath_bridge.geojson import ReadOptions, write_regions
    from qupath_bridge.project import add_evidence

    settings = _settings()
    check_choice("--task", task, get_args(Task))
    _check_evidence_options(evidence, evidence_method)
    options = ReadOptions.from_settings(settings)
    items = _analysis_slides(slides, from_annotations=regions_from_annotations,
                             classes=classes or [], write_back=write_back, regions=regions,
                             options=options)
    targets = output_dirs([item.path for item in items], out)
    request = AnalysisRequest(
        task=task,  # type: ignore[arg-type]
        question=question,
        labels=tuple(x.strip() for x in labels.split(",") if x.strip()) if labels else (),
        evidence=evidence,  # type: ignore[arg-type]
        evidence_method=evidence_method,  # type: ignore[arg-type]
        regions=regions, mpp=mpp,
        decoding=Decoding(max_new_tokens=max_new_tokens, do_sample=seed is not None, seed=seed),
    )
    pipeline = HwsiPipeline.from_pretrained(model or settings.model or default_model(), device=device)
    for item, target in zip(items, targets, strict=True):
        slide_request = request
        if item.regions is not None:
            write_regions(item.regions, target / QUPATH_REGIONS_FILE)
            slide_request = replace(request, regions=target / QUPATH_REGIONS_FILE)
        with _progress_bar(item.label) as progress:
            result = analyze_slide(item.path, target, pipeline=pipeline, request=slide_request,
                                   settings=settings, progress=progress)
        best = result.top("region", 1)
        where = f"; strongest region {best[0].id} ({best[0].score:+.3f})" if best else ""
        stderr.print(f"{item.label}: {result.answer}{where}", markup=False, highlight=False,
                     soft_wrap=True)
        if write_back and item.project is not None and item.image is not None:
            exported = add_evidence(item.project, item.image, target, options=options)
            stderr.print(_describe_export(exported), markup=False, highlight=False,
                         soft_wrap=True)
        typer.echo(str(target))


@app.command()
@_handle_errors
def synth(
    out: Annotated[Path, typer.Option("--out", help="Dataset folder to write.")],
    slides: Annotated[int, typer.Option("--slides", min=1, help="Number of slides.")] = 1,
    seed: Annotated[int, typer.Option("--seed", help="Dataset seed (same seed, same bytes).")] = 0,
    split: Annotated[str, typer.Option("--split", help="train (WSI-Bench train JSON) or test "
                                       "(test JSONL with evidence targets).")] = "test",
    rows: Annotated[int, typer.Option("--rows", min=1, help="Regions per column.")] = 2,
    cols: Annotated[int, typer.Option("--cols", min=1, help="Regions per row.")] = 2,
    mpp: Annotated[float, typer.Option("--mpp", help="Level-0 microns per pixel: 0.5 or 0.25.")] = 0.5,
) -> None:
    """Render synthetic slides with known ground truth, questions and per-scale texts.

    Writes slides/*.svs, truth/*.geojson (drag onto the slide in QuPath), train.json or
    test.jsonl, scale_texts.jsonl, corpus.txt and dataset.json (see docs/synthetic-data.md).
    Prints one slide path per line.
    """
    from omero_hwsi.synthetic.dataset import generate_dataset

    _settings()
    check_choice("--split", split, ("train", "test"))
    try:
        with _progress_bar("synth") as progress:
            manifest = generate_dataset(out, n_slides=slides, seed=seed, split=split,  # type: ignore[arg-type]
                                        rows=rows, cols=cols, mpp=mpp, progress=progress)
    except ValueError as err:
        raise InputError(str(err)) from None
    for slide_id in manifest.slide_ids:
        typer.echo(str(manifest.slide_path(slide_id)))


model_app = typer.Typer(help="Model folders: import released weights.", no_args_is_help=True)
app.add_typer(model_app, name="model")


@model_app.command("import-official")
@_handle_errors
def model_import_official(
    folder: Annotated[Path, typer.Argument(help="The released MLLM-HWSI folder, downloaded by you.")],
    out: Annotated[Path, typer.Option("--out", help="Model folder to write (new or empty).")],
) -> None:
    """Convert the authors' released MLLM-HWSI weights into this project's model folder.

    Prints the written folder on stdout. Nothing is downloaded; a folder whose files, keys or
    shapes differ from the released layout is refused (exit 3) and nothing is written.
    """
    from omero_hwsi.model.convert_official import describe_imported, import_official

    _settings()
    path = import_official(folder, out)
    stderr.print(describe_imported(path), highlight=False, soft_wrap=True)
    typer.echo(str(path))


qupath_app = typer.Typer(help="QuPath files and projects: read what pathologists drew, add "
                         "results.", no_args_is_help=True)
app.add_typer(qupath_app, name="qupath")


def _read_qupath_regions(source: Path, image: str | None, classes: list[str] | None,
                         options: ReadOptions) -> BaseGeometry:
    """The analysis regions of a QuPath GeoJSON file, or of one image of a QuPath project."""
    from qupath_bridge.geojson import read_regions
    from qupath_bridge.project import is_project, project_regions

    if is_project(source):
        if image is None:
            raise InputError(f"{source}: a QuPath project needs --image NAME, the image whose "
                             "annotations to read")
        return project_regions(source, image, classes, options=options)
    if image is not None:
        raise InputError("--image applies to QuPath projects only")
    return read_regions(source, classes, options=options)


@qupath_app.command("regions")
@_handle_errors
def qupath_regions(
    source: Annotated[Path, typer.Argument(help="QuPath GeoJSON export (FeatureCollection, "
                                           "array of features or one feature), or a QuPath "
                                           "project (folder or .qpproj, with --image).")],
    out: Annotated[Path, typer.Option("--out", help="GeoJSON file to write (level-0 px).")],
    classes: Annotated[list[str] | None, typer.Option("--class", help="Keep only annotations "
                                                      "of this QuPath class (repeat); default: "
                                                      "every annotation.")] = None,
    image: Annotated[str | None, typer.Option("--image", help="Image name inside a QuPath "
                                              "project (projects only).")] = None,
) -> None:
    """Write the analysis regions of a QuPath export or project image: its annotation areas.

    The output is a FeatureCollection of QuPath annotations (one per polygon, level-0 px) for
    `hwsi analyze --regions` or to drag back onto the slide in QuPath. Prints the written path.
    """
    from qupath_bridge.geojson import ReadOptions, write_regions

    settings = _settings()
    geometry = _read_qupath_regions(source, image, classes, ReadOptions.from_settings(settings))
    count = write_regions(geometry, out)
    stderr.print(f"{source.name}: {count} region polygon(s), {geometry.area:.0f} px^2",
                 highlight=False, soft_wrap=True)
    typer.echo(str(out))


@qupath_app.command("export")
@_handle_errors
def qupath_export(
    results: Annotated[list[Path], typer.Argument(help="Result folders of hwsi analyze.")],
    project: Annotated[Path, typer.Option("--project", help="QuPath project folder (created "
                                          "when new or empty).")],
    keep_existing: Annotated[bool, typer.Option("--keep-existing", help="Leave the objects of "
                                                "an analysis already in the project as they are "
                                                "(default: replace them).")] = False,
) -> None:
    """Add analysis results to a QuPath project: each slide as an image, its evidence as objects.

    Regions become annotations, patches tiles, nuclei detections, with classes, colours and
    measurements. Needs a QuPath install (PAQUO_QUPATH_DIR; paquo 0.9 supports QuPath 0.2 to
    0.6) and the slides at the paths in result.json. Prints the project file.
    """
    from qupath_bridge.geojson import ReadOptions
    from qupath_bridge.project import export_results, project_file

    settings = _settings()
    exported = export_results(results, project, overwrite_evidence=not keep_existing,
                              options=ReadOptions.from_settings(settings))
    for item in exported:
        stderr.print(_describe_export(item), markup=False, highlight=False, soft_wrap=True)
    typer.echo(str(project_file(project)))


@app.command("train")
@_handle_errors
def train_command(
    config: Annotated[Path, typer.Option("--config", help="Training config (TOML; keys in "
                                         "docs/training.md).")],
    stage: Annotated[int | None, typer.Option("--stage", min=0, max=3, help="Stage 0-3; must "
                                              "match the config's stage when both are given.")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the newest checkpoint "
                                         "in the output folder.")] = False,
    output_dir: Annotated[Path | None, typer.Option("--output-dir", help="Overrides the "
                                                    "config's output_dir.")] = None,
) -> None:
    """Train one stage of MLLM-HWSI (0 LM pre-training, 1 alignment, 2 projection, 3 instructions).

    Writes metrics.jsonl, checkpoints and final/ under the output folder; prints the final
    model folder on stdout.
    """
    from omero_hwsi.training.config import load_train_config
    from omero_hwsi.training.loop import train as run_training

    _settings()
    train_config = load_train_config(config, stage=stage, output_dir=output_dir)
    with _progress_bar(f"stage {train_config.stage}") as progress:
        final = run_training(train_config, resume=resume, progress=progress)
    typer.echo(str(final))


@app.command("evaluate")
@_handle_errors
def evaluate_command(
    benchmark: Annotated[Path, typer.Option("--benchmark", help="WSI-Bench test file (JSONL).")],
    stores: Annotated[Path, typer.Option("--stores", help="Folder of feature stores, one per "
                                         "slide (matched by exact slide id).")],
    model: Annotated[Path, typer.Option("--model", help="Model folder.")],
    out: Annotated[Path, typer.Option("--out", help="Folder for metrics.json and "
                                      "predictions.jsonl.")],
    ground_truth: Annotated[Path | None, typer.Option("--ground-truth", help="Folder of truth "
                                                      "GeoJSONs (<slide id>.geojson) for findings "
                                                      "recall.")] = None,
    limit: Annotated[int | None, typer.Option("--limit", min=1, help="Evaluate only the first N "
                                              "slides of the file.")] = None,
    device: Annotated[str | None, typer.Option("--device", help="cpu or cuda (default: cuda "
                                               "when available).")] = None,
) -> None:
    """Score a model on a WSI-Bench test file: accuracy (and blind), text metrics, retrieval, pointing.

    Prints a summary table on stderr and the metrics.json path on stdout (docs/evaluation.md).
    """
    from rich.table import Table

    from omero_hwsi.evaluation.run import METRICS_FILE, evaluate

    _settings()
    with _progress_bar("evaluate") as progress:
        result = evaluate(benchmark, stores, model, ground_truth=ground_truth, out_dir=out,
                          limit=limit, device=device, progress=progress)

    def num(value: Any, scale: float = 1.0) -> str:
        return "-" if value is None else f"{value * scale:.3f}"

    table = Table(title=f"{result['n_questions']} questions, {result['n_slides']} slides")
    for column in ("metric", "n", "value", "blind / chance"):
        table.add_column(column, justify="left" if column == "metric" else "right")
    closed = result["closed"]
    if closed["n"]:
        table.add_row("closed accuracy", str(closed["n"]), num(closed["accuracy"]),
                      f"{num(closed['blind_accuracy'])} / {num(closed['chance'])}")
        for name, group in closed["by_template"].items():
            table.add_row(f"  {name}", str(group["n"]), num(group["accuracy"]),
                          f"{num(group['blind_accuracy'])} / {num(group['chance'])}")
        if "diagnosis_balanced_accuracy" in closed:
            table.add_row("diagnosis balanced accuracy", str(closed["by_template"]["diagnosis"]["n"]),
                          num(closed["diagnosis_balanced_accuracy"]),
                          f"{num(closed['diagnosis_blind_balanced_accuracy'])} / -")
    texts = result["open"].get("all")
    if texts:
        for key in ("bleu1", "bleu4", "rouge_l", "meteor_exact_stem"):
            table.add_row(f"open {key}", str(texts["n"]), num(texts[key]), "")
    findings = result["open"]["findings"]
    if findings["n"]:
        table.add_row("report findings recall", str(findings["n"]), num(findings["recall"]), "")
    retrieval = result["retrieval"]
    if "skipped" in retrieval:
        table.add_row("retrieval", "-", "skipped", retrieval["skipped"])
    else:
        for k in (1, 5):
            table.add_row(f"retrieval recall@{k}", str(retrieval["n"]),
                          num(retrieval[f"recall@{k}"]), f"- / {num(retrieval[f'chance@{k}'])}")
    pointing = result["pointing_game"]
    if pointing["n"]:
        table.add_row("pointing game", str(pointing["n"]), num(pointing["hit_rate"]),
                      f"- / {num(pointing['chance'])}")
    stderr.print(table)
    typer.echo(str(out / METRICS_FILE))


# The job system's commands live in cli_jobs.py.
from omero_hwsi.cli_jobs import jobs_app, worker  # noqa: E402
from omero_hwsi.cli_omero import omero_app  # noqa: E402

app.add_typer(jobs_app, name="jobs")
app.add_typer(omero_app, name="omero")
app.command("worker")(worker)


@app.command()
def version() -> None:
    """Print the omero-hwsi version."""
    typer.echo(__version__)


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
