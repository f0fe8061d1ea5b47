"""``performer_pytorch``'s public classes on longrange's Performer, and its weight converter.

``PerformerLM``, ``Performer`` and ``PerformerEncDec`` take the reference's keywords and
defaults (``PerformerLM`` is non-causal by default, as there) and parse them into a
:class:`~longrange.models.performer.PerformerConfig`; longrange-only options (``chunk_size``,
``attn_backend``, ``feature_eps``, ...) are accepted as extra keywords. ``kernel_fn`` may be any
module or callable. ``AutoregressiveWrapper`` is the shared wrapper with the reference's
defaults (``ignore_index=0``, ``pad_value=0``); its ``generate`` decodes a cross-attending
decoder incrementally too.

:func:`convert_reference` copies a reference model's ``state_dict()`` (LM, stack or enc-dec,
plain or reversible, with or without token shift) into ours, projection matrices and the redraw
counter included.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import Tensor, nn

from longrange.convert import copy_weights, register_converter
from longrange.models.performer import PerformerBody, PerformerConfig, PerformerModel
from longrange.models.performer_layers import resolve_kernel_fn
from longrange.modules.autoregressive import AutoregressiveWrapper as _SharedWrapper

EXTRA_KEYWORDS = (
    "ortho_scaling",
    "chunk_size",
    "attn_backend",
    "feature_eps",
    "kernel_eps",
    "recompute_attention",
)


def _config(kernel_fn: Any, **fields: Any) -> tuple[PerformerConfig, Any]:
    extra = fields.pop("extra")
    unknown = sorted(set(extra) - set(EXTRA_KEYWORDS))
    if unknown:
        raise TypeError(f"unexpected keyword(s) {unknown}; longrange adds only {list(EXTRA_KEYWORDS)}")
    local = fields["local_attn_heads"]
    fields["local_attn_heads"] = tuple(local) if isinstance(local, (tuple, list)) else (local,)
    if not fields["generalized_attention"] and isinstance(kernel_fn, nn.ReLU):
        kernel_fn = None  # the reference's default, unused without generalized attention
    name, fn = resolve_kernel_fn(kernel_fn)
    if kernel_fn is not None and not fields["generalized_attention"]:
        raise ValueError("kernel_fn is used only with generalized_attention=True")
    return PerformerConfig(kernel_fn=name, **fields, **extra), (fn if name == "custom" else None)


class PerformerLM(PerformerModel):
    """``performer_pytorch.PerformerLM``: forward(x, return_encodings=False, mask=None,
    context=None, context_mask=None) -> logits [B, N, num_tokens] (or encodings)."""

    def __init__(
        self,
        config: PerformerConfig | None = None,
        /,
        *,
        num_tokens: int | None = None,
        max_seq_len: int | None = None,
        dim: int | None = None,
        depth: int | None = None,
        heads: int | None = None,
        dim_head: int = 64,
        local_attn_heads: int | tuple[int, ...] = 0,
        local_window_size: int = 256,
        causal: bool = False,
        ff_mult: int = 4,
        nb_features: int | None = None,
        feature_redraw_interval: int | None = 1000,
        reversible: bool = False,
        ff_chunks: int = 1,
        ff_glu: bool = False,
        emb_dropout: float = 0.0,
        ff_dropout: float = 0.0,
        attn_dropout: float = 0.0,
        generalized_attention: bool = False,
        kernel_fn: Any = None,
        use_scalenorm: bool = False,
        use_rezero: bool = False,
        cross_attend: bool = False,
        no_projection: bool = False,
        tie_embed: bool = False,
        rotary_position_emb: bool = True,
        axial_position_emb: bool = False,
        axial_position_shape: tuple[int, ...] | None = None,
        auto_check_redraw: bool = True,
        qkv_bias: bool = False,
        attn_out_bias: bool = False,
        shift_tokens: bool = False,
        **extra: Any,
    ) -> None:
        if config is not None:
            if not isinstance(config, PerformerConfig):
                raise TypeError(f"config must be a PerformerConfig, got {type(config).__name__}")
            super().__init__(config, kernel_fn=kernel_fn)
            return
        required = dict(num_tokens=num_tokens, max_seq_len=max_seq_len, dim=dim, depth=depth, heads=heads)
        missing = [k for k, v in required.items() if v is None]
        if missing:
            raise TypeError(f"PerformerLM needs the keyword(s) {missing}")
        config, fn = _config(
            kernel_fn,
            extra=extra,
            vocab_size=num_tokens,
            max_seq_len=max_seq_len,
            dim=dim,
            depth=depth,
            heads=heads,
            dim_head=dim_head,
            local_attn_heads=local_attn_heads,
            local_window_size=local_window_size,
            causal=causal,
            ff_mult=ff_mult,
            nb_features=nb_features,
            feature_redraw_interval=feature_redraw_interval,
            reversible=reversible,
            ff_chunks=ff_chunks,
            ff_glu=ff_glu,
            emb_dropout=emb_dropout,
            ff_dropout=ff_dropout,
            attn_dropout=attn_dropout,
            generalized_attention=generalized_attention,
            use_scalenorm=use_scalenorm,
            use_rezero=use_rezero,
            cross_attend=cross_attend,
            no_projection=no_projection,
            tie_embed=tie_embed,
            rotary_position_emb=rotary_position_emb,
            axial_position_emb=axial_position_emb,
            axial_position_shape=axial_position_shape,
            auto_check_redraw=auto_check_redraw,
            qkv_bias=qkv_bias,
            attn_out_bias=attn_out_bias,
            shift_tokens=shift_tokens,
        )
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
    """``performer_pytorch.Performer``: the block stack, x [B, N, dim] -> [B, N, dim].

    forward(x, pos_emb=None, mask=None, context=None, context_mask=None); note the reference's
    stack defaults ``qkv_bias=True`` and ``attn_out_bias=True`` (the LM's are False).
    """

    def __init__(
        self,
        dim: int,
        depth: int,
        heads: int,
        dim_head: int,
        local_attn_heads: int | tuple[int, ...] = 0,
        local_window_size: int = 256,
        causal: bool = False,
        ff_mult: int = 4,
        nb_features: int | None = None,
        feature_redraw_interval: int | None = 1000,
        reversible: bool = False,
        ff_chunks: int = 1,
        generalized_attention: bool = False,
        kernel_fn: Any = None,
        use_scalenorm: bool = False,
        use_rezero: bool = False,
        ff_glu: bool = False,
        ff_dropout: float = 0.0,
        attn_dropout: float = 0.0,
        cross_attend: bool = False,
        no_projection: bool = False,
        auto_check_redraw: bool = True,
        qkv_bias: bool = True,
        attn_out_bias: bool = True,
        shift_tokens: bool = False,
        **extra: Any,
    ) -> None:
        config, fn = _config(
            kernel_fn,
            extra=extra,
            dim=dim,
            depth=depth,
            heads=heads,
            dim_head=dim_head,
            local_attn_heads=local_attn_heads,
            local_window_size=local_window_size,
            causal=causal,
            ff_mult=ff_mult,
            nb_features=nb_features,
            feature_redraw_interval=feature_redraw_interval,
            reversible=reversible,
            ff_chunks=ff_chunks,
            generalized_attention=generalized_attention,
            use_scalenorm=use_scalenorm,
            use_rezero=use_rezero,
            ff_glu=ff_glu,
            ff_dropout=ff_dropout,
            attn_dropout=attn_dropout,
            cross_attend=cross_attend,
            no_projection=no_projection,
            auto_check_redraw=auto_check_redraw,
            qkv_bias=qkv_bias,
            attn_out_bias=attn_out_bias,
            shift_tokens=shift_tokens,
            rotary_position_emb=False,
        )
        super().__init__(config, kernel_fn=fn)


class AutoregressiveWrapper(_SharedWrapper):
    """The shared wrapper with ``performer_pytorch``'s defaults (``ignore_index=0``)."""

    def __init__(self, net: nn.Module, ignore_index: int = 0, pad_value: int = 0) -> None:
        super().__init__(net, ignore_index=ignore_index, pad_value=pad_value)

    @torch.no_grad()
    def generate(self, start_tokens: Tensor, seq_len: int, **kwargs: Any) -> Tensor:
        """As the shared wrapper; a ``context`` (and ``context_mask``) for a cross-attending
        Performer decoder is held by the decoder so that decoding stays incremental."""
        context = kwargs.pop("context", None)
        context_mask = kwargs.pop("context_mask", None)
        if context is None or not isinstance(self.net, PerformerModel) or "mask" in kwargs:
            if context is not None:
                kwargs.update(context=context, context_mask=context_mask)
            return super().generate(start_tokens, seq_len, **kwargs)
        self.net.decode_context = (context, context_mask)
        try:
            return super().generate(start_tokens, seq_len, **kwargs)
        finally:
            self.net.decode_context = None


def _split_prefixed(kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    enc = {k[4:]: v for k, v in kwargs.items() if k.startswith("enc_")}
    dec = {k[4:]: v for k, v in kwargs.items() if k.startswith("dec_")}
    rest = {k: v for k, v in kwargs.items() if not k.startswith(("enc_", "dec_"))}
    return enc, dec, rest


class PerformerEncDec(nn.Module):
    """``performer_pytorch.PerformerEncDec``: an encoder PerformerLM and a causal,
    cross-attending decoder PerformerLM (keywords prefixed ``enc_`` / ``dec_``).

    forward(seq_in, seq_out, enc_mask=None, **kwargs) -> the decoder's next-token loss;
    generate(seq_in, seq_out_start, seq_len, **kwargs) -> new tokens.
    """

    def __init__(
        self,
        dim: int,
        ignore_index: int = 0,
        pad_value: int = 0,
        tie_token_embeds: bool = False,
        no_projection: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        enc_kwargs, dec_kwargs, rest = _split_prefixed(kwargs)
        if rest:
            raise TypeError(f"unexpected keyword(s) {sorted(rest)}: prefix them with enc_ or dec_")
        if "dim" in enc_kwargs or "dim" in dec_kwargs:
            raise ValueError("set dim once for both encoder and decoder (not enc_dim / dec_dim)")
        for name in ("causal", "cross_attend"):
            if name in dec_kwargs:
                raise ValueError(f"dec_{name} is fixed (the decoder is causal and cross-attends)")
        enc = PerformerLM(dim=dim, no_projection=no_projection, **enc_kwargs)
        dec = PerformerLM(dim=dim, no_projection=no_projection, causal=True, cross_attend=True, **dec_kwargs)
        if tie_token_embeds:
            if enc.token_emb.weight.shape != dec.token_emb.weight.shape:
                raise ValueError("tie_token_embeds needs the same num_tokens for encoder and decoder")
            enc.token_emb = dec.token_emb
        self.enc = enc
        self.dec = AutoregressiveWrapper(dec, ignore_index=ignore_index, pad_value=pad_value)

    @torch.no_grad()
    def generate(self, seq_in: Tensor, seq_out_start: Tensor, seq_len: int, **kwargs: Any) -> Tensor:
        enc_kwargs, dec_kwargs, rest = _split_prefixed(kwargs)
        if "mask" in enc_kwargs:
            dec_kwargs.setdefault("context_mask", enc_kwargs["mask"])
        encodings = self.enc(seq_in, return_encodings=True, **enc_kwargs)
        return self.dec.generate(seq_out_start, seq_len, context=encodings, **{**dec_kwargs, **rest})

    def forward(
        self, seq_in: Tensor, seq_out: Tensor, enc_mask: Tensor | None = None, **kwargs: Any
    ) -> Tensor:
        enc_kwargs, dec_kwargs, rest = _split_prefixed(kwargs)
        if rest:
            raise TypeError(f"unexpected keyword(s) {sorted(rest)}: prefix them with enc_ or dec_")
        encodings = self.enc(seq_in, mask=enc_mask, return_encodings=True, **enc_kwargs)
        return self.dec(seq_out, context=encodings, context_mask=enc_mask, **dec_kwargs)


# --- weights of the reference package ----------------------------------------------------

# reference weights with no counterpart here: fixed sinusoid tables (ours are recomputed, not
# saved), local attention's rotary frequencies, and the redraw helper's alias of the stack
_SKIPPED = re.compile(
    r"(^|\.)(layer_pos_emb\.emb|pos_emb\.emb|proj_updater\.instance\..*|rel_pos\.inv_freq)$"
)


def _candidates(key: str) -> list[str]:
    key = re.sub(r"(^|\.)net\.layers\.(\d+)\.0\.", r"\1layers.blocks.\2.f.", key)
    key = re.sub(r"(^|\.)net\.layers\.(\d+)\.1\.", r"\1layers.blocks.\2.g.", key)
    key = re.sub(r"(^|\.)net\.blocks\.(\d+)\.([fg])\.net\.", r"\1layers.blocks.\2.\3.", key)
    key = re.sub(r"(^|\.)proj_updater\.calls_since_last_redraw$", r"\1calls_since_last_redraw", key)
    out = [key]
    # PreScaleNorm keeps its scale as .g beside .fn; ours sits in the norm
    out.append(re.sub(r"(layers\.blocks\.\d+\.[fg]\.)g$", r"\1norm.g", key))
    # PreShiftTokens wraps the branch's function once more
    out.append(re.sub(r"(layers\.blocks\.\d+\.[fg]\.)fn\.fn\.", r"\1fn.", key))
    return out


def convert_reference(model: nn.Module, reference: dict[str, Tensor]) -> None:
    """Copy a ``performer_pytorch`` state dict into ``model`` (PerformerModel, PerformerBody
    or PerformerEncDec built with the same keywords); every one of our weights must be found."""
    ours = model.state_dict()
    renamed: dict[str, Tensor] = {}
    unmatched = []
    for key, value in reference.items():
        if _SKIPPED.search(key):
            continue
        name = next((c for c in _candidates(key) if c in ours), None)
        if name is None:
            unmatched.append(key)
            continue
        renamed[name] = value.reshape(ours[name].shape) if value.numel() == ours[name].numel() else value
    missing = [k for k in ours if k not in renamed]
    if unmatched or missing:
        raise ValueError(
            f"reference and model do not match: reference weights without a place {unmatched[:5]}, "
            f"our weights without a source {missing[:5]}"
        )
    copy_weights(model, renamed, {k: k for k in ours})


register_converter(PerformerModel, convert_reference)
register_converter(PerformerBody, convert_reference)
register_converter(PerformerEncDec, convert_reference)
