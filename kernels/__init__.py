"""Triton kernels of the MoA layer: fused_moa.py (the layer, forward and backward, launch parameters from the
GPU's limits) and report.py (`python -m kernels.report`: compiles them for each GPU class without a GPU)."""
