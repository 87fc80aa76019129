"""Configuration of the DyPRAG parameter translator (document embedding → LoRA)."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class TranslatorConfig:
    """DyPRAG settings (the `[translator]` section of a run config)."""

    hidden: int = 32  # p, the MLP width
