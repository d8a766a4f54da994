from __future__ import annotations

import pytest

from omero_hwsi.errors import MppError
from omero_hwsi.slide.reader import plan_read, validate_mpp


def test_level_within_tolerance_is_used_without_resampling():
    plan = plan_read(0.499, (1.0, 4.0, 16.0), 0.5, tolerance=0.05)
    assert (plan.level, plan.resample, plan.level0_per_px) == (0, False, 1.0)


def test_coarsest_level_not_coarser_than_target_is_chosen():
    plan = plan_read(0.25, (1.0, 2.0, 8.0), 0.5, tolerance=0.05)
    assert (plan.level, plan.resample, plan.level0_per_px) == (1, False, 2.0)
    plan = plan_read(0.25, (1.0, 4.0, 16.0), 0.5, tolerance=0.05)
    assert (plan.level, plan.resample, plan.level0_per_px) == (0, True, 2.0)
    plan = plan_read(0.25, (1.0, 4.0, 16.0), 2.0, tolerance=0.05)
    assert (plan.level, plan.resample) == (1, True)


def test_slide_coarser_than_target_is_refused():
    with pytest.raises(MppError, match="coarser"):
        plan_read(1.0, (1.0,), 0.5, tolerance=0.05)


def test_tolerance_is_relative_and_configurable():
    assert not plan_read(0.52, (1.0,), 0.5, tolerance=0.05).resample
    with pytest.raises(MppError):
        plan_read(0.52, (1.0,), 0.5, tolerance=0.01)


@pytest.mark.parametrize("value", [0.01, 25.0, float("inf"), -1.0])
def test_implausible_mpp_names_the_override(value):
    with pytest.raises(MppError, match="s.svs"):
        validate_mpp(value, name="s.svs", source="metadata")
