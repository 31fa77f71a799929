"""
Fused Mixture-of-Adapters (MoA) layer in Triton: gate MLP + softmax + top-k + all experts + residual, one launch.
=================================================================================================================

The layer (moa.py `moa_reference`, arXiv 2604.01118 section 2), per token x of width D:
    h = relu(x W1^T + b1); logits = (h W2^T + b2) / temperature; keep the top_k logits; gates = softmax(kept)
    y = x + sum_e gates_e * (gelu(x Wd_e^T + bd_e) Wu_e^T + bu_e)

What you will learn:
  * "design A" of ../shared/docs/kernel-design.md: one program per tile of BM tokens, dense over the experts. One
    pass over D loads each X tile once and feeds both the gate's first layer and the down-projection of *every*
    expert, because down_w (E, R, D) is already one packed (E*R, D) matrix. Nothing goes to HBM in between.
  * top-k in registers: k rounds of "row max, then the lowest column holding it", masking each winner.
  * the gate scale as a reshape: [BM, E*R] -> [BM, E, R] times gates[:, :, None], so the up-projection of all
    experts is a single tl.dot with K = E*R.
  * a backward that is also Triton (fused_moa_bwd.py), with deterministic weight gradients (no atomics).
  * how to keep one kernel correct both on a GPU and under the CPU interpreter (TRITON_INTERPRET=1): cast to fp32
    right after every load, because the interpreter cannot do bf16 arithmetic.

Run: `python -m kernels.fused_moa` (GPU benchmark) or `TRITON_INTERPRET=1 python -m kernels.fused_moa --smoke`
(tiny CPU run). Tests: `python -m pytest -q tests/test_fused_moa.py`.
Gates are returned in fp32 whatever the input dtype; y has x's dtype.
Credits (ideas only, no code): design A and the backward formulas of ../shared/docs/kernel-design.md; the gate
gradient in rank space from SonicMoE (arXiv 2512.14080); the file layout of the Triton tutorials.
"""
import argparse
import math
import os
import time

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"  # read once: kernels are built at import time


# -----------------------------------------------------------------------------------------------------------------
# Shared device helpers (the backward kernel reuses them so the recomputed routing is bit-identical to the forward)

@triton.jit
def _x_pass(x_ptr, w1_ptr, wd_ptr, rows, row_mask, D,
            H: tl.constexpr, ER: tl.constexpr, EPR: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr,
            DOT: tl.constexpr, PREC: tl.constexpr, GATE_PREC: tl.constexpr):
    """u = X W1^T (BM, H) and a = X Wd_all^T (BM, EPR), sharing every X load. Column c of a is expert c // R,
    rank c % R; columns >= ER = E*R are padding (zero weights)."""
    offs_h = tl.arange(0, H)
    offs_c = tl.arange(0, EPR)
    u = tl.zeros((BM, H), tl.float32)
    a = tl.zeros((BM, EPR), tl.float32)
    for k0 in range(0, D, BK):
        offs_k = k0 + tl.arange(0, BK)
        kmask = offs_k < D
        xt = tl.load(x_ptr + rows[:, None] * D + offs_k[None, :], mask=row_mask[:, None] & kmask[None, :],
                     other=0.0).to(tl.float32)                                       # (BM, BK)
        w1 = tl.load(w1_ptr + offs_h[None, :] * D + offs_k[:, None], mask=kmask[:, None],
                     other=0.0).to(tl.float32)                                       # (BK, H) = W1^T chunk
        wd = tl.load(wd_ptr + offs_c[None, :] * D + offs_k[:, None],
                     mask=kmask[:, None] & (offs_c[None, :] < ER), other=0.0).to(tl.float32)  # (BK, EPR)
        xd = xt.to(DOT)
        u = tl.dot(xd, w1.to(DOT), u, input_precision=GATE_PREC)
        a = tl.dot(xd, wd.to(DOT), a, input_precision=PREC)
    return u, a


@triton.jit
def _route(u, b1_ptr, w2_ptr, b2_ptr, row_mask, temperature,
           H: tl.constexpr, E: tl.constexpr, EX: tl.constexpr, TOP_K: tl.constexpr, BM: tl.constexpr):
    """From the gate pre-activation u (BM, H): u + b1, v = relu(u), and the gates g (BM, EX), zero off the top_k
    and in padded columns and rows. Layer 2 is only H*E multiply-adds per token, so it is a row reduction per
    expert rather than a tl.dot (which would need E padded to 16 on a GPU)."""
    offs_h = tl.arange(0, H)
    cols = tl.arange(0, EX)
    u = u + tl.load(b1_ptr + offs_h).to(tl.float32)[None, :]
    v = tl.maximum(u, 0.0)
    logits = tl.full((BM, EX), float("-inf"), tl.float32)                            # padded experts stay -inf
    for e in tl.static_range(E):
        w2 = tl.load(w2_ptr + e * H + offs_h).to(tl.float32)
        z = tl.sum(v * w2[None, :], axis=1) + tl.load(b2_ptr + e).to(tl.float32)
        logits = tl.where(cols[None, :] == e, (z / temperature)[:, None], logits)
    if TOP_K < E:
        # k rounds of argmax; ties go to the lower expert index (the reference's stable sort does the same)
        keep = tl.zeros((BM, EX), tl.int32) != 0
        work = logits
        for _ in tl.static_range(TOP_K):
            best = tl.max(work, axis=1)
            idx = tl.min(tl.where(work == best[:, None], cols[None, :], EX), axis=1)
            hit = cols[None, :] == idx[:, None]
            keep = keep | hit
            work = tl.where(hit, float("-inf"), work)
    else:
        keep = (tl.zeros((BM, EX), tl.int32) + cols[None, :]) < E
    kept = tl.where(keep, logits, float("-inf"))
    p = tl.where(keep, tl.exp(kept - tl.max(kept, axis=1)[:, None]), 0.0)
    g = p / tl.sum(p, axis=1)[:, None]                                               # renormalised over the kept
    g = tl.where(row_mask[:, None], g, 0.0)                                          # rows past N contribute 0
    return u, v, g


# -----------------------------------------------------------------------------------------------------------------
# Forward kernel

@triton.jit
def _moa_fwd_kernel(
    x_ptr,        # (N, D) tokens, contiguous, any float dtype
    w1_ptr,       # (H, D) gate layer 1 weight
    b1_ptr,       # (H,) gate layer 1 bias
    w2_ptr,       # (E, H) gate layer 2 weight
    b2_ptr,       # (E,) gate layer 2 bias
    wd_ptr,       # (E, R, D) down-projections, read as one packed (E*R, D) matrix
    bd_ptr,       # (E, R) down biases, read as (E*R,)
    wu_ptr,       # (E, D, R) up-projections
    bu_ptr,       # (E, D) up biases
    y_ptr,        # (N, D) output, x's dtype
    gates_ptr,    # (N, E) fp32 output gates (zeros off the top_k)
    N, D,         # number of tokens, model width (a multiple of 16)
    temperature,  # softmax temperature (float)
    H: tl.constexpr,      # gate hidden width (16..128, a power of 2)
    E: tl.constexpr,      # number of experts (1..16)
    R: tl.constexpr,      # expert rank (16..128, a power of 2)
    EX: tl.constexpr,     # E rounded up to a power of 2
    TOP_K: tl.constexpr,  # experts kept per token
    BM: tl.constexpr,     # tokens per program
    BK: tl.constexpr,     # chunk of D per loop step (both for reading X and for writing Y)
    DOT: tl.constexpr,    # dtype fed to tl.dot: bf16/fp16 on a GPU for half inputs, else fp32
    PREC: tl.constexpr,   # input_precision of the expert dots ("tf32" for fp32 on a GPU)
    GATE_PREC: tl.constexpr,  # input_precision of the gate dot ("ieee": top-k must match the fp32 reference)
):
    EPR: tl.constexpr = EX * R
    ER: tl.constexpr = E * R
    pid = tl.program_id(0)
    rows = (pid * BM + tl.arange(0, BM)).to(tl.int64)
    row_mask = rows < N
    cols = tl.arange(0, EX)
    offs_c = tl.arange(0, EPR)

    # 1. one pass over D: gate layer 1 and all down-projections
    u, a = _x_pass(x_ptr, w1_ptr, wd_ptr, rows, row_mask, D, H, ER, EPR, BM, BK, DOT, PREC, GATE_PREC)
    # 2. gate MLP layer 2, temperature, top-k, softmax over the kept logits
    u, v, g = _route(u, b1_ptr, w2_ptr, b2_ptr, row_mask, temperature, H, E, EX, TOP_K, BM)
    tl.store(gates_ptr + rows[:, None] * E + cols[None, :], g, mask=row_mask[:, None] & (cols[None, :] < E))
    # 3. experts: bias, exact (erf) GELU, scale each expert's R columns by its gate
    a = a + tl.load(bd_ptr + offs_c, mask=offs_c < ER, other=0.0).to(tl.float32)[None, :]
    hid = 0.5 * a * (1.0 + tl.math.erf(a * 0.7071067811865476))
    hg = tl.reshape(tl.reshape(hid, (BM, EX, R)) * g[:, :, None], (BM, EPR))       # (BM, E*R), gated
    hg = hg.to(DOT)
    # 4. up-projection of all experts at once (K = E*R), gated up biases, residual; BK output columns at a time
    wu_col = (offs_c // R) * D * R + (offs_c % R)                                    # up_w[e, 0, r] for c = e*R+r
    for n0 in range(0, D, BK):
        offs_n = n0 + tl.arange(0, BK)
        nmask = offs_n < D
        wu = tl.load(wu_ptr + wu_col[:, None] + offs_n[None, :] * R,
                     mask=(offs_c[:, None] < ER) & nmask[None, :], other=0.0).to(tl.float32)  # (EPR, BK)
        acc = tl.dot(hg, wu.to(DOT), input_precision=PREC)
        for e in tl.static_range(E):
            ge = tl.sum(tl.where(cols[None, :] == e, g, 0.0), axis=1)
            bu = tl.load(bu_ptr + e * D + offs_n, mask=nmask, other=0.0).to(tl.float32)
            acc += ge[:, None] * bu[None, :]
        ymask = row_mask[:, None] & nmask[None, :]
        xt = tl.load(x_ptr + rows[:, None] * D + offs_n[None, :], mask=ymask, other=0.0).to(tl.float32)
        tl.store(y_ptr + rows[:, None] * D + offs_n[None, :], xt + acc, mask=ymask)


# -----------------------------------------------------------------------------------------------------------------
# Wrapper: validation, block sizes, launch

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_POW2 = (16, 32, 64, 128)
NAMES = ("x", "gate_w1", "gate_b1", "gate_w2", "gate_b2", "down_w", "down_b", "up_w", "up_b")


def _poison():
    """MOA_KERNEL_POISON=1 fills every output buffer with NaN first, so elements a kernel forgets to write show up."""
    return os.environ.get("MOA_KERNEL_POISON", "0") == "1"


def _new(shape, like, dtype=None):
    dtype = dtype or like.dtype
    if _poison():
        return torch.full(shape, float("nan"), dtype=dtype, device=like.device)
    return torch.empty(shape, dtype=dtype, device=like.device)


def check_inputs(x, gate_w1, gate_b1, gate_w2, gate_b2, down_w, down_b, up_w, up_b, top_k, temperature):
    """Raise a ValueError naming the first bad argument; return (N, D, H, E, R)."""
    if not isinstance(x, torch.Tensor) or x.dim() < 1:
        raise ValueError("x must be a tensor of shape (..., D)")
    D = x.shape[-1]
    if D == 0 or D % 16:
        raise ValueError(f"D = x.shape[-1] must be a positive multiple of 16, got {D}")
    if gate_w1.dim() != 2 or gate_w1.shape[1] != D or gate_w1.shape[0] not in _POW2:
        raise ValueError(f"gate_w1 must be (H, D={D}) with H in {_POW2}, got {tuple(gate_w1.shape)}")
    H = gate_w1.shape[0]
    if gate_w2.dim() != 2 or gate_w2.shape[1] != H or not 1 <= gate_w2.shape[0] <= 16:
        raise ValueError(f"gate_w2 must be (E, H={H}) with 1 <= E <= 16, got {tuple(gate_w2.shape)}")
    E = gate_w2.shape[0]
    if down_w.dim() != 3 or down_w.shape[0] != E or down_w.shape[2] != D or down_w.shape[1] not in _POW2:
        raise ValueError(f"down_w must be (E={E}, R, D={D}) with R in {_POW2}, got {tuple(down_w.shape)}")
    R = down_w.shape[1]
    expected = {"gate_b1": (H,), "gate_b2": (E,), "down_b": (E, R), "up_w": (E, D, R), "up_b": (E, D)}
    for name, t in (("gate_b1", gate_b1), ("gate_b2", gate_b2), ("down_b", down_b), ("up_w", up_w), ("up_b", up_b)):
        if tuple(t.shape) != expected[name]:
            raise ValueError(f"{name} must have shape {expected[name]}, got {tuple(t.shape)}")
    tensors = (x, gate_w1, gate_b1, gate_w2, gate_b2, down_w, down_b, up_w, up_b)
    if x.dtype not in _DTYPES:
        raise ValueError(f"x.dtype must be one of {_DTYPES}, got {x.dtype}")
    for name, t in zip(NAMES, tensors):
        if t.dtype != x.dtype:
            raise ValueError(f"{name}.dtype is {t.dtype} but x.dtype is {x.dtype}; all inputs need one dtype")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= E:
        raise ValueError(f"top_k must be an int in [1, E={E}], got {top_k!r}")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if x.device.type != "cuda" and not INTERPRET:
        raise ValueError("CPU tensors need TRITON_INTERPRET=1 set before importing kernels.fused_moa")
    return x.numel() // D, D, H, E, R


def launch_config(x, H, E, R, D, backward=False):
    """Compile-time constants and (num_warps, num_stages) shared by the forward and backward launches.
    Untuned first guesses from kernel-design.md 2.3-2.4, sized by the packed expert width EPR = E_pow2 * R."""
    EX = triton.next_power_of_2(E)
    EPR = EX * R
    half = x.is_cuda and x.dtype != torch.float32
    dot = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}[x.dtype] if half else tl.float32
    # registers: the forward keeps ~2 (BM, EPR) fp32 tiles live, the backward ~7, so the backward takes BM = 16 on
    # a GPU; the interpreter is fastest with few, large programs and has no register file
    if not x.is_cuda:
        BM = 32 if backward else 64
    elif backward:
        BM = 16
    else:
        BM = 64 if EPR <= 256 else 32 if EPR <= 512 else 16
    # shared memory: one pipeline stage holds the (BM, BK) X tile and the (BK, H + EPR) weight tiles; keep two
    # stages under ~160 KB (H100 has 228 KB per SM)
    s = 2 if half else 4
    BK = 64
    while BK > 16 and 2 * BK * (BM + H + EPR) * s > 160 * 1024:
        BK //= 2
    stages = 2 if 2 * BK * (BM + H + EPR) * s <= 160 * 1024 else 1  # E*R >= 1024 in fp32: no pipelining
    BK = min(BK, triton.next_power_of_2(D))
    # fp32 on a GPU: TF32 for the experts, IEEE for the gate so the top-k matches the fp32 reference (2.3)
    prec = "tf32" if x.is_cuda else "ieee"
    gate_prec = "ieee" if x.dtype == torch.float32 else "tf32"  # (ignored for bf16/fp16 operands)
    meta = dict(EX=EX, BM=BM, BK=BK, DOT=dot, PREC=prec, GATE_PREC=gate_prec)
    # 8 warps: the forward's (BM, H + EPR) fp32 accumulators are 24k values at BM=64, E=4 (96 per thread)
    return meta, 8, stages


def moa_forward(x, gate_w1, gate_b1, gate_w2, gate_b2, down_w, down_b, up_w, up_b, top_k, temperature):
    """Forward only (no autograd): returns (y, gates) with y like x and gates fp32 of shape (..., E)."""
    N, D, H, E, R = check_inputs(x, gate_w1, gate_b1, gate_w2, gate_b2, down_w, down_b, up_w, up_b, top_k,
                                 temperature)
    ws = [t.contiguous() for t in (gate_w1, gate_b1, gate_w2, gate_b2, down_w, down_b, up_w, up_b)]
    x2 = x.reshape(N, D).contiguous()
    y, gates = _new((N, D), x2), _new((N, E), x2, torch.float32)
    meta, warps, stages = launch_config(x2, H, E, R, D)
    if N > 0:
        _moa_fwd_kernel[(triton.cdiv(N, meta["BM"]),)](x2, *ws, y, gates, N, D, float(temperature), H=H, E=E, R=R,
                                                       TOP_K=top_k, num_warps=warps, num_stages=stages, **meta)
    return y.reshape(x.shape), gates.reshape(*x.shape[:-1], E)


# -----------------------------------------------------------------------------------------------------------------
# Autograd: the forward saves only its inputs; the Triton backward (fused_moa_bwd.py) recomputes the rest

class FusedMoA(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, gate_w1, gate_b1, gate_w2, gate_b2, down_w, down_b, up_w, up_b, top_k, temperature):
        weights = (gate_w1, gate_b1, gate_w2, gate_b2, down_w, down_b, up_w, up_b)
        y, gates = moa_forward(x, *weights, top_k, temperature)
        D = x.shape[-1]
        ctx.save_for_backward(x.reshape(-1, D).contiguous(), *[t.contiguous() for t in weights])
        ctx.top_k, ctx.temperature, ctx.x_shape = top_k, temperature, x.shape
        return y, gates

    @staticmethod
    def backward(ctx, dy, dgates):
        from kernels.fused_moa_bwd import moa_backward  # lazy: that module imports this one
        x, *weights = ctx.saved_tensors
        if dy is None:
            dy = torch.zeros(x.shape, dtype=x.dtype, device=x.device)
        grads = moa_backward(dy, dgates, x, weights, ctx.top_k, ctx.temperature)
        return (grads[0].reshape(ctx.x_shape), *grads[1:], None, None)


def fused_moa(x, gate_w1, gate_b1, gate_w2, gate_b2, down_w, down_b, up_w, up_b, top_k, temperature):
    """Same signature and semantics as moa.moa_reference; differentiable w.r.t. x and the eight weights.
    Returns (y like x, gates fp32 of shape (..., E))."""
    return FusedMoA.apply(x, gate_w1, gate_b1, gate_w2, gate_b2, down_w, down_b, up_w, up_b, top_k, temperature)


# -----------------------------------------------------------------------------------------------------------------
# Benchmark: python -m kernels.fused_moa [--smoke]

def moa_loop(x, gate_w1, gate_b1, gate_w2, gate_b2, down_w, down_b, up_w, up_b, top_k, temperature):
    """The authors' style baseline: route, then one small MLP per expert, added with its gate."""
    F = torch.nn.functional
    logits = F.linear(F.relu(F.linear(x, gate_w1, gate_b1)), gate_w2, gate_b2) / temperature
    if top_k < logits.shape[-1]:
        idx = logits.topk(top_k, dim=-1).indices
        logits = logits.masked_fill(~torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, idx, True), -math.inf)
    gates = logits.softmax(-1)
    y = x
    for e in range(down_w.shape[0]):
        y = y + gates[..., e:e + 1] * F.linear(F.gelu(F.linear(x, down_w[e], down_b[e])), up_w[e], up_b[e])
    return y, gates


def _bench(fn, smoke, reps=5):
    """Median seconds per call: triton.testing.do_bench on a GPU, time.perf_counter on the CPU."""
    if torch.cuda.is_available():
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e-3
    fn(), fn()  # warm-up: the first calls trace the kernel and initialise torch's CPU paths
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def benchmark(smoke=False, compile_ref=None):
    from moa import moa_reference
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    if dev == "cpu" and not INTERPRET:
        raise SystemExit("no GPU: run with TRITON_INTERPRET=1 ... --smoke")
    compile_ref = (dev == "cuda") if compile_ref is None else compile_ref
    if dev == "cpu":  # the interpreter's numpy and torch's thread pool otherwise fight over the cores
        torch.set_num_threads(1)
    if smoke:
        sizes, D, dtypes = [64], 64, [torch.float32]
    else:
        sizes, D, dtypes = [400, 3200, 25600, 262144], 768, [torch.bfloat16, torch.float32]
    E, R, H, tau = 4, 64, 128, 2.0
    # the device's copy bandwidth, measured now (read + write of a large buffer)
    src = torch.empty(2 ** (28 if dev == "cuda" else 24), dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    copy_bw = 2 * src.numel() / _bench(lambda: dst.copy_(src), smoke)
    providers = {"loop": moa_loop, "dense": moa_reference}
    if compile_ref:
        try:
            cfg = torch._dynamo.config  # one recompile per (top_k, dtype, grad mode); N is marked dynamic
            setattr(cfg, "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit", 256)
            providers["compiled"] = torch.compile(moa_reference)
        except Exception as err:  # noqa: BLE001 - the benchmark goes on without it
            print(f"torch.compile unavailable: {err}")
    providers["fused"] = fused_moa
    rows = []
    gen = torch.Generator(device="cpu").manual_seed(0)
    for dtype in dtypes:
        s = torch.tensor([], dtype=dtype).element_size()
        shapes = [(H, D), (H,), (E, H), (E,), (E, R, D), (E, R), (E, D, R), (E, D)]
        ws = [(torch.randn(sh, generator=gen) * (sh[-1] ** -0.5 if len(sh) > 1 else 0.1)).to(dev, dtype)
              for sh in shapes]
        wbytes = sum(w.numel() for w in ws) * s
        for top_k in (4, 1):
            for N in sizes:
                x = torch.randn(N, D, generator=gen).to(dev, dtype)
                dy = torch.randn(N, D, generator=gen).to(dev, dtype)
                for mode in ("fwd", "fwd+bwd"):
                    # bytes a perfect kernel moves: read x, write y, read the weights (+ read dy, x, write dx,
                    # read the weights, write their gradients for the backward)
                    nbytes = 2 * N * D * s + wbytes + (3 * N * D * s + 2 * wbytes if mode != "fwd" else 0)
                    times = {}
                    for name, fn in providers.items():
                        leaves = [t.detach().requires_grad_(mode != "fwd") for t in [x] + ws]

                        def run(fn=fn, leaves=leaves):
                            if mode == "fwd":
                                with torch.no_grad():
                                    return fn(*leaves, top_k, tau)
                            y, _ = fn(*leaves, top_k, tau)
                            torch.autograd.backward(y, dy)
                            for t in leaves:
                                t.grad = None
                        try:
                            times[name] = _bench(run, smoke)
                        except Exception as err:  # noqa: BLE001 - e.g. out of memory or a compile failure
                            print(f"{name} {dtype} N={N} {mode} failed: {type(err).__name__}: {err}"[:300])
                            times[name] = float("nan")
                    rows.append((str(dtype)[6:], top_k, N, mode, times, nbytes / times["fused"]))
    print(f"\ncopy bandwidth: {copy_bw / 1e9:.1f} GB/s on {torch.cuda.get_device_name() if dev == 'cuda' else 'cpu'}"
          f" ({'do_bench median' if dev == 'cuda' else 'perf_counter median, interpreter'})")
    names = list(providers)
    head = f"{'dtype':>8} {'k':>2} {'N':>7} {'mode':>8} " + " ".join(f"{n + ' us':>12}" for n in names)
    head += " " + " ".join(f"{'x' + n:>9}" for n in names if n != "fused") + f" {'GB/s':>8} {'%copy':>6}"
    print(head)
    for dt, k, N, mode, times, bw in rows:
        line = f"{dt:>8} {k:>2} {N:>7} {mode:>8} " + " ".join(f"{times[n] * 1e6:12.1f}" for n in names)
        line += " " + " ".join(f"{times[n] / times['fused']:9.2f}" for n in names if n != "fused")
        print(line + f" {bw / 1e9:8.1f} {100 * bw / copy_bw:6.1f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (N=64, D=64), finishes in < 60 s on CPU")
    parser.add_argument("--compile", dest="compile_ref", action="store_true", default=None,
                        help="also time torch.compile of the reference (default: on a GPU only)")
    args = parser.parse_args()
    benchmark(smoke=args.smoke, compile_ref=args.compile_ref)
