"""Checks every family's tests share: relative error, fast-vs-naive, causality, padding.

They live in the library (like ``torch.testing``) so that users can run the same checks on
models they build from longrange's layers.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

DEFAULT_RTOL = {torch.float32: 1e-4, torch.float64: 1e-9, torch.bfloat16: 2e-2, torch.float16: 5e-3}


def relative_error(actual: Tensor, expected: Tensor) -> float:
    """||actual - expected|| / max(||expected||, tiny), in float64."""
    a, e = actual.detach().double(), expected.detach().double()
    return float((a - e).norm() / e.norm().clamp_min(1e-12))


def assert_close(actual: Tensor, expected: Tensor, rtol: float | None = None, name: str = "") -> None:
    """Fail when the relative error (a norm ratio, see :func:`relative_error`) exceeds rtol.

    The default tolerance depends on the dtype of ``expected``.
    """
    if actual.shape != expected.shape:
        raise AssertionError(f"{name or 'tensor'}: shape {tuple(actual.shape)} != {tuple(expected.shape)}")
    if not torch.isfinite(actual).all():
        raise AssertionError(f"{name or 'tensor'}: contains NaN or inf")
    rtol = DEFAULT_RTOL.get(expected.dtype, 1e-4) if rtol is None else rtol
    err = relative_error(actual, expected)
    if err > rtol:
        raise AssertionError(f"{name or 'tensor'}: relative error {err:.3g} > {rtol:.3g}")


def assert_same_forward_backward(
    fast: Callable[..., Tensor],
    naive: Callable[..., Tensor],
    inputs: Sequence[Tensor],
    rtol: float | None = None,
    grad_rtol: float | None = None,
    seed: int = 0,
) -> None:
    """Run both functions on copies of ``inputs``; compare outputs and every input gradient.

    Floating inputs get ``requires_grad``; the backward pass uses one random cotangent so that
    gradients are not just sums.
    """

    def run(fn):
        leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
        out = fn(*leaves)
        return out, leaves

    out_fast, leaves_fast = run(fast)
    out_naive, leaves_naive = run(naive)
    assert_close(out_fast, out_naive, rtol, name="output")
    gen = torch.Generator(device="cpu").manual_seed(seed)
    cot = torch.randn(out_naive.shape, generator=gen, dtype=torch.float32).to(out_naive)
    out_fast.backward(cot.to(out_fast.dtype))
    out_naive.backward(cot)
    for i, (a, b) in enumerate(zip(leaves_fast, leaves_naive)):
        if b.grad is None:
            continue
        if a.grad is None:
            raise AssertionError(f"input {i}: fast path produced no gradient")
        assert_close(a.grad, b.grad, grad_rtol if grad_rtol is not None else rtol, name=f"grad of input {i}")


def assert_causal(
    logits_fn: Callable[[Tensor], Tensor],
    tokens: Tensor,
    vocab_size: int,
    positions: Sequence[int] | None = None,
    atol: float = 1e-5,
    seed: int = 0,
) -> None:
    """Changing any token after t must leave the outputs at positions <= t unchanged.

    ``logits_fn`` maps tokens [B, N] to outputs [B, N, ...]; it should be deterministic (eval
    mode). For each t in ``positions`` (a spread of positions by default) the tokens after t
    are replaced by random ones and the outputs up to t compared.
    """
    n = tokens.shape[1]
    positions = positions if positions is not None else sorted({0, 1, n // 3, n // 2, n - 2})
    gen = torch.Generator(device="cpu").manual_seed(seed)
    with torch.no_grad():
        base = logits_fn(tokens)
        for t in positions:
            if not 0 <= t < n - 1:
                continue
            changed = tokens.clone()
            tail = torch.randint(0, vocab_size, (tokens.shape[0], n - t - 1), generator=gen)
            changed[:, t + 1 :] = tail.to(tokens)
            out = logits_fn(changed)
            diff = (out[:, : t + 1] - base[:, : t + 1]).abs().max().item()
            if diff > atol:
                raise AssertionError(
                    f"not causal: outputs at positions <= {t} changed by {diff:.3g} "
                    f"when tokens after {t} changed"
                )


def assert_padding_ignored(
    logits_fn: Callable[[Tensor, Tensor], Tensor],
    tokens: Tensor,
    mask: Tensor,
    vocab_size: int,
    atol: float = 1e-5,
    seed: int = 0,
) -> None:
    """Tokens where ``mask`` is False must not change the outputs where it is True.

    ``logits_fn(tokens, mask)`` returns [B, N, ...]; the masked tokens are replaced by random
    ones and the kept positions compared.
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)
    with torch.no_grad():
        base = logits_fn(tokens, mask)
        noise = torch.randint(0, vocab_size, tokens.shape, generator=gen).to(tokens)
        changed = torch.where(mask, tokens, noise)
        out = logits_fn(changed, mask)
        diff = (out - base).abs()[mask].max().item() if mask.any() else 0.0
        if diff > atol:
            raise AssertionError(f"padding leaks: kept outputs changed by {diff:.3g}")


def _dev_extra_installed() -> bool:
    """True when longrange's dev extra was installed (its test-only tools are present)."""
    return all(importlib.util.find_spec(name) is not None for name in ("hypothesis", "pytest_timeout"))


def import_reference(module: str) -> Any:
    """Import a reference package (a test oracle) for a parity test.

    Skips the test when the package is missing and the dev extra is not installed, but fails
    it when the dev extra is installed: a parity test must not pass by silently skipping.
    """
    import pytest

    try:
        return importlib.import_module(module)
    except ImportError as err:
        if _dev_extra_installed():
            pytest.fail(
                f"the reference package {module!r} is missing although the dev extra is installed: {err}"
            )
        pytest.skip(f"the reference package {module!r} is not installed")


def assert_compiles_whole(loss_fn: Callable[..., Tensor], *args: Any) -> Tensor:
    """``torch.compile(loss_fn, fullgraph=True)`` must trace the whole call, forward and
    backward (the ``aot_eager`` backend: tracing without code generation, so it is quick),
    without a graph break; the scalar it returns is back-propagated. Fails with the break's
    reason. Returns the loss."""
    import torch._dynamo

    torch._dynamo.reset()
    compiled = torch.compile(loss_fn, backend="aot_eager", fullgraph=True)
    try:
        loss = compiled(*args)
    except torch._dynamo.exc.TorchDynamoException as err:
        raise AssertionError(f"torch.compile(fullgraph=True) failed: {str(err).splitlines()[0]}") from err
    loss.backward()
    return loss


def assert_compiled_step_equals_eager(
    model: torch.nn.Module,
    loss_fn: Callable[..., Tensor],
    *args: Any,
    rtol: float = 1e-5,
    grad_rtol: float = 1e-4,
) -> None:
    """One training step of ``loss_fn(*args)`` (a scalar from ``model``), eager and under a
    real ``torch.compile`` (inductor: generated code), gives the same loss and the same
    gradient for every parameter of ``model``."""
    import torch._dynamo

    def step(fn: Callable[..., Tensor]) -> tuple[Tensor, list[Tensor | None]]:
        model.zero_grad(set_to_none=True)
        loss = fn(*args)
        loss.backward()
        return loss.detach(), [None if p.grad is None else p.grad.clone() for p in model.parameters()]

    eager, eager_grads = step(loss_fn)
    torch._dynamo.reset()
    compiled, compiled_grads = step(torch.compile(loss_fn))
    assert_close(compiled, eager, rtol, name="loss")
    for i, (got, want) in enumerate(zip(compiled_grads, eager_grads, strict=True)):
        if (got is None) != (want is None):
            raise AssertionError(f"parameter {i}: a gradient in one run only")
        if want is not None:
            assert_close(got, want, grad_rtol, name=f"grad of parameter {i}")
