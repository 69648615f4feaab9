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


FIT = ("import json, os, services; from services import blas; blas.active(); "
       "print(json.dumps([[blas.fit_threads(cores=2, training=n), blas.mkl_threads()] for n in (0, 1, 3, 0)]"
       " + [blas.training_processes(), os.nice(0)]))")


@pytest.mark.skipif(not blas._mkl_libs(), reason="MKL is not installed here")  # noqa: SLF001
def test_a_side_process_takes_the_cores_a_run_leaves_and_all_of_them_when_none_runs():
    import json

    base = child_env(**blas.SIDE)
    for key in ("MKL_NUM_THREADS", "OMP_NUM_THREADS", "FORGELLM_THREADS", blas.SHARE_ENV):
        base.pop(key, None)
    # a process whose command line is a training worker's, as the scan sees it
    trainer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "-m", blas.TRAINING_MODULE])
    try:
        def fit(**env: str) -> list:
            out = subprocess.run([sys.executable, "-c", FIT], env={**base, **env}, cwd=REPO_ROOT,
                                 capture_output=True, text=True, check=True).stdout
            return json.loads(out.splitlines()[-1])

        *fits, running, nice = fit()
        assert fits == [[2, 2], [1, 1], [1, 1], [2, 2]]  # MKL's own count follows, set at run time
        assert running >= 1  # the training process above is counted
        assert nice == min(19, os.nice(0) + blas.SIDE_NICE)  # and it yields the cores to a run that wants them
        assert [f[0] for f in fit(MKL_NUM_THREADS="2")[:4]] == [None] * 4  # set by the user: kept
        off = fit(FORGELLM_THREADS="off")
        assert [f[0] for f in off[:4]] == [None] * 4 and off[5] == os.nice(0)
        train = fit(**{blas.ROLE_ENV: "train"})
        assert [f[0] for f in train[:4]] == [None] * 4 and train[5] == os.nice(0)  # a training worker: defaults
    finally:
        trainer.kill()
        trainer.wait()


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
