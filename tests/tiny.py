"""Tiny, local-only building blocks for model tests: a BPE tokenizer and small configs."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from omero_hwsi.slide.grid import GridSpec

if TYPE_CHECKING:
    from omero_hwsi.model import HwsiForConditionalGeneration, HwsiProcessor

SMALL_GRID = GridSpec(region_px=1024, patch_px=256)
"""The CMU fixture is one 4096 px region at the default grid; this grid gives it several
regions of 16 patches, enough for hierarchical evidence and end-to-end runs."""

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# The assistant turn starts differently from the generation prompt: not prefix-stable.
UNSTABLE_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}: {{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "You are a pathology assistant. Answer from the slide shown.",
    "You are an expert histopathology assistant.",
    "Is there invasive carcinoma in this slide?",
    "Yes, the tumour shows necrosis and many mitoses.",
    "Describe the tissue.",
]


def tiny_tokenizer(chat_template: str | None = CHAT_TEMPLATE) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained in memory: encodes any text, so decode round-trips."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, show_progress=False,
        special_tokens=["<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                   unk_token="<unk>", chat_template=chat_template)


def tiny_text_config(family: str = "llama", *, vocab_size: int = 512, tied: bool = False) -> dict[str, Any]:
    """A 2-layer, 64-wide causal LM config of a given family (no weights downloaded)."""
    return {"model_type": family, "hidden_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 128,
            "vocab_size": vocab_size, "max_position_embeddings": 2048,
            "tie_word_embeddings": tied}


def tiny_model(*, fusion: str = "concat", layout: str = "hwsi", family: str = "llama",
               seed: int = 0, **overrides: Any) -> tuple[HwsiForConditionalGeneration, HwsiProcessor]:
    """A tiny model (eval mode) over the built-in feature dims (patch 32, region 64, cell 11)."""
    import torch

    from omero_hwsi.model import HwsiConfig, HwsiForConditionalGeneration, HwsiProcessor

    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer()
    processor = HwsiProcessor(tokenizer, prompt_layout=layout, fusion_mode=fusion, num_queries=8,
                              token_budget=256)
    config = HwsiConfig(
        text_config=tiny_text_config(family, vocab_size=len(tokenizer)),
        wsi_dim=64, region_dim=64, patch_dim=32, cell_dim=11, ccaf_dim=16, projector_hidden=32,
        fusion_mode=fusion, num_queries=8, resampler_heads=4, token_budget=256,
        prompt_layout=layout, align_dim=16, max_cells=16, **overrides,
    )
    return HwsiForConditionalGeneration(config).eval(), processor


def save_tiny(path: Path, model: HwsiForConditionalGeneration, processor: HwsiProcessor) -> Path:
    """Save model and processor together, as a model folder."""
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path
