"""
Benchmark of the fused MoA kernel (kernels/) against three PyTorch baselines, measured side by side in one run:
`loop` (the authors' style: route, then one small MLP per expert, defined here), `dense` (moa.moa_reference) and
`compiled` (torch.compile of moa_reference). Forward and forward+backward; each row prints microseconds per call,
the speed-up of `fused` over each baseline (x = baseline time / fused time) and the fused kernel's effective
bandwidth against the HBM floor of kernels/report.py (2A + W + G forward, 5A + 3W + 2G forward + backward).
dtype "autocast": fp32 x and fp32 weights under moa.runtime's autocast (bf16; fp16 on a GPU without bf16), the
way train.py runs the layer.
A benchmark, not a test (pytest does not collect it); GPU timings use triton.testing.do_bench (median).

    python bench/bench_moa.py [--sizes 400,3200,25600] [--dtypes autocast,bf16,fp32] [--top-k 4,1] [--no-compile]
    python bench/bench_moa.py --sweep [--budget 150]   # GPU: launch-parameter candidates, checked and timed
    ncu --profile-from-start off ... python bench/bench_moa.py --profile   # GPU: DRAM bytes (docs/kernel-log.md)
    TRITON_INTERPRET=1 python bench/bench_moa.py --smoke      # tiny CPU run through the interpreter (< 1 min)
"""

import argparse
import json
import math
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import moa  # noqa: E402
from kernels.fused_moa import fused_moa  # noqa: E402
from kernels.report import hbm_floor  # noqa: E402

DTYPES = {"autocast": torch.float32, "bf16": torch.bfloat16, "fp32": torch.float32}


def amp_dtype():  # the autocast dtype train.py uses on this GPU: bf16, or fp16 where the GPU has no bf16
    return moa.runtime("cuda").dtype


def weight_shapes(D, E=4, R=64, H=128):
    """fused_moa's eight weights, in its argument order: gate W1, b1, W2, b2; down_w, down_b, up_w, up_b."""
    return [(H, D), (H,), (E, H), (E,), (E, R, D), (E, R), (E, D, R), (E, D)]


def moa_loop(x, gate_w1, gate_b1, gate_w2, gate_b2, down_w, down_b, up_w, up_b, top_k, temperature):
    """The authors' style baseline: route, then one small MLP per expert, added with its gate."""
    logits = F.linear(F.relu(F.linear(x, gate_w1, gate_b1)), gate_w2, gate_b2) / temperature
    if top_k < logits.shape[-1]:
        idx = logits.topk(top_k, dim=-1).indices
        logits = logits.masked_fill(
            ~torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, idx, True), -math.inf
        )
    gates = logits.softmax(-1)
    y = x
    for e in range(down_w.shape[0]):
        y = y + gates[..., e : e + 1] * F.linear(F.gelu(F.linear(x, down_w[e], down_b[e])), up_w[e], up_b[e])
    return y, gates


def seconds(fn, on_gpu, reps=5):
    """Median seconds per call: do_bench on a GPU (it flushes L2 between calls), perf_counter on the CPU."""
    if on_gpu:
        return triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median") * 1e-3
    fn()
    fn()  # warm-up: the first calls trace the kernels
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def run(sizes, dtypes, top_ks, D, use_compile, as_json):
    on_gpu = torch.cuda.is_available()
    dev = "cuda" if on_gpu else "cpu"
    E, R, H, tau = 4, 64, 128, 2.0
    providers = {"loop": moa_loop, "dense": moa.moa_reference}
    if use_compile:
        providers["compiled"] = torch.compile(moa.moa_reference, dynamic=True)
    providers["fused"] = fused_moa
    gen = torch.Generator().manual_seed(0)
    shapes = weight_shapes(D, E, R, H)
    src = torch.empty(2 ** (28 if on_gpu else 22), dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    copy_bw = 2 * src.numel() / seconds(lambda: dst.copy_(src), on_gpu)  # bytes/s, read + write
    print(
        f"{torch.cuda.get_device_name() if on_gpu else 'CPU (interpreter)'}, torch {torch.__version__}, "
        f"triton {triton.__version__}; D={D} E={E} R={R} H={H}; copy bandwidth {copy_bw / 1e9:.0f} GB/s\n"
        "x<name> = <name> us / fused us; x floor = fused time / (floor bytes / copy bandwidth)"
    )
    print(
        f"{'dtype':>8} {'k':>2} {'N':>6} {'mode':>7} "
        + " ".join(f"{n + ' us':>11}" for n in providers)
        + " "
        + " ".join(f"{'x' + n:>9}" for n in providers if n != "fused")
        + f" {'GB/s':>7} {'x floor':>7}"
    )
    for name in dtypes:  # (the weights are fp32 for "autocast" and "fp32")
        dtype = DTYPES[name]
        ws = [
            (torch.randn(sh, generator=gen) * (sh[-1] ** -0.5 if len(sh) > 1 else 0.1)).to(dev, dtype)
            for sh in shapes
        ]
        wbytes = sum(w.numel() * w.element_size() for w in ws)
        for top_k in top_ks:
            for N in sizes:
                x = torch.randn(N, D, generator=gen).to(dev, dtype)
                dy = torch.randn(N, D, generator=gen).to(dev, dtype)
                for mode in ("fwd", "fwd+bwd"):
                    fwd_floor, both_floor = hbm_floor(N * D * x.element_size(), wbytes, N * E * 4)
                    floor = fwd_floor if mode == "fwd" else both_floor
                    us = {
                        p: time_one(fn, x, dy, ws, top_k, tau, mode, name, on_gpu) * 1e6
                        for p, fn in providers.items()
                    }
                    ratios = {p: us[p] / us["fused"] for p in providers if p != "fused"}
                    gbps = floor / us["fused"] * 1e-3
                    print(
                        f"{name:>8} {top_k:>2} {N:>6} {mode:>7} "
                        + " ".join(f"{us[p]:11.1f}" for p in providers)
                        + " "
                        + " ".join(f"{r:9.2f}" for r in ratios.values())
                        + f" {gbps:7.0f} {us['fused'] * 1e-6 * copy_bw / floor:7.2f}",
                        flush=True,
                    )
                    if as_json:
                        print(
                            json.dumps(
                                dict(
                                    dtype=name, top_k=top_k, N=N, mode=mode, us=us, vs_fused=ratios, gbps=gbps
                                )
                            )
                        )


def time_one(fn, x, dy, ws, top_k, tau, mode, name, on_gpu):
    leaves = [t.detach().requires_grad_(mode != "fwd") for t in [x] + ws]
    amp = torch.autocast("cuda", dtype=amp_dtype()) if name == "autocast" and on_gpu else nullcontext()

    def call():
        with amp, torch.set_grad_enabled(mode != "fwd"):
            y, _ = fn(*leaves, top_k, tau)
        if mode != "fwd":
            torch.autograd.backward(y, dy.to(y.dtype))
            for t in leaves:
                t.grad = None

    try:
        return seconds(call, on_gpu)
    except Exception as err:  # noqa: BLE001 - e.g. out of memory or a compile failure: report it, go on
        print(f"  {getattr(fn, '__name__', fn)} {name} {mode}: {type(err).__name__}: {err}"[:300])
        return float("nan")


SWEEP = {  # per kernel: candidate overrides of launch_params' choice (tile sizes, warps, stages). Each list
    # starts with today's tiles at other stages: ncu found the forward at 1 block per SM and the weight kernel
    # at 2, bounded by registers and by shared memory (docs/kernel-log.md, "What bounds each kernel")
    "fwd": [dict(stages=2)]
    + [
        dict(BM=bm, BN=bn, warps=w, stages=st)
        for bm, w in ((128, 8), (64, 4), (64, 8), (32, 4))
        for bn in (64, 128)
        for st in (2, 3)
    ],
    "bwd_tokens": [dict(stages=3)]
    + [
        dict(BM=bm, NS=ns, warps=w)
        for bm in (64, 32, 16)
        for ns in (2, 4, 1)
        for w in (8, 4)
        if bm * 256 // ns <= 8192
    ],
    # CHUNK 1 << 30: all tokens in one chunk, each weight tile's program loops over all of them
    "bwd_weights": [dict(stages=3), dict(stages=2)]
    + [
        dict(BW=bw, BD=bd, BT=bt, CHUNK=chunk, warps=w)
        for chunk in (4096, 1 << 30)
        for bw, bd in ((128, 128), (128, 64), (64, 64))
        for bt in (64, 32)
        for w in (8, 4)
    ],
}


def sweep(sizes, budget, D=768, limit=None):
    """Each kernel's candidates (the other two kernels at launch_params' choice): fp32 x and weights under bf16
    autocast (fp32 without a GPU), E = top_k = 4. A candidate is checked against moa_reference (relative error
    of y, dx and d down_w at N = 512), then timed: the forward alone for "fwd", forward + backward otherwise."""
    import kernels.fused_moa as fm

    base, on_gpu = fm.launch_params, torch.cuda.is_available()
    dev = "cuda" if on_gpu else "cpu"
    amp = torch.autocast("cuda", dtype=amp_dtype()) if on_gpu else nullcontext()
    E, R, H, tau = 4, 64, 128, 2.0
    gen = torch.Generator().manual_seed(0)
    shapes = weight_shapes(D, E, R, H)
    ws = [
        (torch.randn(sh, generator=gen) * (sh[-1] ** -0.5 if len(sh) > 1 else 0.1)).to(dev) for sh in shapes
    ]
    check_n = 512 if on_gpu else sizes[0]
    xs = {N: torch.randn(N, D, generator=gen).to(dev) for N in [check_n] + sizes}
    dys = {N: torch.randn(N, D, generator=gen).to(dev) for N in xs}

    def call(fn, N, grad=True):
        leaves = [t.detach().requires_grad_(grad) for t in [xs[N]] + ws]
        with amp, torch.set_grad_enabled(grad):
            y, _ = fn(*leaves, E, tau)
        if grad:
            torch.autograd.backward(y, dys[N])
            return [y.detach().float(), leaves[0].grad, leaves[5].grad]

    want = call(moa.moa_reference, check_n)
    arch, smem = fm.device_limits(torch.cuda.current_device()) if on_gpu else (None, None)
    dot = amp_dtype() if on_gpu else torch.float32
    print(
        f"{torch.cuda.get_device_name() if on_gpu else 'CPU (interpreter)'}, triton {triton.__version__}; "
        f"launch_params today: {base(arch, smem, dot, D, H, E, R)}"
    )
    for kernel, candidates in SWEEP.items():
        mode = "fwd" if kernel == "fwd" else "fwd+bwd"
        print(f"\n# {kernel}: {mode} us per call at N = {sizes}; err: relative error against the reference")
        t_end = time.perf_counter() + budget / len(SWEEP)  # each kernel gets its share of the budget
        for over in ([{}] + candidates)[:limit]:
            if time.perf_counter() > t_end:
                print("# this kernel's share of --budget is spent")
                break
            meta_over = {k: v for k, v in over.items() if k not in ("warps", "stages")}

            def patched(*args, over=over, meta_over=meta_over, kernel=kernel):
                p = dict(base(*args))
                meta, warps, stages = p[kernel]
                p[kernel] = ({**meta, **meta_over}, over.get("warps", warps), over.get("stages", stages))
                return p

            fm.launch_params = patched
            try:
                got = call(fused_moa, check_n)
                err = max(float((g - w).norm() / w.norm()) for g, w in zip(got, want))
                us = [seconds(lambda N=N: call(fused_moa, N, mode != "fwd"), on_gpu) * 1e6 for N in sizes]
                name = json.dumps(over) if over else "today's"
                print(f"{name:<60} err {err:.1e} us " + " ".join(f"{u:8.1f}" for u in us), flush=True)
            except Exception as e:  # noqa: BLE001 - e.g. out of shared memory: report it, go on
                print(f"{json.dumps(over):<60} failed: {type(e).__name__}: {' '.join(str(e).split())[:120]}")
            finally:
                fm.launch_params = base


def profile(sizes, dtypes, D=768):
    """For ncu (docs/kernel-log.md): the fused forward, then the backward, once per dtype and N, each alone between
    cudaProfilerStart and Stop with L2 flushed before it (in training, other layers run in between). fp32
    weights, as the traffic model of kernels/report.py: "bf16" is bf16 x with them, "autocast" fp32 x."""
    E, R, H, tau = 4, 64, 128, 2.0
    gen = torch.Generator().manual_seed(0)
    shapes = weight_shapes(D, E, R, H)
    ws = [torch.randn(sh, generator=gen).cuda().requires_grad_() for sh in shapes]
    flush = torch.empty(2**28, dtype=torch.uint8, device="cuda")  # 256 MB, well over any L2

    def region(fn, profiled):  # run fn alone, after an L2 flush; profiled: under ncu
        flush.zero_()
        torch.cuda.synchronize()
        if profiled:
            torch.cuda.profiler.start()
        out = fn()
        torch.cuda.synchronize()
        if profiled:
            torch.cuda.profiler.stop()
        return out

    for name in dtypes:
        amp = torch.autocast("cuda", amp_dtype(), enabled=name == "autocast")
        for N in sizes:
            x = torch.randn(N, D, generator=gen).to("cuda", DTYPES[name]).requires_grad_()
            dy = torch.randn(N, D, generator=gen).to("cuda", DTYPES[name])
            for profiled in (False, True):  # the first call compiles the kernels
                with amp:
                    y = region(lambda: fused_moa(x, *ws, E, tau)[0], profiled)
                for t in [x] + ws:
                    t.grad = None  # else the second backward adds into .grad: 9 more kernels
                region(lambda: torch.autograd.backward(y, dy), profiled)
            print(f"profiled: {name} N={N} (forward, then backward)", flush=True)


def summarize_ncu(path, sizes, dtypes, D=768):
    """Read the ncu CSV of --profile (--csv --print-units base) and print, per dtype and N, the DRAM bytes and
    the kernels' GPU time of the forward and of forward + backward, against the floor of kernels/report.py."""
    import csv

    lines = Path(path).read_text().splitlines()
    head = [i for i, line in enumerate(lines) if line.startswith('"ID"')]
    if not head:
        sys.exit(f'{path}: no ncu CSV header ("ID",...): run ncu with --csv --print-units base')
    kernels = {}  # ID -> {"name", metric: value}
    for r in csv.DictReader(lines[head[0] :]):
        k = kernels.setdefault(int(r["ID"]), {"name": r["Kernel Name"]})
        k[r["Metric Name"]] = float(r["Metric Value"].replace(",", ""))
    metrics = ("dram__bytes_read.sum", "dram__bytes_write.sum", "gpu__time_duration.sum")
    if any(m not in k for k in kernels.values() for m in metrics):
        sys.exit(f"{path}: each kernel needs the metrics {', '.join(metrics)}")
    runs = []  # one list of kernels per dtype and N: each starts with the forward kernel
    for _, k in sorted(kernels.items()):
        if "_moa_fwd_kernel" in k["name"]:
            runs.append([])
        runs[-1].append(k)
    configs = [(name, N) for name in dtypes for N in sizes]
    if len(runs) != len(configs):
        sys.exit(f"{path}: {len(runs)} forward kernels for {len(configs)} configurations")
    wbytes = 4 * sum(math.prod(sh) for sh in weight_shapes(D))  # fp32 weights
    print("dtype       N  fwd MB  floor  ratio  fwd+bwd MB  floor  ratio  launches  fwd us  bwd us")
    for (name, N), ks in zip(configs, runs):
        act = N * D * (2 if name == "bf16" else 4)
        mb = [(k["dram__bytes_read.sum"] + k["dram__bytes_write.sum"]) / 1e6 for k in ks]
        us = [k["gpu__time_duration.sum"] / 1e3 for k in ks]  # ns
        fwd_floor, floor = [b / 1e6 for b in hbm_floor(act, wbytes, N * 4 * 4)]  # E = 4 fp32 gates
        print(
            f"{name:>8} {N:6} {mb[0]:7.2f} {fwd_floor:6.2f} {mb[0] / fwd_floor:6.2f} {sum(mb):11.2f} "
            f"{floor:6.2f} {sum(mb) / floor:6.2f} {len(ks):9} {us[0]:7.1f} {sum(us[1:]):7.1f}"
        )


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    p.add_argument("--sizes", default="400,3200,25600", help="token counts N, comma-separated")
    p.add_argument("--dtypes", default="autocast,bf16,fp32", help=f"from {','.join(DTYPES)}")
    p.add_argument("--top-k", default="4,1", help="experts kept per token (E = 4), comma-separated")
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile (its first calls compile)")
    p.add_argument("--json", action="store_true", help="also print one JSON line per row")
    p.add_argument("--smoke", action="store_true", help="N=64, D=64, fp32, no torch.compile: a CPU check")
    p.add_argument("--sweep", action="store_true", help="GPU: time launch-parameter candidates per kernel")
    p.add_argument("--budget", type=float, default=150, help="seconds for --sweep")
    p.add_argument(
        "--profile", action="store_true", help="GPU, under ncu: one fused fwd and bwd per dtype and N"
    )
    p.add_argument("--ncu-csv", help="summarize the ncu CSV of --profile (same --sizes and --dtypes)")
    args = p.parse_args()
    try:
        sizes = [int(n) for n in args.sizes.split(",")]
        top_ks = [int(k) for k in args.top_k.split(",")]
        dtypes = args.dtypes.split(",")
    except ValueError as err:
        p.error(f"bad list: {err}")
    if not set(dtypes) <= set(DTYPES) or not all(1 <= k <= 4 for k in top_ks) or min(sizes) < 1:
        p.error(f"--dtypes from {list(DTYPES)}, --top-k from 1..4, --sizes >= 1")
    if args.ncu_csv:
        summarize_ncu(args.ncu_csv, sizes, dtypes)
    elif not torch.cuda.is_available() and not args.smoke:
        p.error("no GPU: run TRITON_INTERPRET=1 python bench/bench_moa.py --smoke")
    elif args.sweep and args.smoke:
        torch.set_num_threads(1)
        sweep([64], args.budget, D=64, limit=2)
    elif args.sweep:
        sweep(sizes, args.budget)
    elif args.profile:
        profile(sizes, dtypes)
    elif args.smoke:
        torch.set_num_threads(
            1
        )  # the interpreter's numpy and torch's thread pool otherwise fight over the cores
        run([64], ["fp32"], [4], 64, False, args.json)
    else:
        run(sizes, dtypes, top_ks, 768, not args.no_compile, args.json)
