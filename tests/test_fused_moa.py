"""
Tests of kernels/fused_moa.py (forward) and kernels/fused_moa_bwd.py (backward) against moa.moa_reference.

On CPU the Triton kernels run in the interpreter (conftest.py sets TRITON_INTERPRET=1 before any import). The
oracle is the plain-PyTorch reference run in float64 on the same inputs; the kernel runs in fp32 (or bf16/fp16).
Errors are "max |kernel - reference| / max |reference|" per tensor. Every run fills the kernel's output buffers
with NaN first (MOA_KERNEL_POISON=1), so an element a kernel forgets to write fails the comparison.
Run: python -m pytest -q tests/test_fused_moa.py
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kernels import fused_moa as fm
from kernels.fused_moa import fused_moa
from moa import moa_reference

ROOT = Path(__file__).resolve().parents[1]
cpu_only = pytest.mark.skipif(not fm.INTERPRET, reason="needs TRITON_INTERPRET=1 for CPU tensors")


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    monkeypatch.setenv("MOA_KERNEL_POISON", "1")


def make_inputs(lead, D, H, E, R, top_k, temperature, seed=0, gap=1e-4, kink=1e-5, dtype=torch.float64):
    """Random inputs (fp64 holding values exactly representable in `dtype`) whose kept and dropped logits are more
    than `gap` apart (so the kernel's rounding cannot change the top-k) and whose gate pre-activations stay `kink`
    away from the ReLU kink. Deterministic: it walks seeds seed, seed+1, ... until one qualifies."""
    for s in range(seed, seed + 50):
        g = torch.Generator().manual_seed(s)

        def rnd(*shape, scale=1.0):
            return torch.randn(*shape, generator=g, dtype=torch.float64) * scale
        ins = [rnd(*lead, D), rnd(H, D, scale=D ** -0.5), rnd(H, scale=0.1), rnd(E, H, scale=3 * H ** -0.5),
               rnd(E, scale=0.1), rnd(E, R, D, scale=D ** -0.5), rnd(E, R, scale=0.1), rnd(E, D, R, scale=R ** -0.5),
               rnd(E, D, scale=0.1)]
        ins = [t.to(dtype).double() for t in ins]
        u = ins[0] @ ins[1].T + ins[2]
        logits = (torch.relu(u) @ ins[3].T + ins[4]) / temperature
        srt = logits.sort(dim=-1, descending=True).values
        sep = (srt[..., top_k - 1] - srt[..., top_k]).min() if top_k < E else torch.tensor(1.0)
        if u.abs().min() > kink and sep > gap:
            return ins
    raise RuntimeError("no seed gave well-separated logits")


def rel_err(a, b):
    a, b = a.double(), b.double()
    scale = b.abs().max()
    if scale == 0:  # e.g. gate gradients with one kept expert: the true gradient is exactly zero
        return a.abs().max().item()
    return ((a - b).abs().max() / scale).item()


def run_both(ins, top_k, temperature, dtype, gates_loss=True, seed=123):
    """Forward and backward of the kernel (inputs cast to dtype) and of the reference (fp64, on the same rounded
    values). The loss weights y and, optionally, the gates by fixed random tensors."""
    ins = [t.to(dtype).double() for t in ins]                   # the reference sees exactly the kernel's inputs
    g = torch.Generator().manual_seed(seed)
    wy = torch.randn(ins[0].shape, generator=g, dtype=torch.float64)
    wg = torch.randn(*ins[0].shape[:-1], ins[3].shape[0], generator=g, dtype=torch.float64)
    out = []
    for fn, dt in ((fused_moa, dtype), (moa_reference, torch.float64)):
        leaves = [t.to(dt).requires_grad_() for t in ins]
        y, gates = fn(*leaves, top_k, temperature)
        loss = (y.double() * wy).sum() + ((gates.double() * wg).sum() if gates_loss else 0)
        loss.backward()
        out.append((y, gates, [t.grad for t in leaves]))
    return out


# ---------------------------------------------------------------------------------------------------------------
# correctness in fp32 against the fp64 reference

CASES = [  # (leading dims, D, H, E, R, top_k, temperature, loss on gates too)
    ((1,), 32, 16, 1, 16, 1, 1.0, True),          # a single token, a single expert
    ((37,), 64, 32, 4, 16, 1, 2.0, True),         # partial tile, top-1
    ((37,), 48, 32, 4, 32, 2, 0.5, False),        # D not a power of 2; only y is used by the loss
    ((37,), 64, 32, 4, 64, 4, 2.0, True),         # the paper's dense routing (top_k = E = 4, tau = 2)
    ((50, 3), 48, 16, 8, 16, 2, 1.0, True),       # leading dims (50, 3, D)
    ((50, 3), 32, 64, 8, 16, 8, 3.0, True),
    ((37,), 32, 16, 16, 16, 1, 2.0, True),        # E = 16
    ((256,), 128, 128, 16, 16, 16, 2.0, True),    # E = 16 dense, the largest CPU case
    ((64,), 64, 64, 5, 128, 2, 1.5, True),        # E not a power of 2, R = 128
]


@cpu_only
@pytest.mark.parametrize("lead,D,H,E,R,top_k,tau,gates_loss", CASES)
def test_forward_and_gradients_fp32(lead, D, H, E, R, top_k, tau, gates_loss):
    ins = make_inputs(lead, D, H, E, R, top_k, tau)
    (y, gates, grads), (y_ref, gates_ref, grads_ref) = run_both(ins, top_k, tau, torch.float32, gates_loss)
    assert y.dtype == torch.float32 and y.shape == y_ref.shape
    assert gates.dtype == torch.float32 and gates.shape == gates_ref.shape
    assert rel_err(y, y_ref) <= 1e-4
    assert rel_err(gates, gates_ref) <= 1e-4
    assert torch.equal(gates > 0, gates_ref > 0)               # the same experts were kept
    for name, a, b in zip(fm.NAMES, grads, grads_ref):
        assert a is not None and a.shape == b.shape and a.dtype == torch.float32, name
        assert rel_err(a, b) <= 1e-4, f"d{name}: rel err {rel_err(a, b):.2e}"
    # a gradient that should flow did flow (guards against an all-zero reference making the check vacuous)
    if top_k > 1:
        assert grads_ref[3].abs().max() > 0 and grads_ref[1].abs().max() > 0


@cpu_only
@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 1e-2), (torch.float16, 2e-3)])
def test_half_precision_inputs(dtype, tol):
    """bf16/fp16 storage, fp32 math. The interpreter truncates fp32 -> bf16 (the GPU rounds), so y and the
    gradients stored in bf16 are off by up to ~1 ulp (2^-8 relative) of the element; gates are fp32 and tight."""
    ins = make_inputs((45,), 64, 32, 4, 32, 2, 2.0, gap=1e-3, dtype=dtype)
    (y, gates, grads), (y_ref, gates_ref, grads_ref) = run_both(ins, 2, 2.0, dtype)
    assert y.dtype == dtype and gates.dtype == torch.float32
    assert rel_err(y, y_ref) <= tol
    assert rel_err(gates, gates_ref) <= 1e-4
    for name, a, b in zip(fm.NAMES, grads, grads_ref):
        assert a.dtype == dtype, name
        assert rel_err(a, b) <= 2 * tol, f"d{name}: rel err {rel_err(a, b):.2e}"


@cpu_only
@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_ties_go_to_the_lower_expert(top_k):
    """Experts 1, 2 and 3 get bit-identical gate logits (identical rows of gate_w2 and gate_b2), above expert 0's.
    The kernel must keep the lowest indices among them, exactly like the reference's stable sort."""
    ins = make_inputs((20,), 32, 16, 4, 16, 4, 1.0)
    ins[3][1:] = ins[3][1]
    ins[4][:] = torch.tensor([-50.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    y, gates = fused_moa(*[t.float() for t in ins], top_k, 1.0)
    y_ref, gates_ref = moa_reference(*ins, top_k, 1.0)
    expected = torch.zeros(4)
    expected[1:1 + top_k] = 1.0 / top_k
    assert torch.allclose(gates, expected.expand_as(gates), atol=1e-6)
    assert rel_err(gates, gates_ref) <= 1e-6
    assert rel_err(y, y_ref) <= 1e-4


@cpu_only
def test_poison_buffers_are_nan():
    """The NaN poisoning that the other tests rely on is really on."""
    assert torch.isnan(fm._new((3, 4), torch.zeros(1))).all()


# ---------------------------------------------------------------------------------------------------------------
# input validation

def _good():
    return make_inputs((5,), 32, 16, 4, 16, 2, 1.0, gap=0.0, kink=0.0)


@pytest.mark.parametrize("edit,top_k,tau,match", [
    (lambda a: a.__setitem__(0, a[0][:, :24]), 2, 1.0, "multiple of 16"),
    (lambda a: a.__setitem__(1, a[1][:12]), 2, 1.0, "gate_w1 must be"),
    (lambda a: a.__setitem__(3, torch.zeros(17, 16, dtype=torch.float64)), 2, 1.0, "gate_w2 must be"),
    (lambda a: a.__setitem__(5, a[5][:, :8]), 2, 1.0, "down_w must be"),
    (lambda a: a.__setitem__(8, a[8][:, :16]), 2, 1.0, r"up_b must have shape \(4, 32\)"),
    (lambda a: a.__setitem__(6, a[6].T), 2, 1.0, "down_b must have shape"),
    (lambda a: a.__setitem__(2, a[2].half()), 2, 1.0, "gate_b1.dtype"),
    (lambda a: None, 0, 1.0, "top_k must be"),
    (lambda a: None, 5, 1.0, "top_k must be"),
    (lambda a: None, 2.0, 1.0, "top_k must be"),
    (lambda a: None, 2, 0.0, "temperature must be"),
    (lambda a: None, 2, float("nan"), "temperature must be"),
])
def test_validation_errors(edit, top_k, tau, match):
    ins = [t.float() for t in _good()]
    edit(ins)
    with pytest.raises(ValueError, match=match):
        fused_moa(*ins, top_k, tau)


def test_float64_is_rejected():
    with pytest.raises(ValueError, match="x.dtype must be one of"):
        fused_moa(*_good(), 2, 1.0)


# ---------------------------------------------------------------------------------------------------------------
# benchmark smoke test

@cpu_only
def test_benchmark_smoke_prints_table():
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, "-m", "kernels.fused_moa", "--smoke"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=170)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    header = next(i for i, line in enumerate(lines) if "fused us" in line and "GB/s" in line)
    body = lines[header + 1:]
    assert len(body) == 4, proc.stdout                         # top_k 4 and 1, fwd and fwd+bwd
    assert all(line.split()[0] == "float32" for line in body)  # the table is the last thing printed
    fused_us = [float(line.split()[6]) for line in body]
    assert all(t > 0 for t in fused_us)


# ---------------------------------------------------------------------------------------------------------------
# GPU (compiled Triton, TF32 / bf16 tensor cores)

@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.skipif(fm.INTERPRET, reason="needs CUDA with TRITON_INTERPRET=0 (the interpreter is for CPU tensors)")
class TestCUDA:
    @pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-2), (torch.bfloat16, 3e-2)])
    @pytest.mark.parametrize("N,D,H,E,R,top_k", [(400, 768, 128, 4, 64, 4), (3201, 768, 128, 4, 64, 1),
                                                 (300, 256, 64, 8, 64, 2), (200, 256, 128, 16, 128, 3)])
    def test_matches_reference(self, dtype, tol, N, D, H, E, R, top_k):
        ins = make_inputs((N,), D, H, E, R, top_k, 2.0, gap=1e-3, kink=1e-4, dtype=dtype)
        g = torch.Generator().manual_seed(1)
        wy = torch.randn(N, D, generator=g, dtype=torch.float64)
        res = []
        for fn, dt, dev in ((fused_moa, dtype, "cuda"), (moa_reference, torch.float64, "cpu")):
            leaves = [t.to(dev, dt).requires_grad_() for t in ins]
            y, gates = fn(*leaves, top_k, 2.0)
            (y.double().cpu() * wy).sum().backward()
            res.append((y.cpu(), gates.cpu(), [t.grad.cpu() for t in leaves]))
        (y, gates, grads), (y_ref, gates_ref, grads_ref) = res
        assert torch.equal(gates > 0, gates_ref > 0)
        assert rel_err(y, y_ref) <= tol and rel_err(gates, gates_ref) <= tol
        for name, a, b in zip(fm.NAMES, grads, grads_ref):
            assert rel_err(a, b) <= 2 * tol, f"d{name}: rel err {rel_err(a, b):.2e}"


def test_moa_module_dispatch_flag_runs_both_paths():
    """moa.MoA picks the kernel through moa.MOA_IMPL; both paths agree, forward and backward."""
    import moa
    torch.manual_seed(0)
    layer = moa.MoA(dim=64, num_experts=4, bottleneck=16, gate_hidden=16, top_k=2, temperature=2.0)
    with torch.no_grad():
        layer.up_w.normal_(0, 0.1)  # off the identity init, so the experts matter
    x = torch.randn(2, 9, 64)
    results = {}
    try:
        for impl in ("torch", "triton"):
            moa.MOA_IMPL = impl
            layer.zero_grad()
            xi = x.clone().requires_grad_(True)
            y = layer(xi)
            y.square().sum().backward()
            results[impl] = (y.detach(), xi.grad, layer.down_w.grad.clone(), layer.gate_w1.grad.clone(),
                             layer.last_entropy)
    finally:
        moa.MOA_IMPL = "auto"
    assert moa.fused_moa is not None
    for a, b in zip(results["torch"], results["triton"]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    # under bf16 autocast the activations arrive in bf16 while the weights stay fp32: the kernel path casts
    moa.MOA_IMPL = "triton"
    try:
        y16 = layer(x.bfloat16())
    finally:
        moa.MOA_IMPL = "auto"
    assert y16.dtype == torch.bfloat16
    torch.testing.assert_close(y16.float(), results["torch"][0], rtol=2e-2, atol=5e-2)

