"""Triton kernels for the MoA layer. `fused_moa.py` is the forward kernel, the wrapper, the autograd Function and
the benchmark; `fused_moa_bwd.py` is the backward kernel. Design notes: ../shared/docs/kernel-design.md."""
