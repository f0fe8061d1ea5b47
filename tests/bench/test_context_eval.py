import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from longrange.bench import context_train
from longrange.bench.context_eval import (
    BUCKETS,
    bucket_sums,
    combine,
    eval_documents,
    position_eval,
    stateful_nats,
    window_nats,
    window_plan,
)
from longrange.bench.context_train import Schedule, calibrate_steps, lm_batches, make_run, train
from longrange.bench.context_variants import ModelSpec
from longrange.data.corpus import Document


def _doc(name: str, n: int, seed: int) -> Document:
    rng = np.random.default_rng(seed)
    words = [b"def ", b"return ", b"self", b".x", b" = ", b"(a, b)\n", b"    ", b"if ", b"import os\n"]
    text = b"".join(words[i] for i in rng.integers(0, len(words), n))[:n]
    return Document(name, np.frombuffer(text, dtype=np.uint8))


VANILLA = ModelSpec("vanilla", "tiny", {"max_seq_len": 64})
BLOCKREC = ModelSpec(
    "block_recurrent", "tiny", {"max_seq_len": 64, "block_width": 16, "num_state_vectors": 4}, 16
)


@pytest.mark.parametrize(
    ("n", "window", "stride"), [(10, 64, 16), (100, 64, 16), (257, 64, 64), (300, 64, 1)]
)
def test_window_plan_scores_every_prediction_once_with_enough_context(n, window, stride):
    scored = []
    for start, stop, first in window_plan(n, window, stride):
        assert stop - start <= window and start <= first <= stop
        scored += range(first, stop)
        if start:  # a later window: each of its predictions reads at least window - stride + 1 inputs
            assert first - start + 1 >= window - stride + 1
    assert scored == list(range(n))
    with pytest.raises(ValueError, match="stride"):
        window_plan(n, window, window + 1)


def test_window_nats_equal_one_forward_where_the_document_fits():
    torch.manual_seed(0)
    model = VANILLA.build().eval()
    tokens = torch.from_numpy(_doc("a", 50, 1).tokens.astype(np.int64))
    with torch.no_grad():
        logits = model.forward_lm(tokens[None, :-1]).logits[0]
    want = F.cross_entropy(logits, tokens[1:], reduction="none").double()
    got = window_nats(model, tokens, window=64, stride=16, device=torch.device("cpu"))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # past the window each prediction is the last of a window that starts stride-aligned
    longer = torch.from_numpy(_doc("b", 200, 2).tokens.astype(np.int64))
    got = window_nats(model, longer, window=64, stride=16, device=torch.device("cpu"))
    with torch.no_grad():
        tail = model.forward_lm(longer[None, 128:192]).logits[0, -1]
    torch.testing.assert_close(got[191], F.cross_entropy(tail, longer[192]).double(), rtol=1e-5, atol=1e-5)


def test_stateful_nats_carry_the_state_through_the_document():
    torch.manual_seed(0)
    model = BLOCKREC.build().eval()
    tokens = torch.from_numpy(_doc("a", 200, 3).tokens.astype(np.int64))
    with torch.no_grad():
        logits = model.forward_lm(tokens[None, :-1]).logits[0]
    want = F.cross_entropy(logits, tokens[1:], reduction="none").double()
    got = stateful_nats(model, tokens, call_len=16, device=torch.device("cpu"))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("spec", [VANILLA, BLOCKREC], ids=["window", "stateful"])
def test_buckets_combine_exactly_to_the_overall_bpb(spec):
    torch.manual_seed(0)
    model = spec.build()
    docs = eval_documents([_doc("a", 1500, 4), _doc("b", 900, 5), _doc("short", 300, 6)], min_bytes=800)
    assert [d.name for d in docs] == ["a", "b"]
    result = position_eval(
        model,
        docs,
        stateful=spec.carries_state(),
        window=64,
        stride=32,
        call_len=spec.call_len,
        device="cpu",
        reach=None if spec.carries_state() else 64,
    )
    counts = [b["count"] for b in result["buckets"]]
    assert counts == [255 + 255, 768 + 644, 476 + 0, 0] and sum(counts) == result["bytes"] == 1499 + 899
    assert math.isclose(combine(result["buckets"]), result["bpb"], rel_tol=1e-12)
    assert math.isclose(sum(b["nats"] for b in result["buckets"]) / sum(counts) / math.log(2), result["bpb"])
    curve_bytes = sum(c["count"] for c in result["position_curve"])
    assert curve_bytes == result["bytes"]
    assert [b["beyond_reach"] for b in result["buckets"]] == (
        [False] * 4 if spec.carries_state() else [True] * 4
    )
    assert model.training  # the evaluation restores the mode


def test_bucket_sums_use_the_position_of_the_predicted_byte():
    nats = torch.arange(1, 301, dtype=torch.float64)  # the byte at position p has loss p
    (low, low_n), (mid, mid_n), *_ = bucket_sums(nats, BUCKETS)
    assert low_n == 255 and low == sum(range(1, 256))
    assert mid_n == 45 and mid == sum(range(256, 301))
    with pytest.raises(ValueError, match="no scored bytes"):
        combine([{"bpb": 1.0, "count": 0}])
    with pytest.raises(ValueError, match="no validation document"):
        eval_documents([_doc("a", 10, 0)])


def test_same_spec_seed_and_steps_give_the_same_weights():
    docs = [_doc(f"t{i}", 400, i) for i in range(4)]
    schedule = Schedule(batch_size=2, lr=1e-3)

    def trained(spec):
        batches = lm_batches(spec, docs, seq_len=32, batch_size=2, seed=5)
        run = make_run(spec, batches, schedule=schedule, steps=3, seed=5, device="cpu")
        out = train(run)
        run.close()
        assert math.isfinite(out["final_loss"]) and out["curve"] == []
        return run.model.state_dict()

    for spec in (VANILLA, BLOCKREC):
        a, b = trained(spec), trained(spec)
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_calibration_turns_the_budget_into_steps(monkeypatch):
    class FakeRun:
        steps_done = 0
        closed = False

        def step(self):
            self.steps_done += 1
            return 0.0

        def close(self):
            self.closed = True

    run = FakeRun()
    clock = iter([100.0, 100.3])  # 3 probe steps in 0.3 s
    monkeypatch.setattr(context_train.time, "perf_counter", lambda: next(clock))
    steps, step_s = calibrate_steps(lambda n: run, 1.05, probe_steps=3)
    assert (steps, round(step_s, 6)) == (10, 0.1)
    assert run.steps_done == 4 and run.closed  # one warm-up step, three timed
    with pytest.raises(ValueError, match="budget"):
        calibrate_steps(lambda n: run, 0)


def test_schedule_warms_up_then_decays_to_the_floor():
    s = Schedule(batch_size=1, lr=1.0, warmup_fraction=0.1, min_lr_ratio=0.1)
    assert s.lr_at(0, 100) == pytest.approx(0.1)
    assert s.lr_at(9, 100) == pytest.approx(1.0)
    assert s.lr_at(100, 100) == pytest.approx(0.1)
    assert 0.1 < s.lr_at(50, 100) < 1.0
