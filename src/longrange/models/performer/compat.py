"""``performer_pytorch``'s public classes on longrange's Performer.

``PerformerLM``, ``Performer`` and ``PerformerEncDec`` take the reference's keywords and
defaults (``PerformerLM`` is non-causal by default, as there), each through one
:class:`~longrange.models.keywords.KeywordTable` parsed into a
:class:`~longrange.models.performer.config.PerformerConfig`; longrange-only options
(``chunk_size``, ``attn_backend``, ``feature_eps``, ...) are accepted as extra keywords.
``kernel_fn`` may be any module or callable. ``AutoregressiveWrapper`` is the shared wrapper
with the reference's defaults (``ignore_index=0``, ``pad_value=0``); a cross-attending
decoder samples incrementally on its context like any conditioning.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from longrange.models.autoregressive import AutoregressiveWrapper as _SharedWrapper
from longrange.models.encdec import EncoderDecoder
from longrange.models.keywords import KeywordTable
from longrange.models.performer.config import PerformerConfig
from longrange.models.performer.fast_attention import resolve_kernel_fn
from longrange.models.performer.model import PerformerBody, PerformerModel

EXTRA_KEYWORDS = (
    "ortho_scaling",
    "chunk_size",
    "attn_backend",
    "feature_eps",
    "kernel_eps",
    "recompute_attention",
)
# the keywords the LM and the stack share, with the LM's defaults
_COMMON: dict[str, Any] = dict(
    local_attn_heads=0, local_window_size=256, causal=False, ff_mult=4, nb_features=None,
    feature_redraw_interval=1000, reversible=False, ff_chunks=1, ff_glu=False, ff_dropout=0.0,
    attn_dropout=0.0, generalized_attention=False, use_scalenorm=False, use_rezero=False,
    cross_attend=False, no_projection=False, auto_check_redraw=True, qkv_bias=False,
    attn_out_bias=False, shift_tokens=False,
)  # fmt: skip
LM_KEYWORDS = KeywordTable(
    "PerformerLM",
    defaults=dict(
        dim_head=64, **_COMMON, emb_dropout=0.0, tie_embed=False, rotary_position_emb=True,
        axial_position_emb=False, axial_position_shape=None,
    ),
    required=("num_tokens", "max_seq_len", "dim", "depth", "heads"),
    renames={"num_tokens": "vocab_size"},
    extras=EXTRA_KEYWORDS,
)  # fmt: skip
# the reference's stack defaults its projections' biases to True (the LM's are False)
STACK_KEYWORDS = KeywordTable(
    "Performer",
    defaults={**_COMMON, "qkv_bias": True, "attn_out_bias": True},
    required=("dim", "depth", "heads", "dim_head"),
    extras=EXTRA_KEYWORDS,
)


def _config(table: KeywordTable, given: dict[str, Any], kernel_fn: Any, **fixed: Any):
    """(config, the custom kernel function or None) for the reference keywords ``given``."""
    fields = table.parse(given)
    if not fields["generalized_attention"] and isinstance(kernel_fn, nn.ReLU):
        kernel_fn = None  # the reference's default, unused without generalized attention
    name, fn = resolve_kernel_fn(kernel_fn)
    if kernel_fn is not None and not fields["generalized_attention"]:
        raise ValueError("kernel_fn is used only with generalized_attention=True")
    config = PerformerConfig(kernel_fn=name, **fields, **fixed)
    return config, (fn if name == "custom" else None)


class PerformerLM(PerformerModel):
    """``performer_pytorch.PerformerLM(num_tokens=, max_seq_len=, dim=, depth=, heads=, ...)``
    (or a :class:`PerformerConfig`): forward(x, return_encodings=False, mask=None,
    context=None, context_mask=None) -> logits [B, N, num_tokens] (or encodings)."""

    def __init__(self, config: PerformerConfig | None = None, /, *, kernel_fn: Any = None, **kwargs: Any):
        if config is not None:
            if not isinstance(config, PerformerConfig):
                raise TypeError(f"config must be a PerformerConfig, got {type(config).__name__}")
            super().__init__(config, kernel_fn=kernel_fn)
            return
        config, fn = _config(LM_KEYWORDS, kwargs, kernel_fn)
        super().__init__(config, kernel_fn=fn)

    def forward(
        self,
        x: Tensor,
        return_encodings: bool = False,
        mask: Tensor | None = None,
        context: Tensor | None = None,
        context_mask: Tensor | None = None,
    ) -> Tensor:
        return self.run(
            x, mask=mask, context=context, context_mask=context_mask, return_encodings=return_encodings
        )


class Performer(PerformerBody):
    """``performer_pytorch.Performer(dim, depth, heads, dim_head, ...)``: the block stack,
    x [B, N, dim] -> [B, N, dim]; forward(x, pos_emb=None, mask=None, context=None,
    context_mask=None). The reference's stack defaults ``qkv_bias`` and ``attn_out_bias``
    to True."""

    def __init__(
        self, dim: int, depth: int, heads: int, dim_head: int, *, kernel_fn: Any = None, **kwargs: Any
    ):
        given = dict(dim=dim, depth=depth, heads=heads, dim_head=dim_head, **kwargs)
        config, fn = _config(STACK_KEYWORDS, given, kernel_fn, rotary_position_emb=False)
        super().__init__(config, kernel_fn=fn)


class AutoregressiveWrapper(_SharedWrapper):
    """The shared wrapper with ``performer_pytorch``'s defaults (``ignore_index=0``)."""

    def __init__(self, net: nn.Module, ignore_index: int = 0, pad_value: int = 0) -> None:
        super().__init__(net, ignore_index=ignore_index, pad_value=pad_value)


class PerformerEncDec(EncoderDecoder):
    """``performer_pytorch.PerformerEncDec``: an encoder PerformerLM and a causal,
    cross-attending decoder PerformerLM (keywords prefixed ``enc_`` / ``dec_``).

    forward(seq_in, seq_out, enc_mask=None, **kwargs) -> the decoder's next-token loss;
    generate(seq_in, seq_out_start, seq_len, **kwargs) -> new tokens.
    """

    wrapper_class = AutoregressiveWrapper
    fixed_decoder_keys = ("causal", "cross_attend")

    def __init__(
        self,
        dim: int,
        ignore_index: int = 0,
        pad_value: int = 0,
        tie_token_embeds: bool = False,
        no_projection: bool = False,
        **kwargs: Any,
    ) -> None:
        # read by make_encoder / make_decoder, which the base constructor calls
        self.no_projection = no_projection
        super().__init__(dim, ignore_index, pad_value, **kwargs)
        if tie_token_embeds:
            dec = self.dec.net
            if self.enc.token_emb.weight.shape != dec.token_emb.weight.shape:
                raise ValueError("tie_token_embeds needs the same num_tokens for encoder and decoder")
            self.enc.token_emb = dec.token_emb

    def make_encoder(self, dim: int, kwargs: dict[str, Any]) -> nn.Module:
        return PerformerLM(dim=dim, no_projection=self.no_projection, **kwargs)

    def make_decoder(self, dim: int, kwargs: dict[str, Any]) -> nn.Module:
        return PerformerLM(
            dim=dim, no_projection=self.no_projection, causal=True, cross_attend=True, **kwargs
        )

    def run_encoder(self, seq_in: Tensor, kwargs: dict[str, Any]) -> Tensor:
        return self.enc(seq_in, return_encodings=True, **kwargs)

    def forward(
        self, seq_in: Tensor, seq_out: Tensor, enc_mask: Tensor | None = None, **kwargs: Any
    ) -> Tensor:
        enc_kwargs, dec_kwargs, _ = self.split(kwargs)
        if enc_mask is not None:
            enc_kwargs["mask"] = enc_mask
        context = self.encode(seq_in, enc_kwargs, dec_kwargs)
        return self.dec(seq_out, context=context, **dec_kwargs)
