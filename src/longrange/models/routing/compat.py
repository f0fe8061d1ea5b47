"""The ``routing_transformer`` package's public classes, with its names, keywords and defaults.

Each constructor is one :class:`~longrange.models.keywords.KeywordTable` parsed into a
:class:`~longrange.models.routing.config.RoutingConfig` (keywords may also be given by
position, in the reference's order); only the return conventions are the reference's:

- :class:`RoutingTransformerLM`: ``forward(x, input_mask=None, context=None, context_mask=None)``
  -> ``(logits, aux_loss)``;
- :class:`RoutingTransformer`: the block stack, ``forward(x, **kwargs)`` -> ``(x, aux_loss)``;
- auxiliary losses have the reference's shape: [1], or 0-d from a reversible stack (so the
  wrapper's loss too); ``update_kmeans()`` returns None;
- :class:`RoutingTransformerEncDec`: encoder + causal decoder with routed cross attention;
  ``forward(seq_in, seq_out, return_loss=True)`` -> ``(loss, aux_loss)`` with the reference's
  values: the loss holds the encoder's auxiliary loss and the second value is a zero that
  requires grad, except with a reversible decoder, where the second value is the encoder's
  auxiliary loss. ``loss.backward(); aux_loss.backward()`` (the reference's recipe) gives the
  reference's total gradient in both cases, and so does ``loss.backward()`` alone (the
  reference loses the encoder's part there). Without ``return_loss`` it returns ``(logits,
  aux_loss)`` (the reference fails). ``cancel_kmeans_update`` removes the update handle;
  ``generate`` routes the encoder output once and decodes incrementally;
- :class:`AutoregressiveWrapper` and :class:`Autopadder`: the shared ones with the reference's
  defaults (``ignore_index = pad_value``, ``return_loss=False``, ``randomly_truncate_sequence``).

``longrange.convert.load_reference(model, state_dict)`` copies a reference model's weights
(k-means centroids included) into any of these (:mod:`longrange.models.routing.convert`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pad_sequence

from longrange.generation import top_k
from longrange.models.autoregressive import AutoregressiveWrapper as _SharedWrapper
from longrange.models.encdec import EncoderDecoder
from longrange.models.keywords import KeywordTable
from longrange.models.routing.config import RoutingConfig
from longrange.models.routing.layers import ACTIVATIONS
from longrange.models.routing.model import RoutingBody, RoutingLM
from longrange.models.routing.routed import KmeansUpdates, update_kmeans
from longrange.modules.autopad import Autopadder as _SharedAutopadder

# the reference's keywords with their defaults, in its order (they may be given by position)
_LM_DEFAULTS: dict[str, Any] = dict(
    heads=8, dim_head=64, window_size=64, local_attn_window_size=None, local_attn_radius_blocks=1,
    causal=False, emb_dim=None, weight_tie=False, attn_dropout=0.0, ff_dropout=0.0,
    attn_layer_dropout=0.0, layer_dropout=0.0, ff_mult=4, ff_activation=None, ff_glu=False,
    return_embeddings=False, n_local_attn_heads=0, reversible=False, ff_chunks=1,
    kmeans_ema_decay=0.999, commitment_factor=1e-4, receives_context=False, context_window_size=None,
    rel_pos_emb=True, _register_kmeans_update=True, pkm_layers=(), pkm_num_keys=128, moe_layers=(),
    moe_num_experts=4, moe_loss_coef=1e-2, num_mem_kv=0, shared_qk=None, context_shared_qk=False,
    use_rezero=False, use_scale_norm=False, tie_embedding=False, use_absolute_pos_emb=False,
    shift_tokens=False,
)  # fmt: skip
_BODY_DEFAULTS: dict[str, Any] = dict(
    heads=8, dim_head=None, window_size=64, local_attn_window_size=256, local_attn_radius_blocks=1,
    causal=False, weight_tie=False, attn_dropout=0.0, ff_dropout=0.0, attn_layer_dropout=0.0,
    layer_dropout=0.0, n_local_attn_heads=0, ff_glu=False, reversible=False, ff_chunks=1,
    kmeans_ema_decay=0.999, commitment_factor=1e-4, receives_context=False, context_window_size=None,
    _register_kmeans_update=False, rel_pos_emb=True, pkm_layers=(), pkm_num_keys=128, moe_layers=(),
    moe_num_experts=4, moe_loss_coef=1e-2, num_mem_kv=0, shared_qk=None, context_shared_qk=False,
    use_rezero=False, use_scale_norm=False, ff_activation=None, shift_tokens=False,
)  # fmt: skip
_RENAMES = {"_register_kmeans_update": "kmeans_update_on_backward"}
LM_KEYWORDS = KeywordTable(
    "RoutingTransformerLM",
    _LM_DEFAULTS,
    required=("num_tokens", "dim", "depth", "max_seq_len"),
    renames={"num_tokens": "vocab_size", **_RENAMES},
)
BODY_KEYWORDS = KeywordTable(
    "RoutingTransformer", _BODY_DEFAULTS, required=("dim", "depth", "max_seq_len"), renames=_RENAMES
)


def _config(table: KeywordTable, args: tuple, kwargs: dict[str, Any]):
    """(RoutingConfig, activation override) for a reference constructor call. The reference
    takes ``ff_activation`` as an nn.Module class: a known one becomes a config name, any other
    is kept as an override (not saved with the config)."""
    names = [*table.required, *table.defaults]
    if len(args) > len(names):
        raise TypeError(f"{table.owner} takes at most {len(names)} positional arguments, got {len(args)}")
    positional = dict(zip(names, args))
    twice = sorted(set(positional) & set(kwargs))
    if twice:
        raise TypeError(f"{table.owner} got multiple values for {twice}")
    fields = table.parse({**positional, **kwargs})
    activation = fields.pop("ff_activation")
    if activation is None or isinstance(activation, str):
        return RoutingConfig(**fields, ff_activation=activation), None
    for name, cls in ACTIVATIONS.items():
        if activation is cls:
            return RoutingConfig(**fields, ff_activation=name), None
    if isinstance(activation, nn.Module) or (
        isinstance(activation, type) and issubclass(activation, nn.Module)
    ):
        return RoutingConfig(**fields), activation
    raise TypeError(f"ff_activation must be None, a name or an nn.Module class, got {activation!r}")


def reference_aux(aux: Tensor, reversible: bool) -> Tensor:
    """An auxiliary loss in the reference's shape: [1] from a plain stack, 0-d from a
    reversible one (the reference sums its per-block losses there)."""
    return aux.reshape(()) if reversible else aux.reshape(1)


class RoutingTransformer(RoutingBody):
    """The reference's block stack (``routing_transformer.RoutingTransformer(dim, depth,
    max_seq_len, ...)``): ``forward(x, **kwargs)`` -> ``(x, aux_loss)``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        config, activation = _config(BODY_KEYWORDS, args, kwargs)
        super().__init__(config, activation=activation)

    def forward(self, x: Tensor, **kwargs) -> tuple[Tensor, Tensor]:
        x, aux = super().forward(x, **kwargs)
        return x, reference_aux(aux, self.config.reversible)

    def update_kmeans(self) -> None:
        """Apply the pending k-means updates now (the reference returns nothing)."""
        super().update_kmeans()


class RoutingTransformerLM(RoutingLM):
    """The reference's language model (``RoutingTransformerLM(num_tokens, dim, depth,
    max_seq_len, ...)``, or a :class:`RoutingConfig`); ``forward`` returns ``(logits,
    aux_loss)``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if len(args) == 1 and not kwargs and isinstance(args[0], RoutingConfig):
            super().__init__(args[0])  # from_pretrained builds the class from its config
            return
        config, activation = _config(LM_KEYWORDS, args, kwargs)
        super().__init__(config, activation=activation)

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
        out, aux = self.run(x, input_mask=input_mask, context=context, context_mask=context_mask)
        return out, reference_aux(aux, self.config.reversible)

    def update_kmeans(self) -> None:
        """Apply the pending k-means updates now (the reference returns nothing)."""
        super().update_kmeans()


def _find_body(net: nn.Module) -> RoutingBody | None:
    for module in net.modules():
        if isinstance(module, RoutingBody):
            return module
    return None


class Autopadder(_SharedAutopadder):
    """Pads to the local attention window, as the reference did (a no-op without local heads:
    longrange's layers accept any length, so padding is only a compatibility convenience).
    When it pads, the padding mask goes to the net as ``input_mask``, as the reference's did
    (the block stack and a user's module around the LM take no ``mask``), unless the caller
    passed ``mask``."""

    def __init__(self, net: nn.Module, pad_multiple: int | None = None) -> None:
        if pad_multiple is None:
            body = _find_body(net)
            pad_multiple = body.pad_multiple if body is not None else 0
        super().__init__(net, pad_multiple=max(1, pad_multiple))

    def forward(self, x: Tensor, **kwargs: Any) -> Any:
        if "mask" not in kwargs and x.shape[1] % self.pad_multiple:
            kwargs.setdefault("input_mask", None)
        return super().forward(x, **kwargs)


class AutoregressiveWrapper(_SharedWrapper):
    """The shared wrapper with the reference's defaults: ``ignore_index`` = ``pad_value``,
    ``forward(x, return_loss=False, randomly_truncate_sequence=False)``; ``x`` may be a list of
    1-d sequences (right-padded with ``pad_value``). The loss has the reference's shape
    ([1]; 0-d with a reversible net). ``generate`` decodes incrementally; past
    ``max_seq_len`` it restarts from the last half window, or with ``window="slide"``
    re-runs a full window per token as the reference does."""

    def __init__(self, net: nn.Module, ignore_index: int | None = None, pad_value: int = 0) -> None:
        super().__init__(
            net, ignore_index=pad_value if ignore_index is None else ignore_index, pad_value=pad_value
        )

    def update_kmeans(self) -> None:
        update_kmeans(self.net)

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


class RoutingTransformerEncDec(KmeansUpdates, EncoderDecoder):
    """Encoder (non-causal, returns embeddings) + causal decoder reading the encoder output.

    Keywords go to the encoder with the prefix ``enc_`` and to the decoder with ``dec_``; at
    call time too (``enc_input_mask`` also becomes the decoder's ``context_mask``). Both sides
    default to ``window_size=256``; one k-means update handle covers both.
    """

    wrapper_class = AutoregressiveWrapper
    mask_key = "input_mask"
    # dec_causal=True / dec_receives_context=True are accepted (False is refused)
    fixed_decoder_keys = ()

    def __init__(self, dim: int, ignore_index: int | None = None, pad_value: int = 0, **kwargs: Any) -> None:
        super().__init__(dim, ignore_index, pad_value, **kwargs)
        self.register_kmeans_update()

    def update_kmeans(self) -> None:
        """Apply the pending k-means updates of both sides now."""
        super().update_kmeans()

    def make_encoder(self, dim: int, kwargs: dict[str, Any]) -> nn.Module:
        if "return_embeddings" in kwargs:
            raise ValueError("enc_return_embeddings cannot be set: the encoder always returns embeddings")
        fixed = dict(dim=dim, return_embeddings=True, _register_kmeans_update=False)
        return RoutingTransformerLM(**{"window_size": 256, **kwargs, **fixed})

    def make_decoder(self, dim: int, kwargs: dict[str, Any]) -> nn.Module:
        for name in ("causal", "receives_context"):
            if kwargs.get(name) is False:
                raise ValueError(
                    f"dec_{name}=False is not possible: the decoder is causal and reads the encoder"
                )
        fixed = dict(dim=dim, causal=True, receives_context=True, _register_kmeans_update=False)
        return RoutingTransformerLM(**{"window_size": 256, **kwargs, **fixed})

    @torch.no_grad()
    def generate(
        self,
        seq_in: Tensor,
        seq_out_start: Tensor,
        max_seq_len: int | None = None,
        eos_token: int | None = None,
        temperature: float = 1.0,
        filter_logits_fn: Callable[[Tensor, float], Tensor] = top_k,
        filter_thres: float = 0.9,
        window: str = "restart",
        *,
        seq_len: int | None = None,
        **kwargs: Any,
    ) -> Tensor:
        """Sample ``max_seq_len`` (default: the decoder's) tokens after ``seq_out_start``;
        ``seq_len``, the name the reference's README uses, is accepted for it. ``window``:
        "restart" (default) or "slide" past the decoder's window (see the wrapper).

        The decoder runs incrementally: the encoder output is routed once, and each new token
        costs one step per layer (the reference re-ran the whole prefix for every token)."""
        if seq_len is not None:
            if max_seq_len is not None:
                raise TypeError("generate got both max_seq_len and seq_len (the same length)")
            max_seq_len = seq_len
        _, dec_kwargs, _ = self.split(kwargs)
        unused = sorted(set(dec_kwargs) - {"context_mask"})
        if unused:
            raise TypeError(f"decoder keywords {unused} are not used by generate")
        length = self.dec.max_seq_len if max_seq_len is None else max_seq_len
        if isinstance(length, bool) or not isinstance(length, int) or length < 0:
            raise ValueError(f"max_seq_len must be a non-negative integer, got {length!r}")
        sampling = dict(
            eos_token=eos_token, temperature=temperature, filter_thres=filter_thres, window=window
        )
        return super().generate(
            seq_in, seq_out_start, length, filter_logits_fn=filter_logits_fn, **sampling, **kwargs
        )

    def forward(
        self,
        seq_in: Tensor,
        seq_out: Tensor,
        return_loss: bool = False,
        randomly_truncate_sequence: bool = False,
        **kwargs: Any,
    ) -> tuple[Tensor, Tensor]:
        enc_kwargs, dec_kwargs, _ = self.split(kwargs)
        context, enc_aux = self.encode(seq_in, enc_kwargs, dec_kwargs)
        out = self.dec(
            seq_out,
            return_loss=return_loss,
            randomly_truncate_sequence=randomly_truncate_sequence,
            context=context,
            **dec_kwargs,
        )
        if not return_loss:
            logits, dec_aux = out
            return logits, dec_aux + enc_aux
        if self.dec.net.config.reversible:
            # The reference returns (decoder loss, encoder aux loss) here and has the caller
            # call backward on both. The encoder's graph can be walked only once, so its
            # gradient rides on the first value (whose value stays the decoder's loss) and
            # the second is the aux loss's value as a leaf: backward on both, or on their
            # sum, gives the reference's total gradient.
            riding = (enc_aux - enc_aux.detach()).sum()
            return out + riding, enc_aux.detach().requires_grad_(torch.is_grad_enabled())
        return out + enc_aux, torch.zeros((), device=out.device, requires_grad=True)


__all__ = [
    "BODY_KEYWORDS",
    "LM_KEYWORDS",
    "Autopadder",
    "AutoregressiveWrapper",
    "RoutingTransformer",
    "RoutingTransformerEncDec",
    "RoutingTransformerLM",
]
