"""Which regions, patches and nuclei an answer rests on.

Three methods, always named in the output (see :data:`~omero_hwsi.results.schema.EVIDENCE_METHODS`):

* **occlusion** (default, faithful): remove one element from the model's input and measure how
  much the teacher-forced log-likelihood of the answer drops. The per-scale tokens are
  projected once (:meth:`HwsiModel.encode_scales`); each variant only re-runs what the removed
  element changes (:meth:`HwsiModel.assemble`: the slide token, fusion and resampler or the
  token sequence; for a nucleus, CCAF on its one patch), and variants are scored in batches.
* **gradient x input** (fast): one backward pass; first-order, so it can miss interactions.

Scoring every nucleus of a slide by occlusion would take tens of thousands of passes, so the
search is hierarchical with budgets: every region, then the patches of the ``top_regions``
best regions, then the nuclei of the ``top_patches`` best of those patches.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, get_args

import numpy as np
import torch
from torch import Tensor

from omero_hwsi.inference.scoring import PromptParts, answer_attention, answer_log_likelihood
from omero_hwsi.model.modeling_hwsi import SCALE_CODES
from omero_hwsi.results.schema import EvidenceItem, EvidenceLevel, EvidenceMethod
from omero_hwsi.slide.hierarchy import cell_hid, patch_hid, region_hid

if TYPE_CHECKING:
    from omero_hwsi.features.store import SlideFeatures
    from omero_hwsi.model.modeling_hwsi import HwsiForConditionalGeneration, ScaleTokens

__all__ = ["EvidenceBudget", "EvidenceDepth", "explain"]

EvidenceDepth = Literal["none", "region", "patch", "cell"]
_DEPTHS: tuple[EvidenceDepth, ...] = ("none", "region", "patch", "cell")
_INPUTS = ("region", "region_mask", "patch", "patch_mask", "cell", "cell_mask", "cell_pos",
           "region_pos")


@dataclass(frozen=True, slots=True)
class EvidenceBudget:
    """How far the hierarchical search goes below the regions.

    Attributes:
        top_regions: regions (best first) whose patches are scored.
        top_patches: patches (best first, among those scored) whose nuclei are scored.
        batch_size: masked variants per forward pass of the language model.
    """

    top_regions: int = 4
    top_patches: int = 4
    batch_size: int = 16

    def __post_init__(self) -> None:
        if self.top_regions < 0 or self.top_patches < 0 or self.batch_size < 1:
            raise ValueError(f"invalid evidence budget {self}")


class _Geometry:
    """Hierarchy ids and level-0 geometry of the model's input slots for one slide."""

    def __init__(self, features: SlideFeatures, visual: Mapping[str, Tensor]) -> None:
        self.features = features
        self.region_index = visual["region_index"][0].tolist()
        self.patch_index = visual["patch_index"][0].tolist()
        cell_k = visual.get("cell_k")
        self.cell_k = cell_k[0].tolist() if cell_k is not None and cell_k.dim() == 4 else None
        table = features.nuclei
        self.rows = {
            (int(r), int(j), int(k)): n
            for n, (r, j, k) in enumerate(zip(table.region, table.patch, table.k, strict=True))
        }

    def region(self, r: int) -> tuple[str, dict[str, Any]]:
        return region_hid(self.region_index[r]), _box(self.features.region_boxes[r])

    def patch(self, r: int, c: int) -> tuple[str, dict[str, Any]]:
        j = self.patch_index[r][c]
        return patch_hid(self.region_index[r], j), _box(self.features.patch_boxes[r, j])

    def cell(self, r: int, c: int, n: int) -> tuple[str, dict[str, Any]]:
        assert self.cell_k is not None
        j, k = self.patch_index[r][c], self.cell_k[r][c][n]
        ring = self.features.nuclei.polygon(self.rows[(r, j, k)]).tolist()
        if ring and ring[0] != ring[-1]:
            ring.append(ring[0])
        return cell_hid(self.region_index[r], j, k), {"type": "Polygon", "coordinates": [ring]}


def _box(box: Any) -> dict[str, Any]:
    x, y, w, h = (float(v) for v in np.asarray(box).tolist())
    ring = [[x, y], [x + w, y], [x + w, y + h], [x, y + h], [x, y]]
    return {"type": "Polygon", "coordinates": [ring]}


class _Occlusion:
    """Scores masked variants of one slide against the unmasked answer likelihood."""

    @torch.no_grad()
    def __init__(
        self, model: HwsiForConditionalGeneration, parts: PromptParts,
        inputs: dict[str, Tensor], batch_size: int,
    ) -> None:
        self.model = model
        self.parts = parts
        self.inputs = inputs
        self.batch_size = batch_size
        self.scales: ScaleTokens = model.model.encode_scales(**inputs)
        self.base = float(self._score(1, lambda _s: {})[0])

    @torch.no_grad()
    def _score(self, count: int, build: Callable[[slice], dict[str, Tensor]]) -> Tensor:
        """Log-likelihood of ``count`` variants; ``build(chunk)`` gives their assemble() masks."""
        values: list[Tensor] = []
        hwsi = self.model.model
        for start in range(0, count, self.batch_size):
            chunk = slice(start, min(count, start + self.batch_size))
            changes = build(chunk)
            size = chunk.stop - chunk.start
            region_mask = changes.get("region_mask", self.scales.region_mask.expand(size, -1))
            alive = region_mask.any(dim=1)
            # A variant with no region left shows the model no slide at all.
            empty = self.scales.region_tokens.new_zeros(0, self.scales.region_tokens.shape[-1])
            tokens = [empty] * size
            if bool(alive.any()):
                kept = {k: v[alive] for k, v in changes.items()}
                kept.setdefault("region_mask", region_mask[alive])
                out = hwsi.assemble(self.scales, **kept)
                assert out.visual_tokens is not None and out.visual_mask is not None
                for i, v in enumerate(alive.nonzero()[:, 0].tolist()):
                    tokens[v] = out.visual_tokens[i][out.visual_mask[i]]
            values.append(answer_log_likelihood(self.model.language_model, [self.parts], tokens,
                                                batch_size=self.batch_size))
        return torch.cat(values)

    def regions(self, rs: list[int]) -> list[float]:
        def build(chunk: slice) -> dict[str, Tensor]:
            mask = self.scales.region_mask.expand(chunk.stop - chunk.start, -1).clone()
            for v, r in enumerate(rs[chunk]):
                mask[v, r] = False
            return {"region_mask": mask}

        return (self.base - self._score(len(rs), build)).tolist()

    def patches(self, slots: list[tuple[int, int]]) -> list[float] | None:
        def build(chunk: slice) -> dict[str, Tensor]:
            mask = self.scales.patch_mask.expand(chunk.stop - chunk.start, -1, -1).clone()
            for v, (r, c) in enumerate(slots[chunk]):
                mask[v, r, c] = False
            return {"patch_mask": mask}

        return (self.base - self._score(len(slots), build)).tolist()

    def cells(self, nuclei: list[tuple[int, int, int]]) -> list[float] | None:
        """Each nucleus: re-fuse its patch without it (CCAF), swap in that cell token."""
        hwsi = self.model.model
        cell, mask = self.inputs["cell"], self.inputs["cell_mask"].bool()
        pos = self.inputs.get("cell_pos")

        def build(chunk: slice) -> dict[str, Tensor]:
            picked = nuclei[chunk]
            size = len(picked)
            rows = [cell[0, r, c] for r, c, _ in picked]
            masks = torch.stack([mask[0, r, c] for r, c, _ in picked]).clone()
            for v, (_, _, n) in enumerate(picked):
                masks[v, n] = False
            positions = None if pos is None else torch.stack([pos[0, r, c] for r, c, _ in picked])
            fused, _, _ = hwsi.fuse_cells(
                torch.stack(rows)[:, None, None], masks[:, None, None],
                torch.ones(size, 1, 1, dtype=torch.bool, device=cell.device),
                None if positions is None else positions[:, None, None],
            )
            new = hwsi.projectors["cell"](fused[:, 0, 0])
            tokens = self.scales.cell_tokens.expand(size, -1, -1, -1).clone()
            for v, (r, c, _) in enumerate(picked):
                tokens[v, r, c] = new[v]
            return {"cell_tokens": tokens}

        return (self.base - self._score(len(nuclei), build)).tolist()


class _GradXInput:
    """Gradient x input of every element from one backward pass.

    Regions and patches use their projected tokens (a region adds its patches' and cells', as
    removing a region removes them); nuclei use their input descriptors (they have no token of
    their own). Without CCAF there is no per-nucleus input.
    """

    def __init__(self, model: HwsiForConditionalGeneration, parts: PromptParts,
                 inputs: dict[str, Tensor]) -> None:
        hwsi = model.model
        self.patch_mask = inputs["patch_mask"][0].bool() & inputs["region_mask"][0].bool()[:, None]
        with torch.enable_grad():
            cell = inputs["cell"]
            per_nucleus = hwsi.ccaf is not None
            if per_nucleus:
                cell = cell.detach().clone().requires_grad_(True)
            scales = hwsi.encode_scales(**{**inputs, "cell": cell})
            out = hwsi.assemble(scales)
            assert out.visual_tokens is not None and out.visual_mask is not None
            ll = answer_log_likelihood(model.language_model, [parts],
                                       [out.visual_tokens[0][out.visual_mask[0]]])
            targets = [scales.region_tokens, scales.patch_tokens, scales.cell_tokens]
            if per_nucleus:
                targets.append(cell)
            grads = torch.autograd.grad(ll.sum(), targets, allow_unused=True)
        products = [
            (g * t).float().sum(-1)[0].detach() if g is not None else torch.zeros(t.shape[1:-1])
            for g, t in zip(grads, targets, strict=True)
        ]
        self.region, self.patch = products[0], products[1] + products[2]
        self.nucleus = products[3] if per_nucleus else None

    def regions(self, rs: list[int]) -> list[float]:
        inside = (self.patch * self.patch_mask).sum(dim=1)
        return [float(self.region[r] + inside[r]) for r in rs]

    def patches(self, slots: list[tuple[int, int]]) -> list[float] | None:
        return [float(self.patch[r, c]) for r, c in slots]

    def cells(self, nuclei: list[tuple[int, int, int]]) -> list[float] | None:
        if self.nucleus is None:
            return None
        return [float(self.nucleus[r, c, n]) for r, c, n in nuclei]


class _Attention:
    """Attention flow from the answer back to the slide (approximate, labelled so).

    The answer's attention to each visual token (last LLM layer, heads and answer positions
    averaged) is followed down: with the resampler through the query->region attention (patches
    are mean-pooled there, so attention cannot rank them); with concat to the tokens of each
    region and patch directly. A nucleus gets its patch's share times CCAF's CLS->nucleus
    attention.
    """

    def __init__(self, model: HwsiForConditionalGeneration, parts: PromptParts,
                 inputs: dict[str, Tensor]) -> None:
        hwsi = model.model
        scales = hwsi.encode_scales(**inputs, output_attentions=True)
        out = hwsi.assemble(scales, output_attentions=True)
        assert out.visual_tokens is not None and out.visual_mask is not None
        assert out.token_refs is not None
        mask = out.visual_mask[0]
        flow = answer_attention(model.language_model, parts, out.visual_tokens[0][mask])
        r_count, c_count = scales.patch_mask.shape[1:]
        self.patch: Tensor | None = None
        if out.region_attention is not None:
            self.region = (flow[:, None] * out.region_attention[0].float()).sum(dim=0)
        else:
            refs = out.token_refs[0][mask]
            self.region = torch.zeros(r_count)
            self.patch = torch.zeros(r_count, c_count)
            for (code, r, c), weight in zip(refs.tolist(), flow.tolist(), strict=True):
                if r >= 0:
                    self.region[r] += weight
                if r >= 0 and c >= 0 and code in (SCALE_CODES["cell"], SCALE_CODES["patch"]):
                    self.patch[r, c] += weight
        attention = scales.cell_attention
        self.nucleus = None
        if attention is not None and self.patch is not None:
            self.nucleus = self.patch[..., None] * attention[0].float()

    def regions(self, rs: list[int]) -> list[float]:
        return [float(self.region[r]) for r in rs]

    def patches(self, slots: list[tuple[int, int]]) -> list[float] | None:
        if self.patch is None:
            return None
        return [float(self.patch[r, c]) for r, c in slots]

    def cells(self, nuclei: list[tuple[int, int, int]]) -> list[float] | None:
        if self.nucleus is None:
            return None
        return [float(self.nucleus[r, c, n]) for r, c, n in nuclei]


_UNAVAILABLE = {
    ("attention", "patch"): "patches not scored: the resampler mean-pools the patches of a "
                            "region, so attention cannot rank them (use occlusion)",
    ("attention", "cell"): "nuclei not scored: no CLS->nucleus attention below unscored patches",
}


def explain(
    model: HwsiForConditionalGeneration,
    parts: PromptParts,
    visual: Mapping[str, Tensor],
    features: SlideFeatures,
    *,
    depth: EvidenceDepth = "cell",
    method: EvidenceMethod = "occlusion",
    budget: EvidenceBudget | None = None,
) -> tuple[list[EvidenceItem], list[str]]:
    """Score the elements of one slide for the answer encoded in ``parts``.

    Args:
        model: the model that produced the answer (in eval mode).
        parts: the question and answer, cut at the visual tokens (:func:`split_prompt`).
        visual: the slide's batch tensors (B = 1) from ``collate_visual(visual_inputs(...))``.
        features: the slide's feature store (for ids and geometry).
        depth: deepest level scored: ``region``, ``patch``, ``cell`` (nuclei) or ``none``.
        method: ``occlusion``, ``grad_x_input`` or ``attention``.
        budget: the hierarchical budgets (defaults: 4 regions, 4 patches, 16 per pass).

    Returns:
        ``(items, notes)``: scored elements (regions, then patches, then nuclei, each level
        best first) and notes on levels that could not be scored.
    """
    if depth not in _DEPTHS:
        raise ValueError(f"evidence depth must be one of {', '.join(_DEPTHS)}, got {depth!r}")
    if method not in get_args(EvidenceMethod):
        raise ValueError(f"evidence method must be one of {', '.join(get_args(EvidenceMethod))}, "
                         f"got {method!r}")
    budget = budget or EvidenceBudget()
    if depth == "none":
        return [], []
    if int(visual["region_mask"].shape[0]) != 1:
        raise ValueError("explain() scores one slide at a time")
    inputs = {k: visual[k] for k in _INPUTS if k in visual}
    geometry = _Geometry(features, visual)
    notes: list[str] = []
    region_mask = inputs["region_mask"][0].bool()
    patch_mask = inputs["patch_mask"][0].bool() & region_mask[:, None]
    regions = region_mask.nonzero()[:, 0].tolist()
    scorer: _Occlusion | _GradXInput | _Attention
    if method == "occlusion":
        scorer = _Occlusion(model, parts, inputs, budget.batch_size)
    elif method == "grad_x_input":
        scorer = _GradXInput(model, parts, inputs)
    else:
        with torch.no_grad():
            scorer = _Attention(model, parts, inputs)
    items: list[EvidenceItem] = []

    def add(level: EvidenceLevel, ident: tuple[str, dict[str, Any]], score: float,
            parent: str | None) -> None:
        items.append(EvidenceItem(id=ident[0], level=level, method=method, score=float(score),
                                  geometry=ident[1], parent=parent))

    ranked_regions = sorted(zip(regions, scorer.regions(regions), strict=True), key=lambda x: -x[1])
    for r, score in ranked_regions:
        add("region", geometry.region(r), score, None)
    if depth == "region":
        return items, notes

    slots = [(r, c) for r, _ in ranked_regions[: budget.top_regions]
             for c in patch_mask[r].nonzero()[:, 0].tolist()]
    patch_scores = scorer.patches(slots)
    if patch_scores is None:
        notes.append(_UNAVAILABLE[(method, "patch")])
        return items, notes
    ranked_patches = sorted(zip(slots, patch_scores, strict=True), key=lambda x: -x[1])
    for (r, c), score in ranked_patches:
        add("patch", geometry.patch(r, c), score, geometry.region(r)[0])
    if depth == "patch":
        return items, notes

    if model.model.ccaf is None or geometry.cell_k is None:
        notes.append("nuclei not scored: this model takes precomputed cell vectors (one per "
                     "patch), so single nuclei cannot be removed from its input")
        return items, notes
    cell_mask = inputs["cell_mask"][0].bool()
    nuclei = [(r, c, n) for (r, c), _ in ranked_patches[: budget.top_patches]
              for n in cell_mask[r, c].nonzero()[:, 0].tolist()]
    if not nuclei:
        notes.append(f"nuclei not scored: the top {budget.top_patches} patches hold no nuclei")
        return items, notes
    cell_scores = scorer.cells(nuclei)
    if cell_scores is None:
        notes.append(_UNAVAILABLE[(method, "cell")])
        return items, notes
    for (r, c, n), score in sorted(zip(nuclei, cell_scores, strict=True), key=lambda x: -x[1]):
        add("cell", geometry.cell(r, c, n), score, geometry.patch(r, c)[0])
    return items, notes
