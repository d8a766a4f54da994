"""What an analysis will do, decided without loading the model (torch-free).

Why apart from :mod:`omero_hwsi.analysis`: the job client (and OMERO scripts through it), the
``prepare`` task on CPU workers and ``hwsi jobs submit`` need the default model's folder, the
model's grid and encoders and the output folders, but must not import torch. The model folder's
``config.json`` records the features it was trained on (``expected_features``); reading that
JSON gives the same plan that ``analyze_slide`` takes from the loaded model's config.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omero_hwsi.errors import InputError, ModelFileNotFoundError, UnknownEncoderError

if TYPE_CHECKING:
    from omero_hwsi.features.extract import ExtractionConfig
    from omero_hwsi.settings import Settings
    from omero_hwsi.slide.grid import GridSpec

__all__ = ["DEFAULT_MODEL", "default_model", "expected_features", "extraction_config", "grid_spec",
           "output_dirs"]

DEFAULT_MODEL = Path(__file__).parent / "models" / "demo"
"""The embedded default model: a small demo model trained on synthetic slides."""


def default_model() -> Path:
    """The embedded demo model's folder.

    Raises:
        ModelFileNotFoundError: this installation carries no default model.
    """
    if not (DEFAULT_MODEL / "config.json").is_file():
        raise ModelFileNotFoundError(
            f"{DEFAULT_MODEL}: no default model in this installation; pass --model DIR"
        )
    return DEFAULT_MODEL


def output_dirs(slides: list[Path], out: Path) -> list[Path]:
    """Where each slide's files go: ``out`` itself for one slide, ``out/<stem>`` for several.

    Raises:
        InputError: two slides share a file stem (their results would overwrite each other);
            checked before anything is written.
    """
    if len(slides) == 1:
        return [out]
    seen: dict[str, Path] = {}
    for slide in slides:
        if slide.stem in seen:
            raise InputError(f"{seen[slide.stem]} and {slide} share the name {slide.stem!r}; their "
                             "results would collide in the output folder: analyse them separately")
        seen[slide.stem] = slide
    return [out / slide.stem for slide in slides]


def expected_features(model_dir: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The encoders and grid a model folder records, read from its JSON (no torch).

    Our folders keep them in ``config.json`` (``expected_features``); a released MLLM-HWSI
    folder (converted on load) has the fixed released set.

    Raises:
        ModelFileNotFoundError: the folder has no readable ``config.json``.
    """
    folder = Path(model_dir)
    if (folder / "projector_config.json").is_file():  # the released layout
        from omero_hwsi.model.convert_official import RELEASED_EXPECTED_FEATURES

        return dict(RELEASED_EXPECTED_FEATURES)
    path = folder / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise ModelFileNotFoundError(f"{path}: model config not found; pass --model DIR") from err
    except (OSError, ValueError) as err:
        raise ModelFileNotFoundError(f"{path}: unreadable model config: {err}") from err
    expected = config.get("expected_features") if isinstance(config, dict) else None
    return dict(expected) if isinstance(expected, dict) else None


def grid_spec(expected: Mapping[str, Any] | None, settings: Settings) -> GridSpec:
    """The model's grid when it records one, else the settings'."""
    from omero_hwsi.slide.grid import GridSpec

    grid = (expected or {}).get("grid") or {}
    return GridSpec(
        target_mpp=float(grid.get("target_mpp", settings.target_mpp)),
        region_px=int(grid.get("region_px", settings.region_px)),
        patch_px=int(grid.get("patch_px", settings.patch_px)),
        min_tissue_fraction=settings.min_tissue_fraction,
    )


def extraction_config(expected: Mapping[str, Any] | None, settings: Settings) -> ExtractionConfig:
    """The encoders the model was trained on (they must be installed here).

    Raises:
        UnknownEncoderError: the model expects an encoder this installation lacks.
    """
    from omero_hwsi.features.extract import ExtractionConfig
    from omero_hwsi.features.registry import is_encoder

    names: dict[str, str] = {}
    for scale, default in (("patch", "hed_texture"), ("region", "layout")):
        name = str((expected or {}).get(scale, {}).get("id", default))
        if not is_encoder(name):
            raise UnknownEncoderError(
                f"the model expects {scale} features from the encoder {name!r}, which is not "
                "installed here; install it or use a model trained on the built-in encoders"
            )
        names[scale] = name
    return ExtractionConfig(patch_encoder=names["patch"], region_encoder=names["region"],
                            n_candidates=settings.candidates_per_region,
                            k=settings.patches_per_region, workers=settings.extract_workers)
