"""The transformers causal-LM class of a longrange family.

:class:`LongRangeForCausalLM` is a ``PreTrainedModel`` that holds the family's
:class:`~longrange.models.base.LongRangeLM` as its submodule ``model``: the weights are the
longrange model's own parameters, shared, never copied (:func:`wrap` puts an existing model
in one). It is written on the longrange protocol only (``forward_lm``, ``init_state``,
``prefill``, ``context_limit``: docs/ARCHITECTURE.md, "Protocol"), so every family gets it
unchanged. Notable choices:

- ``forward(input_ids, attention_mask, labels, cache, use_cache)`` returns
  ``CausalLMOutputWithPast``. ``labels`` are shifted inside (position t predicts t + 1) and
  -100 is ignored; the family's auxiliary loss (k-means commitment, MoE balance) is added, as
  longrange's trainer adds it. ``attention_mask`` (0/1 or bool, True = keep) becomes
  longrange's padding mask; an all-ones mask is dropped. A row whose kept tokens do not come
  first (left padding) is read with them moved to the front, so that its positions count kept
  tokens only, as transformers' position ids do: a padded row's logits are its unpadded ones.
- A decoding cache is made only when asked (``use_cache=True`` or a cache given; ``generate``
  does both), because it is built by ``prefill``, which runs without gradients; a plain call
  runs ``forward_lm`` and trains. With a cache the call runs ``prefill`` on the new tokens only
  (the state continues), so ``generate`` decodes on the family's incremental state. A padded
  batch cannot use it (``prefill`` takes no padding mask): refused, with ``use_cache=False``
  (a full re-run per token, padding honoured) as the way out.
- A bounded context (``context_limit()``) is handled as longrange's decoding loop handles it:
  when the state is full, decoding restarts from the most recent half window; so greedy
  ``generate`` equals ``model.generate(prompt, n, temperature=0)`` token for token, however
  long. A single call longer than the window is refused.
- Inputs longer than ``max_seq_len`` are refused unless ``config.segment_long_inputs``
  (then read in segments, the state carried for the families that carry state).
- ``save_pretrained`` writes the weights under longrange's own names (no ``model.``
  prefix), so ``model.safetensors`` is the same file in both formats; loading adds the prefix
  back (transformers' base-model-prefix rule). Tied parameters (a head tied to the embedding)
  are found on the longrange module and declared to transformers, so loading keeps them tied.
  ``load_state_dict`` takes either naming, so the Trainer's resume from a checkpoint (and its
  ``load_best_model_at_end``), which loads that file through it, restores the weights.
- ``from_pretrained`` builds models on the meta device and refills non-persistent buffers
  with empty memory for ``_init_weights`` to compute; the longrange module computes its own
  (rotary frequencies, ...) when built, so it is built on the CPU and its buffers are kept and
  put back by ``_init_weights``.
- HF activation (gradient) checkpointing is refused: the blocks are the family's own, not
  transformers layers; the families' ``reversible`` option is longrange's way to save
  activation memory.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import GenerationMixin, PreTrainedModel
from transformers.generation.configuration_utils import GenerationMode
from transformers.modeling_outputs import CausalLMOutputWithPast

from longrange.hf.cache import LongRangeCache
from longrange.hf.configuration import LongRangeConfig, config_class_for
from longrange.models.base import LongRangeLM
from longrange.models.registry import get_family

IGNORE_INDEX = -100
DECODING_MODES = (GenerationMode.GREEDY_SEARCH, GenerationMode.SAMPLE)


class LongRangeForCausalLM(PreTrainedModel, GenerationMixin):
    """Base of the per-family causal-LM classes; use :func:`model_class_for` or the Auto classes."""

    config_class = LongRangeConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = False
    # The Trainer passes num_items_in_batch (the loss normaliser under gradient accumulation).
    accepts_loss_kwargs = True
    _no_split_modules: ClassVar[list[str]] = []

    def __init__(self, config: LongRangeConfig, model: LongRangeLM | None = None) -> None:
        if not isinstance(config, LongRangeConfig) or not config.family:
            raise TypeError(f"config must be a longrange family config, got {type(config).__name__}")
        super().__init__(config)
        if model is None:
            model_class = get_family(config.family).model_class
            # Built on a real device even under from_pretrained's meta device, for its
            # non-persistent buffers (module docstring), and in float32 under a half-precision
            # default dtype (from_pretrained's dtype=), then cast: the buffers are computed as
            # longrange computes them, and a family that draws an orthogonal projection (QR
            # has no CPU half-precision kernel) can be built at all.
            dtype = torch.get_default_dtype()
            device = torch.device("cpu") if _on_meta_device() else nullcontext()
            with device, _default_dtype(torch.float32 if dtype.itemsize < 4 else dtype):
                model = model_class(config.longrange_config()).to(dtype)
        elif not isinstance(model, get_family(config.family).model_class):
            raise TypeError(f"model must be a {config.family!r} LongRangeLM, got {type(model).__name__}")
        self.model = model
        self._buffer_values = _non_persistent_buffers(model)
        self._tied_weights_keys = _tied_parameters(model, self.base_model_prefix)
        self.config.tie_word_embeddings = bool(self._tied_weights_keys)
        self.post_init()

    @property
    def longrange(self) -> LongRangeLM:
        """The wrapped longrange model (the same parameters)."""
        return self.model

    @torch.no_grad()
    def _init_weights(self, module: torch.nn.Module) -> None:
        # The longrange model initialises its parameters when it is built (loading then
        # overwrites them); only the buffers transformers emptied are put back.
        for name, value in self._buffer_values.get(id(module), {}).items():
            buffer = module._buffers.get(name)
            if buffer is not None:
                module._buffers[name] = value.to(device=buffer.device, dtype=buffer.dtype)

    def save_pretrained(self, save_directory: Any, *args: Any, state_dict: dict | None = None, **kwargs: Any):
        """transformers' save_pretrained, with the weights under longrange's names (the
        model.safetensors a longrange model directory holds)."""
        if state_dict is None:
            state_dict = self.model.weights_for_saving()
        else:
            prefix = f"{self.base_model_prefix}."
            tied = self.all_tied_weights_keys
            state_dict = {k.removeprefix(prefix): v for k, v in state_dict.items() if k not in tied}
        return super().save_pretrained(save_directory, *args, state_dict=state_dict, **kwargs)

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        """``nn.Module.load_state_dict``, also taking a state dict under longrange's names (what
        :meth:`save_pretrained` writes), as the Trainer does when it resumes from a checkpoint
        or reloads its best model; a tied name left out is filled from the name it is tied to."""
        return super().load_state_dict(self._with_prefix(state_dict), strict=strict, assign=assign)

    def _with_prefix(self, state_dict: Any) -> Any:
        ours = self.state_dict(keep_vars=True)
        prefix = f"{self.base_model_prefix}."
        if not state_dict or all(k in ours for k in state_dict):
            return state_dict
        if not all(f"{prefix}{k}" in ours for k in state_dict):
            return state_dict  # neither naming: nn.Module reports the keys
        out = {f"{prefix}{k}": v for k, v in state_dict.items()}
        for pair in self._tied_weights_keys.items():
            for name, alias in (pair, pair[::-1]):
                if name not in out and alias in out:
                    out[name] = out[alias]
        return out

    def get_input_embeddings(self) -> torch.nn.Module | None:
        """The longrange model's token embedding (its ``nn.Embedding`` child of ``vocab_size``
        rows; each family names it its own way), None for a model without one."""
        vocab = self.model.config.vocab_size
        for child in self.model.children():
            if isinstance(child, torch.nn.Embedding) and child.num_embeddings == vocab:
                return child
        return None

    def resize_token_embeddings(
        self, new_num_tokens: int | None = None, pad_to_multiple_of: int | None = None, **kwargs: Any
    ) -> torch.nn.Module | None:
        """Refused unless it keeps the size: the vocabulary size is a field of the family's
        config that its layers (embedding, output head, logits) are built from."""
        vocab = self.model.config.vocab_size
        size = vocab if new_num_tokens is None else new_num_tokens
        if pad_to_multiple_of is not None and pad_to_multiple_of > 0:
            size = -(-size // pad_to_multiple_of) * pad_to_multiple_of
        if size != vocab:
            raise ValueError(
                f"new_num_tokens must be the model's vocab_size ({vocab}), got {size}: longrange models do "
                "not resize their token embeddings; build the model with the vocab_size you need"
            )
        return self.get_input_embeddings()

    def get_output_embeddings(self) -> torch.nn.Module | None:
        return None

    def activation_checkpointing_enable(self, *args: Any, **kwargs: Any) -> None:
        raise ValueError(
            f"{type(self).__name__} does not support activation (gradient) checkpointing: its blocks are "
            "the longrange family's own, not transformers layers. Train without gradient_checkpointing "
            "(families with a `reversible` option save activation memory that way)."
        )

    gradient_checkpointing_enable = activation_checkpointing_enable

    # --- forward ------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        labels: Tensor | None = None,
        cache: LongRangeCache | None = None,
        use_cache: bool | None = None,
        past_key_values: LongRangeCache | None = None,
        inputs_embeds: Tensor | None = None,
        return_dict: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        num_items_in_batch: Tensor | int | None = None,
    ) -> CausalLMOutputWithPast | tuple:
        """input_ids [B, N] -> logits [B, N, V]; see the module docstring for the rest."""
        if input_ids is None or inputs_embeds is not None:
            raise ValueError("longrange models take input_ids (token ids), not inputs_embeds")
        if output_attentions or output_hidden_states:
            raise ValueError("longrange models return logits only (no attentions or hidden states)")
        if cache is not None and past_key_values is not None:
            raise ValueError("pass the cache as `cache` or as `past_key_values`, not both")
        cache = cache if cache is not None else past_key_values
        if cache is not None and not isinstance(cache, LongRangeCache):
            raise TypeError(f"the cache of a longrange model is a LongRangeCache, got {type(cache).__name__}")
        mask = _padding_mask(attention_mask, input_ids)
        aux_loss = None
        if cache is not None or use_cache:
            if mask is not None:
                raise ValueError(
                    "a padded batch cannot decode on the longrange state (prefill takes no padding mask): "
                    "give rows of equal length, one prompt at a time, or pass use_cache=False"
                )
            cache = cache if cache is not None else LongRangeCache()
            logits = self._cached_logits(input_ids, cache)
        else:
            logits, aux_loss = self._padded_logits(input_ids, mask)
        loss = None if labels is None else self._loss(logits, labels, aux_loss, num_items_in_batch)
        out = CausalLMOutputWithPast(loss=loss, logits=logits, cache=cache)
        return_dict = self.config.return_dict if return_dict is None else return_dict
        return out if return_dict is not False else out.to_tuple()

    def _padded_logits(self, tokens: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """Where a row's kept tokens do not all come first (left padding, or padding between
        them), they are moved to the front for the call and their logits put back in place: a
        family's positions then count the kept tokens only, as transformers' position ids do,
        so a padded row reads as that row without its padding."""
        if mask is None or not bool((mask[:, 1:] & ~mask[:, :-1]).any()):
            return self._full_logits(tokens, mask)
        order = torch.sort((~mask).to(torch.uint8), dim=1, stable=True).indices  # kept first
        logits, aux_loss = self._full_logits(tokens.gather(1, order), mask.gather(1, order))
        back = torch.argsort(order, dim=1)
        return logits.gather(1, back[..., None].expand_as(logits)), aux_loss

    def _full_logits(self, tokens: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor | None]:
        lm = self.model
        limit = lm.config.max_seq_len
        if tokens.shape[1] <= limit:
            out = lm.forward_lm(tokens, mask=mask)
            if out.state is not None:
                out.state.close()  # a stateful family's fresh state (its kNN memory files) ends here
            return out.logits, out.aux_loss
        if not self.config.segment_long_inputs:
            raise ValueError(
                f"input of {tokens.shape[1]} tokens exceeds max_seq_len={limit}; load the model with "
                "segment_long_inputs=True to read longer inputs in segments (as `longrange eval` reads a "
                "document)"
            )
        # Segments of max_seq_len, the state carried across them where the family carries one
        # (docs/ARCHITECTURE.md, "Segment flow"); each segment alone otherwise.
        state = lm.init_state(tokens.shape[0], tokens.device) if lm.carries_state else None
        pieces, aux_loss = [], None
        try:
            for start in range(0, tokens.shape[1], limit):
                part = None if mask is None else mask[:, start : start + limit]
                out = lm.forward_lm(tokens[:, start : start + limit], mask=part, state=state)
                state = out.state if lm.carries_state else None
                pieces.append(out.logits)
                if out.aux_loss is not None:
                    aux_loss = out.aux_loss if aux_loss is None else aux_loss + out.aux_loss
        finally:
            if state is not None:
                state.close()
        return torch.cat(pieces, dim=1), aux_loss

    def _cached_logits(self, tokens: Tensor, cache: LongRangeCache) -> Tensor:
        """Run ``tokens`` [B, n] on the cache's state (made by the first call); [B, n, V]."""
        lm = self.model
        limit = lm.context_limit()
        n = tokens.shape[1]
        if limit is not None and n > limit:
            raise ValueError(
                f"{n} tokens in one call exceed the decoding window of {limit} positions; longrange's "
                f"generate keeps the last {limit} tokens of a longer prompt: pass input_ids[:, -{limit}:]"
            )
        if cache.state is None:
            logits, state = lm.prefill(tokens)
            cache.replace_state(state)
        elif limit is None or cache.state.position + n <= limit:
            # prefill updates the state in place and returns it; keeping what it returns
            # also holds for a family that returns a new state object.
            logits, cache.state = lm.prefill(tokens, cache.state)
        else:
            # The window is full: restart from the most recent half window, as
            # longrange.generation.decode_loop does (docs/ARCHITECTURE.md, "Decoding").
            history = torch.cat([cache.recent, tokens], dim=1)
            window = history[:, -max(n, limit // 2, 1) :]
            logits, state = lm.prefill(window)
            cache.replace_state(state)
            logits = logits[:, -n:]
        cache.remember(tokens, limit)
        return logits

    def _loss(
        self, logits: Tensor, labels: Tensor, aux_loss: Tensor | None, num_items: Tensor | int | None
    ) -> Tensor:
        if labels.shape != logits.shape[:2]:
            raise ValueError(
                f"labels shape {tuple(labels.shape)} must equal input_ids shape {tuple(logits.shape[:2])}"
            )
        targets = labels[:, 1:].to(logits.device)
        total = F.cross_entropy(
            logits[:, :-1].float().flatten(0, 1),
            targets.flatten(),
            ignore_index=IGNORE_INDEX,
            reduction="sum",
        )
        kept = (targets != IGNORE_INDEX).sum()
        if num_items is None:
            return _plus(total / kept.clamp(min=1), aux_loss)
        count = num_items.to(total.device) if isinstance(num_items, Tensor) else num_items
        # num_items counts the targets of every micro-batch the Trainer accumulates and sums
        # the losses of: the auxiliary loss (this call's mean) is weighted by this call's share
        # of them, so that the sum holds it once, as in one call on the whole batch.
        return _plus(total / count, None if aux_loss is None else aux_loss * (kept / count))

    # --- generate -----------------------------------------------------------------------------
    def _prepare_cache_for_generation(
        self,
        generation_config: Any,
        model_kwargs: dict,
        generation_mode: Any,
        batch_size: int,
        max_cache_length: int,
    ) -> None:
        if generation_mode not in DECODING_MODES:
            raise ValueError(
                f"longrange models generate by greedy search or sampling, not {generation_mode.value}: the "
                "decoding state cannot reorder, repeat or roll back batch rows"
            )
        cache = model_kwargs.get("cache")
        if cache is not None and not isinstance(cache, LongRangeCache):
            raise TypeError(f"the cache of a longrange model is a LongRangeCache, got {type(cache).__name__}")
        if cache is None and generation_config.use_cache is not False:
            model_kwargs["cache"] = LongRangeCache()


def _plus(loss: Tensor, aux_loss: Tensor | None) -> Tensor:
    return loss if aux_loss is None else loss + aux_loss


def _padding_mask(attention_mask: Tensor | None, input_ids: Tensor) -> Tensor | None:
    """transformers' attention mask (1 = keep) as longrange's bool mask; None when all kept."""
    if attention_mask is None:
        return None
    if attention_mask.shape != input_ids.shape:
        shapes = f"{tuple(attention_mask.shape)} and {tuple(input_ids.shape)}"
        raise ValueError(f"attention_mask and input_ids must have one shape, got {shapes}")
    mask = attention_mask.bool()
    return None if bool(mask.all()) else mask


@contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _on_meta_device() -> bool:
    return torch.empty(0).device.type == "meta"


def _non_persistent_buffers(module: torch.nn.Module) -> dict[int, dict[str, Tensor]]:
    """{id(submodule): {name: a copy}} of the buffers a state dict does not hold."""
    out: dict[int, dict[str, Tensor]] = {}
    for sub in module.modules():
        kept = {
            name: buf.detach().clone()
            for name, buf in sub._buffers.items()
            if buf is not None and name in sub._non_persistent_buffers_set
        }
        if kept:
            out[id(sub)] = kept
    return out


def _tied_parameters(module: torch.nn.Module, prefix: str) -> dict[str, str]:
    """{tied name: first name} for the parameters ``module`` shares between two names."""
    names: dict[int, list[str]] = {}
    for name, param in module.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
    return {
        f"{prefix}.{other}": f"{prefix}.{group[0]}"
        for group in names.values()
        if len(group) > 1
        for other in group[1:]
    }


_MODEL_CLASSES: dict[str, type[LongRangeForCausalLM]] = {}


def model_class_for(family: str) -> type[LongRangeForCausalLM]:
    """The causal-LM class of ``family`` (made once, named ``LongRange<Family>ForCausalLM``)."""
    config_class = config_class_for(family)
    if family not in _MODEL_CLASSES:
        name = config_class.__name__.removesuffix("Config") + "ForCausalLM"
        cls = type(name, (LongRangeForCausalLM,), {"config_class": config_class, "__module__": __name__})
        _MODEL_CLASSES[family] = cls
        globals()[name] = cls  # importable by name (pickling, transformers' class lookups)
    return _MODEL_CLASSES[family]


def wrap(model: LongRangeLM, **config: Any) -> LongRangeForCausalLM:
    """The transformers model around an existing longrange ``model`` (weights shared);
    ``config`` sets transformers-side settings (e.g. ``segment_long_inputs=True``)."""
    if not isinstance(model, LongRangeLM):
        raise TypeError(f"wrap takes a longrange LongRangeLM, got {type(model).__name__}")
    hf_config = config_class_for(model.config.family).from_longrange(model.config, **config)
    return model_class_for(model.config.family)(hf_config, model=model)
