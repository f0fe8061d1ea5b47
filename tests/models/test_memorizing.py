"""memorizing: causal within a chunk with a filled memory; the memory changes outputs only
through past entries, per batch row; document starts (sos / eos) cut memory, XL window and
token shift; padding is neither attended nor stored; greedy decoding equals recompute with
XL, shifts, token shift and the gated combine; the memory files are owned and removed."""

import os

import pytest
import torch

from longrange.models.memorizing import MemorizingConfig, MemorizingLM
from longrange.models.registry import create_model, make_config
from longrange.testing import assert_causal, assert_close, assert_padding_ignored

VOCAB, CHUNK = 32, 16
SOS, EOS = 3, 4


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


@pytest.mark.parametrize("preset", ["tiny", "small", "bench"])
def test_presets_and_config_round_trip(preset):
    config = make_config("memorizing", preset)
    assert type(config).from_dict(config.to_dict()) == config
    if preset == "tiny":
        model = create_model("memorizing", preset).eval()
        assert model.carries_state and model.context_limit() is None
        state = model.init_state(1)  # a call without a state equals a fresh state's first chunk
        assert torch.equal(model(_tokens(1, 20)), model.forward_lm(_tokens(1, 20), state=state).logits)
        state.close()


def test_memory_folders_name_their_owner(tmp_path):
    model = _model(knn_memories_directory=str(tmp_path / "mem"))
    with model.knn_memories_context(batch_size=2) as memories:
        folder = memories[0].directory
        assert folder.parent == (tmp_path / "mem").resolve() and memories[1].directory == folder
        assert (folder / "OWNER").read_text() == str(os.getpid())
    assert list((tmp_path / "mem").iterdir()) == []


@pytest.mark.parametrize(
    "setting,message",
    [
        ({"memorizing_layers": (0,)}, "memorizing_layers"),
        ({"xl_memory_layers": (3,), "xl_max_memories": 4}, "xl_memory_layers"),
        ({"knn_backend": "exact", "knn_index": "hnsw"}, "knn_index"),
        ({"clear_memories_on_eos_token_id": VOCAB}, "clear_memories_on_eos_token_id"),
        ({"num_retrieved_memories": -1}, "num_retrieved_memories"),
    ],
    ids=["layer-0", "xl-layer-3", "hnsw-exact", "eos-range", "negative-k"],
)
def test_bad_config_raises(setting, message):
    with pytest.raises(ValueError, match=message):
        _model(**setting)


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"xl_max_memories": 5},
        {"clear_memories_on_sos_token_id": SOS, "clear_memories_on_eos_token_id": EOS},
        {"shift_tokens": True, "xl_max_memories": 5, "clear_memories_on_eos_token_id": EOS},
        {"knn_combine": "gate", "xl_max_memories": 5},
        {"xl_reproject": True, "xl_max_memories": 5, "clear_memories_on_eos_token_id": EOS},
    ],
    ids=["plain", "xl", "sos-eos", "shift-xl-eos", "gate-xl", "reproject-eos"],
)
def test_causal_within_a_chunk_with_a_filled_memory(options):
    model = _model(**options)
    history = _tokens(2, 2 * CHUNK, seed=1)

    def chunk_logits(tokens):
        state = model.init_state(2)
        model.forward_lm(history, state=state)  # fills the memory (and the XL window)
        out = model.forward_lm(tokens, state=state).logits
        state.close()
        return out

    # with a vocabulary of 32 the random tails often hold the sos / eos ids
    assert_causal(chunk_logits, _tokens(2, CHUNK - 3, seed=2), VOCAB, positions=(0, 4, 7, 11))


@pytest.mark.parametrize(
    "options", [{}, {"shift_tokens": True}, {"knn_combine": "gate"}], ids=["plain", "shift", "gate"]
)
def test_memory_changes_outputs_only_through_past_entries(options):
    model = _model(**options)
    chunks = _tokens(2, 3 * CHUNK, seed=3)
    state = model.init_state(2)
    first = model.forward_lm(chunks[:, :CHUNK], state=state).logits
    # Within the first chunk the memory is empty: searching before adding means no self-retrieval.
    assert_close(first, model(chunks[:, :CHUNK]), 1e-6)
    assert state.shared["knn"][0].db_offsets.tolist() == [CHUNK, CHUNK]
    second = model.forward_lm(chunks[:, CHUNK : 2 * CHUNK], state=state).logits
    assert (second - model(chunks[:, CHUNK : 2 * CHUNK])).abs().max() > 1e-4, "memory had no effect"
    # Changing row 1's past changes row 1 only: one memory per batch row.
    other = chunks.clone()
    other[1, :CHUNK] = _tokens(1, CHUNK, seed=4)
    again = model.init_state(2)
    model.forward_lm(other[:, :CHUNK], state=again)
    changed = model.forward_lm(other[:, CHUNK : 2 * CHUNK], state=again).logits
    assert torch.allclose(changed[0], second[0], atol=1e-6)
    assert (changed[1] - second[1]).abs().max() > 1e-4
    # Resetting a row (a new document) makes it forget; the other row keeps its memory.
    model.reset_state_rows(again, torch.tensor([True, False]))
    fresh = model.forward_lm(chunks[:, 2 * CHUNK :], state=again).logits
    ref_state = model.init_state(2)
    model.forward_lm(chunks[:, :CHUNK], state=ref_state)
    model.forward_lm(chunks[:, CHUNK : 2 * CHUNK], state=ref_state)
    remembered = model.forward_lm(chunks[:, 2 * CHUNK :], state=ref_state).logits
    assert_close(fresh[0], model(chunks[:, 2 * CHUNK :])[0], 1e-6)
    assert not torch.allclose(fresh[1], remembered[1], atol=1e-4)  # row 1 saw other[1]'s past
    for s in (state, again, ref_state):
        s.close()


def test_long_input_runs_chunk_by_chunk_like_a_carried_state():
    model = _model(xl_max_memories=6)
    tokens = _tokens(2, 3 * CHUNK + 5, seed=5)
    whole = model(tokens)
    state = model.init_state(2)
    pieces = [model.forward_lm(tokens[:, i : i + CHUNK], state=state).logits for i in range(0, 53, CHUNK)]
    assert_close(whole, torch.cat(pieces, dim=1), 1e-6)
    state.close()


def test_backward_after_a_call_without_a_state_reads_live_tables():
    """A call without a state closes its memory as it returns; the backward pass still reads
    the key and value tables its retrievals saved (closing used to unmap them, and this
    backward pass crashed the process). The gradients equal those of a state kept open."""
    model = _model(xl_max_memories=6).train()
    tokens = _tokens(2, 3 * CHUNK, seed=6)
    model.forward_lm(tokens).logits.sum().backward()
    closed = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    state = model.init_state(2)
    model.forward_lm(tokens, state=state).logits.sum().backward()
    state.close()
    kept = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    assert kept.keys() == closed.keys() and "blocks.1.attn.to_q.weight" in kept
    for name, grad in kept.items():
        assert_close(closed[name], grad, 1e-6)


def test_sos_token_clears_from_its_position_on():
    # One layer, so that positions after the sos see the earlier ones only through local keys.
    model = _model(clear_memories_on_sos_token_id=SOS, depth=1, memorizing_layers=(1,))
    history = _tokens(1, CHUNK, seed=6).clamp_min(SOS + 1)
    chunk = _tokens(1, CHUNK, seed=7).clamp_min(SOS + 1)
    marked = chunk.clone()
    marked[0, 9] = SOS

    def run(tokens, then=None):
        state = model.init_state(1)
        model.forward_lm(history, state=state)
        out = model.forward_lm(tokens, state=state).logits
        after = None if then is None else model.forward_lm(then, state=state).logits
        state.close()
        return out, after

    plain, _ = run(chunk)
    cleared, next_chunk = run(marked, then=chunk)
    assert torch.allclose(cleared[:, :9], plain[:, :9], atol=1e-6)  # earlier queries unaffected
    # From the sos on the old document is not retrieved: the same as having no memory at all.
    state = model.init_state(1)
    alone = model.forward_lm(marked, state=state).logits
    assert_close(cleared[:, 9:], alone[:, 9:], 1e-6)
    # After the chunk the memory holds only the new document (positions 9..15).
    follow = model.forward_lm(chunk, state=state).logits
    state.close()
    assert_close(next_chunk, follow, 1e-6)


@pytest.mark.parametrize("options", [{}, {"shift_tokens": True}], ids=["plain", "shift"])
def test_padding_is_neither_attended_nor_stored(options):
    model = _model(xl_max_memories=4, **options)
    tokens = _tokens(2, 2 * CHUNK, seed=8)
    mask = torch.ones_like(tokens, dtype=torch.bool)
    mask[0, 3:7] = False
    mask[1, 20:23] = False

    def run(t, m):
        state = model.init_state(2)
        out = torch.cat(
            [
                model.forward_lm(t[:, i : i + CHUNK], mask=m[:, i : i + CHUNK], state=state).logits
                for i in (0, CHUNK)
            ],
            dim=1,
        )
        assert state.shared["knn"][0].db_offsets.tolist() == [2 * CHUNK - 4 - 4, 2 * CHUNK - 3 - 4]
        state.close()
        return out

    assert_padding_ignored(run, tokens, mask, VOCAB)


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"xl_max_memories": 6, "shift_xl_memories_down": 1, "clear_memories_on_eos_token_id": EOS},
        {"shift_tokens": True, "xl_max_memories": 6, "clear_memories_on_eos_token_id": EOS},
        {"knn_combine": "gate", "clear_memories_on_eos_token_id": EOS},
        {"xl_reproject": True, "xl_max_memories": 6, "shift_xl_memories_down": 1, "shift_tokens": True},
    ],
    ids=["plain", "xl-shift-eos", "token-shift", "gate-eos", "reproject-shift"],
)
def test_greedy_generation_equals_recompute(options):
    model = _model(**options)
    prompt = _tokens(2, 21, seed=9)
    new = model.generate(prompt, 30, temperature=0)
    sequence = torch.cat([prompt, new], dim=1)
    logits = model(sequence[:, :-1])
    assert torch.equal(logits.argmax(dim=-1)[:, prompt.shape[1] - 1 :], new)


def test_an_eos_at_the_chunk_end_cuts_memory_xl_and_token_shift():
    model = _model(shift_tokens=True, xl_max_memories=5, clear_memories_on_eos_token_id=EOS)
    follow = _tokens(2, CHUNK, seed=20).clamp_min(EOS + 1)

    def after(first):
        first = first.clamp_min(EOS + 1)
        first[:, -1] = EOS
        state = model.init_state(2)
        model.forward_lm(first, state=state)
        out = model.forward_lm(follow, state=state).logits
        state.close()
        return out

    a, b = after(_tokens(2, CHUNK, seed=21)), after(_tokens(2, CHUNK, seed=22))
    assert_close(a, b, 1e-6)  # nothing of the finished document reaches the next one
    assert_close(a, model(follow), 1e-6)
    # Without the eos the previous chunk does reach it (through all three paths).
    state = model.init_state(2)
    model.forward_lm(_tokens(2, CHUNK, seed=21).clamp_min(EOS + 1), state=state)
    assert (model.forward_lm(follow, state=state).logits - a).abs().max() > 1e-4
    state.close()


def test_token_shift_reaches_across_chunks_and_decoding_steps():
    model = _model(shift_tokens=True, num_retrieved_memories=0)  # the shift is the only link
    tokens = _tokens(1, CHUNK + 3, seed=23)
    state = model.init_state(1)
    whole = model.forward_lm(tokens, state=state).logits
    state.close()
    logits, state = model.prefill(tokens[:, : CHUNK + 1])
    step, state = model.step(tokens[:, CHUNK + 1], state)
    state.close()
    assert_close(logits, whole[:, : CHUNK + 1], 1e-5)
    assert_close(step, whole[:, CHUNK + 1], 1e-5)
    # the first position of the second chunk depends on the last of the first
    other = tokens.clone()
    other[0, CHUNK - 1] = (other[0, CHUNK - 1] + 1) % VOCAB
    changed = model(other)
    assert (changed[:, CHUNK] - whole[:, CHUNK]).abs().max() > 1e-5


def test_batch_size_must_match_the_memories():
    model = _model()
    state = model.init_state(2)
    with pytest.raises(ValueError, match="the state holds 2 batch rows"):
        model.forward_lm(_tokens(3, 8), state=state)
    state.close()


def test_options_run_and_train():
    model = _model(
        knn_attn_heads=4,
        knn_gate_output=True,
        knn_backend="faiss",
        knn_index="hnsw",
        knn_memory_multiprocessing=True,
        attn_dropout=0.1,
        ff_dropout=0.1,
        attn_scale_init=10.0,
        shift_knn_memories_down=1,
        rel_pos_num_buckets=8,
        rel_pos_max_distance=32,
    ).train()
    gate = model.blocks[0].attn.output_gate
    assert gate is not None and model.blocks[0].attn.heads == 4
    state = model.init_state(2)
    for i in range(3):
        out = model.forward_lm(_tokens(2, CHUNK, seed=20 + i), state=state)
        out.logits.sum().backward()
        state = model.detach_state(out.state)
    assert gate.grad is not None and gate.grad.abs() > 0
    assert state.shared["knn"][1].backend == "faiss" and state.shared["knn"][1].index_kind == "hnsw"
    state.close()


def test_attention_dropout_runs_in_the_shared_kv_op(monkeypatch):
    """In training, attention dropout is applied by ops/shared_kv (its blocked form here: 16
    queries), not by the layers' score-matrix path: two steps from the same state differ; in
    evaluation they are equal."""
    from longrange.models.memorizing.layers import KNNAttention
    from longrange.ops.shared_kv import blocked

    def refuse(*args, **kwargs):
        raise AssertionError("the score-matrix path ran")

    monkeypatch.setattr(KNNAttention, "_attend", refuse)
    drawn = []
    keep_mask = blocked.keep_mask
    monkeypatch.setattr(blocked, "keep_mask", lambda w, rate: drawn.append(rate) or keep_mask(w, rate))
    model = _model(attn_dropout=0.5)
    tokens = _tokens(2, CHUNK, seed=60)

    def twice():
        outs = []
        for _ in range(2):
            state = model.init_state(2)
            outs.append(model.forward_lm(tokens, state=state).logits)
            state.close()
        return outs

    model.train()
    first, second = twice()
    assert not torch.allclose(first, second) and set(drawn) == {0.5}
    drawn.clear()
    model.eval()
    first, second = twice()
    assert torch.equal(first, second) and not drawn


def test_trainer_and_evaluation_carry_memory(tmp_path, text_folder):
    from longrange.data.corpus import load_corpus
    from longrange.train.config import TrainConfig
    from longrange.train.trainer import Trainer

    cfg = TrainConfig(
        model="memorizing",
        preset="tiny",
        set={"max_seq_len": 32, "max_knn_memories": 128},
        seq_len=32,
        batch_size=2,
        steps=3,
        eval_every=3,
        eval_tokens=256,
        log_every=1,
        save_every=3,
        out=str(tmp_path / "runs"),
        name="m",
        sample_tokens=8,
        progress=False,
    )
    trainer = Trainer(cfg, corpus=load_corpus(text_folder))
    result = trainer.fit()
    assert result["val_bpb_after"] < result["val_bpb_before"]
    assert trainer.state.shared["knn"][0].db_offsets.max() > 0
    loaded = MemorizingLM.from_pretrained(tmp_path / "runs" / "m")
    assert loaded.config == trainer.model.config
    trainer.state.close()


def test_evaluation_closes_each_documents_memory_when_it_ends():
    import numpy as np

    from longrange.data.corpus import Document
    from longrange.train.evaluate import evaluate_bpb

    model = _model()
    opened = []
    make_state = model.init_state

    def closed(state):
        return all(memory.closed for memory in state.shared["knn"])

    def recording(*args, **kwargs):
        opened.append(make_state(*args, **kwargs))
        assert all(closed(state) for state in opened[:-1]), "an earlier document's memory is still open"
        return opened[-1]

    model.init_state = recording
    docs = [
        Document(f"d{i}", np.asarray(_tokens(1, n, seed=i)[0], dtype=np.uint8))
        for i, n in enumerate((40, 9, 33))
    ]
    assert evaluate_bpb(model, docs, seq_len=CHUNK) > 0
    assert len(opened) == 3 and all(closed(state) for state in opened)


@pytest.mark.parametrize("n,m", [(7, 7), (5, 19), (1, 12)], ids=["square", "xl", "decode"])
def test_toeplitz_relative_bias_equals_the_table_lookup(n, m):
    from longrange.models.memorizing import relative_bias
    from longrange.modules.positional import T5RelativePositionBias

    table = T5RelativePositionBias(heads=3, causal=True, scale=2.0, num_buckets=8, max_distance=16)
    grad = torch.randn(3, n, m)
    assert_close(relative_bias(table, n, m), table(n, m), 1e-7)
    (relative_bias(table, n, m) * grad).sum().backward()
    fast = table.relative_attention_bias.weight.grad.clone()
    table.zero_grad()
    (table(n, m) * grad).sum().backward()
    assert_close(fast, table.relative_attention_bias.weight.grad, 1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_runs_without_nan(dtype):
    model = _model(xl_max_memories=4).train()
    state = model.init_state(2)
    mask = torch.ones(2, CHUNK, dtype=torch.bool)
    mask[1, :] = False  # a row whose keys are all masked
    with torch.autocast("cpu", dtype=dtype):
        for i in range(3):
            out = model.forward_lm(_tokens(2, CHUNK, seed=30 + i), mask=mask if i == 1 else None, state=state)
            assert torch.isfinite(out.logits).all()
            out.logits.float().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    state.close()


def test_zero_retrieved_memories_disables_the_memory():
    model = _model(num_retrieved_memories=0)
    tokens = _tokens(2, 3 * CHUNK, seed=40)
    state = model.init_state(2)
    carried = torch.cat(
        [model.forward_lm(tokens[:, i : i + CHUNK], state=state).logits for i in (0, 16, 32)], 1
    )
    alone = torch.cat([model(tokens[:, i : i + CHUNK]) for i in (0, 16, 32)], dim=1)
    assert_close(carried, alone, 1e-6)
    state.close()


def test_gated_combine_mixes_two_softmaxes_by_a_per_head_gate():
    from longrange.memory.knn.retrieval import Retrieved
    from longrange.models.memorizing import KNNAttention, causal_bias

    torch.manual_seed(0)
    attn = KNNAttention(dim=32, heads=2, dim_head=16, num_retrieved_memories=3, combine="gate").eval()
    with torch.no_grad():
        attn.memory_gate.copy_(torch.tensor([-1.0, 2.0]).view(2, 1, 1))
    q, k, v = attn.project(torch.randn(2, 5, 32))
    mem_k = torch.nn.functional.normalize(torch.randn(2, 2, 5, 3, 16), dim=-1)
    mem_v = torch.randn(2, 2, 5, 3, 16)
    found = torch.ones(2, 2, 5, 3, dtype=torch.bool)
    found[0, :, 1] = False  # this query found nothing: local attention only
    found[1, :, 2, 0] = False  # a missing neighbour gets no weight
    bias = causal_bias(None, 5, 5)
    # the pairs as a memory's tables hold them: one row per retrieved pair
    ids = torch.arange(2 * 2 * 5 * 3).view(2, 2, 5, 3)
    scores = torch.einsum("bhnd,bhnkd->bhnk", q, mem_k)
    found_pairs = Retrieved(ids, scores, found, mem_k.reshape(-1, 16), mem_v.reshape(-1, 16))
    got = attn.attend(q, k, v, None, bias, found_pairs)

    scale = attn.scale.exp()
    local = ((q @ k.transpose(-1, -2)[:, None]) * scale + bias).softmax(-1) @ v[:, None]
    sim_mem = torch.einsum("bhnd,bhnkd->bhnk", q, mem_k) * scale
    remote = torch.einsum("bhnk,bhnkd->bhnd", sim_mem.masked_fill(~found, float("-inf")).softmax(-1), mem_v)
    gate = attn.memory_gate.sigmoid().expand(2, 2, 5, 1).clone()
    gate[0, :, 1] = 0
    want = attn.to_out(((1 - gate) * local + gate * remote).transpose(1, 2).reshape(2, 5, 32))
    assert_close(got, want, 1e-5)


def test_gated_combine_is_checked_and_saved(tmp_path):
    with pytest.raises(ValueError, match="knn_combine must be 'softmax' or 'gate'"):
        MemorizingConfig(knn_combine="sum")
    model = _model(knn_combine="gate")
    assert any(name.endswith("memory_gate") for name, _ in model.named_parameters())
    model.save_pretrained(tmp_path / "m")
    loaded = MemorizingLM.from_pretrained(tmp_path / "m")
    assert loaded.config.knn_combine == "gate"
    tokens = _tokens(2, CHUNK, seed=41)
    assert_close(loaded.eval()(tokens), model(tokens), 1e-6)


SHARED_KV_CASES = {
    "chunk-keys": ({}, False),
    "xl-window": ({"xl_max_memories": 8}, False),
    "padded-documents": ({"xl_max_memories": 8, "clear_memories_on_eos_token_id": EOS}, True),
    "gated-combine": ({"knn_combine": "gate", "clear_memories_on_eos_token_id": EOS}, True),
}


@pytest.mark.parametrize("options, padded", SHARED_KV_CASES.values(), ids=SHARED_KV_CASES.keys())
def test_shared_kv_op_equals_the_layers_own_attention(monkeypatch, options, padded):
    """The attention through ops/shared_kv (the default, the gated combine's included) gives the
    logits and every parameter gradient of the layers' own score-matrix path, over chunks that
    retrieve from a filled memory; also with key padding (a left-padded row, whose first
    queries see no real key, and XL windows hidden after a document ends)."""
    from longrange.models.memorizing.layers import Attention

    torch.manual_seed(7)
    model = _model(**options).double().train()
    tokens = _tokens(2, 4 * CHUNK, seed=50)
    mask = torch.ones_like(tokens, dtype=torch.bool)
    if padded:
        tokens[1, CHUNK + 5] = EOS
        mask[0, 2 * CHUNK : 2 * CHUNK + 6] = False

    def run(by_op):
        if not by_op:
            monkeypatch.setattr(Attention, "reference_path", True)
        model.zero_grad(set_to_none=True)
        state, logits = model.init_state(2), []
        for i in range(0, tokens.shape[1], CHUNK):
            piece = mask[:, i : i + CHUNK] if padded else None
            out = model.forward_lm(tokens[:, i : i + CHUNK], mask=piece, state=state)
            kept = out.logits if piece is None else out.logits * piece[..., None]
            kept.pow(2).mean().backward()
            logits.append(kept.detach())
            state = model.detach_state(out.state)
        state.close()
        monkeypatch.undo()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return torch.cat(logits, 1), grads

    fast_logits, fast_grads = run(True)
    own_logits, own_grads = run(False)
    assert_close(fast_logits, own_logits, 1e-10)
    assert fast_grads.keys() == own_grads.keys() and any("rel_pos" in name for name in own_grads)
    for name, grad in own_grads.items():
        assert_close(fast_grads[name], grad, 1e-9, name=name)


def test_auto_backend_equals_exact_while_the_memory_is_small():
    """knn_backend="auto" (the adaptive index, exact below its limit) and "exact" give the
    same logits bit for bit while decoding, with rows whose memories fill unequally (a
    document starts in row 1)."""
    exact = _model(knn_backend="exact", clear_memories_on_sos_token_id=SOS)
    auto = _model(knn_backend="auto", clear_memories_on_sos_token_id=SOS)
    auto.load_state_dict(exact.state_dict())
    tokens = _tokens(2, 40, seed=3).clamp_min(EOS + 1)
    tokens[1, 30] = SOS
    got, got_state = auto.prefill(tokens[:, :36])
    want, want_state = exact.prefill(tokens[:, :36])
    assert torch.equal(got, want)
    for t in range(36, 40):
        assert torch.equal(auto.step(tokens[:, t], got_state)[0], exact.step(tokens[:, t], want_state)[0])
    got_state.close()
    want_state.close()


@pytest.mark.parametrize(
    "changed",
    [
        {"max_knn_memories": 128},
        {"dim": 64},
        {"heads": 4},
        {"xl_max_memories": 8, "xl_memory_layers": (1,)},
    ],
    ids=["capacity", "width", "heads", "xl-layers"],
)
def test_a_state_of_another_configuration_is_refused(tmp_path, monkeypatch, changed):
    """A saved state loaded into a model of another configuration is a ValueError at load:
    it used to load, then continue with the old memory capacity, or fail in the middle of a
    forward (a kNN search of the wrong width, a KeyError for a missing XL window). The refused
    state is closed (its memory files go at once), as is one of another batch size."""
    model = _model()
    state = model.init_state(2)
    model.forward_lm(_tokens(2, 3 * CHUNK), state=state)
    model.save_state(state, tmp_path / "state")
    state.close()
    closed = _record_closes(monkeypatch)
    other = _model(**changed)
    with pytest.raises(ValueError, match="another configuration"):
        other.load_state(tmp_path / "state", batch_size=2)
    assert len(closed) == 1
    with pytest.raises(ValueError, match="batch"):
        model.load_state(tmp_path / "state", batch_size=3)
    assert len(closed) == 2
    fresh = _model().init_state(2)  # a live state handed to the other model: the same refusal
    with pytest.raises(ValueError, match="another configuration"):
        other.forward_lm(_tokens(2, CHUNK), state=fresh)
    fresh.close()


def _record_closes(monkeypatch) -> list:
    """The states closed from now on (State.close still runs)."""
    from longrange.models.state import State

    closed, close = [], State.close
    monkeypatch.setattr(State, "close", lambda self: (closed.append(self), close(self))[1])
    return closed


@pytest.mark.parametrize("dies_at", ["tensors", "memory-index"])
def test_a_save_that_dies_half_way_does_not_load_as_a_mix(tmp_path, monkeypatch, dies_at):
    """Saving a state over an earlier save, killed after the kNN memories were written: the
    folder refuses to load, instead of loading the old position and XL windows beside the new
    memories (or a memory's old counts beside its new pairs), as it did."""
    import longrange.models.state as state_module
    from longrange.memory.knn import ExactIndex

    model = _model()
    state = model.init_state(2)
    model.forward_lm(_tokens(2, 2 * CHUNK), state=state)
    model.save_state(state, tmp_path / "state")
    model.forward_lm(_tokens(2, 2 * CHUNK, seed=1), state=state)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # stands for SIGKILL: nothing after this point runs

    if dies_at == "tensors":
        monkeypatch.setattr(state_module, "atomic_write_safetensors", killed)
    else:  # in a memory's save, after its pairs, before its metadata
        monkeypatch.setattr(ExactIndex, "save", killed, raising=False)
    with pytest.raises(KeyboardInterrupt):
        model.save_state(state, tmp_path / "state")
    monkeypatch.undo()
    with pytest.raises((FileNotFoundError, ValueError)):
        model.load_state(tmp_path / "state", batch_size=2)
    if dies_at == "memory-index":
        with pytest.raises(ValueError, match="no saved kNN memory"):
            state.shared["knn"][0].load(tmp_path / "state" / "files-1" / "layer1")
    model.save_state(state, tmp_path / "state")  # a complete save loads again
    loaded = model.load_state(tmp_path / "state", batch_size=2)
    assert loaded.position == state.position
    loaded.close()
    state.close()
