"""
Backward of the fused MoA layer (companion of fused_moa.py; formulas from ../shared/docs/kernel-design.md 3.2).

What you will learn:
  * recompute instead of store: the forward saves only its inputs; each program re-runs the shared X pass and the
    routing (the same @triton.jit helpers, so the recomputed top-k is exactly the forward's).
  * the gate gradient without expert outputs (the SonicMoE trick): dg_e = <dy, o_e> = <T_e, h_e> + <dy, bu_e>
    with T = dy Wu_all, an R-wide quantity the down-projection gradient needs anyway.
  * softmax backward over the kept logits only: dl_e = g_e (dg_e - sum_j g_j dg_j), zero off the top_k.
  * deterministic weight gradients without atomics: a persistent grid of P programs, each walking the token tiles
    pid, pid + P, ... and accumulating into its own fp32 slice of a (P, ...) buffer (load, add, store; the first
    tile stores without loading). A torch .sum(0) over P finishes the reduction.
"""
import torch
import triton
import triton.language as tl

from kernels.fused_moa import _new, _route, _x_pass, launch_config


@triton.jit
def _acc(ptr, val, mask, first):
    """Add val to this program's private partial sums at ptr (store only, on its first tile)."""
    prev = tl.load(ptr, mask=mask & (first == 0), other=0.0)
    tl.store(ptr, prev + val, mask=mask)


@triton.jit
def _moa_bwd_kernel(
    x_ptr, dy_ptr,      # (N, D) forward input and the gradient of y
    dgx_ptr,            # (N, E) fp32 gradient of the returned gates (read only when HAS_DG)
    w1_ptr, b1_ptr, w2_ptr, b2_ptr, wd_ptr, bd_ptr, wu_ptr, bu_ptr,  # the eight weights, as in the forward
    dx_ptr,             # (N, D) output: gradient of x, x's dtype
    pw1_ptr, pb1_ptr,   # (P, H, D), (P, H) fp32 partial sums for gate_w1, gate_b1
    pw2_ptr, pb2_ptr,   # (P, E, H), (P, E) partials for gate_w2, gate_b2
    pwd_ptr, pbd_ptr,   # (P, E, R, D), (P, E, R) partials for down_w, down_b
    pwu_ptr, pbu_ptr,   # (P, E, D, R), (P, E, D) partials for up_w, up_b
    N, D,               # tokens, width
    temperature,        # softmax temperature
    num_tiles,          # cdiv(N, BM); this program handles tiles pid, pid + P, ...
    H: tl.constexpr, E: tl.constexpr, R: tl.constexpr, EX: tl.constexpr, TOP_K: tl.constexpr,  # as forward
    BM: tl.constexpr, BK: tl.constexpr,                # token tile, D chunk
    HAS_DG: tl.constexpr,                              # whether the gates output received a gradient
    DOT: tl.constexpr, PREC: tl.constexpr, GATE_PREC: tl.constexpr,  # dot dtype and precisions, as forward
):
    EPR: tl.constexpr = EX * R
    ER: tl.constexpr = E * R
    pid = tl.program_id(0)
    P = tl.num_programs(0)
    offs_h = tl.arange(0, H)
    cols = tl.arange(0, EX)
    offs_c = tl.arange(0, EPR)
    cmask = offs_c < ER
    wu_col = (offs_c // R) * D * R + (offs_c % R)     # up_w[e, 0, r] for packed column c = e*R + r
    # this program's private slices of the partial-sum buffers
    me = pid.to(tl.int64)
    pw1_ptr += me * H * D
    pb1_ptr += me * H
    pw2_ptr += me * E * H
    pb2_ptr += me * E
    pwd_ptr += me * ER * D
    pbd_ptr += me * ER
    pwu_ptr += me * ER * D
    pbu_ptr += me * E * D
    for tile in range(pid, num_tiles, P):
        first = (tile == pid).to(tl.int32)
        rows = (tile * BM + tl.arange(0, BM)).to(tl.int64)
        row_mask = rows < N
        # recompute the forward: u, v, gates, a, GELU and its derivative
        u, a = _x_pass(x_ptr, w1_ptr, wd_ptr, rows, row_mask, D, H, ER, EPR, BM, BK, DOT, PREC, GATE_PREC)
        u, v, g = _route(u, b1_ptr, w2_ptr, b2_ptr, row_mask, temperature, H, E, EX, TOP_K, BM)
        a = a + tl.load(bd_ptr + offs_c, mask=cmask, other=0.0).to(tl.float32)[None, :]
        cdf = 0.5 * (1.0 + tl.math.erf(a * 0.7071067811865476))
        hid = a * cdf
        dgelu = cdf + a * tl.exp(-0.5 * a * a) * 0.3989422804014327                # Phi(a) + a phi(a)
        gcol = tl.reshape(tl.reshape(tl.zeros((BM, EPR), tl.float32), (BM, EX, R)) + g[:, :, None], (BM, EPR))
        # T = dy Wu_all (BM, E*R) and dyb = dy Bu^T (BM, E), one pass over D
        T = tl.zeros((BM, EPR), tl.float32)
        dyb = tl.zeros((BM, EX), tl.float32)
        for k0 in range(0, D, BK):
            offs_k = k0 + tl.arange(0, BK)
            kmask = offs_k < D
            dyt = tl.load(dy_ptr + rows[:, None] * D + offs_k[None, :], mask=row_mask[:, None] & kmask[None, :],
                          other=0.0).to(tl.float32)                                 # (BM, BK)
            wut = tl.load(wu_ptr + wu_col[None, :] + offs_k[:, None] * R, mask=kmask[:, None] & cmask[None, :],
                          other=0.0).to(tl.float32)                                 # (BK, EPR)
            T = tl.dot(dyt.to(DOT), wut.to(DOT), T, input_precision=PREC)
            for e in tl.static_range(E):
                bu = tl.load(bu_ptr + e * D + offs_k, mask=kmask, other=0.0).to(tl.float32)
                dyb += tl.where(cols[None, :] == e, tl.sum(dyt * bu[None, :], axis=1)[:, None], 0.0)
        # gate value gradient, softmax over the kept logits, temperature
        dg = tl.sum(tl.reshape(T * hid, (BM, EX, R)), axis=2) + dyb                    # (BM, EX)
        if HAS_DG:
            dg += tl.load(dgx_ptr + rows[:, None] * E + cols[None, :],
                          mask=row_mask[:, None] & (cols[None, :] < E), other=0.0)
        dz = g * (dg - tl.sum(g * dg, axis=1)[:, None]) / temperature                 # zero off the top_k
        # gate layer 2 backward (tiny: per expert row reductions) and layer 1 through the ReLU
        dv = tl.zeros((BM, H), tl.float32)
        for e in tl.static_range(E):
            dze = tl.sum(tl.where(cols[None, :] == e, dz, 0.0), axis=1)               # (BM,)
            w2 = tl.load(w2_ptr + e * H + offs_h).to(tl.float32)
            dv += dze[:, None] * w2[None, :]
            _acc(pw2_ptr + e * H + offs_h, tl.sum(dze[:, None] * v, axis=0), offs_h < H, first)
        _acc(pb2_ptr + cols, tl.sum(dz, axis=0), cols < E, first)
        du = tl.where(u > 0, dv, 0.0)                                                 # (BM, H)
        _acc(pb1_ptr + offs_h, tl.sum(du, axis=0), offs_h < H, first)
        # expert backward: da = g T gelu'(a); the up-projection sees the gated hidden g h
        da = gcol * T * dgelu                                                         # (BM, E*R)
        hg = gcol * hid
        _acc(pbd_ptr + offs_c, tl.sum(da, axis=0), cmask, first)
        da_d, du_d, hg_d = da.to(DOT), du.to(DOT), hg.to(DOT)
        # second pass over D: dx = dy + da Wd_all + du W1, and every (., D)-shaped weight gradient
        for k0 in range(0, D, BK):
            offs_k = k0 + tl.arange(0, BK)
            kmask = offs_k < D
            m2 = row_mask[:, None] & kmask[None, :]
            xt = tl.load(x_ptr + rows[:, None] * D + offs_k[None, :], mask=m2, other=0.0).to(tl.float32)
            dyt = tl.load(dy_ptr + rows[:, None] * D + offs_k[None, :], mask=m2, other=0.0).to(tl.float32)
            wd = tl.load(wd_ptr + offs_c[:, None] * D + offs_k[None, :], mask=cmask[:, None] & kmask[None, :],
                         other=0.0).to(tl.float32)                                  # (EPR, BK)
            w1 = tl.load(w1_ptr + offs_h[:, None] * D + offs_k[None, :], mask=kmask[None, :],
                         other=0.0).to(tl.float32)                                  # (H, BK)
            dxt = dyt + tl.dot(da_d, wd.to(DOT), input_precision=PREC)
            dxt = tl.dot(du_d, w1.to(DOT), dxt, input_precision=GATE_PREC)
            tl.store(dx_ptr + rows[:, None] * D + offs_k[None, :], dxt, mask=m2)
            x_d, dy_d = xt.to(DOT), dyt.to(DOT)
            wmask = cmask[:, None] & kmask[None, :]
            _acc(pwd_ptr + offs_c[:, None] * D + offs_k[None, :],
                 tl.dot(tl.trans(da_d), x_d, input_precision=PREC), wmask, first)           # da^T x
            _acc(pw1_ptr + offs_h[:, None] * D + offs_k[None, :],
                 tl.dot(tl.trans(du_d), x_d, input_precision=GATE_PREC), kmask[None, :], first)  # du^T x
            _acc(pwu_ptr + wu_col[:, None] + offs_k[None, :] * R,
                 tl.dot(tl.trans(hg_d), dy_d, input_precision=PREC), wmask, first)          # (g h)^T dy
            for e in tl.static_range(E):
                ge = tl.sum(tl.where(cols[None, :] == e, g, 0.0), axis=1)
                _acc(pbu_ptr + e * D + offs_k, tl.sum(ge[:, None] * dyt, axis=0), kmask, first)


def moa_backward(dy, dgates, x, weights, top_k, temperature):
    """Gradients of (x, gate_w1, gate_b1, gate_w2, gate_b2, down_w, down_b, up_w, up_b), given dy (like y) and
    dgates (like gates, or None). x and weights are the validated, contiguous forward inputs; x is (N, D)."""
    w1, b1, w2, b2, wd, bd, wu, bu = weights
    N, D = x.shape
    H, E, R = w1.shape[0], w2.shape[0], wd.shape[1]
    meta, warps, stages = launch_config(x, H, E, R, D, backward=True)
    num_tiles = triton.cdiv(N, meta["BM"])
    if x.is_cuda:   # one program per SM keeps the partial buffers at P * |weights| (about 0.26 GB at E=4, fp32)
        P = min(num_tiles, torch.cuda.get_device_properties(x.device).multi_processor_count)
    else:           # the interpreter runs programs one by one; few programs also exercise the multi-tile path
        P = min(num_tiles, 4)
    P = max(P, 1)
    dy = dy.reshape(N, D).contiguous()
    dx = _new((N, D), x)
    f32 = torch.float32
    parts = [_new((P,) + tuple(t.shape), x, f32) for t in weights]
    if N == 0:
        return [torch.zeros_like(x)] + [torch.zeros_like(t) for t in weights]
    has_dg = dgates is not None
    dgx = dgates.reshape(N, E).to(f32).contiguous() if has_dg else dx  # dummy pointer when unused
    _moa_bwd_kernel[(P,)](x, dy, dgx, *weights, dx, *parts, N, D, float(temperature), num_tiles,
                          H=H, E=E, R=R, TOP_K=top_k, HAS_DG=has_dg, num_warps=warps,
                          num_stages=stages, **meta)
    return [dx] + [p.sum(0).to(t.dtype) for p, t in zip(parts, weights)]
