"""The ``routing_transformer`` package's public classes, with its names, keywords and defaults.

Each class parses the reference keywords into a :class:`~longrange.models.routing.RoutingConfig`
and runs the shared flow; only the return conventions are the reference's:

- :class:`RoutingTransformerLM`: ``forward(x, input_mask=None, context=None, context_mask=None)``
  -> ``(logits, aux_loss)``;
- :class:`RoutingTransformer`: the block stack, ``forward(x, **kwargs)`` -> ``(x, aux_loss)``;
- :class:`RoutingTransformerEncDec`: encoder + causal decoder with routed cross attention;
  ``forward(seq_in, seq_out, return_loss=False)`` -> ``(loss, aux_loss)``. Unlike the
  reference, the encoder's auxiliary loss is always in the returned loss (also with a
  reversible decoder; the second element is then zero) and ``cancel_kmeans_update`` removes
  the update handle;
- :class:`AutoregressiveWrapper` and :class:`Autopadder`: the shared ones with the reference's
  defaults (``ignore_index = pad_value``, ``return_loss=False``, ``randomly_truncate_sequence``).

``longrange.convert.load_reference(model, state_dict)`` copies a reference model's weights
(k-means centroids included) into any of these (see :func:`longrange.models.routing.convert_reference`).
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pad_sequence

from longrange.convert import copy_weights, register_converter
from longrange.models.routing import ACTIVATIONS, RoutingBody, RoutingConfig, RoutingLM, convert_reference
from longrange.models.routing_layers import KmeansUpdateHandle, update_kmeans
from longrange.modules.autopad import Autopadder as _SharedAutopadder
from longrange.modules.autoregressive import AutoregressiveWrapper as _SharedWrapper
from longrange.modules.autoregressive import top_k
from longrange.modules.positional import AbsolutePositionalEmbedding


def _activation(ff_activation) -> tuple[str | None, type[nn.Module] | nn.Module | None]:
    """The reference takes an nn.Module class: a known one becomes a config name, any other is
    kept as an override (not saved with the config)."""
    if ff_activation is None or isinstance(ff_activation, str):
        return ff_activation, None
    for name, cls in ACTIVATIONS.items():
        if ff_activation is cls:
            return name, None
    if isinstance(ff_activation, nn.Module) or (
        isinstance(ff_activation, type) and issubclass(ff_activation, nn.Module)
    ):
        return None, ff_activation
    raise TypeError(f"ff_activation must be None, a name or an nn.Module class, got {ff_activation!r}")


def _layers(value) -> tuple[int, ...]:
    return (value,) if isinstance(value, int) else tuple(value)


class RoutingTransformer(RoutingBody):
    """The reference's block stack (``routing_transformer.RoutingTransformer``)."""

    def __init__(
        self,
        dim,
        depth,
        max_seq_len,
        heads=8,
        dim_head=None,
        window_size=64,
        local_attn_window_size=256,
        local_attn_radius_blocks=1,
        causal=False,
        weight_tie=False,
        attn_dropout=0.0,
        ff_dropout=0.0,
        attn_layer_dropout=0.0,
        layer_dropout=0.0,
        n_local_attn_heads=0,
        ff_glu=False,
        reversible=False,
        ff_chunks=1,
        kmeans_ema_decay=0.999,
        commitment_factor=1e-4,
        receives_context=False,
        context_window_size=None,
        _register_kmeans_update=False,
        rel_pos_emb=True,
        pkm_layers=tuple(),
        pkm_num_keys=128,
        moe_layers=tuple(),
        moe_num_experts=4,
        moe_loss_coef=1e-2,
        num_mem_kv=0,
        shared_qk=None,
        context_shared_qk=False,
        use_rezero=False,
        use_scale_norm=False,
        ff_activation=None,
        shift_tokens=False,
    ):
        name, override = _activation(ff_activation)
        config = RoutingConfig(
            dim=dim,
            depth=depth,
            max_seq_len=max_seq_len,
            heads=heads,
            dim_head=dim_head,
            window_size=window_size,
            local_attn_window_size=local_attn_window_size,
            local_attn_radius_blocks=local_attn_radius_blocks,
            causal=causal,
            weight_tie=weight_tie,
            attn_dropout=attn_dropout,
            ff_dropout=ff_dropout,
            attn_layer_dropout=attn_layer_dropout,
            layer_dropout=layer_dropout,
            n_local_attn_heads=n_local_attn_heads,
            ff_glu=ff_glu,
            reversible=reversible,
            ff_chunks=ff_chunks,
            kmeans_ema_decay=kmeans_ema_decay,
            commitment_factor=commitment_factor,
            receives_context=receives_context,
            context_window_size=context_window_size,
            kmeans_update_on_backward=_register_kmeans_update,
            rel_pos_emb=rel_pos_emb,
            pkm_layers=_layers(pkm_layers),
            pkm_num_keys=pkm_num_keys,
            moe_layers=_layers(moe_layers),
            moe_num_experts=moe_num_experts,
            moe_loss_coef=moe_loss_coef,
            num_mem_kv=num_mem_kv,
            shared_qk=shared_qk,
            context_shared_qk=context_shared_qk,
            use_rezero=use_rezero,
            use_scale_norm=use_scale_norm,
            ff_activation=name,
            shift_tokens=shift_tokens,
        )
        super().__init__(config, activation=override)


class RoutingTransformerLM(RoutingLM):
    """The reference's language model; ``forward`` returns ``(logits, aux_loss)``."""

    def __init__(
        self,
        num_tokens,
        dim,
        depth,
        max_seq_len,
        heads=8,
        dim_head=64,
        window_size=64,
        local_attn_window_size=None,
        local_attn_radius_blocks=1,
        causal=False,
        emb_dim=None,
        weight_tie=False,
        attn_dropout=0.0,
        ff_dropout=0.0,
        attn_layer_dropout=0.0,
        layer_dropout=0.0,
        ff_mult=4,
        ff_activation=None,
        ff_glu=False,
        return_embeddings=False,
        n_local_attn_heads=0,
        reversible=False,
        ff_chunks=1,
        kmeans_ema_decay=0.999,
        commitment_factor=1e-4,
        receives_context=False,
        context_window_size=None,
        rel_pos_emb=True,
        _register_kmeans_update=True,
        pkm_layers=tuple(),
        pkm_num_keys=128,
        moe_layers=tuple(),
        moe_num_experts=4,
        moe_loss_coef=1e-2,
        num_mem_kv=0,
        shared_qk=None,
        context_shared_qk=False,
        use_rezero=False,
        use_scale_norm=False,
        tie_embedding=False,
        use_absolute_pos_emb=False,
        shift_tokens=False,
    ):
        name, override = _activation(ff_activation)
        config = RoutingConfig(
            vocab_size=num_tokens,
            dim=dim,
            depth=depth,
            max_seq_len=max_seq_len,
            heads=heads,
            dim_head=dim_head,
            window_size=window_size,
            local_attn_window_size=local_attn_window_size,
            local_attn_radius_blocks=local_attn_radius_blocks,
            causal=causal,
            emb_dim=emb_dim,
            weight_tie=weight_tie,
            attn_dropout=attn_dropout,
            ff_dropout=ff_dropout,
            attn_layer_dropout=attn_layer_dropout,
            layer_dropout=layer_dropout,
            ff_mult=ff_mult,
            ff_activation=name,
            ff_glu=ff_glu,
            return_embeddings=return_embeddings,
            n_local_attn_heads=n_local_attn_heads,
            reversible=reversible,
            ff_chunks=ff_chunks,
            kmeans_ema_decay=kmeans_ema_decay,
            commitment_factor=commitment_factor,
            receives_context=receives_context,
            context_window_size=context_window_size,
            rel_pos_emb=rel_pos_emb,
            kmeans_update_on_backward=_register_kmeans_update,
            pkm_layers=_layers(pkm_layers),
            pkm_num_keys=pkm_num_keys,
            moe_layers=_layers(moe_layers),
            moe_num_experts=moe_num_experts,
            moe_loss_coef=moe_loss_coef,
            num_mem_kv=num_mem_kv,
            shared_qk=shared_qk,
            context_shared_qk=context_shared_qk,
            use_rezero=use_rezero,
            use_scale_norm=use_scale_norm,
            tie_embedding=tie_embedding,
            use_absolute_pos_emb=use_absolute_pos_emb,
            shift_tokens=shift_tokens,
        )
        super().__init__(config, activation=override)

    def forward(
        self,
        x: Tensor,
        input_mask: Tensor | None = None,
        context: Tensor | None = None,
        context_mask: Tensor | None = None,
        mask: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """x [B, N] token ids -> (logits [B, N, num_tokens] or embeddings, aux_loss).
        ``mask`` is an alias of ``input_mask`` (the shared wrappers' name)."""
        input_mask = mask if input_mask is None else input_mask
        self.check_tokens(x, input_mask)
        return self.run(x, input_mask=input_mask, context=context, context_mask=context_mask)


def _find_body(net: nn.Module) -> RoutingBody | None:
    for module in net.modules():
        if isinstance(module, RoutingBody):
            return module
    return None


class Autopadder(_SharedAutopadder):
    """Pads to the local attention window, as the reference did (a no-op without local heads:
    longrange's layers accept any length, so padding is only a compatibility convenience)."""

    def __init__(self, net: nn.Module, pad_multiple: int | None = None) -> None:
        if pad_multiple is None:
            body = _find_body(net)
            pad_multiple = body.pad_multiple if body is not None else 0
        super().__init__(net, pad_multiple=max(1, pad_multiple))


class AutoregressiveWrapper(_SharedWrapper):
    """The shared wrapper with the reference's defaults: ``ignore_index`` = ``pad_value``,
    ``forward(x, return_loss=False, randomly_truncate_sequence=False)``; ``x`` may be a list of
    1-d sequences (right-padded with ``pad_value``)."""

    def __init__(self, net: nn.Module, ignore_index: int | None = None, pad_value: int = 0) -> None:
        super().__init__(
            net, ignore_index=pad_value if ignore_index is None else ignore_index, pad_value=pad_value
        )

    def update_kmeans(self) -> int:
        return update_kmeans(self.net)

    def forward(self, x, return_loss: bool = False, randomly_truncate_sequence: bool = False, **kwargs: Any):
        if not isinstance(x, Tensor):
            x = pad_sequence(list(x), batch_first=True, padding_value=self.pad_value)
        if randomly_truncate_sequence and return_loss:
            length = int(torch.randint(2, x.shape[1] + 1, ()))
            x = x[:, :length]
            for key in ("mask", "input_mask"):
                if kwargs.get(key) is not None:
                    kwargs[key] = kwargs[key][:, :length]
        return super().forward(x, return_loss=return_loss, **kwargs)


def _split_prefixed(kwargs: dict[str, Any]) -> tuple[dict, dict, dict]:
    enc = {k[4:]: v for k, v in kwargs.items() if k.startswith("enc_")}
    dec = {k[4:]: v for k, v in kwargs.items() if k.startswith("dec_")}
    rest = {k: v for k, v in kwargs.items() if not k.startswith(("enc_", "dec_"))}
    return enc, dec, rest


class RoutingTransformerEncDec(nn.Module):
    """Encoder (non-causal, returns embeddings) + causal decoder reading the encoder output.

    Keywords go to the encoder with the prefix ``enc_`` and to the decoder with ``dec_``; at
    call time too (``enc_input_mask`` also becomes the decoder's ``context_mask``).
    """

    def __init__(self, dim: int, ignore_index: int | None = None, pad_value: int = 0, **kwargs: Any) -> None:
        super().__init__()
        enc_kwargs, dec_kwargs, rest = _split_prefixed(kwargs)
        if rest:
            raise TypeError(f"keywords must start with enc_ or dec_, got {sorted(rest)}")
        if "return_embeddings" in enc_kwargs:
            raise ValueError("enc_return_embeddings cannot be set: the encoder always returns embeddings")
        if "dim" in enc_kwargs or "dim" in dec_kwargs:
            raise ValueError(
                "set dim once for both (RoutingTransformerEncDec(dim=...)), not enc_dim / dec_dim"
            )
        for name in ("causal", "receives_context"):
            if dec_kwargs.get(name) is False:
                raise ValueError(
                    f"dec_{name}=False is not possible: the decoder is causal and reads the encoder"
                )
        enc_kwargs.update(dim=dim, return_embeddings=True, _register_kmeans_update=False)
        dec_kwargs.update(dim=dim, causal=True, receives_context=True, _register_kmeans_update=False)
        enc_kwargs.setdefault("window_size", 256)
        dec_kwargs.setdefault("window_size", 256)
        self.enc = RoutingTransformerLM(**enc_kwargs)
        self.dec = AutoregressiveWrapper(
            RoutingTransformerLM(**dec_kwargs),
            ignore_index=pad_value if ignore_index is None else ignore_index,
            pad_value=pad_value,
        )
        self._handle: KmeansUpdateHandle | None = None
        self.register_kmeans_update()

    def register_kmeans_update(self) -> KmeansUpdateHandle:
        self.cancel_kmeans_update()
        self._handle = KmeansUpdateHandle(self)
        return self._handle

    def cancel_kmeans_update(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def update_kmeans(self) -> int:
        return update_kmeans(self)

    def _encode(self, seq_in: Tensor, enc_kwargs: dict, dec_kwargs: dict) -> tuple[Tensor, Tensor]:
        if "input_mask" in enc_kwargs:
            dec_kwargs.setdefault("context_mask", enc_kwargs["input_mask"])
        return self.enc(seq_in, **enc_kwargs)

    @torch.no_grad()
    def generate(
        self,
        seq_in: Tensor,
        seq_out_start: Tensor,
        max_seq_len: int | None = None,
        eos_token: int | None = None,
        temperature: float = 1.0,
        filter_logits_fn=top_k,
        filter_thres: float = 0.9,
        **kwargs: Any,
    ) -> Tensor:
        """Sample ``max_seq_len`` (default: the decoder's) tokens after ``seq_out_start``.

        The decoder runs incrementally: the encoder output is routed once, and each new token
        costs one step per layer (the reference re-ran the whole prefix for every token)."""
        enc_kwargs, dec_kwargs, rest = _split_prefixed(kwargs)
        if rest:
            raise TypeError(f"keywords must start with enc_ or dec_, got {sorted(rest)}")
        length = self.dec.max_seq_len if max_seq_len is None else max_seq_len
        if not isinstance(length, int) or length < 0:
            raise ValueError(f"max_seq_len must be a non-negative integer, got {length!r}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        context, _ = self._encode(seq_in, enc_kwargs, dec_kwargs)
        context_mask = dec_kwargs.pop("context_mask", None)
        if dec_kwargs:
            raise TypeError(f"decoder keywords {sorted(dec_kwargs)} are not used by generate")
        decoder = self.dec.net
        was_training = self.training
        self.eval()
        try:
            squeeze = seq_out_start.dim() == 1
            tokens = (seq_out_start[None] if squeeze else seq_out_start).long()
            limit = decoder.config.max_seq_len
            logits, state = decoder.prefill(tokens[:, -limit:], context=context, context_mask=context_mask)
            logits, filled = logits[:, -1], min(tokens.shape[1], limit)
            new: list[Tensor] = []
            done = torch.zeros(tokens.shape[0], dtype=torch.bool, device=tokens.device)
            for i in range(length):
                nxt = self.dec._pick(logits, temperature, filter_logits_fn, filter_thres)
                new.append(nxt)
                tokens = torch.cat((tokens, nxt[:, None]), dim=1)
                if eos_token is not None:
                    done |= nxt == eos_token
                    if bool(done.all()):
                        break
                if i == length - 1:
                    break
                if filled >= limit:
                    # the decoder window is full: restart from the latest half window
                    window = tokens[:, -max(1, limit // 2) :]
                    logits, state = decoder.prefill(window, context=context, context_mask=context_mask)
                    logits, filled = logits[:, -1], window.shape[1]
                else:
                    logits, state = decoder.step(nxt, state)
                    filled += 1
            out = self.dec._finish(new, eos_token, tokens.shape[0], tokens.device)
        finally:
            self.train(was_training)
        return out[0] if squeeze else out

    def forward(
        self,
        seq_in: Tensor,
        seq_out: Tensor,
        return_loss: bool = False,
        randomly_truncate_sequence: bool = False,
        **kwargs: Any,
    ) -> tuple[Tensor, Tensor]:
        enc_kwargs, dec_kwargs, rest = _split_prefixed(kwargs)
        if rest:
            raise TypeError(f"keywords must start with enc_ or dec_, got {sorted(rest)}")
        context, enc_aux = self._encode(seq_in, enc_kwargs, dec_kwargs)
        out = self.dec(
            seq_out,
            return_loss=return_loss,
            randomly_truncate_sequence=randomly_truncate_sequence,
            context=context,
            **dec_kwargs,
        )
        if return_loss:
            return out + enc_aux, torch.zeros((), device=enc_aux.device)
        logits, dec_aux = out
        return logits, dec_aux + enc_aux


# --- weights of the reference package ----------------------------------------------------


def _our_name(key: str, shift: bool) -> str:
    key = re.sub(r"layers\.layers\.(\d+)\.0\.", r"layers.blocks.\1.f.", key)
    key = re.sub(r"layers\.layers\.(\d+)\.1\.", r"layers.blocks.\1.g.", key)
    key = re.sub(r"layers\.blocks\.(\d+)\.([fg])\.net\.", r"layers.blocks.\1.\2.", key)
    if shift:
        # the reference wraps each branch's function in PreShiftTokens; ours shifts in place
        key = re.sub(r"(layers\.blocks\.\d+\.[fg]\.)fn\.fn\.", r"\1fn.", key)
    # the reference's wrapper holds its LM as net.net (inside its Autopadder)
    return re.sub(r"^dec\.net\.net\.", "dec.net.", key)


def load_reference_weights(model: nn.Module, reference: dict[str, Tensor]) -> None:
    """Copy a ``routing_transformer`` model's state dict (LM, block stack or enc-dec) into
    ``model``, k-means centroids included; every one of our weights must be found."""
    shift = any(m.config.shift_tokens for m in model.modules() if isinstance(m, RoutingBody))
    renamed = {_our_name(k, shift): v for k, v in reference.items()}
    ours = model.state_dict()
    for key, tensor in ours.items():
        theirs = renamed.get(key)
        if (
            key.endswith(("mem_key", "mem_value"))
            and theirs is not None
            and theirs.shape[2] < tensor.shape[2]
        ):
            # a causal layer here has at least one memory key where the reference may have
            # none: the reference's keys fill the first slots, the extra ones stay as they are
            renamed[key] = torch.cat((theirs.to(tensor), tensor[:, :, theirs.shape[2] :]), dim=2)
    missing = [k for k in ours if k not in renamed and not k.endswith("abs_pos_emb.emb.weight")]
    if missing:
        raise ValueError(f"reference state dict has no weight for {missing[:5]}")
    copy_weights(model, renamed, {k: k for k in ours if k in renamed})
    for name, module in model.named_modules():
        if isinstance(module, AbsolutePositionalEmbedding) and f"{name}.emb.weight" not in renamed:
            # routing_transformer 1.6.1 accepts use_absolute_pos_emb but never adds positions
            with torch.no_grad():
                module.emb.weight.zero_()


register_converter(RoutingTransformerEncDec, convert_reference)

__all__ = [
    "Autopadder",
    "AutoregressiveWrapper",
    "RoutingTransformer",
    "RoutingTransformerEncDec",
    "RoutingTransformerLM",
]
