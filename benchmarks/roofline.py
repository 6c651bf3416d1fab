"""The machine's measured peaks and how close a step comes to them (the roofline rows of `make bench`).

- Matrix-product peaks in fp32 and bf16 at the model's own shapes (a 16 x 64-token batch through
  all-MiniLM-L6-v2's 384 -> 384 and 384 -> 1536 layers, a 2048 cube), at the threads the steps use.
- Memory bandwidth: bytes read plus bytes written per second by a copy of a 256 MiB tensor.
- A step's FLOPs, counted by ``torch.utils.flop_counter`` (matrix products and attention), over its
  measured time: achieved GFLOP/s and the fraction of the peak of the dtype its base computes in.
- Batch-1 greedy decoding: each new token reads every weight once, so the bandwidth over the
  weights' bytes bounds tokens per second.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

SHAPES = {"1024x384x384": (1024, 384, 384), "1024x384x1536": (1024, 384, 1536), "2048 cube": (2048, 2048, 2048)}


def _seconds(fn: Callable[[], object], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def matmul_peaks(repeats: int = 20) -> dict[str, dict[str, float]]:
    """GFLOP/s of ``a @ b`` per dtype and shape, and each dtype's best over the shapes (its peak)."""
    out: dict[str, dict[str, float]] = {}
    for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        rates = {}
        for label, (m, k, n) in SHAPES.items():
            a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
            inner = max(1, int(2e9 // (2 * m * k * n)))  # ~2 GFLOP a sample

            def run(a=a, b=b, inner=inner) -> None:
                for _ in range(inner):
                    torch.mm(a, b)

            rates[label] = 2 * m * k * n * inner / _seconds(run, repeats) / 1e9
        rates["peak"] = max(rates.values())
        out[name] = rates
    return out


def memory_bandwidth(repeats: int = 10) -> float:
    """GB/s read plus written by ``dst.copy_(src)`` of 256 MiB."""
    src = torch.ones(64 * 2**20, dtype=torch.float32)
    dst = torch.empty_like(src)
    return 2 * src.numel() * 4 / _seconds(lambda: dst.copy_(src), repeats) / 1e9


def flops(fn: Callable[[], object]) -> int:
    """FLOPs of one call of ``fn`` (matrix products and attention, as PyTorch's counter counts)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the weights one decoding step reads whole: every parameter but an embedding table's
    (a lookup reads one row a token); an output layer tied to the embeddings counts, once."""
    seen = {}
    for module in model.modules():
        if isinstance(module, torch.nn.Embedding):
            continue
        for p in module.parameters(recurse=False):
            seen[p.data_ptr()] = p.numel() * p.element_size()
    return sum(seen.values())
