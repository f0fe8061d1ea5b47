"""The references' autoregressive wrapper, written once for every family.

``AutoregressiveWrapper(net)`` turns a network mapping tokens [B, N] to logits (or to
``(logits, aux_loss)``) into a next-token trainer and sampler with the references' keywords.
When ``net`` is a :class:`~longrange.models.base.LongRangeLM`, ``generate`` runs on its
incremental ``prefill`` / ``step`` state (O(1) model work per token for families with
real state); otherwise it re-runs the net on the last ``max_seq_len`` tokens each step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def top_k(logits: Tensor, thres: float = 0.9) -> Tensor:
    """Keep the top ``ceil((1 - thres) * V)`` logits per row (the references' convention)."""
    k = max(1, int((1 - thres) * logits.shape[-1]))
    kth = logits.topk(k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p(logits: Tensor, thres: float = 0.9) -> Tensor:
    """Nucleus filtering: drop the tail whose cumulative probability exceeds ``thres``."""
    from longrange.generation import filter_top_p

    return filter_top_p(logits, thres)


def _split_output(out: Any) -> tuple[Tensor, Tensor | None]:
    if isinstance(out, tuple):
        return out[0], (out[1] if len(out) > 1 else None)
    return out, None


class AutoregressiveWrapper(nn.Module):
    def __init__(self, net: nn.Module, ignore_index: int = -100, pad_value: int = 0) -> None:
        super().__init__()
        self.net = net
        self.ignore_index = ignore_index
        self.pad_value = pad_value
        self.max_seq_len = getattr(net, "max_seq_len", None) or getattr(
            getattr(net, "config", None), "max_seq_len", None
        )

    def forward(self, x: Tensor, return_loss: bool = True, **kwargs: Any) -> Any:
        """Without ``return_loss`` this is the net's forward; with it, the mean next-token
        cross-entropy of x[:, 1:] given x[:, :-1] (plus the net's auxiliary loss, if any).
        A ``mask`` / ``input_mask`` keyword is trimmed to the inputs."""
        if not return_loss:
            return self.net(x, **kwargs)
        inputs, targets = x[:, :-1], x[:, 1:]
        for key in ("mask", "input_mask"):
            if kwargs.get(key) is not None and kwargs[key].shape[1] == x.shape[1]:
                kwargs[key] = kwargs[key][:, :-1]
        logits, aux = _split_output(self.net(inputs, **kwargs))
        loss = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=self.ignore_index)
        return loss if aux is None else loss + aux

    @torch.no_grad()
    def generate(
        self,
        start_tokens: Tensor,
        seq_len: int,
        eos_token: int | None = None,
        temperature: float = 1.0,
        filter_logits_fn: Callable[[Tensor, float], Tensor] = top_k,
        filter_thres: float = 0.9,
        **kwargs: Any,
    ) -> Tensor:
        """Sample ``seq_len`` new tokens after ``start_tokens`` ([B, N] or [N]); returns only
        the new tokens. Rows that emitted ``eos_token`` are padded with ``pad_value``."""
        from longrange.models.base import LongRangeLM

        if not isinstance(seq_len, int) or seq_len < 0:
            raise ValueError(f"seq_len must be a non-negative integer, got {seq_len!r}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        squeeze = start_tokens.dim() == 1
        tokens = start_tokens[None] if squeeze else start_tokens
        was_training = self.net.training
        self.net.eval()
        try:
            if isinstance(self.net, LongRangeLM) and not kwargs:
                out = self._generate_incremental(
                    tokens, seq_len, eos_token, temperature, filter_logits_fn, filter_thres
                )
            else:
                out = self._generate_recompute(
                    tokens, seq_len, eos_token, temperature, filter_logits_fn, filter_thres, kwargs
                )
        finally:
            self.net.train(was_training)
        return out[0] if squeeze else out

    def _pick(self, logits: Tensor, temperature: float, filter_fn, thres: float) -> Tensor:
        filtered = filter_fn(logits.float(), thres)
        probs = F.softmax(filtered / temperature, dim=-1)
        return torch.multinomial(probs, 1).squeeze(-1)

    def _finish(self, new: list[Tensor], eos_token: int | None, batch: int, device) -> Tensor:
        out = torch.stack(new, dim=1) if new else torch.zeros(batch, 0, dtype=torch.long, device=device)
        if eos_token is not None and out.numel():
            # Everything after a row's first eos becomes padding.
            after = (out == eos_token).long().cumsum(dim=1) - (out == eos_token).long() > 0
            out = out.masked_fill(after, self.pad_value)
        return out

    def _generate_incremental(self, tokens, seq_len, eos_token, temperature, filter_fn, thres) -> Tensor:
        net = self.net
        limit = net.context_limit()
        history = tokens.long()
        window = history if limit is None else history[:, -limit:]
        logits, state = net.prefill(window)
        logits, length = logits[:, -1], window.shape[1]
        new: list[Tensor] = []
        done = torch.zeros(tokens.shape[0], dtype=torch.bool, device=tokens.device)
        for i in range(seq_len):
            nxt = self._pick(logits, temperature, filter_fn, thres)
            new.append(nxt)
            if eos_token is not None:
                done |= nxt == eos_token
                if bool(done.all()):
                    break
            if i == seq_len - 1:
                break
            history = torch.cat([history, nxt[:, None]], dim=1)
            if limit is not None and length >= limit:
                window = history[:, -max(1, limit // 2) :]
                logits, state = net.prefill(window)
                logits, length = logits[:, -1], window.shape[1]
            else:
                logits, state = net.step(nxt, state)
                length += 1
        return self._finish(new, eos_token, tokens.shape[0], tokens.device)

    def _generate_recompute(
        self, tokens, seq_len, eos_token, temperature, filter_fn, thres, kwargs
    ) -> Tensor:
        out = tokens.long()
        mask = kwargs.pop("mask", None)
        new: list[Tensor] = []
        for _ in range(seq_len):
            x = out if self.max_seq_len is None else out[:, -self.max_seq_len :]
            step_kwargs = dict(kwargs)
            if mask is not None:
                # The mask follows the tokens: new tokens are real, so it grows with True on the
                # right (the reference padded it on the wrong side).
                step_kwargs["mask"] = mask[:, -x.shape[1] :]
            logits, _ = _split_output(self.net(x, **step_kwargs))
            nxt = self._pick(logits[:, -1], temperature, filter_fn, thres)
            new.append(nxt)
            out = torch.cat([out, nxt[:, None]], dim=1)
            if mask is not None:
                mask = F.pad(mask, (0, 1), value=True)
            if eos_token is not None and bool((torch.stack(new, 1) == eos_token).any(1).all()):
                break
        return self._finish(new, eos_token, tokens.shape[0], tokens.device)
