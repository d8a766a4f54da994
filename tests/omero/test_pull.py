"""Pulling OMERO images to local disk: fileset downloads and materialized pixels (fake server)."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import numpy as np
import openslide
import pytest
from fake_gateway import FakeGateway, FakeLength, pyramid_from_slide

from omero_hwsi.errors import InputError, MppError, OmeroPermissionError, ServiceError
from omero_hwsi.omero.images import OmeroImage, pixel_route, resolve_images
from omero_hwsi.omero.pull import MARKER, download_fileset, materialize_pixels
from omero_hwsi.slide.local import open_slide

CMU = "CMU-1-Small-Region.svs"
BIG = 1 << 40


def _image(gw: FakeGateway, image_id: int) -> OmeroImage:
    return resolve_images(gw, "Image", [image_id]).images[0]


def _slide_image(gw: FakeGateway, source: Path, name: str = CMU) -> OmeroImage:
    fileset = gw.add_fileset([(source, name)])
    return _image(gw, gw.add_image(name, fileset=fileset, size=(2220, 2967)).id)


def _random_file(path: Path, size: int, seed: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(np.random.default_rng(seed).bytes(size))
    return path


def _served(gw: FakeGateway) -> int:
    return sum(gw.bytes_served.values())


def test_single_file_download_is_byte_identical_and_opens(fixture_slide, tmp_path):
    source = fixture_slide(CMU)
    gw = FakeGateway()
    image = _slide_image(gw, source)
    calls: list[tuple[str, int, int]] = []
    path = download_fileset(gw, image, cache_root=tmp_path / "cache", max_bytes=BIG,
                            progress=lambda *a: calls.append(a), chunk_bytes=256 << 10)

    assert path == tmp_path / "cache" / str(image.fileset_id) / CMU
    assert path.read_bytes() == source.read_bytes()
    assert not list(path.parent.glob("*.part")) and not gw.open_stores
    size = source.stat().st_size
    assert calls[-1] == ("download", size, size)
    assert [done for _, done, _ in calls] == sorted(done for _, done, _ in calls)
    marker = json.loads((path.parent / MARKER).read_text())
    assert marker["files"][0]["verified"] is True and marker["image_id"] == image.id
    with open_slide(path) as slide:
        assert slide.dimensions == (2220, 2967)


def test_a_complete_fileset_is_served_from_the_cache(fixture_slide, tmp_path):
    gw = FakeGateway()
    image = _slide_image(gw, fixture_slide(CMU))
    first = download_fileset(gw, image, cache_root=tmp_path, max_bytes=BIG)
    marker = first.parent / MARKER
    os.utime(marker, (1000, 1000))
    served = _served(gw)

    again = download_fileset(gw, image, cache_root=tmp_path, max_bytes=BIG)
    assert again == first and _served(gw) == served
    assert marker.stat().st_mtime > 1000  # touched: it is the most recently used now


def test_multi_file_layout_is_kept(tmp_path):
    src = tmp_path / "src"
    files = [(_random_file(src / "slide.mrxs", 3000, 1), "slide.mrxs"),
             (_random_file(src / "slide" / "Index.dat", 5000, 2), "slide/Index.dat"),
             (_random_file(src / "slide" / "Data0000.dat", 70000, 3), "slide/Data0000.dat"),
             (_random_file(src / "slide" / "Empty.dat", 0, 4), "slide/Empty.dat")]
    gw = FakeGateway()
    fileset = gw.add_fileset(files)
    image = _image(gw, gw.add_image("slide.mrxs", fileset=fileset, format="MIRAX").id)
    assert pixel_route(image) == "download"

    path = download_fileset(gw, image, cache_root=tmp_path / "cache", max_bytes=BIG)
    assert path == tmp_path / "cache" / str(fileset.id) / "slide.mrxs"
    for source, relative in files:
        assert (path.parent / relative).read_bytes() == source.read_bytes()


def test_an_interrupted_download_resumes_from_the_part_file(fixture_slide, tmp_path):
    source = fixture_slide(CMU)
    size = source.stat().st_size
    gw = FakeGateway()
    image = _slide_image(gw, source)
    gw.fail_reads[image.files[0].id] = size // 2
    chunk = 64 << 10

    with pytest.raises(ServiceError, match="rerun to resume") as err:
        download_fileset(gw, image, cache_root=tmp_path, max_bytes=BIG, chunk_bytes=chunk)
    assert "\n" not in str(err.value)
    part = tmp_path / str(image.fileset_id) / f"{CMU}.part"
    kept = part.stat().st_size
    assert kept == (size // 2) // chunk * chunk and kept > 0
    assert not (part.parent / MARKER).exists() and not gw.open_stores

    gw.bytes_served.clear()
    path = download_fileset(gw, image, cache_root=tmp_path, max_bytes=BIG, chunk_bytes=chunk)
    assert _served(gw) == size - kept
    assert path.read_bytes() == source.read_bytes()


def test_a_hash_mismatch_leaves_nothing_behind(fixture_slide, tmp_path):
    gw = FakeGateway()
    fileset = gw.add_fileset([(fixture_slide(CMU), CMU)])
    fileset.files[0].hash = "0" * 40
    image = _image(gw, gw.add_image(CMU, fileset=fileset).id)

    with pytest.raises(ServiceError, match=f"{CMU}: SHA-1 of the download"):
        download_fileset(gw, image, cache_root=tmp_path, max_bytes=BIG)
    assert list((tmp_path / str(fileset.id)).iterdir()) == []


def test_files_without_a_sha1_are_downloaded_and_marked_unverified(tmp_path):
    gw = FakeGateway()
    fileset = gw.add_fileset([(_random_file(tmp_path / "a.svs", 1000, 4), "a.svs")],
                             hasher="MD5-128")
    image = _image(gw, gw.add_image("a.svs", fileset=fileset).id)
    path = download_fileset(gw, image, cache_root=tmp_path / "cache", max_bytes=BIG)
    marker = json.loads((path.parent / MARKER).read_text())
    assert marker["files"][0] == {**marker["files"][0], "hasher": "MD5-128", "verified": False}


def test_least_recently_used_filesets_are_evicted(tmp_path):
    gw = FakeGateway()
    images = []
    for n in range(3):
        source = _random_file(tmp_path / "src" / f"s{n}.svs", 40_000, n)
        images.append(_image(gw, gw.add_image(source.name, fileset=gw.add_fileset(
            [(source, source.name)])).id))
    cache = tmp_path / "cache"
    a, b, c = images
    pa = download_fileset(gw, a, cache_root=cache, max_bytes=100_000)
    pb = download_fileset(gw, b, cache_root=cache, max_bytes=100_000)
    now = time.time()
    os.utime(pa.parent / MARKER, (now - 100, now - 100))
    os.utime(pb.parent / MARKER, (now - 50, now - 50))
    download_fileset(gw, a, cache_root=cache, max_bytes=100_000)  # a is now the most recent

    pc = download_fileset(gw, c, cache_root=cache, max_bytes=100_000)
    assert pa.exists() and pc.exists() and not pb.parent.exists()


def test_a_fileset_held_by_another_worker_is_not_evicted(tmp_path):
    import fcntl

    gw = FakeGateway()
    a, b = (_image(gw, gw.add_image(f"s{n}.svs", fileset=gw.add_fileset(
        [(_random_file(tmp_path / "src" / f"s{n}.svs", 60_000, n), f"s{n}.svs")])).id)
        for n in range(2))
    cache = tmp_path / "cache"
    pa = download_fileset(gw, a, cache_root=cache, max_bytes=100_000)
    with open(cache / f"{a.fileset_id}.lock", "a+b") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(ServiceError, match="retry later"):
            download_fileset(gw, b, cache_root=cache, max_bytes=100_000)
    assert pa.read_bytes() == (tmp_path / "src" / "s0.svs").read_bytes()


def test_a_fileset_over_the_limit_is_refused(fixture_slide, tmp_path):
    gw = FakeGateway()
    image = _slide_image(gw, fixture_slide(CMU))
    with pytest.raises(InputError, match="HWSI_OMERO_CACHE_MAX_BYTES") as err:
        download_fileset(gw, image, cache_root=tmp_path, max_bytes=1_000_000)
    assert "\n" not in str(err.value) and _served(gw) == 0


def test_two_workers_pulling_one_fileset_share_one_download(fixture_slide, tmp_path):
    source = fixture_slide(CMU)
    gw = FakeGateway()
    gw.read_delay_s = 0.01
    image = _slide_image(gw, source)
    results: list[Path | BaseException] = []

    def pull() -> None:
        try:
            results.append(download_fileset(gw, image, cache_root=tmp_path, max_bytes=BIG,
                                            chunk_bytes=64 << 10))
        except BaseException as err:  # reported by the assertion below
            results.append(err)

    threads = [threading.Thread(target=pull) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 2 and results[0] == results[1], results
    assert Path(results[0]).read_bytes() == source.read_bytes()
    assert _served(gw) == source.stat().st_size  # fetched once; the second waited and reused it


def test_permission_refusal_is_one_line(fixture_slide, tmp_path):
    gw = FakeGateway()
    image = _slide_image(gw, fixture_slide(CMU))
    gw.forbidden_files.add(image.files[0].id)
    with pytest.raises(OmeroPermissionError, match="SecurityViolation"):
        download_fileset(gw, image, cache_root=tmp_path, max_bytes=BIG)
    assert not gw.open_stores


def test_a_path_escaping_the_cache_is_refused(tmp_path):
    gw = FakeGateway()
    fileset = gw.add_fileset([(_random_file(tmp_path / "a.svs", 10, 5), "a.svs"),
                              (_random_file(tmp_path / "b.dat", 10, 6), "b.dat")])
    fileset.files[1].name = "../../evil.dat"
    image = _image(gw, gw.add_image("a.svs", fileset=fileset).id)
    with pytest.raises(ServiceError, match="unsafe path"):
        download_fileset(gw, image, cache_root=tmp_path / "cache", max_bytes=BIG)


# -- materialized pixels ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cmu_levels(fixture_slide):
    return pyramid_from_slide(fixture_slide(CMU))


def _pixels_image(gw: FakeGateway, levels, **pixels_args) -> OmeroImage:
    pixels = gw.add_pixels(levels, tile_size=(200, 150), **pixels_args)
    return _image(gw, gw.add_image("CMU-1.ome.tiff", pixels=pixels, format="OME-TIFF").id)


def test_materialized_pixels_open_as_the_same_slide(cmu_levels, tmp_path):
    gw = FakeGateway()
    image = _pixels_image(gw, cmu_levels)
    assert pixel_route(image) == "pixels"
    calls: list[tuple[str, int, int]] = []
    path = materialize_pixels(gw, image, cache_root=tmp_path, mpp=None,
                              progress=lambda *a: calls.append(a))

    assert path.name == f"pixels-{image.id}-{image.files_sha256[:16]}.svs"
    assert calls[-1][0] == "pixels" and calls[-1][1] == calls[-1][2] and not gw.open_stores
    with open_slide(path) as slide:
        assert slide.dimensions == (2220, 2967)
        assert slide.mpp == pytest.approx(0.499)
        assert slide.level_count == 2
    with openslide.OpenSlide(str(path)) as raw:
        copy = np.asarray(raw.read_region((0, 0), 0, raw.dimensions).convert("RGB"))
    diff = np.abs(copy.astype(np.int16) - cmu_levels[0].astype(np.int16))
    assert diff.mean() < 3

    served = gw.tiles_served
    assert materialize_pixels(gw, image, cache_root=tmp_path, mpp=None) == path
    assert gw.tiles_served == served


def test_missing_pixel_size_needs_mpp(cmu_levels, tmp_path):
    gw = FakeGateway()
    image = _pixels_image(gw, [level[:300, :400] for level in cmu_levels[:1]],
                          physical_size=None)
    with pytest.raises(MppError, match="no pixel size recorded; pass --mpp") as err:
        materialize_pixels(gw, image, cache_root=tmp_path, mpp=None)
    assert "\n" not in str(err.value) and f"OMERO image {image.id}" in str(err.value)

    path = materialize_pixels(gw, image, cache_root=tmp_path, mpp=0.25)
    with open_slide(path) as slide:
        assert slide.mpp == pytest.approx(0.25) and slide.dimensions == (400, 300)


def test_pixel_size_in_other_units_is_converted(cmu_levels, tmp_path):
    gw = FakeGateway()
    image = _pixels_image(gw, [level[:300, :400] for level in cmu_levels[:1]],
                          physical_size=FakeLength(499.0, "NANOMETER"))
    with open_slide(materialize_pixels(gw, image, cache_root=tmp_path, mpp=None)) as slide:
        assert slide.mpp == pytest.approx(0.499)


def test_non_rgb_pixels_are_refused(tmp_path):
    gw = FakeGateway()
    image = _pixels_image(gw, [np.zeros((100, 100, 1), dtype=np.uint16)])
    with pytest.raises(InputError, match="only 8-bit RGB slides are supported") as err:
        materialize_pixels(gw, image, cache_root=tmp_path, mpp=0.5)
    assert "\n" not in str(err.value) and not gw.open_stores
