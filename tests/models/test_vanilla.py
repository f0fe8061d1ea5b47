import json

import pytest
import torch

from longrange.models.base import LongRangeLM
from longrange.models.registry import create_model, make_config
from longrange.models.vanilla import VanillaConfig, VanillaLM
from longrange.testing import assert_causal, assert_close, assert_padding_ignored


@pytest.fixture
def model():
    return create_model("vanilla", "tiny").eval()


def test_shapes_and_causality(model):
    tokens = torch.randint(0, 256, (2, 63))
    assert model(tokens).shape == (2, 63, 256)
    assert_causal(model, tokens, 256)


def test_naive_backend_matches_sdpa():
    fast = create_model("vanilla", "tiny").eval()
    slow = create_model("vanilla", "tiny", attn_backend="naive").eval()
    slow.load_state_dict(fast.state_dict())
    tokens = torch.randint(0, 256, (2, 45))
    assert_close(fast(tokens), slow(tokens), 1e-4)


def test_left_padding_is_ignored(model):
    tokens = torch.randint(0, 256, (2, 40))
    mask = torch.ones(2, 40, dtype=torch.bool)
    mask[0, :7] = False
    assert_padding_ignored(lambda t, m: model(t, mask=m), tokens, mask, 256)


def test_save_load_round_trip(tmp_path, model):
    tokens = torch.randint(0, 256, (1, 30))
    model.save_pretrained(tmp_path / "m")
    loaded = LongRangeLM.from_pretrained(tmp_path / "m")
    assert isinstance(loaded, VanillaLM)
    assert torch.equal(loaded(tokens), model(tokens))
    assert VanillaLM.from_pretrained(tmp_path / "m").config == model.config


def test_from_pretrained_refuses_bad_directories(tmp_path, model):
    with pytest.raises(FileNotFoundError):
        LongRangeLM.from_pretrained(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="not a longrange model directory"):
        LongRangeLM.from_pretrained(tmp_path / "empty")
    model.save_pretrained(tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ValueError, match="corrupt"):
        LongRangeLM.from_pretrained(tmp_path / "m")
    model.save_pretrained(tmp_path / "f")
    cfg = json.loads((tmp_path / "f" / "config.json").read_text())
    cfg["family"] = "no_such_family"
    (tmp_path / "f" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="unknown model family"):
        LongRangeLM.from_pretrained(tmp_path / "f")
    model.save_pretrained(tmp_path / "g")
    (tmp_path / "g" / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="corrupt"):
        LongRangeLM.from_pretrained(tmp_path / "g")


def test_weights_of_another_shape_are_refused(tmp_path, model):
    model.save_pretrained(tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["dim"] = 32
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="shape"):
        LongRangeLM.from_pretrained(tmp_path / "m")


def test_config_round_trip_and_errors():
    cfg = make_config("vanilla", "small", depth=3)
    assert VanillaConfig.from_dict(json.loads(cfg.to_json())) == cfg
    with pytest.raises(ValueError, match="unknown config key"):
        VanillaConfig.from_dict({"family": "vanilla", "bogus": 1})
    with pytest.raises(ValueError, match="divisible by heads"):
        VanillaConfig(dim=30, heads=4)
    with pytest.raises(ValueError, match="unknown preset"):
        create_model("vanilla", "huge")
    with pytest.raises(ValueError, match="unknown model family"):
        create_model("transformer-xl")


def test_bad_tokens_are_refused_before_work(model):
    with pytest.raises(TypeError, match="tokens must be an int64 or int32 tensor"):
        model(torch.randn(1, 4))
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 300, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[0, 256\)"):
        model(torch.full((1, 4), 256))
    with pytest.raises(TypeError, match="bool"):
        model(torch.zeros(1, 4, dtype=torch.long), mask=torch.ones(1, 4))


def test_kv_cache_decoding_equals_recompute(model):
    tokens = torch.randint(0, 256, (2, 40))
    full = model(tokens)
    logits, state = model.prefill(tokens[:, :15])
    assert_close(logits, full[:, :15], 1e-5)
    for t in range(15, 40):
        step, state = model.step(tokens[:, t], state)
        if t + 1 < 40:
            assert_close(step, full[:, t], 1e-5, name=f"step {t}")


def test_greedy_generate_equals_full_recompute(model):
    prompt = torch.randint(0, 256, (2, 5))
    new = model.generate(prompt, 30, temperature=0)
    seq = prompt
    for _ in range(30):
        nxt = model(seq)[:, -1].argmax(-1)
        seq = torch.cat([seq, nxt[:, None]], dim=1)
    assert torch.equal(new, seq[:, 5:])


def _loss_and_grads(model, tokens, mask=None, forward=None):
    model.zero_grad(set_to_none=True)
    logits = (forward or model.forward_lm)(tokens[:, :-1], mask=mask).logits
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize(
    "recompute_from,slice_size",
    [(None, 8192), (16, 8192), (16, 10)],
    ids=["plain", "recomputed", "sliced-ff"],
)
def test_lean_training_path_gives_the_plain_layers_gradients(recompute_from, slice_size, monkeypatch):
    """The lean feed-forward (with its norm), block recomputation and the sliced feed-forward
    of recomputed blocks change no value: the plain layers (a tiny dropout makes the lean
    path stand aside) agree."""
    import longrange.modules.feedforward as feedforward

    monkeypatch.setattr(feedforward, "SLICE_ROWS", slice_size)
    torch.manual_seed(0)
    model = create_model("vanilla", "tiny", recompute_from=recompute_from).train()
    tokens = torch.randint(0, 256, (2, 33), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 32, dtype=torch.bool)
    mask[1, :5] = False
    loss, grads = _loss_and_grads(model, tokens, mask)
    plain = create_model("vanilla", "tiny", dropout=1e-9).train()
    plain.load_state_dict(model.state_dict())
    torch.manual_seed(0)
    want_loss, want = _loss_and_grads(plain, tokens, mask)
    assert_close(loss, want_loss, 1e-5)
    for got, expected in zip(grads, want):
        assert_close(got, expected, 1e-4)


def test_bench_preset_recomputes_from_32k():
    cfg = make_config("vanilla", "bench")
    assert cfg.recompute_from == 32768 and cfg.max_seq_len >= 131072
    with pytest.raises(ValueError, match="recompute_from"):
        make_config("vanilla", "tiny", recompute_from=0)


@pytest.mark.parametrize("preset", ["tiny", "bench"])
def test_training_step_compiles_without_graph_breaks(preset):
    from longrange.testing import assert_compiles_whole

    overrides = {"max_seq_len": 64, "recompute_from": 16} if preset == "bench" else {}
    model = create_model("vanilla", preset, **overrides).train()
    tokens = torch.randint(0, 256, (2, 33), generator=torch.Generator().manual_seed(2))

    def loss(seq):
        logits = model.forward_lm(seq[:, :-1]).logits
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), seq[:, 1:].flatten())

    assert_compiles_whole(loss, tokens)
    assert all(p.grad is not None for p in model.parameters())


def test_train_compile_flag_reaches_the_trainer():
    from longrange.cli import build_parser
    from longrange.cli.train import _train_fields
    from longrange.train.config import RESUME_SAFE

    args = build_parser().parse_args(["train", "--compile"])
    assert _train_fields(args, "vanilla")["compile"] is True
    assert "compile" not in _train_fields(build_parser().parse_args(["train"]), "vanilla")
    assert "compile" in RESUME_SAFE


@pytest.mark.slow
def test_compiled_training_step_equals_eager(tmp_path, text_folder):
    """``longrange train --compile`` (inductor: generated code) takes the eager step."""
    from longrange.data.corpus import load_corpus
    from longrange.train.config import TrainConfig
    from longrange.train.trainer import Trainer

    corpus = load_corpus(text_folder)

    def one_step(compile):
        cfg = TrainConfig(
            model="vanilla", preset="tiny", set={"max_seq_len": 64}, seq_len=32, batch_size=2, steps=1,
            out=str(tmp_path / "runs"), name=f"compile-{compile}", progress=False, compile=compile,
        )  # fmt: skip
        trainer = Trainer(cfg, corpus=corpus)
        loss, skipped, _ = trainer.train_step()
        assert not skipped
        return loss, [p.detach().clone() for p in trainer.model.parameters()]

    eager, compiled = one_step(False), one_step(True)
    assert compiled[0] == pytest.approx(eager[0], rel=1e-5)
    for got, want in zip(compiled[1], eager[1]):
        assert_close(got, want, 1e-4)
