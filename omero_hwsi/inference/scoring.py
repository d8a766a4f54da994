"""Teacher-forced log-likelihood of an answer, for many visual variants at once.

Classification (each label scored as the answer) and occlusion evidence (the answer scored
with one element of the slide removed) both ask the same question: how likely is this token
sequence given these visual tokens? Visual variants differ in length (removing a region in
``concat`` mode removes its tokens), so instead of re-tokenising each variant the prompt is cut
once at the visual tokens into a text prefix and suffix (:func:`split_prompt`); a variant is
``prefix + its visual tokens + suffix``. That cut comes from
:meth:`HwsiProcessor.encode_prompt`, the same function training and generation use, so scores
see exactly the layout the model was trained on.

Sequences are left-padded, so every answer ends at the last position and only the logits of
the last few positions are computed (``logits_to_keep``): with a 150k-token vocabulary the full
logits of a long visual prefix would dominate memory.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import cast

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel

from omero_hwsi.model.processing_hwsi import IGNORE_INDEX, VISUAL_PLACEHOLDER_ID, HwsiProcessor

__all__ = ["PromptParts", "answer_attention", "answer_log_likelihood", "split_prompt"]


@dataclass(frozen=True, slots=True)
class PromptParts:
    """A prompt (and answer) cut at its visual tokens.

    Attributes:
        prefix: token ids before the visual tokens (empty for the ``released`` layout).
        suffix: token ids after them: the rest of the prompt, then the answer if any.
        labels: one per ``suffix`` id: the id where it is scored, :data:`IGNORE_INDEX` elsewhere.
    """

    prefix: list[int]
    suffix: list[int]
    labels: list[int]

    @property
    def scored(self) -> int:
        """Number of scored tokens."""
        return sum(1 for x in self.labels if x != IGNORE_INDEX)


def split_prompt(processor: HwsiProcessor, question: str, answer: str) -> PromptParts:
    """Encode ``question`` and ``answer`` with the processor and cut at the visual tokens.

    Raises:
        ValueError: the answer encodes to no scored token (e.g. an empty label).
    """
    ids, labels = processor.encode_prompt(question, 1, answer)
    at = ids.index(VISUAL_PLACEHOLDER_ID)
    if any(x != IGNORE_INDEX for x in labels[: at + 1]):  # cannot happen with encode_prompt
        raise RuntimeError("the prompt layout scores tokens before the visual tokens")
    parts = PromptParts(ids[:at], ids[at + 1 :], labels[at + 1 :])
    if parts.scored == 0:
        raise ValueError(f"the answer {answer!r} has no tokens to score")
    return parts


def answer_log_likelihood(
    language_model: PreTrainedModel,
    parts: Sequence[PromptParts],
    visual: Sequence[Tensor],
    *,
    batch_size: int = 16,
) -> Tensor:
    """Summed log-probability of the scored tokens of each ``prefix + visual + suffix``.

    Args:
        language_model: the causal LM (``HwsiForConditionalGeneration.language_model``).
        parts: one :class:`PromptParts` per sequence (or one shared by all).
        visual: one ``(T_v, D)`` tensor of visual tokens per sequence (``T_v`` may be 0).
        batch_size: sequences per forward pass.

    Returns:
        ``(V,)`` float32 log-likelihoods (nats), in the order of ``visual``. Differentiable
        with respect to ``visual`` when grad is enabled.
    """
    if len(parts) not in (1, len(visual)):
        raise ValueError(f"{len(parts)} prompts for {len(visual)} visual variants")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    embed = cast(nn.Embedding, language_model.get_input_embeddings())
    weight = embed.weight
    out: list[Tensor] = []
    for start in range(0, len(visual), batch_size):
        chunk = list(visual[start : start + batch_size])
        chunk_parts = [parts[0] if len(parts) == 1 else parts[start + i] for i in range(len(chunk))]
        out.append(_score_chunk(language_model, embed, weight, chunk_parts, chunk))
    return torch.cat(out) if out else torch.zeros(0)


def _score_chunk(
    language_model: PreTrainedModel, embed: nn.Embedding, weight: Tensor, parts: list[PromptParts],
    visual: list[Tensor],
) -> Tensor:
    device, dtype = weight.device, weight.dtype
    sequences: list[Tensor] = []
    for p, v in zip(parts, visual, strict=True):
        ids = torch.tensor(p.prefix + p.suffix, dtype=torch.long, device=device)
        text = embed(ids)
        n = len(p.prefix)
        sequences.append(torch.cat([text[:n], v.to(device=device, dtype=dtype), text[n:]]))
    length = max(s.shape[0] for s in sequences)
    keep = max(len(p.suffix) for p in parts) + 1
    b, d = len(sequences), weight.shape[1]
    embeds = torch.stack([torch.cat([s.new_zeros(length - s.shape[0], d), s]) for s in sequences])
    mask = torch.zeros(b, length, dtype=torch.long, device=device)
    labels = torch.full((b, length), IGNORE_INDEX, dtype=torch.long, device=device)
    for i, (s, p) in enumerate(zip(sequences, parts, strict=True)):
        mask[i, length - s.shape[0] :] = 1
        labels[i, length - len(p.labels) :] = torch.tensor(p.labels, dtype=torch.long, device=device)
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
    logits = language_model(
        inputs_embeds=embeds, attention_mask=mask, position_ids=positions,
        logits_to_keep=min(keep, length), use_cache=False,
    ).logits  # (B, K, V): positions length-K .. length-1
    k = logits.shape[1]
    # The logit at position t predicts the token at t + 1.
    targets = labels[:, length - k + 1 :]
    predictions = logits[:, :-1].float().log_softmax(dim=-1)
    scored = targets != IGNORE_INDEX
    picked = predictions.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return torch.where(scored, picked, torch.zeros((), device=device)).sum(dim=1)


@contextmanager
def _eager_attention(language_model: PreTrainedModel) -> Iterator[None]:
    """Run the LM with eager attention (the only kind that returns attention maps)."""
    previous = language_model.config._attn_implementation
    language_model.set_attn_implementation("eager")
    try:
        yield
    finally:
        language_model.set_attn_implementation(previous)


def answer_attention(language_model: PreTrainedModel, parts: PromptParts, visual: Tensor) -> Tensor:
    """How much the answer attends to each visual token: ``(T,)``, summing to at most 1.

    The last layer's attention, averaged over heads and over the positions that predict the
    scored answer tokens, read at the visual-token columns. An approximate signal (attention is
    not attribution), reported as such.
    """
    embed = cast(nn.Embedding, language_model.get_input_embeddings())
    weight = embed.weight
    ids = torch.tensor(parts.prefix + parts.suffix, dtype=torch.long, device=weight.device)
    text = embed(ids)
    n, t = len(parts.prefix), visual.shape[0]
    sequence = torch.cat([text[:n], visual.to(device=weight.device, dtype=weight.dtype), text[n:]])
    with _eager_attention(language_model):
        out = language_model(inputs_embeds=sequence[None], output_attentions=True, use_cache=False,
                             logits_to_keep=1)
    attention = out.attentions[-1][0].float().mean(dim=0)  # (L, L), heads averaged
    rows = [n + t + i - 1 for i, label in enumerate(parts.labels) if label != IGNORE_INDEX]
    flow: Tensor = attention[rows, n : n + t].mean(dim=0)
    return flow
