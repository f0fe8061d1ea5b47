"""``LocalAttention``: the ``local-attention`` package's layer on :mod:`longrange.ops.local`.

Constructor and forward keywords are those of ``local_attention.LocalAttention`` (1.11.2), and
so are the results on the same q, k, v, rotary positions included: inside each window's span of
K = (look_backward + 1 + look_forward) * C keys, keys sit at columns 0 .. K - 1 and queries at
the last C columns, and xPos scales are centred on column K // 2. Where this layer differs, it
is on purpose:
- with ``autopad`` the padded keys are masked (the package lets non-causal queries attend the
  zero padding), so the result never depends on how much padding a length needed;
- a query whose keys are all masked gets zeros instead of a uniform average;
- a keyword that would have no effect (``use_xpos`` or ``xpos_scale_base`` without rotary
  positions) raises ValueError instead of being ignored.

Dimensions: N positions, C window size, K keys per span, D head width, E value width; leading
dimensions (B, H or B * H) are flattened into P rows.
"""

from __future__ import annotations

from torch import Tensor, nn

from longrange.modules.rotary import RotaryEmbedding
from longrange.ops.local import BACKENDS, local_attention, local_attention_step, local_cache_length


def _check_count(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


class LocalAttention(nn.Module):
    """Windowed attention over q, k: [..., N, D] and v: [..., N, E] (e.g. [B, H, N, D] or
    [B * H, N, D]); see :func:`longrange.ops.local.local_attention` for the window rules.

    ``dim`` (or ``rel_pos_emb_config[0]``) turns on rotary positions of that width when
    ``use_rotary_pos_emb``; ``use_xpos`` adds xPos scaling with base ``xpos_scale_base``
    (default ``window_size // 2``). ``backend`` ("auto", "blocked", "naive", "flex") picks the
    op's implementation.
    """

    def __init__(
        self,
        window_size: int,
        causal: bool = False,
        look_backward: int = 1,
        look_forward: int | None = None,
        dropout: float = 0.0,
        shared_qk: bool = False,
        rel_pos_emb_config: tuple[int, ...] | None = None,
        dim: int | None = None,
        autopad: bool = False,
        exact_windowsize: bool = False,
        scale: float | None = None,
        use_rotary_pos_emb: bool = True,
        use_xpos: bool = False,
        xpos_scale_base: float | None = None,
        *,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        _check_count("window_size", window_size, 1)
        _check_count("look_backward", look_backward, 0)
        look_forward = (0 if causal else 1) if look_forward is None else look_forward
        _check_count("look_forward", look_forward, 0)
        if causal and look_forward:
            raise ValueError(f"look_forward must be 0 when causal, got {look_forward}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.window_size = window_size
        self.causal = causal
        self.look_backward = look_backward
        self.look_forward = look_forward
        self.dropout = dropout
        self.shared_qk = shared_qk
        self.autopad = autopad
        self.exact_windowsize = exact_windowsize
        self.scale = scale
        self.use_xpos = use_xpos
        self.backend = backend

        if rel_pos_emb_config is not None:
            dim = rel_pos_emb_config[0]
        self.rel_pos: RotaryEmbedding | None = None
        if use_rotary_pos_emb and dim is not None:
            base = None
            if use_xpos:
                base = window_size // 2 if xpos_scale_base is None else xpos_scale_base
                if base <= 0:
                    raise ValueError(f"xpos_scale_base must be > 0, got {base!r}")
            self.rel_pos = RotaryEmbedding(dim, xpos_scale_base=base)
        elif use_xpos or xpos_scale_base is not None:
            raise ValueError(
                "use_xpos and xpos_scale_base need rotary positions: pass dim (or "
                "rel_pos_emb_config) with use_rotary_pos_emb=True"
            )

    def _rotary(self, window_size: int, head_dim: int):
        """The op's rotary callback for spans of the given window size (None without rotary)."""
        rot = self.rel_pos
        if rot is None:
            return None
        if rot.dim > head_dim:
            raise ValueError(f"rotary dim {rot.dim} exceeds the head width {head_dim}")
        if not self.use_xpos:
            return rot.rotate_queries_and_keys
        centre = (self.look_backward + 1 + self.look_forward) * window_size // 2

        def rotate(q: Tensor, k: Tensor, q_pos: Tensor, k_pos: Tensor) -> tuple[Tensor, Tensor]:
            q_scale = rot.xpos_scale(q_pos - centre)
            k_scale = rot.xpos_scale(k_pos - centre).reciprocal()
            return rot.rotate(q, q_pos, scale=q_scale), rot.rotate(k, k_pos, scale=k_scale)

        return rotate

    def _window(self, window_size: int | None) -> int:
        if window_size is None or window_size == self.window_size:
            return self.window_size
        if not self.use_xpos:
            raise ValueError("window_size can differ from the constructor's only with use_xpos")
        _check_count("window_size", window_size, 1)
        return window_size

    def forward(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        mask: Tensor | None = None,
        input_mask: Tensor | None = None,
        attn_bias: Tensor | None = None,
        window_size: int | None = None,
    ) -> Tensor:
        """q, k: [..., N, D], v: [..., N, E]; mask (or its alias input_mask): [b, N], True = keep,
        where b divides the flattened leading size P (it is repeated over the rest, as heads);
        attn_bias: [h, C, K], h dividing P, added to each window's scores. Returns [..., N, E].
        """
        mask = input_mask if mask is None else mask
        window = self._window(window_size)
        if q.dim() < 2 or k.shape != q.shape or v.shape[:-1] != q.shape[:-1]:
            raise ValueError(
                f"q, k must be [..., N, D] and v [..., N, E] alike, got {tuple(q.shape)}, "
                f"{tuple(k.shape)}, {tuple(v.shape)}"
            )
        n, d = q.shape[-2:]
        if n % window and not self.autopad:
            raise ValueError(
                f"sequence length {n} must be divisible by window_size {window} (or autopad=True)"
            )
        rows = q.shape[:-2].numel()
        heads = 1
        if attn_bias is not None:
            heads = attn_bias.shape[0] if attn_bias.dim() == 3 else 0
            if not heads or rows % heads:
                raise ValueError(
                    f"attn_bias must be [h, C, K] with h dividing {rows}, got {tuple(attn_bias.shape)}"
                )
        if mask is not None:
            if mask.dim() != 2 or mask.shape[-1] != n or rows % mask.shape[0]:
                raise ValueError(f"mask must be [b, {n}] with b dividing {rows}, got {tuple(mask.shape)}")
            if attn_bias is None:
                heads = rows // mask.shape[0]
            else:
                mask = mask.repeat_interleave(rows // mask.shape[0], dim=0)
                mask = mask.view(rows // heads, heads, n)

        out = local_attention(
            q.reshape(rows // heads, heads, n, d),
            k.reshape(rows // heads, heads, n, d),
            v.reshape(rows // heads, heads, n, v.shape[-1]),
            window_size=window,
            causal=self.causal,
            look_backward=self.look_backward,
            look_forward=self.look_forward,
            mask=mask,
            shared_qk=self.shared_qk,
            exact_windowsize=self.exact_windowsize,
            dropout=self.dropout if self.training else 0.0,
            scale=self.scale,
            bias=attn_bias,
            rotary=self._rotary(window, d),
            backend=self.backend,
        )
        return out.reshape(*q.shape[:-1], v.shape[-1])

    @property
    def cache_length(self) -> int:
        """How many recent keys and values :meth:`step` needs to see."""
        return local_cache_length(window_size=self.window_size, look_backward=self.look_backward)

    def step(
        self,
        q: Tensor,
        k_cache: Tensor,
        v_cache: Tensor,
        *,
        position: int,
        mask: Tensor | None = None,
    ) -> Tensor:
        """One causal decoding step: q [B, H, 1, D] at absolute ``position`` against the last M
        keys [B, H, M, D] (unrotated; the newest is its own) and values [B, H, M, E]; mask
        [B, M]. Returns [B, H, 1, E], the row ``forward`` would give that position."""
        if not self.causal:
            raise ValueError("step needs causal=True: a non-causal query sees future keys")
        return local_attention_step(
            q,
            k_cache,
            v_cache,
            position=position,
            window_size=self.window_size,
            look_backward=self.look_backward,
            mask=mask,
            shared_qk=self.shared_qk,
            exact_windowsize=self.exact_windowsize,
            scale=self.scale,
            rotary=self._rotary(self.window_size, q.shape[-1]),
        )
