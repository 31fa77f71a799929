"""Triton kernels of the MoA layer: fused_moa.py (the layer, forward and backward), report.py."""
