"""A byte-level tokenizer for transformers: vocabulary 256, token id = byte value.

The ids are exactly :class:`longrange.data.tokenizer.ByteTokenizer`'s: text is encoded as
UTF-8 and each byte is its own token (the token's string is the byte's Latin-1 character);
decoding joins the bytes and reads them as UTF-8, invalid sequences becoming U+FFFD.

Special tokens: only those ``generate`` and batching need, mapped onto an existing byte so
the vocabulary stays 256: ``eos_token`` and ``pad_token`` are byte 0 (NUL), which text never
contains, so generation runs to ``max_new_tokens`` unless the model emits NUL (longrange's
own ``generate`` with ``eos_token=0`` stops the same way). No BOS, no UNK (every byte is in
the vocabulary), and nothing is added around a sequence: ``tokenizer(text).input_ids`` are
the text's bytes. Padding goes on the right by default (longrange decoding takes no padding
mask; see :mod:`longrange.hf.modeling`). ``decode(..., skip_special_tokens=True)`` drops NUL
bytes.

``save_pretrained`` writes only ``tokenizer_config.json`` (the class name and the settings);
after ``import longrange.hf`` ``AutoTokenizer.from_pretrained(directory)`` finds the class.
"""

from __future__ import annotations

from typing import Any

from transformers import AddedToken, PreTrainedTokenizer

VOCAB_SIZE = 256
NUL = chr(0)


class LongRangeByteTokenizer(PreTrainedTokenizer):
    """Bytes as tokens (see the module docstring)."""

    vocab_files_names: dict[str, str] = {}  # noqa: RUF012 (transformers' class attribute)
    model_input_names = ["input_ids", "attention_mask"]  # noqa: RUF012

    def __init__(
        self,
        eos_token: str = NUL,
        pad_token: str = NUL,
        padding_side: str = "right",
        model_max_length: int | None = None,
        **kwargs: Any,
    ) -> None:
        for name, token in (("eos_token", eos_token), ("pad_token", pad_token)):
            text = str(token) if isinstance(token, (str, AddedToken)) else None
            if text is None or len(text) != 1 or ord(text) >= VOCAB_SIZE:
                raise ValueError(f"{name} must be one byte's character (chr(0) to chr(255)), got {token!r}")
        # Decoding returns the bytes as they are (no clean-up of spaces around punctuation).
        kwargs.setdefault("clean_up_tokenization_spaces", False)
        if model_max_length is not None:
            kwargs["model_max_length"] = model_max_length
        super().__init__(eos_token=eos_token, pad_token=pad_token, padding_side=padding_side, **kwargs)

    @property
    def vocab_size(self) -> int:
        return VOCAB_SIZE

    def get_vocab(self) -> dict[str, int]:
        return {chr(i): i for i in range(VOCAB_SIZE)}

    def _tokenize(self, text: str, **kwargs: Any) -> list[str]:
        return [chr(b) for b in text.encode("utf-8")]

    def _convert_token_to_id(self, token: str) -> int:
        if len(token) != 1 or ord(token) >= VOCAB_SIZE:
            raise ValueError(f"not a byte token: {token!r}")
        return ord(token)

    def _convert_id_to_token(self, index: int) -> str:
        if not 0 <= index < VOCAB_SIZE:
            raise ValueError(f"byte token ids lie in [0, {VOCAB_SIZE}), got {index}")
        return chr(index)

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        return bytes(ord(t) for t in tokens).decode("utf-8", errors="replace")

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str, ...]:
        return ()  # the vocabulary is the 256 bytes: nothing to write
