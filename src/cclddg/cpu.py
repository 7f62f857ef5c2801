"""CPU speed: two traps avoided once per process (denormal floats, freed memory handed back to the system), and
where bf16 pays (a CPU that computes it natively).

Denormals made a training step ~10x slower on our machines. By default glibc hands freed blocks (from 128 KiB on)
back to the system, so every step maps its activations afresh and pays a page fault per page it touches; keeping
them in the process made the cclddg preset's CPU step 1.74x and the seed preset's 1.26x faster at batch 8
(benchmarks/cpu_step.py).
"""

from __future__ import annotations

import ctypes
import ctypes.util

import torch

# glibc's mallopt parameters (malloc.h), the values we set and glibc's defaults (for benchmarks/cpu_step.py).
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
KEEP = {M_MMAP_THRESHOLD: 32 * 2**20,  # the largest glibc accepts: blocks below it come from the heap
        M_TRIM_THRESHOLD: 2**31 - 1,  # never give the heap's top back
        M_TOP_PAD: 256 * 2**20}  # and grow it in large steps
GLIBC_DEFAULTS = {M_MMAP_THRESHOLD: 128 * 2**10, M_TRIM_THRESHOLD: 128 * 2**10, M_TOP_PAD: 128 * 2**10}


def tune_cpu(threads: int = 0) -> None:
    """Set torch's thread count (0: torch's default), flush denormals to zero (in this thread: call it in every
    thread that runs models) and keep freed memory."""
    if threads:
        torch.set_num_threads(threads)
    torch.set_flush_denormal(True)
    keep_freed_memory()


def native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX-BF16): where bf16 can pay on a CPU. Without it,
    torch emulates bf16 in fp32 and a bf16 model runs slower than an fp32 one."""
    try:
        capability = torch._C._cpu._get_cpu_capability()  # torch >= 2.3
        return bool(capability.get("avx512_bf16") or capability.get("amx_bf16"))
    except (AttributeError, RuntimeError):
        try:
            with open("/proc/cpuinfo") as f:
                flags = f.read()
        except OSError:
            return False
        return " avx512_bf16" in flags or " amx_bf16" in flags


def fast_decode_dtype(device: str | torch.device = "cpu") -> torch.dtype:
    """The dtype `cclddg sample` and the web page decode latents in by default: bfloat16 on a CPU that computes it
    natively (KL-f8 decodes ~2x faster there, its images ~47 dB from float32's with random weights:
    benchmarks/bf16_cpu.py), float32 anywhere else (a GPU user picks the pipeline's torch_dtype)."""
    return torch.bfloat16 if torch.device(device).type == "cpu" and native_bf16() else torch.float32


def keep_freed_memory(keep: bool = True) -> bool:
    """Ask glibc to keep freed memory for reuse (keep=False: its defaults again); False where the C library is
    not glibc (nothing changes)."""
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c")).mallopt
    except (OSError, AttributeError, TypeError):
        return False
    return all(mallopt(param, value) == 1 for param, value in (KEEP if keep else GLIBC_DEFAULTS).items())
