"""The BLAS thread and wait policy every MLX process applies before MKL starts (issue 14, several MLX processes)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from services import blas
from services.jobs import REPO_ROOT, child_env


def test_a_run_alone_keeps_mkls_defaults_side_processes_sleep_and_ranks_share_the_cores():
    assert blas.thread_policy({}, cores=8) == {}  # a training loop alone: MKL's spinning threads help it
    assert blas.thread_policy(dict(blas.SIDE), cores=8) == {"KMP_BLOCKTIME": "0"}  # beside a run: never spin
    assert blas.thread_policy({"FORGELLM_MLX_PROCESSES": "2"}, cores=8) == {
        "KMP_BLOCKTIME": "0", "MKL_NUM_THREADS": "4", "OMP_NUM_THREADS": "4"}
    assert blas.thread_policy({"FORGELLM_MLX_PROCESSES": "4"}, cores=2)["MKL_NUM_THREADS"] == "1"
    assert blas.thread_policy({"FORGELLM_MLX_PROCESSES": "two"}, cores=8) == {}


def test_what_the_user_set_is_kept_and_off_keeps_every_default():
    assert blas.thread_policy({"KMP_BLOCKTIME": "200", "FORGELLM_MLX_PROCESSES": "2"}, cores=2) == {
        "MKL_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    assert blas.thread_policy({"FORGELLM_THREADS": "off", "FORGELLM_MLX_PROCESSES": "2", **blas.SIDE}, cores=2) == {}


@pytest.mark.skipif(not blas._mkl_libs(), reason="MKL is not installed here")  # noqa: SLF001
def test_a_child_has_the_policy_in_place_before_mkl_loads():
    code = ("import os, sys; import services; from services import blas; "
            "print(blas.active(), os.environ.get('KMP_BLOCKTIME'), os.environ.get('MKL_NUM_THREADS'))")
    env = child_env(FORGELLM_MLX_PROCESSES="2")
    for key in ("KMP_BLOCKTIME", "MKL_NUM_THREADS", "OMP_NUM_THREADS", "FORGELLM_THREADS", blas.ROLE_ENV):
        env.pop(key, None)
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO_ROOT, capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == ["mkl", "0", str(max(1, (os.cpu_count() or 1) // 2))]



def test_the_model_worker_runs_as_a_side_process_and_keeps_its_waiting_threads_asleep():
    import psutil

    from services.inference.service import _Worker

    worker = _Worker(sys.executable, lambda *_: None)
    try:
        env = psutil.Process(worker.pid).environ()
    finally:
        worker.proc.kill()
        worker.proc.wait()
    assert env.get(blas.ROLE_ENV) == "side"
    assert blas.ROLE_ENV not in child_env()  # what a training worker gets: MKL's defaults, fast alone
