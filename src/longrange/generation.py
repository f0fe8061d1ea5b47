"""Sampling, written once on every family's ``prefill`` / ``step`` (DESIGN.md section 2).

Generating N tokens costs N ``step`` calls; a family with real incremental state (KV caches,
running sums, recurrent states) therefore generates in O(N) model work.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from longrange.models.base import LongRangeLM


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


def apply_repetition_penalty(logits: Tensor, seen: Tensor, penalty: float) -> Tensor:
    """CTRL-style penalty: logits of tokens already seen (``seen`` [B, V] bool) are divided by
    ``penalty`` when positive and multiplied when negative."""
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


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
    logits = logits.float() / temperature
    if top_k is not None:
        logits = filter_top_k(logits, top_k)
    if top_p is not None:
        logits = filter_top_p(logits, top_p)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _check_sampling(max_new_tokens, temperature, top_k, top_p, repetition_penalty) -> None:
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be a non-negative integer, got {max_new_tokens!r}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be a positive integer or None, got {top_k!r}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must lie in (0, 1] or be None, got {top_p!r}")
    if repetition_penalty <= 0:
        raise ValueError(f"repetition_penalty must be > 0, got {repetition_penalty}")


@torch.no_grad()
def generate(
    model: LongRangeLM,
    prompt: Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token: int | None = None,
    repetition_penalty: float = 1.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Sample continuations of ``prompt`` ([B, N] or [N] token ids); returns the new tokens
    ([B, max_new_tokens] or [max_new_tokens]).

    temperature 0 is greedy. After a row emits ``eos_token`` it keeps emitting it and the loop
    stops once every row has. When a family's context is bounded (``context_limit``), the
    state is rebuilt from the most recent half-window whenever it fills.
    """
    _check_sampling(max_new_tokens, temperature, top_k, top_p, repetition_penalty)
    squeeze = prompt.dim() == 1
    tokens = prompt[None] if squeeze else prompt
    if tokens.shape[1] == 0:
        raise ValueError("prompt must hold at least one token")
    model.check_tokens(tokens, allow_longer=True)
    tokens = tokens.long()
    was_training = model.training
    model.eval()
    try:
        out = _generate(
            model,
            tokens,
            max_new_tokens,
            temperature,
            top_k,
            top_p,
            eos_token,
            repetition_penalty,
            generator,
        )
    finally:
        model.train(was_training)
    return out[0] if squeeze else out


def _generate(model, tokens, max_new_tokens, temperature, top_k, top_p, eos_token, penalty, generator):
    batch, vocab = tokens.shape[0], model.config.vocab_size
    limit = model.context_limit()
    history = tokens
    window = tokens if limit is None else tokens[:, -limit:]
    logits, state = model.prefill(window)
    logits, length = logits[:, -1], window.shape[1]
    seen = torch.zeros(batch, vocab, dtype=torch.bool, device=tokens.device)
    seen.scatter_(1, tokens, True)
    done = torch.zeros(batch, dtype=torch.bool, device=tokens.device)
    new = []
    for i in range(max_new_tokens):
        if penalty != 1.0:
            logits = apply_repetition_penalty(logits, seen, penalty)
        nxt = sample_next(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
        if eos_token is not None:
            nxt = torch.where(done, torch.full_like(nxt, eos_token), nxt)
            done |= nxt == eos_token
        new.append(nxt)
        seen.scatter_(1, nxt[:, None], True)
        if i == max_new_tokens - 1 or (eos_token is not None and bool(done.all())):
            break
        history = torch.cat([history, nxt[:, None]], dim=1)
        if limit is not None and length >= limit:
            # The window is full: restart from the latest half-window of tokens.
            window = history[:, -max(1, limit // 2) :]
            logits, state = model.prefill(window)
            logits, length = logits[:, -1], window.shape[1]
        else:
            logits, state = model.step(nxt, state)
            length += 1
    out = torch.stack(new, dim=1) if new else tokens.new_zeros(batch, 0)
    if eos_token is not None and out.shape[1] < max_new_tokens:
        pad = out.new_full((batch, max_new_tokens - out.shape[1]), eos_token)
        out = torch.cat([out, pad], dim=1)
    return out
