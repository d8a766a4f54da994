"""How many visual tokens a slide gets in ``concat`` fusion, and which ones.

The processor (to expand placeholders) and the model (to build the sequence) must agree on
the count, so the rule lives here once. In ``concat`` mode the visual sequence is
``[cell tokens | patch tokens | region tokens | WSI token]``. The budget rule keeps every
region token and the WSI token, then fills what is left with (patch, cell) pairs in selection
rank order, interleaved across regions (rank 0 of every region, then rank 1, ...), so a tight
budget spreads detail over the whole slide instead of exhausting the first region. When one
slot is left, the patch token goes in without its cell token. A slide whose regions alone
exceed the budget is refused: silently dropping regions would hide tissue from the model.

A model may read fewer scales (``visual_scales``, e.g. the WSI-only arm of the scale ablation):
the tokens of a scale it does not read are never placed and take no budget.
"""

from __future__ import annotations

import torch
from torch import Tensor

from omero_hwsi.errors import InputError

__all__ = ["ALL_SCALES", "TokenBudgetError", "concat_token_count", "select_concat_tokens"]

ALL_SCALES: tuple[str, ...] = ("cell", "patch", "region", "wsi")
"""The four scales, in concat sequence order."""


class TokenBudgetError(InputError):
    """The slide has more regions than the visual-token budget can hold."""


def select_concat_tokens(
    region_mask: Tensor, patch_mask: Tensor, cell_present: Tensor, budget: int,
    scales: tuple[str, ...] = ALL_SCALES,
) -> tuple[Tensor, Tensor]:
    """Choose the patch and cell tokens that fit in ``budget`` visual tokens.

    Args:
        region_mask: ``(B, R)`` bool, real regions.
        patch_mask: ``(B, R, C)`` bool, real patches; slot ``c`` is selection rank ``c``.
        cell_present: ``(B, R, C)`` bool, patches that get a cell token (every real patch
            does: an empty patch's token is the learned "no cells" token).
        budget: total visual tokens allowed per slide.
        scales: the scales the model reads; a patch or cell token of an unread scale is
            never kept, and region tokens count against the budget only when read.

    Returns:
        ``keep_patch`` and ``keep_cell``, both ``(B, R, C)`` bool.

    Raises:
        TokenBudgetError: a slide's regions plus its WSI token exceed the budget.
    """
    batch, regions, slots = patch_mask.shape
    keep_patch = torch.zeros_like(patch_mask)
    keep_cell = torch.zeros_like(patch_mask)
    use_patch, use_cell = "patch" in scales, "cell" in scales
    for b in range(batch):
        n_regions = int(region_mask[b].sum())
        left = budget - (n_regions if "region" in scales else 0) - 1
        if left < 0:
            raise TokenBudgetError(
                f"{n_regions} regions need {n_regions + 1} visual tokens but the budget is "
                f"{budget}; raise token_budget or restrict the analysis to fewer regions"
            )
        real = patch_mask[b] & region_mask[b][:, None]
        # Rank-major order: all regions' rank-0 patches, then rank 1, ...
        for c in range(slots):
            for r in range(regions):
                if left <= 0:
                    break
                if not real[r, c]:
                    continue
                if use_patch:
                    keep_patch[b, r, c] = True
                    left -= 1
                if use_cell and left > 0 and cell_present[b, r, c]:
                    keep_cell[b, r, c] = True
                    left -= 1
    return keep_patch, keep_cell


def concat_token_count(
    region_mask: Tensor, patch_mask: Tensor, cell_present: Tensor, budget: int,
    scales: tuple[str, ...] = ALL_SCALES,
) -> list[int]:
    """Visual tokens per slide under :func:`select_concat_tokens`."""
    keep_patch, keep_cell = select_concat_tokens(region_mask, patch_mask, cell_present, budget,
                                                 scales)
    regions = region_mask.sum(dim=1) * int("region" in scales)
    per_slide = regions + 1 + keep_patch.sum(dim=(1, 2)) + keep_cell.sum(dim=(1, 2))
    return [int(n) for n in per_slide]
