"""The sinkhorn-transformer reference's names, keywords, defaults and return conventions.

``SinkhornTransformerLM`` (a :class:`~longrange.models.sinkhorn.SinkhornLM`, so it also has
``prefill``/``step``/``generate``/``save_pretrained``), ``SinkhornTransformer`` (the stack on
[B, N, dim] inputs), ``Autopadder``, ``AutoregressiveWrapper`` (the shared wrapper with this
reference's defaults: ``ignore_index`` = ``pad_value``, ``return_loss=False``, list inputs,
``randomly_truncate_sequence``), and ``SinkhornTransformerEncDec``, which the reference lacks
(``enc_`` / ``dec_`` keyword prefixes as in the routing reference). ``longrange.convert``
loads a reference model's weights into these classes.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from longrange.convert import register_converter
from longrange.models.sinkhorn import SinkhornBody, SinkhornConfig, SinkhornLM
from longrange.modules.autopad import Autopadder as _SharedAutopadder
from longrange.modules.autoregressive import AutoregressiveWrapper as _SharedWrapper
from longrange.modules.autoregressive import top_k

# keyword -> config field where the names differ
_LM_DEFAULTS: dict[str, Any] = dict(
    heads=8, dim_head=None, bucket_size=64, kv_bucket_size=None, context_bucket_size=None, causal=False,
    non_permutative=True, sinkhorn_iter=5, n_sortcut=0, temperature=0.75, reversible=False, ff_chunks=1,
    ff_glu=False, return_embeddings=False, ff_dropout=0.0, attn_dropout=0.0, attn_layer_dropout=0.0,
    layer_dropout=0.0, emb_dropout=0.0, weight_tie=False, emb_dim=None, use_simple_sort_net=None,
    receives_context=False, context_n_sortcut=0, n_local_attn_heads=0, use_rezero=False, n_top_buckets=2,
    pkm_layers=(), pkm_num_keys=128,
)  # fmt: skip


def _config(**kw: Any) -> SinkhornConfig:
    kw["use_simple_sort_net"] = bool(kw.get("use_simple_sort_net"))
    kw["pkm_layers"] = tuple(kw.get("pkm_layers") or ())
    return SinkhornConfig(**kw)


class SinkhornTransformerLM(SinkhornLM):
    """``SinkhornTransformerLM(num_tokens, dim, max_seq_len, depth, ...)`` with the reference's
    keywords and defaults (non-causal unless ``causal=True``). ``forward(x, input_mask=None,
    context=None, context_mask=None)`` returns logits [B, N, num_tokens] (embeddings with
    ``return_embeddings``). Unlike the reference, any N <= max_seq_len runs."""

    def __init__(
        self, num_tokens: int | SinkhornConfig, dim: int | None = None, max_seq_len=None, depth=None, **kw
    ):
        if isinstance(num_tokens, SinkhornConfig):
            super().__init__(num_tokens)
            return
        unknown = sorted(set(kw) - set(_LM_DEFAULTS))
        if unknown:
            raise TypeError(f"SinkhornTransformerLM got unknown keyword(s) {unknown}")
        if None in (dim, max_seq_len, depth):
            raise TypeError("SinkhornTransformerLM needs num_tokens, dim, max_seq_len and depth")
        args = {**_LM_DEFAULTS, **kw}
        super().__init__(
            _config(vocab_size=num_tokens, dim=dim, max_seq_len=max_seq_len, depth=depth, **args)
        )

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


_BODY_DEFAULTS: dict[str, Any] = dict(
    max_seq_len=None, causal=False, heads=8, dim_head=None, bucket_size=64, kv_bucket_size=None,
    context_bucket_size=None, non_permutative=False, sinkhorn_iter=5, n_sortcut=0, temperature=0.75,
    reversible=False, ff_chunks=1, ff_dropout=0.0, attn_dropout=0.0, attn_layer_dropout=0.0,
    layer_dropout=0.0, weight_tie=False, ff_glu=False, use_simple_sort_net=None, receives_context=False,
    context_n_sortcut=2, n_local_attn_heads=0, use_rezero=False, n_top_buckets=1, pkm_layers=(),
    pkm_num_keys=128,
)  # fmt: skip


class SinkhornTransformer(SinkhornBody):
    """``SinkhornTransformer(dim, depth, ...)``: x [B, N, dim] -> [B, N, dim], N divisible by
    the bucket sizes (use :class:`Autopadder` otherwise); keywords and defaults as in the
    reference; ``forward(x, input_mask=None, context=None, context_mask=None)``."""

    def __init__(self, dim: int, depth: int, **kw: Any) -> None:
        unknown = sorted(set(kw) - set(_BODY_DEFAULTS))
        if unknown:
            raise TypeError(f"SinkhornTransformer got unknown keyword(s) {unknown}")
        args = {**_BODY_DEFAULTS, **kw}
        max_seq_len = args.pop("max_seq_len")
        if args["use_simple_sort_net"] and max_seq_len is None:
            raise ValueError("max_seq_len must be given with use_simple_sort_net (the length is fixed)")
        placeholder = max_seq_len or args["bucket_size"]
        super().__init__(
            _config(dim=dim, depth=depth, max_seq_len=placeholder, **args), max_seq_len=max_seq_len
        )
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
    (x a tensor or a list of 1-D tensors); ``generate`` decodes incrementally, also with a
    decoder ``context``. Padding for the buckets happens inside the model (on the right, which
    is exact for causal models), so ``pad_left`` only sets the side of ragged-list padding."""

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

    @torch.no_grad()
    def generate(self, start_tokens, seq_len, eos_token=None, temperature=1.0, filter_logits_fn=top_k,
                 filter_thres=0.9, **kwargs):  # fmt: skip
        net = self.net
        if "input_mask" in kwargs:
            # the shared sampler grows a prompt mask named ``mask`` (which the nets also take)
            kwargs["mask"] = kwargs.pop("input_mask")
        context_keys = {"context", "context_mask"}
        if not (isinstance(net, SinkhornLM) and kwargs and set(kwargs) <= context_keys and net.config.causal):
            return super().generate(start_tokens, seq_len, eos_token, temperature, filter_logits_fn,
                                    filter_thres, **kwargs)  # fmt: skip
        squeeze = start_tokens.dim() == 1
        tokens = (start_tokens[None] if squeeze else start_tokens).long()
        was_training = net.training
        net.eval()
        try:
            limit = net.context_limit()
            window = tokens[:, -limit:]
            logits, state = net.prefill(window, **kwargs)
            logits, new = logits[:, -1], []
            for i in range(seq_len):
                nxt = self._pick(logits, temperature, filter_logits_fn, filter_thres)
                new.append(nxt)
                if eos_token is not None and bool((torch.stack(new, 1) == eos_token).any(1).all()):
                    break
                if i == seq_len - 1:
                    break
                if state.length >= limit:
                    history = torch.cat([tokens, torch.stack(new, 1)], dim=1)
                    logits, state = net.prefill(history[:, -max(1, limit // 2) :], **kwargs)
                    logits = logits[:, -1]
                else:
                    logits, state = net.step(nxt, state)
        finally:
            net.train(was_training)
        out = self._finish(new, eos_token, tokens.shape[0], tokens.device)
        return out[0] if squeeze else out


def _split_prefixed(kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    enc = {k[4:]: v for k, v in kwargs.items() if k.startswith("enc_")}
    dec = {k[4:]: v for k, v in kwargs.items() if k.startswith("dec_")}
    rest = {k: v for k, v in kwargs.items() if not k.startswith(("enc_", "dec_"))}
    return enc, dec, rest


class SinkhornTransformerEncDec(nn.Module):
    """Encoder-decoder: a non-causal encoder ``SinkhornTransformerLM`` (``enc_`` keywords) whose
    embeddings are the context of a causal decoder (``dec_`` keywords, ``receives_context``).

    ``forward(seq_in, seq_out, return_loss=False, enc_input_mask=None, ...)`` returns the
    decoder logits, or the next-token loss of ``seq_out`` with ``return_loss``;
    ``generate(seq_in, seq_out_start, seq_len, ...)`` samples decoder tokens incrementally.
    """

    def __init__(self, dim: int, ignore_index: int | None = None, pad_value: int = 0, **kwargs: Any) -> None:
        super().__init__()
        enc_kw, dec_kw, rest = _split_prefixed(kwargs)
        if rest:
            raise TypeError(
                f"SinkhornTransformerEncDec keywords need an enc_ or dec_ prefix, got {sorted(rest)}"
            )
        for name, kw in (("enc", enc_kw), ("dec", dec_kw)):
            if "dim" in kw or "return_embeddings" in kw:
                raise ValueError(
                    f"{name}_dim / {name}_return_embeddings are set by SinkhornTransformerEncDec"
                )
            for needed in ("num_tokens", "max_seq_len", "depth"):
                if needed not in kw:
                    raise TypeError(f"SinkhornTransformerEncDec needs {name}_{needed}")
        if dec_kw.get("causal") is False or dec_kw.get("receives_context") is False:
            raise ValueError("the decoder is always causal and receives the encoder's context")
        enc_kw.update(dim=dim, return_embeddings=True)
        dec_kw.update(dim=dim, causal=True, receives_context=True)
        self.enc = SinkhornTransformerLM(**enc_kw)
        self.dec = AutoregressiveWrapper(SinkhornTransformerLM(**dec_kw), ignore_index, pad_value)

    def _encode(self, seq_in: Tensor, kwargs: dict[str, Any]) -> tuple[Tensor, dict[str, Any]]:
        enc_kw, dec_kw, rest = _split_prefixed(kwargs)
        if rest:
            raise TypeError(f"keywords need an enc_ or dec_ prefix, got {sorted(rest)}")
        context = self.enc(seq_in, **enc_kw)
        mask = enc_kw.get("input_mask", enc_kw.get("mask"))
        if mask is not None:
            dec_kw.setdefault("context_mask", mask)
        return context, dec_kw

    def forward(self, seq_in: Tensor, seq_out: Tensor, return_loss: bool = False, **kwargs: Any) -> Tensor:
        context, dec_kw = self._encode(seq_in, kwargs)
        return self.dec(seq_out, return_loss=return_loss, context=context, **dec_kw)

    @torch.no_grad()
    def generate(
        self, seq_in: Tensor, seq_out_start: Tensor, seq_len: int | None = None, **kwargs: Any
    ) -> Tensor:
        sampling = {k: kwargs.pop(k) for k in list(kwargs) if not k.startswith(("enc_", "dec_"))}
        context, dec_kw = self._encode(seq_in, kwargs)
        if seq_len is None:
            seq_len = self.dec.max_seq_len - seq_out_start.shape[-1]
        return self.dec.generate(seq_out_start, seq_len, context=context, **dec_kw, **sampling)


def _convert_reference(model: nn.Module, reference: dict[str, Tensor]) -> None:
    """Map a sinkhorn-transformer state dict onto our names: the stacks differ in how they
    nest blocks; context layers get an identity ``to_kv`` (the reference attends to the raw
    context, which needs equal widths)."""
    import re

    ours = model.state_dict()
    mapped: dict[str, Tensor] = {}
    for name, tensor in reference.items():
        new = re.sub(r"layers\.layers\.(\d+)\.0\.", r"layers.blocks.\1.f.", name)
        new = re.sub(r"layers\.layers\.(\d+)\.1\.", r"layers.blocks.\1.g.", new)
        new = re.sub(r"layers\.blocks\.(\d+)\.([fg])\.net\.", r"layers.blocks.\1.\2.", new)
        if new not in ours:
            raise ValueError(
                f"reference weight {name!r} has no counterpart ({new!r}) in {type(model).__name__}"
            )
        if tuple(ours[new].shape) != tuple(tensor.shape):
            raise ValueError(
                f"shape mismatch for {new!r}: ours {tuple(ours[new].shape)}, reference {tuple(tensor.shape)}"
            )
        mapped[new] = tensor
    for name, tensor in ours.items():
        if name in mapped:
            continue
        if name.endswith("to_kv.weight") and tensor.shape[0] == 2 * tensor.shape[1]:
            eye = torch.eye(tensor.shape[1], dtype=tensor.dtype, device=tensor.device)
            mapped[name] = torch.cat([eye, eye], dim=0)
            continue
        raise ValueError(
            f"{type(model).__name__} weight {name!r} has no counterpart in the reference state dict"
        )
    model.load_state_dict(mapped)


register_converter(SinkhornLM, _convert_reference)
register_converter(SinkhornBody, _convert_reference)

__all__ = [
    "Autopadder",
    "AutoregressiveWrapper",
    "SinkhornTransformer",
    "SinkhornTransformerEncDec",
    "SinkhornTransformerLM",
]
