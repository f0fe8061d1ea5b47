"""Sampling, written once: one decoding loop on every family's ``prefill`` / ``step``.

:func:`decode_loop` is the only loop in the library that turns logits into tokens
(docs/ARCHITECTURE.md, "Decoding"). Everything that samples calls it: :func:`generate` (the
library's sampler: temperature, top-k, top-p, repetition penalty), the reference-compatible
``AutoregressiveWrapper.generate`` and the encoder-decoders. Generating N tokens costs one
``prefill`` and N ``step`` calls, so a family with incremental state generates in O(N) model
work.

The end-of-sequence rule, defined here once: after a row emits ``eos_token`` it is finished
and every later position of that row holds ``fill`` (the eos token itself for
:func:`generate`, the wrapper's ``pad_value`` for the reference wrappers); the loop stops as
soon as every row is finished, and the result is padded with ``fill`` to the requested
length when ``pad_to_length`` is set (the reference wrappers return what was sampled).

Bounded contexts: when a model's ``context_limit()`` is reached, the loop either restarts
from the most recent half window (``window="restart"``, the default: one prefill of half a
window, then incremental steps again) or re-runs the last full window for every new token
(``window="slide"``, the reference packages' behaviour: each token is conditioned on the
whole window, at the cost of a full forward per token).

This module imports nothing else from longrange: a model is anything with ``prefill``,
``step`` and ``context_limit`` (:class:`Decoder`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any, Protocol

import torch
from torch import Tensor

WINDOW_MODES = ("restart", "slide")


class Decoder(Protocol):
    """What :func:`decode_loop` needs of a model (``LongRangeLM`` is one)."""

    def prefill(self, tokens: Tensor, state: Any = None, **conditioning: Any) -> tuple[Tensor, Any]: ...

    def step(self, token: Tensor, state: Any) -> tuple[Tensor, Any]: ...

    def context_limit(self) -> int | None: ...


# --- logit filters ------------------------------------------------------------------------
def filter_top_k(logits: Tensor, k: int) -> Tensor:
    """Keep the k largest logits per row; the rest become -inf."""
    k = min(k, logits.shape[-1])
    kth = logits.topk(k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def filter_top_p(logits: Tensor, p: float) -> Tensor:
    """Nucleus filtering: keep the smallest set of tokens whose probability reaches p."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    # A token is dropped when the mass before it already reaches p (the top token always stays).
    drop_sorted = (probs.cumsum(dim=-1) - probs) >= p
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def top_k(logits: Tensor, thres: float = 0.9) -> Tensor:
    """The reference packages' top-k: keep ``max(1, int((1 - thres) * V))`` logits per row."""
    return filter_top_k(logits, max(1, int((1 - thres) * logits.shape[-1])))


def top_p(logits: Tensor, thres: float = 0.9) -> Tensor:
    """The reference packages' nucleus filter (``thres`` is the kept probability mass)."""
    return filter_top_p(logits, thres)


def apply_repetition_penalty(logits: Tensor, seen: Tensor, penalty: float) -> Tensor:
    """CTRL-style penalty: logits of tokens already seen (``seen`` [B, V] bool) are divided by
    ``penalty`` when positive and multiplied when negative."""
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def apply_temperature(logits: Tensor, temperature: float) -> Tensor:
    """logits [B, V] (float32) divided by ``temperature`` > 0 for a softmax, at any temperature:
    a tiny one gives all the mass to the largest logit instead of NaN probabilities."""
    # Each row's largest logit moves to 0 before the division, so that a tiny temperature
    # sends the others to -inf rather than the largest to inf (whose softmax is NaN); one
    # below float32's smallest normal number would be 0 once cast (and 0 / 0 is NaN).
    tiny = torch.finfo(torch.float32).tiny
    return (logits - logits.amax(dim=-1, keepdim=True)) / max(temperature, tiny)


def sample_next(
    logits: Tensor,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """logits [B, V] -> token ids [B]; temperature 0 is greedy (argmax)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = apply_temperature(logits.float(), temperature)
    if top_k is not None:
        logits = filter_top_k(logits, top_k)
    if top_p is not None:
        logits = filter_top_p(logits, top_p)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


# --- the loop -----------------------------------------------------------------------------
Pick = Callable[[Tensor, Tensor], Tensor]  # (next-token logits [B, V], history [B, T]) -> [B]


def decode_loop(
    model: Decoder,
    tokens: Tensor,
    max_new_tokens: int,
    pick: Pick,
    *,
    eos_token: int | None = None,
    fill: int | None = None,
    pad_to_length: bool = True,
    window: str = "restart",
    conditioning: dict[str, Any] | None = None,
) -> Tensor:
    """Sample up to ``max_new_tokens`` after ``tokens`` [B, N] (long); return the new tokens
    [B, T] (T = ``max_new_tokens`` with ``pad_to_length``). ``pick`` chooses each token;
    ``conditioning`` (e.g. an encoder's ``context``) goes to every ``prefill``. The caller
    puts the model in eval mode; this runs without gradients."""
    if window not in WINDOW_MODES:
        raise ValueError(f"window must be one of {list(WINDOW_MODES)}, got {window!r}")
    fill = eos_token if fill is None else fill
    conditioning = conditioning or {}
    batch = tokens.shape[0]
    limit = model.context_limit()
    new: list[Tensor] = []
    with torch.no_grad():
        history = tokens
        logits, state, length = _start(model, history, limit, limit, conditioning)
        done = torch.zeros(batch, dtype=torch.bool, device=tokens.device)
        for i in range(max_new_tokens):
            nxt = pick(logits, history)
            if eos_token is not None:
                nxt = torch.where(done, torch.full_like(nxt, fill), nxt)
                done = done | (nxt == eos_token)
            new.append(nxt)
            if i == max_new_tokens - 1 or (eos_token is not None and bool(done.all())):
                break
            history = torch.cat([history, nxt[:, None]], dim=1)
            if limit is None or length < limit:
                logits, state = model.step(nxt, state)
                length += 1
            elif window == "slide":
                logits, state, length = _start(model, history, limit, limit, conditioning)
            else:
                logits, state, length = _start(model, history, limit, max(1, limit // 2), conditioning)
    out = torch.stack(new, dim=1) if new else tokens.new_zeros(batch, 0)
    if pad_to_length and fill is not None and out.shape[1] < max_new_tokens:
        out = torch.cat([out, out.new_full((batch, max_new_tokens - out.shape[1]), fill)], dim=1)
    return out


def _start(model: Decoder, history: Tensor, limit: int | None, keep: int | None, conditioning: dict):
    """Prefill the last ``keep`` tokens of ``history``; return (next logits, state, length)."""
    window = history if limit is None else history[:, -keep:]
    logits, state = model.prefill(window, **conditioning)
    return logits[:, -1], state, window.shape[1]


# --- the library's sampler ----------------------------------------------------------------
def check_sampling(
    max_new_tokens: Any,
    *,
    temperature: Any = 1.0,
    top_k: Any = None,
    top_p: Any = None,
    repetition_penalty: Any = 1.0,
    eos_token: Any = None,
    vocab_size: int | None = None,
) -> None:
    """Refuse a bad sampling argument with a ValueError naming it and the accepted values."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be a non-negative integer, got {max_new_tokens!r}")
    if not _finite_number(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be a positive integer or None, got {top_k!r}")
    if top_p is not None and not (_finite_number(top_p) and 0 < top_p <= 1):
        raise ValueError(f"top_p must lie in (0, 1] or be None, got {top_p!r}")
    if not _finite_number(repetition_penalty) or repetition_penalty <= 0:
        raise ValueError(f"repetition_penalty must be a finite number > 0, got {repetition_penalty!r}")
    if eos_token is not None:
        high = "" if vocab_size is None else f", {vocab_size}"
        if isinstance(eos_token, bool) or not isinstance(eos_token, int) or eos_token < 0:
            raise ValueError(f"eos_token must be None or a token id in [0{high}), got {eos_token!r}")
        if vocab_size is not None and eos_token >= vocab_size:
            raise ValueError(f"eos_token must be None or a token id in [0{high}), got {eos_token!r}")


def _finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def generate(
    model: Any,
    prompt: Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token: int | None = None,
    repetition_penalty: float = 1.0,
    generator: torch.Generator | None = None,
    window: str = "restart",
    compile: bool = False,
    **conditioning: Any,
) -> Tensor:
    """Sample continuations of ``prompt`` ([B, N] or [N] token ids); return the new tokens
    ([B, max_new_tokens] or [max_new_tokens]).

    temperature 0 is greedy. ``eos_token`` ends a row (the module docstring has the rule);
    ``window`` says what happens when a bounded context fills ("restart" or "slide");
    ``conditioning`` keywords (``context``, ``context_mask``) go to the model's ``prefill``.
    ``compile`` runs each step through ``torch.compile`` (the model's ``compiled_decoding``):
    the same tokens, faster steps once the first few have paid the compilation.
    """
    vocab = model.config.vocab_size
    check_sampling(
        max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        repetition_penalty=repetition_penalty,
        eos_token=eos_token,
        vocab_size=vocab,
    )
    if not isinstance(prompt, Tensor):
        raise TypeError(f"prompt must be a tensor of token ids, [N] or [B, N], got {type(prompt).__name__}")
    if prompt.dim() not in (1, 2):
        raise ValueError(f"prompt must have shape [N] or [B, N], got {tuple(prompt.shape)}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    if not isinstance(compile, bool):
        raise TypeError(f"compile must be True or False, got {compile!r}")
    if compile and not hasattr(model, "compiled_decoding"):
        name = type(model).__name__
        raise ValueError(f"compile=True needs a model with compiled_decoding(); {name} has none")
    squeeze = prompt.dim() == 1
    tokens = prompt[None] if squeeze else prompt
    if tokens.shape[1] == 0:
        raise ValueError("prompt must hold at least one token")
    model.check_tokens(tokens, allow_longer=True)
    tokens = tokens.long()
    seen = torch.zeros(tokens.shape[0], vocab, dtype=torch.bool, device=tokens.device)
    seen.scatter_(1, tokens, True)

    def pick(logits: Tensor, history: Tensor) -> Tensor:
        if repetition_penalty != 1.0:
            seen.scatter_(1, history[:, -1:], True)
            logits = apply_repetition_penalty(logits, seen, repetition_penalty)
        return sample_next(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)

    was_training = model.training
    model.eval()
    try:
        with model.compiled_decoding() if compile else nullcontext():
            out = decode_loop(
                model,
                tokens,
                max_new_tokens,
                pick,
                eos_token=eos_token,
                window=window,
                conditioning=conditioning,
            )
    finally:
        model.train(was_training)
    return out[0] if squeeze else out


class RecomputeDecoder:
    """Decoding for a network with no incremental state: every call re-runs the last
    ``max_seq_len`` tokens (or all of them when None) through ``net(tokens, **kwargs)``.

    ``kwargs`` are passed on each call; a padding ``mask`` [B, N] given with the prompt follows
    the tokens (new tokens are real: it grows with True on the right). Used by the wrappers
    for arbitrary networks; its ``context_limit`` is None because it slides by itself.
    """

    def __init__(
        self,
        net: Callable[..., Any],
        max_seq_len: int | None,
        kwargs: dict[str, Any] | None = None,
        *,
        mask_key: str = "mask",
    ) -> None:
        self.net, self.max_seq_len = net, max_seq_len
        self.kwargs = dict(kwargs or {})
        self.mask_key = mask_key
        self.mask = self.kwargs.pop(mask_key, None)

    def context_limit(self) -> None:
        return None

    def _run(self, tokens: Tensor, mask: Tensor | None) -> Tensor:
        window = tokens if self.max_seq_len is None else tokens[:, -self.max_seq_len :]
        kwargs = dict(self.kwargs)
        if mask is not None:
            kwargs[self.mask_key] = mask[:, -window.shape[1] :]
        out = self.net(window, **kwargs)
        logits = out[0] if isinstance(out, tuple) else out
        return logits

    def prefill(self, tokens: Tensor, state: Any = None, **conditioning: Any) -> tuple[Tensor, Any]:
        if conditioning:
            self.kwargs.update(conditioning)
        return self._run(tokens, self.mask), (tokens, self.mask)

    def step(self, token: Tensor, state: Any) -> tuple[Tensor, Any]:
        tokens, mask = state
        tokens = torch.cat([tokens, token[:, None]], dim=1)
        if mask is not None:
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        return self._run(tokens, mask)[:, -1], (tokens, mask)


__all__ = [
    "WINDOW_MODES",
    "Decoder",
    "RecomputeDecoder",
    "apply_repetition_penalty",
    "check_sampling",
    "decode_loop",
    "filter_top_k",
    "filter_top_p",
    "generate",
    "sample_next",
    "top_k",
    "top_p",
]
