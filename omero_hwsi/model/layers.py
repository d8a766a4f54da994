"""Small building blocks of the hierarchical WSI model.

Every module here is a plain, typed :class:`torch.nn.Module` with its sizes taken from its
arguments, so the same code builds the tiny models of the tests, the models trained by this
project and the layout of the released checkpoint (whose state-dict key names several of these
modules reproduce on purpose, see the class docstrings).

Conventions shared by all modules:

* Shapes use ``B`` batch (slides), ``R`` regions per slide, ``C`` patches per region, ``N``
  nuclei (cells) per patch, ``D`` width, ``Q`` learned queries, ``P`` patches flattened over
  ``(B, R, C)``.
* Masks are ``bool`` tensors with ``True`` marking a real item and ``False`` a padded slot.
  Padded slots may hold anything (including NaN): every module replaces them before they can
  reach a real output, so batches can be padded without changing any result. Torch's own
  ``key_padding_mask`` has the opposite meaning; the flip happens inside, in a variable named
  ``ignore``.
* In ``eval()`` mode every module is deterministic.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "AlignmentHead",
    "AttentionPool",
    "CcafBlock",
    "CellAttentionFusion",
    "FourierPositionEncoding",
    "QueryResampler",
    "RegionFusion",
    "ScaleProjector",
    "masked_mean",
]

_NORM_EPS = 1e-6


def _check_heads(dim: int, heads: int) -> None:
    if dim <= 0 or heads <= 0 or dim % heads:
        raise ValueError(f"width {dim} must be a positive multiple of the head count {heads}")


def _check_mask(mask: Tensor, shape: tuple[int, ...], what: str) -> None:
    if mask.dtype != torch.bool:
        raise TypeError(f"{what} must be a bool tensor (True = real item), got {mask.dtype}")
    if tuple(mask.shape) != shape:
        raise ValueError(f"{what} has shape {tuple(mask.shape)}, expected {shape}")


def _mlp_layers(dim: int, mlp_ratio: float, dropout: float) -> list[nn.Module]:
    """Linear(dim, hidden) -> GELU -> Dropout -> Linear(hidden, dim), hidden = dim * ratio."""
    hidden = max(1, int(dim * mlp_ratio))
    return [nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim)]


def _check_regions(x: Tensor, mask: Tensor, name: str, why: str) -> tuple[int, int]:
    """Check ``x`` is ``(B, R, D)`` with a ``(B, R)`` mask and a real region per sample."""
    if x.ndim != 3:
        raise ValueError(f"{name} must be (B, R, D), got shape {tuple(x.shape)}")
    b, r, _ = x.shape
    _check_mask(mask, (b, r), "region mask")
    empty = ~mask.any(dim=1)
    if bool(empty.any()):
        bad = empty.nonzero().flatten().tolist()
        raise ValueError(f"samples {bad} have no real region: {why}")
    return b, r


def masked_mean(x: Tensor, mask: Tensor, dim: int) -> Tensor:
    """Mean of ``x`` over axis ``dim``, counting only the real items.

    Used to pool the patch and cell tokens of a region: padded slots must neither be averaged
    in nor change the divisor, and a region with no real item must give a finite zero vector
    instead of the ``0 / 0 = NaN`` a naive mean would produce.

    Args:
        x: Features, shape ``(..., D)``; the last axis is the feature axis.
        mask: ``bool``, ``x``'s shape without the last axis; ``True`` = real item.
        dim: Axis of ``x`` to reduce (negative values count from the end); must not be the
            feature axis.

    Returns:
        ``x`` with axis ``dim`` removed; zero wherever no item along ``dim`` is real.

    Raises:
        ValueError: If ``mask`` does not match ``x`` or ``dim`` is the feature axis.
    """
    _check_mask(mask, tuple(x.shape[:-1]), "mask")
    axis = dim + x.ndim if dim < 0 else dim
    if not 0 <= axis < x.ndim - 1:
        raise ValueError(f"dim {dim} must name a non-feature axis of a {x.ndim}-D tensor")
    keep = mask.unsqueeze(-1)
    # where(), not a product: a NaN or inf in a padded slot must not leak into the sum.
    total = torch.where(keep, x, torch.zeros((), dtype=x.dtype, device=x.device)).sum(axis)
    count = keep.sum(axis).clamp(min=1).to(x.dtype)
    return total / count


class ScaleProjector(nn.Module):
    """Map one scale's encoder features into the language model's embedding space.

    ``LayerNorm(d_in) -> Linear(d_in, hidden) -> GELU -> Dropout -> Linear(hidden, d_out)``.
    The layers live in ``self.net`` at indices 0-4, so the state-dict keys are
    ``net.0.*`` (LayerNorm), ``net.1.*`` and ``net.4.*`` (the two Linears), mirroring the
    released checkpoint's ``{scale}_proj.proj.projector.{0,1,4}.*``; indices 2 (GELU) and 3
    (Dropout) hold no parameters.

    Args:
        d_in: Width of the encoder features.
        d_out: Width of the language model's embeddings.
        hidden: Width of the hidden layer.
        dropout: Dropout probability after the activation.
        layernorm: Normalise the input first; ``False`` puts an ``nn.Identity`` at index 0.
    """

    def __init__(
        self,
        d_in: int,
        d_out: int,
        *,
        hidden: int = 1024,
        dropout: float = 0.1,
        layernorm: bool = True,
    ) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.LayerNorm(d_in) if layernorm else nn.Identity(),
            nn.Linear(d_in, hidden),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, d_out),
        )

    def forward(self, x: Tensor) -> Tensor:
        """Project features.

        Args:
            x: Shape ``(..., d_in)``.

        Returns:
            Shape ``(..., d_out)``.
        """
        out: Tensor = self.net(x)
        return out


class FourierPositionEncoding(nn.Module):
    """Encode 2-D positions in ``[0, 1]`` as ``d_out``-dim vectors added to tokens.

    Set-attention is blind to where items are; adding an encoding of the position gives the
    model "where" without imposing an order. Each coordinate is expanded into
    ``sin(2 pi f x)`` and ``cos(2 pi f x)`` for ``n_frequencies`` frequencies spaced
    geometrically from 1 to ``n_frequencies`` cycles per unit length (periods from the whole
    extent down to ``1 / n_frequencies`` of it, so neighbours stay distinguishable without
    aliasing), then a learned Linear maps the ``4 * n_frequencies`` features to ``d_out``.
    The frequencies are derived from ``n_frequencies``, not stored (only ``proj.*`` is in the
    state dict), and the angles are computed in float32 whatever the module's dtype, since
    ``sin`` of a large angle in half precision is mostly rounding error.

    Args:
        d_out: Width of the output vectors.
        n_frequencies: Number of frequencies per coordinate.
    """

    def __init__(self, d_out: int, *, n_frequencies: int = 16) -> None:
        super().__init__()
        if n_frequencies < 1:
            raise ValueError(f"n_frequencies must be >= 1, got {n_frequencies}")
        self.n_frequencies = n_frequencies
        self.proj = nn.Linear(4 * n_frequencies, d_out)

    def frequencies(self, device: torch.device | None = None) -> Tensor:
        """The ``(n_frequencies,)`` float32 frequencies, geometric from 1 to ``n_frequencies``."""
        n = self.n_frequencies
        return torch.logspace(0.0, math.log10(n), n, dtype=torch.float32, device=device)

    def forward(self, xy: Tensor) -> Tensor:
        """Encode positions.

        Args:
            xy: Positions ``(x, y)`` in ``[0, 1]``, shape ``(..., 2)``.

        Returns:
            Shape ``(..., d_out)``.
        """
        if xy.shape[-1] != 2:
            raise ValueError(f"positions must have a last axis of 2, got shape {tuple(xy.shape)}")
        freqs = self.frequencies(xy.device)
        angles = (2.0 * math.pi) * xy.float().unsqueeze(-1) * freqs  # (..., 2, F)
        features = torch.cat([angles.sin(), angles.cos()], dim=-1).flatten(-2)  # (..., 4F)
        out: Tensor = self.proj(features.to(self.proj.weight.dtype))
        return out


class CcafBlock(nn.Module):
    """Pre-norm transformer block over an unordered, padded set of tokens.

    ``x = x + attn(norm1(x)); x = x + mlp(norm2(x))`` with self-attention restricted to real
    tokens, so padding never influences a real token.

    Args:
        dim: Token width ``D``.
        heads: Attention heads; must divide ``dim``.
        mlp_ratio: MLP hidden width as a multiple of ``dim``.
        dropout: Dropout on attention weights and in the MLP (training only).
    """

    def __init__(
        self, dim: int, heads: int, *, mlp_ratio: float = 4.0, dropout: float = 0.0
    ) -> None:
        super().__init__()
        _check_heads(dim, heads)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(*_mlp_layers(dim, mlp_ratio, dropout), nn.Dropout(dropout))

    def forward(
        self, x: Tensor, key_padding_mask: Tensor | None, *, need_weights: bool = False
    ) -> tuple[Tensor, Tensor | None]:
        """Run the block.

        Args:
            x: Tokens, shape ``(B, S, D)``.
            key_padding_mask: ``bool`` ``(B, S)`` in this project's convention, **``True`` =
                real token** (the opposite of torch's argument of the same name), or ``None``
                when every token is real. Every sample needs at least one real token.
            need_weights: Also return the attention map.

        Returns:
            ``(x, weights)``: tokens ``(B, S, D)`` and, if asked, the attention ``(B, S, S)``
            (query rows, key columns) averaged over heads, else ``None``. Columns of padded
            tokens are zero.
        """
        ignore = None if key_padding_mask is None else ~key_padding_mask
        h = self.norm1(x)
        attn_out, weights = self.attn(
            h, h, h, key_padding_mask=ignore, need_weights=need_weights, average_attn_weights=True
        )
        x = x + attn_out
        x = x + self.mlp(self.norm2(x))
        return x, weights


class CellAttentionFusion(nn.Module):
    """Cell-Cell Attention Fusion (CCAF): the nuclei of one patch -> one cellular token.

    A patch holds a variable number of nuclei. A learned ``cls`` token is prepended to the
    nuclei features (plus, optionally, a Fourier encoding of each nucleus centroid), a stack of
    :class:`CcafBlock` lets it gather from the real nuclei only, and its normalised output is
    the patch's cellular token. The CLS token is always a real key, so no attention row is ever
    empty and nothing becomes NaN, even when a patch has no nucleus at all.

    A patch without any real nucleus returns the learned ``no_cells`` token **as is** (no
    norm or projection is applied to it), so "no cells here" is a state the model can learn
    rather than a zero vector it confuses with "average cells".

    Args:
        d_cell: Width of the per-nucleus features and of the output token.
        layers: Number of blocks.
        heads: Attention heads per block; must divide ``d_cell``.
        position_encoding: Add a :class:`FourierPositionEncoding` of the centroids; then
            ``positions`` is required.
        dropout: Dropout inside the blocks (training only).
    """

    def __init__(
        self,
        d_cell: int,
        *,
        layers: int = 2,
        heads: int = 2,
        position_encoding: bool = True,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if layers < 1:
            raise ValueError(f"layers must be >= 1, got {layers}")
        _check_heads(d_cell, heads)
        self.cls = nn.Parameter(torch.zeros(1, 1, d_cell))
        self.pos: FourierPositionEncoding | None = (
            FourierPositionEncoding(d_cell) if position_encoding else None
        )
        self.blocks = nn.ModuleList(
            CcafBlock(d_cell, heads, dropout=dropout) for _ in range(layers)
        )
        self.norm = nn.LayerNorm(d_cell)
        self.no_cells = nn.Parameter(torch.zeros(d_cell))
        nn.init.trunc_normal_(self.cls, std=0.02)
        nn.init.trunc_normal_(self.no_cells, std=0.02)

    def forward(
        self,
        cells: Tensor,
        mask: Tensor,
        positions: Tensor | None = None,
        *,
        need_weights: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """Fuse the nuclei of each patch.

        Args:
            cells: Per-nucleus features, shape ``(P, N, d_cell)``; callers flatten
                ``(B, R, C)`` into ``P``.
            mask: ``bool`` ``(P, N)``, ``True`` = real nucleus.
            positions: Nucleus centroids in ``[0, 1]`` patch coordinates, ``(P, N, 2)``;
                required with ``position_encoding=True``, ignored without.
            need_weights: Also return the CLS->nucleus attention of the last block.

        Returns:
            ``(tokens, weights)``: ``(P, d_cell)`` and, if asked, ``(P, N)`` averaged over
            heads: the CLS query's attention to the nuclei, renormalised over the real nuclei
            (the share the CLS gives to itself is dropped), so each row sums to 1 over real
            nuclei; zero at padded nuclei and for patches with none. An approximate evidence
            signal, not a faithfulness measure.

        Raises:
            ValueError: On shape mismatches, or missing ``positions`` when they are needed.
        """
        if cells.ndim != 3:
            raise ValueError(f"cells must be (P, N, D), got shape {tuple(cells.shape)}")
        p, n, _ = cells.shape
        _check_mask(mask, (p, n), "cell mask")
        keep = mask.unsqueeze(-1)
        zero = torch.zeros((), dtype=cells.dtype, device=cells.device)
        x = torch.where(keep, cells, zero)
        if self.pos is not None:
            if positions is None:
                raise ValueError("this CCAF encodes nucleus positions: pass positions (P, N, 2)")
            if tuple(positions.shape) != (p, n, 2):
                raise ValueError(
                    f"positions have shape {tuple(positions.shape)}, expected {(p, n, 2)}"
                )
            xy = torch.where(
                keep, positions, torch.zeros((), dtype=positions.dtype, device=positions.device)
            )
            x = x + torch.where(keep, self.pos(xy).to(x.dtype), zero)
        x = torch.cat([self.cls.expand(p, -1, -1).to(x.dtype), x], dim=1)  # (P, 1 + N, D)
        real = torch.cat([torch.ones(p, 1, dtype=torch.bool, device=mask.device), mask], dim=1)
        weights: Tensor | None = None
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            x, w = block(x, real, need_weights=need_weights and i == last)
            if w is not None:
                weights = w
        token = self.norm(x[:, 0])
        empty = ~mask.any(dim=1, keepdim=True)  # (P, 1)
        token = torch.where(empty, self.no_cells.to(token.dtype), token)
        if weights is not None:
            to_cells = torch.where(
                mask, weights[:, 0, 1:], torch.zeros((), dtype=weights.dtype, device=weights.device)
            )
            weights = to_cells / to_cells.sum(dim=1, keepdim=True).clamp(
                min=torch.finfo(to_cells.dtype).tiny
            )
        return token, weights


class RegionFusion(nn.Module):
    """Fuse the four scales into one token per region (the released model's fusion).

    Per region, ``[WSI | region | masked-mean of its patches | masked-mean of its cells]``
    (``4D``) goes through ``fuse`` (``LayerNorm(4D) -> Linear(4D, 2D) -> GELU -> Dropout ->
    Linear(2D, D)``), the region token is added back as a residual and ``out_norm`` normalises.
    Attribute names and indices mirror the released keys ``fusion.fuse.{0,1,4}.*`` and
    ``fusion.out_norm.*``. Padded patch/cell slots are excluded from the means and an empty
    region pools to zero, never NaN; padded *regions* are not masked here (the resampler or
    pool downstream ignores them).

    Args:
        dim: Token width ``D`` (all four inputs are already projected to ``D``).
        dropout: Dropout inside ``fuse`` (training only).
    """

    def __init__(self, dim: int, *, dropout: float = 0.1) -> None:
        super().__init__()
        self.fuse = nn.Sequential(
            nn.LayerNorm(4 * dim),
            nn.Linear(4 * dim, 2 * dim),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(2 * dim, dim),
        )
        self.out_norm = nn.LayerNorm(dim)

    def forward(
        self,
        wsi: Tensor,
        region: Tensor,
        patch: Tensor,
        patch_mask: Tensor,
        cell: Tensor,
        cell_mask: Tensor,
    ) -> Tensor:
        """Fuse per region.

        Args:
            wsi: Slide token, ``(B, D)``.
            region: Region tokens, ``(B, R, D)``.
            patch: Patch tokens, ``(B, R, C, D)``.
            patch_mask: ``bool`` ``(B, R, C)``, ``True`` = real patch.
            cell: Cellular tokens (one per patch), ``(B, R, C, D)``.
            cell_mask: ``bool`` ``(B, R, C)``, ``True`` = real cellular token.

        Returns:
            Fused region tokens, ``(B, R, D)``.
        """
        if region.ndim != 3 or wsi.shape != (region.shape[0], region.shape[2]):
            raise ValueError(
                f"wsi {tuple(wsi.shape)} and region {tuple(region.shape)} do not match"
            )
        b, r, d = region.shape
        if (
            patch.ndim != 4
            or patch.shape[:2] != (b, r)
            or patch.shape[3] != d
            or cell.shape != patch.shape
        ):
            raise ValueError(
                f"patch {tuple(patch.shape)} and cell {tuple(cell.shape)} must both be (B, R, C, D)"
                f" with (B, R, D) = {(b, r, d)}"
            )
        pooled_patch = masked_mean(patch, patch_mask, dim=2)
        pooled_cell = masked_mean(cell, cell_mask, dim=2)
        joined = torch.cat(
            [wsi.unsqueeze(1).expand(b, r, d), region, pooled_patch, pooled_cell], dim=-1
        )
        out: Tensor = self.out_norm(self.fuse(joined) + region)
        return out


class QueryResampler(nn.Module):
    """Compress any number of region tokens into ``Q`` visual tokens (the released "compressor").

    ``Q`` learned queries read the fused region tokens through one pre-norm cross-attention
    block plus an MLP, so a slide costs the language model ``Q`` tokens whatever its size.
    Semantics match the released model exactly: only the queries are normalised (``norm1``),
    keys/values are the raw tokens, and there is no final norm::

        q = queries
        z = q + MHA(norm1(q), tokens, tokens, padding ignored)
        z = z + mlp(norm2(z))

    Attribute names mirror the released keys ``compressor.{queries, attn.*, norm1.*, norm2.*,
    mlp.0.*, mlp.3.*}``.

    Args:
        dim: Token width ``D``.
        num_queries: Number of output tokens ``Q``.
        heads: Attention heads; must divide ``dim``.
        mlp_ratio: MLP hidden width as a multiple of ``dim``.
        dropout: Dropout on attention weights and in the MLP (training only).
    """

    def __init__(
        self,
        dim: int,
        *,
        num_queries: int = 64,
        heads: int = 8,
        mlp_ratio: float = 4.0,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        _check_heads(dim, heads)
        if num_queries < 1:
            raise ValueError(f"num_queries must be >= 1, got {num_queries}")
        self.queries = nn.Parameter(torch.zeros(1, num_queries, dim))
        nn.init.trunc_normal_(self.queries, std=0.02)
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        # Exactly Linear, GELU, Dropout, Linear: the released `compressor.mlp.{0,3}` keys.
        self.mlp = nn.Sequential(*_mlp_layers(dim, mlp_ratio, dropout))

    def forward(
        self, tokens: Tensor, mask: Tensor, *, need_weights: bool = False
    ) -> tuple[Tensor, Tensor | None]:
        """Resample.

        Args:
            tokens: Fused region tokens, ``(B, R, D)``.
            mask: ``bool`` ``(B, R)``, ``True`` = real region.
            need_weights: Also return the query->region attention.

        Returns:
            ``(out, weights)``: ``(B, Q, D)`` and, if asked, ``(B, Q, R)`` averaged over heads
            (rows sum to 1 over real regions, zero at padded ones), else ``None``.

        Raises:
            ValueError: If a sample has no real region (attention would return NaN).
        """
        b, r = _check_regions(tokens, mask, "tokens", "nothing for the queries to attend to")
        # Replace padded tokens so NaN/inf padding cannot reach the output through 0 * NaN.
        tokens = torch.where(
            mask.unsqueeze(-1), tokens, torch.zeros((), dtype=tokens.dtype, device=tokens.device)
        )
        ignore = ~mask
        q = self.queries.expand(b, -1, -1).to(tokens.dtype)
        attn_out, weights = self.attn(
            self.norm1(q),
            tokens,
            tokens,
            key_padding_mask=ignore,
            need_weights=need_weights,
            average_attn_weights=True,
        )
        z = q + attn_out
        z = z + self.mlp(self.norm2(z))
        return z, weights


class AttentionPool(nn.Module):
    """Gated attention pooling of region tokens into one slide vector (``wsi_aggregator: attention``).

    A mean treats every region alike; gated attention (a tanh branch times a sigmoid gate,
    scored by one Linear) learns which regions should dominate the slide vector, and its
    weights double as a per-region relevance map.

    Args:
        dim: Token width ``D``.
        hidden: Width of the scoring branches.
    """

    def __init__(self, dim: int, *, hidden: int = 128) -> None:
        super().__init__()
        self.value = nn.Linear(dim, hidden)
        self.gate = nn.Linear(dim, hidden)
        # No bias: softmax ignores a shift shared by all regions, so it could never learn.
        self.score = nn.Linear(hidden, 1, bias=False)

    def forward(self, x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """Pool.

        Args:
            x: Region tokens, ``(B, R, D)``.
            mask: ``bool`` ``(B, R)``, ``True`` = real region.

        Returns:
            ``(pooled, weights)``: ``(B, D)`` and ``(B, R)``, the weights summing to 1 over
            the real regions of each sample and 0 at padded ones.

        Raises:
            ValueError: If a sample has no real region.
        """
        b, r = _check_regions(x, mask, "x", "nothing to pool")
        keep = mask.unsqueeze(-1)
        x = torch.where(keep, x, torch.zeros((), dtype=x.dtype, device=x.device))
        logits = self.score(torch.tanh(self.value(x)) * torch.sigmoid(self.gate(x))).squeeze(-1)
        logits = logits.masked_fill(~mask, float("-inf"))
        weights = torch.softmax(logits, dim=1)
        pooled = (weights.unsqueeze(-1) * x).sum(dim=1)
        return pooled, weights


class AlignmentHead(nn.Module):
    """Map one scale's pooled features into the shared contrastive space.

    ``LayerNorm(d_in) -> Linear(d_in, align_dim)`` then L2 normalisation, so dot products in
    the contrastive loss are cosine similarities; the norm is floored at a small epsilon so a
    zero input gives a zero vector rather than NaN (also in half precision).

    Args:
        d_in: Width of the pooled features.
        align_dim: Width of the shared space.
    """

    def __init__(self, d_in: int, align_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d_in)
        self.proj = nn.Linear(d_in, align_dim)

    def forward(self, x: Tensor) -> Tensor:
        """Embed.

        Args:
            x: Shape ``(..., d_in)``.

        Returns:
            Unit vectors, shape ``(..., align_dim)``.
        """
        return F.normalize(self.proj(self.norm(x)), dim=-1, eps=_NORM_EPS)
