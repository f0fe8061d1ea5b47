"""Run a branch at another width: project in, call, project back.

Used when the embedding width differs from the model width (the references' ``emb_dim``), or
to give one branch its own width. A branch result of ``(out, aux_loss)`` keeps its auxiliary
loss; only ``out`` is projected back.
Dimensions: B batch, N sequence, E outer width (``dim_in``), D inner width (``dim_out``).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn


class ProjectInOut(nn.Module):
    """x [B, N, E] -> fn(Linear(E, D)(x)) -> Linear(D, E) -> [B, N, E].

    With ``project_out=False`` the result stays [B, N, D].
    """

    def __init__(self, fn: Callable, dim_in: int, dim_out: int, project_out: bool = True) -> None:
        super().__init__()
        if dim_in <= 0 or dim_out <= 0:
            raise ValueError(f"dim_in and dim_out must be positive, got {dim_in}, {dim_out}")
        self.fn = fn
        self.project_in = nn.Linear(dim_in, dim_out)
        self.project_out = nn.Linear(dim_out, dim_in) if project_out else nn.Identity()

    def forward(self, x: Tensor, **kwargs):
        out = self.fn(self.project_in(x), **kwargs)
        if isinstance(out, tuple):
            return (self.project_out(out[0]), *out[1:])
        return self.project_out(out)
