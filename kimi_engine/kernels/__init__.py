"""Triton kernels for kimi-engine, imported as `kimi_engine.kernels`.

Each module keeps three things side by side: the `@triton.jit` kernel, a thin wrapper that checks
shapes and dtypes and launches it, and a pure-torch `*_ref` that defines what the kernel computes.
"""
