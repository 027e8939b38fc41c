"""Triton kernels, one file per op. They run on CUDA tensors, and on CPU tensors under
TRITON_INTERPRET=1 (how the CPU-only test suite checks them)."""
