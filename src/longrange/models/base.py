"""The model base class every family shares: one protocol, decoding, persistence.

The protocol (docs/ARCHITECTURE.md, "Protocol"):
- ``forward_lm(tokens, *, mask=None, state=None) -> LMOutput``: logits [B, N, V], an
  auxiliary loss (or None) and the :class:`~longrange.models.state.State` after the call
  (families that carry state across training segments; None otherwise). Given a state, the
  call continues it and updates it in place.
- ``forward(tokens, mask=None)`` returns the logits; the reference-compatible classes
  override it with their own return conventions.
- ``prefill(tokens, state=None, **conditioning) -> (logits, state)`` and ``step(token, state)
  -> (logits, state)``, written once here: run positions after those the state has seen (a
  fresh state when None), without gradients, updating the state in place and returning it.
  Conditioning (a decoder's ``context`` / ``context_mask``) is fixed by the call that makes
  the state. A family provides ``init_state`` and ``decode``; the default ``decode`` re-runs
  every position seen so far (correct for any family, O(N) per token).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn

from longrange.atomic import atomic_write_json, atomic_write_safetensors
from longrange.generation import generate
from longrange.models.config import ModelConfig
from longrange.models.registry import get_family
from longrange.models.state import State

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT_TAG = "longrange"

# One compiled ``decode`` per class and backend, shared by its instances (the weights are the graph's
# inputs, not constants), so a copy of a model never decodes with another's weights.
_COMPILED_DECODE: dict[tuple[type, str], Any] = {}
DECODE_RECOMPILE_LIMIT = 32


@dataclass
class LMOutput:
    logits: Tensor
    aux_loss: Tensor | None = None
    state: State | None = None


class LongRangeLM(nn.Module):
    """Base of every family's language model (tokens [B, N] -> logits [B, N, V])."""

    config_class: ClassVar[type[ModelConfig]] = ModelConfig
    # True when training and evaluation should carry state across the chunks of a document
    # (block-recurrent states, kNN memories); such families read documents in order.
    carries_state: ClassVar[bool] = False
    # Keywords ``prefill`` accepts as conditioning (a cross-attending decoder's context); a
    # family whose config decides it makes this a property.
    conditioning_keys: tuple[str, ...] = ()
    # the backend inside ``compiled_decoding()``: single-token steps run the compiled ``decode``
    _decoding_compiled: str | None = None

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        if not isinstance(config, self.config_class):
            raise TypeError(
                f"{type(self).__name__} needs a {self.config_class.__name__}, got {type(config).__name__}"
            )
        self.config = config

    # --- the forward protocol -------------------------------------------------------------
    def forward_lm(self, tokens: Tensor, *, mask: Tensor | None = None, state: Any = None) -> LMOutput:
        raise NotImplementedError

    def forward(self, tokens: Tensor, mask: Tensor | None = None) -> Tensor:
        return self.forward_lm(tokens, mask=mask).logits

    def before_compiled_step(self) -> None:
        """The host-side bookkeeping of one training call that a forward running under
        ``torch.compile`` leaves out (it reads tensor values on the host, which would break
        the graph): the trainer calls it before every compiled step; an eager forward does
        it itself. Nothing by default (the Performer counts calls to redraw its features)."""

    def check_tokens(self, tokens: Tensor, mask: Tensor | None = None, *, allow_longer: bool = False) -> None:
        """Validate a token batch before any work: dtype, rank, size, range, length, mask."""
        if not isinstance(tokens, Tensor):
            raise TypeError(f"tokens must be a torch.Tensor, got {type(tokens).__name__}")
        if tokens.dtype not in (torch.int64, torch.int32):  # what an embedding looks up by
            hint = "; convert with .long()" if not tokens.is_floating_point() else ""
            raise TypeError(f"tokens must be an int64 or int32 tensor, got dtype {tokens.dtype}{hint}")
        if tokens.dim() != 2:
            raise ValueError(f"tokens must have shape (batch, seq), got {tuple(tokens.shape)}")
        if tokens.shape[0] == 0 or tokens.shape[1] == 0:
            raise ValueError(
                f"tokens must hold at least one row and one position, got shape {tuple(tokens.shape)}"
            )
        if not allow_longer and tokens.shape[1] > self.config.max_seq_len:
            raise ValueError(
                f"sequence length {tokens.shape[1]} exceeds max_seq_len={self.config.max_seq_len}"
            )
        # Reading the ids needs host values: checked in eager mode, not inside a compiled graph.
        if not torch.compiler.is_compiling() and (
            int(tokens.min()) < 0 or int(tokens.max()) >= self.config.vocab_size
        ):
            raise ValueError(f"token ids must lie in [0, {self.config.vocab_size})")
        if mask is not None:
            if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
                raise TypeError("mask must be a bool tensor (True = keep)")
            if mask.shape != tokens.shape:
                raise ValueError(
                    f"mask shape {tuple(mask.shape)} must equal tokens shape {tuple(tokens.shape)}"
                )

    # --- the state ------------------------------------------------------------------------
    def init_state(self, batch_size: int, device: torch.device | str | None = None, **conditioning) -> State:
        """A fresh state for ``batch_size`` rows; families with caches or memories override it."""
        self.check_conditioning(conditioning)
        return State.empty(batch_size, 0, **conditioning)

    def check_conditioning(self, conditioning: dict[str, Any]) -> None:
        """Refuse conditioning keywords this model does not take."""
        extra = sorted(set(conditioning) - set(self.conditioning_keys))
        if extra:
            accepted = ", ".join(self.conditioning_keys) or "none"
            raise ValueError(f"{type(self).__name__} takes no {extra} (conditioning accepted: {accepted})")

    def check_state(self, state: Any, batch: int) -> None:
        if not isinstance(state, State):
            raise TypeError(f"state must be a longrange State (or None), got {type(state).__name__}")
        state.check_batch(batch)

    def detach_state(self, state: State) -> State:
        """The state cut from the autograd graph (between training steps)."""
        return state.detach()

    def reset_state_rows(self, state: State, rows: Tensor) -> State:
        """Forget the state of the batch rows where ``rows`` [B] is True (a new document)."""
        return state

    def save_state(self, state: State, directory: str | os.PathLike) -> None:
        """Write a carried state into ``directory`` (exact resume of a training run)."""
        state.save(directory)

    def load_state(self, directory: str | os.PathLike, *, batch_size: int, device: Any = "cpu") -> State:
        """Read a state written by :meth:`save_state`, refusing one of another batch size."""
        return State.load(directory, device).checked(lambda state: state.check_batch(batch_size))

    # --- incremental decoding -------------------------------------------------------------
    def context_limit(self) -> int | None:
        """Most positions a decoding state can hold; None when it is unbounded."""
        return self.config.max_seq_len

    def decode(self, tokens: Tensor, state: State) -> Tensor:
        """Logits [B, n, V] of ``tokens`` [B, n] following the ``state.position`` positions the
        state has seen; update the state's entries (``prefill`` advances the position). This
        default keeps the tokens and re-runs all of them."""
        if set(state.shared) - {"seen"}:
            raise ValueError(f"{type(self).__name__} re-runs its window to decode and takes no conditioning")
        seen = state.shared.get("seen")
        state.shared["seen"] = tokens if seen is None else torch.cat([seen, tokens], dim=1)
        return self.forward_lm(state.shared["seen"]).logits[:, -tokens.shape[1] :]

    def prefill(
        self, tokens: Tensor, state: State | None = None, **conditioning: Any
    ) -> tuple[Tensor, State]:
        """Run tokens [B, N] after the positions ``state`` has seen (a fresh state when None);
        return their logits [B, N, V] and the state, updated in place."""
        self.check_tokens(tokens, allow_longer=True)
        return self._extend(tokens, state, conditioning)

    def step(self, token: Tensor, state: State) -> tuple[Tensor, State]:
        """Feed one token per row [B]; return next-token logits [B, V] and the state. The ids
        are range-checked on the CPU only (on a GPU the check would stall every token)."""
        if not isinstance(token, Tensor) or token.dim() != 1:
            raise ValueError(f"step takes one token per row, shape [B], got {getattr(token, 'shape', token)}")
        if token.device.type == "cpu":
            self.check_tokens(token[:, None], allow_longer=True)
        elif token.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise TypeError(f"tokens must be an integer tensor, got dtype {token.dtype}")
        logits, state = self._extend(token[:, None], state, {})
        return logits[:, -1], state

    def _extend(self, tokens: Tensor, state: State | None, conditioning: dict) -> tuple[Tensor, State]:
        if state is None:
            state = self.init_state(tokens.shape[0], tokens.device, **conditioning)
        else:
            if conditioning:
                raise ValueError("conditioning is fixed when the state is made: pass it to the first prefill")
            self.check_state(state, tokens.shape[0])
        limit = self.context_limit()
        if limit is not None and state.position + tokens.shape[1] > limit:
            raise ValueError(
                f"positions up to {state.position + tokens.shape[1]} exceed the decoding window of {limit}"
            )
        with torch.no_grad():
            if tokens.shape[1] == 1 and self._decoding_compiled is not None:
                logits = self._compiled_decode()(self, tokens, state)
            else:
                logits = self.decode(tokens, state)
        state.position += tokens.shape[1]
        return logits, state

    @contextmanager
    def compiled_decoding(self, backend: str = "inductor") -> Iterator[None]:
        """Inside the block, ``step`` runs ``decode`` through ``torch.compile`` (automatic
        dynamic shapes: from the second step one graph follows the growing caches), which on
        CPU fuses a step's hundreds of small operations; ``prefill`` stays eager. The first
        steps pay the compilation, and a few more graphs come where a bucket, block or chunk
        begins or ends. ``backend`` is torch.compile's (the tests trace with "eager")."""
        if not isinstance(backend, str):
            raise TypeError(f"backend must be a torch.compile backend name, got {backend!r}")
        import torch._dynamo  # (here: importing the compiler costs every import of longrange)

        # more graphs per step than dynamo's default limit of 8 for some families
        limit = max(torch._dynamo.config.recompile_limit, DECODE_RECOMPILE_LIMIT)
        before, self._decoding_compiled = self._decoding_compiled, backend
        try:
            with torch._dynamo.config.patch(recompile_limit=limit):
                yield
        finally:
            self._decoding_compiled = before

    def _compiled_decode(self) -> Any:
        key = (type(self), self._decoding_compiled)
        if key not in _COMPILED_DECODE:
            # automatic dynamic shapes: a size becomes a symbol once it has changed (the caches'
            # lengths), the rest stay constants. Marking every size dynamic from the start
            # (dynamic=True) compiled sinkhorn's step graphs 3x slower into code 1.24x slower
            _COMPILED_DECODE[key] = torch.compile(type(self).decode, dynamic=None, backend=key[1])
        return _COMPILED_DECODE[key]

    def generate(self, prompt: Tensor, max_new_tokens: int, **sampling: Any) -> Tensor:
        """Sample ``max_new_tokens`` after ``prompt``; see :func:`longrange.generation.generate`."""
        return generate(self, prompt, max_new_tokens, **sampling)

    # --- persistence ----------------------------------------------------------------------
    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write ``config.json`` and ``model.safetensors`` into ``directory``, atomically."""

        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        atomic_write_safetensors(path / WEIGHTS_NAME, self.weights_for_saving(), {"format": FORMAT_TAG})
        atomic_write_json(path / CONFIG_NAME, self.config.to_dict())

    def weights_for_saving(self) -> dict[str, Tensor]:
        # safetensors refuses shared storage; tied weights are saved once and re-tied on load.
        out: dict[str, Tensor] = {}
        seen: dict[int, str] = {}
        for name, tensor in self.state_dict().items():
            key = tensor.untyped_storage().data_ptr() if tensor.numel() else id(tensor)
            if key in seen and tensor.numel():
                continue
            seen[key] = name
            out[name] = tensor.detach().contiguous().cpu()
        return out

    @classmethod
    def from_pretrained(
        cls,
        directory: str | os.PathLike,
        *,
        map_location: str | torch.device = "cpu",
        overrides: dict[str, Any] | None = None,
    ) -> LongRangeLM:
        """Load a directory written by :meth:`save_pretrained`.

        Called on the base class it builds whichever family the config names; called on a
        family class it refuses a directory of another family. ``overrides`` change config
        fields that keep the weights' layout (e.g. ``num_retrieved_memories=0`` to evaluate a
        Memorizing model with retrieval off); one that changes the layout is refused.
        """
        path = Path(directory)
        config_file, weights_file = path / CONFIG_NAME, path / WEIGHTS_NAME
        if not path.is_dir():
            raise FileNotFoundError(f"no model directory at {path}")
        if not config_file.is_file() or not weights_file.is_file():
            raise ValueError(
                f"{path} is not a longrange model directory (needs {CONFIG_NAME} and {WEIGHTS_NAME})"
            )
        try:
            data = json.loads(config_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"corrupt {config_file}: {err}") from None
        if not isinstance(data, dict) or "family" not in data:
            raise ValueError(f"{config_file} is not a longrange config (no 'family' key)")
        family = get_family(data["family"])
        model_class = family.model_class
        if cls is not LongRangeLM and not issubclass(model_class, cls) and not issubclass(cls, model_class):
            raise ValueError(f"{path} holds a {data['family']!r} model, not a {cls.__name__}")
        config = family.config_class.from_dict(data)
        if overrides:
            config.check_keys(overrides)
            config = config.replace(**overrides)
        model = model_class(config) if cls is LongRangeLM else cls(config)
        state = load_weights(weights_file, map_location)
        try:
            model.load_saved_weights(state)
        except ValueError as err:
            if not overrides:
                raise
            raise ValueError(f"the settings {overrides} change the saved weights' layout: {err}") from None
        return model

    def load_saved_weights(self, state: dict[str, Tensor]) -> None:
        expected = self.state_dict()
        missing = [k for k in expected if k not in state]
        # Tied parameters were saved once: fill the other names from the saved alias.
        if missing:
            by_ptr: dict[int, list[str]] = {}
            for name, tensor in expected.items():
                by_ptr.setdefault(tensor.untyped_storage().data_ptr(), []).append(name)
            for names in by_ptr.values():
                present = [n for n in names if n in state]
                for n in names:
                    if n not in state and present:
                        state[n] = state[present[0]]
            missing = [k for k in expected if k not in state]
        unexpected = [k for k in state if k not in expected]
        if missing or unexpected:
            raise ValueError(
                f"weights do not match the config: missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
        for name, tensor in expected.items():
            if state[name].shape != tensor.shape:
                raise ValueError(
                    f"weight {name!r} has shape {tuple(state[name].shape)}, expected {tuple(tensor.shape)}"
                )
        self.load_state_dict(state)


def load_weights(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Tensor]:
    """Read a safetensors file written by longrange, with a clear error when it is not one."""
    try:
        state = load_file(str(path), device=str(map_location))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise ValueError(f"corrupt or unreadable weights file {path}: {err}") from None
    return state
