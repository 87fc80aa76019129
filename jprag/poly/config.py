"""Configuration of Poly-PRAG (a shared inventory of latent LoRAs mixed per document)."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class PolyConfig:
    """Poly-PRAG / Poly-z-PRAG settings (the `[poly]` section of a run config)."""

    n_skills: int = 20  # M latent LoRAs in the inventory
    rank: int = 4
