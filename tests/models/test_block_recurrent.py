"""block_recurrent: strictly causal; one call equals any split into segments with the state
passed along; the recurrent state changes across blocks and carries information beyond the
XL memory's reach; padding is ignored; incremental decoding (compressed memory) equals
recompute and runs one position per step; the state's reset, detach and carry switches."""

from __future__ import annotations

import pytest
import torch

from longrange.models.block_recurrent import BlockRecurrentLM
from longrange.models.block_recurrent.compat import BlockRecurrentTransformer
from longrange.models.block_recurrent.config import block_recurrent_bench
from longrange.models.registry import create_model
from longrange.testing import assert_causal, assert_close, assert_compiles_whole, assert_padding_ignored

V = 40
BASE = dict(
    vocab_size=V, dim=32, depth=2, heads=2, dim_head=8, block_width=8, num_state_vectors=4, max_seq_len=32
)
VARIANTS = {
    "default": {},
    "compressed-mem": dict(use_compressed_mem=True, compressed_mem_factor=2),
    "lstm-gate": dict(gate_type="lstm"),
    "read-below-write": dict(depth=3, recurrent_layers=(2, 3), read_recurrent_layers=(1, 3)),
    "all-layers-qknorm": dict(all_layers_qk_rmsnorm=True, depth=3, recurrent_layers=(3,)),
}


def model_for(variant: str, **extra) -> BlockRecurrentLM:
    torch.manual_seed(0)
    return create_model("block_recurrent", **{**BASE, **VARIANTS[variant], **extra}).eval()


def tokens(batch, n, seed=0):
    return torch.randint(0, V, (batch, n), generator=torch.Generator().manual_seed(seed))


def windows(state):
    return [layer["xl"] for layer in state.layers]


def states(state):
    return [layer["states"] for layer in state.layers if "states" in layer]


def run_in_segments(model, x, cuts, mask=None):
    state, outs, start = None, [], 0
    for stop in [*cuts, x.shape[1]]:
        piece_mask = None if mask is None else mask[:, start:stop]
        out = model.forward_lm(x[:, start:stop], mask=piece_mask, state=state)
        outs.append(out.logits)
        state, start = out.state, stop
    return torch.cat(outs, dim=1), state


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_causal(variant):
    model = model_for(variant)
    assert_causal(lambda t: model.forward_lm(t).logits, tokens(2, 29), V, positions=[0, 6, 7, 12, 20, 27])


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_segments_equal_one_call(variant):
    model = model_for(variant)
    x = tokens(2, 45, seed=1)
    whole = model.forward_lm(x)
    with torch.no_grad():
        pieces, state = run_in_segments(model, x, cuts=[5, 8, 19, 20, 37])
    assert_close(pieces, whole.logits, rtol=1e-5)
    for a, b in zip(windows(state) + states(state), windows(whole.state) + states(whole.state), strict=True):
        assert_close(a, b, rtol=1e-5)
    assert state.shared["open_length"] == 45 % 8 and state.layers[0]["open"].shape[-2] == 45 % 8
    assert state.position == whole.state.position == 45


@pytest.mark.parametrize("variant", ["default", "compressed-mem"])
def test_naive_backend_matches_fused(variant):
    x = tokens(2, 29, seed=15)
    mask = torch.rand(2, 29, generator=torch.Generator().manual_seed(15)) < 0.8
    fused = model_for(variant).forward_lm(x, mask=mask).logits
    naive = model_for(variant, attn_backend="naive").forward_lm(x, mask=mask).logits
    assert_close(fused, naive, rtol=1e-5)


def test_recurrent_state_changes_and_reaches_past_the_memory():
    # One layer: the XL memory reaches back one block, so block 0 can influence block 2
    # only through the recurrent state.
    torch.manual_seed(0)
    model = create_model("block_recurrent", **{**BASE, "depth": 1, "recurrent_layers": (1,)}).eval()
    x = tokens(1, 24, seed=2)
    changed = x.clone()
    changed[:, :8] = (x[:, :8] + 1) % V
    with torch.no_grad():
        base, _ = run_in_segments(model, x, cuts=[8, 16])
        other = model.forward_lm(changed).logits
        after_one = model.forward_lm(x[:, :8]).state.layers[0]["states"]
        after_two = model.forward_lm(x[:, :16]).state.layers[0]["states"]
    assert (after_one - after_two).abs().max() > 1e-3
    assert (other[:, 16:] - base[:, 16:]).abs().max() > 1e-4
    # Control: with the state read switched off, block 2 no longer sees block 0.
    with torch.no_grad():
        model.layers[0].to_out.weight[:, 16:] = 0
        base = model.forward_lm(x).logits
        other = model.forward_lm(changed).logits
    assert (other[:, 16:] - base[:, 16:]).abs().max() < 1e-5


@pytest.mark.parametrize("variant", ["default", "compressed-mem", "read-below-write"])
def test_padding_is_ignored_across_blocks_and_segments(variant):
    model = model_for(variant)
    x = tokens(3, 37, seed=3)
    gen = torch.Generator().manual_seed(4)
    mask = torch.rand(3, 37, generator=gen) < 0.7
    mask[1, :11] = False  # left padding, longer than a block
    mask[2, 20:] = False  # right padding

    assert_padding_ignored(lambda t, m: model.forward_lm(t, mask=m).logits, x, mask, V)
    assert_padding_ignored(lambda t, m: run_in_segments(model, t, [9, 24], m)[0], x, mask, V)


def test_incremental_generation_equals_recompute():
    model = model_for("compressed-mem")
    prompt = tokens(2, 11, seed=5)
    new = model.generate(prompt, 30, temperature=0)
    seq = prompt
    for _ in range(30):
        logits = model.forward_lm(seq).logits[:, -1]
        seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(new, seq[:, 11:])
    # Step logits equal the full forward's, token for token.
    with torch.no_grad():
        logits, state = model.prefill(seq[:, :3])
        steps = [logits]
        for t in range(3, seq.shape[1]):
            step_logits, state = model.step(seq[:, t], state)
            steps.append(step_logits[:, None])
    assert_close(torch.cat(steps, dim=1), model.forward_lm(seq).logits, rtol=1e-5)
    assert model.context_limit() is None


def test_decoding_step_runs_one_position():
    model = model_for("default")
    widths = []
    model.layers[0].to_q.register_forward_hook(lambda mod, args, out: widths.append(args[0].shape[1]))
    model.generate(tokens(1, 5, seed=14), 20, temperature=0)
    assert widths[0] == 5 and set(widths[1:]) == {1}


def test_evaluation_with_carried_state_equals_whole_documents():
    import numpy as np

    from longrange.data.corpus import Document
    from longrange.train.evaluate import evaluate_bpb

    model = model_for("compressed-mem")
    docs = [
        Document(f"d{i}", np.asarray(tokens(1, n, seed=i)[0], dtype=np.uint8)) for i, n in enumerate((61, 40))
    ]
    nats, count = 0.0, 0
    for doc in docs:
        x = torch.from_numpy(doc.tokens.astype(np.int64))[None]
        with torch.no_grad():
            logits = model.forward_lm(x[:, :-1]).logits
        nats += float(torch.nn.functional.cross_entropy(logits[0], x[0, 1:], reduction="sum"))
        count += x.shape[1] - 1
    expected = nats / count / np.log(2)
    assert abs(evaluate_bpb(model, docs, seq_len=12) - expected) < 1e-4


def test_state_protocol_reset_detach_and_carry_switch():
    model = model_for("default")
    x, y = tokens(2, 20, seed=6), tokens(2, 16, seed=7)

    def after_x(rows=(True, False)):
        state = model.forward_lm(x).state  # ends inside a block: the open block is reset too
        returned = model.reset_state_rows(state, torch.tensor(rows))
        assert returned is state
        return state

    state = after_x()
    out = model.forward_lm(y, state=state)
    assert out.state is state and state.position == 36  # continued in place
    # a reset row starts over: as a fresh row whose first 4 positions (the open block's) are padding
    padded = torch.cat([x[:1, 16:], y[:1]], dim=1)
    pad = torch.arange(20)[None] >= 4
    fresh = model.forward_lm(padded, mask=pad).logits[:, 4:]
    assert_close(out.logits[:1], fresh, rtol=1e-5)
    assert (out.logits[1] - model.forward_lm(y[1:]).logits[0]).abs().max() > 1e-4  # the other carries
    with pytest.raises(ValueError, match=r"rows must have shape \(2,\)"):
        model.reset_state_rows(state, torch.tensor([True]))

    model.train()
    out = model.forward_lm(x, state=model.init_state(2))
    assert "read" in out.state.layers[0]  # the open block's prepared states...
    detached = model.detach_state(out.state)
    assert "read" not in detached.layers[0]  # ...are rebuilt (with gradients) after a detach
    assert all(not t.requires_grad for t in windows(detached) + states(detached))
    model.eval()

    carried = model.forward_lm(y, state=after_x((False, False))).logits
    for carry in ("none", "xl_memory"):
        switched = model_for("default", segment_carry=carry)
        logits = switched.forward_lm(y, state=after_x((False, False))).logits
        if carry == "none":
            assert_close(logits, switched.forward_lm(y).logits, rtol=1e-6)
        else:
            assert (logits - carried).abs().max() > 1e-5


def test_memory_lean_functions_have_exact_gradients():
    from longrange.memory.recurrent import _ScaledL2Norm

    def f64(*shape):
        return torch.randn(*shape, dtype=torch.float64, requires_grad=True)

    gain = f64(6)
    heads_split = f64(2, 5, 3, 6).transpose(1, 2)  # [B, H, N, D] view of [B, N, H, D], as the layers pass
    for x in (f64(2, 3, 6), heads_split):
        assert torch.autograd.gradcheck(_ScaledL2Norm.apply, (x, gain))
        assert_close(_ScaledL2Norm.apply(x, gain), torch.nn.functional.normalize(x, dim=-1) * gain)


def test_save_load_and_half_precision(tmp_path):
    model = model_for("compressed-mem")
    model.save_pretrained(tmp_path / "run")
    loaded = BlockRecurrentLM.from_pretrained(tmp_path / "run").eval()
    x = tokens(2, 29, seed=13)
    assert_close(loaded.forward_lm(x).logits, model.forward_lm(x).logits, rtol=1e-6)
    mask = torch.ones_like(x, dtype=torch.bool)
    mask[0, :10] = False
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.forward_lm(x, mask=mask).logits
        plain = model.forward_lm(x).logits
    assert torch.isfinite(out).all() and torch.isfinite(plain).all()
    assert_close(plain.float(), model.forward_lm(x).logits, rtol=5e-2)


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(recurrent_layers=(3,)), "recurrent_layers must be None or a tuple of layer numbers from 1"),
        (dict(recurrent_layers=(1, 1)), "unique"),
        (dict(recurrent_layers=(1,), read_recurrent_layers=(2,)), "read layer must be <="),
        (dict(recurrent_layers=(1,), read_recurrent_layers=(1, 2)), "one entry per recurrent layer"),
        (dict(max_seq_len=30), "divisible by block_width"),
        (dict(gate_type="gru"), "gate_type"),
        (dict(segment_carry="some"), "segment_carry"),
        (dict(dim_head=7), "dim_head"),
    ],
    ids=["layer-range", "duplicate", "read-above-write", "read-count", "seq-len", "gate", "carry", "odd"],
)
def test_bad_config(change, match):
    with pytest.raises(ValueError, match=match):
        create_model("block_recurrent", **{**BASE, **change})


def test_bad_calls():
    model = model_for("default")
    state = model.forward_lm(tokens(2, 5)).state
    with pytest.raises(ValueError, match="batch rows"):
        model.forward_lm(tokens(3, 5), state=state)
    with pytest.raises(TypeError, match="State"):
        model.forward_lm(tokens(2, 5), state=[])
    vanilla = create_model("vanilla", vocab_size=V, dim=32, depth=2, heads=2).init_state(2)
    with pytest.raises(ValueError, match="not made by BlockRecurrentLM"):
        model.forward_lm(tokens(2, 5), state=vanilla)


@pytest.mark.parametrize("keeping", ["at-call", "policy"])
@pytest.mark.parametrize("variant", ["default", "compressed-mem", "read-below-write"])
def test_recomputed_segments_give_the_same_outputs_and_gradients(variant, keeping, monkeypatch):
    """A long training call in recomputed segments (of 2 and of 3 blocks, the last one partial,
    continuing a given state whose block is half full) equals the call without recomputation,
    outputs, carried state and every gradient; whichever way the segments keep the attention
    kernels' outputs (recorded at the call in eager CPU mode, else a checkpoint policy)."""
    import longrange.models.block_recurrent.model as block_model

    monkeypatch.setattr(block_model, "KEEP_AT_CALL", [keeping == "at-call"])
    x = tokens(2, 61, seed=21)
    mask = torch.rand(2, 61, generator=torch.Generator().manual_seed(21)) < 0.9
    results = []
    for size in (0, 16, 24):
        model = model_for(variant, recompute_segment=size).train()
        state = model.forward_lm(tokens(2, 12, seed=22)).state  # a half-full block to continue
        state = model.detach_state(state)
        out = model.forward_lm(x, mask=mask, state=state)
        (out.logits.square().mean() + sum(s.sum() for s in states(out.state))).backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        results.append((out.logits.detach(), windows(out.state) + states(out.state), grads))
    for logits, carried, grads in results[1:]:
        assert_close(logits, results[0][0], rtol=1e-5)
        for a, b in zip(carried, results[0][1], strict=True):
            assert_close(a.detach(), b.detach(), rtol=1e-5)
        assert grads.keys() == results[0][2].keys()
        for name, grad in grads.items():
            assert_close(grad, results[0][2][name], rtol=1e-4, name=name)


@pytest.mark.parametrize("keeping", ["at-call", "policy"])
def test_recomputed_segments_keep_the_attention_kernels_outputs(keeping, monkeypatch):
    """A recomputed segment's backward re-runs the layers but not the fused attention kernels:
    their outputs are kept from the forward pass (recorded at the call, or by the checkpoint
    policy's KEPT_OPS); without that the kernels would run again."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.checkpoint import CheckpointPolicy

    import longrange.models.block_recurrent.model as block_model

    class KernelCalls(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.count += func in block_model.KEPT_OPS
            return func(*args, **(kwargs or {}))

    def calls() -> tuple[int, int]:
        model = model_for("default", recompute_segment=16).train()
        forward, backward = KernelCalls(), KernelCalls()
        with forward:
            loss = model.forward_lm(tokens(2, 61, seed=21)).logits.square().mean()
        with backward:
            loss.backward()
        return forward.count, backward.count

    monkeypatch.setattr(block_model, "KEEP_AT_CALL", [keeping == "at-call"])
    kept = calls()
    monkeypatch.setattr(block_model, "KEEP_AT_CALL", [False])
    monkeypatch.setattr(block_model, "keep_attention", lambda *a, **k: CheckpointPolicy.PREFER_RECOMPUTE)
    plain = calls()
    assert kept[0] > 0 and kept[1] == 0
    assert plain[0] == kept[0] and plain[1] > 0


COMPILED = {
    # the bench preset's options (qk scale 8, states = block width, recomputed segments)
    "bench-options": lambda: BlockRecurrentLM(
        block_recurrent_bench().replace(
            vocab_size=V,
            dim=32,
            heads=2,
            dim_head=8,
            depth=2,
            block_width=8,
            max_seq_len=32,
            recompute_segment=16,
        )
    ),
    # the reference-named class with the reference's defaults (sizes aside)
    "reference-defaults": lambda: BlockRecurrentTransformer(num_tokens=V, dim=32, depth=2, block_width=8),
}


@pytest.mark.parametrize("build", list(COMPILED))
def test_training_step_with_carried_state_compiles_without_graph_breaks(build):
    torch.manual_seed(0)
    model = COMPILED[build]().train()
    x = tokens(2, 37, seed=31)

    def run(compiled: bool):
        state = model.detach_state(model.forward_lm(tokens(2, 12, seed=30)).state)  # a block half full

        def loss(x):
            out = model.forward_lm(x, mask=x > 2, state=state)
            return out.logits.float().logsumexp(-1).mean() + states(out.state)[0].square().mean()

        model.zero_grad(set_to_none=True)
        if compiled:
            value = assert_compiles_whole(loss, x)
        else:
            value = loss(x)
            value.backward()
        return value, {name: p.grad for name, p in model.named_parameters() if p.grad is not None}

    (want, want_grads), (got, got_grads) = run(False), run(True)
    assert_close(got, want, rtol=1e-5)
    assert got_grads.keys() == want_grads.keys() and len(got_grads) > 10
    for name, grad in got_grads.items():
        assert_close(grad, want_grads[name], rtol=1e-4, name=name)


@pytest.mark.slow
def test_inductor_compiled_training_loss_equals_eager():
    torch.manual_seed(0)
    model = model_for("default").train()
    x = tokens(2, 29, seed=32)

    def loss(x):
        return torch.nn.functional.cross_entropy(model.forward_lm(x[:, :-1]).logits.transpose(1, 2), x[:, 1:])

    torch._dynamo.reset()
    compiled = torch.compile(loss, fullgraph=True)
    assert_close(compiled(x), loss(x), rtol=1e-5)
