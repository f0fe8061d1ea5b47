"""longrange models in the Hugging Face ecosystem (the optional extra ``longrange[hf]``).

Importing this package registers every family with transformers' Auto classes
(``AutoConfig``, ``AutoModel``, ``AutoModelForCausalLM``, ``AutoTokenizer``), so that
``from_pretrained``, ``generate``, ``pipeline("text-generation")``, the ``Trainer`` and
lm-evaluation-harness's ``hf`` model work on longrange models:

>>> import longrange.hf
>>> from transformers import AutoModelForCausalLM
>>> model = AutoModelForCausalLM.from_pretrained("hf/vanilla-small")  # doctest: +SKIP

The core library never imports transformers; only this package does. Its parts:
``configuration`` (the config per family), ``modeling`` (the causal LM wrapping the longrange
model), ``cache`` (the longrange decoding state as a transformers cache), ``tokenizer`` (bytes
as tokens), ``auto`` (registration; loading either directory format), ``export`` (the
``export-hf`` / ``import-hf`` conversions) and ``harness`` (lm-evaluation-harness tasks).
"""

from __future__ import annotations

try:
    import transformers  # noqa: F401
except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError(
        f"longrange.hf needs transformers ({err}); install the extra: pip install 'longrange[hf]'"
    ) from None

from longrange.hf.auto import directory_family, from_pretrained, register
from longrange.hf.cache import LongRangeCache
from longrange.hf.configuration import LongRangeConfig, config_class_for, model_type_for
from longrange.hf.export import export_hf, import_hf
from longrange.hf.modeling import LongRangeForCausalLM, model_class_for, wrap
from longrange.hf.tokenizer import LongRangeByteTokenizer

register()

__all__ = [
    "LongRangeByteTokenizer",
    "LongRangeCache",
    "LongRangeConfig",
    "LongRangeForCausalLM",
    "config_class_for",
    "directory_family",
    "export_hf",
    "from_pretrained",
    "import_hf",
    "model_class_for",
    "model_type_for",
    "register",
    "wrap",
]
