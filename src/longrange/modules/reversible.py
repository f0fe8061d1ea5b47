"""Stacks of (attention, feed-forward) blocks: plain residual, or reversible (RevNet).

Both classes take the same constructor, ``(blocks, layer_dropout=0., args_route=None)``, where
``blocks`` is a list of ``(f, g)`` module pairs (f the attention branch, g the feed-forward
branch), and both return ``(x, aux_loss)`` from ``forward(x, **kwargs)``.

- :class:`SequentialSequence`: ``x = x + f(x); x = x + g(x)`` per block.
- :class:`ReversibleSequence` (Gomez et al. 2017, as used by Reformer): the input is
  duplicated into two streams, ``y1 = x1 + f(x2); y2 = x2 + g(y1)`` per block, and the output
  is the mean of the two streams. Backward reconstructs each block's inputs from its outputs
  (``x2 = y2 - g(y1)``, ``x1 = y1 - f(x2)``) instead of storing them, so activation memory does
  not grow with depth. The RNG state (CPU, and CUDA for CUDA inputs) and the autocast state in
  front of every branch call are recorded and replayed, so dropout draws the same masks.
  ``recompute=False`` runs the same coupling through ordinary autograd (the reference for
  tests). Under ``torch.compile`` (which cannot trace a backward that re-runs branches
  itself) each block runs under activation checkpointing instead: the same values, with the
  two streams kept at each block's input, so memory grows with depth there.

Conventions shared by both:

- **Branch results.** A branch returns a tensor, or ``(tensor, aux_loss)`` with a scalar
  ``aux_loss`` (or None). The stack returns ``(x, aux)``, ``aux`` the sum of every auxiliary
  loss (a zero scalar when there is none); gradients flow to the branches from both.
- **Keyword routing.** ``args_route`` maps a keyword to where it goes: ``(to_f, to_g)`` for
  every block, or a sequence of such pairs, one per block (the references' form). A keyword
  passed to ``forward`` without a route raises TypeError rather than being dropped. Tensor
  keywords (a context, a bias) receive gradients in the reversible stack too.
- **Layer dropout.** In training each block is skipped with probability ``layer_dropout``;
  at least one block always runs. Under ``torch.compile`` every block runs and a dropped
  block's result is discarded (``torch.where``), so the graph does not depend on the draw.
- **Recomputation flag.** :func:`in_recomputation` is True only while the reversible stack
  re-runs branches during backward. Stateful layers (k-means EMA, batch-norm statistics) check
  it to skip updates that the forward pass already made. A branch's output must not depend on
  state that its own forward call changes, or the reconstruction would not match.

Dimensions: B batch, N sequence, D model width.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_leaves
from torch.utils.checkpoint import checkpoint

# How many reversible recomputations are running. A plain module global (not a ContextVar)
# because torch.compile traces reads of it (a guard) and cannot trace ContextVar.get; backward
# runs one recomputation at a time per process, which is all the flag needs to tell.
_RECOMPUTING = [0]


def in_recomputation() -> bool:
    """True while a reversible stack re-runs a branch to compute gradients."""
    return _RECOMPUTING[0] > 0


@contextmanager
def _recomputing() -> Iterator[None]:
    _RECOMPUTING[0] += 1
    try:
        yield
    finally:
        _RECOMPUTING[0] -= 1


def _split_output(out, where: str) -> tuple[Tensor, Tensor | None]:
    if isinstance(out, Tensor):
        return out, None
    if isinstance(out, tuple) and len(out) == 2 and isinstance(out[0], Tensor):
        aux = out[1]
        if aux is None:
            return out[0], None
        if not isinstance(aux, Tensor) or aux.numel() != 1:
            raise TypeError(f"{where}: the auxiliary loss must be a scalar tensor or None")
        return out[0], aux.reshape(())
    raise TypeError(f"{where}: a branch must return a tensor or (tensor, aux_loss)")


class _Block(nn.Module):
    def __init__(self, f: nn.Module, g: nn.Module) -> None:
        super().__init__()
        self.f = f
        self.g = g


class _RngState:
    """The generator states in front of one branch call, to replay them in backward."""

    def __init__(self, device: torch.device) -> None:
        self.cpu = torch.get_rng_state()
        self.cuda_device = device if device.type == "cuda" else None
        self.cuda = torch.cuda.get_rng_state(device) if self.cuda_device is not None else None

    @contextmanager
    def replay(self) -> Iterator[None]:
        devices = [self.cuda_device] if self.cuda_device is not None else []
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(self.cpu)
            if self.cuda is not None:
                torch.cuda.set_rng_state(self.cuda, self.cuda_device)
            yield


class _Stack(nn.Module):
    def __init__(
        self,
        blocks: Sequence[tuple[nn.Module, nn.Module]],
        layer_dropout: float = 0.0,
        args_route: Mapping[str, object] | None = None,
    ) -> None:
        super().__init__()
        pairs = list(blocks)
        if not pairs:
            raise ValueError("blocks must hold at least one (f, g) pair")
        built = []
        for i, pair in enumerate(pairs):
            if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                raise TypeError(f"blocks[{i}] must be an (f, g) pair of modules")
            f, g = pair
            if not isinstance(f, nn.Module) or not isinstance(g, nn.Module):
                raise TypeError(f"blocks[{i}] must hold nn.Module instances")
            built.append(_Block(f, g))
        self.blocks = nn.ModuleList(built)
        if not 0.0 <= layer_dropout <= 1.0:
            raise ValueError(f"layer_dropout must be in [0, 1], got {layer_dropout}")
        self.layer_dropout = layer_dropout
        self.routes = {k: self._per_layer(k, r) for k, r in (args_route or {}).items()}

    def _per_layer(self, key: str, route) -> list[tuple[bool, bool]]:
        depth = len(self.blocks)

        def is_pair(r) -> bool:
            return isinstance(r, (tuple, list)) and len(r) == 2 and all(isinstance(v, bool) for v in r)

        if is_pair(route):
            return [tuple(route)] * depth
        routes = list(route) if isinstance(route, (tuple, list)) else None
        if routes is None or not all(is_pair(r) for r in routes):
            raise ValueError(
                f"args_route[{key!r}] must be a (to_f, to_g) pair of bools or a sequence of "
                f"such pairs, one per block; got {route!r}"
            )
        if len(routes) != depth:
            raise ValueError(f"args_route[{key!r}] has {len(routes)} entries for {depth} blocks")
        return [tuple(r) for r in routes]

    def _route(self, kwargs: dict) -> list[tuple[dict, dict]]:
        for key in kwargs:
            if key not in self.routes:
                raise TypeError(f"keyword {key!r} has no entry in args_route (routed: {sorted(self.routes)})")
        routed = []
        for i in range(len(self.blocks)):
            f_kw = {k: v for k, v in kwargs.items() if self.routes[k][i][0]}
            g_kw = {k: v for k, v in kwargs.items() if self.routes[k][i][1]}
            routed.append((f_kw, g_kw))
        return routed

    def set_f_recompute(self, on: bool, *, keep_last: int = 0) -> None:
        """Set ``recompute`` on every block's ``f`` branch (a branch with that flag keeps only
        its input for backward and runs again there) but the last ``keep_last`` blocks', which
        keep their activations; unchanged flags are not written, so a compiled graph guarding
        on them is not invalidated."""
        if isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 0:
            raise ValueError(f"keep_last must be a non-negative int, got {keep_last!r}")
        for i, block in enumerate(self.blocks):
            flag = on and i < len(self.blocks) - keep_last
            if block.f.recompute != flag:
                block.f.recompute = flag

    def forward_cached(self, x: Tensor, layers: Sequence[dict], **kwargs) -> Tensor:
        """Decoding: the stack's maths on new positions x [B, n, D], block by block, each
        branch continuing from its cache (``layers[i]["attn"]`` for f, ``layers[i]["ff"]`` for
        g: dicts the branches fill), keywords routed as in ``forward``. No layer dropout;
        auxiliary losses are dropped. Returns what ``forward`` returns as its first value."""
        if len(layers) != len(self.blocks):
            raise ValueError(f"{len(layers)} layer caches for {len(self.blocks)} blocks")
        routed = self._route(kwargs)
        caches = [(layer.setdefault("attn", {}), layer.setdefault("ff", {})) for layer in layers]
        return self._walk_cached(x, caches, routed)

    def _walk_cached(self, x: Tensor, caches: list[tuple[dict, dict]], routed) -> Tensor:
        for block, (cf, cg), (f_kw, g_kw) in zip(self.blocks, caches, routed):
            x = x + _split_output(block.f(x, cache=cf, **f_kw), "f")[0]
            x = x + _split_output(block.g(x, cache=cg, **g_kw), "g")[0]
        return x

    def _kept(self) -> list[int]:
        depth = len(self.blocks)
        if not self.training or self.layer_dropout == 0.0:
            return list(range(depth))
        dropped = torch.rand(depth) < self.layer_dropout
        kept = [i for i in range(depth) if not dropped[i]]
        return kept or [int(torch.randint(depth, ()))]

    def _kept_flags(self) -> Tensor | None:
        """Layer dropout as a tensor (compiled graphs): True for the blocks that run, None
        when every block does."""
        depth = len(self.blocks)
        if not self.training or self.layer_dropout == 0.0:
            return None
        kept = torch.rand(depth) >= self.layer_dropout
        chosen = torch.arange(depth) == torch.randint(depth, ())
        return kept | (chosen & ~kept.any())


def _add_aux(total: Tensor, aux: Tensor | None) -> Tensor:
    return total if aux is None else total + aux


class SequentialSequence(_Stack):
    """Plain residual stack: x [B, N, D] -> (x [B, N, D], aux_loss scalar)."""

    def forward(self, x: Tensor, **kwargs) -> tuple[Tensor, Tensor]:
        routed = self._route(kwargs)
        aux = x.new_zeros((), dtype=torch.float32)
        if torch.compiler.is_compiling() and self.training and self.layer_dropout > 0:
            return _flagged_walk(self.blocks, routed, x, aux, self._kept_flags())
        for i in self._kept():
            block, (f_kw, g_kw) = self.blocks[i], routed[i]
            out, a = _split_output(block.f(x, **f_kw), f"blocks[{i}].f")
            x, aux = x + out, _add_aux(aux, a)
            out, a = _split_output(block.g(x, **g_kw), f"blocks[{i}].g")
            x, aux = x + out, _add_aux(aux, a)
        return x, aux


def _flagged_walk(blocks, routed, x: Tensor, aux: Tensor, kept: Tensor) -> tuple[Tensor, Tensor]:
    """The plain residual walk with layer dropout as flags: each block runs, a dropped one's
    result (and auxiliary loss) is discarded."""
    for i, (block, (f_kw, g_kw)) in enumerate(zip(blocks, routed)):
        out, a = _split_output(block.f(x, **f_kw), f"blocks[{i}].f")
        y = x + out
        aux_f = aux if a is None else aux + a
        out, a = _split_output(block.g(y, **g_kw), f"blocks[{i}].g")
        y, aux_g = y + out, aux_f if a is None else aux_f + a
        x, aux = torch.where(kept[i], y, x), torch.where(kept[i], aux_g, aux)
    return x, aux


class _Plan:
    """What the autograd function needs besides tensors: the kept blocks and their inputs."""

    def __init__(self, blocks, routed, grad_keys, params) -> None:
        self.blocks = blocks  # [(index, _Block)]
        self.routed = routed  # [(f_kwargs, g_kwargs)] aligned with blocks
        self.grad_keys = grad_keys  # names of tensor keywords that need gradients
        self.params = params  # unique parameters that need gradients
        self.rng: list[tuple[_RngState, _RngState]] = []
        self.autocast: tuple[str, bool, torch.dtype] | None = None


def _coupling_forward(plan: _Plan, x: Tensor, record: bool) -> tuple[Tensor, Tensor, Tensor]:
    x1 = x2 = x
    aux = x.new_zeros((), dtype=torch.float32)
    for (i, block), (f_kw, g_kw) in zip(plan.blocks, plan.routed):
        rng_f = _RngState(x.device) if record else None
        out, a = _split_output(block.f(x2, **f_kw), f"blocks[{i}].f")
        y1, aux = x1 + out, _add_aux(aux, a)
        rng_g = _RngState(x.device) if record else None
        out, a = _split_output(block.g(y1, **g_kw), f"blocks[{i}].g")
        y2, aux = x2 + out, _add_aux(aux, a)
        x1, x2 = y1, y2
        if record:
            plan.rng.append((rng_f, rng_g))
    return x1, x2, aux


class _ReversibleFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, plan: _Plan, *tensors: Tensor):
        device_type = x.device.type
        plan.autocast = (
            device_type,
            torch.is_autocast_enabled(device_type),
            torch.get_autocast_dtype(device_type),
        )
        y1, y2, aux = _coupling_forward(plan, x, record=True)
        ctx.plan = plan
        ctx.save_for_backward(y1, y2)
        return (y1 + y2) / 2, aux

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d_out: Tensor, d_aux: Tensor):
        plan: _Plan = ctx.plan
        y1, y2 = ctx.saved_tensors
        dy1 = dy2 = d_out / 2
        n_keys = len(plan.grad_keys)
        grads: list[Tensor | None] = [None] * (n_keys + len(plan.params))
        leaves = {}
        for _, (f_kw, g_kw) in zip(plan.blocks, plan.routed):
            for kw in (f_kw, g_kw):
                for k in plan.grad_keys:
                    if k in kw and k not in leaves:
                        leaves[k] = kw[k].detach().requires_grad_()
        slot = {id(p): n_keys + j for j, p in enumerate(plan.params)}
        key_slot = {k: j for j, k in enumerate(plan.grad_keys)}
        device_type, amp_on, amp_dtype = plan.autocast

        def rerun(branch, x_in, kw, rng: _RngState, d_branch, where):
            leaf = x_in.detach().requires_grad_()
            kw = {k: leaves.get(k, v) for k, v in kw.items()}
            with (
                torch.enable_grad(),
                rng.replay(),
                torch.autocast(device_type, dtype=amp_dtype, enabled=amp_on),
                _recomputing(),
            ):
                out, a = _split_output(branch(leaf, **kw), where)
            inputs = [leaf]
            targets = [None]
            for k in kw:
                if k in key_slot:
                    inputs.append(leaves[k])
                    targets.append(key_slot[k])
            for p in branch.parameters():
                if id(p) in slot:
                    inputs.append(p)
                    targets.append(slot[id(p)])
            # a branch result that broadcasts against the stream ([1, N, D], [D]) takes the
            # stream's gradient summed over the broadcast dimensions, as autograd would
            outs, cots = [out], [d_branch.sum_to_size(out.shape).to(out.dtype)]
            if a is not None and a.requires_grad:
                outs.append(a)
                cots.append(d_aux.to(a.dtype))
            d_in = None
            if out.requires_grad or len(outs) > 1:
                pairs = [(o, c) for o, c in zip(outs, cots) if o.requires_grad]
                found = torch.autograd.grad(
                    [o for o, _ in pairs], inputs, [c for _, c in pairs], allow_unused=True
                )
                d_in = found[0]
                for t, gr in zip(targets[1:], found[1:]):
                    if gr is not None:
                        grads[t] = gr if grads[t] is None else grads[t] + gr
            return out.detach(), d_in

        for ((i, block), (f_kw, g_kw)), (rng_f, rng_g) in zip(
            reversed(list(zip(plan.blocks, plan.routed))), reversed(plan.rng)
        ):
            g_out, d_y1 = rerun(block.g, y1, g_kw, rng_g, dy2, f"blocks[{i}].g")
            x2 = y2 - g_out
            if d_y1 is not None:
                dy1 = dy1 + d_y1
            f_out, d_x2 = rerun(block.f, x2, f_kw, rng_f, dy1, f"blocks[{i}].f")
            x1 = y1 - f_out
            if d_x2 is not None:
                dy2 = dy2 + d_x2
            y1, y2 = x1, x2
        return (dy1 + dy2, None, *grads)


class ReversibleSequence(_Stack):
    """Reversible stack: x [B, N, D] -> (mean of the two streams [B, N, D], aux_loss scalar).

    Activations are recomputed in backward (constant memory in depth) unless
    ``recompute=False``, which keeps them and lets ordinary autograd differentiate.
    """

    def __init__(
        self,
        blocks: Sequence[tuple[nn.Module, nn.Module]],
        layer_dropout: float = 0.0,
        args_route: Mapping[str, object] | None = None,
        *,
        recompute: bool = True,
    ) -> None:
        if not isinstance(recompute, bool):  # a string such as "no" would read as True
            raise TypeError(f"recompute must be True or False, got {recompute!r}")
        super().__init__(blocks, layer_dropout, args_route)
        self.recompute = recompute

    def forward(self, x: Tensor, **kwargs) -> tuple[Tensor, Tensor]:
        routed_all = routed = self._route(kwargs)
        kept = list(range(len(self.blocks))) if torch.compiler.is_compiling() else self._kept()
        blocks = [(i, self.blocks[i]) for i in kept]
        routed = [routed[i] for i in kept]
        grad_keys = [k for k, v in kwargs.items() if isinstance(v, Tensor) and v.requires_grad]
        if self.recompute and torch.is_grad_enabled() and not torch.compiler.is_compiling():
            for k, v in kwargs.items():
                if not isinstance(v, Tensor) and any(
                    isinstance(t, Tensor) and t.requires_grad for t in tree_leaves(v)
                ):
                    raise TypeError(
                        f"keyword {k!r} holds tensors that need gradients inside a "
                        f"{type(v).__name__}: the reversible stack differentiates tensor keywords "
                        "only; pass each such tensor as a keyword of its own"
                    )
        seen, params = set(), []
        for _, block in blocks:
            for p in block.parameters():
                if p.requires_grad and id(p) not in seen:
                    seen.add(id(p))
                    params.append(p)
        plan = _Plan(blocks, routed, grad_keys, params)
        needs_grad = torch.is_grad_enabled() and (x.requires_grad or bool(grad_keys) or bool(params))
        if torch.compiler.is_compiling():
            return _compiled_coupling(self, x, routed_all, self.recompute and needs_grad)
        if not self.recompute or not needs_grad:
            y1, y2, aux = _coupling_forward(plan, x, record=False)
            return (y1 + y2) / 2, aux
        tensors = [kwargs[k] for k in grad_keys] + params
        return _ReversibleFunction.apply(x, plan, *tensors)

    def _walk_cached(self, x: Tensor, caches: list[tuple[dict, dict]], routed) -> Tensor:
        x1 = x2 = x
        for block, (cf, cg), (f_kw, g_kw) in zip(self.blocks, caches, routed):
            x1 = x1 + _split_output(block.f(x2, cache=cf, **f_kw), "f")[0]
            x2 = x2 + _split_output(block.g(x1, cache=cg, **g_kw), "g")[0]
        return (x1 + x2) / 2


def _coupling_block(block: _Block, x1: Tensor, x2: Tensor, f_kw: dict, g_kw: dict, where: str):
    out, a_f = _split_output(block.f(x2, **f_kw), f"{where}.f")
    y1 = x1 + out
    out, a_g = _split_output(block.g(y1, **g_kw), f"{where}.g")
    aux = x1.new_zeros((), dtype=torch.float32)
    for a in (a_f, a_g):
        aux = _add_aux(aux, a)
    return y1, x2 + out, aux


def _compiled_coupling(
    stack: ReversibleSequence, x: Tensor, routed, checkpointed: bool
) -> tuple[Tensor, Tensor]:
    """The coupling as torch.compile can trace it: each block under activation checkpointing
    (when gradients are wanted), layer dropout as flags."""
    kept = stack._kept_flags()
    x1 = x2 = x
    aux = x.new_zeros((), dtype=torch.float32)
    for i, (block, (f_kw, g_kw)) in enumerate(zip(stack.blocks, routed)):
        args = (block, x1, x2, f_kw, g_kw, f"blocks[{i}]")
        y1, y2, a = (
            checkpoint(_coupling_block, *args, use_reentrant=False)
            if checkpointed
            else _coupling_block(*args)
        )
        if kept is None:
            x1, x2, aux = y1, y2, aux + a
        else:
            x1, x2 = torch.where(kept[i], y1, x1), torch.where(kept[i], y2, x2)
            aux = torch.where(kept[i], aux + a, aux)
    return (x1 + x2) / 2, aux
