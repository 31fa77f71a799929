"""
The compile report: proof without a GPU that the kernels fit each GPU class they launch on. Run

    python -m kernels.report [--arch 75,80,86,89,90,120] [--dtype bf16,fp16,fp32] [--experts 1,2,4,8,16]

with TRITON_INTERPRET unset (the full matrix: about 10 minutes on 2 cores). For each compute capability it
takes that GPU class's shared memory per block (SMEM_LIMIT), asks fused_moa.launch_params for the tiles the
wrapper would launch there, compiles each kernel with triton for that target, and prints `ptxas -v`'s
registers, spill bytes and the shared memory, one JSON line per kernel (or the reason the wrapper refuses:
"unsupported"). Then a summary per architecture and the modelled HBM traffic against the floor.
It compiles what launches: every pointer 16-byte aligned and D a multiple of 16 (the wrapper guarantees both),
N and the grid sizes unspecialised (the kernels say do_not_specialize), HAS_DG False (moa.MoA detaches the
gates); x and the weights fp32 as moa.MoA passes them (--x matmul: in the matmul dtype, as a direct caller
may).
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

# opt-in shared memory per block of each GPU class the report covers: T4; A100; RTX 30xx, A6000 (sm_86);
# RTX 40xx, L4, L40 (sm_89); H100/H200; RTX 50xx (sm_120)
SMEM_LIMIT = {75: 65536, 80: 166912, 86: 101376, 89: 101376, 90: 232448, 120: 101376}
BIN = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin"  # ptxas, cuobjdump
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
KERNELS = {"fwd": fm._moa_fwd_kernel, "bwd_tokens": fm._moa_bwd_tokens, "bwd_weights": fm._moa_bwd_weights}
# the launch parameters in the JSON lines
TILES = ("BM", "BK", "BN", "KC", "NS", "BW", "BD", "BT")
D, R, H = 768, 64, 128


def ptxas_for(arch):
    """The ptxas triton uses for sm_<arch> (the wheel's ptxas-blackwell from sm_100 on), the target name."""
    tool = BIN / ("ptxas-blackwell" if arch >= 100 else "ptxas")
    if not tool.exists():  # older wheels ship one ptxas
        tool = BIN / "ptxas"
    # triton compiles for the arch-specific sm_90a, sm_120a
    suffix = "a" if arch >= 90 else ""
    return tool, f"sm_{arch}{suffix}"


def ptxas_v(ptx, cubin, arch):
    """(registers, spill bytes): `ptxas -v` on triton's PTX as triton runs it, checked against the registers
    and stack frame that cuobjdump reads from triton's own binary (the triton wheel ships both tools). Some
    triton versions add --regAllocOptLevel=2: the log that matches the binary is the one reported."""
    tool, target = ptxas_for(arch)
    with tempfile.TemporaryDirectory() as tmp:
        src = pathlib.Path(tmp, "kernel.ptx")
        binary = pathlib.Path(tmp, "triton.cubin")
        src.write_text(ptx)
        binary.write_bytes(cubin)
        usage = subprocess.check_output([BIN / "cuobjdump", "-res-usage", binary], text=True)
        for extra in ([], ["--regAllocOptLevel=2"]):
            command = [tool, "-lineinfo", "-v", *extra, f"--gpu-name={target}", src, "-o", f"{src}.o"]
            log = subprocess.run(command, capture_output=True, text=True, check=True).stderr
            regs = int(re.search(r"(\d+) registers", log).group(1))
            stack = int(re.search(r"(\d+) bytes stack frame", log).group(1))
            spill = int(re.search(r"(\d+) bytes spill stores", log).group(1))
            if f"REG:{regs} STACK:{stack} " in usage:
                return regs, spill
    raise RuntimeError(f"ptxas -v and triton {triton.__version__}'s sm_{arch} binary disagree: {usage}")


def signature(fn, consts, dot, xw):
    """triton.compile's signature, constants and attributes for the kernel as the wrapper launches it."""
    sig = {}
    constexprs = {}
    attrs = {}
    for i, name in enumerate(fn.arg_names):
        if name in consts:
            sig[name] = "constexpr"
            constexprs[(i,)] = consts[name]
        elif name.endswith("_ptr"):  # 16-byte aligned as launched
            if name.startswith("p"):  # P1, P2: the matmul dtype
                dtype = dot
            # the gates, their gradient, the weight gradients: fp32
            elif name.startswith(("g", "dg")):
                dtype = torch.float32
            else:
                dtype = xw
            sig[name] = f"*{fm.TL[dtype]}"
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name == "temperature":
            sig[name] = "fp32"
        # D is a multiple of 16; N and the grid sizes are not specialised
        else:
            sig[name] = "i32"
            attrs[(i,)] = [["tt.divisibility", 16]] if name == "D" else []
    return sig, constexprs, attrs


# the backward does not depend on top_k: compiled once per E
@functools.lru_cache(maxsize=None)
def compile_one(kernel, arch, dot, E, top_k, xw=torch.float32):
    """A kernel compiled for sm_<arch> at its launch parameters there: registers, spills, smem, tiles; or
    {"unsupported": why} where the wrapper would refuse the call (moa.MoA's auto then runs PyTorch)."""
    try:
        params = fm.launch_params(arch, SMEM_LIMIT[arch], dot, xw, xw, D, H, E, R)
    except fm.NotSupported as e:
        return {"unsupported": str(e)}
    meta, warps, stages = params[kernel]
    fn = KERNELS[kernel]
    sig, constexprs, attrs = signature(fn, dict(meta, TOP_K=top_k, HAS_DG=False), dot, xw)
    binary = triton.compile(
        ASTSource(fn, sig, constexprs, attrs),
        target=GPUTarget("cuda", arch, 32),
        options=dict(num_warps=warps, num_stages=stages),
    )
    regs, spill = ptxas_v(binary.asm["ptx"], binary.asm["cubin"], arch)
    tiles = {k: v for k, v in meta.items() if k in TILES}
    # mma.sync or wgmma; Turing's tl.dot runs on the FMA units
    tensor_cores = "mma" in binary.asm["ptx"]
    return dict(
        regs=regs,
        spill_bytes=spill,
        smem_bytes=binary.metadata.shared,
        warps=warps,
        stages=stages,
        tensor_cores=tensor_cores,
        **tiles,
    )


def weight_bytes(E, bytes_per_weight=4):
    """All 8 weights of one MoA layer (D = 768, R = 64, H = 128)."""
    return (H * D + H + E * H + E + 2 * E * R * D + E * R + E * D) * bytes_per_weight


def hbm_floor(A, W, G):
    """(forward, forward + backward) bytes that any implementation must move: A the bytes of one activation
    tensor (N D), W of the weights, G of the fp32 gates (N E). Forward: read x and W, write y and the gates:
    2A + W + G. The backward, a separate pass, reads dy, x again (for dWd, dW1), W again (for dx, T) and the
    gates, and writes dx and the weight gradients: 3A + 2W + G. In all 5A + 3W + 2G. (The docs once used
    4A + 2W, which leaves out the second reads of x and the weights, and the gates.)"""
    return 2 * A + W + G, 5 * A + 3 * W + 2 * G


def print_traffic(E=4, sw=4, sd=2):
    """HBM MB if each kernel moves each of its tensors once; sw, sd: bytes per weight, scratch."""
    W = weight_bytes(E, sw)
    params = fm.launch_params(90, SMEM_LIMIT[90], torch.bfloat16, torch.float32, torch.float32, D, H, E, R)
    chunk = params["bwd_weights"][0]["CHUNK"]
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
            scratch = N * (2 * E * R + 2 * H + 32) * sd
            copies = triton.cdiv(N, chunk)
            # read x, weights; write y, gates
            fwd = 2 * act + W + gates
            # read x, dy, weights, gates; write dx, P1, P2
            tokens = 3 * act + W + gates + scratch
            # read x, dy, P1, P2; write the gradient copies
            weights = 2 * act + scratch + copies * W
            total = fwd + tokens + weights
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
    for arch in sorted({r["arch"] for r in rows}):
        mine = [r for r in rows if r["arch"] == arch]
        built = [r for r in mine if "unsupported" not in r]
        max_spill = max((r["spill_bytes"] for r in built), default=0)
        max_smem = max((r["smem_bytes"] for r in built), default=0)
        share = 100 * max_smem / SMEM_LIMIT[arch]
        print(
            f"# sm_{arch:<4} {SMEM_LIMIT[arch]:8,} {len(built):5} {len(mine) - len(built):5} {max_spill:6} "
            f"{max_smem:9,} ({share:.0f} %)"
        )
    for reason in sorted({(r["arch"], r["unsupported"]) for r in rows if "unsupported" in r}):
        print(f"# unsupported on sm_{reason[0]}: {reason[1]}")


def parse_args(argv=None):
    p = argparse.ArgumentParser("python -m kernels.report", description=__doc__.split("\n")[1])
    p.add_argument(
        "--arch",
        default="75,80,86,89,90,120",
        help="compute capabilities: 75 T4, 80 A100, 86/89 RTX 30/40, 90 H100, 120 RTX 50",
    )
    p.add_argument("--dtype", default="bf16,fp16,fp32", help="matmul dtypes")
    p.add_argument("--x", choices=("fp32", "matmul"), default="fp32", help="x, weights: fp32 or matmul dtype")
    p.add_argument("--experts", default="1,2,4,8,16", help="expert counts E; top_k is 1 and E")
    args = p.parse_args(argv)
    archs = args.arch.split(",")
    dtypes = args.dtype.split(",")
    experts = args.experts.split(",")
    if set(archs) - set(map(str, SMEM_LIMIT)):
        p.error(f"--arch {args.arch}: from {','.join(map(str, SMEM_LIMIT))} (comma-separated)")
    if set(dtypes) - set(DTYPES):
        p.error(f"--dtype {args.dtype}: from bf16,fp16,fp32 (comma-separated)")
    if set(experts) - set(map(str, range(1, 17))):
        p.error(f"--experts {args.experts}: from 1..16 (comma-separated)")
    if fm.INTERPRET:
        p.error("TRITON_INTERPRET=1: the report compiles GPU code; unset it")
    return [int(a) for a in archs], dtypes, [int(e) for e in experts], args.x


def main(argv=None):
    archs, dtypes, experts, x_mode = parse_args(argv)
    print(f"# triton {triton.__version__}, torch {torch.__version__}, D = {D}, R = {R}, H = {H}")
    rows = []
    for arch, dtype, E in itertools.product(archs, dtypes, experts):
        xw = DTYPES[dtype if x_mode == "matmul" else "fp32"]
        for top_k, kernel in itertools.product(sorted({1, E}), KERNELS):
            compiled = compile_one(kernel, arch, DTYPES[dtype], E, top_k if kernel == "fwd" else E, xw)
            row = dict(
                kernel=kernel,
                arch=arch,
                dtype=dtype,
                x=x_mode,
                E=E,
                top_k=top_k,
                **compiled,
                smem_limit=SMEM_LIMIT[arch],
            )
            rows.append(row)
            print(json.dumps(row), flush=True)
    print_summary(rows)
    print_traffic()


if __name__ == "__main__":
    main()
