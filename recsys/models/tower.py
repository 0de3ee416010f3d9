"""The Llama-style Transformer tower shared by the generative and CTR models.

Pre-norm blocks of RMSNorm → multi-head attention with rotary position embeddings (RoPE) →
residual, RMSNorm → SwiGLU feed-forward → residual, and a final RMSNorm (GPSD §3 uses the
LLaMA architecture). Attention is causal by default and bidirectional as an option; padded
positions are masked as keys. Sizes are named as in the paper: ``L4H64A4`` = 4 layers,
hidden size 64, 4 heads.

One source for every device, plain torch operations throughout: speed comes from
``torch.compile`` of each block (``run.compile``, :mod:`recsys.train.compiling`), which fuses
the elementwise steps (RMSNorm, SwiGLU, the rotary embedding) into the products around them.
The one device-dependent choice is the type attention computes in (:func:`attention_dtype`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

# ASCII digits and nothing after them (``\d`` takes other scripts' digits, ``$`` a newline).
NAME = re.compile(r"L([0-9]+)H([0-9]+)A([0-9]+)")


@dataclass(frozen=True)
class TowerConfig:
    """Shape of the tower."""

    layers: int = 4
    hidden: int = 64
    heads: int = 4
    ffn_hidden: int | None = None
    """SwiGLU inner size; default 3 × hidden (192 at width 64, as GPSD's public code)."""
    max_len: int = 256
    """Longest sequence the rotary tables cover (the CTR model adds one candidate token)."""
    causal: bool = True
    """Causal attention (GPSD's default); False for bidirectional."""
    rope_theta: float = 10_000.0
    norm_eps: float = 1e-6
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if min(self.layers, self.hidden, self.heads) < 1:
            raise ValueError(f"layers, hidden and heads must be >= 1, got {self.name}")
        if self.hidden % self.heads or (self.hidden // self.heads) % 2:
            raise ValueError(
                f"hidden {self.hidden} must split into {self.heads} heads of an "
                "even size (RoPE rotates pairs of dimensions)"
            )

    @classmethod
    def from_name(cls, name: str, **overrides) -> TowerConfig:
        """``L{layers}H{hidden}A{heads}``, e.g. ``L4H64A4`` or ``L12H768A12``."""
        match = NAME.fullmatch(name)
        if not match:
            raise ValueError(
                f"{name!r} is not of the form L<layers>H<hidden>A<heads> (e.g. L4H64A4)"
            )
        layers, hidden, heads = (int(g) for g in match.groups())
        return cls(layers=layers, hidden=hidden, heads=heads, **overrides)

    @property
    def name(self) -> str:
        return f"L{self.layers}H{self.hidden}A{self.heads}"

    @property
    def ffn(self) -> int:
        return self.ffn_hidden or 3 * self.hidden


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The type a matrix product of x computes in: autocast's on x's device, else x's."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


def attention_dtype(x: torch.Tensor) -> torch.dtype:
    """The type attention computes in: the products' type (bf16 under autocast), except on
    CPU, where it stays fp32: torch's CPU attention kernels run backward ~9x slower in bf16
    than in fp32 (torch 2.13, 51 positions, head size 16), while the projections around it
    gain 2-3x from bf16 matrix units."""
    return torch.float32 if x.device.type == "cpu" else compute_dtype(x)


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """x / rms(x) · weight over the last dimension, computed in fp32, returned as ``dtype``
    (default x's: a bf16 result under autocast spares the next product its cast)."""
    scale = torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)
    return ((x.float() * scale).type_as(x) * weight).to(dtype or x.dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Computed in fp32, returned as ``dtype`` (default x's)."""
        return rms_norm(x, self.weight, self.eps, dtype)


def rotary_tables(head_dim: int, max_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotation angles, [max_len, head_dim / 2]."""
    inverse = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(max_len, dtype=torch.float32), inverse)
    return angles.cos(), angles.sin()


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, dtype: torch.dtype):
    """Rotate pairs (even, odd) of the last dimension of x [B, T, S, H, D] by position t
    (dimension 1): each pair is a complex number e + i·o multiplied by cos + i·sin. ``cos``
    and ``sin`` are [T, D / 2] or, per row, [B, T, D / 2]. Computed in fp32 (in real
    arithmetic, which compilers fuse), returned as ``dtype``."""
    if cos.dim() == 2:
        cos, sin = cos[None], sin[None]
    cos, sin = cos[:, :, None, None], sin[:, :, None, None]
    pairs = x.float().unflatten(-1, (-1, 2))
    even, odd = pairs[..., 0], pairs[..., 1]
    turned = torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1)
    return turned.flatten(-2).to(dtype)


class Attention(nn.Module):
    def __init__(self, config: TowerConfig) -> None:
        super().__init__()
        self.heads = config.heads
        self.qkv = nn.Linear(config.hidden, 3 * config.hidden, bias=False)
        self.out = nn.Linear(config.hidden, config.hidden, bias=False)
        self.dropout = config.dropout

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None,
        cos: torch.Tensor,
        sin: torch.Tensor,
        at: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``at`` [B]: queries only at position ``at[b]`` of each row (keys and values at every
        position): [B, 1, d] out, with ``mask`` [B, 1, 1, T]."""
        b, t, d = x.shape
        heads = (self.heads, d // self.heads)
        dtype = attention_dtype(x)
        if at is None:
            qkv = self.qkv(x).view(b, t, 3, *heads)
            q, k = rotate(qkv[:, :, :2], _first(cos, t), _first(sin, t), dtype).unbind(2)
            v = qkv[:, :, 2].to(dtype)
        else:  # one query per row: its projection alone, rotated by its own position
            weight = self.qkv.weight
            kv = F.linear(x, weight[d:]).view(b, t, 2, *heads)
            k = rotate(kv[:, :, :1], cos[:t], sin[:t], dtype)[:, :, 0]
            v = kv[:, :, 1].to(dtype)
            query = F.linear(x[torch.arange(b, device=x.device), at], weight[:d])
            q = rotate(query.view(b, 1, 1, *heads), cos[at][:, None], sin[at][:, None], dtype)
            q = q[:, :, 0]
        q, k, v = (z.transpose(1, 2) for z in (q, k, v))  # [B, H, T, D] as attention takes
        # mask None: causal over right-padded rows, which lets SDPA pick its fused kernels.
        with torch.autocast(x.device.type, enabled=False):  # in the type chosen above
            y = F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=mask,
                is_causal=mask is None,
                dropout_p=self.dropout if self.training else 0.0,
            )
        # Heads back side by side, in the output projection's type.
        y = y.transpose(1, 2).to(compute_dtype(x)).reshape(b, q.shape[2], d)
        return self.out(y)


def _first(table: torch.Tensor, t: int) -> torch.Tensor:
    """The rotary table's first ``t`` positions (a per-row table [B, T, D / 2] is whole)."""
    return table[:t] if table.dim() == 2 else table


class FeedForward(nn.Module):
    """SwiGLU: W2 (SiLU(W1 x) ⊙ W3 x)."""

    def __init__(self, config: TowerConfig) -> None:
        super().__init__()
        self.w1 = nn.Linear(config.hidden, config.ffn, bias=False)
        self.w3 = nn.Linear(config.hidden, config.ffn, bias=False)
        self.w2 = nn.Linear(config.ffn, config.hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # W1 and W3 in one GEMM (twice as wide runs faster than two), then split.
        gate, up = F.linear(x, torch.cat((self.w1.weight, self.w3.weight))).chunk(2, dim=-1)
        return self.w2(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, config: TowerConfig) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(config.hidden, config.norm_eps)
        self.attention = Attention(config)
        self.ffn_norm = RMSNorm(config.hidden, config.norm_eps)
        self.ffn = FeedForward(config)

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None,
        cos: torch.Tensor,
        sin: torch.Tensor,
        at: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``at`` [B]: the outputs at position ``at[b]`` of each row only, [B, 1, d]."""
        # The norms hand the projections their inputs in the type they compute in.
        dtype = compute_dtype(x)
        attended = self.attention(self.attention_norm(x, dtype), mask, cos, sin, at)
        if at is not None:
            # at.shape[0], not len(at): torch.export keeps a symbolic batch size through it.
            x = x[torch.arange(at.shape[0], device=x.device), at][:, None]
        x = x + attended
        return x + self.ffn(self.ffn_norm(x, dtype))


class Tower(nn.Module):
    """x [B, T, hidden] and valid [B, T] (True at real positions) → [B, T, hidden]."""

    def __init__(self, config: TowerConfig) -> None:
        super().__init__()
        self.config = config
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.layers))
        self.norm = RMSNorm(config.hidden, config.norm_eps)
        cos, sin = rotary_tables(config.hidden // config.heads, config.max_len, config.rope_theta)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def attention_mask(self, valid: torch.Tensor) -> torch.Tensor | None:
        """[B, 1, T, T] boolean: a query sees valid keys (earlier ones when causal), and
        always itself, so that padded rows stay finite. None when attention is causal and
        every row is right-padded: then causality alone keeps real positions from seeing
        padding (padded positions' outputs are never used)."""
        if self.config.causal and bool((valid.cummin(dim=1).values == valid).all()):
            return None
        t = valid.shape[1]
        mask = valid[:, None, None, :].expand(-1, 1, t, t)
        if self.config.causal:
            mask = mask & torch.ones(t, t, dtype=torch.bool, device=valid.device).tril()
        return mask | torch.eye(t, dtype=torch.bool, device=valid.device)

    def forward(
        self,
        x: torch.Tensor,
        valid: torch.Tensor,
        *,
        mask: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        at: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``mask`` [B, 1, T, T] (True: may attend) replaces the mask made from ``valid``
        (packed rows, group queries); ``positions`` [B, T] are the rotary positions of each
        token (default 0, 1, 2, ...).

        ``at`` [B]: only the output at position ``at[b]`` of each row is wanted (a ranker's
        candidate): [B, hidden] out, the same values as ``forward(x, valid)[rows, at]``. The
        last block then computes its query, attention output and feed-forward at that one
        position (keys and values at all), a quarter less work at 4 layers."""
        if at is not None and (mask is not None or positions is not None):
            raise ValueError("at is for the tower's own mask and positions only")
        if positions is None and x.shape[1] > self.config.max_len:
            raise ValueError(
                f"sequence of {x.shape[1]} positions exceeds the tower's max_len "
                f"{self.config.max_len}"
            )
        if mask is None:
            mask = self.attention_mask(valid)
        cos, sin = self.cos, self.sin
        if positions is not None:
            if positions.numel() and int(positions.max()) >= self.config.max_len:
                raise ValueError(
                    f"position {int(positions.max())} exceeds the tower's max_len "
                    f"{self.config.max_len}"
                )
            cos, sin = cos[positions], sin[positions]
        # With `at`, the last block runs on its own below, at those positions only.
        for block in self.blocks if at is None else self.blocks[:-1]:
            x = block(x, mask, cos, sin)
        if at is None:
            return self.norm(x)
        # The one query of each row sees the keys its row of the full mask lets it see.
        position = torch.arange(valid.shape[1], device=valid.device)[None, :]
        keys = valid & (position <= at[:, None]) if self.config.causal else valid
        keys = (keys | (position == at[:, None]))[:, None, None, :]
        return self.norm(self.blocks[-1](x, keys, cos, sin, at))[:, 0]


def towers(model: nn.Module) -> list[Tower]:
    """Every Transformer tower in ``model`` (sharded or not)."""
    return [m for m in model.modules() if isinstance(m, Tower)]
