"""One encoder-decoder for every family that has one (performer, routing, sinkhorn).

:class:`EncoderDecoder` holds an encoder (its output, [B, M, dim], is the context) and an
:class:`~longrange.models.autoregressive.AutoregressiveWrapper` around a causal decoder that
cross-attends to it. Keywords for the two sides carry the prefixes ``enc_`` and ``dec_``, at
construction and at call time; a mask given to the encoder (``enc_<mask_key>``) also becomes
the decoder's ``context_mask``. A family may let an unprefixed constructor keyword that names
an option of both sides (``shared_keys``) set it on both, a prefixed one still winning for its
side; any other unprefixed keyword is a TypeError. ``generate`` encodes once and samples on
the decoder's incremental state through the shared loop (the context is the decoder's
conditioning); its ``window`` ("restart", the default, or "slide", the references'
conditioning) says what happens past the decoder's ``max_seq_len``, as in the wrapper.

A family's subclass says how to build each side (:meth:`make_encoder`, :meth:`make_decoder`),
how its encoder is called (:meth:`run_encoder`) and what ``forward`` returns (the references
differ: a loss, logits, or a pair with an auxiliary loss).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from longrange.models.autoregressive import AutoregressiveWrapper
from longrange.models.keywords import split_prefixed


class EncoderDecoder(nn.Module):
    """Encoder + cross-attending decoder (see the module docstring)."""

    wrapper_class: ClassVar[type[AutoregressiveWrapper]] = AutoregressiveWrapper
    # the padding-mask keyword of the family's models ("mask" or "input_mask")
    mask_key: ClassVar[str] = "mask"
    # decoder keywords that the encoder-decoder fixes (the decoder is causal and cross-attends)
    fixed_decoder_keys: ClassVar[tuple[str, ...]] = ("causal",)
    # unprefixed constructor keywords that set the option on both sides (none by default)
    shared_keys: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, dim: int, ignore_index: int, pad_value: int, **kwargs: Any) -> None:
        super().__init__()
        enc_kwargs, dec_kwargs = self.split_options(kwargs)
        if "dim" in enc_kwargs or "dim" in dec_kwargs:
            raise ValueError(
                f"set dim once for both sides ({type(self).__name__}(dim=...)), not enc_dim / dec_dim"
            )
        for name in self.fixed_decoder_keys:
            if name in dec_kwargs:
                raise ValueError(f"dec_{name} is fixed: the decoder is causal and reads the encoder's output")
        self.enc = self.make_encoder(dim, enc_kwargs)
        self.dec = self.wrapper_class(self.make_decoder(dim, dec_kwargs), ignore_index, pad_value)

    def split_options(self, kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """Constructor keywords -> (encoder's, decoder's): prefixed ones to their side, the
        ``shared_keys`` to both (unless that side has the prefixed one)."""
        enc_kwargs, dec_kwargs, rest = split_prefixed(kwargs)
        owner = type(self).__name__
        fixed = sorted(set(rest) & set(self.fixed_decoder_keys))
        if fixed and self.shared_keys:
            names = ", ".join(f"enc_{name}" for name in fixed)
            raise TypeError(f"{owner}: {fixed} are fixed on the decoder; pass {names} for the encoder")
        unknown = sorted(set(rest) - self.shared_keys)
        if unknown:
            both = " or name an option of both sides" if self.shared_keys else ""
            raise TypeError(f"{owner} keywords need an enc_ or dec_ prefix{both}, got {unknown}")
        for name, value in rest.items():
            enc_kwargs.setdefault(name, value)
            dec_kwargs.setdefault(name, value)
        return enc_kwargs, dec_kwargs

    def split(self, kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
        """Call-time enc_/dec_ keywords -> (encoder's, decoder's, the unprefixed rest); the
        rest must be empty (a family whose call takes unprefixed keywords overrides this)."""
        enc_kwargs, dec_kwargs, rest = split_prefixed(kwargs)
        if rest:
            raise TypeError(f"{type(self).__name__} keywords need an enc_ or dec_ prefix, got {sorted(rest)}")
        return enc_kwargs, dec_kwargs, rest

    # --- the family's part ------------------------------------------------------------------
    def make_encoder(self, dim: int, kwargs: dict[str, Any]) -> nn.Module:
        raise NotImplementedError

    def make_decoder(self, dim: int, kwargs: dict[str, Any]) -> nn.Module:
        raise NotImplementedError

    def run_encoder(self, seq_in: Tensor, kwargs: dict[str, Any]) -> Any:
        """The encoder's output for ``seq_in`` (the context [B, M, dim], or a tuple whose
        first item is the context)."""
        return self.enc(seq_in, **kwargs)

    # --- shared ---------------------------------------------------------------------------
    def encode(self, seq_in: Tensor, enc_kwargs: dict[str, Any], dec_kwargs: dict[str, Any]) -> Any:
        """Run the encoder; its padding mask becomes the decoder's ``context_mask``."""
        if enc_kwargs.get(self.mask_key) is not None:
            dec_kwargs.setdefault("context_mask", enc_kwargs[self.mask_key])
        return self.run_encoder(seq_in, enc_kwargs)

    @torch.no_grad()
    def generate(
        self, seq_in: Tensor, seq_out_start: Tensor, seq_len: int | None = None, **kwargs: Any
    ) -> Tensor:
        """Sample ``seq_len`` decoder tokens (default: the decoder's window less the start)
        after ``seq_out_start``, conditioned on the encoding of ``seq_in``. Unprefixed
        keywords are the sampler's (``eos_token``, ``temperature``, ``filter_thres``,
        ``window`` ...; see :meth:`AutoregressiveWrapper.generate`)."""
        sampling = {k: kwargs.pop(k) for k in list(kwargs) if not k.startswith(("enc_", "dec_"))}
        enc_kwargs, dec_kwargs, _ = split_prefixed(kwargs)
        was_training = self.training
        self.eval()
        try:
            out = self.encode(seq_in, enc_kwargs, dec_kwargs)
        finally:
            self.train(was_training)
        context = out[0] if isinstance(out, tuple) else out
        if seq_len is None:
            seq_len = self.dec.max_seq_len - seq_out_start.shape[-1]
        return self.dec.generate(seq_out_start, seq_len, context=context, **dec_kwargs, **sampling)
