"""Every family on CUDA: the same numbers as on CPU, decoding that matches a recompute, and a
training step under the trainer's default bf16 autocast.

CI has no GPU, so these skip there; they run wherever CUDA is present (``make test`` on a GPU
machine). The CPU tests pin each family's behaviour; these pin that the CUDA kernels (fused
SDPA, compiled FlexAttention, the exact kNN search on the GPU) compute the same thing.
"""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from longrange.models.registry import available_families, create_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

LENGTH = 96


def _pair(family: str):
    torch.manual_seed(0)
    cpu = create_model(family, "tiny").eval()
    with torch.no_grad():  # lazy initialisations (Routing's k-means centroids) happen here, once
        cpu(torch.randint(0, cpu.config.vocab_size, (1, LENGTH)))
    gpu = create_model(family, "tiny").eval()
    gpu.load_state_dict(cpu.state_dict())
    return cpu, gpu.cuda()


@pytest.fixture(autouse=True)
def _full_precision_matmuls():
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = previous


@pytest.mark.parametrize("family", available_families())
def test_cuda_forward_and_gradients_match_cpu(family):
    cpu, gpu = _pair(family)
    tokens = torch.randint(0, cpu.config.vocab_size, (2, LENGTH + 1))
    losses = []
    for model, x in ((cpu, tokens), (gpu, tokens.cuda())):
        logits = model(x[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())
        loss.backward()
        losses.append((logits.detach().cpu(), loss.item()))
    assert_close(losses[1][0], losses[0][0], rtol=1e-3, atol=1e-3)
    assert losses[1][1] == pytest.approx(losses[0][1], rel=1e-4)
    for (name, p_cpu), (_, p_gpu) in zip(cpu.named_parameters(), gpu.named_parameters()):
        if p_cpu.grad is None:
            assert p_gpu.grad is None, name
            continue
        assert_close(p_gpu.grad.cpu(), p_cpu.grad, rtol=1e-2, atol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("family", available_families())
def test_cuda_decoding_matches_a_recompute(family):
    _, model = _pair(family)
    x = torch.randint(0, model.config.vocab_size, (2, 48), device="cuda")
    with torch.no_grad():
        full = model(x)
        logits, state = model.prefill(x[:, :17])
        rows = [logits]
        for i in range(17, 48):
            step, state = model.step(x[:, i], state)
            rows.append(step[:, None])
    assert_close(torch.cat(rows, dim=1), full, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("family", available_families())
def test_cuda_training_step_under_bf16_autocast(family):
    """The trainer's default on CUDA (--precision auto: bf16 autocast, backward after it): every
    parameter that gets a gradient in float32 gets a finite one, the loss within 2%."""
    _, model = _pair(family)
    model.train()
    x = torch.randint(0, model.config.vocab_size, (2, LENGTH + 1), device="cuda")
    losses, grads = [], []
    for autocast in (False, True):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            logits = model(x[:, :-1])
            loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), x[:, 1:].flatten())
        loss.backward()
        losses.append(loss.item())
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[1].keys() == grads[0].keys() and grads[0]
    assert all(torch.isfinite(g).all() for g in grads[1].values())
    assert losses[1] == pytest.approx(losses[0], rel=2e-2)
