"""The tower's elementwise steps, each one pass over memory on CPU: RMSNorm, SwiGLU, and the
rotary embedding with the split of projections into attention heads.

At the tower's widths most of a CPU training step is elementwise work, not matrix products,
and each torch kernel is a pass over the whole activation (RMSNorm alone is about six kernels
forward and ten backward). :func:`rms_norm`, :func:`swiglu` and :func:`rotary_heads` run the
compiled kernels of ``recsys.models._fused`` (built with the package) through autograd
functions with hand-written backward passes, row by row while each row is in cache. On other
devices, for other types, inside ``torch.compile``, or when the helper is not built, they run
the same computation as torch ops (the reference the tests compare against).
``RECSYS_NATIVE=0`` forces the torch path.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os

import torch
import torch.nn.functional as F

ABI = 1
"""The compiled helper's calling convention (its ``fused_abi()``); another is not used."""

WIDEST = 8192
"""Rows wider than this (features per row, all heads of one slot) take the torch path."""

_CODES = {torch.float32: 0, torch.bfloat16: 1}


def _load() -> ctypes.CDLL | None:
    if os.environ.get("RECSYS_NATIVE", "1") == "0":
        return None
    spec = importlib.util.find_spec("recsys.models._fused")
    if spec is None or not spec.origin:
        return None
    try:
        library = ctypes.CDLL(spec.origin)
        library.fused_abi.restype = ctypes.c_int64
        abi = library.fused_abi()
    except (OSError, AttributeError):
        return None
    if abi != ABI:  # a stale build: its functions take other arguments
        return None
    p, n, flag = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    signatures = {
        "rms_norm_forward": [p, p, n, n, ctypes.c_float, p, flag, p],
        "rms_norm_backward": [p, flag, p, p, p, n, n, p, p],
        "swiglu_forward": [p, n, n, p, flag],
        "swiglu_backward": [p, p, n, n, p, flag],
        "rotary_forward": [p, flag, n, n, n, n, n, n, p, p, n, p],
        "rotary_backward": [p, n, n, n, n, n, n, p, p, n, p, flag],
    }
    for name, arguments in signatures.items():
        function = getattr(library, name)
        function.restype, function.argtypes = None, arguments
    return library


_LIBRARY = _load()
NATIVE = _LIBRARY is not None
"""Whether the compiled kernels are in use (on CPU)."""


def _native(*tensors: torch.Tensor) -> bool:
    return (
        NATIVE
        and not torch.compiler.is_compiling()
        and all(t.device.type == "cpu" and t.dtype in _CODES for t in tensors)
    )


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The type a matrix product of x computes in: autocast's on x's device, else x's."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


# --- RMSNorm ----------------------------------------------------------------------------


def rms_norm_reference(
    x: torch.Tensor, weight: torch.Tensor, eps: float, dtype: torch.dtype | None = None
) -> torch.Tensor:
    scale = torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)
    return ((x.float() * scale).type_as(x) * weight).to(dtype or x.dtype)


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps: float, dtype: torch.dtype):
        d = x.shape[-1]
        rows = x.numel() // d
        x = x.contiguous()
        y = torch.empty(x.shape, dtype=dtype)
        rstd = torch.empty(rows)
        _LIBRARY.rms_norm_forward(
            x.data_ptr(), weight.data_ptr(), rows, d, eps, y.data_ptr(), _CODES[dtype],
            rstd.data_ptr(),
        )  # fmt: skip
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        x, weight, rstd = ctx.saved_tensors
        d = x.shape[-1]
        dy = dy.contiguous()
        dx = torch.empty_like(x)
        dweight = torch.zeros(d)
        _LIBRARY.rms_norm_backward(
            dy.data_ptr(), _CODES[dy.dtype], x.data_ptr(), weight.data_ptr(), rstd.data_ptr(),
            len(rstd), d, dx.data_ptr(), dweight.data_ptr(),
        )  # fmt: skip
        return dx, dweight.to(weight.dtype), None, None


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """x / rms(x) · weight over the last dimension, computed in fp32, returned as ``dtype``
    (default x's: a bf16 result under autocast spares the next product its cast)."""
    dtype = dtype or x.dtype
    if (
        _native(x, weight)
        and x.dtype == weight.dtype == torch.float32
        and dtype in _CODES
        and x.shape[-1] <= WIDEST
    ):
        return _RMSNorm.apply(x, weight, eps, dtype)
    return rms_norm_reference(x, weight, eps, dtype)


# --- SwiGLU -------------------------------------------------------------------------------


def swiglu_reference(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate_up):
        f = gate_up.shape[-1] // 2
        rows = gate_up.numel() // (2 * f)
        gate_up = gate_up.contiguous()
        h = torch.empty((*gate_up.shape[:-1], f), dtype=gate_up.dtype)
        code = _CODES[gate_up.dtype]
        _LIBRARY.swiglu_forward(gate_up.data_ptr(), rows, f, h.data_ptr(), code)
        ctx.save_for_backward(gate_up)
        return h

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dh):
        (gate_up,) = ctx.saved_tensors
        f = gate_up.shape[-1] // 2
        dh = dh.to(gate_up.dtype).contiguous()
        dgu = torch.empty_like(gate_up)
        _LIBRARY.swiglu_backward(
            dh.data_ptr(), gate_up.data_ptr(), gate_up.numel() // (2 * f), f, dgu.data_ptr(),
            _CODES[gate_up.dtype],
        )  # fmt: skip
        return dgu


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """SiLU(g) ⊙ u for the two halves [g | u] of the last dimension."""
    if _native(gate_up) and gate_up.shape[-1] // 2 <= WIDEST:
        return _SwiGLU.apply(gate_up)
    return swiglu_reference(gate_up)


# --- rotary embedding and attention heads ---------------------------------------------------


def apply_rotary(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Rotate pairs (even, odd) of the last dimension of x [B, T, ..., head_dim] by position t
    (dimension 1): each pair is a complex number e + i·o multiplied by cos + i·sin. ``cos``
    and ``sin`` are [max_len, head_dim / 2] or, per row, [B, T, head_dim / 2]. Computed in
    fp32; returned as ``dtype`` (default: x's)."""
    t = x.shape[1]
    pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    if cos.dim() == 3:  # per-row positions: [B, T, head_dim / 2]
        angle = torch.complex(cos, sin).view(x.shape[0], t, *([1] * (x.dim() - 3)), -1)
    else:
        angle = torch.complex(cos[:t], sin[:t]).view(1, t, *([1] * (x.dim() - 3)), -1)
    return torch.view_as_real(pairs * angle).flatten(-2).to(dtype or x.dtype)


def rotary_heads_reference(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotated: int, dtype=None
) -> tuple[torch.Tensor, ...]:
    turned = apply_rotary(x[:, :, :rotated], cos, sin, dtype)
    slots = [turned[:, :, s] for s in range(rotated)]
    slots += [x[:, :, s].to(dtype or x.dtype) for s in range(rotated, x.shape[2])]
    return tuple(slot.transpose(1, 2) for slot in slots)


class _RotaryHeads(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin, rotated: int, stride: int):
        b, t, slots, heads, d = x.shape
        x = x.contiguous()
        outs = [torch.empty(b, t, heads, d) for _ in range(slots)]  # SDPA's own layout
        addresses = (ctypes.c_void_p * slots)(*(o.data_ptr() for o in outs))
        _LIBRARY.rotary_forward(
            x.data_ptr(), _CODES[x.dtype], b, t, slots, heads, d, rotated, cos.data_ptr(),
            sin.data_ptr(), stride, addresses,
        )  # fmt: skip
        ctx.save_for_backward(cos, sin)
        ctx.shape, ctx.dtype, ctx.rotated, ctx.stride = x.shape, x.dtype, rotated, stride
        ctx.set_materialize_grads(False)
        return tuple(out.transpose(1, 2) for out in outs)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grads):
        cos, sin = ctx.saved_tensors
        b, t, slots, heads, d = ctx.shape
        grads = [None if g is None else g.transpose(1, 2).float().contiguous() for g in grads]
        addresses = (ctypes.c_void_p * slots)(*(0 if g is None else g.data_ptr() for g in grads))
        dx = torch.empty(ctx.shape, dtype=ctx.dtype)
        _LIBRARY.rotary_backward(
            addresses, b, t, slots, heads, d, ctx.rotated, cos.data_ptr(), sin.data_ptr(),
            ctx.stride, dx.data_ptr(), _CODES[ctx.dtype],
        )  # fmt: skip
        return dx, None, None, None, None


def rotary_heads(
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    rotated: int,
    dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, ...]:
    """Projections x [B, T, S, H, D] (S slots, e.g. queries, keys, values) → S tensors
    [B, H, T, D] as attention takes them, the first ``rotated`` slots rotated by position
    (:func:`apply_rotary`; ``cos``/``sin`` [max_len, D / 2] or per row [B, T, D / 2]) and all
    returned as ``dtype`` (default x's). On CPU in fp32 this is one pass each way."""
    b, t, _, heads, d = x.shape
    shared = cos.dim() == 2
    if (
        dtype == torch.float32
        and _native(x, cos, sin)
        and cos.dtype == sin.dtype == torch.float32
        and heads * d <= WIDEST
        and (cos.shape[0] >= t if shared else cos.shape[:2] == (b, t))
    ):
        cos, sin = cos.contiguous(), sin.contiguous()
        return _RotaryHeads.apply(x, cos, sin, rotated, 0 if shared else t)
    return rotary_heads_reference(x, cos, sin, rotated, dtype)
