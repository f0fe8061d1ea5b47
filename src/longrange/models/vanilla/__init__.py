"""``vanilla``: exact causal attention (SDPA) with rotary positions; the baseline."""

from longrange.models.registry import register_family
from longrange.models.vanilla.config import (
    PRESETS,
    VanillaConfig,
    vanilla_bench,
    vanilla_small,
    vanilla_tiny,
)
from longrange.models.vanilla.model import VanillaBlock, VanillaLM

register_family(
    "vanilla",
    VanillaConfig,
    VanillaLM,
    PRESETS,
    description="exact causal attention (SDPA), rotary positions; the baseline",
)

EXPORTS = ("VanillaConfig", "VanillaLM")
__all__ = ["VanillaBlock", "VanillaConfig", "VanillaLM", "vanilla_bench", "vanilla_small", "vanilla_tiny"]
