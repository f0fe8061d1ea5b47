"""``routing``: the Routing Transformer (k-means routed attention, strictly causal, plus local
heads); the reference ``routing_transformer`` package's names live in :mod:`.compat`."""

from longrange.models.registry import register_family
from longrange.models.routing.compat import (
    Autopadder,
    AutoregressiveWrapper,
    RoutingTransformer,
    RoutingTransformerEncDec,
    RoutingTransformerLM,
)
from longrange.models.routing.config import (
    PRESETS,
    RoutingConfig,
    routing_bench,
    routing_small,
    routing_tiny,
)
from longrange.models.routing.convert import convert_reference
from longrange.models.routing.layers import ACTIVATIONS, AttentionCache, Branch, SelfAttention
from longrange.models.routing.model import RoutingBody, RoutingLM
from longrange.models.routing.routed import (
    ContextCache,
    KmeansAttention,
    KmeansUpdateHandle,
    RoutedCache,
    update_kmeans,
)

register_family(
    "routing",
    RoutingConfig,
    RoutingLM,
    PRESETS,
    description="Routing Transformer: k-means routed attention (strictly causal) + local heads",
)

EXPORTS = (
    "RoutingConfig",
    "RoutingLM",
    "RoutingTransformerLM",
    "RoutingTransformer",
    "RoutingTransformerEncDec",
    "KmeansAttention",
)
__all__ = [
    "ACTIVATIONS",
    "AttentionCache",
    "Autopadder",
    "AutoregressiveWrapper",
    "Branch",
    "ContextCache",
    "KmeansAttention",
    "KmeansUpdateHandle",
    "RoutedCache",
    "RoutingBody",
    "RoutingConfig",
    "RoutingLM",
    "RoutingTransformer",
    "RoutingTransformerEncDec",
    "RoutingTransformerLM",
    "SelfAttention",
    "convert_reference",
    "routing_bench",
    "routing_small",
    "routing_tiny",
    "update_kmeans",
]
