"""Resolving an OMERO.web selection to slide pyramids, and how each one's pixels are read."""

from __future__ import annotations

from pathlib import Path

import pytest
from fake_gateway import FakeGateway, FakeImage

from omero_hwsi.errors import InputError
from omero_hwsi.omero.images import pixel_route, resolve_images

CMU = "CMU-1-Small-Region.svs"


def _slide(gw: FakeGateway, source: Path, name: str = CMU) -> tuple[FakeImage, list[FakeImage]]:
    return gw.add_slide(source, name, size=(2220, 2967))


def test_selecting_a_macro_image_resolves_to_its_pyramid_once(fixture_slide):
    gw = FakeGateway()
    pyramid, (label, macro) = _slide(gw, fixture_slide(CMU))

    resolution = resolve_images(gw, "Image", [macro.id, pyramid.id, label.id, macro.id])
    assert [image.id for image in resolution.images] == [pyramid.id]
    image = resolution.images[0]
    assert (image.name, image.group, image.size, image.format) == (CMU, "lab", (2220, 2967),
                                                                   "SVS")
    assert [f.path for f in image.files] == [CMU] and image.can_annotate
    assert resolution.skipped == [
        f"Image {label.id} ({CMU} [label image]): an associated image of a slide, not analysed",
        f"Image {macro.id} ({CMU} [macro image]): an associated image of a slide, not analysed"]


def test_an_unnamed_small_image_of_a_fileset_counts_as_associated(fixture_slide):
    gw = FakeGateway()
    pyramid, _ = gw.add_slide(fixture_slide(CMU), "scan.svs", size=(2220, 2967), associated=())
    tiny = gw.add_image("scan.svs #2", fileset=pyramid.fileset, size=(200, 150))
    resolution = resolve_images(gw, "Image", [tiny.id])
    assert [i.id for i in resolution.images] == [pyramid.id]
    assert resolution.skipped == [f"Image {tiny.id} (scan.svs #2): an associated image of a "
                                  "slide, not analysed"]


def test_datasets_and_projects_resolve_to_each_pyramid_in_order(fixture_slide, tmp_path):
    gw = FakeGateway()
    source = fixture_slide(CMU)
    first, first_assoc = _slide(gw, source, "a.svs")
    second, second_assoc = _slide(gw, source, "b.svs")
    loose = gw.add_image("plain.tif", pixels=None, size=(4000, 3000), format="OME-TIFF")
    one = gw.add_dataset("one", [*first_assoc, first, loose])
    two = gw.add_dataset("two", [second, *second_assoc, first])  # first again: listed once
    empty = gw.add_dataset("empty", [])
    project = gw.add_project("study", [one, two, empty])

    by_dataset = resolve_images(gw, "Dataset", [one.id, two.id, empty.id])
    assert [i.id for i in by_dataset.images] == [first.id, loose.id, second.id]
    assert f"Dataset {empty.id} (empty): holds no images" in by_dataset.skipped
    assert len(by_dataset.skipped) == 1 + 4  # the empty dataset, four associated images
    by_project = resolve_images(gw, "Project", [project.id])
    assert [i.id for i in by_project.images] == [first.id, loose.id, second.id]
    assert by_project.images[1].fileset_id is None and by_project.images[1].files == ()


def test_missing_and_invisible_ids_are_reported(fixture_slide):
    gw = FakeGateway("ana")
    pyramid, _ = _slide(gw, fixture_slide(CMU))
    secret, _ = _slide(gw, fixture_slide(CMU), "secret.svs")
    secret.hidden_from.add("ana")

    resolution = resolve_images(gw, "Image", [999_999, secret.id, pyramid.id])
    assert [i.id for i in resolution.images] == [pyramid.id]
    assert resolution.skipped[:2] == [
        "Image 999999: not found, or not visible to you",
        f"Image {secret.id}: not found, or not visible to you"]
    assert resolve_images(gw, "Project", [5]).skipped == [
        "Project 5: not found, or not visible to you"]
    assert resolve_images(gw, "Dataset", [6]).images == []


@pytest.mark.parametrize(("data_type", "ids", "message"), [
    ("Plate", [1], "Data_Type must be one of Image, Dataset, Project, got 'Plate'"),
    ("image", [1], "Data_Type must be one of Image, Dataset, Project, got 'image'"),
    ("Image", [], "no IDs selected"),
])
def test_bad_selections_are_refused_in_one_line(data_type, ids, message):
    with pytest.raises(InputError) as err:
        resolve_images(FakeGateway(), data_type, ids)
    assert str(err.value) == message


@pytest.mark.parametrize(("files", "reader", "route"), [
    (["CMU-1.svs"], "SVS", "download"),
    (["CMU-1.svs"], None, "download"),  # no reader recorded: the extension decides
    (["slide.mrxs", "slide/Index.dat", "slide/Data0000.dat"], "3DHistech MIRAX", "download"),
    (["slide.ome.tiff"], "OME-TIFF", "pixels"),
    (["slide.ome.tif"], "Tiff", "pixels"),
    (["slide.tif"], "OME-TIFF", "pixels"),   # an OME-TIFF without .ome in its name
    (["slide.tif"], "OMETiff", "pixels"),     # ... as OMERO names that reader
    (["stack.tif"], "Metamorph STK", "pixels"),  # an OpenSlide extension, not its reader
    (["image.czi"], "Zeiss CZI", "pixels"),
])
def test_pixel_route_follows_the_files_and_the_reader(tmp_path, files, reader, route):
    sources = []
    for n, relative in enumerate(files):
        path = tmp_path / f"f{n}"
        path.write_bytes(bytes([n]) * (100 + n))
        sources.append((path, relative))
    gw = FakeGateway()
    image = gw.add_image(Path(files[0]).name, fileset=gw.add_fileset(sources), format=reader)
    (resolved,) = resolve_images(gw, "Image", [image.id]).images
    assert pixel_route(resolved) == route


def test_files_sha256_is_stable_and_follows_the_stored_hashes(fixture_slide):
    gw = FakeGateway()
    pyramid, _ = _slide(gw, fixture_slide(CMU))

    def identity() -> str:
        return resolve_images(gw, "Image", [pyramid.id]).images[0].files_sha256

    first = identity()
    assert len(first) == 64 and identity() == first
    stored = pyramid.fileset.files[0]
    stored.hash = "0" * 40  # the image's file was replaced on the server
    assert identity() != first
