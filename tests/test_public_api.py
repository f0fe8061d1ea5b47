import importlib

import pytest

import longrange
from longrange.models.registry import FAMILY_MODULES, available_families, create_model


def test_every_public_name_resolves():
    for name in longrange.__all__:
        assert getattr(longrange, name) is not None, name
    with pytest.raises(AttributeError):
        longrange.NoSuchThing  # noqa: B018


@pytest.mark.parametrize("family", list(FAMILY_MODULES))
def test_every_family_registers_tiny_small_and_bench_presets(family):
    assert family in available_families()
    module = importlib.import_module(FAMILY_MODULES[family])
    assert module is not None
    model = create_model(family, "tiny")
    assert model.num_params() > 0
    fam = longrange.models.registry.get_family(family)
    assert {"tiny", "small", "bench"} <= set(fam.presets)
