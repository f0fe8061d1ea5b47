"""memorizing with ``xl_reproject``: XL windows of layer inputs re-projected with the current
weights equal stored keys/values while the weights stay, follow the weights when they change,
and pass gradients into the projection as one long chunk does."""

import pytest
import torch

from longrange.models.memorizing import MemorizingConfig, MemorizingLM
from longrange.testing import assert_close

VOCAB, CHUNK = 32, 16
EOS = 4


def _model(**overrides):
    settings = dict(
        vocab_size=VOCAB,
        dim=32,
        depth=2,
        heads=2,
        max_seq_len=CHUNK,
        max_knn_memories=64,
        num_retrieved_memories=4,
        knn_backend="exact",
        memorizing_layers=(1, 2),
    )
    settings.update(overrides)
    return MemorizingLM(MemorizingConfig(**settings)).eval()


def _tokens(batch, n, seed=0):
    return torch.randint(0, VOCAB, (batch, n), generator=torch.Generator().manual_seed(seed))


pytestmark = pytest.mark.usefixtures("no_knn_files_left")


def _two_chunks(model, tokens, batch):
    state = model.init_state(batch)
    out = [model.forward_lm(tokens[:, i : i + CHUNK], state=state).logits for i in (0, CHUNK)]
    return state, out


@pytest.mark.parametrize(
    "options",
    [
        {"xl_max_memories": 5},
        {"xl_max_memories": 5, "shift_tokens": True, "clear_memories_on_eos_token_id": EOS},
        {"xl_max_memories": 7, "xl_memory_layers": (2,), "knn_combine": "gate"},
    ],
    ids=["xl", "shift-eos", "one-layer-gate"],
)
def test_reprojected_xl_equals_stored_keys_while_the_weights_stay(options):
    # Same weights throughout: projecting the kept inputs again gives the stored keys/values,
    # so logits, kNN memory contents and decoding agree with the reference's form.
    stored, inputs = _model(**options), _model(xl_reproject=True, **options)
    inputs.load_state_dict(stored.state_dict())
    tokens = _tokens(2, 4 * CHUNK + 3, seed=50)
    a, b = stored.init_state(2), inputs.init_state(2)
    for i in range(0, tokens.shape[1], CHUNK):
        piece = tokens[:, i : i + CHUNK]
        assert_close(inputs.forward_lm(piece, state=b).logits, stored.forward_lm(piece, state=a).logits, 1e-5)
    assert b.layers[inputs.xl_layers[0] - 1]["xl"].shape[-1] == 32  # inputs (dim 32), not keys/values
    for mine, theirs in zip(b.shared["knn"], a.shared["knn"]):
        assert mine.db_offsets.tolist() == theirs.db_offsets.tolist()
    for s in (a, b):
        s.close()
    prompt = tokens[:, : CHUNK + 5]
    assert torch.equal(inputs.generate(prompt, 20, temperature=0), stored.generate(prompt, 20, temperature=0))


def test_reprojected_xl_uses_the_current_weights():
    # Changing the last layer's key/value projection between two chunks: with xl_reproject the
    # second chunk sees its XL window as a model that had the new weights all along; stored
    # keys keep the old projection. The window holds the whole first chunk, so nothing
    # reaches the kNN memory before the second chunk.
    options = dict(xl_max_memories=CHUNK, num_retrieved_memories=0)
    tokens = _tokens(2, 2 * CHUNK, seed=51)
    results = {}
    for reproject in (False, True):
        model = _model(xl_reproject=reproject, **options)
        torch.manual_seed(52)
        new_kv = torch.randn_like(model.blocks[-1].attn.to_kv.weight) * 0.2
        state = model.init_state(2)
        model.forward_lm(tokens[:, :CHUNK], state=state)
        with torch.no_grad():
            model.blocks[-1].attn.to_kv.weight.copy_(new_kv)
        second = model.forward_lm(tokens[:, CHUNK:], state=state).logits
        state.close()
        _, (_, fresh) = _two_chunks(model, tokens, 2)
        results[reproject] = (second - fresh).abs().max().item()
    assert results[True] < 1e-5
    assert results[False] > 1e-3


def test_reprojected_xl_passes_gradients_to_the_projection_as_one_long_chunk_does():
    # A chunk of C with an XL window of C over [c1 ; c2] is, for c2's queries, one chunk of 2C.
    # With xl_reproject the window's keys also carry gradients into the key/value projection,
    # exactly as c1's keys do inside the long chunk.
    tokens = _tokens(2, 2 * CHUNK, seed=53)
    chunked = _model(xl_max_memories=CHUNK, xl_reproject=True).train()
    long = _model(max_seq_len=2 * CHUNK).train()
    long.load_state_dict(chunked.state_dict())
    state, (_, second) = _two_chunks(chunked, tokens, 2)
    state.close()
    whole = long(tokens)[:, CHUNK:]
    assert_close(second, whole, 1e-5)
    weights = [b.attn.to_kv.weight for b in (chunked.blocks[-1], long.blocks[-1])]
    grads = [torch.autograd.grad(out.square().mean(), w)[0] for out, w in zip((second, whole), weights)]
    assert_close(grads[0], grads[1], 1e-4)


def test_reproject_is_checked_and_saved(tmp_path):
    with pytest.raises(ValueError, match="xl_reproject must be True or False"):
        MemorizingConfig(xl_reproject="yes")
    model = _model(xl_max_memories=4, xl_reproject=True)
    model.save_pretrained(tmp_path / "m")
    assert MemorizingLM.from_pretrained(tmp_path / "m").config.xl_reproject is True
