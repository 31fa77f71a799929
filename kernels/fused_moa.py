"""
The Mixture-of-Adapters layer of moa.py fused in Triton (design: docs/kernel.md). Per token x:

    logits = (relu(x W1^T + b1) W2^T + b2) / temperature;  g = softmax over the top_k logits
    y = x + sum_e g_e * (gelu(x Wd_e^T + bd_e) Wu_e^T + bu_e)       (E experts e of rank R)

Launches: the forward 1; the backward 2 (token tiles, then weight tiles with fixed-order sums, no
atomics), and a third above 4,096 tokens (one sum).
Use: y, gates = fused_moa(x, *weights, top_k, temperature).
The launch parameters come from the GPU's own limits (launch_params); `python -m kernels.report` compiles
them for each supported architecture without a GPU and reads ptxas's registers, spills and shared memory.
"""

import contextlib
import functools

# host-side grids: math.ceil, as triton.cdiv costs microseconds per call in Python
import math
import os

import torch
import triton
import triton.language as tl
from triton.errors import TritonError

# read once: the kernels are built at import
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# tests set it: new buffers are NaN, so an element a kernel forgets to write shows
POISON = False
NAMES = ("x", "gate_w1", "gate_b1", "gate_w2", "gate_b2", "down_w", "down_b", "up_w", "up_b")
TL = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}
# CUDA's limit on a grid's second dimension: the weight kernel's token chunks
GRID_Y_MAX = 65535
# bytes: every pointer a kernel gets is 16-byte aligned, as the compile report assumes
ALIGN = 16
# opt-in shared memory per block (bytes) of the GPU classes the compile report checks. A GPU gets the tiles of
# the largest class that fits.
SMEM_H100 = 232448  # H100, H200, B200
SMEM_A100 = 166912
SMEM_RTX = 101376  # RTX 30/40/50, A6000, L4, L40
SMEM_T4 = 65536
SMEM_CLASSES = (SMEM_H100, SMEM_A100, SMEM_RTX, SMEM_T4)
# the gate's hidden width H and the experts' rank R the kernel takes
WIDTHS = (16, 32, 64, 128)
# a GPU launches what the compile report compiles: every R of WIDTHS, E in GPU_EXPERTS, H = GPU_GATE_HIDDEN.
# Other shapes are NotSupported on a GPU; the interpreter, with no registers to spill, takes them all.
GPU_EXPERTS = (1, 2, 4, 8, 16)
GPU_GATE_HIDDEN = 128
# --moa-impl auto runs the kernel from sm_80 on. On sm_75 triton lowers tl.dot to FMA instructions where
# PyTorch's fp16 matmuls use tensor cores, and no measurement shows the kernel faster there.
AUTO_MIN_ARCH = 80


class NotSupported(ValueError):
    """The kernel cannot run this call here (GPU too old, shape outside its range, no tiles fit): moa.MoA's
    --moa-impl auto then runs the PyTorch MoA instead. The message says why."""


# what moa.MoA's --moa-impl auto answers with the PyTorch MoA: the kernel cannot run this call on this GPU.
# TritonError covers OutOfResources at launch and a compiler or ptxas failure.
CANNOT_RUN = (NotSupported, TritonError)


# -----------------------------------------------------------------------------
# The kernels: a matmul helper, the forward, the backward over token tiles, the backward over weight tiles.
# In the @triton.jit helpers, UPPER_CASE arguments are the kernels' compile-time constants, passed on.
@triton.jit
def _rows_times_weights(
    # A = src[rows, :K], rows src_stride apart
    src_ptr,
    src_stride,
    rows,
    row_mask,
    K,
    # B: element (k, c) at w_ptr + w_col_offsets[c] + k * w_k_stride
    w_ptr,
    w_col_offsets,
    w_col_mask,
    w_k_stride,
    # BK columns of K a step
    BK,
    # the matmul dtype and tl.dot's input precision
    DOT,
    PREC,
):
    """(BM, NC) fp32 = A @ B, A (BM, K) and B (K, NC) with BM rows and NC column offsets. The strides let one
    helper read W1, Wd and Wu (E, D, R) transposed in place."""
    acc = tl.zeros((rows.shape[0], w_col_offsets.shape[0]), tl.float32)
    for k0 in range(0, K, BK):
        offs_k = k0 + tl.arange(0, BK)
        k_mask = offs_k < K
        a = tl.load(
            src_ptr + rows[:, None] * src_stride + offs_k[None, :],
            mask=row_mask[:, None] & k_mask[None, :],
            other=0.0,
        )  # (BM, BK)
        b = tl.load(
            w_ptr + w_col_offsets[None, :] + offs_k[:, None] * w_k_stride,
            mask=k_mask[:, None] & w_col_mask[None, :],
            other=0.0,
        )  # (BK, NC)
        acc = tl.dot(a.to(DOT), b.to(DOT), acc, input_precision=PREC)
    return acc


# -----------------------------------------------------------------------------
# The forward
# N % 16 unspecialised, as the report compiles it; top_k a runtime loop: one binary serves every top_k
@triton.jit(do_not_specialize=["N", "top_k"])
def _moa_fwd_kernel(
    # x (N, D); the gate W1 (H, D), b1 (H,), W2 (E, H), b2 (E,)
    x_ptr,
    w1_ptr,
    b1_ptr,
    w2_ptr,
    b2_ptr,
    # the experts: Wd (E, R, D) = (E*R, D), bd (E, R), Wu (E, D, R), bu (E, D)
    wd_ptr,
    bd_ptr,
    wu_ptr,
    bu_ptr,
    # outputs: y (N, D) in x's dtype, gates (N, E) fp32
    y_ptr,
    gates_ptr,
    N,
    D,
    temperature,
    top_k,
    # shapes; EX is E rounded up to a power of 2
    H: tl.constexpr,
    E: tl.constexpr,
    R: tl.constexpr,
    EX: tl.constexpr,
    # tiles: BM tokens per program, BK columns of D per step, BN output columns per step
    BM: tl.constexpr,
    BK: tl.constexpr,
    BN: tl.constexpr,
    DOT: tl.constexpr,
    PREC: tl.constexpr,
    GATE_PREC: tl.constexpr,
):
    """The forward: one program per tile of BM tokens, dense over the experts."""
    # packed expert columns c = e * R + r; c >= E * R is padding
    EXPERT_COLS: tl.constexpr = EX * R
    rows = (tl.program_id(0) * BM + tl.arange(0, BM)).to(tl.int64)
    row_mask = rows < N
    offs_h = tl.arange(0, H)
    offs_c = tl.arange(0, EXPERT_COLS)
    col_mask = offs_c < E * R
    # the gate's columns: E <= 16, padded to 16 for tl.dot
    experts = tl.arange(0, 16)
    expert_mask = experts < E

    # 1. the gate MLP: u = x W1^T + b1, v = relu(u), logits = (v W2^T + b2) / temperature
    u = _rows_times_weights(
        x_ptr, D, rows, row_mask, D, w1_ptr, offs_h * D, offs_h < H, 1, BK, DOT, GATE_PREC
    )
    v = tl.maximum(u + tl.load(b1_ptr + offs_h).to(tl.float32)[None, :], 0.0)  # (BM, H)
    w2 = tl.load(w2_ptr + experts[None, :] * H + offs_h[:, None], mask=expert_mask[None, :], other=0.0)
    z = tl.dot(v.to(DOT), w2.to(DOT), input_precision=GATE_PREC)  # (BM, 16)
    b2 = tl.load(b2_ptr + experts, mask=expert_mask, other=0.0).to(tl.float32)
    logits = (z + b2[None, :]) / temperature

    # 2. top-k: top_k rounds of "row max, lowest column holding it" (ties go to the lower expert); softmax
    remaining = tl.where(expert_mask[None, :], logits, float("-inf"))
    keep = tl.zeros((BM, 16), tl.int1)
    for _ in range(top_k):
        at_max = tl.where(remaining == tl.max(remaining, axis=1)[:, None], experts[None, :], 16)
        chosen = experts[None, :] == tl.min(at_max, axis=1)[:, None]
        keep = keep | chosen
        remaining = tl.where(chosen, float("-inf"), remaining)
    kept = tl.where(keep, logits, float("-inf"))
    p = tl.exp(kept - tl.max(kept, axis=1)[:, None])  # 0 where dropped
    gates = tl.where(row_mask[:, None], p / tl.sum(p, axis=1)[:, None], 0.0)  # (BM, 16)
    tl.store(
        gates_ptr + rows[:, None] * E + experts[None, :], gates, mask=row_mask[:, None] & expert_mask[None, :]
    )

    # 3. every expert's down-projection in one product (Wd is one (E*R, D) matrix), exact GELU, gate scaling
    a = _rows_times_weights(x_ptr, D, rows, row_mask, D, wd_ptr, offs_c * D, col_mask, 1, BK, DOT, PREC)
    a += tl.load(bd_ptr + offs_c, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    hidden = 0.5 * a * (1.0 + tl.math.erf(a * 0.7071067811865476))  # (BM, EX*R)
    # each expert's gate on its R columns; static selects, since a reshape to (BM, E, R) spills registers
    gate_on_col = tl.zeros((BM, EXPERT_COLS), tl.float32)
    for e in tl.static_range(E):
        gate_e = tl.sum(tl.where(experts[None, :] == e, gates, 0.0), axis=1)
        gate_on_col = tl.where((offs_c // R)[None, :] == e, gate_e[:, None], gate_on_col)
    gated_hidden = (hidden * gate_on_col).to(DOT)  # (BM, EX*R)

    # 4. every expert's up-projection at once (K = E*R), the gated up biases, the residual: BN columns a step
    wu_col = (offs_c // R) * D * R + offs_c % R  # where Wu[e, 0, r] is
    for n0 in range(0, D, BN):
        offs_n = n0 + tl.arange(0, BN)
        n_mask = offs_n < D
        wu = tl.load(
            wu_ptr + wu_col[:, None] + offs_n[None, :] * R,
            mask=col_mask[:, None] & n_mask[None, :],
            other=0.0,
        )  # (EX*R, BN)
        acc = tl.dot(gated_hidden, wu.to(DOT), input_precision=PREC)
        bu = tl.load(
            bu_ptr + experts[:, None] * D + offs_n[None, :],
            mask=expert_mask[:, None] & n_mask[None, :],
            other=0.0,
        )  # (16, BN)
        acc = tl.dot(gates.to(DOT), bu.to(DOT), acc, input_precision=PREC)
        y_mask = row_mask[:, None] & n_mask[None, :]
        x_tile = tl.load(x_ptr + rows[:, None] * D + offs_n[None, :], mask=y_mask, other=0.0)
        tl.store(y_ptr + rows[:, None] * D + offs_n[None, :], x_tile.to(tl.float32) + acc, mask=y_mask)


# -----------------------------------------------------------------------------
# Backward 1: dx and the per-token factors of the weight gradients, over token tiles
@triton.jit(do_not_specialize=["N", "has_dgates"])
def _moa_bwd_tokens(
    # x, dy (N, D); the gates and their gradient (N, E) fp32
    x_ptr,
    dy_ptr,
    gates_ptr,
    dgates_ptr,
    # the 8 weights (b2 unused)
    w1_ptr,
    b1_ptr,
    w2_ptr,
    b2_ptr,
    wd_ptr,
    bd_ptr,
    wu_ptr,
    bu_ptr,
    # outputs: dx (N, D); P1 (N, E*R + 2H + 16) = [da | du | v | dz], P2 (N, E*R + 16) = [g h | g]
    dx_ptr,
    p1_ptr,
    p2_ptr,
    N,
    D,
    temperature,
    # 1 if the gates were used (dgates_ptr holds their gradient), else 0: a runtime flag, one binary for both
    has_dgates,
    H: tl.constexpr,
    E: tl.constexpr,
    R: tl.constexpr,
    EX: tl.constexpr,
    # tiles: BM tokens per program, BK columns of D a step, the expert columns in NS splits, KC for dx
    BM: tl.constexpr,
    BK: tl.constexpr,
    KC: tl.constexpr,
    NS: tl.constexpr,
    DOT: tl.constexpr,
    PREC: tl.constexpr,
    GATE_PREC: tl.constexpr,
):
    """Backward 1: one program per tile of BM tokens computes dx and the per-token factors of the weight
    gradients (P1, P2), which the weight kernel sums over tokens."""
    # expert columns c = e * R + r per split; c >= E * R: padding
    SPLIT_COLS: tl.constexpr = EX * R // NS
    EXPERT_COLS: tl.constexpr = E * R
    P1_WIDTH: tl.constexpr = E * R + 2 * H + 16
    P2_WIDTH: tl.constexpr = E * R + 16
    rows = (tl.program_id(0) * BM + tl.arange(0, BM)).to(tl.int64)
    row_mask = rows < N
    offs_h = tl.arange(0, H)
    # the gate's columns: E <= 16, padded to 16 for tl.dot
    experts = tl.arange(0, 16)
    gate_mask = row_mask[:, None] & (experts[None, :] < E)
    p1_rows = p1_ptr + rows[:, None] * P1_WIDTH
    p2_rows = p2_ptr + rows[:, None] * P2_WIDTH

    # 1. the saved gates (they fix the top-k: the routing is not recomputed); P2's last 16 columns hold them
    gates = tl.load(gates_ptr + rows[:, None] * E + experts[None, :], mask=gate_mask, other=0.0)  # (BM, 16)
    tl.store(p2_rows + EXPERT_COLS + experts[None, :], gates, mask=row_mask[:, None])

    # 2. the expert columns, NS splits of SPLIT_COLS: a = x Wd^T + bd, T = dy Wu (all experts);
    #    dgate_e = <T_e, h_e> (+ <dy, bu_e> below), da = g T gelu'(a) into P1, g h into P2
    dgates = tl.zeros((BM, 16), tl.float32)
    for split in tl.static_range(NS):
        offs_c = split * SPLIT_COLS + tl.arange(0, SPLIT_COLS)
        col_mask = offs_c < EXPERT_COLS
        col_expert = offs_c // R
        a = _rows_times_weights(x_ptr, D, rows, row_mask, D, wd_ptr, offs_c * D, col_mask, 1, BK, DOT, PREC)
        a += tl.load(bd_ptr + offs_c, mask=col_mask, other=0.0).to(tl.float32)[None, :]
        cdf = 0.5 * (1.0 + tl.math.erf(a * 0.7071067811865476))
        hidden = a * cdf  # GELU
        gelu_slope = cdf + a * tl.exp(-0.5 * a * a) * 0.3989422804014327
        T = _rows_times_weights(
            dy_ptr, D, rows, row_mask, D, wu_ptr, col_expert * D * R + offs_c % R, col_mask, R, BK, DOT, PREC
        )
        T_times_hidden = T * hidden
        gate_on_col = tl.zeros((BM, SPLIT_COLS), tl.float32)
        # static selects over this split's experts only: reshapes to (BM, E, R) spill registers
        for e in tl.static_range(split * SPLIT_COLS // R, (split + 1) * SPLIT_COLS // R):
            dgate_e = tl.sum(tl.where(col_expert[None, :] == e, T_times_hidden, 0.0), axis=1)  # <T_e, h_e>
            dgates += tl.where(experts[None, :] == e, dgate_e[:, None], 0.0)
            gate_e = tl.sum(tl.where(experts[None, :] == e, gates, 0.0), axis=1)
            gate_on_col = tl.where(col_expert[None, :] == e, gate_e[:, None], gate_on_col)
        split_mask = row_mask[:, None] & col_mask[None, :]
        tl.store(p1_rows + offs_c[None, :], gate_on_col * T * gelu_slope, mask=split_mask)  # da
        tl.store(p2_rows + offs_c[None, :], gate_on_col * hidden, mask=split_mask)  # g h

    # 3. dgate_e += <dy, bu_e>; the gates' own gradient; the softmax backward over the kept experts
    #    (dz = 0 off the top-k) and the temperature
    dgates += _rows_times_weights(
        dy_ptr, D, rows, row_mask, D, bu_ptr, experts * D, experts < E, 1, BK, DOT, PREC
    )
    if has_dgates:
        dgates += tl.load(dgates_ptr + rows[:, None] * E + experts[None, :], mask=gate_mask, other=0.0)
    dz = gates * (dgates - tl.sum(gates * dgates, axis=1)[:, None]) / temperature  # (BM, 16)

    # 4. the gate MLP backward: u recomputed, dv = dz W2, du = dv where u > 0; P1 gets du, v and dz
    u = _rows_times_weights(
        x_ptr, D, rows, row_mask, D, w1_ptr, offs_h * D, offs_h < H, 1, BK, DOT, GATE_PREC
    )
    u += tl.load(b1_ptr + offs_h).to(tl.float32)[None, :]
    w2 = tl.load(w2_ptr + experts[:, None] * H + offs_h[None, :], mask=(experts < E)[:, None], other=0.0)
    dv = tl.dot(dz.to(DOT), w2.to(DOT), input_precision=PREC)  # (BM, H)
    tl.store(p1_rows + EXPERT_COLS + offs_h[None, :], tl.where(u > 0, dv, 0.0), mask=row_mask[:, None])
    tl.store(p1_rows + EXPERT_COLS + H + offs_h[None, :], tl.maximum(u, 0.0), mask=row_mask[:, None])
    tl.store(p1_rows + EXPERT_COLS + 2 * H + experts[None, :], dz, mask=row_mask[:, None])

    # 5. dx = dy + [da | du] [Wd; W1], [da | du] read back from P1 (in L2: holding it would spill)
    # other threads of this program stored those
    tl.debug_barrier()
    for k0 in range(0, D, BK):
        offs_k = k0 + tl.arange(0, BK)
        k_mask = offs_k < D
        dx = _rows_times_weights(
            p1_ptr, P1_WIDTH, rows, row_mask, EXPERT_COLS, wd_ptr, offs_k, k_mask, D, KC, DOT, PREC
        )
        dx += _rows_times_weights(
            p1_ptr + EXPERT_COLS, P1_WIDTH, rows, row_mask, H, w1_ptr, offs_k, k_mask, D, KC, DOT, PREC
        )
        dx_mask = row_mask[:, None] & k_mask[None, :]
        dy_tile = tl.load(dy_ptr + rows[:, None] * D + offs_k[None, :], mask=dx_mask, other=0.0)
        tl.store(dx_ptr + rows[:, None] * D + offs_k[None, :], dy_tile.to(tl.float32) + dx, mask=dx_mask)


# -----------------------------------------------------------------------------
# Backward 2: the weight gradients. One token sum, and a helper per kind of gradient tile (as Triton tutorial
# 06 splits its backward into _attn_bwd_dkdv and _attn_bwd_dq)
@triton.jit
def _sum_over_tokens(
    # A[:, a_cols] (BT, BW) a tile: rows a_stride apart, a_width valid columns
    a_ptr,
    a_stride,
    a_cols,
    a_width,
    # B[:, b_cols] (BT, BD) a tile
    b_ptr,
    b_stride,
    b_cols,
    b_width,
    # the tokens summed, the last tile first
    t_lo,
    t_hi,
    BT,
    DOT,
    PREC,
):
    """A[t_lo:t_hi, a_cols]^T B[t_lo:t_hi, b_cols] (BW, BD) and A's column sums over those tokens."""
    acc = tl.zeros((a_cols.shape[0], b_cols.shape[0]), tl.float32)
    col_sums = tl.zeros((a_cols.shape[0],), tl.float32)
    num_tiles = tl.cdiv(t_hi - t_lo, BT)
    for i in range(0, num_tiles):
        tokens = (t_lo + (num_tiles - 1 - i) * BT + tl.arange(0, BT)).to(tl.int64)
        token_mask = tokens < t_hi
        a = tl.load(
            a_ptr + tokens[:, None] * a_stride + a_cols[None, :],
            mask=token_mask[:, None] & (a_cols < a_width)[None, :],
            other=0.0,
        )  # (BT, BW)
        b = tl.load(
            b_ptr + tokens[:, None] * b_stride + b_cols[None, :],
            mask=token_mask[:, None] & (b_cols < b_width)[None, :],
            other=0.0,
        )  # (BT, BD)
        acc = tl.dot(tl.trans(a.to(DOT)), b.to(DOT), acc, input_precision=PREC)
        col_sums += tl.sum(a.to(tl.float32), axis=0)
    return acc, col_sums


@triton.jit
def _bwd_down_tile(
    tile,
    x_ptr,
    p1_ptr,
    # this chunk's copies of dWd, dbd, dW1, db1
    gwd_ptr,
    gbd_ptr,
    gw1_ptr,
    gb1_ptr,
    D,
    t_lo,
    t_hi,
    H,
    E,
    R,
    BW,
    BD,
    BT,
    DOT,
    PREC,
):
    """[dWd; dW1] (E*R + H, D) = [da | du]^T x, P1's first E*R + H columns against x; dbd, db1: the column
    sums of da, du. Rows c = e * R + r of Wd, then the rows of W1."""
    EXPERT_COLS: tl.constexpr = E * R
    col_tiles = tl.cdiv(D, BD)
    rows = tile // col_tiles * BW + tl.arange(0, BW)
    cols = tile % col_tiles * BD + tl.arange(0, BD)
    acc, col_sums = _sum_over_tokens(
        p1_ptr, EXPERT_COLS + 2 * H + 16, rows, EXPERT_COLS + H, x_ptr, D, cols, D, t_lo, t_hi, BT, DOT, PREC
    )
    is_expert = rows < EXPERT_COLS
    out = tl.where(is_expert, gwd_ptr + rows * D, gw1_ptr + (rows - EXPERT_COLS) * D)
    out_mask = rows < EXPERT_COLS + H
    tl.store(out[:, None] + cols[None, :], acc, mask=out_mask[:, None] & (cols < D)[None, :])
    # the first column tile also stores the biases' gradients
    if tile % col_tiles == 0:
        tl.store(tl.where(is_expert, gbd_ptr + rows, gb1_ptr + rows - EXPERT_COLS), col_sums, mask=out_mask)


@triton.jit
def _bwd_up_tile(
    tile,
    dy_ptr,
    p2_ptr,
    # this chunk's copies of dWu, dbu
    gwu_ptr,
    gbu_ptr,
    D,
    t_lo,
    t_hi,
    E,
    R,
    BW,
    BD,
    BT,
    DOT,
    PREC,
):
    """[dWu; dbu] (E*R + E, D) = [g h | g]^T dy, all of P2 against dy. Rows c = e * R + r of Wu, then the rows
    of bu; Wu is (E, D, R): its d runs with stride R."""
    EXPERT_COLS: tl.constexpr = E * R
    col_tiles = tl.cdiv(D, BD)
    rows = tile // col_tiles * BW + tl.arange(0, BW)
    cols = tile % col_tiles * BD + tl.arange(0, BD)
    acc, _ = _sum_over_tokens(
        p2_ptr, EXPERT_COLS + 16, rows, EXPERT_COLS + E, dy_ptr, D, cols, D, t_lo, t_hi, BT, DOT, PREC
    )
    is_expert = rows < EXPERT_COLS
    out = tl.where(is_expert, gwu_ptr + rows // R * D * R + rows % R, gbu_ptr + (rows - EXPERT_COLS) * D)
    col_step = tl.where(is_expert, R, 1)
    out_mask = (rows < EXPERT_COLS + E)[:, None] & (cols < D)[None, :]
    tl.store(out[:, None] + cols[None, :] * col_step[:, None], acc, mask=out_mask)


@triton.jit
def _bwd_w2_tile(
    tile,
    p1_ptr,
    # this chunk's copies of dW2, db2
    gw2_ptr,
    gb2_ptr,
    t_lo,
    t_hi,
    H,
    E,
    R,
    BW,
    BD,
    BT,
    DOT,
    PREC,
):
    """dW2 (E, H) = dz^T v, P1's dz columns against its v columns; db2: the column sums of dz. E <= 16 <= BW:
    one row block."""
    P1_WIDTH: tl.constexpr = E * R + 2 * H + 16
    rows = tl.arange(0, BW)
    cols = tile * BD + tl.arange(0, BD)
    dz_ptr = p1_ptr + E * R + 2 * H
    acc, col_sums = _sum_over_tokens(
        dz_ptr, P1_WIDTH, rows, E, p1_ptr + E * R + H, P1_WIDTH, cols, H, t_lo, t_hi, BT, DOT, PREC
    )
    tl.store(gw2_ptr + rows[:, None] * H + cols[None, :], acc, mask=(rows < E)[:, None] & (cols < H)[None, :])
    if tile == 0:
        tl.store(gb2_ptr + rows, col_sums, mask=rows < E)


@triton.jit(do_not_specialize=["N", "num_down_tiles", "num_up_tiles", "copy_stride"])
def _moa_bwd_weights(
    # x, dy (N, D); the token kernel's factors P1 (N, E*R + 2H + 16) = [da | du | v | dz], P2 (N, E*R + 16)
    x_ptr,
    dy_ptr,
    p1_ptr,
    p2_ptr,
    # outputs: the 8 weight gradients (fp32), one copy per chunk of CHUNK tokens, copy_stride apart
    gw1_ptr,
    gb1_ptr,
    gw2_ptr,
    gb2_ptr,
    gwd_ptr,
    gbd_ptr,
    gwu_ptr,
    gbu_ptr,
    N,
    D,
    num_down_tiles,
    num_up_tiles,
    copy_stride,
    H: tl.constexpr,
    E: tl.constexpr,
    R: tl.constexpr,
    EX: tl.constexpr,
    # tiles: BW gradient rows by BD columns per program, BT tokens a step
    BW: tl.constexpr,
    BD: tl.constexpr,
    BT: tl.constexpr,
    CHUNK: tl.constexpr,
    DOT: tl.constexpr,
    PREC: tl.constexpr,
    GATE_PREC: tl.constexpr,
):
    """Backward 2: the weight gradients, one program per (gradient tile, chunk of CHUNK tokens). Programs
    [0, num_down_tiles) do [dWd; dW1], the next num_up_tiles [dWu; dbu], the rest dW2. Each sums its chunk in
    one fixed order: bitwise reproducible, no atomics."""
    pid = tl.program_id(0)
    # the chunks run last first: the token kernel ended on the last tokens (still in L2)
    t_lo = (tl.num_programs(1) - 1 - tl.program_id(1)) * CHUNK
    t_hi = tl.minimum(N, t_lo + CHUNK)
    # where this chunk's copy of the gradients starts
    copy = tl.program_id(1).to(tl.int64) * copy_stride
    if pid < num_down_tiles:
        _bwd_down_tile(
            pid,
            x_ptr,
            p1_ptr,
            gwd_ptr + copy,
            gbd_ptr + copy,
            gw1_ptr + copy,
            gb1_ptr + copy,
            D,
            t_lo,
            t_hi,
            H,
            E,
            R,
            BW,
            BD,
            BT,
            DOT,
            PREC,
        )
    elif pid < num_down_tiles + num_up_tiles:
        _bwd_up_tile(
            pid - num_down_tiles,
            dy_ptr,
            p2_ptr,
            gwu_ptr + copy,
            gbu_ptr + copy,
            D,
            t_lo,
            t_hi,
            E,
            R,
            BW,
            BD,
            BT,
            DOT,
            PREC,
        )
    else:
        _bwd_w2_tile(
            pid - num_down_tiles - num_up_tiles,
            p1_ptr,
            gw2_ptr + copy,
            gb2_ptr + copy,
            t_lo,
            t_hi,
            H,
            E,
            R,
            BW,
            BD,
            BT,
            DOT,
            PREC,
        )


# -----------------------------------------------------------------------------
# Launch parameters from the GPU's limits
@functools.cache
def device_limits(index):
    """(compute capability as 10 major + minor, opt-in shared memory per block in bytes) of GPU `index`."""
    props = torch.cuda.get_device_properties(index)
    return props.major * 10 + props.minor, props.shared_memory_per_block_optin


# called on every forward: pure, so computed once per shape and GPU
@functools.cache
def launch_params(arch, smem, dot, D, H, E, R):
    """{kernel: (constexprs, num_warps, num_stages)} for a GPU of compute capability `arch` (86 for
    sm_86) with `smem` bytes of opt-in shared memory per block; arch None is the interpreter. dot: the matmul
    dtype (x and the weights are fp32). NotSupported when nothing fits. Tiles: docs/kernel.md.

    A GPU gets the tiles of the largest of SMEM_CLASSES within its shared memory per block (the choice reads
    the limit, not the architecture's number); NotSupported if there is none or the GPU is older than Turing."""
    EX = triton.next_power_of_2(E)
    expert_cols = EX * R
    half = dot != torch.float32
    precision = "ieee"
    if arch is not None:
        if arch < 75:
            raise NotSupported(f"sm_{arch}: the kernel needs sm_75 (Turing) or newer")
        if smem < SMEM_T4:
            raise NotSupported(
                f"sm_{arch} has {smem:,} bytes of shared memory per block; the kernel needs 65,536"
            )
        if dot == torch.bfloat16 and arch < 80:
            raise NotSupported(f"sm_{arch} has no bf16 tensor cores (moa.runtime picks fp16 there)")
        if arch >= 80 and not half:
            precision = "tf32"  # TF32 came with sm_80
    # the interpreter (no warps, stages or shared memory) gets the largest class's tiles
    limit = next(size for size in SMEM_CLASSES if arch is None or size <= smem)
    forward = _forward_tiles(limit, half, expert_cols)
    if forward is None:
        raise NotSupported(
            f"no forward tiles fit {smem:,} bytes of shared memory at E = {E}, R = {R} "
            f"with {str(dot)[6:]} matmuls"
        )
    # the T4 class (Turing): tl.dot runs on the FMA units there (no mma)
    t4 = limit == SMEM_T4
    few = half and expert_cols <= 256
    token_tiles = dict(
        BM=16,
        # BK 32 on the T4 class, above E R = 256, and for fp32 matmuls at E R = 128 (BK 64 spills there)
        BK=32 if t4 or expert_cols > 256 or (not half and expert_cols == 128) else 64,
        KC=32 if t4 else 64,
        # expert splits of 64 columns (or one expert) on the T4 class and for 16-bit at E R <= 256, else of 256
        NS=triton.cdiv(expert_cols, max(R, 64) if t4 or few else 256),
    )
    # the weight kernel's tiles: BT 32 for fp32 matmuls and on the T4 class
    weight_tiles = dict(BW=64, BD=64, BT=64 if half and not t4 else 32, CHUNK=4096)
    if t4:
        # narrow steps, one stage, 8 warps (4 at E R = 128)
        tokens = (token_tiles, 4 if expert_cols == 128 else 8, 1)
        weights = (weight_tiles, 8, 2)
    else:
        # 16-bit, E R <= 256: 4 warps up to E = 8, with .maxnreg 255 where ptxas would otherwise cap a 4-warp
        # backward kernel at 128 or 168 registers and spill; else 8 warps
        tokens = (dict(token_tiles, maxnreg=255), 4, 2) if few and EX <= 8 else (token_tiles, 8, 2)
        # the weight kernel: 8 warps for fp32 on the A100 and 99 KB classes, else 4 (free on the 99 KB class)
        weights = (
            dict(weight_tiles, maxnreg=255) if limit == SMEM_RTX and half else weight_tiles,
            8 if limit in (SMEM_A100, SMEM_RTX) and not half else 4,
            4 if limit >= SMEM_A100 else 3,
        )
    # each split of the expert columns holds whole experts: the token kernel's per-split expert loop needs it
    assert EX % token_tiles["NS"] == 0, f"{token_tiles['NS']} splits of {EX} experts"
    common = dict(
        H=H,
        E=E,
        R=R,
        EX=EX,
        DOT=TL[dot],
        PREC=precision,
        GATE_PREC="tf32x3" if precision == "tf32" else precision,
    )
    kernels = {"fwd": forward, "bwd_tokens": tokens, "bwd_weights": weights}
    return {name: (dict(common, **tiles), warps, stages) for name, (tiles, warps, stages) in kernels.items()}


def _forward_tiles(limit, half, expert_cols):
    """(tiles, warps, stages) of the forward for a shared-memory class; None if none fits. The forward
    holds a (BK, E*R) slice of Wd, then an (E*R, BN) slice of Wu, per pipeline stage (the compile report
    measures what it needs)."""
    # Turing (FMA matmuls): one stage, the smallest tiles, E R <= 256; fp32 at E R = 128: 4 warps
    if limit == SMEM_T4:
        if expert_cols <= 256:
            return dict(BM=16, BK=16, BN=16), 4 if expert_cols == 128 and not half else 8, 1
    elif expert_cols <= 256 and half:
        return dict(BM=64, BK=64, BN=64 if expert_cols <= 128 else 32), 8, 3 if limit == SMEM_H100 else 2
    # E R <= 512 on the A100 and H100 classes, fp32 at E R <= 256 on the 99 KB class
    elif expert_cols <= 256 or expert_cols <= 512 and limit >= SMEM_A100:
        return (
            dict(BM=32, BK=64 if expert_cols <= 256 else 32, BN=32),
            8,
            3 if limit == SMEM_H100 and half else 2,
        )
    # E R = 512, 99 KB class: narrower up-projection steps
    elif expert_cols <= 512:
        return dict(BM=32 if half else 16, BK=32, BN=16), 8, 2
    # E R = 1024: the narrowest tiles (wider ones spill); fp32 on the 99 KB class holds two (16, 1024) fp32
    # tiles there, more than 99 KB: None
    elif half or limit >= SMEM_A100:
        return dict(BM=16, BK=16, BN=16), 8, 2


# -----------------------------------------------------------------------------
# Autograd and the wrapper
# an output buffer, NaN when the tests set POISON
def _new(shape, like, dtype=None):
    out = like.new_empty(shape, dtype=dtype)  # like's dtype by default, like's device
    if POISON:
        out.fill_(float("nan"))
    return out


def _aligned(t):
    """t contiguous and 16-byte aligned (a copy only for a view that starts mid-vector): the kernels are
    compiled, and checked by the compile report, for aligned pointers."""
    t = t.contiguous()
    return t.clone() if t.data_ptr() % ALIGN else t


def device_guard(t):
    """Launch on t's GPU, not the current one (Triton launches on the current device)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def params_for(x, D, H, E, R):
    """(the matmul dtype, launch_params) of a call on x's device, autocast included. On a GPU, NotSupported for a
    shape the compile report does not compile."""
    # the interpreter computes in fp32
    dot = torch.float32
    limits = None, None
    if x.is_cuda:
        dot = x.dtype
        if dot == torch.float32 and torch.is_autocast_enabled("cuda"):
            dot = torch.get_autocast_dtype("cuda")
        if E not in GPU_EXPERTS or H != GPU_GATE_HIDDEN:
            raise NotSupported(
                f"E = {E}, H = {H}: on a GPU the kernel runs what its compile report checks, "
                f"E in {GPU_EXPERTS} and H = {GPU_GATE_HIDDEN}"
            )
        limits = device_limits(x.device.index)
    return dot, launch_params(*limits, dot, D, H, E, R)


# the calls, by (device, dtypes, D, H, E, R), whose backward kernels are compiled and loaded
BACKWARD_LOADED = set()


class FusedMoA(torch.autograd.Function):
    """x (N, D) to y (N, D) and the gates (N, E), x and the weights fp32, contiguous and aligned. Saves x, the
    gates and the weights; the backward recomputes the rest."""

    @staticmethod
    def forward(ctx, x, top_k, temperature, dot, params, *weights):
        N, D = x.shape
        y = _new(x.shape, x)
        gates = _new((N, len(weights[3])), x)  # b2: E; fp32, as x
        meta, warps, stages = params["fwd"]
        with device_guard(x):
            _moa_fwd_kernel[(math.ceil(N / meta["BM"]),)](  # (a grid of 0 programs launches nothing)
                x,
                *weights,
                y,
                gates,
                N,
                D,
                temperature,
                top_k,
                num_warps=warps,
                num_stages=stages,
                **meta,
            )
        ctx.save_for_backward(x, gates, *weights)
        ctx.temperature = temperature
        # autocast is off in the backward: keep the forward's matmul dtype
        ctx.dot = dot
        ctx.params = params
        # an unused output's gradient is None: no zeros launch
        ctx.set_materialize_grads(False)
        return y, gates

    @staticmethod
    # dgates is None unless the gates were used
    def backward(ctx, dy, dgates):
        x, gates, *weights = ctx.saved_tensors
        N, D = x.shape
        E, R = weights[5].shape  # bd
        H = len(weights[1])
        dx = _new(x.shape, x)
        dy = torch.zeros_like(x) if dy is None else _aligned(dy)
        # [da | du | v | dz] in the matmul dtype
        p1 = _new((N, E * R + 2 * H + 16), x, ctx.dot)
        p2 = _new((N, E * R + 16), x, ctx.dot)  # [g h | g]
        # the 8 gradients (fp32, as x) in one buffer, each view starting 16-byte aligned; one copy per token chunk
        padded = [math.ceil(t.numel() / 4) * 4 for t in weights]
        tok_meta, tok_warps, tok_stages = ctx.params["bwd_tokens"]
        wt_meta, wt_warps, wt_stages = ctx.params["bwd_weights"]
        chunks = max(1, math.ceil(N / wt_meta["CHUNK"]))
        flat = _new((chunks, sum(padded)), x)
        # the weight kernel's programs: [dWd; dW1] tiles (E R + H rows by D), [dWu; dbu] tiles (E R + E rows by
        # D), dW2 tiles
        num_down_tiles, num_up_tiles = (
            math.ceil(rows / wt_meta["BW"]) * math.ceil(D / wt_meta["BD"]) for rows in (E * R + H, E * R + E)
        )
        with device_guard(x):
            _moa_bwd_tokens[(math.ceil(N / tok_meta["BM"]),)](
                x,
                dy,
                gates,
                gates if dgates is None else _aligned(dgates),  # a dummy when unused
                *weights,
                dx,
                p1,
                p2,
                N,
                D,
                ctx.temperature,
                int(dgates is not None),
                num_warps=tok_warps,
                num_stages=tok_stages,
                **tok_meta,
            )
            _moa_bwd_weights[(num_down_tiles + num_up_tiles + math.ceil(H / wt_meta["BD"]), chunks)](
                x,
                dy,
                p1,
                p2,
                *flat[0].split(padded),
                N,
                D,
                num_down_tiles,
                num_up_tiles,
                sum(padded),
                num_warps=wt_warps,
                num_stages=wt_stages,
                **wt_meta,
            )
        # the chunks' copies summed in a fixed order (no atomics): reproducible; one chunk: nothing to sum
        sums = flat.sum(0) if chunks > 1 else flat[0]
        grads = [v[: t.numel()].view_as(t) for v, t in zip(sums.split(padded), weights)]
        return dx, None, None, None, None, *grads


def check_auto(x):
    """NotSupported where --moa-impl auto prefers the PyTorch MoA though the kernel runs: below AUTO_MIN_ARCH."""
    if x.is_cuda and device_limits(x.device.index)[0] < AUTO_MIN_ARCH:
        raise NotSupported(
            f"below sm_{AUTO_MIN_ARCH} tl.dot runs on the FMA units, unmeasured against PyTorch's tensor cores; "
            "--moa-impl triton runs it"
        )


def fused_moa(x, gate_w1, gate_b1, gate_w2, gate_b2, down_w, down_b, up_w, up_b, top_k, temperature):
    """moa.moa_reference's signature and semantics, differentiable in x and the 8 weights: returns
    (y like x, gates (..., E) fp32). A ValueError names the first bad argument; NotSupported (a ValueError)
    says why the kernel cannot run this call on this device: a shape outside the kernel's range included."""
    if not isinstance(x, torch.Tensor) or not x.dim() or x.dtype not in TL:
        raise ValueError(f"x must be a float32/float16/bfloat16 tensor (..., D), got {x!r:.60}")
    D = x.shape[-1]
    H = len(gate_w1)
    E = len(gate_w2)
    R = down_w.shape[1] if down_w.dim() == 3 else 0
    # beyond E R = 1024 the forward's up-projection tile outgrows shared memory
    if not D or D % 16 or {H, R} - set(WIDTHS) or not 1 <= E <= 16 or triton.next_power_of_2(E) * R > 1024:
        raise NotSupported(
            "need D a multiple of 16, H and R in (16, 32, 64, 128), 1 <= E <= 16, "
            f"E R <= 1024; got D={D}, H={H}, R={R}, E={E}"
        )
    weights = (gate_w1, gate_b1, gate_w2, gate_b2, down_w, down_b, up_w, up_b)
    shapes = ((H, D), (H,), (E, H), (E,), (E, R, D), (E, R), (E, D, R), (E, D))
    for name, t, shape in zip(NAMES[1:], weights, shapes):
        if t.shape != shape:
            raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
        if t.dtype != gate_w1.dtype or t.dtype not in (x.dtype, torch.float32):
            raise ValueError(f"{name}.dtype is {t.dtype}: the weights need one dtype, x's or fp32")
        # the kernels would read it with x's GPU's pointers
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device}, x on {x.device}: the weights must be on x's device")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= E:
        raise ValueError(f"top_k must be an int in [1, E={E}], got {top_k!r}")
    # the temperature as the kernel uses it, an fp32 number: one that rounds to 0, a subnormal or inf is
    # refused (the logits would be inf or NaN)
    fp32 = torch.finfo(torch.float32)
    if (
        isinstance(temperature, bool)
        or not isinstance(temperature, (int, float))
        or not fp32.tiny <= temperature <= fp32.max
    ):
        raise ValueError(
            f"temperature must be a number in [{fp32.tiny:.3g}, {fp32.max:.3g}] (a normal "
            f"positive fp32 value), got {temperature!r}"
        )
    temperature = float(temperature)
    if not x.is_cuda and not INTERPRET:
        raise ValueError("CPU tensors need TRITON_INTERPRET=1 set before importing kernels/")
    dot, params = params_for(x, D, H, E, R)
    N = x.numel() // D
    chunk = params["bwd_weights"][0]["CHUNK"]
    # more than GRID_Y_MAX chunks
    if N > GRID_Y_MAX * chunk:
        raise NotSupported(
            f"{N:,} tokens in one call: the weight-gradient grid would need {math.ceil(N / chunk):,} chunks of "
            f"{chunk}, more than CUDA's {GRID_Y_MAX:,} (at most {GRID_Y_MAX * chunk:,} tokens)"
        )
    # the kernels read x and the weights in fp32, as moa.MoA passes them (its fp32 stream and master weights):
    # half ones are cast (the matmuls stay in the dot dtype), and autograd casts their gradients back
    x_in = _aligned(x.float().reshape(-1, D))
    args = (top_k, temperature, dot, params, *[_aligned(t.float()) for t in weights])
    key = (x.device, dot, D, H, E, R)
    if key not in BACKWARD_LOADED and torch.is_grad_enabled() and any(t.requires_grad for t in (x, *weights)):
        # the first call that may need a backward runs one on no tokens first: triton compiles and loads a
        # kernel at its first launch, even one of no programs or tokens, so a compiler, ptxas or shared-memory
        # failure of the backward raises here, where --moa-impl auto still falls back, not in loss.backward()
        x0 = x_in[:0].detach().requires_grad_()
        torch.autograd.grad(FusedMoA.apply(x0, *args)[0].sum(), x0)
        BACKWARD_LOADED.add(key)
    y, gates = FusedMoA.apply(x_in, *args)
    return y.view_as(x).to(x.dtype), gates.reshape(*x.shape[:-1], E)
