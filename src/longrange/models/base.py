"""The model base class every family shares: one forward protocol, decoding, persistence.

Protocol (DESIGN.md sections 1-2):
- ``forward_lm(tokens, mask=None, state=None) -> LMOutput`` is the entry the trainer,
  evaluator and benchmarks use: logits [B, N, V], an auxiliary loss (or None) and, for
  families that carry state across segments, the state after this segment.
- ``forward(tokens, mask=None)`` returns the logits; the reference-compatible classes
  override it with their own return conventions.
- ``prefill(tokens, state=None) -> (logits, state)`` and ``step(token, state) -> (logits,
  state)`` drive incremental decoding. The default implementation here re-runs the window
  (correct for any family, but O(N) per token); families override it with real state.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn

from longrange.models.config import ModelConfig

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT_TAG = "longrange"


@dataclass
class LMOutput:
    logits: Tensor
    aux_loss: Tensor | None = None
    state: Any = None


@dataclass
class RecomputeState:
    """Decoding state of the fallback protocol: the tokens so far (re-run every step)."""

    tokens: Tensor


class LongRangeLM(nn.Module):
    """Base of every family's language model (tokens [B, N] -> logits [B, N, V])."""

    config_class: ClassVar[type[ModelConfig]] = ModelConfig
    # True when training and evaluation should carry state across the chunks of a document
    # (block-recurrent states, kNN memories); such families read documents in order.
    carries_state: ClassVar[bool] = False

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

    def check_tokens(self, tokens: Tensor, mask: Tensor | None = None, *, allow_longer: bool = False) -> None:
        """Validate a token batch before any work: dtype, rank, range, length, mask shape."""
        if not isinstance(tokens, Tensor):
            raise TypeError(f"tokens must be a torch.Tensor, got {type(tokens).__name__}")
        if tokens.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise TypeError(f"tokens must be an integer tensor, got dtype {tokens.dtype}")
        if tokens.dim() != 2:
            raise ValueError(f"tokens must have shape (batch, seq), got {tuple(tokens.shape)}")
        if not allow_longer and tokens.shape[1] > self.config.max_seq_len:
            raise ValueError(
                f"sequence length {tokens.shape[1]} exceeds max_seq_len={self.config.max_seq_len}"
            )
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= self.config.vocab_size):
            raise ValueError(f"token ids must lie in [0, {self.config.vocab_size})")
        if mask is not None:
            if mask.dtype != torch.bool:
                raise TypeError(f"mask must be a bool tensor (True = keep), got dtype {mask.dtype}")
            if mask.shape != tokens.shape:
                raise ValueError(
                    f"mask shape {tuple(mask.shape)} must equal tokens shape {tuple(tokens.shape)}"
                )

    # --- state carried across segments (carries_state families override) -----------------
    def init_state(self, batch_size: int, device: torch.device | str | None = None) -> Any:
        return None

    def detach_state(self, state: Any) -> Any:
        return state

    def reset_state_rows(self, state: Any, rows: Tensor) -> Any:
        """Forget the state of the batch rows where ``rows`` [B] is True (a new document)."""
        return state

    # --- incremental decoding -------------------------------------------------------------
    def context_limit(self) -> int | None:
        """Longest window ``step`` can continue; None when the state is unbounded."""
        return self.config.max_seq_len

    def prefill(self, tokens: Tensor, state: Any = None) -> tuple[Tensor, Any]:
        """Run a prompt [B, N]; return its logits [B, N, V] and the state to continue from."""
        if state is not None:
            raise ValueError(f"{type(self).__name__}.prefill does not continue from a state")
        logits = self.forward_lm(tokens).logits
        return logits, RecomputeState(tokens)

    def step(self, token: Tensor, state: Any) -> tuple[Tensor, Any]:
        """Feed one token per row [B]; return next-token logits [B, V] and the new state."""
        tokens = torch.cat([state.tokens, token[:, None]], dim=1)
        logits = self.forward_lm(tokens).logits[:, -1]
        return logits, RecomputeState(tokens)

    @torch.no_grad()
    def generate(self, prompt: Tensor, max_new_tokens: int, **sampling: Any) -> Tensor:
        """Sample ``max_new_tokens`` after ``prompt``; see :func:`longrange.generation.generate`."""
        from longrange.generation import generate

        return generate(self, prompt, max_new_tokens, **sampling)

    # --- persistence ----------------------------------------------------------------------
    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write ``config.json`` and ``model.safetensors`` into ``directory``, atomically."""
        from longrange.atomic import atomic_write_json, atomic_write_safetensors

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
        from longrange.models.registry import get_family

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
