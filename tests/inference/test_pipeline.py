"""HwsiPipeline and `hwsi ask`: tasks, determinism, batching, refusal of mismatched stores."""

from __future__ import annotations

import json

import pytest
import torch
from tiny import save_tiny, tiny_model
from typer.testing import CliRunner

from omero_hwsi.cli import app
from omero_hwsi.errors import FeatureStoreError, InputError
from omero_hwsi.inference import AnalysisResult, Decoding, HwsiPipeline
from omero_hwsi.model.compat import feature_signature
from omero_hwsi.model.losses import TextEncoder
from omero_hwsi.model.processing_hwsi import collate_visual, visual_inputs
from omero_hwsi.model.text_tower import save_text_encoder

SHORT = Decoding(max_new_tokens=6)


@pytest.fixture(scope="module")
def pipeline():
    return HwsiPipeline(*tiny_model())


def test_vqa_is_greedy_reproducible_and_serialisable(pipeline, small_store):
    first = pipeline.ask([small_store], "Is there tumour?", decoding=SHORT, evidence="patch")
    again = pipeline.ask([small_store], "Is there tumour?", decoding=SHORT, evidence="patch")
    result = first[0]
    assert result.answer == again[0].answer
    assert [e.score for e in result.evidence] == pytest.approx([e.score for e in again[0].evidence])
    assert result.decoding["mode"] == "greedy" and result.task == "vqa"
    assert result.model["fusion_mode"] == "concat" and result.model["llm"] == "llama"
    assert result.slide["checksum"] == small_store.provenance["slide"]["sha256"]
    assert "occlusion" in result.evidence_methods and "Research use only" in result.notice
    text = json.dumps(result.to_dict())
    assert AnalysisResult.from_dict(json.loads(text)) == result


def test_batched_slides_give_the_answers_of_single_runs(pipeline, small_store):
    questions = ["Is there tumour?", "Describe the tissue in detail please."]
    batched = pipeline.ask([small_store, small_store], questions, decoding=SHORT, evidence="none",
                           batch_size=2)
    single = [pipeline.ask([small_store], q, decoding=SHORT, evidence="none")[0] for q in questions]
    assert [r.answer for r in batched] == [r.answer for r in single]


def test_report_and_caption_use_default_prompts(pipeline, small_store):
    report = pipeline.ask([small_store], task="report", decoding=SHORT, evidence="none")[0]
    assert report.question.startswith("Write the pathology report")
    with pytest.raises(InputError, match="needs a question"):
        pipeline.ask([small_store], task="vqa")


def test_classify_scores_every_label_by_likelihood(pipeline, small_store):
    labels = ["invasive carcinoma", "normal tissue", "necrosis"]
    result = pipeline.ask([small_store], "What is the diagnosis?", task="classify", labels=labels,
                          evidence="region")[0]
    assert sorted(s.label for s in result.labels) == sorted(labels)
    assert sum(s.probability for s in result.labels) == pytest.approx(1.0)
    assert result.answer == result.labels[0].label
    # Independently: the log-likelihood of each label as the answer, from the LM loss.
    model, processor = pipeline.model, pipeline.processor
    visual = collate_visual([visual_inputs(small_store, max_cells=16)])
    for score in result.labels:
        batch = processor(["What is the diagnosis?"], visual, [score.label], padding_side="right")
        with torch.no_grad():
            loss = model(**batch).loss
        assert score.log_likelihood == pytest.approx(-float(loss) * int((batch["labels"] != -100).sum()),
                                                     abs=1e-3)
    assert {e.level for e in result.evidence} == {"region"}
    with pytest.raises(InputError, match="two distinct"):
        pipeline.ask([small_store], task="classify", labels=["only one"])
    with pytest.raises(InputError, match="labels are for the classify task"):
        pipeline.ask([small_store], "Q?", labels=["a", "b"])


def test_sampling_needs_a_seed_and_a_seed_reproduces(pipeline, small_store):
    with pytest.raises(InputError, match="seed"):
        Decoding(do_sample=True)
    sampled = Decoding(max_new_tokens=6, do_sample=True, seed=7, temperature=1.5)
    a = pipeline.ask([small_store], "Is there tumour?", decoding=sampled, evidence="none")[0]
    b = pipeline.ask([small_store], "Is there tumour?", decoding=sampled, evidence="none")[0]
    assert a.answer == b.answer and a.decoding["seed"] == 7 and a.decoding["mode"] == "sampling"


def test_a_store_made_with_other_encoders_is_refused_in_one_line(small_store):
    expected = feature_signature(small_store.provenance)
    expected["patch"] = {**expected["patch"], "id": "conch_v1", "dim": 512}
    model, processor = tiny_model(expected_features=expected)
    with pytest.raises(FeatureStoreError, match="expects features from patch conch_v1") as err:
        HwsiPipeline(model, processor).ask([small_store], "Q?", evidence="none")
    assert "\n" not in str(err.value)


def test_saved_model_loads_and_retrieves(tmp_path, small_store):
    model, processor = tiny_model()
    folder = save_tiny(tmp_path / "model", model, processor)
    with pytest.raises(InputError, match="cannot retrieve"):
        HwsiPipeline.from_pretrained(folder).retrieve([small_store], ["tumour"])
    save_text_encoder(TextEncoder(len(processor.tokenizer), dim=32, heads=4, align_dim=16), folder)
    loaded = HwsiPipeline.from_pretrained(folder)
    assert loaded.model_info()["path"] == str(folder)
    result = loaded.retrieve([small_store], ["invasive carcinoma", "normal tissue"])
    assert len(result.similarity) == 1 and len(result.similarity[0]) == 2
    assert all(-1 <= x <= 1 for x in result.similarity[0])
    assert result.best_texts(0, 1)[0][1] == max(result.similarity[0])
    single = loaded.ask([small_store], task="retrieve", labels=["invasive carcinoma", "normal tissue"])[0]
    assert [m.similarity for m in single.matches] == sorted(result.similarity[0], reverse=True)
    assert single.answer == single.matches[0].text and single.evidence == []
    assert "no answer likelihood" in single.evidence_notes[0]


def test_hwsi_ask_cli(tmp_path, small_store):
    folder = save_tiny(tmp_path / "model", *tiny_model())
    runner = CliRunner()
    args = ["ask", "--store", str(small_store.path), "--model", str(folder), "-q", "Is there tumour?",
            "--max-new-tokens", "4", "--evidence", "patch"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload[0]["question"] == "Is there tumour?"
    assert {e["level"] for e in payload[0]["evidence"]} == {"region", "patch"}
    out = tmp_path / "answers.json"
    assert runner.invoke(app, [*args, "--out", str(out)]).exit_code == 0
    assert json.loads(out.read_text())[0]["answer"] == payload[0]["answer"]
    bad = runner.invoke(app, [*args[:-1], "nucleus"])
    assert bad.exit_code == 2 and "--evidence must be" in bad.stderr
    missing = runner.invoke(app, ["ask", "--store", str(small_store.path), "--model",
                                  str(tmp_path / "nope"), "-q", "Q?"])
    assert missing.exit_code == 3 and "model folder not found" in missing.stderr
