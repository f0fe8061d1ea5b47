"""``longrange bench generate``: decoding speed with and without incremental state.

Incremental: ``prefill`` on the prompt, then one ``step`` per new token (the family's KV
caches, running sums or recurrent states). Recompute: the whole sequence re-run for every new
token, as the reference packages do. Recompute is timed on the first ``recompute_tokens`` new
tokens only (its per-token cost only grows, so its tokens/s is an upper bound) to keep the
suite short on a CPU. With ``compile`` the incremental steps are also timed through
``torch.compile`` (the model's ``compiled_decoding``): a first pass compiles (its extra time
is reported as ``compile_s``), a second, from a fresh prefill, is timed.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from longrange.bench.speed import bench_model
from longrange.bench.timing import sync


def _decode(model, prompt: torch.Tensor, new_tokens: int, device: str) -> tuple[float, float]:
    """Prefill, then ``new_tokens`` greedy steps; (prefill seconds, steps seconds)."""
    start = time.perf_counter()
    logits, state = model.prefill(prompt)
    token = logits[:, -1].argmax(-1)
    sync(device)
    prefill_s = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(new_tokens):
        logits, state = model.step(token, state)
        token = logits.argmax(-1)
    sync(device)
    return prefill_s, time.perf_counter() - start


@torch.no_grad()
def generate_point(
    family: str,
    *,
    device: str,
    prompt_len: int = 1024,
    new_tokens: int = 1024,
    recompute_tokens: int = 32,
    compile: bool = False,
) -> dict[str, Any]:
    torch.manual_seed(0)
    model = bench_model(family, prompt_len + new_tokens, device).eval()
    prompt = torch.randint(0, model.config.vocab_size, (1, prompt_len), device=device)

    prefill_s, incremental_s = _decode(model, prompt, new_tokens, device)
    compiled: dict[str, float] = {}
    if compile:
        with model.compiled_decoding():
            first_s = sum(_decode(model, prompt, new_tokens, device))
            compiled_prefill_s, compiled_s = _decode(model, prompt, new_tokens, device)
        compiled["compiled_tokens_per_s"] = new_tokens / compiled_s
        compiled["compile_s"] = max(0.0, first_s - compiled_prefill_s - compiled_s)

    seq = prompt
    start = time.perf_counter()
    for _ in range(recompute_tokens):
        nxt = model.forward_lm(seq).logits[:, -1].argmax(-1)
        seq = torch.cat([seq, nxt[:, None]], dim=1)
    sync(device)
    recompute_s = time.perf_counter() - start
    return {
        "family": family,
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
        "prefill_s": prefill_s,
        "incremental_tokens_per_s": new_tokens / incremental_s,
        "recompute_tokens_per_s": recompute_tokens / recompute_s,
        "recompute_tokens_measured": recompute_tokens,
        "speedup": (new_tokens / incremental_s) / (recompute_tokens / recompute_s),
        **compiled,
    }


def format_generate_table(rows: list[dict[str, Any]]) -> str:
    compiled = any("compiled_tokens_per_s" in r for r in rows)
    head = f"{'family':<16}{'prefill s':>10}{'incremental tok/s':>19}{'recompute tok/s':>17}{'speed-up':>10}"
    if compiled:
        head += f"{'compiled tok/s':>16}{'compile s':>11}"
    lines = [head, "-" * len(head)]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['family']:<16}  {r['error']}")
            continue
        line = (
            f"{r['family']:<16}{r['prefill_s']:>10.2f}{r['incremental_tokens_per_s']:>19,.1f}"
            f"{r['recompute_tokens_per_s']:>17,.1f}{r['speedup']:>9.1f}x"
        )
        if "compiled_tokens_per_s" in r:
            line += f"{r['compiled_tokens_per_s']:>16,.1f}{r['compile_s']:>11.1f}"
        lines.append(line)
    return "\n".join(lines)
