"""Registration with transformers' Auto classes, and loading either directory format.

:func:`register` (run when ``longrange.hf`` is imported) registers, for every family in
:data:`longrange.models.registry.FAMILIES`, its config class under ``model_type``
``"longrange_<family>"`` with ``AutoConfig``, its causal-LM class with ``AutoModel`` and
``AutoModelForCausalLM``, and the byte tokenizer with ``AutoTokenizer``. The classes are made
without importing the family, so a family that is not available in a build is refused (a
ValueError naming it) only when a directory of that family is loaded.

transformers knows a model only in the process that imported ``longrange.hf``: the Auto
classes, ``pipeline`` and ``lm_eval.simple_evaluate(model="hf", ...)`` work after the import;
a separate ``lm_eval`` command does not import it (``python -m longrange.hf.harness`` runs
lm-evaluation-harness with the registration done).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

from longrange.hf.configuration import FAMILY_KEY, config_class_for, family_of_model_type
from longrange.hf.modeling import LongRangeForCausalLM, model_class_for
from longrange.hf.tokenizer import LongRangeByteTokenizer
from longrange.models.base import CONFIG_NAME
from longrange.models.registry import FAMILIES


def register() -> None:
    """Register every family with the Auto classes (idempotent)."""
    for family in FAMILIES:
        config_class, model_class = config_class_for(family), model_class_for(family)
        AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
        AutoModel.register(config_class, model_class, exist_ok=True)
        AutoModelForCausalLM.register(config_class, model_class, exist_ok=True)
        AutoTokenizer.register(config_class, tokenizer_class=LongRangeByteTokenizer, exist_ok=True)


def directory_family(directory: str | os.PathLike) -> str:
    """The family of a model directory in either format (the ``"family"`` key of a longrange
    ``config.json``, or its transformers ``model_type``); ValueError when it is neither."""
    path = Path(directory)
    config_file = path / CONFIG_NAME
    if not config_file.is_file():
        raise FileNotFoundError(f"no {CONFIG_NAME} in {path}: not a model directory")
    try:
        data = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"corrupt {config_file}: {err}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{config_file} is not a model config")
    if "model_type" in data:
        family = family_of_model_type(str(data["model_type"]))
        if data.get(FAMILY_KEY, family) != family:
            raise ValueError(f"{config_file}: family {data[FAMILY_KEY]!r} and model_type disagree")
        return family
    if data.get(FAMILY_KEY) in FAMILIES:
        return data[FAMILY_KEY]
    raise ValueError(f"{config_file} is neither a longrange nor a longrange transformers config")


def from_pretrained(directory: str | os.PathLike, **kwargs: Any) -> LongRangeForCausalLM:
    """The transformers model of a directory in either format: one written by transformers'
    ``save_pretrained`` (or ``longrange export-hf``), or a longrange model directory
    (``LongRangeLM.save_pretrained``; the weights files have the same tensor names).
    ``kwargs`` go to transformers' ``from_pretrained`` (e.g. ``dtype``, ``segment_long_inputs``).
    A weights file that cannot be read, or whose shapes the config does not give, is a ValueError."""
    model_class = model_class_for(directory_family(directory))
    try:
        return model_class.from_pretrained(directory, **kwargs)
    except SafetensorError as err:
        raise ValueError(f"corrupt or unreadable weights file in {directory}: {err}") from None
    except RuntimeError as err:
        # transformers reports weights whose shapes the config does not give, then raises this.
        if "ignore_mismatched_sizes" not in str(err):
            raise
        shapes = f"do not have the shapes its {CONFIG_NAME} gives"
        raise ValueError(f"the weights in {directory} {shapes}") from None
