"""The references' autoregressive wrapper, written once for every family.

``AutoregressiveWrapper(net)`` turns a network mapping tokens [B, N] to logits (or to
``(logits, aux_loss)``) into a next-token trainer and sampler with the references' keywords.
Sampling runs on the one loop of :mod:`longrange.generation`: on the net's incremental
``prefill`` / ``step`` state when the net is a :class:`~longrange.models.base.LongRangeLM`
(its conditioning keywords, e.g. an encoder's ``context``, go to ``prefill``), otherwise by
re-running the last ``max_seq_len`` tokens for every new one (as the references do). Past
``max_seq_len`` the incremental path restarts from the last half window by default
(``window="restart"``) or, with ``window="slide"``, re-runs a full window per token as the
references do (their conditioning, and their samples for the same seed and weights).
Families subclass it only to change defaults or add the reference's extra keywords
(:meth:`AutoregressiveWrapper.sample` takes the token choice as a function).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from longrange.generation import Pick, RecomputeDecoder, apply_temperature, decode_loop, top_k
from longrange.models.base import LongRangeLM


def check_sampling_keywords(seq_len: Any, temperature: Any, filter_thres: Any) -> None:
    """ValueError for a bad sampling keyword of the wrappers' ``generate``."""
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 0:
        raise ValueError(f"seq_len must be a non-negative integer, got {seq_len!r}")
    if not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    if not 0 <= filter_thres <= 1:
        raise ValueError(f"filter_thres must lie in [0, 1], got {filter_thres!r}")


def reference_pick(
    filter_logits_fn: Callable[[Tensor, float], Tensor],
    filter_thres: float,
    temperature: float,
    adjust: Callable[[Tensor, Tensor], Tensor] | None = None,
) -> Pick:
    """The references' token choice: filter the logits (``adjust(logits, history)`` first,
    when given), divide by the temperature (:func:`~longrange.generation.apply_temperature`:
    a tiny one picks the most likely token), draw one token from the softmax."""

    def pick(logits: Tensor, history: Tensor) -> Tensor:
        logits = logits.float() if adjust is None else adjust(logits.float(), history)
        probs = F.softmax(apply_temperature(filter_logits_fn(logits, filter_thres), temperature), dim=-1)
        return torch.multinomial(probs, 1).squeeze(-1)

    return pick


def split_output(out: Any) -> tuple[Tensor, Tensor | None]:
    """A net's output -> (logits, auxiliary loss or None)."""
    if isinstance(out, tuple):
        return out[0], (out[1] if len(out) > 1 else None)
    return out, None


class AutoregressiveWrapper(nn.Module):
    """Next-token loss and sampling around ``net`` (the references' wrapper)."""

    # the keyword a padding mask travels under when the net is re-run
    mask_key = "mask"

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
        logits, aux = split_output(self.net(inputs, **kwargs))
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
        window: str = "restart",
        **kwargs: Any,
    ) -> Tensor:
        """Sample ``seq_len`` new tokens after ``start_tokens`` ([B, N] or [N]); returns only
        the new tokens. A row that emitted ``eos_token`` is padded with ``pad_value``, and
        sampling stops once every row has.

        Past the net's ``max_seq_len`` an incremental net either restarts from the last half
        window and continues incrementally (``window="restart"``, the default: fast, but
        each token then sees between half and a whole window), or re-runs the last full
        window for every token (``window="slide"``: the reference packages' conditioning,
        and with the same seed and weights their samples, at a full forward per token)."""
        check_sampling_keywords(seq_len, temperature, filter_thres)
        pick = reference_pick(filter_logits_fn, filter_thres, temperature)
        return self.sample(start_tokens, seq_len, pick, eos_token=eos_token, window=window, **kwargs)

    @torch.no_grad()
    def sample(
        self,
        start_tokens: Tensor,
        seq_len: int,
        pick: Pick,
        *,
        eos_token: int | None = None,
        window: str = "restart",
        **kwargs: Any,
    ) -> Tensor:
        """:meth:`generate` with the token choice ``pick(logits [B, V], history [B, T]) ->
        [B]`` given (a family adds its reference's sampling keywords this way)."""
        if not isinstance(start_tokens, Tensor):
            kind = type(start_tokens).__name__
            raise TypeError(f"start_tokens must be a tensor of token ids, [N] or [B, N], got {kind}")
        if start_tokens.dim() not in (1, 2):
            raise ValueError(f"start_tokens must have shape [N] or [B, N], got {tuple(start_tokens.shape)}")
        squeeze = start_tokens.dim() == 1
        tokens = (start_tokens[None] if squeeze else start_tokens).long()
        decoder, conditioning = self._decoder(kwargs)
        was_training = self.net.training
        self.net.eval()
        try:
            out = decode_loop(
                decoder,
                tokens,
                seq_len,
                pick,
                eos_token=eos_token,
                fill=self.pad_value,
                pad_to_length=False,
                window=window,
                conditioning=conditioning,
            )
        finally:
            self.net.train(was_training)
        return out[0] if squeeze else out

    def _decoder(self, kwargs: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        """The net itself when it decodes incrementally with these keywords, else a decoder
        that re-runs it."""
        net = self.net
        if isinstance(net, LongRangeLM):
            conditioning = {k: v for k, v in kwargs.items() if k in net.conditioning_keys}
            if len(conditioning) == len(kwargs):
                return net, {k: v for k, v in conditioning.items() if v is not None}
        mask_key = "input_mask" if "input_mask" in kwargs else self.mask_key
        return RecomputeDecoder(net, self.max_seq_len, kwargs, mask_key=mask_key), {}
