"""Small shared type aliases; private so the public surface stays in the packages."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, TypeAlias

import numpy as np
import numpy.typing as npt

Scale: TypeAlias = Literal["cell", "patch", "region", "wsi"]
"""One of the model's four scales, finest first."""

Box: TypeAlias = tuple[float, float, float, float]
"""``(x, y, w, h)`` in level-0 pixels, origin top-left."""

RGBArray: TypeAlias = npt.NDArray[np.uint8]
"""An RGB picture, shape ``(H, W, 3)``, or a batch ``(B, H, W, 3)``."""

FloatArray: TypeAlias = npt.NDArray[np.float32]

ProgressFn: TypeAlias = Callable[[str, int, int], None]
"""Called as ``progress(stage, done, total)`` by long stages; adapters draw bars or send states."""
