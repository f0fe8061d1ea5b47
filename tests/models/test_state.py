from dataclasses import dataclass

import pytest
import torch

from longrange.models.state import State, state_entry


@state_entry
@dataclass
class _Entry:
    keys: torch.Tensor
    length: int


@dataclass
class _Unregistered:
    x: int


def _state() -> State:
    state = State.empty(2, 3, context=torch.randn(2, 4, 8))
    state.position = 17
    state.layers[0]["kv"] = _Entry(torch.randn(2, 5, 3), 5)
    state.layers[1]["sums"] = (torch.randn(2, 3), None, [1, 2.5, "x", True])
    state.layers[2]["nested"] = {"a": torch.arange(6).view(2, 3)}
    return state


def test_save_load_round_trip(tmp_path):
    state = _state()
    state.save(tmp_path / "s")
    loaded = State.load(tmp_path / "s")
    assert (loaded.batch_size, loaded.position) == (2, 17)
    assert torch.equal(loaded.shared["context"], state.shared["context"])
    entry = loaded.layers[0]["kv"]
    assert (
        isinstance(entry, _Entry)
        and entry.length == 5
        and torch.equal(entry.keys, state.layers[0]["kv"].keys)
    )
    sums = loaded.layers[1]["sums"]
    assert isinstance(sums, tuple) and sums[1] is None and sums[2] == [1, 2.5, "x", True]
    assert torch.equal(sums[0], state.layers[1]["sums"][0])
    assert torch.equal(loaded.layers[2]["nested"]["a"], torch.arange(6).view(2, 3))


def test_unregistered_entries_and_corrupt_files_are_refused(tmp_path):
    state = _state()
    state.layers[0]["odd"] = _Unregistered(1)
    with pytest.raises(TypeError, match="register it"):
        state.save(tmp_path / "s")
    good = _state()
    good.save(tmp_path / "g")
    (tmp_path / "g" / "state.json").write_text("{broken")
    with pytest.raises(ValueError, match="corrupt"):
        State.load(tmp_path / "g")
    with pytest.raises(FileNotFoundError):
        State.load(tmp_path / "missing")


def test_detach_cuts_the_graph_and_checks_the_batch():
    weight = torch.randn(3, requires_grad=True)
    state = State.empty(2, 1)
    state.layers[0]["h"] = (weight * 2, [weight + 1])
    detached = state.detach()
    assert not detached.layers[0]["h"][0].requires_grad and not detached.layers[0]["h"][1][0].requires_grad
    assert state.layers[0]["h"][0].requires_grad
    with pytest.raises(ValueError, match="2 batch rows"):
        state.check_batch(3)
