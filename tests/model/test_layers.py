"""Model building blocks: shapes, key names, masking, empty inputs and a reference resampler."""

from __future__ import annotations

from collections.abc import Callable

import pytest

torch = pytest.importorskip("torch")

import torch.nn.functional as F  # noqa: E402
from torch import Tensor, nn  # noqa: E402

from omero_hwsi.model.layers import (  # noqa: E402
    AlignmentHead,
    AttentionPool,
    CcafBlock,
    CellAttentionFusion,
    FourierPositionEncoding,
    QueryResampler,
    RegionFusion,
    ScaleProjector,
    masked_mean,
)

D = 16


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape: int, seed: int = 0) -> Tensor:
    return torch.randn(*shape, generator=_gen(seed))


def _garbage(x: Tensor, mask: Tensor, seed: int = 99) -> Tensor:
    """``x`` with every masked slot (mask has x's shape less the last axis) set to large noise."""
    noise = 1e4 * torch.randn(x.shape, generator=_gen(seed))
    return torch.where(mask.unsqueeze(-1), x, noise)


def _cell_inputs(p: int = 5, n: int = 7) -> tuple[Tensor, Tensor, Tensor]:
    cells = _randn(p, n, D, seed=1)
    positions = torch.rand(p, n, 2, generator=_gen(2))
    counts = torch.tensor([7, 3, 0, 1, 5])[:p]
    mask = torch.arange(n).unsqueeze(0) < counts.unsqueeze(1)
    return cells, mask, positions


def _region_inputs(b: int = 2, r: int = 3, c: int = 4) -> dict[str, Tensor]:
    patch_mask = torch.rand(b, r, c, generator=_gen(3)) > 0.3
    patch_mask[0, 0] = False  # a region with no patch at all
    cell_mask = patch_mask & (torch.rand(b, r, c, generator=_gen(4)) > 0.3)
    return {
        "wsi": _randn(b, D, seed=5),
        "region": _randn(b, r, D, seed=6),
        "patch": _randn(b, r, c, D, seed=7),
        "patch_mask": patch_mask,
        "cell": _randn(b, r, c, D, seed=8),
        "cell_mask": cell_mask,
    }


# ---------------------------------------------------------------- projector and encodings


def test_scale_projector_shape_and_released_key_names() -> None:
    proj = ScaleProjector(12, D, hidden=8)
    assert proj(_randn(2, 3, 12)).shape == (2, 3, D)
    keys = set(proj.state_dict())
    assert keys == {f"net.{i}.{p}" for i in (0, 1, 4) for p in ("weight", "bias")}
    assert proj.state_dict()["net.1.weight"].shape == (8, 12)
    assert proj.state_dict()["net.4.weight"].shape == (D, 8)
    assert isinstance(proj.net[2], nn.GELU) and isinstance(proj.net[3], nn.Dropout)
    bare = ScaleProjector(12, D, hidden=8, layernorm=False)
    assert isinstance(bare.net[0], nn.Identity)
    assert not any(k.startswith("net.0.") for k in bare.state_dict())


def test_fourier_position_encoding() -> None:
    enc = FourierPositionEncoding(D, n_frequencies=4)
    xy = torch.rand(3, 5, 2, generator=_gen())
    assert enc(xy).shape == (3, 5, D)
    assert set(enc.state_dict()) == {"proj.weight", "proj.bias"}  # frequencies are derived
    freqs = enc.frequencies()
    assert freqs.shape == (4,) and freqs[0] == 1.0 and torch.isclose(freqs[-1], torch.tensor(4.0))
    assert torch.allclose(freqs[1:] / freqs[:-1], freqs[1:2].expand(3))  # geometric
    half = FourierPositionEncoding(D, n_frequencies=4).to(torch.bfloat16)
    half.load_state_dict(enc.state_dict())
    assert half(xy).dtype == torch.bfloat16
    assert torch.allclose(half(xy).float(), enc(xy), atol=0.1)
    assert not torch.allclose(enc(xy[:, :1]), enc(xy[:, 1:2]))
    with pytest.raises(ValueError):
        enc(torch.zeros(3, 3))


def test_masked_mean() -> None:
    x = _randn(2, 3, D)
    mask = torch.tensor([[True, False, True], [False, False, False]])
    out = masked_mean(_garbage(x, mask), mask, dim=1)
    assert torch.allclose(out[0], (x[0, 0] + x[0, 2]) / 2)
    assert torch.equal(out[1], torch.zeros(D))
    assert torch.equal(masked_mean(x, mask, dim=-2), masked_mean(x, mask, dim=1))
    nan = torch.where(mask.unsqueeze(-1), x, torch.full_like(x, float("nan")))
    assert torch.isfinite(masked_mean(nan, mask, dim=1)).all()
    with pytest.raises(ValueError):
        masked_mean(x, mask, dim=2)  # the feature axis
    with pytest.raises(ValueError):
        masked_mean(x, mask[:, :2], dim=1)


# ---------------------------------------------------------------- CCAF


def test_ccaf_block_shapes_and_weights() -> None:
    block = CcafBlock(D, 2).eval()
    x = _randn(2, 5, D)
    real = torch.tensor([[True] * 5, [True, True, False, False, False]])
    out, w = block(x, real, need_weights=True)
    assert out.shape == (2, 5, D) and w is not None and w.shape == (2, 5, 5)
    assert torch.allclose(w.sum(-1), torch.ones(2, 5))
    assert torch.equal(w[1, :, 2:], torch.zeros(5, 3))
    out2, none = block(_garbage(x, real), real)
    assert none is None
    assert torch.allclose(out2[1, :2], out[1, :2], atol=1e-5)
    assert block(x, None)[0].shape == (2, 5, D)


def test_ccaf_shapes_weights_and_empty_patch() -> None:
    ccaf = CellAttentionFusion(D).eval()
    cells, mask, positions = _cell_inputs()
    tokens, w = ccaf(cells, mask, positions, need_weights=True)
    assert tokens.shape == (5, D) and w is not None and w.shape == (5, 7)
    assert torch.isfinite(tokens).all() and torch.isfinite(w).all()
    real = mask.any(1)
    assert torch.allclose(w[real].sum(1), torch.ones(int(real.sum())), atol=1e-6)
    assert torch.equal(w[~mask], torch.zeros(int((~mask).sum())))
    # Patch 2 has no nucleus: exactly the learned token (returned as is, no norm applied).
    assert torch.equal(tokens[2], ccaf.no_cells.detach())
    assert torch.equal(w[2], torch.zeros(7))
    assert ccaf(cells, mask, positions)[1] is None
    with torch.no_grad():  # the inference path (torch may take its fused attention kernel)
        assert torch.allclose(ccaf(cells, mask, positions)[0], tokens, atol=1e-5)


def test_ccaf_all_cells_masked_is_finite_with_finite_grads() -> None:
    ccaf = CellAttentionFusion(D)
    cells = _randn(3, 4, D).requires_grad_(True)
    mask = torch.zeros(3, 4, dtype=torch.bool)
    tokens, w = ccaf(cells, mask, torch.rand(3, 4, 2, generator=_gen()), need_weights=True)
    assert torch.equal(tokens, ccaf.no_cells.detach().expand(3, D))
    assert w is not None and torch.equal(w, torch.zeros(3, 4))
    (tokens * _randn(3, D)).sum().backward()
    for param in ccaf.parameters():
        assert param.grad is None or torch.isfinite(param.grad).all()
    assert cells.grad is not None and torch.isfinite(cells.grad).all()


def test_ccaf_masked_cells_change_nothing() -> None:
    ccaf = CellAttentionFusion(D).eval()
    cells, mask, positions = _cell_inputs()
    ref, w_ref = ccaf(cells, mask, positions, need_weights=True)
    dirty_pos = torch.where(mask.unsqueeze(-1), positions, torch.full_like(positions, 1e3))
    nan_cells = torch.where(mask.unsqueeze(-1), cells, torch.full_like(cells, float("nan")))
    for dirty in (_garbage(cells, mask), nan_cells):
        out, w = ccaf(dirty, mask, dirty_pos, need_weights=True)
        assert w is not None and w_ref is not None
        assert torch.allclose(out, ref, atol=1e-5)
        assert torch.allclose(w, w_ref, atol=1e-6)


def test_ccaf_is_permutation_invariant_over_cells() -> None:
    ccaf = CellAttentionFusion(D).eval()
    cells, mask, positions = _cell_inputs()
    ref, w_ref = ccaf(cells, mask, positions, need_weights=True)
    perm = torch.randperm(7, generator=_gen(11))
    out, w = ccaf(cells[:, perm], mask[:, perm], positions[:, perm], need_weights=True)
    assert w is not None and w_ref is not None
    assert torch.allclose(out, ref, atol=1e-5)
    assert torch.allclose(w, w_ref[:, perm], atol=1e-6)


def test_ccaf_positions_matter_and_are_required() -> None:
    ccaf = CellAttentionFusion(D).eval()
    cells, mask, positions = _cell_inputs()
    with pytest.raises(ValueError, match="positions"):
        ccaf(cells, mask)
    moved = ccaf(cells, mask, positions.flip(-1))[0]
    assert not torch.allclose(moved[0], ccaf(cells, mask, positions)[0][0])
    plain = CellAttentionFusion(D, position_encoding=False, layers=1).eval()
    assert plain(cells, mask)[0].shape == (5, D)
    assert not any(k.startswith("pos.") for k in plain.state_dict())


# ---------------------------------------------------------------- fusion and resampler


def test_region_fusion_shapes_keys_and_masking() -> None:
    fusion = RegionFusion(D).eval()
    inputs = _region_inputs()
    ref = fusion(**inputs)
    assert ref.shape == (2, 3, D) and torch.isfinite(ref).all()
    keys = set(fusion.state_dict())
    assert keys == {f"fuse.{i}.{p}" for i in (0, 1, 4) for p in ("weight", "bias")} | {
        "out_norm.weight",
        "out_norm.bias",
    }
    assert fusion.fuse[1].weight.shape == (2 * D, 4 * D)
    assert fusion.fuse[4].weight.shape == (D, 2 * D)
    dirty = dict(inputs)
    dirty["patch"] = _garbage(inputs["patch"], inputs["patch_mask"], seed=21)
    dirty["cell"] = _garbage(inputs["cell"], inputs["cell_mask"], seed=22)
    assert torch.allclose(fusion(**dirty), ref, atol=1e-5)


def test_region_fusion_matches_its_definition() -> None:
    fusion = RegionFusion(D).eval()
    inputs = _region_inputs()
    pm, cm = inputs["patch_mask"].unsqueeze(-1).float(), inputs["cell_mask"].unsqueeze(-1).float()
    pooled_p = (inputs["patch"] * pm).sum(2) / pm.sum(2).clamp(min=1)
    pooled_c = (inputs["cell"] * cm).sum(2) / cm.sum(2).clamp(min=1)
    assert torch.equal(pooled_p[0, 0], torch.zeros(D))  # the empty region pools to 0
    wsi = inputs["wsi"].unsqueeze(1).expand(-1, 3, -1)
    joined = torch.cat([wsi, inputs["region"], pooled_p, pooled_c], dim=-1)
    expected = fusion.out_norm(fusion.fuse(joined) + inputs["region"])
    assert torch.allclose(fusion(**inputs), expected, atol=1e-5)


def _reference_resampler(m: QueryResampler, tokens: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """The released compressor's forward, written out with plain tensor ops."""
    b, r, d = tokens.shape
    heads = m.attn.num_heads
    hd = d // heads
    q0 = m.queries.expand(b, -1, -1)
    qn = F.layer_norm(q0, (d,), m.norm1.weight, m.norm1.bias, m.norm1.eps)
    w_q, w_k, w_v = m.attn.in_proj_weight.split(d)
    b_q, b_k, b_v = m.attn.in_proj_bias.split(d)

    def heads_of(t: Tensor) -> Tensor:
        return t.reshape(b, -1, heads, hd).transpose(1, 2)  # (B, H, S, hd)

    q = heads_of(qn @ w_q.T + b_q)
    k = heads_of(tokens @ w_k.T + b_k)
    v = heads_of(tokens @ w_v.T + b_v)
    scores = (q @ k.transpose(-1, -2)) / hd**0.5
    scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    attn = scores.softmax(-1)  # (B, H, Q, R)
    ctx = (attn @ v).transpose(1, 2).reshape(b, -1, d)
    attn_out = ctx @ m.attn.out_proj.weight.T + m.attn.out_proj.bias
    z = q0 + attn_out
    zn = F.layer_norm(z, (d,), m.norm2.weight, m.norm2.bias, m.norm2.eps)
    hidden = F.gelu(zn @ m.mlp[0].weight.T + m.mlp[0].bias)
    z = z + hidden @ m.mlp[3].weight.T + m.mlp[3].bias
    return z, attn.mean(1)


def test_resampler_matches_reference_and_ignores_padding() -> None:
    res = QueryResampler(D, num_queries=5, heads=4).eval()
    tokens = _randn(2, 6, D, seed=31)
    mask = torch.tensor([[True] * 6, [True, False, True, False, False, False]])
    out, w = res(tokens, mask, need_weights=True)
    assert out.shape == (2, 5, D) and w is not None and w.shape == (2, 5, 6)
    with torch.no_grad():
        exp_out, exp_w = _reference_resampler(res, tokens, mask)
    assert torch.allclose(out, exp_out, atol=1e-5)
    assert torch.allclose(w, exp_w, atol=1e-5)
    assert torch.allclose(w.sum(-1), torch.ones(2, 5))
    assert torch.equal(w[1][:, ~mask[1]], torch.zeros(5, 4))
    no_w, none = res(tokens, mask)
    assert none is None and torch.allclose(no_w, out, atol=1e-5)
    assert torch.allclose(res(_garbage(tokens, mask), mask)[0], out, atol=1e-5)
    keys = set(res.state_dict())
    assert {"queries", "attn.in_proj_weight", "attn.out_proj.weight", "norm1.weight"} <= keys
    assert {"mlp.0.weight", "mlp.3.weight"} <= keys and res.mlp[0].weight.shape == (4 * D, D)


def test_resampler_rejects_a_sample_without_regions() -> None:
    res = QueryResampler(D, num_queries=3, heads=2)
    mask = torch.tensor([[True, False], [False, False]])
    with pytest.raises(ValueError, match=r"\[1\]"):
        res(_randn(2, 2, D), mask)


# ---------------------------------------------------------------- pooling and alignment


def test_attention_pool() -> None:
    pool = AttentionPool(D, hidden=8).eval()
    x = _randn(3, 4, D, seed=41)
    mask = torch.tensor([[True] * 4, [True, False, True, False], [False, False, False, True]])
    pooled, w = pool(x, mask)
    assert pooled.shape == (3, D) and w.shape == (3, 4)
    assert torch.allclose(w.sum(1), torch.ones(3))
    assert torch.equal(w[~mask], torch.zeros(int((~mask).sum())))
    assert torch.allclose(pooled[2], x[2, 3], atol=1e-6)  # one real region takes all the weight
    assert torch.allclose(pooled, (w.unsqueeze(-1) * x).sum(1), atol=1e-6)
    dirty_pooled, dirty_w = pool(_garbage(x, mask), mask)
    assert torch.allclose(dirty_pooled, pooled, atol=1e-6) and torch.allclose(dirty_w, w)
    with pytest.raises(ValueError):
        pool(x, torch.zeros(3, 4, dtype=torch.bool))


def test_alignment_head_is_unit_norm() -> None:
    head = AlignmentHead(D, 8)
    out = head(_randn(2, 3, D))
    assert out.shape == (2, 3, 8)
    assert torch.allclose(out.norm(dim=-1), torch.ones(2, 3), atol=1e-5)


# ---------------------------------------------------------------- gradients and determinism


def _ccaf_run(m: nn.Module) -> Tensor:
    cells, mask, positions = _cell_inputs()
    out: Tensor = m(cells, mask, positions, need_weights=True)[0]
    return out


_CASES: dict[str, tuple[Callable[[], nn.Module], Callable[[nn.Module], Tensor]]] = {
    "projector": (lambda: ScaleProjector(12, D, hidden=8), lambda m: m(_randn(3, 12))),
    "fourier": (
        lambda: FourierPositionEncoding(D, n_frequencies=3),
        lambda m: m(torch.rand(4, 2, generator=_gen())),
    ),
    "ccaf_block": (
        lambda: CcafBlock(D, 2, dropout=0.1),
        lambda m: m(_randn(2, 5, D), torch.tensor([[True] * 5, [True, False] * 2 + [True]]))[0],
    ),
    "ccaf": (lambda: CellAttentionFusion(D, dropout=0.1), _ccaf_run),
    "fusion": (lambda: RegionFusion(D), lambda m: m(**_region_inputs())),
    "resampler": (
        lambda: QueryResampler(D, num_queries=3, heads=4),
        lambda m: m(_randn(2, 4, D), torch.tensor([[True] * 4, [True, True, False, False]]))[0],
    ),
    "pool": (
        lambda: AttentionPool(D, hidden=8),
        lambda m: m(_randn(2, 4, D), torch.tensor([[True] * 4, [True, True, False, False]]))[0],
    ),
    "align": (lambda: AlignmentHead(D, 8), lambda m: m(_randn(3, D))),
}


@pytest.mark.parametrize("name", sorted(_CASES))
def test_gradients_reach_every_parameter(name: str) -> None:
    build, run = _CASES[name]
    torch.manual_seed(0)
    module = build().train()
    out = run(module)
    # A random weighting: a plain sum after a LayerNorm has zero gradient by construction.
    (out * torch.randn(out.shape, generator=_gen(51))).sum().backward()
    for pname, param in module.named_parameters():
        assert param.grad is not None, pname
        assert torch.isfinite(param.grad).all(), pname
        assert param.grad.abs().sum() > 0, pname


@pytest.mark.parametrize("name", sorted(_CASES))
def test_eval_mode_is_deterministic(name: str) -> None:
    build, run = _CASES[name]
    torch.manual_seed(0)
    module = build().eval()
    assert torch.equal(run(module), run(module))
