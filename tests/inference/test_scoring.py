"""Teacher-forced answer likelihoods: equal to the LM loss, independent of batching and padding."""

from __future__ import annotations

import pytest
import torch
from tiny import tiny_model

from omero_hwsi.inference.scoring import answer_log_likelihood, split_prompt
from omero_hwsi.model.processing_hwsi import collate_visual, visual_inputs


@pytest.mark.parametrize(("fusion", "layout"), [("concat", "hwsi"), ("resampler", "released")])
def test_log_likelihood_equals_the_lm_loss_of_the_same_prompt(small_store, fusion, layout):
    model, processor = tiny_model(fusion=fusion, layout=layout)
    visual = collate_visual([visual_inputs(small_store, max_cells=16)])
    question, answer = "Is there tumour?", "Yes, the tumour shows necrosis."
    batch = processor([question], visual, [answer], padding_side="right")
    with torch.no_grad():
        loss = model(**batch).loss  # mean over the scored tokens
        tokens = model.model(**visual)
        parts = split_prompt(processor, question, answer)
        ll = answer_log_likelihood(model.language_model, [parts],
                                   [tokens.visual_tokens[0][tokens.visual_mask[0]]])
    scored = int((batch["labels"] != -100).sum())
    assert parts.scored == scored
    torch.testing.assert_close(ll[0], -loss * scored, rtol=1e-4, atol=1e-4)


def test_scores_do_not_depend_on_batch_composition_or_padding(small_store):
    model, processor = tiny_model()
    parts = [split_prompt(processor, "Is there tumour?", "Yes."),
             split_prompt(processor, "Describe the tissue.", "Pink stroma with many mitoses.")]
    torch.manual_seed(1)
    visual = [torch.randn(3, 64), torch.randn(11, 64), torch.zeros(0, 64)]
    with torch.no_grad():
        alone = torch.stack([
            answer_log_likelihood(model.language_model, [p], [v])[0]
            for p, v in zip([parts[0], parts[1], parts[0]], visual, strict=True)
        ])
        together = answer_log_likelihood(model.language_model, [parts[0], parts[1], parts[0]],
                                         visual, batch_size=3)
        chunked = answer_log_likelihood(model.language_model, [parts[0], parts[1], parts[0]],
                                        visual, batch_size=2)
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(chunked, alone, rtol=1e-4, atol=1e-4)


def test_scores_are_differentiable_in_the_visual_tokens():
    model, processor = tiny_model()
    parts = split_prompt(processor, "Is there tumour?", "Yes.")
    visual = torch.randn(4, 64, requires_grad=True)
    ll = answer_log_likelihood(model.language_model, [parts], [visual])
    (grad,) = torch.autograd.grad(ll.sum(), [visual])
    assert grad.abs().sum() > 0


def test_mismatched_prompt_count_and_empty_answers_are_refused():
    model, processor = tiny_model()
    parts = split_prompt(processor, "Is there tumour?", "Yes.")
    with pytest.raises(ValueError, match="prompts for"):
        answer_log_likelihood(model.language_model, [parts, parts], [torch.zeros(0, 64)] * 3)
    assert split_prompt(processor, "Is there tumour?", "").scored >= 1  # end-of-turn is scored
