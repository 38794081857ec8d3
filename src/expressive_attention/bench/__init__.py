"""Benchmarks: EA vs PyTorch SDPA on the same shapes, timed and measured in one run."""
from .measure import Case, matmul_peak_gflops, run_case, run_in_process

__all__ = ["Case", "matmul_peak_gflops", "run_case", "run_in_process"]
