"""``longrange export-hf`` and ``import-hf``: a model directory in the other format.

A longrange model directory and a transformers one hold the same ``model.safetensors``
(the same tensor names and values); they differ in ``config.json``: transformers needs
``model_type`` (and writes its own keys), which longrange's config loader refuses as unknown
keys. So the two commands rewrite the config around the same weights, through the models,
which checks both ends:

- :func:`export_hf`: any directory ``LongRangeLM.from_pretrained`` reads (a run folder's top
  level today) -> a transformers directory: ``config.json`` (the longrange config plus
  ``model_type`` and transformers' keys), ``model.safetensors``, ``generation_config.json`` and
  the byte tokenizer's ``tokenizer_config.json``, so that ``AutoModelForCausalLM``,
  ``AutoTokenizer`` and ``pipeline("text-generation", model=DIR)`` load it.
- :func:`import_hf`: a transformers directory of a longrange family -> a longrange model
  directory (``config.json`` + ``model.safetensors``).

Both refuse to write into a directory that already holds a model config, unless
``overwrite``.
"""

from __future__ import annotations

import os
from pathlib import Path

from longrange.hf.auto import directory_family, from_pretrained
from longrange.hf.modeling import LongRangeForCausalLM, wrap
from longrange.hf.tokenizer import LongRangeByteTokenizer
from longrange.models.base import CONFIG_NAME, LongRangeLM


def export_hf(
    source: str | os.PathLike, out: str | os.PathLike, *, overwrite: bool = False
) -> LongRangeForCausalLM:
    """Write the transformers directory of the longrange model in ``source`` to ``out``;
    return the transformers model (its weights are the loaded longrange model's)."""
    out = _target(out, overwrite)
    hf_model = wrap(LongRangeLM.from_pretrained(source))
    hf_model.save_pretrained(out)
    LongRangeByteTokenizer().save_pretrained(out)
    return hf_model


def import_hf(source: str | os.PathLike, out: str | os.PathLike, *, overwrite: bool = False) -> LongRangeLM:
    """Write the longrange model directory of the transformers directory ``source`` to
    ``out``; return the longrange model."""
    directory_family(source)
    out = _target(out, overwrite)
    model = from_pretrained(source).longrange
    model.save_pretrained(out)
    return model


def _target(out: str | os.PathLike, overwrite: bool) -> Path:
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{path} exists and is not a directory")
    if (path / CONFIG_NAME).exists() and not overwrite:
        raise ValueError(f"{path} already holds a model ({CONFIG_NAME}); pass overwrite to replace it")
    return path
