"""
Proof without a GPU that every kernel fits an A100 and an H100: `python -m kernels.fused_moa
--compile-report` (TRITON_INTERPRET unset; 8 minutes on 2 cores) compiles each kernel for each
target at the wrapper's launch parameters (x, weights fp32 as moa.MoA passes them; --x matmul: in
the matmul dtype), prints `ptxas -v` registers, spills and shared memory (JSON lines), then traffic.
"""
import argparse
import functools
import itertools
import json
import pathlib
import re
import subprocess
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from kernels import fused_moa as fm

SMEM_LIMIT = {80: 166912, 90: 232448}  # opt-in shared memory per block: A100, H100
BIN = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin"  # ptxas, cuobjdump
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
KERNELS = {"fwd": fm._moa_fwd_kernel, "bwd_tokens": fm._moa_bwd_tokens, "bwd_weights": fm._moa_bwd_weights}
TILES = ("BM", "BK", "BN", "KC", "NS", "BW", "BD", "BT")  # the launch parameters in the JSON lines
D, R, H = 768, 64, 128


def ptxas_v(ptx, cubin, arch):
    """(registers, spill bytes): `ptxas -v` on triton's PTX as triton runs it, checked against the registers and
    stack frame that cuobjdump reads from triton's own binary (the triton wheel ships both tools)."""
    with tempfile.TemporaryDirectory() as tmp:
        src, binary = pathlib.Path(tmp, "kernel.ptx"), pathlib.Path(tmp, "triton.cubin")
        src.write_text(ptx)
        binary.write_bytes(cubin)
        sm = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"  # the target names triton gives ptxas
        log = subprocess.run([BIN / "ptxas", "-lineinfo", "-v", f"--gpu-name={sm}", src, "-o", f"{src}.o"],
                             capture_output=True, text=True, check=True).stderr
        usage = subprocess.check_output([BIN / "cuobjdump", "-res-usage", binary], text=True)
    regs, stack, spill = (int(re.search(rf"(\d+) {what}", log).group(1))
                          for what in ("registers", "bytes stack frame", "bytes spill stores"))
    if f"REG:{regs} STACK:{stack} " not in usage:
        raise RuntimeError(f"ptxas -v and triton {triton.__version__}'s sm_{arch} binary disagree: {usage}")
    return regs, spill


@functools.lru_cache(maxsize=None)  # the backward does not depend on top_k: compiled once per E
def compile_one(kernel, arch, dot, E, top_k, xw=torch.float32):
    """A kernel compiled for sm_<arch>, x and the weights in dtype xw: registers, spills, smem, tiles."""
    fn = KERNELS[kernel]
    meta, warps, stages = fm.launch_params(arch, dot, xw, xw, D, H, E, R)[kernel]
    consts = dict(meta, TOP_K=top_k, HAS_DG=False)
    sig, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in consts:
            sig[name] = "constexpr"
            constexprs[(i,)] = consts[name]
        elif name.endswith("_ptr"):  # 16-byte aligned as launched; P1, P2: matmul dtype; gates, grads: fp32
            sig[name] = f"*{fm.TL[dot if name[0] == 'p' else torch.float32 if name.startswith(('g', 'dg')) else xw]}"
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:  # D is a multiple of 16 too
            sig[name] = "fp32" if name == "temperature" else "i32"
            attrs[(i,)] = [["tt.divisibility", 16]] if name == "D" else []
    binary = triton.compile(ASTSource(fn, sig, constexprs, attrs), target=GPUTarget("cuda", arch, 32),
                            options=dict(num_warps=warps, num_stages=stages))
    regs, spill = ptxas_v(binary.asm["ptx"], binary.asm["cubin"], arch)
    return dict(regs=regs, spill_bytes=spill, smem_bytes=binary.metadata.shared,
                warps=warps, stages=stages, **{k: v for k, v in meta.items() if k in TILES})


def print_traffic(E=4, sw=4, sd=2):
    """HBM MB if each kernel moves each of its tensors once; sw, sd: bytes per weight, scratch."""
    W = (H * D + H + E * H + E + 2 * E * R * D + E * R + E * D) * sw
    p = fm.launch_params(90, torch.bfloat16, torch.float32, torch.float32, D, H, E, R)
    chunk = p["bwd_weights"][0]["CHUNK"]
    for sx in (2, 4):  # bf16 activations; the fp32 stream that moa.MoA passes under autocast
        print(f"\n# traffic (MB): x, y, dy, dx {8 * sx}-bit, bf16 matmuls, fp32 weights, E ="
              f" top_k = {E}. Floor: x, y, weights (+ dy, dx, gradients). Kernel 2 sums tokens"
              f" in chunks of {chunk} into fp32 copies of the gradients, then one sum.\n"
              "#      N   fwd floor ratio  fwd+bwd  floor  ratio  launches")
        for N in (400, 3200, 25600):
            act, gates, scratch = N * D * sx, N * E * 4, N * (2 * E * R + 2 * H + 32) * sd
            copies = triton.cdiv(N, chunk)
            fwd = 2 * act + W + gates             # read x, weights; write y, gates
            k1 = 3 * act + W + gates + scratch     # read x, dy, weights, gates; write dx, P1, P2
            k2 = 2 * act + scratch + copies * W    # read x, dy, P1, P2; write the gradient copies
            both = fwd + k1 + k2 + (copies * W + W if copies > 1 else 0)  # + the sum of the copies
            floor = 4 * act + 2 * W
            print(f"# {N:6} {fwd / 1e6:6.2f} {(2 * act + W) / 1e6:6.2f} {fwd / (2 * act + W):5.2f} "
                  f"{both / 1e6:7.2f} {floor / 1e6:6.2f} {both / floor:6.2f} {3 + (copies > 1):9}")
    progs = [triton.cdiv(400, p[k][0]["BM"]) for k in ("fwd", "bwd_tokens")]
    progs.append(sum(fm.weight_grid(p["bwd_weights"][0], D, H, E, R)))
    per_sm = " / ".join(f"{n / 132:.2f}" for n in progs)
    up = (E * D * R + E * D) * sw / 1e6  # the up-projection's share of the weights
    print(f"# N = 400, 132 SMs: {per_sm} programs per SM (fwd / bwd tokens / bwd weights). A"
          f" forward program streams {W / 1e6:.2f} MB of weights; split over C column groups"
          f" {W / 1e6 - up:.2f} + {up:.2f} / C MB: at most 40 % less.")


def main(argv=None):
    p = argparse.ArgumentParser("python -m kernels.fused_moa", description=__doc__.split(":")[0])
    p.add_argument("--compile-report", action="store_true", help="compile each kernel, report it")
    p.add_argument("--arch", default="80,90", help="compute capabilities (80 = A100, 90 = H100)")
    p.add_argument("--dtype", default="bf16,fp16,fp32", help="matmul dtypes")
    p.add_argument("--x", choices=("fp32", "matmul"), default="fp32", help="x, weights: fp32 or matmul dtype")
    p.add_argument("--experts", default="1,2,4,8,16", help="expert counts E; top_k is 1 and E")
    args = p.parse_args(argv)
    archs, dtypes, experts = args.arch.split(","), args.dtype.split(","), args.experts.split(",")
    if set(archs) - {"80", "90"} or set(dtypes) - set(DTYPES) or set(experts) - set(map(str, range(1, 17))):
        p.error("--arch from 80,90; --dtype from bf16,fp16,fp32; --experts from 1..16 (comma-separated)")
    if not args.compile_report or fm.INTERPRET:
        p.error("need --compile-report, and TRITON_INTERPRET unset: the report compiles GPU code")
    print(f"# triton {triton.__version__}, torch {torch.__version__}, D = {D}, R = {R}, H = {H}")
    for arch, dtype, E in itertools.product(map(int, archs), dtypes, map(int, experts)):
        xw = DTYPES[dtype if args.x == "matmul" else "fp32"]
        for top_k, kernel in itertools.product(sorted({1, E}), KERNELS):
            row = compile_one(kernel, arch, DTYPES[dtype], E, top_k if kernel == "fwd" else E, xw)
            print(json.dumps(dict(kernel=kernel, arch=arch, dtype=dtype, x=args.x, E=E, top_k=top_k, **row,
                                  smem_limit=SMEM_LIMIT[arch])), flush=True)
    print_traffic()
