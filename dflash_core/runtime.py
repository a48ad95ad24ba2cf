"""Where and how the engine runs: device, dtype and CPU thread policy, chosen once at the
entry point (CLI command, server replica), never at import.

- `resolve_dtype("auto" | "float32" | "bfloat16", device)`: `auto` is bf16 on GPUs. On a
  CPU it is fp32 wherever the native kernels build (dflash_core/native: fp32 products over
  the model's own 4/8-bit or bf16 weight codes, whole decoder layers in one call), and
  otherwise bf16 on CPUs whose matmuls run bf16 natively (AMX-BF16 or AVX512-BF16, through
  oneDNN), fp32 elsewhere. On a 2-core AVX512-BF16 EPYC (2026-12-03) the native fp32 path
  decoded the default target at ~105-122 tokens/s against ~42 in bf16, and a verify of
  1 / 2 / 4 / 8 tokens took 6.5 / 7.6 / 13.7 / 24.1 ms against 18.2 / 23.0 / 19.9 / 25.8;
  only at 16 rows did bf16 catch up (30.0 vs 35.6 ms; 16-row batched decoding 271 vs
  288 tokens/s). AMX was not measured against the native path. `prefer_native=False`
  keeps the older rule (bf16 where it is fast), for the long multi-row forwards of
  training, which the native kernels hand to torch anyway.
- `set_thread_policy(shared)`: OpenMP waiters. A process that owns the cores (one engine,
  a CLI run) wants spinning waiters (`ACTIVE`: a 2-thread decode step is ~1.5x faster
  than with sleeping ones). A process that shares them (a server replica beside Ray's own
  processes) keeps the OpenMP runtime's default: libgomp spins briefly, then sleeps, so
  it decodes about as fast as ACTIVE (greedy, 2 threads: 19-21 vs 17-22 tok/s) and an
  idle replica uses no CPU (ACTIVE: one core spinning). `PASSIVE` (sleep at once) costs a
  wake-up per parallel region: ~2x slower decoding, measured; the test suite still sets it
  (several processes on 2 cores, speed irrelevant): a spinning waiter next to another busy
  process made a 64x64 matmul take 15 ms instead of 0.01 ms. The policy is read when
  torch starts its OpenMP pool, so entry points call this before the first parallel op;
  an explicit OMP_WAIT_POLICY in the environment always wins.
- `on_fresh_thread(fn, ...)`: one OpenMP master thread per process. libgomp keeps a worker
  pool per thread that ever ran a parallel region, for as long as that thread lives; once
  the threads it manages outnumber the CPUs, every waiter uses the short "throttled" spin
  count (libgomp's do_spin) instead of the normal one, nearly as if PASSIVE, and each
  parallel region pays futex wake-ups. A server that
  loads its model on one thread (the main thread, a Ray replica's constructor, an executor
  thread) and steps the engine on another ran a decode step at ~0.6x (measured, 2 cores:
  a grouped-attention bmm 40 -> ~290 us; greedy decoding 18-19 -> 11-12 tok/s). Loading on
  a thread that then exits frees its pool, so the engine thread is the only master.
- `second_master_warning(built_on, device)`: the engine calls it on its first step; it
  returns a one-line warning when a CPU engine is stepped on a thread other than the one
  that built it while that thread is still alive (the case above), else None.
- `cache_root()`: the folder for what the engine builds once and reuses (converted
  models, compiled native kernels, dataset copies): $DFLASH_CACHE, default
  ~/.cache/dflash-serve. It lives here, in a module that imports nothing of the project,
  so every layer can reach it without an import cycle.
- `retain_freed_memory()`: glibc's malloc keeps freed memory for reuse instead of handing
  it back to the kernel. By default large blocks (from 128 KiB; the threshold adapts up to
  32 MiB) come from mmap, or are trimmed off the heap, and go back when freed, so a loop
  that allocates the same large tensors every iteration faults their pages in again each
  time. A drafter training step allocates several [~900, 8192] fp32 tensors (~28 MiB:
  draft-head logits, their softmax and gradients): 9-27k minor page faults per step,
  ~60 with this set. `dflash train` calls it (~6% faster steps at 2 threads, measured;
  docs/BENCHMARKS.md); the engine's step did not change with it (its large buffers are
  allocated once), so the server does not.
"""
from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

# what a target's KV cache may store (EngineConfig.kv_cache_dtype, --kv-cache-dtype): the
# model's dtype ("auto"), fp32, or bf16 (each K / V value rounded to the nearest bf16)
KV_CACHE_DTYPES = ("auto", "float32", "bfloat16")


def cache_root() -> Path:
    return Path(os.environ.get("DFLASH_CACHE", Path.home() / ".cache" / "dflash-serve"))

DTYPE_CHOICES = ("auto", "float32", "bfloat16")


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_has_fast_bf16() -> bool:
    """AMX-BF16 or AVX512-BF16: bf16 matmuls run natively (oneDNN)."""
    flags = cpu_flags()
    return "amx_bf16" in flags or "avx512_bf16" in flags


def resolve_dtype(name, device="cpu", prefer_native: bool = True):
    """'auto' | 'float32' | 'bfloat16' (or a torch.dtype) -> torch.dtype. `auto` on a CPU:
    fp32 where the native kernels build (unless prefer_native is False), else bf16 where
    bf16 matmuls are native, else fp32 (the module docstring has the measurements)."""
    import torch
    if isinstance(name, torch.dtype):
        return name
    aliases = {"fp32": "float32", "bf16": "bfloat16", "float": "float32"}
    name = aliases.get(str(name), str(name))
    if name == "float32":
        return torch.float32
    if name == "bfloat16":
        return torch.bfloat16
    if name != "auto":
        raise ValueError(f"unknown dtype {name!r}: use one of {', '.join(DTYPE_CHOICES)}")
    dev = str(device)
    if dev.startswith("cuda"):
        return torch.bfloat16
    if prefer_native and native_kernels_available():
        return torch.float32
    return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32


def native_cpu_ok() -> bool:
    """Linux on an x86-64 CPU with AVX2 and FMA: what the native kernels need of the CPU."""
    import sys
    return sys.platform == "linux" and {"avx2", "fma"} <= cpu_flags()


def c_compiler() -> str | None:
    """The C compiler the native kernels are built with: $CC, else cc or gcc on PATH."""
    import shutil
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def native_kernels_available() -> bool:
    """Whether the native fp32 kernels (dflash_core.native) can run here: native_cpu_ok(), a
    C compiler, and not turned off by DFLASH_NATIVE=0: the checks native.available() makes
    before it builds them (the same functions; this module imports nothing of the project)."""
    return native_cpu_ok() and os.environ.get("DFLASH_NATIVE", "1") != "0" and c_compiler() is not None


def dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


def set_thread_policy(shared: bool) -> str:
    """Pick OpenMP waiting (see the module docstring); returns the policy in force
    ("default": OMP_WAIT_POLICY unset, the OpenMP runtime's own spin-then-sleep)."""
    if not shared:
        os.environ.setdefault("OMP_WAIT_POLICY", "ACTIVE")
    return os.environ.get("OMP_WAIT_POLICY", "default")


def second_master_warning(built_on, device="cpu") -> str | None:
    """-> a warning when stepping on this thread makes a second live OpenMP master (see the
    module docstring): CPU device, more than one torch thread, and `built_on` (the thread
    that built the engine) is another thread that is still alive. Otherwise None."""
    import threading

    import torch
    here = threading.current_thread()
    if str(device).split(":")[0] != "cpu" or torch.get_num_threads() < 2:
        return None
    if built_on is None or built_on is here or not built_on.is_alive():
        return None
    return (f"engine built on thread {built_on.name!r} (still alive) is stepped on thread {here.name!r}: "
            "two OpenMP worker pools on the same CPUs slow every step (~0.6x measured on 2 cores); "
            "build it with dflash_core.runtime.on_fresh_thread, or step it on the thread that built it")


M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4      # glibc mallopt parameters (malloc.h)


def retain_freed_memory() -> bool:
    """glibc only: serve every allocation from the heap (no mmap) and never trim the heap
    below 1 GiB of free space, so freed large blocks are reused without new page faults
    (see the module docstring). The process keeps its peak footprint. -> True if set,
    False where the C library is not glibc (nothing changes there)."""
    import ctypes
    import platform
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 1 << 30))
    except (OSError, AttributeError):
        return False


def on_fresh_thread(fn, *args, **kwargs):
    """Run fn(*args, **kwargs) on a new thread that exits when it returns; -> its result
    (its exception re-raised here). For the torch work done before a long-lived engine
    thread takes over (loading, packing, warm-up): see the module docstring."""
    import threading
    box: dict = {}

    def run():
        try:
            box["value"] = fn(*args, **kwargs)
        except BaseException as e:  # noqa: BLE001  (re-raised in the caller)
            box["error"] = e
    th = threading.Thread(target=run, name="dflash-load", daemon=True)
    th.start()
    th.join()
    if "error" in box:
        raise box["error"]
    return box["value"]
