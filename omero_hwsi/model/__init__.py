"""The MLLM-HWSI model, Hugging Face style: config, model, processor (needs the ``worker`` extra).

Importing this package registers ``mllm_hwsi`` with ``AutoConfig`` and ``AutoModel`` (cheap
registration is the one side effect allowed here). torch and transformers are required: the
base install, which has neither, never imports this package.
"""

from __future__ import annotations

from omero_hwsi._deps import require

require("torch", extra="worker", purpose="the MLLM-HWSI model")
require("transformers", extra="worker", purpose="the MLLM-HWSI model")

from transformers import AutoConfig, AutoModel  # noqa: E402

from omero_hwsi.model.configuration_hwsi import HwsiConfig  # noqa: E402
from omero_hwsi.model.modeling_hwsi import (  # noqa: E402
    HwsiForConditionalGeneration,
    HwsiModel,
    HwsiOutput,
)
from omero_hwsi.model.processing_hwsi import HwsiProcessor  # noqa: E402

AutoConfig.register(HwsiConfig.model_type, HwsiConfig, exist_ok=True)
AutoModel.register(HwsiConfig, HwsiForConditionalGeneration, exist_ok=True)

__all__ = [
    "HwsiConfig",
    "HwsiForConditionalGeneration",
    "HwsiModel",
    "HwsiOutput",
    "HwsiProcessor",
]
