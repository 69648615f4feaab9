"""Load a fast BLAS (Intel MKL from PyPI) into the process before MLX is imported.

MLX's CPU wheel links the netlib reference BLAS; any CBLAS loaded globally first replaces it,
which makes matmul about 70x faster on x86-64 Linux. Call :func:`preload` before ``import mlx``.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import platform
import sys
from collections.abc import Mapping
from pathlib import Path

import psutil

_active: str | None = None
_mkl: ctypes.CDLL | None = None  # libmkl_rt, once loaded: its threads are set at run time (fit_threads)
_fitted: int | None = None

POLICY_ENV = "FORGELLM_THREADS"  # "off": leave MKL's threads and wait policy at their defaults (before/after benches)
SHARE_ENV = "FORGELLM_MLX_PROCESSES"  # MLX processes meant to share this machine's cores (the ranks of one host)
ROLE_ENV = "FORGELLM_MLX_ROLE"  # "side": an MLX process that runs beside training (model worker, jobs)
SIDE = {ROLE_ENV: "side"}  # the environment overrides of such a child (services.jobs.child_env)
TRAINING_MODULE = "services.training.worker"  # what every training process runs (``python -m``), every rank too
SIDE_NICE = 5  # a side process's CPU priority below a training run's (Linux and macOS ``nice``)


def _mkl_libs() -> tuple[Path, Path] | None:
    for prefix in dict.fromkeys([sys.prefix, sys.base_prefix, os.environ.get("VIRTUAL_ENV", "")]):
        if not prefix:
            continue
        lib = Path(prefix) / "lib"
        omp, mkl = lib / "libiomp5.so", lib / "libmkl_rt.so.3"
        if omp.exists() and mkl.exists():
            return omp, mkl
    return None


def _off(env: Mapping[str, str]) -> bool:
    return env.get(POLICY_ENV, "").lower() == "off"


def _side(env: Mapping[str, str]) -> bool:
    """A side process whose threads the policy manages (not with ``FORGELLM_THREADS=off``)."""
    return env.get(ROLE_ENV) == "side" and not _off(env)


def thread_policy(environ: dict[str, str] | None = None, cores: int | None = None) -> dict[str, str]:
    """The thread and wait settings of this process's BLAS, from its role and the MLX processes sharing the cores.

    MKL's OpenMP threads spin for 200 ms after each call (``KMP_BLOCKTIME``). A training loop alone gains from it
    (a tiny model's step is many small calls: with waiting threads put to sleep at once it trained 3x slower
    here), so a training worker keeps MKL's defaults. A process beside it (``FORGELLM_MLX_ROLE=side``: the
    Playground's model worker, evaluations, publishes, imports) must not hold the cores the run needs while it
    waits, so its threads sleep at once. ``FORGELLM_MLX_PROCESSES=N`` processes meant to run together (the ranks
    of one host) take an even share of the cores each. What the user set explicitly is kept;
    ``FORGELLM_THREADS=off`` keeps every default.
    """
    env = os.environ if environ is None else environ
    if _off(env):
        return {}
    out = {"KMP_BLOCKTIME": "0"} if _side(env) else {}
    try:
        share = max(1, int(env.get(SHARE_ENV, "1")))
    except ValueError:
        share = 1
    if share > 1:
        threads = str(max(1, (cores or os.cpu_count() or 1) // share))
        out |= {"KMP_BLOCKTIME": "0", "MKL_NUM_THREADS": threads, "OMP_NUM_THREADS": threads}
    return {k: v for k, v in out.items() if k not in env}


def preload() -> str:
    """Load MKL globally if it is installed and this is Linux x86-64 (with :func:`thread_policy` applied before
    it reads its settings); return the BLAS name now active."""
    global _active, _mkl
    if _active is not None:
        return _active
    _active = "reference" if sys.platform.startswith("linux") else "accelerate"
    _lower_priority()
    if sys.platform.startswith("linux") and platform.machine() in ("x86_64", "AMD64"):
        if "mlx.core" in sys.modules:
            return _active  # too late: MLX already bound its BLAS
        if os.environ.get("FORGELLM_BLAS", "").lower() == "reference":
            return _active
        libs = _mkl_libs()
        if libs:
            os.environ.update(thread_policy())
            try:
                for lib in libs:
                    _mkl = ctypes.CDLL(str(lib), mode=ctypes.RTLD_GLOBAL)
                _active = "mkl"
            except OSError:
                _mkl = None
            fit_threads()
    return _active


def _lower_priority() -> None:
    """A side process yields the cores to a training run when both want them: its threads (MKL's and MLX's, all
    started after this, inherit it) run at a lower priority; alone, it still has every idle core."""
    if _side(os.environ) and hasattr(os, "nice"):
        with contextlib.suppress(OSError):
            os.nice(SIDE_NICE)


def training_processes() -> int:
    """How many ForgeLLM training processes (every rank of a distributed run counts) run on this machine now."""
    n = 0
    for proc in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.Error):
            if TRAINING_MODULE in (proc.info.get("cmdline") or []) and proc.pid != os.getpid():
                n += 1
    return n


def fit_threads(cores: int | None = None, training: int | None = None) -> int | None:
    """A side process (``FORGELLM_MLX_ROLE=side``) with MKL, before a piece of work: take the cores the training
    processes running now leave, all of them when none runs, else an even share with each (at least one thread).

    Beside a run, two processes with a thread per core each only take turns on the cores, and the run pays for
    it; the Playground's generation needs fewer threads than the run's steps to keep its pace. Returns the thread
    count set, or None where this process is not managed: not a side process, no MKL, ``MKL_NUM_THREADS`` or
    ``OMP_NUM_THREADS`` set (by the user, or for processes sharing the cores), ``FORGELLM_THREADS=off``.
    ``training`` overrides the count of training processes (tests).
    """
    global _fitted
    env = os.environ
    if _mkl is None or not _side(env) or "MKL_NUM_THREADS" in env or "OMP_NUM_THREADS" in env:
        return None
    cores = cores or os.cpu_count() or 1
    n = training_processes() if training is None else training
    threads = cores if n == 0 else max(1, cores // (n + 1))
    if threads != _fitted:
        _mkl.MKL_Set_Num_Threads(ctypes.c_int(threads))
        _fitted = threads
    return threads


def mkl_threads() -> int | None:
    """The threads MKL uses in this process now (None without MKL)."""
    return int(_mkl.MKL_Get_Max_Threads()) if _mkl is not None else None


def active() -> str:
    """Name of the BLAS this process uses: ``mkl``, ``reference`` or ``accelerate``."""
    return _active if _active is not None else preload()
