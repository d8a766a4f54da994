"""End to end: two held-out synthetic slides, extracted, scored with the embedded demo model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from omero_hwsi.evaluation.run import METRICS_FILE, PREDICTIONS_FILE, parse_choices


def test_parse_choices_reads_inline_options():
    choices = parse_choices("Where is the necrosis? A) upper left B) lower right C) upper right "
                            "D) lower left")
    assert choices is not None
    assert choices.stem == "Where is the necrosis?"
    assert choices.options == ("A) upper left", "B) lower right", "C) upper right", "D) lower left")
    assert choices.texts[1] == "lower right"
    assert parse_choices("Describe the tissue in the upper left region.") is None
    # A lone letter is not a list of options, and letters must run from A.
    assert parse_choices("Is plan B) good?") is None
    assert parse_choices("Pick: B) x C) y") is None


@pytest.fixture(scope="module")
def benchmark(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    from omero_hwsi.features.extract import ExtractionConfig, extract_slide
    from omero_hwsi.synthetic import DEMO_GRID
    from omero_hwsi.synthetic.dataset import generate_dataset

    root = tmp_path_factory.mktemp("bench")
    generate_dataset(root / "data", n_slides=2, seed=5, split="test")
    for slide in sorted((root / "data" / "slides").glob("*.svs")):
        extract_slide(slide, root / "stores", grid=DEMO_GRID, config=ExtractionConfig(workers=0))
    return root / "data" / "test.jsonl", root / "stores", root / "data" / "truth"


def _unit(value: float | None) -> bool:
    return value is not None and 0.0 <= value <= 1.0


@pytest.mark.slow  # about 60 s on two cores: generation of 8 open answers dominates
def test_evaluate_demo_model(benchmark: tuple[Path, Path, Path], tmp_path: Path):
    from omero_hwsi.analysis import default_model
    from omero_hwsi.evaluation import evaluate

    test_file, stores, truth = benchmark
    stages: set[str] = set()
    result = evaluate(test_file, stores, default_model(), ground_truth=truth, out_dir=tmp_path,
                      progress=lambda stage, done, total: stages.add(stage))
    n_rows = sum(1 for line in test_file.read_text().splitlines() if line.strip())
    assert result["n_questions"] == n_rows and result["n_slides"] == 2
    assert stages >= {"closed", "open", "pointing"}

    closed = result["closed"]
    assert closed["n"] > 0
    for key in ("accuracy", "blind_accuracy", "chance"):
        assert _unit(closed[key]), key
    assert set(closed["by_family"]) >= {"Classification", "Morphology"}
    assert "diagnosis" in closed["by_template"]
    assert _unit(closed["diagnosis_balanced_accuracy"])
    assert _unit(closed["diagnosis_blind_balanced_accuracy"])

    texts = result["open"]["all"]
    assert texts["n"] == n_rows - closed["n"]
    for order in range(1, 5):
        assert 0.0 <= texts[f"bleu{order}"] <= 100.0
    assert _unit(texts["rouge_l"]) and _unit(texts["meteor_exact_stem"])
    assert "template:report" in result["open"]
    findings = result["open"]["findings"]
    assert findings["n"] == 2 and _unit(findings["recall"])
    assert findings["truth"] == "ground-truth regions"

    retrieval = result["retrieval"]  # the demo model has a text tower
    assert retrieval["n"] == 2 and _unit(retrieval["recall@1"]) and retrieval["recall@5"] == 1.0

    pointing = result["pointing_game"]
    assert pointing["n"] > 0 and _unit(pointing["hit_rate"]) and 0.0 < pointing["chance"] <= 1.0

    on_disk = json.loads((tmp_path / METRICS_FILE).read_text())
    assert on_disk["closed"] == closed
    lines = [json.loads(x) for x in (tmp_path / PREDICTIONS_FILE).read_text().splitlines()]
    assert len(lines) == n_rows
    for line in lines:
        assert "prediction" in line
        if line["kind"] == "closed":
            assert line["prediction"] in line["options"]
            assert line["blind_prediction"] in line["options"]
    assert any("pointing" in line for line in lines)


def test_cli_evaluate_limit(benchmark: tuple[Path, Path, Path], tmp_path: Path):
    from typer.testing import CliRunner

    from omero_hwsi.analysis import default_model
    from omero_hwsi.cli import app

    test_file, stores, _ = benchmark
    out = tmp_path / "eval"
    run = CliRunner().invoke(app, ["evaluate", "--benchmark", str(test_file), "--stores",
                                   str(stores), "--model", str(default_model()), "--out", str(out),
                                   "--limit", "1"])
    assert run.exit_code == 0, run.output
    assert run.stdout.strip().splitlines()[-1] == str(out / METRICS_FILE)
    metrics = json.loads((out / METRICS_FILE).read_text())
    assert metrics["n_slides"] == 1 and metrics["limit"] == 1
    assert "skipped" in metrics["retrieval"]  # one slide: nothing to rank against
    assert metrics["open"]["findings"]["truth"] == "classes named in the reference report"


def test_cli_evaluate_missing_stores(benchmark: tuple[Path, Path, Path], tmp_path: Path):
    from typer.testing import CliRunner

    from omero_hwsi.analysis import default_model
    from omero_hwsi.cli import app

    test_file, _, _ = benchmark
    (tmp_path / "empty").mkdir()
    run = CliRunner().invoke(app, ["evaluate", "--benchmark", str(test_file), "--stores",
                                   str(tmp_path / "empty"), "--model", str(default_model()),
                                   "--out", str(tmp_path / "o")])
    assert run.exit_code == 2
    assert "no complete feature store" in run.output
