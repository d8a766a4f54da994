"""WSI-Bench readers, exact slide-id matching to feature stores, and the by-slide split."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest

from omero_hwsi.errors import InputError
from omero_hwsi.training.data import (
    DatasetError,
    InstructionSample,
    index_stores,
    match_stores,
    read_samples,
    read_wsibench_test,
    read_wsibench_train,
    split_by_slide,
)

TRAIN = [
    {
        "id": "rec-1",
        "image": "TCGA-A1-0001.svs",
        "conversations": [
            {"from": "human", "value": "<image>\nWhat organ is this?  "},
            {"from": "gpt", "value": " Breast. "},
            {"from": "human", "value": "Is there invasion?"},
            {"from": "gpt", "value": "Yes."},
        ],
    },
    {
        "id": "rec-2",
        "image": "slides/batch-7/TCGA-B2-0042.DX1.svs",
        "conversations": [
            {"from": "human", "value": "Describe the slide. <image>"},
            {"from": "gpt", "value": "A carcinoma."},
        ],
    },
]

TEST_LINES = [
    {"question_id": "TCGA-A1-0001-3", "question": "<image>\nGrade?", "T-answer": "2",
     "metadata": "Classification"},
    {"question_id": "TCGA-A1-0001-12", "question": "Caption it.", "T-answer": "A slide.",
     "metadata": "Caption"},
    {"question_id": "TCGA-99-7-0", "question": "Report?", "T-answer": "Report text.",
     "metadata": "Report"},
]


def write_json(path: Path, obj: Any) -> Path:
    path.write_text(json.dumps(obj), encoding="utf-8")
    return path


def write_jsonl(path: Path, records: list[Any], *, blank_between: bool = False) -> Path:
    sep = "\n\n" if blank_between else "\n"
    path.write_text(sep.join(json.dumps(r) for r in records) + "\n", encoding="utf-8")
    return path


def make_store(root: Path, folder: str, slide_name: str | None, *, sha256: str = "a" * 64,
               key: str = "k1") -> Path:
    """A fake store: a folder with a hand-written manifest (None = incomplete store)."""
    path = root / folder
    path.mkdir(parents=True)
    (path / "zarr.json").write_text("{}", encoding="utf-8")
    if slide_name is not None:
        manifest = {"schema_version": 1, "key": key,
                    "slide": {"name": slide_name, "sha256": sha256, "path": f"/x/{slide_name}"}}
        write_json(path / "manifest.json", manifest)
    return path


def sample(slide_id: str, n: int = 0) -> InstructionSample:
    return InstructionSample(slide_id=slide_id, question=f"q{n}", answer=f"a{n}",
                             record_id=f"{slide_id}-{n}", turn=n)


def assert_one_line_naming(err: pytest.ExceptionInfo[DatasetError], path: Path) -> None:
    message = str(err.value)
    assert "\n" not in message
    assert str(path) in message
    assert isinstance(err.value, InputError) and err.value.exit_code == 2


# --- train format -------------------------------------------------------------------------


def test_train_reads_every_turn_and_strips_the_image_marker(tmp_path: Path) -> None:
    samples = read_wsibench_train(write_json(tmp_path / "train.json", TRAIN))
    assert samples == [
        InstructionSample("TCGA-A1-0001", "What organ is this?", "Breast.", "rec-1", 0),
        InstructionSample("TCGA-A1-0001", "Is there invasion?", "Yes.", "rec-1", 1),
        InstructionSample("TCGA-B2-0042.DX1", "Describe the slide.", "A carcinoma.", "rec-2", 0),
    ]
    assert all("<image>" not in s.question and s.task is None for s in samples)


def test_train_slide_id_is_the_stem_of_the_image_path(tmp_path: Path) -> None:
    records = [
        {**TRAIN[1], "id": 7, "image": "x/y/TCGA-A1-0001.svs"},
        {**TRAIN[1], "id": 8, "image": "TCGA-A1-0001-01Z-00-DX1"},
    ]
    samples = read_wsibench_train(write_json(tmp_path / "train.json", records))
    assert [s.slide_id for s in samples] == ["TCGA-A1-0001", "TCGA-A1-0001-01Z-00-DX1"]
    assert samples[0].record_id == "7"


BAD_TRAIN: dict[str, Any] = {
    "not a list": {"id": "r"},
    "record not an object": ["oops"],
    "missing id": [{"image": "a.svs", "conversations": TRAIN[1]["conversations"]}],
    "missing image": [{"id": "r", "conversations": TRAIN[1]["conversations"]}],
    "image not a string": [{**TRAIN[1], "image": 3}],
    "conversations not a list": [{**TRAIN[1], "conversations": "hi"}],
    "empty conversation": [{**TRAIN[1], "conversations": []}],
    "ends with human": [{**TRAIN[1], "conversations": TRAIN[0]["conversations"][:3]}],
    "starts with gpt": [{**TRAIN[1], "conversations": [{"from": "gpt", "value": "a"},
                                                       {"from": "human", "value": "q"}]}],
    "two humans": [{**TRAIN[1], "conversations": [{"from": "human", "value": "a"},
                                                  {"from": "human", "value": "q"}]}],
    "value not a string": [{**TRAIN[1], "conversations": [{"from": "human", "value": 1},
                                                          {"from": "gpt", "value": "a"}]}],
    "empty question": [{**TRAIN[1], "conversations": [{"from": "human", "value": "<image>\n "},
                                                      {"from": "gpt", "value": "a"}]}],
    "empty answer": [{**TRAIN[1], "conversations": [{"from": "human", "value": "q"},
                                                    {"from": "gpt", "value": "  "}]}],
}


@pytest.mark.parametrize("case", sorted(BAD_TRAIN))
def test_malformed_train_records_fail_in_one_line(tmp_path: Path, case: str) -> None:
    path = write_json(tmp_path / "train.json", BAD_TRAIN[case])
    with pytest.raises(DatasetError) as err:
        read_wsibench_train(path)
    assert_one_line_naming(err, path)
    if isinstance(BAD_TRAIN[case], list):
        assert "record 0" in str(err.value)


def test_bad_record_is_named_by_index_and_id(tmp_path: Path) -> None:
    path = write_json(tmp_path / "train.json", [TRAIN[0], {**TRAIN[1], "id": "bad-7",
                                                           "conversations": []}])
    with pytest.raises(DatasetError, match=r"record 1 \(id 'bad-7'\)"):
        read_wsibench_train(path)


@pytest.mark.parametrize("text", ["{not json", "", "[1, 2"])
def test_train_file_that_is_not_json_fails(tmp_path: Path, text: str) -> None:
    path = tmp_path / "train.json"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(DatasetError) as err:
        read_wsibench_train(path)
    assert_one_line_naming(err, path)


def test_missing_or_binary_file_fails(tmp_path: Path) -> None:
    with pytest.raises(DatasetError) as err:
        read_samples(tmp_path / "absent.json")
    assert_one_line_naming(err, tmp_path / "absent.json")
    binary = tmp_path / "binary.jsonl"
    binary.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(DatasetError) as err:
        read_wsibench_test(binary)
    assert_one_line_naming(err, binary)


# --- test format --------------------------------------------------------------------------


def test_test_format_parses_ids_tasks_and_skips_blank_lines(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "test.jsonl", TEST_LINES, blank_between=True)
    samples = read_wsibench_test(path)
    assert samples == [
        InstructionSample("TCGA-A1-0001", "Grade?", "2", "TCGA-A1-0001-3", 3, "Classification"),
        InstructionSample("TCGA-A1-0001", "Caption it.", "A slide.", "TCGA-A1-0001-12", 12,
                          "Caption"),
        InstructionSample("TCGA-99-7", "Report?", "Report text.", "TCGA-99-7-0", 0, "Report"),
    ]


BAD_TEST: dict[str, str] = {
    "not json": "{oops",
    "not an object": "[1, 2]",
    "missing answer": json.dumps({k: v for k, v in TEST_LINES[0].items() if k != "T-answer"}),
    "metadata not a string": json.dumps({**TEST_LINES[0], "metadata": 3}),
    "no trailing number": json.dumps({**TEST_LINES[0], "question_id": "TCGA_A1_0001"}),
    "trailing letters": json.dumps({**TEST_LINES[0], "question_id": "TCGA-A1-0001-x"}),
    "empty question": json.dumps({**TEST_LINES[0], "question": "<image>\n"}),
}


@pytest.mark.parametrize("case", sorted(BAD_TEST))
def test_bad_test_line_fails_naming_file_and_line(tmp_path: Path, case: str) -> None:
    path = tmp_path / "test.jsonl"
    path.write_text(json.dumps(TEST_LINES[0]) + "\n\n" + BAD_TEST[case] + "\n", encoding="utf-8")
    with pytest.raises(DatasetError) as err:
        read_wsibench_test(path)
    assert_one_line_naming(err, path)
    assert "line 3" in str(err.value)


# --- dispatch -----------------------------------------------------------------------------


def test_read_samples_dispatches_on_content_not_suffix(tmp_path: Path) -> None:
    train = write_json(tmp_path / "data.txt", TRAIN)
    test = write_jsonl(tmp_path / "data.json", TEST_LINES)
    assert read_samples(train) == read_wsibench_train(train)
    assert read_samples(test) == read_wsibench_test(test)
    pretty = tmp_path / "pretty.json"
    pretty.write_text("\n  " + json.dumps(TRAIN, indent=2), encoding="utf-8")
    assert len(read_samples(pretty)) == 3


def test_read_samples_rejects_a_json_object(tmp_path: Path) -> None:
    path = tmp_path / "obj.json"
    path.write_text(json.dumps({"a": 1}, indent=2), encoding="utf-8")
    with pytest.raises(DatasetError) as err:
        read_samples(path)
    assert_one_line_naming(err, path)


# --- stores -------------------------------------------------------------------------------


def test_index_maps_stems_and_ignores_incomplete_stores(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    a = make_store(tmp_path, "s1", "TCGA-A1-0001.svs")
    b = make_store(tmp_path, "s2", "TCGA-A1-00011.svs", sha256="b" * 64)
    make_store(tmp_path, "s3", None)
    (tmp_path / "notes.txt").write_text("not a store", encoding="utf-8")
    with caplog.at_level(logging.INFO, logger="omero_hwsi.training.data"):
        index = index_stores(tmp_path)
    assert index == {"TCGA-A1-0001": a, "TCGA-A1-00011": b}
    assert any("s3" in r.getMessage() and r.levelno == logging.INFO for r in caplog.records)


def test_same_extraction_twice_is_not_ambiguous(tmp_path: Path) -> None:
    a = make_store(tmp_path, "s1", "TCGA-A1-0001.svs")
    make_store(tmp_path, "s2", "TCGA-A1-0001.svs")
    assert index_stores(tmp_path) == {"TCGA-A1-0001": a}


@pytest.mark.parametrize("change", [{"sha256": "c" * 64}, {"key": "k2"}])
def test_ambiguous_stores_are_detected(tmp_path: Path, change: dict[str, str]) -> None:
    a = make_store(tmp_path, "s1", "TCGA-A1-0001.svs")
    b = make_store(tmp_path, "s2", "TCGA-A1-0001.ndpi", **change)
    with pytest.raises(DatasetError) as err:
        index_stores(tmp_path)
    message = str(err.value)
    assert str(a) in message and str(b) in message and "\n" not in message


def test_incomplete_duplicate_is_not_ambiguous(tmp_path: Path) -> None:
    a = make_store(tmp_path, "s1", "TCGA-A1-0001.svs")
    make_store(tmp_path, "s2", None)
    assert index_stores(tmp_path) == {"TCGA-A1-0001": a}


def test_bad_manifest_and_missing_folder_fail(tmp_path: Path) -> None:
    with pytest.raises(DatasetError):
        index_stores(tmp_path / "absent")
    store = make_store(tmp_path, "s1", "x.svs")
    (store / "manifest.json").write_text("{broken", encoding="utf-8")
    with pytest.raises(DatasetError) as err:
        index_stores(tmp_path)
    assert_one_line_naming(err, store / "manifest.json")
    write_json(store / "manifest.json", {"key": "k", "slide": {"sha256": "a"}})
    with pytest.raises(DatasetError, match="slide name"):
        index_stores(tmp_path)


def test_matching_is_exact_never_by_substring(tmp_path: Path) -> None:
    long = make_store(tmp_path, "s2", "TCGA-A1-00011.svs")
    index = index_stores(tmp_path)
    with pytest.raises(DatasetError, match="TCGA-A1-0001") as err:
        match_stores([sample("TCGA-A1-0001")], index)
    assert "TCGA-A1-00011" not in str(err.value)
    # and the other way round: a store whose id is a prefix of the sample's id
    short = make_store(tmp_path, "s1", "TCGA-A1-0001.svs")
    index = index_stores(tmp_path)
    assert match_stores([sample("TCGA-A1-0001"), sample("TCGA-A1-00011")], index) == {
        "TCGA-A1-0001": short, "TCGA-A1-00011": long}
    with pytest.raises(DatasetError, match="TCGA-A1-000"):
        match_stores([sample("TCGA-A1-000")], index)


def test_match_returns_only_the_ids_used(tmp_path: Path) -> None:
    index = {"a": tmp_path / "1", "b": tmp_path / "2"}
    assert match_stores([sample("b"), sample("b", 1)], index) == {"b": tmp_path / "2"}


def test_unmatched_ids_are_listed_sorted_with_sample_counts(tmp_path: Path) -> None:
    samples = [sample("z"), sample("m"), sample("m", 1), sample("ok")]
    with pytest.raises(DatasetError) as err:
        match_stores(samples, {"ok": tmp_path})
    message = str(err.value)
    assert "m, z" in message and "3 of 4 samples" in message and "2 of 3 slide ids" in message
    assert "more" not in message and "\n" not in message


def test_unmatched_listing_is_capped_at_twenty(tmp_path: Path) -> None:
    ids = [f"S-{n:03d}" for n in range(25)]
    with pytest.raises(DatasetError) as err:
        match_stores([sample(i) for i in reversed(ids)], {})
    message = str(err.value)
    assert ", ".join(ids[:20]) + ", ... and 5 more" in message
    assert all(i not in message for i in ids[20:])
    assert "25 of 25 samples" in message


# --- split --------------------------------------------------------------------------------


def _dataset(n_slides: int, per_slide: int = 3) -> list[InstructionSample]:
    return [sample(f"TCGA-{s:02d}", t) for t in range(per_slide) for s in range(n_slides)]


def test_split_keeps_each_slide_on_one_side_and_order() -> None:
    data = _dataset(30)
    train, val = split_by_slide(data, validation_fraction=0.2, seed=1)
    train_ids, val_ids = {s.slide_id for s in train}, {s.slide_id for s in val}
    assert not train_ids & val_ids
    assert len(val_ids) == 6 and len(train) + len(val) == len(data)
    assert train == [s for s in data if s.slide_id in train_ids]
    assert val == [s for s in data if s.slide_id in val_ids]


def test_split_is_deterministic_per_seed_and_differs_across_seeds() -> None:
    data = _dataset(40)
    first = split_by_slide(data, validation_fraction=0.25, seed=3)
    assert split_by_slide(list(reversed(data)), validation_fraction=0.25, seed=3)[1] == list(
        reversed(first[1]))
    assert split_by_slide(data, validation_fraction=0.25, seed=3) == first
    val_sets = {frozenset(s.slide_id for s in split_by_slide(data, validation_fraction=0.25,
                                                               seed=seed)[1])
                for seed in range(5)}
    assert len(val_sets) > 1


def test_split_edge_cases() -> None:
    data = _dataset(5)
    assert split_by_slide(data, validation_fraction=0.0) == (data, [])
    _, val = split_by_slide(data, validation_fraction=0.01)
    assert len({s.slide_id for s in val}) == 1  # at least one slide when fraction > 0
    train, val = split_by_slide(_dataset(2), validation_fraction=0.9)
    assert len({s.slide_id for s in train}) == 1 and len({s.slide_id for s in val}) == 1
    one = _dataset(1)
    assert split_by_slide(one, validation_fraction=0.5) == (one, [])  # never all slides
    assert split_by_slide([], validation_fraction=0.5) == ([], [])


@pytest.mark.parametrize("fraction", [-0.1, 1.0, 1.5, float("nan")])
def test_split_rejects_fractions_outside_unit_interval(fraction: float) -> None:
    with pytest.raises(ValueError):
        split_by_slide(_dataset(4), validation_fraction=fraction)
