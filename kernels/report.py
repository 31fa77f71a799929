"""
The compile report: proof without a GPU that the kernels fit each GPU class they launch on. Run

    python -m kernels.report [--arch 75,80,86,89,90,120] [--dtype bf16,fp16,fp32] [--experts 1,2,4,8,16]
                             [--bottleneck 16,32,64,128] [--jobs 2]

with TRITON_INTERPRET unset (the full matrix: about 50 minutes on 2 busy cores with --jobs 4). For each
compute capability it takes that GPU class's shared memory per block (SMEM_LIMIT), asks
fused_moa.launch_params for the tiles the wrapper would launch there, compiles each kernel with triton for that target, and prints `ptxas -v`'s
registers, spill bytes and the shared memory, one JSON line per kernel (or the reason the wrapper refuses:
"unsupported"). Then a summary per architecture and the modelled HBM traffic against the floor.
The full matrix is everything the wrapper launches on a GPU: every E in fm.GPU_EXPERTS, every R it accepts,
H = fm.GPU_GATE_HIDDEN, each matmul dtype; x and the weights are fp32 in every launch (the wrapper casts half
ones); D, N, top_k and whether the gates have a gradient are runtime arguments of one binary.
It compiles what launches: every pointer 16-byte aligned and D a multiple of 16 (the wrapper guarantees both),
N, top_k, the flags and the grid sizes unspecialised (the kernels say do_not_specialize).
"""

import argparse
import itertools
import json
import multiprocessing
import pathlib
import re
import subprocess
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from kernels import fused_moa as fm

# opt-in shared memory per block of each GPU class the report covers: T4; A100; RTX 30xx, A6000 (sm_86);
# RTX 40xx, L4, L40 (sm_89); H100/H200; RTX 50xx (sm_120)
SMEM_LIMIT = {
    75: fm.SMEM_T4,
    80: fm.SMEM_A100,
    86: fm.SMEM_RTX,
    89: fm.SMEM_RTX,
    90: fm.SMEM_H100,
    120: fm.SMEM_RTX,
}
BIN = pathlib.Path(triton.__file__).parent / "backends/nvidia/bin"  # ptxas, cuobjdump
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
KERNELS = {"fwd": fm._moa_fwd_kernel, "bwd_tokens": fm._moa_bwd_tokens, "bwd_weights": fm._moa_bwd_weights}
# the launch parameters in the JSON lines
TILES = ("BM", "BK", "BN", "KC", "NS", "BW", "BD", "BT", "maxnreg")
# the flags: the values each may take (all of them by default; a dict's keys), and its help
CHOICES = {
    "arch": (SMEM_LIMIT, "compute capabilities: 75 T4, 80 A100, 86/89 RTX 30/40, 90 H100, 120 RTX 50"),
    "dtype": (DTYPES, "matmul dtypes"),
    "experts": (fm.GPU_EXPERTS, "expert counts E"),
    "bottleneck": (fm.WIDTHS, "expert ranks R"),
}
D, H = 768, fm.GPU_GATE_HIDDEN


def ptxas_v(ptx, cubin, arch):
    """(registers, spill bytes): `ptxas -v` on triton's PTX as triton runs it, checked against the registers
    and stack frame that cuobjdump reads from triton's own binary (the triton wheel ships both tools). Some
    triton versions add --regAllocOptLevel=2: the log that matches the binary is the one reported."""
    # the wheel's ptxas-blackwell from sm_100 on; older wheels ship one ptxas
    tool = BIN / "ptxas-blackwell"
    if arch < 100 or not tool.exists():
        tool = BIN / "ptxas"
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        src = tmp / "kernel.ptx"
        binary = tmp / "triton.cubin"
        src.write_text(ptx)
        binary.write_bytes(cubin)
        usage = subprocess.check_output([BIN / "cuobjdump", "-res-usage", binary], text=True)
        # triton compiles for the arch-specific sm_90a, sm_120a
        target = f"--gpu-name=sm_{arch}a" if arch >= 90 else f"--gpu-name=sm_{arch}"
        for extra in ([], ["--regAllocOptLevel=2"]):
            log = subprocess.check_output(
                [tool, "-lineinfo", "-v", *extra, target, src, "-o", f"{src}.o"],
                stderr=subprocess.STDOUT,
                text=True,
            )
            regs, stack, spill = (
                int(re.search(rf"(\d+) {what}", log).group(1))
                for what in ("registers", "bytes stack frame", "bytes spill stores")
            )
            if f"REG:{regs} STACK:{stack} " in usage:
                return regs, spill
    raise RuntimeError(f"ptxas -v and triton {triton.__version__}'s sm_{arch} binary disagree: {usage}")


def source(fn, consts, dot):
    """What triton.compile compiles: the kernel with the signature, constants and attributes it is launched
    with."""
    sig = {}
    constexprs = {}
    attrs = {}
    for i, name in enumerate(fn.arg_names):
        if name in consts:
            sig[name] = "constexpr"
            constexprs[(i,)] = consts[name]
        elif name.endswith("_ptr"):
            # P1, P2 in the matmul dtype; x, dy, dx, the weights, the gates and every gradient fp32
            sig[name] = f"*{fm.TL[dot if name.startswith('p') else torch.float32]}"
        else:
            sig[name] = "fp32" if name == "temperature" else "i32"
        # every pointer 16-byte aligned as launched and D a multiple of 16; N and the grid sizes not specialised
        if name.endswith("_ptr") or name == "D":
            attrs[(i,)] = [["tt.divisibility", 16]]
    return ASTSource(fn, sig, constexprs, attrs)


def compile_one(config):
    """The JSON row of a kernel at config = (arch, dtype, E, R, kernel), compiled for sm_<arch> at its launch
    parameters there: registers, spills, smem, tiles; or "unsupported" with the reason the wrapper would refuse
    the call (moa.MoA's auto then runs PyTorch)."""
    arch, dtype, E, R, kernel = config
    row = dict(kernel=kernel, arch=arch, dtype=dtype, E=E, R=R, smem_limit=SMEM_LIMIT[arch])
    dot = DTYPES[dtype]
    try:
        meta, warps, stages = fm.launch_params(arch, SMEM_LIMIT[arch], dot, D, H, E, R)[kernel]
    except fm.NotSupported as e:
        return dict(row, unsupported=str(e))
    binary = triton.compile(
        source(KERNELS[kernel], meta, dot),
        target=GPUTarget("cuda", arch, 32),
        options=dict(num_warps=warps, num_stages=stages, maxnreg=meta.get("maxnreg")),
    )
    regs, spill = ptxas_v(binary.asm["ptx"], binary.asm["cubin"], arch)
    return dict(
        row,
        regs=regs,
        spill_bytes=spill,
        smem_bytes=binary.metadata.shared,
        warps=warps,
        stages=stages,
        # mma.sync or wgmma; Turing's tl.dot runs on the FMA units
        tensor_cores="mma" in binary.asm["ptx"],
        **{k: meta[k] for k in TILES if k in meta},
    )


def hbm_floor(A, W, G):
    """(forward, forward + backward) bytes that any implementation must move: A the bytes of one activation
    tensor (N D), W of the weights, G of the fp32 gates (N E). Forward: read x and W, write y and the gates:
    2A + W + G. The backward, a separate pass, reads dy, x again (for dWd, dW1), W again (for dx, T) and the
    gates, and writes dx and the weight gradients: 3A + 2W + G. In all 5A + 3W + 2G. (The docs once used
    4A + 2W, which leaves out the second reads of x and the weights, and the gates.)"""
    return 2 * A + W + G, 5 * A + 3 * W + 2 * G


def print_traffic():
    """HBM MB if each kernel moves each of its tensors once, for one MoA layer of the paper (E = 4, R = 64)."""
    E = 4
    R = 64
    # all 8 fp32 weights
    W = (H * D + H + E * H + E + 2 * E * R * D + E * R + E * D) * 4
    chunk = fm.launch_params(90, SMEM_LIMIT[90], torch.bfloat16, D, H, E, R)["bwd_weights"][0]["CHUNK"]
    # bf16 activations; the fp32 stream that moa.MoA passes under autocast
    for sx in (2, 4):
        print(
            f"\n# traffic (MB): x, y, dy, dx {8 * sx}-bit, bf16 matmuls, fp32 weights, E = top_k = {E}.\n"
            "# Floor: 2A + W + G forward, 5A + 3W + 2G forward + backward (A: an activation tensor,\n"
            f"# W: the weights, G: the gates). Kernel 2 sums tokens in chunks of {chunk} into fp32 copies\n"
            "# of the gradients, then one sum.\n"
            "#      N    fwd  floor ratio  fwd+bwd  floor  ratio  launches"
        )
        for N in (400, 3200, 25600):
            act = N * D * sx
            gates = N * E * 4
            scratch = N * (2 * E * R + 2 * H + 32) * 2  # bf16 P1, P2
            copies = triton.cdiv(N, chunk)
            # read x, weights; write y, gates
            fwd = 2 * act + W + gates
            # then the token kernel reads x, dy, weights, gates and writes dx, P1, P2 (3A + W + G + P1, P2); the
            # weight kernel reads x, dy, P1, P2 and writes the gradient copies (2A + P1, P2 + copies W)
            total = fwd + 5 * act + W + gates + 2 * scratch + copies * W
            # the sum of the copies: read them, write one
            if copies > 1:
                total += copies * W + W
            fwd_floor, floor = hbm_floor(act, W, gates)
            print(
                f"# {N:6} {fwd / 1e6:6.2f} {fwd_floor / 1e6:6.2f} {fwd / fwd_floor:5.2f} "
                f"{total / 1e6:8.2f} {floor / 1e6:6.2f} {total / floor:6.2f} {3 + (copies > 1):9}"
            )


def print_summary(rows):
    """Per architecture: rows compiled, rows the wrapper refuses, the largest spill and shared memory."""
    print("\n# summary: arch, smem limit, rows compiled, unsupported, max spill bytes, max smem (% of limit)")
    for arch in SMEM_LIMIT:
        mine = [r for r in rows if r["arch"] == arch]
        built = [r for r in mine if "unsupported" not in r]
        max_spill, max_smem = (max((r[k] for r in built), default=0) for k in ("spill_bytes", "smem_bytes"))
        if mine:
            print(
                f"# sm_{arch:<4} {SMEM_LIMIT[arch]:8,} {len(built):5} {len(mine) - len(built):5} {max_spill:6} "
                f"{max_smem:9,} ({100 * max_smem / SMEM_LIMIT[arch]:.0f} %)"
            )
    for arch, reason in sorted({(r["arch"], r["unsupported"]) for r in rows if "unsupported" in r}):
        print(f"# unsupported on sm_{arch}: {reason}")


def parse_args():
    """{flag: the values picked, in CHOICES' order}, and the number of compiles run at once."""
    p = argparse.ArgumentParser("python -m kernels.report", description=__doc__.split("\n")[1])
    for flag, (choices, what) in CHOICES.items():
        p.add_argument(f"--{flag}", default=",".join(map(str, choices)), help=what)
    p.add_argument("--jobs", type=int, default=2, help="compiles at once (processes)")
    args = p.parse_args()
    picked = {}
    for flag, (choices, _) in CHOICES.items():
        given = getattr(args, flag).split(",")
        picked[flag] = [c for c in choices if str(c) in given]
        if len(picked[flag]) != len(set(given)):
            p.error(f"--{flag} {getattr(args, flag)}: from {','.join(map(str, choices))} (comma-separated)")
    if args.jobs < 1:
        p.error(f"--jobs {args.jobs}: at least 1")
    if fm.INTERPRET:
        p.error("TRITON_INTERPRET=1: the report compiles GPU code; unset it")
    return picked, args.jobs


def main():
    picked, jobs = parse_args()
    print(f"# triton {triton.__version__}, torch {torch.__version__}, D = {D}, H = {H}")
    # what fused_moa accepts: E R <= 1024
    configs = [
        c for c in itertools.product(*picked.values(), KERNELS) if triton.next_power_of_2(c[2]) * c[3] <= 1024
    ]
    rows = []
    # in order, each row printed as soon as it and those before it are compiled
    with multiprocessing.Pool(jobs) as pool:
        for row in pool.imap(compile_one, configs):
            rows.append(row)
            print(json.dumps(row), flush=True)
    print_summary(rows)
    print_traffic()


if __name__ == "__main__":
    main()
