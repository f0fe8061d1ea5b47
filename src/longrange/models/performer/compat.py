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

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from longrange.generation import apply_repetition_penalty, top_k
from longrange.models.autoregressive import AutoregressiveWrapper as _SharedWrapper
from longrange.models.autoregressive import check_sampling_keywords, reference_pick
from longrange.models.encdec import EncoderDecoder
from longrange.models.keywords import KeywordTable, resolve_aliases
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
    aliases={"tie_embedding": "tie_embed"},  # the spelling of the reference's README
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
    """The shared wrapper with ``performer_pytorch``'s defaults (``ignore_index=0``) and its
    ``generate`` keywords ``repetition_penalty`` / ``repetition_penalty_ctx``; ``window``
    ("restart" or "slide") as in the shared wrapper."""

    def __init__(self, net: nn.Module, ignore_index: int = 0, pad_value: int = 0) -> None:
        super().__init__(net, ignore_index=ignore_index, pad_value=pad_value)

    @torch.no_grad()
    def generate(
        self,
        start_tokens: Tensor,
        seq_len: int,
        eos_token: int | None = None,
        temperature: float = 1.0,
        filter_logits_fn: Callable[[Tensor, float], Tensor] = top_k,
        filter_thres: float = 0.9,
        repetition_penalty: float = 1.0,
        repetition_penalty_ctx: int = 32,
        window: str = "restart",
        **kwargs: Any,
    ) -> Tensor:
        """The shared ``generate``; a ``repetition_penalty`` above 1 lowers the logits of
        the tokens among each row's last ``repetition_penalty_ctx`` tokens before filtering
        (divided when positive, multiplied when negative; the reference divided every one,
        which raised negative logits, and read its window across the batch)."""
        check_sampling_keywords(seq_len, temperature, filter_thres)
        if not isinstance(repetition_penalty, (int, float)) or not repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0, got {repetition_penalty!r}")
        if isinstance(repetition_penalty_ctx, bool) or not isinstance(repetition_penalty_ctx, int):
            raise ValueError(
                f"repetition_penalty_ctx must be a positive integer, got {repetition_penalty_ctx!r}"
            )
        if repetition_penalty_ctx < 1:
            raise ValueError(
                f"repetition_penalty_ctx must be a positive integer, got {repetition_penalty_ctx!r}"
            )

        def penalise(logits: Tensor, history: Tensor) -> Tensor:
            seen = torch.zeros_like(logits, dtype=torch.bool)
            seen.scatter_(1, history[:, -repetition_penalty_ctx:], True)
            return apply_repetition_penalty(logits, seen, repetition_penalty)

        adjust = penalise if repetition_penalty > 1.0 else None
        pick = reference_pick(filter_logits_fn, filter_thres, temperature, adjust)
        return self.sample(start_tokens, seq_len, pick, eos_token=eos_token, window=window, **kwargs)


class PerformerEncDec(EncoderDecoder):
    """``performer_pytorch.PerformerEncDec``: an encoder PerformerLM and a causal,
    cross-attending decoder PerformerLM (keywords prefixed ``enc_`` / ``dec_``).

    An unprefixed keyword that names an option both sides take (``heads=8``,
    ``nb_features=256``, ...) sets it on both, as the reference does for ``no_projection``
    (it silently dropped the others); a prefixed one wins for its side. ``tie_token_embed``,
    the spelling of the reference's README, is taken as ``tie_token_embeds`` with a warning;
    ``amp_enabled`` (passed by the reference's copy-task script, dropped by the reference)
    is accepted with a warning that it has no effect.

    forward(seq_in, seq_out, enc_mask=None, **kwargs) -> the decoder's next-token loss;
    generate(seq_in, seq_out_start, seq_len, **kwargs) -> new tokens (``window`` as in the
    wrapper).
    """

    wrapper_class = AutoregressiveWrapper
    fixed_decoder_keys = ("causal", "cross_attend")
    shared_keys = frozenset([*LM_KEYWORDS.accepted, *LM_KEYWORDS.aliases, "kernel_fn"]) - {
        "dim",
        *fixed_decoder_keys,
    }

    def __init__(
        self,
        dim: int,
        ignore_index: int = 0,
        pad_value: int = 0,
        tie_token_embeds: bool = False,
        no_projection: bool = False,
        **kwargs: Any,
    ) -> None:
        if "tie_token_embed" in kwargs:
            if tie_token_embeds:
                raise TypeError(f"{type(self).__name__} got both tie_token_embed and tie_token_embeds")
            spelled = {"tie_token_embed": kwargs.pop("tie_token_embed")}
            renamed = resolve_aliases(
                spelled, {"tie_token_embed": "tie_token_embeds"}, type(self).__name__, stacklevel=3
            )
            tie_token_embeds = renamed["tie_token_embeds"]
        if "amp_enabled" in kwargs:
            # an option of older performer_pytorch releases (1.1.4 drops it unread); the
            # reference's copy-task script still passes it and runs under torch.autocast
            kwargs.pop("amp_enabled")
            warnings.warn(
                "PerformerEncDec: amp_enabled has no effect; mixed precision comes from the caller's "
                "torch.autocast",
                UserWarning,
                stacklevel=2,
            )
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
