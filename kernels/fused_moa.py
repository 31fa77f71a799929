"""
The Mixture-of-Adapters layer of moa.py fused in Triton (design: docs/kernel.md). Per token x:
    logits = (relu(x W1^T + b1) W2^T + b2) / temperature; g = softmax over the top_k logits
    y = x + sum_e g_e * (gelu(x Wd_e^T + bd_e) Wu_e^T + bu_e)       (E experts e of rank R)
Launches: forward 1; backward 2 (token tiles; weight tiles, fixed-order sums, no atomics), 3 above
4096 tokens (a sum). `python -m kernels.fused_moa --compile-report` checks A100/H100 fit, no GPU.
"""
import functools
import math  # host-side grids: math.ceil, as triton.cdiv costs microseconds per call in Python
import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"  # read once: kernels are built at import
POISON = False  # tests set it: new buffers are NaN, so an element a kernel forgets to write shows
NAMES = ("x", "gate_w1", "gate_b1", "gate_w2", "gate_b2", "down_w", "down_b", "up_w", "up_b")
TL = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}
_capability = functools.lru_cache(maxsize=None)(torch.cuda.get_device_capability)  # once per GPU


# -----------------------------------------------------------------------------
# The kernels: a matmul helper, the forward, the backward over token tiles, over weight tiles
@triton.jit
def _proj(src_ptr, lds, rows, rmask, K, w_ptr, coff, cmask, dstride, BM: tl.constexpr,
          NC: tl.constexpr, BK: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr):
    """(BM, NC) fp32 = src[rows, :K] @ W^T, BK columns a step; src rows are lds apart and element
    (k, c) of W^T is at w_ptr + coff[c] + k * dstride (reads W1, Wd and up_w (E, D, R) alike)."""
    acc = tl.zeros((BM, NC), tl.float32)
    for k0 in range(0, K, BK):
        offs_k = k0 + tl.arange(0, BK)
        kmask = offs_k < K
        s = tl.load(src_ptr + rows[:, None] * lds + offs_k[None, :],
                    mask=rmask[:, None] & kmask[None, :], other=0.0)             # (BM, BK)
        w = tl.load(w_ptr + coff[None, :] + offs_k[:, None] * dstride,
                    mask=kmask[:, None] & cmask[None, :], other=0.0)             # (BK, NC)
        acc = tl.dot(s.to(DOT), w.to(DOT), acc, input_precision=PREC)
    return acc


@triton.jit
def _moa_fwd_kernel(  # one program per tile of BM tokens, dense over the experts
    x_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr,  # x (N, D); W1 (H, D), b1 (H,), W2 (E, H), b2 (E,)
    wd_ptr, bd_ptr, wu_ptr, bu_ptr,  # Wd (E, R, D) = (E*R, D), bd (E, R), Wu (E, D, R), bu (E, D)
    y_ptr, gates_ptr,                # out: y (N, D) in x's dtype, gates (N, E) fp32
    N, D, temperature,
    H: tl.constexpr, E: tl.constexpr, R: tl.constexpr, EX: tl.constexpr,  # EX: E to a power of 2
    TOP_K: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr,
    DOT: tl.constexpr, PREC: tl.constexpr, GATE_PREC: tl.constexpr,
):
    EPR: tl.constexpr = EX * R       # packed expert columns c = e * R + r; c >= E * R is padding
    rows = (tl.program_id(0) * BM + tl.arange(0, BM)).to(tl.int64)
    rmask = rows < N
    offs_h = tl.arange(0, H)
    offs_c = tl.arange(0, EPR)
    cmask = offs_c < E * R
    cols = tl.arange(0, 16)          # gate columns: E <= 16, padded to 16 for tl.dot
    gmask = cols < E
    # 1. gate MLP and top-k. Two passes over the X tile (the second from L2) keep u and a apart.
    u = _proj(x_ptr, D, rows, rmask, D, w1_ptr, offs_h * D, offs_h < H, 1, BM, H, BK, DOT, GATE_PREC)
    v = tl.maximum(u + tl.load(b1_ptr + offs_h).to(tl.float32)[None, :], 0.0)          # (BM, H)
    w2 = tl.load(w2_ptr + cols[None, :] * H + offs_h[:, None], mask=gmask[None, :], other=0.0)
    z = tl.dot(v.to(DOT), w2.to(DOT), input_precision=GATE_PREC)                       # (BM, 16)
    logits = (z + tl.load(b2_ptr + cols, mask=gmask, other=0.0).to(tl.float32)[None, :]) / temperature
    keep = gmask[None, :]
    if TOP_K < E:  # TOP_K rounds of "row max, lowest column holding it": ties to the lower expert
        work = tl.where(keep, logits, float("-inf"))
        keep = cols[None, :] < 0
        for _ in tl.static_range(TOP_K):
            top = tl.where(work == tl.max(work, axis=1)[:, None], cols[None, :], 16)
            hit = cols[None, :] == tl.min(top, axis=1)[:, None]
            keep = keep | hit
            work = tl.where(hit, float("-inf"), work)
    kept = tl.where(keep, logits, float("-inf"))
    p = tl.exp(kept - tl.max(kept, axis=1)[:, None])                                  # 0 if dropped
    g = tl.where(rmask[:, None], p / tl.sum(p, axis=1)[:, None], 0.0)               # (BM, 16)
    tl.store(gates_ptr + rows[:, None] * E + cols[None, :], g, mask=rmask[:, None] & gmask[None, :])
    # 2. all experts' down-projections in one product, exact GELU, expert e's columns times g_e
    a = _proj(x_ptr, D, rows, rmask, D, wd_ptr, offs_c * D, cmask, 1, BM, EPR, BK, DOT, PREC)
    a += tl.load(bd_ptr + offs_c, mask=cmask, other=0.0).to(tl.float32)[None, :]
    hid = 0.5 * a * (1.0 + tl.math.erf(a * 0.7071067811865476))                      # exact GELU
    gcol = tl.zeros((BM, EPR), tl.float32)
    for e in tl.static_range(E):  # selects: a reshape to (BM, E, R) would spill registers
        ge = tl.sum(tl.where(cols[None, :] == e, g, 0.0), axis=1)
        gcol = tl.where((offs_c // R)[None, :] == e, ge[:, None], gcol)
    hg = (hid * gcol).to(DOT)                                                           # (BM, EPR)
    # 3. all experts' up-projections at once (K = E*R), gated up biases, residual; BN columns a step
    wu_col = (offs_c // R) * D * R + offs_c % R                                      # Wu[e, 0, r]
    for n0 in range(0, D, BN):
        offs_n = n0 + tl.arange(0, BN)
        nmask = offs_n < D
        wu = tl.load(wu_ptr + wu_col[:, None] + offs_n[None, :] * R,
                     mask=cmask[:, None] & nmask[None, :], other=0.0)                 # (EPR, BN)
        acc = tl.dot(hg, wu.to(DOT), input_precision=PREC)
        bu = tl.load(bu_ptr + cols[:, None] * D + offs_n[None, :],
                     mask=gmask[:, None] & nmask[None, :], other=0.0)                 # (16, BN)
        acc = tl.dot(g.to(DOT), bu.to(DOT), acc, input_precision=PREC)
        ymask = rmask[:, None] & nmask[None, :]
        xt = tl.load(x_ptr + rows[:, None] * D + offs_n[None, :], mask=ymask, other=0.0)
        tl.store(y_ptr + rows[:, None] * D + offs_n[None, :], xt.to(tl.float32) + acc, mask=ymask)


@triton.jit
def _moa_bwd_tokens(  # backward 1: one program per tile of BM tokens
    x_ptr, dy_ptr, gates_ptr, dgates_ptr,  # x, dy (N, D); gates and their gradient (N, E) fp32
    w1_ptr, b1_ptr, w2_ptr, wd_ptr, bd_ptr, wu_ptr, bu_ptr,
    dx_ptr, p1_ptr, p2_ptr,                # out: dx (N, D); P1 (N, E*R + 2H + 16), P2 (N, E*R + 16)
    N, D, temperature,
    H: tl.constexpr, E: tl.constexpr, R: tl.constexpr, EX: tl.constexpr, BM: tl.constexpr,
    BK: tl.constexpr, KC: tl.constexpr, NS: tl.constexpr, HAS_DG: tl.constexpr,
    DOT: tl.constexpr, PREC: tl.constexpr, GATE_PREC: tl.constexpr,
):
    EPS: tl.constexpr = EX * R // NS  # expert columns c = e * R + r per split; c >= E * R: padding
    ER: tl.constexpr = E * R
    rows = (tl.program_id(0) * BM + tl.arange(0, BM)).to(tl.int64)
    rmask = rows < N
    offs_h = tl.arange(0, H)
    cols = tl.arange(0, 16)           # gate columns: E <= 16, padded to 16 for tl.dot
    emask = rmask[:, None] & (cols[None, :] < E)
    P1W: tl.constexpr = ER + 2 * H + 16
    prow = p1_ptr + rows[:, None] * P1W
    g = tl.load(gates_ptr + rows[:, None] * E + cols[None, :], mask=emask, other=0.0)  # (BM, 16)
    tl.store(p2_ptr + rows[:, None] * (ER + 16) + ER + cols[None, :], g, mask=rmask[:, None])
    # the expert columns in NS splits: a = x Wd^T + bd, T = dy Wu_all; da = g T gelu'(a), g h, dg
    dg = tl.zeros((BM, 16), tl.float32)
    for s in tl.static_range(NS):
        offs_c = s * EPS + tl.arange(0, EPS)
        cmask = offs_c < ER
        ecol = offs_c // R
        a = _proj(x_ptr, D, rows, rmask, D, wd_ptr, offs_c * D, cmask, 1, BM, EPS, BK, DOT, PREC)
        a += tl.load(bd_ptr + offs_c, mask=cmask, other=0.0).to(tl.float32)[None, :]
        cdf = 0.5 * (1.0 + tl.math.erf(a * 0.7071067811865476))
        hid, dgelu = a * cdf, cdf + a * tl.exp(-0.5 * a * a) * 0.3989422804014327  # GELU, its slope
        T = _proj(dy_ptr, D, rows, rmask, D, wu_ptr, ecol * D * R + offs_c % R, cmask, R, BM, EPS,
                  BK, DOT, PREC)                                                    # dy Wu_all
        th = T * hid
        gcol = tl.zeros((BM, EPS), tl.float32)
        for e in tl.static_range(s * EPS // R, (s + 1) * EPS // R):  # selects: reshapes spill
            the = tl.sum(tl.where(ecol[None, :] == e, th, 0.0), axis=1)             # <T_e, h_e>
            dg += tl.where(cols[None, :] == e, the[:, None], 0.0)
            ge = tl.sum(tl.where(cols[None, :] == e, g, 0.0), axis=1)
            gcol = tl.where(ecol[None, :] == e, ge[:, None], gcol)        # g_e on e's columns
        smask = rmask[:, None] & cmask[None, :]  # P1 gets da, P2 gets g h
        tl.store(prow + offs_c[None, :], gcol * T * dgelu, mask=smask)
        tl.store(p2_ptr + rows[:, None] * (ER + 16) + offs_c[None, :], gcol * hid, mask=smask)
    dg += _proj(dy_ptr, D, rows, rmask, D, bu_ptr, cols * D, cols < E, 1, BM, 16, BK, DOT, PREC)
    # softmax over the kept experts (dz = 0 off the top_k), temperature, gate layer 2, the ReLU
    if HAS_DG:
        dg += tl.load(dgates_ptr + rows[:, None] * E + cols[None, :], mask=emask, other=0.0)
    dz = g * (dg - tl.sum(g * dg, axis=1)[:, None]) / temperature
    u = _proj(x_ptr, D, rows, rmask, D, w1_ptr, offs_h * D, offs_h < H, 1, BM, H, BK, DOT, GATE_PREC)
    u += tl.load(b1_ptr + offs_h).to(tl.float32)[None, :]
    w2 = tl.load(w2_ptr + cols[:, None] * H + offs_h[None, :], mask=(cols < E)[:, None], other=0.0)
    dv = tl.dot(dz.to(DOT), w2.to(DOT), input_precision=PREC)                     # (BM, H)
    tl.store(prow + ER + offs_h[None, :], tl.where(u > 0, dv, 0.0), mask=rmask[:, None])  # du
    tl.store(prow + ER + H + offs_h[None, :], tl.maximum(u, 0.0), mask=rmask[:, None])    # v
    tl.store(prow + ER + 2 * H + cols[None, :], dz, mask=rmask[:, None])
    # dx = dy + [da | du] [Wd_all; W1], [da | du] read back from P1 (L2): holding it would spill
    tl.debug_barrier()  # other threads of this program stored those
    for k0 in range(0, D, BK):
        offs_k = k0 + tl.arange(0, BK)
        m2 = rmask[:, None] & (offs_k < D)[None, :]
        dx = _proj(p1_ptr, P1W, rows, rmask, ER, wd_ptr, offs_k, offs_k < D, D, BM, BK, KC, DOT, PREC)
        dx += _proj(p1_ptr + ER, P1W, rows, rmask, H, w1_ptr, offs_k, offs_k < D, D, BM, BK, KC, DOT, PREC)
        dyt = tl.load(dy_ptr + rows[:, None] * D + offs_k[None, :], mask=m2, other=0.0)
        tl.store(dx_ptr + rows[:, None] * D + offs_k[None, :], dyt.to(tl.float32) + dx, mask=m2)


@triton.jit
def _tile(a_ptr, lda, b_ptr, ldb, M, K, t_lo, t_hi, rows, cols, BW: tl.constexpr, BD: tl.constexpr,
          BT: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr):
    """A[:, rows]^T B[:, cols] and A[:, rows]'s column sums over tokens t_lo..t_hi, last first."""
    acc = tl.zeros((BW, BD), tl.float32)
    bias = tl.zeros((BW,), tl.float32)
    num_t = tl.cdiv(t_hi - t_lo, BT)
    for i in range(0, num_t):
        toks = (t_lo + (num_t - 1 - i) * BT + tl.arange(0, BT)).to(tl.int64)
        a = tl.load(a_ptr + toks[:, None] * lda + rows[None, :],
                    mask=(toks < t_hi)[:, None] & (rows < M)[None, :], other=0.0)    # (BT, BW)
        b = tl.load(b_ptr + toks[:, None] * ldb + cols[None, :],
                    mask=(toks < t_hi)[:, None] & (cols < K)[None, :], other=0.0)    # (BT, BD)
        acc = tl.dot(tl.trans(a.to(DOT)), b.to(DOT), acc, input_precision=PREC)
        bias += tl.sum(a.to(tl.float32), axis=0)
    return acc, bias


@triton.jit
def _moa_bwd_weights(
    x_ptr, dy_ptr, p1_ptr, p2_ptr,  # x, dy (N, D); scratch P1 (N, E*R + 2H + 16), P2 (N, E*R + 16)
    gw1_ptr, gb1_ptr, gw2_ptr, gb2_ptr, gwd_ptr, gbd_ptr, gwu_ptr, gbu_ptr,  # the 8 gradients
    N, D, n1, n2, split_stride,                # programs: [0, n1) [dWd; dW1], then n2 dWu, dWg2
    H: tl.constexpr, E: tl.constexpr, R: tl.constexpr, EX: tl.constexpr, BW: tl.constexpr,
    BD: tl.constexpr, BT: tl.constexpr, CHUNK: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr,
    GATE_PREC: tl.constexpr,
):
    ER: tl.constexpr = E * R
    P1W: tl.constexpr = ER + 2 * H + 16
    pid = tl.program_id(0)
    t_lo = (tl.num_programs(1) - 1 - tl.program_id(1)) * CHUNK  # last first: kernel 1 ended there (L2)
    t_hi = tl.minimum(N, t_lo + CHUNK)
    copy = tl.program_id(1).to(tl.int64) * split_stride  # where this chunk's copy starts
    if pid < n1 + n2:  # [dWd_all; dW1] = [da | du]^T x (pid < n1), [dWu; dbu] = [g h | g]^T dy
        one = pid < n1
        q = tl.where(one, pid, pid - n1)
        rows = q // tl.cdiv(D, BD) * BW + tl.arange(0, BW)
        cols = q % tl.cdiv(D, BD) * BD + tl.arange(0, BD)
        M = tl.where(one, ER + H, ER + E)
        acc, bias = _tile(tl.where(one, p1_ptr, p2_ptr), tl.where(one, P1W, ER + 16),
                          tl.where(one, x_ptr, dy_ptr), D, M, D, t_lo, t_hi, rows, cols, BW, BD, BT, DOT, PREC)
        lo = rows < ER  # rows c = e * R + r of the experts, then the gate's or the up biases'
        out = tl.where(one, tl.where(lo, gwd_ptr + rows * D, gw1_ptr + (rows - ER) * D),
                       tl.where(lo, gwu_ptr + rows // R * D * R + rows % R, gbu_ptr + (rows - ER) * D))
        step = tl.where(lo & ~one, R, 1)  # up_w is (E, D, R): its d runs with stride R
        tl.store((out + copy)[:, None] + cols[None, :] * step[:, None], acc,
                 mask=(rows < M)[:, None] & (cols < D)[None, :])
        bias_ptr = tl.where(lo, gbd_ptr + rows, gb1_ptr + rows - ER)  # dbd, dbg1: column sums
        tl.store(bias_ptr + copy, bias, mask=one & (rows < M) & (q % tl.cdiv(D, BD) == 0))
    else:  # dWg2 (E, H) = dz^T v, dbg2 = column sums of dz; E <= 16 <= BW: one row block
        rows = tl.arange(0, BW)
        cols = (pid - n1 - n2) * BD + tl.arange(0, BD)
        acc, bias = _tile(p1_ptr + ER + 2 * H, P1W, p1_ptr + ER + H, P1W, E, H, t_lo, t_hi, rows, cols,
                          BW, BD, BT, DOT, PREC)
        tl.store(gw2_ptr + copy + rows[:, None] * H + cols[None, :], acc,
                 mask=(rows < E)[:, None] & (cols < H)[None, :])
        tl.store(gb2_ptr + copy + rows, bias, mask=(rows < E) & (pid == n1 + n2))


# -----------------------------------------------------------------------------
# Launch parameters, validation, autograd
@functools.lru_cache(maxsize=None)  # called on every forward: pure, so computed once per shape
def launch_params(arch, dot, xdt, wdt, D, H, E, R):
    """{kernel: (constexprs, num_warps, num_stages)}. arch: 80 (A100), 90 (H100) or None (the
    interpreter); dot: the matmul dtype; xdt, wdt: x's and the weights'. See docs/kernel.md."""
    EX = triton.next_power_of_2(E)
    EPR = EX * R
    half, sm90 = dot != torch.float32, arch is not None and arch >= 90  # (the interpreter: no warps, stages)
    prec = "tf32" if arch is not None and not half else "ieee"
    c = dict(H=H, E=E, R=R, EX=EX, DOT=TL[dot], PREC=prec, GATE_PREC="tf32x3" if prec == "tf32" else prec)
    wide = max(torch.finfo(xdt).bits, torch.finfo(wdt).bits) // 8  # bytes per loaded element
    if EPR <= 256 and half:
        fwd = dict(c, BM=64, BK=64, BN=64 if EPR * wide <= 512 else 32)
    elif EPR <= 512:
        fwd = dict(c, BM=32, BK=64 if wide == 2 or EPR <= 256 else 32, BN=32)
    else:
        fwd = dict(c, BM=16, BK=16, BN=16)  # (BK 32 spilled 24 bytes on sm_80 under triton 3.8)
    few = half and EPR <= 256  # 16-bit, E R <= 256: 4 warps, splits of 64 columns (or one expert)
    tok = dict(c, BM=16, BK=64 if EPR * wide <= 1024 else 32, KC=64, NS=triton.cdiv(EPR, max(R, 64) if few else 256))
    wts = dict(c, BW=64, BD=64, BT=64 if wide == 2 or half else 32, CHUNK=4096)  # see weight_grid
    return {"fwd": (fwd, 8, 3 if sm90 and EPR <= 512 and half else 2),
            "bwd_tokens": (tok, 4 if few else 8, 2), "bwd_weights": (wts, 4, 4 if sm90 else 3)}


def _new(shape, like, dtype=None):  # an output buffer, NaN when the tests set POISON
    out = torch.empty(shape, dtype=dtype or like.dtype, device=like.device)
    return out.fill_(float("nan")) if POISON else out


class FusedMoA(torch.autograd.Function):
    """Saves x, the gates and the weights; the backward recomputes the rest."""

    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2, wd, bd, wu, bu, top_k, temperature):
        weights = [t.contiguous() for t in (w1, b1, w2, b2, wd, bd, wu, bu)]
        x2 = x.reshape(-1, x.shape[-1]).contiguous()                                   # (N, D)
        (N, D), H, E, R = x2.shape, w1.shape[0], w2.shape[0], wd.shape[1]
        y, gates = _new((N, D), x2), _new((N, E), x2, torch.float32)
        ctx.dot = x.dtype if x.is_cuda else torch.float32  # the matmul dtype; interpreter: fp32
        if x.is_cuda and x.dtype == torch.float32 and torch.is_autocast_enabled("cuda"):
            ctx.dot = torch.get_autocast_dtype("cuda")  # (autocast is off in backward: keep it)
        arch = _capability(x.device)[0] * 10 if x.is_cuda else None  # None: the interpreter
        ctx.params = launch_params(arch, ctx.dot, x.dtype, w1.dtype, D, H, E, R)
        meta, warps, stages = ctx.params["fwd"]
        _moa_fwd_kernel[(math.ceil(N / meta["BM"]),)](  # (a grid of 0 programs launches nothing)
            x2, *weights, y, gates, N, D, float(temperature), TOP_K=top_k, num_warps=warps,
            num_stages=stages, **meta)
        ctx.save_for_backward(x2, gates, *weights)
        ctx.temperature, ctx.x_shape = temperature, x.shape
        ctx.set_materialize_grads(False)  # an unused output's gradient is None: no zeros launch
        return y.reshape(x.shape), gates.reshape(*x.shape[:-1], E)

    @staticmethod
    def backward(ctx, dy, dgates):  # dgates is None unless the gates were used
        x, gates, *weights = ctx.saved_tensors
        w1, b1, w2, b2, wd, bd, wu, bu = weights
        (N, D), H, E, R = x.shape, w1.shape[0], w2.shape[0], wd.shape[1]
        dx = _new((N, D), x)
        dy = torch.zeros_like(x) if dy is None else dy.reshape(N, D).contiguous()
        p1 = _new((N, E * R + 2 * H + 16), x, ctx.dot)  # [da | du | v | dz] in the matmul dtype
        p2 = _new((N, E * R + 16), x, ctx.dot)          # [g h | g]
        meta, warps, stages = ctx.params["bwd_tokens"]
        dgx = gates if dgates is None else dgates.reshape(N, E).contiguous()  # a dummy when unused
        _moa_bwd_tokens[(math.ceil(N / meta["BM"]),)](
            x, dy, gates, dgx, w1, b1, w2, wd, bd, wu, bu, dx, p1, p2, N, D, float(ctx.temperature),
            HAS_DG=dgates is not None, num_warps=warps, num_stages=stages, **meta)
        meta, warps, stages = ctx.params["bwd_weights"]
        n1, n2, n3 = weight_grid(meta, D, H, E, R)
        chunks, sizes = max(1, math.ceil(N / meta["CHUNK"])), [t.numel() for t in weights]
        flat = _new((chunks, sum(sizes)), x, torch.float32)  # fp32 gradients, a copy per chunk
        _moa_bwd_weights[(n1 + n2 + n3, chunks)](x, dy, p1, p2, *flat[0].split(sizes), N, D, n1, n2, sum(sizes),
                                                 num_warps=warps, num_stages=stages, **meta)
        # the chunks' copies summed in a fixed order (no atomics): reproducible; fp32 weights, one chunk: no op
        flat = (flat.sum(0, keepdim=True) if chunks > 1 else flat).to(w1.dtype)
        grads = [p.view(t.shape) for p, t in zip(flat[0].split(sizes), weights)]
        return dx.reshape(ctx.x_shape), *grads, None, None


def fused_moa(x, gate_w1, gate_b1, gate_w2, gate_b2, down_w, down_b, up_w, up_b, top_k, temperature):
    """moa.moa_reference's signature and semantics, differentiable in x and the 8 weights: returns
    (y like x, gates (..., E) fp32). A ValueError names the first bad argument."""
    if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.dtype not in TL:
        raise ValueError(f"x must be a float32/float16/bfloat16 tensor (..., D), got {x!r:.60}")
    D, H, E, R = x.shape[-1], len(gate_w1), len(gate_w2), down_w.shape[1] if down_w.dim() == 3 else 0
    if D == 0 or D % 16 or not {H, R} <= {16, 32, 64, 128} or not 1 <= E <= 16 \
            or triton.next_power_of_2(E) * R > 1024:  # beyond, the up-projection outgrows smem
        raise ValueError("need D a multiple of 16, H and R in (16, 32, 64, 128), 1 <= E <= 16, "
                         f"E R <= 1024; got D={D}, H={H}, R={R}, E={E}")
    shapes = ((H, D), (H,), (E, H), (E,), (E, R, D), (E, R), (E, D, R), (E, D))
    weights = (gate_w1, gate_b1, gate_w2, gate_b2, down_w, down_b, up_w, up_b)
    for name, t, shape in zip(NAMES[1:], weights, shapes):
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
        if t.dtype != gate_w1.dtype or t.dtype not in (x.dtype, torch.float32):
            raise ValueError(f"{name}.dtype is {t.dtype}: the weights need one dtype, x's or fp32")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= E:
        raise ValueError(f"top_k must be an int in [1, E={E}], got {top_k!r}")
    if not isinstance(temperature, (int, float)) or not 0 < temperature < float("inf"):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if x.device.type != "cuda" and not INTERPRET:
        raise ValueError("CPU tensors need TRITON_INTERPRET=1 set before importing kernels/")
    return FusedMoA.apply(x, *weights, top_k, temperature)


def weight_grid(meta, D, H, E, R):
    """Programs of _moa_bwd_weights: [dWd_all; dW1] tiles, [dWu; dbu] tiles, dWg2 tiles."""
    n1 = math.ceil((E * R + H) / meta["BW"]) * math.ceil(D / meta["BD"])
    return n1, math.ceil((E * R + E) / meta["BW"]) * math.ceil(D / meta["BD"]), math.ceil(H / meta["BD"])


if __name__ == "__main__":
    from kernels.report import main
    main()
