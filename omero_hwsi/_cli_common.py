"""Helpers shared by the ``hwsi`` command modules (``cli.py`` and ``cli_jobs.py``).

Why a module of its own: ``cli_jobs.py`` needs the error mapping, the settings loader and the
source parser of ``hwsi analyze``, and ``cli.py`` registers ``cli_jobs``'s commands; with the
helpers here both import them without a cycle (also under ``python -m omero_hwsi.cli``).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape

from omero_hwsi.errors import HwsiError, InputError
from omero_hwsi.settings import Settings, load_settings

if TYPE_CHECKING:
    from shapely.geometry.base import BaseGeometry

    from qupath_bridge.geojson import ReadOptions

stderr = Console(stderr=True)
F = TypeVar("F", bound=Callable[..., Any])

MppOption = Annotated[
    float | None,
    typer.Option("--mpp", help="Microns per pixel of level 0, overriding the slide metadata."),
]

# The sources and options of one analysis, shared by `hwsi analyze` and `hwsi jobs submit`.
SourcesArgument = Annotated[list[str], typer.Argument(
    help="Slide files, or qupath:PROJECT_DIR for every image of a QuPath project, "
         "qupath:PROJECT_DIR#IMAGE_NAME for one; hwsi jobs submit also takes "
         "omero:image/ID, omero:dataset/ID and omero:project/ID.")]
TaskOption = Annotated[str, typer.Option("--task", help="vqa, report, caption, classify or "
                                         "retrieve.")]
QuestionOption = Annotated[str | None, typer.Option(
    "--question", "-q", help="The question (default prompt per task except vqa).")]
LabelsOption = Annotated[str | None, typer.Option(
    "--labels", help="Comma-separated labels (classify) or texts (retrieve).")]
EvidenceOption = Annotated[str, typer.Option(
    "--evidence", help="Deepest evidence level: region, patch, cell or none.")]
EvidenceMethodOption = Annotated[str, typer.Option(
    "--evidence-method", help="occlusion (faithful), grad_x_input (fast) or attention "
    "(approximate).")]
RegionsOption = Annotated[Path | None, typer.Option(
    "--regions", help="GeoJSON of areas to analyse (e.g. a QuPath export); default: all tissue.")]
RegionsFromAnnotationsOption = Annotated[bool, typer.Option(
    "--regions-from-annotations", help="qupath: sources: analyse only the areas annotated on "
    "each image.")]
ClassOption = Annotated[list[str] | None, typer.Option(
    "--class", help="With --regions-from-annotations: only annotations of this class (repeat).")]
WriteBackOption = Annotated[bool, typer.Option(
    "--write-back", help="qupath: sources: add the evidence to each image in the project.")]
SeedOption = Annotated[int | None, typer.Option(
    "--seed", help="Sample the answer with this seed (default: greedy decoding).")]
MaxNewTokensOption = Annotated[int, typer.Option("--max-new-tokens", min=1)]


def _handle_errors(func: F) -> F:
    """Map :class:`HwsiError` to a red one-line message and its exit code."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except HwsiError as err:
            # escaped: messages hold user text such as [#IMAGE_NAME] that rich would eat as markup
            stderr.print(f"[red]error:[/red] {escape(str(err))}", markup=True, highlight=False,
                         soft_wrap=True)
            raise typer.Exit(err.exit_code) from None

    return wrapper  # type: ignore[return-value]


def _settings(**overrides: Any) -> Settings:
    settings = load_settings(**overrides)
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(message)s",
        handlers=[RichHandler(console=stderr, show_path=False)],
        force=True,
    )
    return settings


QUPATH_REGIONS_FILE = "qupath-regions.geojson"
"""With --regions-from-annotations: the regions of a project image, written beside its result."""


@dataclass(frozen=True, slots=True)
class _AnalysisSlide:
    """One slide for ``hwsi analyze``: a file as given, or an image of a QuPath project."""

    path: Path
    label: str
    project: Path | None = None
    image: str | None = None
    regions: BaseGeometry | None = None


def _check_qupath_options(has_project: bool, from_annotations: bool, classes: list[str],
                          write_back: bool, regions: Path | None) -> None:
    """Options that only mean something for qupath: sources, refused in one line otherwise."""
    given = [name for name, on in (("--regions-from-annotations", from_annotations),
                                   ("--class", bool(classes)), ("--write-back", write_back)) if on]
    if given and not has_project:
        raise InputError(f"{', '.join(given)}: only for QuPath project sources "
                         "(qupath:PROJECT_DIR[#IMAGE_NAME])")
    if classes and not from_annotations:
        raise InputError("--class selects the annotations of --regions-from-annotations; add it")
    if from_annotations and regions is not None:
        raise InputError("give either --regions FILE or --regions-from-annotations, not both")


def _analysis_slides(sources: list[str], *, from_annotations: bool, classes: list[str],
                     write_back: bool, regions: Path | None,
                     options: ReadOptions) -> list[_AnalysisSlide]:
    """The slides the sources stand for; arguments are checked before QuPath is started."""
    from qupath_bridge.project import parse_source, project_regions, source_images

    remote = [text for text in sources if text.strip().lower().startswith("omero:")]
    if remote:
        raise InputError(f"{remote[0]}: OMERO images are analysed by workers, which write the "
                         "results back to OMERO; queue them with hwsi jobs submit")
    parsed = [(text, parse_source(text)) for text in sources]
    _check_qupath_options(any(source for _, source in parsed), from_annotations, classes,
                          write_back, regions)
    missing = [text for text, source in parsed if source is None and not Path(text).is_file()]
    if missing:
        raise InputError(f"slide file(s) not found: {', '.join(missing)}")
    slides: list[_AnalysisSlide] = []
    for text, source in parsed:
        if source is None:
            slides.append(_AnalysisSlide(Path(text), Path(text).name))
            continue
        for image in source_images(source):
            assert image.path is not None  # source_images only returns local files
            area = (project_regions(source.project, image.name, classes or None, options=options)
                    if from_annotations else None)
            slides.append(_AnalysisSlide(image.path, image.name, source.project, image.name, area))
    return slides
