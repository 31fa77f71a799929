"""
Proof of A100/H100 fitness without a GPU: every kernel compiled, its registers, spills and shared memory.
Each kernel is compiled for each target (triton.compile, GPUTarget) at the wrapper's launch parameters; the
wheel's `ptxas -v` counts registers and spills. One JSON line per kernel and configuration (D 768, R 64, H 128;
x, weights fp32 as moa.MoA passes them; --dtype: the matmuls'), then the modelled traffic. TRITON_INTERPRET unset.
"""
import argparse
import itertools
import json
import math
import os
import re
import subprocess
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from kernels.fused_moa import TL, _moa_bwd_tokens, _moa_bwd_weights, _moa_fwd_kernel, launch_params, weight_grid

SMEM_LIMIT = {80: 166912, 90: 232448}  # opt-in shared memory per block: A100, H100
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
KERNELS = {"fwd": _moa_fwd_kernel, "bwd_tokens": _moa_bwd_tokens, "bwd_weights": _moa_bwd_weights}
EXPERTS = {str(e) for e in range(1, 17)}
D, R, H = 768, 64, 128


def compile_one(kernel, arch, dot, E, top_k, xdt=torch.float32):
    """Compile one kernel for sm_<arch>: registers, spill bytes, shared memory, launch parameters."""
    fn = KERNELS[kernel]
    meta, warps, stages = launch_params(arch, dot, xdt, torch.float32, D, H, E, R)[kernel]
    consts = dict(meta, TOP_K=top_k, HAS_DG=False)
    types = {"x_ptr": xdt, "y_ptr": xdt, "dy_ptr": xdt, "dx_ptr": xdt, "p1_ptr": dot, "p2_ptr": dot}
    sig, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in consts:
            sig[name] = "constexpr"
            constexprs[(i,)] = consts[name]
        elif name.endswith("_ptr"):  # as the launcher specialises them: 16-byte aligned
            sig[name] = "*" + str(TL[types.get(name, torch.float32)])  # weights, gates: fp32
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:  # D is a multiple of 16 too
            sig[name] = "fp32" if name == "temperature" else "i32"
            attrs[(i,)] = [["tt.divisibility", 16]] if name == "D" else []
    binary = triton.compile(ASTSource(fn, sig, constexprs, attrs), target=GPUTarget("cuda", arch, 32),
                            options=dict(num_warps=warps, num_stages=stages))
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(tmp, "k.ptx"), "w") as f:
            f.write(binary.asm["ptx"])
        gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"  # the flags triton passes itself
        log = subprocess.run([ptxas, "-lineinfo", "-v", "--regAllocOptLevel=2", f"--gpu-name={gpu}",
                              f.name, "-o", f.name + ".o"], capture_output=True, text=True,
                             check=True).stderr
    spill = re.search(r"(\d+) bytes spill stores", log)
    tiles = {name: v for name, v in meta.items() if name in ("BM", "BK", "BN", "KC", "NS", "BW", "BD", "BT")}
    return dict(regs=int(re.search(r"Used (\d+) registers", log).group(1)),
                spill_bytes=int(spill.group(1)) if spill else 0, smem_bytes=binary.metadata.shared,
                warps=warps, stages=stages, **tiles)


def print_traffic(E=4, sw=4, sd=2):
    """Modelled HBM MB: a kernel moves each of its tensors once; sw, sd: bytes per weight, per scratch value."""
    W = (H * D + H + E * H + E + 2 * E * R * D + E * R + E * D) * sw
    chunk = launch_params(90, torch.bfloat16, torch.float32, torch.float32, D, H, E, R)["bwd_weights"][0]["CHUNK"]
    for sx in (2, 4):  # bf16 activations; the fp32 stream that moa.MoA passes under autocast
        print(f"\n# traffic (MB): x, y, dy, dx {8 * sx}-bit, bf16 matmuls, fp32 weights, E = top_k = {E}. Floor:"
              f" x, y, weights (+ dy, dx, gradients). Kernel 2 sums tokens in chunks of {chunk} into fp32 copies"
              " of the gradients, then one sum.\n#      N   fwd floor ratio  fwd+bwd  floor  ratio  launches")
        for N in (400, 3200, 25600):
            act, gates, scratch = N * D * sx, N * E * 4, N * (2 * E * R + 2 * H + 32) * sd
            copies = math.ceil(N / chunk)
            fwd = 2 * act + W + gates                 # read x, weights; write y, gates
            k1 = 3 * act + W + gates + scratch         # read x, dy, weights, gates; write dx, P1, P2
            k2 = 2 * act + scratch + copies * W        # read x, dy, P1, P2; write the gradients (copies)
            both, floor = fwd + k1 + k2 + (copies * W + W if copies > 1 else 0), 4 * act + 2 * W
            print(f"# {N:6} {fwd / 1e6:6.2f} {(2 * act + W) / 1e6:6.2f} {fwd / (2 * act + W):5.2f} "
                  f"{both / 1e6:7.2f} {floor / 1e6:6.2f} {both / floor:6.2f} {3 + (copies > 1):9}")
    p = launch_params(90, torch.bfloat16, torch.float32, torch.float32, D, H, E, R)
    progs = [math.ceil(400 / p[k][0]["BM"]) for k in ("fwd", "bwd_tokens")]
    progs.append(sum(weight_grid(p["bwd_weights"][0], D, H, E, R)))
    up = (E * D * R + E * D) * sw / 1e6
    print(f"# N = 400, 132 SMs: {' / '.join(f'{n / 132:.2f}' for n in progs)} programs per SM (fwd / bwd tokens /"
          f" bwd weights). A forward program streams {W / 1e6:.2f} MB of weights; split over C column groups"
          f" {W / 1e6 - up:.2f} + {up:.2f} / C MB: at most 40 % less.")


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m kernels.fused_moa", description=__doc__.split("\n")[1])
    p.add_argument("--compile-report", action="store_true", help="compile each kernel, report it")
    p.add_argument("--arch", default="80,90", help="compute capabilities (80 = A100, 90 = H100)")
    p.add_argument("--dtype", default="bf16,fp16,fp32", help="matmul dtypes (x and the weights: fp32)")
    p.add_argument("--experts", default="1,2,4,8,16", help="expert counts E; top_k is 1 and E")
    args = p.parse_args(argv)
    archs, dtypes, experts = args.arch.split(","), args.dtype.split(","), args.experts.split(",")
    if not set(archs) <= {"80", "90"} or not set(dtypes) <= set(DTYPES) or not set(experts) <= EXPERTS:
        p.error("--arch from 80,90; --dtype from bf16,fp16,fp32; --experts from 1..16 (comma-separated)")
    if not args.compile_report or os.environ.get("TRITON_INTERPRET", "0") == "1":
        p.error("need --compile-report, and TRITON_INTERPRET unset: the report compiles GPU code")
    print(f"# triton {triton.__version__}, torch {torch.__version__}, D = {D}, R = {R}, H = {H}")
    results = {}
    configs = itertools.product(map(int, archs), [DTYPES[d] for d in dtypes], map(int, experts))
    for arch, dot, E in configs:
        for top_k, kernel in itertools.product(sorted({1, E}), KERNELS):
            key = (kernel, arch, dot, E, top_k if kernel == "fwd" else E)  # the backward: any top_k
            if key not in results:
                results[key] = compile_one(*key)
            print(json.dumps(dict(kernel=kernel, arch=arch, dtype=str(TL[dot]), E=E, top_k=top_k,
                                  **results[key], smem_limit=SMEM_LIMIT[arch])), flush=True)
    print_traffic()
