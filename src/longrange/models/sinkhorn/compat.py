"""The sinkhorn-transformer reference's names, keywords, defaults and return conventions.

``SinkhornTransformerLM`` (a :class:`~longrange.models.sinkhorn.model.SinkhornLM`, so it also
has ``prefill``/``step``/``generate``/``save_pretrained``), ``SinkhornTransformer`` (the stack
on [B, N, dim] inputs), ``Autopadder``, ``AutoregressiveWrapper`` (the shared wrapper with
this reference's defaults: ``ignore_index`` = ``pad_value``, ``return_loss=False``, list
inputs, ``randomly_truncate_sequence``), and ``SinkhornTransformerEncDec``, which the
reference lacks (``enc_`` / ``dec_`` keyword prefixes as in the routing reference). Each
constructor is one :class:`~longrange.models.keywords.KeywordTable`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from longrange.models.autoregressive import AutoregressiveWrapper as _SharedWrapper
from longrange.models.encdec import EncoderDecoder
from longrange.models.keywords import KeywordTable
from longrange.models.sinkhorn.config import SinkhornConfig
from longrange.models.sinkhorn.model import SinkhornBody, SinkhornLM
from longrange.modules.autopad import Autopadder as _SharedAutopadder

LM_KEYWORDS = KeywordTable(
    "SinkhornTransformerLM",
    defaults=dict(
        heads=8, dim_head=None, bucket_size=64, kv_bucket_size=None, context_bucket_size=None,
        causal=False, non_permutative=True, sinkhorn_iter=5, n_sortcut=0, temperature=0.75,
        reversible=False, ff_chunks=1, ff_glu=False, return_embeddings=False, ff_dropout=0.0,
        attn_dropout=0.0, attn_layer_dropout=0.0, layer_dropout=0.0, emb_dropout=0.0,
        weight_tie=False, emb_dim=None, use_simple_sort_net=None, receives_context=False,
        context_n_sortcut=0, n_local_attn_heads=0, use_rezero=False, n_top_buckets=2,
        pkm_layers=(), pkm_num_keys=128,
    ),
    required=("num_tokens", "dim", "max_seq_len", "depth"),
    renames={"num_tokens": "vocab_size"},
)  # fmt: skip
STACK_KEYWORDS = KeywordTable(
    "SinkhornTransformer",
    defaults=dict(
        max_seq_len=None, causal=False, heads=8, dim_head=None, bucket_size=64,
        kv_bucket_size=None, context_bucket_size=None, non_permutative=False, sinkhorn_iter=5,
        n_sortcut=0, temperature=0.75, reversible=False, ff_chunks=1, ff_dropout=0.0,
        attn_dropout=0.0, attn_layer_dropout=0.0, layer_dropout=0.0, weight_tie=False,
        ff_glu=False, use_simple_sort_net=None, receives_context=False, context_n_sortcut=2,
        n_local_attn_heads=0, use_rezero=False, n_top_buckets=1, pkm_layers=(), pkm_num_keys=128,
    ),
    required=("dim", "depth"),
)  # fmt: skip


def _config(fields: dict[str, Any]) -> SinkhornConfig:
    # the reference's None / empty-list defaults for these two
    fields["use_simple_sort_net"] = bool(fields.get("use_simple_sort_net"))
    fields["pkm_layers"] = tuple(fields.get("pkm_layers") or ())
    return SinkhornConfig(**fields)


class SinkhornTransformerLM(SinkhornLM):
    """``SinkhornTransformerLM(num_tokens, dim, max_seq_len, depth, ...)`` with the reference's
    keywords and defaults (non-causal unless ``causal=True``), or a :class:`SinkhornConfig`.
    ``forward(x, input_mask=None, context=None, context_mask=None)`` returns logits
    [B, N, num_tokens] (embeddings with ``return_embeddings``). Unlike the reference, any
    N <= max_seq_len runs."""

    def __init__(
        self, num_tokens: int | SinkhornConfig, dim: int | None = None, max_seq_len=None, depth=None, **kw
    ):
        if isinstance(num_tokens, SinkhornConfig):
            super().__init__(num_tokens)
            return
        given = dict(num_tokens=num_tokens, dim=dim, max_seq_len=max_seq_len, depth=depth, **kw)
        super().__init__(_config(LM_KEYWORDS.parse(given)))

    def forward(
        self,
        x: Tensor,
        input_mask: Tensor | None = None,
        context: Tensor | None = None,
        context_mask: Tensor | None = None,
        *,
        mask: Tensor | None = None,
    ) -> Tensor:
        input_mask = mask if input_mask is None else input_mask
        self.check_tokens(x, input_mask)
        return self.run(x, input_mask=input_mask, context=context, context_mask=context_mask)


class SinkhornTransformer(SinkhornBody):
    """``SinkhornTransformer(dim, depth, ...)``: x [B, N, dim] -> [B, N, dim], N divisible by
    the bucket sizes (use :class:`Autopadder` otherwise); keywords and defaults as in the
    reference; ``forward(x, input_mask=None, context=None, context_mask=None)``."""

    def __init__(self, dim: int, depth: int, **kw: Any) -> None:
        fields = STACK_KEYWORDS.parse(dict(dim=dim, depth=depth, **kw))
        max_seq_len = fields.pop("max_seq_len")
        if fields["use_simple_sort_net"] and max_seq_len is None:
            raise ValueError("max_seq_len must be given with use_simple_sort_net (the length is fixed)")
        # the config needs a length; the stack itself runs any multiple of the buckets
        placeholder = max_seq_len or fields["bucket_size"]
        super().__init__(_config({**fields, "max_seq_len": placeholder}), max_seq_len=max_seq_len)
        c = self.config
        self.max_seq_len = max_seq_len
        self.pad_to_bucket_size = self.pad_multiple = c.pad_multiple
        self.context_bucket_size = self.context_pad_multiple = c.context_bucket_size or c.bucket_size
        self.is_fixed_length = c.use_simple_sort_net and not c.causal

    def forward(self, x: Tensor, input_mask=None, context=None, context_mask=None, *, mask=None) -> Tensor:
        if self.is_fixed_length and x.shape[1] != self.max_seq_len:
            raise ValueError(f"use_simple_sort_net needs sequences of length max_seq_len={self.max_seq_len}")
        return super().forward(x, input_mask, context, context_mask, mask=mask)


class Autopadder(_SharedAutopadder):
    """The reference's ``Autopadder(net, pad_left=False)``: pads the input (and context) to the
    bucket multiple, masks the padding and cuts the output back; ``pad_left`` pads on the left."""

    def __init__(self, net: nn.Module, pad_left: bool = False) -> None:
        if not isinstance(net, (SinkhornTransformer, SinkhornLM)):
            raise TypeError("Autopadder accepts SinkhornTransformer or SinkhornTransformerLM modules")
        super().__init__(net)
        self.pad_left = pad_left

    def forward(self, x: Tensor, **kwargs: Any) -> Tensor:
        if not self.pad_left:
            return super().forward(x, **kwargs)
        n = x.shape[1]
        pad = (-n) % self.pad_multiple
        if pad:
            key = "input_mask" if "input_mask" in kwargs else "mask"
            mask = kwargs.get(key)
            if mask is None:
                mask = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
            kwargs[key] = F.pad(mask, (pad, 0), value=False)
            spec = (0, 0) * (x.dim() - 2) + (pad, 0)
            x = F.pad(x, spec)
        out = super().forward(x, **kwargs)
        return out[:, pad:]


def _pad_rows(rows: list[Tensor], value: int, left: bool = False) -> Tensor:
    n = max(len(r) for r in rows)
    return torch.stack([F.pad(r, (n - len(r), 0) if left else (0, n - len(r)), value=value) for r in rows])


class AutoregressiveWrapper(_SharedWrapper):
    """The reference's wrapper: ``AutoregressiveWrapper(net, ignore_index=None, pad_value=0,
    pad_left=True)``; ``forward(x, return_loss=False, randomly_truncate_sequence=False, ...)``
    (x a tensor or a list of 1-D tensors); ``generate`` is the shared sampler (incremental on a
    causal model, also with a decoder ``context``; a prompt ``input_mask`` re-runs the net;
    past ``max_seq_len`` it restarts from the last half window, or with ``window="slide"``
    re-runs a full window per token as the reference does).
    Padding for the buckets happens inside the model (on the right, which is exact for causal
    models), so ``pad_left`` only sets the side of ragged-list padding."""

    def __init__(
        self, net: nn.Module, ignore_index: int | None = None, pad_value: int = 0, pad_left: bool = True
    ):
        super().__init__(
            net, ignore_index=pad_value if ignore_index is None else ignore_index, pad_value=pad_value
        )
        self.pad_left = pad_left

    def forward(self, x, return_loss: bool = False, randomly_truncate_sequence: bool = False, **kwargs):
        if not isinstance(x, Tensor):
            if return_loss:
                inputs = _pad_rows([r[:-1] for r in x], self.pad_value)
                targets = _pad_rows([r[1:] for r in x], self.pad_value)
                logits = self.net(inputs, **kwargs)
                return F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=self.ignore_index)
            x = _pad_rows(list(x), self.pad_value)
        if not return_loss:
            return self.net(x, **kwargs)
        if randomly_truncate_sequence:
            x, mask = self._truncate(x, kwargs.pop("input_mask", None))
            kwargs["input_mask"] = mask
        return super().forward(x, return_loss=True, **kwargs)

    def _truncate(self, x: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
        b, n = x.shape
        mask = torch.ones_like(x, dtype=torch.bool) if mask is None else mask
        lengths = torch.randint(2, max(3, n), (b,)).tolist()
        seqs = [row[:length][m[:length]] for row, m, length in zip(x, mask, lengths)]
        keeps = [torch.ones(len(s), dtype=torch.bool, device=x.device) for s in seqs]
        return _pad_rows(seqs, self.pad_value, left=True), _pad_rows(keeps, 0, left=True).bool()


class SinkhornTransformerEncDec(EncoderDecoder):
    """Encoder-decoder: a non-causal encoder ``SinkhornTransformerLM`` (``enc_`` keywords) whose
    embeddings are the context of a causal decoder (``dec_`` keywords, ``receives_context``).

    ``forward(seq_in, seq_out, return_loss=False, enc_input_mask=None, ...)`` returns the
    decoder logits, or the next-token loss of ``seq_out`` with ``return_loss``;
    ``generate(seq_in, seq_out_start, seq_len, ...)`` samples decoder tokens incrementally.
    """

    wrapper_class = AutoregressiveWrapper
    mask_key = "input_mask"
    # checked in make_decoder: the reference's keywords may say True, never False
    fixed_decoder_keys = ()

    def __init__(self, dim: int, ignore_index: int | None = None, pad_value: int = 0, **kwargs: Any) -> None:
        super().__init__(dim, ignore_index, pad_value, **kwargs)

    def _side(self, name: str, dim: int, kwargs: dict[str, Any]) -> dict[str, Any]:
        if "return_embeddings" in kwargs:
            raise ValueError(f"{name}_dim / {name}_return_embeddings are set by SinkhornTransformerEncDec")
        for needed in ("num_tokens", "max_seq_len", "depth"):
            if needed not in kwargs:
                raise TypeError(f"SinkhornTransformerEncDec needs {name}_{needed}")
        return {**kwargs, "dim": dim}

    def make_encoder(self, dim: int, kwargs: dict[str, Any]) -> nn.Module:
        return SinkhornTransformerLM(**self._side("enc", dim, kwargs), return_embeddings=True)

    def make_decoder(self, dim: int, kwargs: dict[str, Any]) -> nn.Module:
        if kwargs.get("causal") is False or kwargs.get("receives_context") is False:
            raise ValueError("the decoder is always causal and receives the encoder's context")
        fields = {**self._side("dec", dim, kwargs), "causal": True, "receives_context": True}
        return SinkhornTransformerLM(**fields)

    def encode(self, seq_in: Tensor, enc_kwargs: dict[str, Any], dec_kwargs: dict[str, Any]) -> Tensor:
        # the encoder takes its padding mask as ``input_mask`` or ``mask``
        if enc_kwargs.get("input_mask") is None and enc_kwargs.get("mask") is not None:
            enc_kwargs["input_mask"] = enc_kwargs.pop("mask")
        return super().encode(seq_in, enc_kwargs, dec_kwargs)

    def forward(self, seq_in: Tensor, seq_out: Tensor, return_loss: bool = False, **kwargs: Any) -> Tensor:
        enc_kwargs, dec_kwargs, _ = self.split(kwargs)
        context = self.encode(seq_in, enc_kwargs, dec_kwargs)
        return self.dec(seq_out, return_loss=return_loss, context=context, **dec_kwargs)
