"""Encoder registry and the built-in ``hed_texture`` / ``layout`` encoders."""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from omero_hwsi.errors import UnknownEncoderError
from omero_hwsi.features import registry
from omero_hwsi.features.encoders import (
    HED_FEATURE_NAMES,
    PROTOTYPE_NAMES,
    HedTextureEncoder,
    LayoutEncoder,
    builtin,
    wsi_vector,
)
from omero_hwsi.features.registry import (
    PatchEncoder,
    RegionEncoder,
    create_encoder,
    is_encoder,
    list_encoders,
    register_encoder,
)

# ---------------------------------------------------------------------------------------
# Test pictures, drawn in RGB independently of the encoder's own renderer
# ---------------------------------------------------------------------------------------


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _nuclear_rich(seed: int) -> np.ndarray:
    """Pale pink cytoplasm crowded with dark purple round nuclei."""
    rng = np.random.default_rng(seed)
    img = np.zeros((256, 256, 3)) + np.array([215.0, 170.0, 215.0])
    yy, xx = np.mgrid[:256, :256]
    for _ in range(90):
        cy, cx = rng.uniform(0, 256, 2)
        r = rng.uniform(7, 13)
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = (85.0, 60.0, 150.0)
    img += rng.normal(0, 4, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def _pink_stroma(seed: int) -> np.ndarray:
    """Pink collagen with fibrous streaks and no nuclei."""
    rng = np.random.default_rng(seed)
    streak = ndimage.gaussian_filter(rng.normal(0, 1, (256, 256)), (1, 10)) * 4
    img = np.array([236.0, 150.0, 205.0]) + streak[..., None] * np.array([4.0, 25.0, 12.0])
    img += rng.normal(0, 3, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def _uniform(value: int) -> np.ndarray:
    return np.full((256, 256, 3), value, np.uint8)


# ---------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------


def test_builtins_are_registered_and_listed_by_scale() -> None:
    assert {"hed_texture", "layout"} <= set(list_encoders())
    assert "hed_texture" in list_encoders("patch")
    assert "layout" not in list_encoders("patch")
    assert "layout" in list_encoders("region")
    assert "hed_texture" not in list_encoders("region")
    assert list_encoders() == sorted(list_encoders())
    assert is_encoder("hed_texture") and is_encoder("layout")
    assert not is_encoder("no-such-encoder")
    with pytest.raises(ValueError, match="scale"):
        list_encoders("cell")


def test_unknown_encoder_message_lists_known_names() -> None:
    with pytest.raises(UnknownEncoderError) as info:
        create_encoder("nope")
    err = info.value
    message = err.args[0]
    assert message.startswith("unknown encoder 'nope'; known: ")
    assert "hed_texture" in message and "layout" in message
    assert "\n" not in str(err)
    assert isinstance(err, KeyError)  # callers may catch it as a lookup failure
    assert err.exit_code == 3


def test_create_returns_protocol_instances() -> None:
    patch = create_encoder("hed_texture")
    region = create_encoder("layout")
    assert isinstance(patch, PatchEncoder) and isinstance(patch, HedTextureEncoder)
    assert isinstance(region, RegionEncoder) and isinstance(region, LayoutEncoder)
    assert (patch.encoder_id, patch.version, patch.dim) == (
        "hed_texture",
        "1",
        len(HED_FEATURE_NAMES),
    )
    assert (patch.mpp, patch.patch_px, patch.scale, patch.has_text_tower) == (
        0.5,
        256,
        "patch",
        False,
    )
    assert (region.encoder_id, region.version, region.dim, region.scale) == (
        "layout",
        "1",
        64,
        "region",
    )
    assert 24 <= patch.dim <= 40


def test_register_custom_encoder_and_refuse_a_clash() -> None:
    class Dummy:
        encoder_id = "test_dummy_enc"
        version = "0"
        dim = 2
        scale = "region"

        def __init__(self, offset: float = 0.0) -> None:
            self.offset = offset

        def encode(self, pictures: np.ndarray, tissue: np.ndarray) -> np.ndarray:
            return np.full((len(pictures), 2), self.offset, np.float32)

    def factory(**kwargs: object) -> Dummy:  # a plain function: scale learnt on creation
        return Dummy(**kwargs)  # type: ignore[arg-type]

    try:
        assert register_encoder("test_dummy_enc")(factory) is factory
        assert "test_dummy_enc" in list_encoders()
        assert "test_dummy_enc" not in list_encoders("region")  # scale not known yet
        enc = create_encoder("test_dummy_enc", offset=1.5)
        assert enc.offset == 1.5  # type: ignore[union-attr]
        assert "test_dummy_enc" in list_encoders("region")

        def other(**kwargs: object) -> Dummy:
            return Dummy()

        with pytest.raises(ValueError, match="already registered"):
            register_encoder("test_dummy_enc")(other)
        with pytest.raises(ValueError):
            register_encoder("bad name")
        with pytest.raises(ValueError):
            register_encoder("x", scale="cell")  # type: ignore[arg-type]
    finally:
        registry._REGISTRY.pop("test_dummy_enc", None)
    assert not is_encoder("test_dummy_enc")


def test_factory_returning_a_non_encoder_is_refused() -> None:
    try:
        register_encoder("test_not_an_encoder")(lambda: object())
        with pytest.raises(TypeError, match="test_not_an_encoder"):
            create_encoder("test_not_an_encoder")
    finally:
        registry._REGISTRY.pop("test_not_an_encoder", None)


def test_modules_do_not_import_torch() -> None:
    code = (
        "import sys\n"
        "from omero_hwsi.features.registry import create_encoder, list_encoders\n"
        "import numpy as np\n"
        "e = create_encoder('hed_texture')  # built-ins register without importing them\n"
        "import omero_hwsi.features.selection, omero_hwsi.features.encoders\n"
        "e.encode(np.zeros((1, 256, 256, 3), np.uint8)); e.query_bank()\n"
        "create_encoder('layout')\n"
        "assert list_encoders('patch')\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "print('ok')\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"


def test_encoders_give_the_same_bits_in_a_single_threaded_worker(tmp_path: Path) -> None:
    # Extraction compares stores made in-process and by worker processes bit for bit, and
    # workers may run with one BLAS/OpenCV thread: outputs must not depend on threading.
    rng = np.random.default_rng(7)
    patches = np.stack([_nuclear_rich(30), _pink_stroma(31)])
    pictures = rng.integers(120, 256, (3, 64, 64, 3), dtype=np.uint8)
    tissue = rng.random((3, 16, 16)).astype(np.float32)
    np.save(tmp_path / "patches.npy", patches)
    np.save(tmp_path / "pictures.npy", pictures)
    np.save(tmp_path / "tissue.npy", tissue)
    code = (
        "import sys, numpy as np, cv2\n"
        "cv2.setNumThreads(1)\n"
        "from omero_hwsi.features.registry import create_encoder\n"
        "d = sys.argv[1]\n"
        "z = create_encoder('hed_texture').encode(np.load(d + '/patches.npy'))\n"
        "r = create_encoder('layout').encode(np.load(d + '/pictures.npy'), np.load(d + '/tissue.npy'))\n"
        "np.save(d + '/z.npy', z); np.save(d + '/r.npy', r)\n"
    )
    env = {
        **os.environ,
        "OPENBLAS_NUM_THREADS": "1",
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }
    proc = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)],
        check=False, capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    here_z = create_encoder("hed_texture").encode(patches)
    here_r = create_encoder("layout").encode(pictures, tissue)  # type: ignore[call-arg]
    np.testing.assert_array_equal(np.load(tmp_path / "z.npy"), here_z)
    np.testing.assert_array_equal(np.load(tmp_path / "r.npy"), here_r)


# ---------------------------------------------------------------------------------------
# hed_texture
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hed() -> HedTextureEncoder:
    enc = create_encoder("hed_texture")
    assert isinstance(enc, HedTextureEncoder)
    return enc


def test_hed_shape_dtype_and_determinism(hed: HedTextureEncoder) -> None:
    batch = np.stack([_nuclear_rich(0), _pink_stroma(1), _nuclear_rich(2)])
    a = hed.encode(batch)
    b = hed.encode(batch.copy())
    assert a.shape == (3, hed.dim) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    # Same answer one by one as in a batch (the batch is processed in chunks).
    for i in range(3):
        np.testing.assert_allclose(hed.encode(batch[i : i + 1])[0], a[i], rtol=1e-5, atol=1e-5)
    assert hed.encode(np.zeros((0, 256, 256, 3), np.uint8)).shape == (0, hed.dim)


def test_hed_batch_larger_than_a_chunk_matches_single(hed: HedTextureEncoder) -> None:
    patches = np.stack([_nuclear_rich(i) if i % 2 else _pink_stroma(i) for i in range(5)])
    batch = hed.encode(patches)
    single = np.concatenate([hed.encode(p[None]) for p in patches])
    np.testing.assert_allclose(batch, single, rtol=1e-5, atol=1e-5)


def test_hed_results_survive_later_calls_and_threads(hed: HedTextureEncoder) -> None:
    # Scratch buffers are reused between calls and kept per thread: results must not
    # alias them, and concurrent threads must not disturb each other.
    a_in, b_in = _nuclear_rich(40)[None], _pink_stroma(41)[None]
    a = hed.encode(a_in)
    a_copy = a.copy()
    hed.encode(b_in)
    np.testing.assert_array_equal(a, a_copy)
    batches = [
        np.stack([_nuclear_rich(50 + i), _pink_stroma(60 + i), _uniform(200 + i)]) for i in range(4)
    ]
    serial = [hed.encode(x) for x in batches]
    with ThreadPoolExecutor(4) as pool:
        for _ in range(3):
            threaded = list(pool.map(hed.encode, batches))
            for got, want in zip(threaded, serial, strict=True):
                np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize(
    "bad",
    [
        np.zeros((1, 256, 256, 3), np.float32),
        np.zeros((256, 256, 3), np.uint8),
        np.zeros((1, 128, 128, 3), np.uint8),
        np.zeros((1, 256, 256, 4), np.uint8),
        [[0]],
    ],
)
def test_hed_validates_input(hed: HedTextureEncoder, bad: object) -> None:
    with pytest.raises(ValueError):
        hed.encode(bad)  # type: ignore[arg-type]


def test_hed_no_nan_on_degenerate_patches(hed: HedTextureEncoder) -> None:
    batch = np.stack([_uniform(255), _uniform(0), _uniform(128), _uniform(240)])
    z = hed.encode(batch)
    assert np.all(np.isfinite(z))
    assert np.all(np.abs(z) <= 6.0)
    raw = builtin.hed_descriptor_raw(batch)
    names = list(HED_FEATURE_NAMES)
    assert raw[0, names.index("background_frac")] == 1.0  # white is all background
    assert raw[1, names.index("background_frac")] == 0.0
    assert raw[0, names.index("nuclear_frac")] == 0.0
    assert raw[:, names.index("grad1_mean")].max() == 0.0  # flat: no texture


def test_hed_histograms_are_fractions() -> None:
    raw = builtin.hed_descriptor_raw(np.stack([_nuclear_rich(3), _pink_stroma(4), _uniform(255)]))
    names = list(HED_FEATURE_NAMES)
    for stain in ("h", "e"):
        cols = [names.index(f"{stain}_hist_{i}") for i in range(4)]
        np.testing.assert_allclose(raw[:, cols].sum(axis=1), 1.0, atol=1e-6)
        assert raw[:, cols].min() >= 0.0


def test_hed_separates_nuclear_from_stroma(hed: HedTextureEncoder) -> None:
    z = hed.encode(
        np.stack([_nuclear_rich(10), _pink_stroma(11), _pink_stroma(12), _nuclear_rich(13)])
    )
    assert _cos(z[0], z[1]) < 0.5
    assert _cos(z[0], z[2]) < 0.5
    assert _cos(z[1], z[2]) > 0.8
    assert _cos(z[0], z[3]) > 0.8
    raw = builtin.hed_descriptor_raw(np.stack([_nuclear_rich(10), _pink_stroma(11)]))
    names = list(HED_FEATURE_NAMES)
    assert raw[0, names.index("h_mean")] > raw[1, names.index("h_mean")]
    assert raw[0, names.index("nuclear_frac")] > 0.2 > raw[1, names.index("nuclear_frac")]


def test_query_bank(hed: HedTextureEncoder) -> None:
    names, bank = hed.query_bank()
    assert names == PROTOTYPE_NAMES
    assert isinstance(names, tuple) and len(set(names)) == len(names) >= 6
    for expected in ("nuclear-dense (tumour-like)", "eosinophilic stroma", "adipose-like sparse"):
        assert expected in names
    assert bank.shape == (len(names), hed.dim) and bank.dtype == np.float32
    assert np.all(np.isfinite(bank))
    assert hed.query_bank()[1] is bank  # computed once
    assert not bank.flags.writeable
    unit = bank / np.linalg.norm(bank, axis=1, keepdims=True)
    sims = unit @ unit.T
    assert sims[~np.eye(len(names), dtype=bool)].max() < 0.95  # prototypes are distinct


def test_query_bank_ranks_nuclear_patch_as_nuclear(hed: HedTextureEncoder) -> None:
    names, bank = hed.query_bank()
    z = hed.encode(_nuclear_rich(20)[None])[0]
    sims = {n: _cos(z, v) for n, v in zip(names, bank, strict=True)}
    nuclear = max(sims["nuclear-dense (tumour-like)"], sims["lymphocyte-dense small dark nuclei"])
    assert nuclear > sims["eosinophilic stroma"]
    assert nuclear > sims["adipose-like sparse"]


def test_prototypes_are_reproducible_from_their_recipes(hed: HedTextureEncoder) -> None:
    _, bank = hed.query_bank()
    seed = builtin._PROTOTYPE_SEED
    again = hed.encode(builtin._render_patch(builtin._PROTOTYPES[0][1], seed=seed)[None])
    np.testing.assert_allclose(again[0], bank[0], rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_standardisation_constants_match_their_derivation() -> None:
    centre, scale = builtin._reference_statistics()
    np.testing.assert_allclose(builtin._HED_CENTRE, centre, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(builtin._HED_SCALE, scale, rtol=1e-4, atol=1e-6)
    # Standardised reference descriptors are centred with unit spread, as documented.
    assert np.all(scale > 0)


# ---------------------------------------------------------------------------------------
# layout
# ---------------------------------------------------------------------------------------


def _region(left: bool) -> tuple[np.ndarray, np.ndarray]:
    """A 64 px region picture with purple tissue on the left or right half, and its grid."""
    picture = np.full((64, 64, 3), 255, np.uint8)
    tissue = np.zeros((16, 16), np.float32)
    if left:
        picture[:, :32] = (150, 90, 170)
        tissue[:, :8] = 1.0
    else:
        picture[:, 32:] = (150, 90, 170)
        tissue[:, 8:] = 1.0
    return picture, tissue


def test_layout_shape_and_position_sensitivity() -> None:
    enc = create_encoder("layout")
    (pl, tl), (pr, tr) = _region(True), _region(False)
    out = enc.encode(np.stack([pl, pr]), np.stack([tl, tr]))  # type: ignore[call-arg]
    assert out.shape == (2, 64) and out.dtype == np.float32
    assert np.all(np.isfinite(out))
    assert not np.allclose(out[0], out[1])  # moving tissue changes the vector...
    cells = out.reshape(2, 16, 4)
    np.testing.assert_allclose(
        cells[0].mean(axis=0), cells[1].mean(axis=0), atol=1e-6
    )  # ...not the mean
    grid = out.reshape(2, 4, 4, 4)
    assert np.all(grid[0, :, :2, 3] == 1.0) and np.all(grid[0, :, 2:, 3] == 0.0)
    assert np.all(grid[0, :, :2, 0] > grid[0, :, 2:, 0])  # haematoxylin where the tissue is


def test_layout_row_major_cell_order() -> None:
    enc = create_encoder("layout")
    picture = np.full((1, 64, 64, 3), 255, np.uint8)
    tissue = np.zeros((1, 16, 16), np.float32)
    tissue[0, 0:4, 12:16] = 1.0  # top-right cell: row 0, column 3
    out = enc.encode(picture, tissue)  # type: ignore[call-arg]
    tissue_dims = np.flatnonzero(out[0] > 0)
    assert tissue_dims.tolist() == [0 * 16 + 3 * 4 + 3]


def test_layout_white_region_is_zero_od() -> None:
    enc = create_encoder("layout")
    out = enc.encode(np.full((1, 64, 64, 3), 255, np.uint8), np.zeros((1, 16, 16)))  # type: ignore[call-arg]
    np.testing.assert_allclose(out, 0.0, atol=1e-6)


def test_layout_accepts_smaller_regions() -> None:
    # A 4 x 4-patch region (16 px picture): each patch is one cell, still 64 dims.
    enc = create_encoder("layout")
    picture = np.full((1, 16, 16, 3), 255, np.uint8)
    picture[0, :4, :4] = (150, 90, 170)
    tissue = np.zeros((1, 4, 4), np.float32)
    tissue[0, 0, 0] = 0.8
    out = enc.encode(picture, tissue).reshape(4, 4, 4)  # type: ignore[call-arg]
    assert out[0, 0, 3] == pytest.approx(0.8) and out[0, 0, 0] > 0
    assert np.all(out.reshape(16, 4)[1:] == 0)


@pytest.mark.parametrize(
    ("pictures", "tissue"),
    [
        (np.zeros((1, 64, 64, 3), np.float32), np.zeros((1, 16, 16))),
        (np.zeros((1, 30, 30, 3), np.uint8), np.zeros((1, 16, 16))),
        (np.zeros((1, 64, 32, 3), np.uint8), np.zeros((1, 16, 16))),
        (np.zeros((64, 64, 3), np.uint8), np.zeros((1, 16, 16))),
        (np.zeros((1, 64, 64, 3), np.uint8), np.zeros((1, 6, 6))),
        (np.zeros((1, 64, 64, 3), np.uint8), np.zeros((1, 16, 8))),
        (np.zeros((1, 64, 64, 3), np.uint8), np.zeros((16, 16))),
        (np.zeros((2, 64, 64, 3), np.uint8), np.zeros((1, 16, 16))),
        (np.zeros((1, 64, 64, 3), np.uint8), np.full((1, 16, 16), 1.5)),
        (np.zeros((1, 64, 64, 3), np.uint8), np.full((1, 16, 16), np.nan)),
    ],
)
def test_layout_validates_input(pictures: np.ndarray, tissue: np.ndarray) -> None:
    with pytest.raises(ValueError):
        LayoutEncoder().encode(pictures, tissue)


# ---------------------------------------------------------------------------------------
# wsi_vector
# ---------------------------------------------------------------------------------------


def test_wsi_vector_mean_and_weights() -> None:
    regions = np.array([[1.0, 2.0], [3.0, 6.0]], np.float32)
    np.testing.assert_allclose(wsi_vector(regions), [2.0, 4.0])
    np.testing.assert_allclose(wsi_vector(regions, np.array([3.0, 1.0])), [1.5, 3.0])
    assert wsi_vector(regions).dtype == np.float32 and wsi_vector(regions).shape == (2,)
    with pytest.raises(ValueError, match="zero regions"):
        wsi_vector(np.zeros((0, 2), np.float32))
    for weights in ([1.0], [0.0, 0.0], [-1.0, 2.0], [np.nan, 1.0]):
        with pytest.raises(ValueError):
            wsi_vector(regions, np.array(weights))
    with pytest.raises(ValueError):
        wsi_vector(np.zeros(3, np.float32))
