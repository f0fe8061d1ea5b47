import importlib

import pytest

import longrange
from longrange.models.registry import FAMILIES, available_families, create_model, family_module, get_family


def test_every_public_name_resolves():
    for name in longrange.__all__:
        assert hasattr(longrange, name), name
    with pytest.raises(AttributeError):
        longrange.NoSuchThing  # noqa: B018


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_registers_tiny_small_and_bench_presets(family):
    assert family in available_families()
    model = create_model(family, "tiny")
    assert model.num_params() > 0
    assert {"tiny", "small", "bench"} <= set(get_family(family).presets)


@pytest.mark.parametrize("family", FAMILIES)
def test_family_names_are_exported_at_the_top(family):
    module = importlib.import_module(family_module(family))
    assert set(module.EXPORTS) <= set(module.__all__)
    for name in module.EXPORTS:
        assert getattr(longrange, name) is getattr(module, name), name
    assert set(module.EXPORTS) <= set(dir(longrange))
