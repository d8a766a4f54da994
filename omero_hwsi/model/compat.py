"""Does a feature store fit a model? The encoders and grid must be the ones it was trained on.

A model's weights mean something only for features made the same way: the same patch,
region and nucleus encoders (ids, versions, widths) and the same grid (target MPP, region
and patch sizes). ``HwsiConfig.expected_features`` records them; :func:`check_features`
refuses a store made differently, in one line naming both sides.
"""

from __future__ import annotations

from typing import Any

from omero_hwsi.errors import FeatureStoreError

__all__ = ["check_features", "feature_signature"]

_ENCODER_FIELDS = ("id", "version", "dim")
_GRID_FIELDS = ("target_mpp", "region_px", "patch_px")


def feature_signature(provenance: dict[str, Any]) -> dict[str, Any]:
    """The part of a store's manifest a model depends on (what ``expected_features`` holds)."""
    encoders = provenance["encoders"]
    signature: dict[str, Any] = {
        scale: {f: encoders[scale][f] for f in _ENCODER_FIELDS}
        for scale in ("patch", "region", "nucleus") if scale in encoders
    }
    signature["grid"] = {f: provenance["grid"][f] for f in _GRID_FIELDS}
    return signature


def _describe(signature: dict[str, Any]) -> str:
    parts = [f"{scale} {v['id']} v{v['version']} ({v['dim']}-d)"
             for scale, v in signature.items() if scale != "grid"]
    grid = signature.get("grid", {})
    if grid:
        parts.append(f"grid {grid['region_px']}/{grid['patch_px']} px at {grid['target_mpp']} um/px")
    return ", ".join(parts)


def check_features(expected: dict[str, Any] | None, provenance: dict[str, Any], *, store: str) -> None:
    """Raise if the store at ``store`` was made with other encoders or grid than ``expected``.

    ``expected=None`` (a model that records nothing, e.g. built by hand in a test) accepts any
    store.

    Raises:
        FeatureStoreError: one line naming what the model expects and what the store holds.
    """
    if expected is None:
        return
    actual = feature_signature(provenance)
    wanted = {k: v for k, v in expected.items() if k in actual}
    if any(actual[k] != v for k, v in wanted.items()):
        raise FeatureStoreError(
            f"{store}: the model expects features from {_describe(wanted)}, but the store holds "
            f"{_describe({k: actual[k] for k in wanted})}; extract the slide again with the "
            "model's encoders and grid"
        )
