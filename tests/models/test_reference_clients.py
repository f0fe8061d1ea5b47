"""Reference clients: what the reference packages' READMEs and training scripts do, run on
longrange's classes with only the import changed (sizes shrunk).

The usage patterns are written here from the behaviour the scripts rely on, one test per
reference class: the shapes they read, backward on every loss they get back, and a few steps
of their kind of loop lowering the loss (measured in eval mode before and after, so dropout
does not blur it). One test per family then runs the family's enwik8-style training script
(its wrapper or loop, Adam at the script's learning rate, gradient clipping at 0.5) on
Python source text: the loss must fall below the uniform guess ln 256 and never rise
clearly above both ln 256 and where it started (the references' output layers start with
logits of std ~0.6, so an untrained model sits a little above ln 256; a memorizing run with
the wrong initialisation was seen to jump to 6.5 by its third step).
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from longrange.models import block_recurrent, memorizing, performer, routing, sinkhorn

TEXT = torch.tensor(list(Path(textwrap.__file__).read_bytes()), dtype=torch.long)
UNIFORM = math.log(256)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def text_batches(batch: int, length: int, seed: int = 0) -> Iterator[Tensor]:
    """Random windows of ``length`` bytes of Python source, as the scripts sample enwik8."""
    gen = torch.Generator().manual_seed(seed)
    while True:
        starts = torch.randint(0, len(TEXT) - length, (batch,), generator=gen)
        yield torch.stack([TEXT[s : s + length] for s in starts])


def train(model: nn.Module, step_loss: Callable[[], Tensor], lr: float, count: int) -> list[float]:
    """``count`` Adam steps, gradients clipped at 0.5 (the scripts' loop); the losses."""
    optim = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    for _ in range(count):
        model.train()
        losses.append(float(step_loss().detach()))
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        optim.step()
        optim.zero_grad()
    return losses


def assert_steps_lower(model: nn.Module, loss_fn: Callable[[], Tensor], lr: float = 1e-3, count: int = 3):
    """``count`` steps on ``loss_fn`` (which returns the loss to backpropagate) lower it."""
    model.eval()
    with torch.no_grad():
        before = float(loss_fn())

    def step() -> Tensor:
        loss = loss_fn()
        loss.backward()
        return loss

    train(model, step, lr, count)
    model.eval()
    with torch.no_grad():
        assert float(loss_fn()) < before


def assert_trains(losses: list[float]) -> None:
    """Falls below the uniform guess, and no step rises above it and the start by more than
    the spread between random batches (about 0.1 here)."""
    assert max(losses[1:]) <= max(losses[0], UNIFORM) + 0.2, losses
    assert max(losses[-2:]) < UNIFORM and losses[-1] < losses[0] - 0.2, losses


def lm_loss(logits: Tensor, x: Tensor) -> Tensor:
    return F.cross_entropy(logits[:, :-1].transpose(1, 2), x[:, 1:])


# --- routing_transformer ------------------------------------------------------------------
def test_routing_lm_readme():
    torch.manual_seed(0)
    model = routing.RoutingTransformerLM(
        num_tokens=64, dim=32, heads=4, depth=2, max_seq_len=64, causal=True, emb_dim=16,
        weight_tie=False, dim_head=8, attn_dropout=0.1, attn_layer_dropout=0.0, ff_dropout=0.1,
        layer_dropout=0.0, window_size=16, n_local_attn_heads=2, reversible=True, ff_chunks=2,
        ff_glu=True, pkm_layers=(1,), pkm_num_keys=32, moe_layers=(2,), moe_num_experts=2,
        num_mem_kv=2, use_scale_norm=False, use_rezero=False,
    )  # fmt: skip
    x = torch.randint(0, 64, (1, 64))
    input_mask = torch.ones_like(x).bool()
    y, aux_loss = model(x, input_mask=input_mask)
    assert y.shape == (1, 64, 64) and aux_loss.shape == ()  # 0-d from a reversible stack
    aux_loss.backward()

    def loss() -> Tensor:
        logits, aux = model(x, input_mask=input_mask)
        return lm_loss(logits, x) + aux

    assert_steps_lower(model, loss)


def test_routing_transformer_readme():
    torch.manual_seed(0)
    model = routing.RoutingTransformer(
        dim=32, heads=4, depth=2, max_seq_len=64, window_size=16, n_local_attn_heads=2
    )
    x = torch.randn(1, 64, 32)
    y, aux_loss = model(x, input_mask=torch.ones(1, 64).bool())
    assert y.shape == (1, 64, 32) and aux_loss.shape == (1,)
    aux_loss.backward()
    assert_steps_lower(model, lambda: sum(t.pow(2).mean() for t in model(x)))


def test_routing_enc_dec_readme_and_copy_script():
    torch.manual_seed(0)
    sides = dict(num_tokens=20, depth=1, heads=4, max_seq_len=32, window_size=8)
    model = routing.RoutingTransformerEncDec(
        dim=32, **{f"{p}{k}": v for p in ("enc_", "dec_") for k, v in sides.items()}, dec_reversible=True
    )
    src = torch.randint(2, 20, (2, 16))
    tgt = torch.cat((torch.ones(2, 1).long(), src, src), dim=1)
    src_mask, tgt_mask = torch.ones_like(src).bool(), torch.ones_like(tgt).bool()
    kwargs = dict(enc_input_mask=src_mask, dec_input_mask=tgt_mask, return_loss=True)
    loss, aux_loss = model(src, tgt, randomly_truncate_sequence=True, **kwargs)
    loss.backward()
    aux_loss.backward()
    sample = model.generate(src[:1], torch.ones(1, 1).long(), seq_len=12, eos_token=2)
    assert sample.shape[0] == 1 and sample.shape[1] <= 12
    # the copy-task script: ``loss, _ = model(...)``, backward on the first only
    assert_steps_lower(model, lambda: model(src, tgt, **kwargs)[0])


def test_routing_wrapper_readme_manual_kmeans_and_truncation():
    torch.manual_seed(0)
    kw = dict(num_tokens=64, dim=32, heads=4, depth=2, window_size=16, max_seq_len=64, causal=True)
    model = routing.RoutingTransformerLM(**kw, _register_kmeans_update=False)
    wrapper = routing.AutoregressiveWrapper(model)
    x = torch.randint(0, 64, (1, 64))
    wrapper(x, return_loss=True).backward()
    means = [m.kmeans.means.clone() for m in model.modules() if hasattr(m, "kmeans")]
    assert model.update_kmeans() is None
    moved = [m.kmeans.means for m in model.modules() if hasattr(m, "kmeans")]
    assert not any(torch.equal(a, b) for a, b in zip(means, moved))
    loss = wrapper(x, return_loss=True, randomly_truncate_sequence=True)
    assert loss.shape == (1,)
    padded = routing.Autopadder(routing.RoutingTransformerLM(**kw, n_local_attn_heads=2))
    assert padded(x[:, :50])[0].shape == (1, 50, 64)


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")  # an all-local layer
def test_routing_enwik8_script():
    torch.manual_seed(0)
    model = routing.AutoregressiveWrapper(
        routing.RoutingTransformerLM(
            num_tokens=256, dim=256, depth=2, max_seq_len=64, heads=4, causal=True, window_size=16,
            n_local_attn_heads=(4, 2),
        )
    )  # fmt: skip
    data = text_batches(4, 65)

    def step() -> Tensor:
        loss = model(next(data), return_loss=True)
        loss.backward()
        return loss

    assert_trains(train(model, step, 1e-4, 8))
    model.eval()
    sample = model.generate(next(data)[0, :-1], 8)  # a 1-d prime, as the script samples
    assert sample.shape == (8,)


# --- sinkhorn_transformer -----------------------------------------------------------------
def test_sinkhorn_lm_readme():
    torch.manual_seed(0)
    model = sinkhorn.SinkhornTransformerLM(
        num_tokens=64, dim=32, heads=4, depth=2, bucket_size=8, max_seq_len=64, causal=False,
        sinkhorn_iter=7, n_sortcut=2, temperature=0.75, non_permutative=False, ff_chunks=2,
        reversible=True, ff_dropout=0.1, attn_dropout=0.1, attn_layer_dropout=0.1, weight_tie=True,
        emb_dim=16, ff_glu=True,
    )  # fmt: skip
    x = torch.randint(0, 64, (1, 64))
    assert model(x).shape == (1, 64, 64)
    assert_steps_lower(model, lambda: F.cross_entropy(model(x).transpose(1, 2), x))


def test_sinkhorn_transformer_and_two_model_enc_dec_readme():
    torch.manual_seed(0)
    stack = sinkhorn.SinkhornTransformer(dim=32, heads=4, depth=2, bucket_size=8)
    h = torch.randn(1, 64, 32)
    assert stack(h).shape == (1, 64, 32)
    enc = sinkhorn.SinkhornTransformerLM(
        num_tokens=64, dim=32, depth=1, heads=4, bucket_size=8, max_seq_len=64, reversible=True,
        return_embeddings=True,
    )  # fmt: skip
    dec = sinkhorn.SinkhornTransformerLM(
        num_tokens=64, dim=32, depth=1, causal=True, bucket_size=8, max_seq_len=64,
        receives_context=True, reversible=True,
    )  # fmt: skip
    x, y = torch.randint(0, 64, (1, 64)), torch.randint(0, 64, (1, 64))
    context = enc(x)
    assert context.shape == (1, 64, 32) and dec(y, context=context).shape == (1, 64, 64)
    both = nn.ModuleList([enc, dec])
    assert_steps_lower(both, lambda: lm_loss(dec(y, context=enc(x)), y))


def test_sinkhorn_enwik8_script_and_autopadder():
    torch.manual_seed(0)
    lm = sinkhorn.SinkhornTransformerLM(
        num_tokens=256, dim=256, depth=2, max_seq_len=64, heads=4, causal=True, bucket_size=16
    )
    model = sinkhorn.AutoregressiveWrapper(lm)
    data = text_batches(4, 65)

    def step() -> Tensor:
        loss = model(next(data), return_loss=True)
        loss.backward()
        return loss

    assert_trains(train(model, step, 1e-4, 8))
    model.eval()
    assert model.generate(next(data)[:, :10], 8).shape == (4, 8)
    assert sinkhorn.Autopadder(lm)(next(data)[:, :50]).shape == (4, 50, 256)


# --- performer_pytorch --------------------------------------------------------------------
def test_performer_lm_readme():
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="'tie_embedding' is taken as 'tie_embed'"):
        model = performer.PerformerLM(
            num_tokens=64, max_seq_len=64, dim=32, depth=2, heads=4, causal=False, nb_features=16,
            feature_redraw_interval=1000, generalized_attention=False, kernel_fn=nn.ReLU(),
            reversible=True, ff_chunks=2, use_scalenorm=False, use_rezero=False, tie_embedding=False,
            ff_glu=True, emb_dropout=0.1, ff_dropout=0.1, attn_dropout=0.1, local_attn_heads=2,
            local_window_size=16,
        )  # fmt: skip
    x = torch.randint(0, 64, (1, 64))
    mask = torch.ones_like(x).bool()
    assert model(x, mask=mask).shape == (1, 64, 64)
    model.fix_projection_matrices_()
    assert_steps_lower(model, lambda: F.cross_entropy(model(x, mask=mask).transpose(1, 2), x))


def test_performer_stack_self_attention_and_fast_attention_readme():
    torch.manual_seed(0)
    x = torch.randn(1, 64, 32)
    stack = performer.Performer(dim=32, depth=1, heads=4, dim_head=8, causal=True)
    attn = performer.SelfAttention(dim=32, heads=4, causal=False)
    assert stack(x).shape == attn(x).shape == (1, 64, 32)
    q, k, v = torch.randn(3, 1, 4, 64, 8).unbind(0)
    assert performer.FastAttention(dim_heads=8, nb_features=16, causal=False)(q, k, v).shape == (1, 4, 64, 8)
    assert_steps_lower(stack, lambda: stack(x).pow(2).mean())


def test_performer_enc_dec_readme_and_copy_script():
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="'tie_token_embed' is taken as 'tie_token_embeds'"):
        enc_dec = performer.PerformerEncDec(
            dim=32, tie_token_embed=True, enc_num_tokens=20, enc_depth=1, enc_heads=4,
            enc_max_seq_len=32, dec_num_tokens=20, dec_depth=1, dec_heads=4, dec_max_seq_len=32,
        )  # fmt: skip
    assert enc_dec.enc.token_emb is enc_dec.dec.net.token_emb
    src = torch.randint(0, 20, (1, 32))
    tgt = torch.randint(0, 20, (1, 32))
    src_mask, tgt_mask = torch.ones_like(src).bool(), torch.ones_like(src).bool()
    enc_dec.train()
    loss = enc_dec(src, tgt, enc_mask=src_mask, dec_mask=tgt_mask)
    loss.backward()
    samples = enc_dec.generate(src, torch.tensor([[0.0]]).long(), seq_len=8, eos_token=1)
    assert samples.shape[0] == 1 and samples.shape[1] <= 8
    # the copy-task script passes the option performer_pytorch 1.1.4 drops, plus shared ones
    with pytest.warns(UserWarning, match="amp_enabled has no effect"):
        copier = performer.PerformerEncDec(
            dim=32, enc_num_tokens=20, enc_depth=1, enc_heads=4, enc_max_seq_len=16,
            enc_reversible=True, enc_feature_redraw_interval=1000, enc_nb_features=16,
            dec_num_tokens=20, dec_depth=1, dec_heads=4, dec_max_seq_len=33, dec_reversible=True,
            dec_feature_redraw_interval=1000, dec_nb_features=16, amp_enabled=True,
        )  # fmt: skip
    src = torch.randint(2, 20, (2, 16))
    tgt = torch.cat((torch.ones(2, 1).long(), src, src), dim=1)
    masks = dict(enc_mask=torch.ones_like(src).bool(), dec_mask=torch.ones_like(tgt).bool())
    assert_steps_lower(copier, lambda: copier(src, tgt, **masks))
    assert copier.generate(src[:1], torch.ones(1, 1).long(), 16, enc_mask=masks["enc_mask"][:1]).shape == (
        1,
        16,
    )


def test_performer_enwik8_script():
    torch.manual_seed(0)
    model = performer.AutoregressiveWrapper(
        performer.PerformerLM(
            num_tokens=256, dim=256, depth=2, max_seq_len=64, heads=4, causal=True, nb_features=32
        )
    )
    data = text_batches(4, 65)

    def step() -> Tensor:
        loss = model(next(data), return_loss=True)
        loss.backward()
        return loss

    assert_trains(train(model, step, 1e-4, 8))
    model.eval()
    prime = next(data)[0, :-1]
    assert model.generate(prime, 8, repetition_penalty=1.2).shape == (8,)


# --- block_recurrent_transformer_pytorch --------------------------------------------------
def test_block_recurrent_readme():
    torch.manual_seed(0)
    model = block_recurrent.BlockRecurrentTransformer(
        num_tokens=64, dim=32, depth=3, dim_head=8, heads=4, max_seq_len=32, block_width=16,
        num_state_vectors=16, recurrent_layers=(2,),
    )  # fmt: skip
    seq = torch.randint(0, 64, (1, 32))
    out, mems1, states1 = model(seq)
    out, mems2, states2 = model(seq, xl_memories=mems1, states=states1)
    out, mems3, states3 = model(seq, xl_memories=mems2, states=states2)
    assert out.shape == (1, 32, 64) and len(mems3) == 3 and [s.shape for s in states3] == [(1, 16, 32)]
    batch = torch.randint(0, 64, (1, 33))
    loss, _, _ = model(batch, return_loss=True)
    loss.backward()
    assert_steps_lower(model, lambda: model(batch, return_loss=True)[0])
    assert model.generate(seq[:, :4], 20).shape == (1, 16)


def test_block_recurrent_trainer_wrapper_script():
    torch.manual_seed(0)
    model = block_recurrent.RecurrentTrainerWrapper(
        block_recurrent.BlockRecurrentTransformer(
            num_tokens=256, dim=256, depth=2, dim_head=32, heads=4, max_seq_len=32, block_width=16,
            num_state_vectors=16, recurrent_layers=(1,),
        ),
        xl_memories_dropout=0.1,
        state_dropout=0.1,
    )  # fmt: skip
    data = text_batches(4, 65)

    def step() -> Tensor:
        loss = model(next(data))
        loss.backward()
        return loss

    assert_trains(train(model, step, 1e-4, 8))
    model.eval()
    assert model.generate(next(data)[:, :8], 40).shape == (4, 32)


# --- memorizing_transformers_pytorch ------------------------------------------------------
def test_memorizing_readme_and_knn_memory(tmp_path):
    torch.manual_seed(0)
    model = memorizing.MemorizingTransformer(
        num_tokens=64, dim=32, dim_head=8, depth=2, memorizing_layers=(1, 2), max_knn_memories=256,
        num_retrieved_memories=4, clear_memories_on_sos_token_id=1, knn_memories_directory=str(tmp_path),
    )  # fmt: skip
    data = torch.randint(2, 64, (2, 32))
    knn_memories = model.create_knn_memories(batch_size=2)
    logits = model(data, knn_memories=knn_memories)
    assert logits.shape == (2, 32, 64)
    memory = memorizing.KNNMemory(dim=8, max_memories=64, num_indices=2)
    memory.add(torch.randn(2, 16, 2, 8))
    memory.clear([0])
    memory.add(torch.randn(2, 16, 2, 8))
    key_values, mask = memory.search(torch.randn(2, 16, 8), topk=4)
    assert key_values.shape == (2, 16, 4, 2, 8) and mask.shape == (2, 16, 4)
    assert_steps_lower(
        model, lambda: model(data, knn_memories=knn_memories, labels=data, add_knn_memory=False)
    )
    knn_memories.cleanup()


def test_memorizing_enwik8_script(tmp_path):
    torch.manual_seed(0)
    model = memorizing.MemorizingTransformer(
        num_tokens=256, dim=256, depth=2, dim_head=32, heads=4, memorizing_layers=(1,),
        max_knn_memories=512, num_retrieved_memories=8, xl_memory_layers=(2,), xl_max_memories=32,
        knn_memories_directory=str(tmp_path),
    )  # fmt: skip
    batches = text_batches(4, 65)
    segments = 2

    def step() -> Tensor:
        data, total = next(batches), 0.0
        with model.knn_memories_context(batch_size=4) as knn_memories:
            xl_memories = None
            seq, labels = data[:, :-1], data[:, 1:]
            for seq_segment, labels_segment in zip(
                seq.chunk(segments, dim=-1), labels.chunk(segments, dim=-1)
            ):
                loss, xl_memories = model(
                    seq_segment, labels=labels_segment, knn_memories=knn_memories, xl_memories=xl_memories
                )
                total += loss.item() / segments
                (loss / segments).backward()
        return torch.tensor(total)

    assert_trains(train(model, step, 2e-4, 8))
