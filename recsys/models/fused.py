"""The tower's elementwise steps, each one pass over memory on CPU: RMSNorm, SwiGLU, and the
rotary embedding with the split of projections into attention heads; and attention over
short sequences.

At the tower's widths most of a CPU training step is elementwise work, not matrix products,
and each torch kernel is a pass over the whole activation (RMSNorm alone is about six kernels
forward and ten backward). :func:`rms_norm`, :func:`swiglu` and :func:`rotary_heads` run the
compiled kernels of ``recsys.models._fused`` (built with the package) through autograd
functions with hand-written backward passes, row by row while each row is in cache.
:func:`attention` does the same for each (row, head) of a short sequence: torch's CPU flash
kernel is built for long ones, and at ~50 positions and head size 16 spends most of its time
outside arithmetic. On other devices, for other types, inside ``torch.compile``, or when
the helper is not built, they run the same computation as torch ops (what the tests compare
against). ``RECSYS_NATIVE=0`` forces the torch path.

The kernels run on one thread, as each rank of a multi-process CPU job does. With 2 threads
the L4H64A4 tower step was still 1.1-1.25x faster than torch's (threaded) kernels; on ranks
with many threads torch's may be faster.
"""

from __future__ import annotations

import ctypes

import torch
import torch.nn.functional as F
from torch import Tensor

from recsys import native

ABI = 2
"""The compiled helper's calling convention (its ``fused_abi()``); another is not used."""

WIDEST = 4096
"""Rows wider than this (features per row, all heads of one slot) take the torch path: the
kernels keep a few rows of this width on the stack."""

FP32 = torch.float32
_CODES = {FP32: 0, torch.bfloat16: 1}


def _load() -> ctypes.CDLL | None:
    library = native.load("recsys.models._fused", "fused_abi", ABI)
    if library is None:
        return None
    p, n, flag = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    signatures = {
        "rms_norm_forward": [p, p, n, n, ctypes.c_float, p, flag, p],
        "rms_norm_backward": [p, flag, p, p, p, n, n, p, p],
        "swiglu_forward": [p, n, n, p, flag],
        "swiglu_backward": [p, p, n, n, p, flag],
        "rotary_forward": [p, flag, n, n, n, n, n, n, p, p, n, p],
        "rotary_backward": [p, n, n, n, n, n, n, p, p, n, p, flag],
        "attention_forward": [p] * 3 + [n] * 5 + [p, n, n, flag, ctypes.c_float, p, p],
        "attention_backward": [p] * 6 + [n] * 5 + [p, n, n, flag, ctypes.c_float, p, p, p],
    }
    for name, arguments in signatures.items():
        function = getattr(library, name)
        function.restype, function.argtypes = None, arguments
    library.attention_forward.restype = library.attention_backward.restype = n
    return library


def _op(name: str):
    """A CPU operator ``recsys::name`` around a kernel: torch.compile traces it as one call
    (with its fake implementation for shapes), autograd through its registered backward."""
    return torch.library.custom_op(f"recsys::{name}", mutates_args=(), device_types="cpu")


_LIBRARY = _load()
NATIVE = _LIBRARY is not None
"""Whether the compiled kernels are in use (on CPU)."""


def _native(*tensors: torch.Tensor) -> bool:
    return (
        NATIVE
        and not torch.compiler.is_exporting()
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


@_op("rms_norm")
def _rms_norm(x: Tensor, weight: Tensor, eps: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """x / rms(x) · weight and each row's 1 / rms (for backward)."""
    d = x.shape[-1]
    rows = x.numel() // d
    x = x.contiguous()
    y = torch.empty(x.shape, dtype=dtype, device="cpu")
    rstd = torch.empty(rows, dtype=FP32, device="cpu")
    _LIBRARY.rms_norm_forward(
        x.data_ptr(), weight.data_ptr(), rows, d, eps, y.data_ptr(), _CODES[dtype],
        rstd.data_ptr(),
    )  # fmt: skip
    return y, rstd


@_rms_norm.register_fake
def _(x, weight, eps, dtype):
    return x.new_empty(x.shape, dtype=dtype), x.new_empty(x.numel() // x.shape[-1], dtype=FP32)


@_op("rms_norm_backward")
def _rms_norm_backward(
    dy: Tensor, x: Tensor, weight: Tensor, rstd: Tensor
) -> tuple[Tensor, Tensor]:
    d = x.shape[-1]
    dy, x = dy.contiguous(), x.contiguous()
    dx = torch.empty_like(x, memory_format=torch.contiguous_format)
    dweight = torch.zeros(d, dtype=FP32, device="cpu")
    _LIBRARY.rms_norm_backward(
        dy.data_ptr(), _CODES[dy.dtype], x.data_ptr(), weight.data_ptr(), rstd.data_ptr(),
        len(rstd), d, dx.data_ptr(), dweight.data_ptr(),
    )  # fmt: skip
    return dx, dweight


@_rms_norm_backward.register_fake
def _(dy, x, weight, rstd):
    return x.new_empty(x.shape), x.new_empty(x.shape[-1], dtype=FP32)


def _rms_norm_saved(ctx, inputs, output) -> None:
    x, weight, _, _ = inputs
    ctx.save_for_backward(x, weight, output[1])


def _rms_norm_grad(ctx, dy, _):
    x, weight, rstd = ctx.saved_tensors
    dx, dweight = _rms_norm_backward(dy, x, weight, rstd)
    return dx, dweight.to(weight.dtype), None, None


_rms_norm.register_autograd(_rms_norm_grad, setup_context=_rms_norm_saved)


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """x / rms(x) · weight over the last dimension, computed in fp32, returned as ``dtype``
    (default x's: a bf16 result under autocast spares the next product its cast)."""
    dtype = dtype or x.dtype
    if (
        _native(x, weight)
        and x.dtype == weight.dtype == FP32
        and dtype in _CODES
        and weight.shape == x.shape[-1:]
        and 0 < x.shape[-1] <= WIDEST
    ):
        return _rms_norm(x, weight.contiguous(), eps, dtype)[0]
    return rms_norm_reference(x, weight, eps, dtype)


# --- SwiGLU -------------------------------------------------------------------------------


def swiglu_reference(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


@_op("swiglu")
def _swiglu(gate_up: Tensor) -> Tensor:
    f = gate_up.shape[-1] // 2
    rows = gate_up.numel() // (2 * f)
    gate_up = gate_up.contiguous()
    h = torch.empty((*gate_up.shape[:-1], f), dtype=gate_up.dtype, device="cpu")
    _LIBRARY.swiglu_forward(gate_up.data_ptr(), rows, f, h.data_ptr(), _CODES[gate_up.dtype])
    return h


@_swiglu.register_fake
def _(gate_up):
    return gate_up.new_empty((*gate_up.shape[:-1], gate_up.shape[-1] // 2))


@_op("swiglu_backward")
def _swiglu_backward(dh: Tensor, gate_up: Tensor) -> Tensor:
    f = gate_up.shape[-1] // 2
    dh, gate_up = dh.to(gate_up.dtype).contiguous(), gate_up.contiguous()
    dgu = torch.empty_like(gate_up)
    _LIBRARY.swiglu_backward(
        dh.data_ptr(), gate_up.data_ptr(), gate_up.numel() // (2 * f), f, dgu.data_ptr(),
        _CODES[gate_up.dtype],
    )  # fmt: skip
    return dgu


@_swiglu_backward.register_fake
def _(dh, gate_up):
    return gate_up.new_empty(gate_up.shape)


def _swiglu_saved(ctx, inputs, output) -> None:
    ctx.save_for_backward(inputs[0])


def _swiglu_grad(ctx, dh):
    return _swiglu_backward(dh, ctx.saved_tensors[0])


_swiglu.register_autograd(_swiglu_grad, setup_context=_swiglu_saved)


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """SiLU(g) ⊙ u for the two halves [g | u] of the last dimension."""
    width = gate_up.shape[-1]
    if _native(gate_up) and width % 2 == 0 and 0 < width // 2 <= WIDEST:
        return _swiglu(gate_up)
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


@_op("rotary_heads")
def _rotary_heads(x: Tensor, cos: Tensor, sin: Tensor, rotated: int, stride: int) -> list[Tensor]:
    """x [B, T, S, H, D] → S tensors [B, T, H, D] in fp32, the first ``rotated`` rotated."""
    b, t, slots, heads, d = x.shape
    x = x.contiguous()
    outs = [torch.empty(b, t, heads, d, dtype=FP32, device="cpu") for _ in range(slots)]
    addresses = (ctypes.c_void_p * slots)(*(o.data_ptr() for o in outs))
    _LIBRARY.rotary_forward(
        x.data_ptr(), _CODES[x.dtype], b, t, slots, heads, d, rotated, cos.data_ptr(),
        sin.data_ptr(), stride, addresses,
    )  # fmt: skip
    return outs


@_rotary_heads.register_fake
def _(x, cos, sin, rotated, stride):
    b, t, slots, heads, d = x.shape
    return [x.new_empty(b, t, heads, d, dtype=FP32) for _ in range(slots)]


@_op("rotary_heads_backward")
def _rotary_heads_backward(
    grads: list[Tensor | None],
    cos: Tensor,
    sin: Tensor,
    shape: list[int],
    dtype: torch.dtype,
    rotated: int,
    stride: int,
) -> Tensor:
    b, t, slots, heads, d = shape
    grads = [None if g is None else g.float().contiguous() for g in grads]
    addresses = (ctypes.c_void_p * slots)(*(0 if g is None else g.data_ptr() for g in grads))
    dx = torch.empty(shape, dtype=dtype, device="cpu")
    _LIBRARY.rotary_backward(
        addresses, b, t, slots, heads, d, rotated, cos.data_ptr(), sin.data_ptr(), stride,
        dx.data_ptr(), _CODES[dtype],
    )  # fmt: skip
    return dx


@_rotary_heads_backward.register_fake
def _(grads, cos, sin, shape, dtype, rotated, stride):
    return cos.new_empty(shape, dtype=dtype)


def _rotary_heads_saved(ctx, inputs, output) -> None:
    x, cos, sin, rotated, stride = inputs
    ctx.save_for_backward(cos, sin)
    ctx.shape, ctx.dtype, ctx.rotated, ctx.stride = list(x.shape), x.dtype, rotated, stride


def _rotary_heads_grad(ctx, grads):
    cos, sin = ctx.saved_tensors
    dx = _rotary_heads_backward(
        list(grads), cos, sin, ctx.shape, ctx.dtype, ctx.rotated, ctx.stride
    )
    return dx, None, None, None, None


_rotary_heads.register_autograd(_rotary_heads_grad, setup_context=_rotary_heads_saved)


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
        dtype == FP32
        and _native(x, cos, sin)
        and cos.dtype == sin.dtype == FP32
        and d % 2 == 0
        and 0 < heads * d <= WIDEST
        and cos.shape == sin.shape
        and cos.shape[-1] == d // 2
        and (cos.shape[0] >= t if shared else cos.shape[:2] == (b, t))
    ):
        cos, sin = cos.contiguous(), sin.contiguous()
        outs = _rotary_heads(x, cos, sin, rotated, 0 if shared else t)
        return tuple(out.transpose(1, 2) for out in outs)
    return rotary_heads_reference(x, cos, sin, rotated, dtype)


# --- attention ----------------------------------------------------------------------------

LONGEST = 1024
"""Sequences longer than this (keys) take torch's kernel, built for them."""


def _expanded(mask: torch.Tensor | None, b: int, tq: int, tk: int) -> torch.Tensor | None:
    """A boolean mask [B or 1, 1, Tq or 1, Tk] as [B, 1, Tq, Tk] (broadcast: stride 0)."""
    if mask is None:
        return None
    mask = mask.expand(b, 1, tq, tk)
    return mask if mask.stride(-1) == 1 else mask.contiguous()


def _mask_arguments(mask: torch.Tensor | None) -> tuple[int, int, int]:
    """The kernel's view of a [B, 1, Tq, Tk] mask: its address, strides over rows and
    queries; taken from the tensor at each call, whose layout may change between forward and
    backward (saved tensors may be stored elsewhere and unpacked again, e.g. under
    activation checkpointing)."""
    if mask is None:
        return 0, 0, 0
    return mask.data_ptr(), mask.stride(0), mask.stride(2)


@_op("attention")
def _attention(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, causal: bool
) -> tuple[Tensor, Tensor]:
    """q [B, Tq, H, D], k and v [B, Tk, H, D] → out [B, Tq, H, D] and the log-sum-exp of
    each query's scores [B, H, Tq] (for backward)."""
    b, tq, heads, d = q.shape
    tk = k.shape[1]
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    mask = _expanded(mask, b, tq, tk)
    out = torch.empty(b, tq, heads, d, dtype=FP32, device="cpu")
    lse = torch.empty(b, heads, tq, dtype=FP32, device="cpu")
    if _LIBRARY.attention_forward(
        q.data_ptr(), k.data_ptr(), v.data_ptr(), b, heads, tq, tk, d,
        *_mask_arguments(mask), int(causal), d**-0.5, out.data_ptr(), lse.data_ptr(),
    ):  # fmt: skip
        raise MemoryError("attention_forward: no scratch memory")
    return out, lse


@_attention.register_fake
def _(q, k, v, mask, causal):
    b, tq, heads, _ = q.shape
    return q.new_empty(q.shape), q.new_empty(b, heads, tq)


@_op("attention_backward")
def _attention_backward(
    q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, dout: Tensor,
    mask: Tensor | None, causal: bool,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    b, tq, heads, d = q.shape
    tk = k.shape[1]
    q, k, v, dout = q.contiguous(), k.contiguous(), v.contiguous(), dout.float().contiguous()
    mask = _expanded(mask, b, tq, tk)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    tensors = (q, k, v, out.contiguous(), lse.contiguous(), dout)
    if _LIBRARY.attention_backward(
        *(t.data_ptr() for t in tensors), b, heads, tq, tk, d, *_mask_arguments(mask),
        int(causal), d**-0.5, dq.data_ptr(), dk.data_ptr(), dv.data_ptr(),
    ):  # fmt: skip
        raise MemoryError("attention_backward: no scratch memory")
    return dq, dk, dv


@_attention_backward.register_fake
def _(q, k, v, out, lse, dout, mask, causal):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _attention_saved(ctx, inputs, output) -> None:
    q, k, v, mask, causal = inputs
    ctx.save_for_backward(q, k, v, *output, mask)
    ctx.causal = causal


def _attention_grad(ctx, dout, _):
    q, k, v, out, lse, mask = ctx.saved_tensors
    dq, dk, dv = _attention_backward(q, k, v, out, lse, dout, mask, ctx.causal)
    return dq, dk, dv, None, None


_attention.register_autograd(_attention_grad, setup_context=_attention_saved)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    causal: bool = False,
) -> torch.Tensor | None:
    """softmax(q kᵀ / √D) v for q [B, H, Tq, D], k and v [B, H, Tk, D], fp32 on CPU, with a
    boolean ``mask`` [B or 1, 1, Tq or 1, Tk] (True: may attend) and/or ``causal`` (Tq =
    Tk); None where the kernel does not apply (then use torch's). A query that may attend
    no key gets zeros (torch gives NaN)."""
    b, heads, tq, d = q.shape
    tk = k.shape[2]
    if not (
        _native(q, k, v)
        and (mask is None or mask.device.type == "cpu")
        and q.dtype == k.dtype == v.dtype == FP32
        and k.shape == v.shape == (b, heads, tk, d)
        and q.numel() > 0
        and 0 < tk <= LONGEST
        and (not causal or tq == tk)
        and (
            mask is None
            or (
                mask.dtype == torch.bool
                and mask.dim() == 4
                and mask.shape[1] == 1
                and mask.shape[0] in (1, b)
                and mask.shape[2] in (1, tq)
                and mask.shape[3] == tk
            )
        )
    ):
        return None
    heads_last = (x.transpose(1, 2) for x in (q, k, v))
    out, _ = _attention(*heads_last, mask, causal)
    return out.transpose(1, 2)
