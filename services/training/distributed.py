"""One run across several processes or Macs, on MLX's own engine: ``mx.distributed`` launched by ``mlx.launch``.

``python -m services.training.distributed RUN [--resume CKPT]`` is what the run manager starts for a config with
``distributed``: it writes ``RUN/hostfile.json``, checks remote hosts (preflight), copies the run's config and the
checkpoint to them, and replaces itself with ``mlx.launch``, which starts ``services.training.worker`` once per rank.

Rank 0 owns the run folder (status, metrics, checkpoints, heartbeat); rank R ≥ 1 reads it and writes only
``RUN/ranks/R.log``; every rank beats ``RUN/ranks/R.heartbeat`` and watches the others' (:class:`Watchdog`).

The arithmetic (:class:`Group`): ``batch_size`` is the global batch, rank R takes rows ``R::size`` of every batch.
A plain mlx-lm config does exactly what ``mlx_lm.lora`` does under ``mlx.launch`` (each rank's mean loss, gradients
averaged with ``nn.average_gradients``), report for report. ForgeLLM modes reduce sums instead: each rank divides
its summed loss by the global batch's token count, and the gradients are summed, so the run equals a single
process with the same global batch (to float rounding) whatever the ranks' token counts.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

from services import __version__, blas
from services.config import LOCAL_HOSTS, host_entry, world_size
from services.errors import ForgeError
from services.jobs import REPO_ROOT
from services.training.folder import RunFolder
from services.workspace import read_json, write_atomic, write_json

HEARTBEAT_SECONDS = 2.0
PEER_TIMEOUT = 10.0  # seconds without a peer's heartbeat before the run counts it lost
STARTUP_TIMEOUT = 300.0  # a rank that has not beaten at all by then never started
GRACE_SECONDS = 4.0  # how long rank 0 lets its training thread report a lost peer before it gives up itself
SSH = ("ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=5")


class DistributedError(ForgeError, RuntimeError):
    """The run's machines cannot train together; the message names the host and what to do."""


# ----------------------------------------------------------------------------------------- where ranks are


def rank_of_process(cfg: dict[str, Any]) -> int:
    """This process's rank (``MLX_RANK``, set by ``mlx.launch``) in a distributed run; 0 otherwise."""
    return int(os.environ.get("MLX_RANK", "0")) if world_size(cfg) > 1 else 0


def hosts(cfg: dict[str, Any]) -> list[dict[str, Any]]:
    """The run's hosts in rank order, as mlx.launch's hostfile lists them."""
    dist = cfg.get("distributed") or {}
    if dist.get("hosts") is None:
        return [{"ssh": "127.0.0.1", "ips": ["127.0.0.1"]} for _ in range(world_size(cfg))]
    return [host_entry(h) for h in dist["hosts"]]


def is_local(host: dict[str, Any]) -> bool:
    return host["ssh"] in LOCAL_HOSTS or host["ssh"] == socket.gethostname()


def ranks_dir(folder: RunFolder) -> Path:
    return folder.path / "ranks"


def heartbeat_path(folder: RunFolder, rank: int) -> Path:
    return ranks_dir(folder) / f"{rank}.heartbeat"


class RankFolder(RunFolder):
    """The run folder as rank R ≥ 1 sees it: it reads the run's files and writes only its own under ``ranks/``."""

    def __init__(self, path: str | os.PathLike, rank: int):
        super().__init__(path)
        self.rank = rank

    log_path = property(lambda self: self.path / "ranks" / f"{self.rank}.log")
    stats_path = property(lambda self: self.path / "ranks" / f"{self.rank}.stats.json")
    heartbeat_path = property(lambda self: self.path / "ranks" / f"{self.rank}.heartbeat")

    def update(self, **fields: Any) -> dict[str, Any]:
        return {**self.info(), **fields}

    def append_metric(self, record: dict[str, Any]) -> None:
        return None  # rank 0 reports for the world

    def end_session(self, status: str, reason: str | None, ended: float | None = None) -> dict[str, Any]:
        return self.info()


# ----------------------------------------------------------------------------------------- the arithmetic


class Group:
    """This process's place in the run's world (``world`` None: one process, and nothing changes)."""

    def __init__(self, world: Any = None, compat: bool = True):
        self.world, self.compat = world, compat
        self.rank = world.rank() if world is not None else 0
        self.size = world.size() if world is not None else 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def for_config(cls, cfg: dict[str, Any]) -> Group:
        """Join the run's world (``mx.distributed.init``, strict: never a silent single process)."""
        n = world_size(cfg)
        if n <= 1:
            return cls()
        import mlx.core as mx  # noqa: PLC0415 (the launcher and the UI never need MLX)

        backend = (cfg.get("distributed") or {}).get("backend") or "ring"
        try:
            world = mx.distributed.init(backend=backend, strict=True)
        except RuntimeError as e:
            raise DistributedError(f"could not join the {n} processes over {backend}: {e}. Start the run from "
                                   "ForgeLLM (it launches every rank with mlx.launch)") from None
        if world.size() != n:
            raise DistributedError(f"mlx.launch started {world.size()} processes, the config asks for {n}")
        return cls(world, compat=cfg.get("mode") is None)

    @property
    def weighted(self) -> bool:
        """Whether losses are reduced as sums over the global batch (ForgeLLM modes on several ranks)."""
        return self.size > 1 and not self.compat

    def sampler_options(self) -> dict[str, Any]:
        return {"shard": (self.rank, self.size), "with_total": self.weighted}

    def train_loss(self, loss: Callable) -> Callable:
        """The loss to differentiate: ``loss`` itself, or this rank's share of the global batch's mean."""
        if not self.weighted:
            return loss

        import mlx.core as mx  # noqa: PLC0415

        def share(model: Any, batch: Any, mask: Any, total: Any) -> tuple[Any, Any]:
            mean, ntoks = loss(model, batch, mask)  # (sum of this rank's losses) / (tokens of the whole batch):
            return mx.where(ntoks > 0, mean * (ntoks / total), 0.0), ntoks

        return share

    def eval_loss(self, loss: Callable) -> Callable:
        """Validation's loss: a rank's empty share of a short last batch counts zero instead of 0/0."""
        if not self.weighted:
            return loss
        import mlx.core as mx  # noqa: PLC0415

        def guarded(model: Any, batch: Any, mask: Any) -> tuple[Any, Any]:
            mean, ntoks = loss(model, batch, mask)
            return mx.where(ntoks > 0, mean, 0.0), ntoks

        return guarded

    def reduce_grads(self, grad: Any) -> Any:
        """Gradients every rank applies: mlx-lm's average, or the sum of the ranks' shares."""
        if self.size == 1:
            return grad
        import mlx.core as mx  # noqa: PLC0415
        from mlx.nn.utils import average_gradients  # noqa: PLC0415
        from mlx.utils import tree_map  # noqa: PLC0415

        if self.compat:
            return average_gradients(grad)
        return tree_map(mx.distributed.all_sum, grad)

    def train_report(self, losses: Any, n_tokens: Any, steps: int) -> tuple[float, int]:
        """The global mean training loss over ``steps`` and the global token count (mlx-lm's reduction)."""
        if self.size == 1:
            return losses.item() / steps, int(n_tokens.item())
        import mlx.core as mx  # noqa: PLC0415

        total = mx.distributed.all_sum(losses, stream=mx.cpu).item()
        tokens = mx.distributed.all_sum(n_tokens, stream=mx.cpu).item()
        return total / (steps * (self.size if self.compat else 1)), int(tokens)

    def gather_state(self, losses: Any, n_tokens: Any, grad_accum: Any) -> dict[str, Any]:
        """Every rank's own accumulators, stacked rank by rank (a checkpoint holds them all: the loss and tokens
        of the report window under way, and pending gradients, differ between ranks). Empty for one process."""
        if self.size == 1:
            return {}
        import mlx.core as mx  # noqa: PLC0415
        from mlx.utils import tree_map  # noqa: PLC0415

        def stack(x: Any) -> Any:
            return mx.distributed.all_gather(mx.array(x)[None], stream=mx.cpu)

        out = {"losses": stack(mx.array(losses, mx.float32)), "n_tokens": stack(n_tokens)}
        out["grad_accum"] = tree_map(stack, grad_accum) if grad_accum is not None else None
        mx.eval(out)  # on every rank now: a collective that only rank 0 evaluated would wait forever
        return out

    def own(self, stacked: Any) -> Any:
        """This rank's row of what :meth:`gather_state` stacked."""
        from mlx.utils import tree_map  # noqa: PLC0415

        return tree_map(lambda x: x[self.rank], stacked)

    def agree(self, flag: bool) -> bool:
        """True on every rank when it is true on any (a stop asked of one rank stops all after the same step)."""
        if self.size == 1:
            return flag
        import mlx.core as mx  # noqa: PLC0415

        return mx.distributed.all_sum(mx.array(int(flag)), stream=mx.cpu).item() > 0

    def per_rank(self, tokens_per_second: float | None, peak_memory_gb: float, rss_gb: float) -> dict[str, Any]:
        """``{"ranks": [{rank, tokens_per_second, peak_memory_gb, rss_gb}, ...]}`` for the train report."""
        if self.size == 1:
            return {}
        import mlx.core as mx  # noqa: PLC0415

        mine = mx.array([[tokens_per_second or 0.0, peak_memory_gb, rss_gb]], mx.float32)
        rows = mx.distributed.all_gather(mine, stream=mx.cpu).tolist()
        return {"world_size": self.size, "ranks": [
            {"rank": r, "tokens_per_second": round(t, 3), "peak_memory_gb": round(m, 4), "rss_gb": round(s, 4)}
            for r, (t, m, s) in enumerate(rows)]}


# ----------------------------------------------------------------------------------------- liveness


def _beat_line() -> str:
    return f"{time.time():.3f} {os.getpid()} {socket.gethostname()}\n"


def read_beat(path: Path) -> tuple[float, int, str] | None:
    """``(time, pid, host)`` of a rank's heartbeat file, or None when there is none (yet)."""
    try:
        t, pid, host = path.read_text().split()[:3]
        return float(t), int(pid), host
    except (FileNotFoundError, ValueError):
        return None


def _pid_alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


class Watchdog(threading.Thread):
    """Beats this rank's heartbeat and watches every other rank's; calls ``on_lost(reason)`` once for the first
    rank that is gone (its pid dead on this host, or no heartbeat for :data:`PEER_TIMEOUT`)."""

    def __init__(self, folder: RunFolder, rank: int, size: int, on_lost: Callable[[str], None]):
        super().__init__(name=f"watchdog-{rank}", daemon=True)
        self.folder, self.rank, self.size, self.on_lost = folder, rank, size, on_lost
        self.started_at = time.time()
        self.lost: str | None = None
        self.done = threading.Event()
        self.beat()

    def beat(self) -> None:
        with contextlib.suppress(OSError):
            write_atomic(heartbeat_path(self.folder, self.rank), _beat_line())

    def run(self) -> None:
        while not self.done.wait(HEARTBEAT_SECONDS):
            self.beat()
            lost = self.lost_peer()
            if lost:
                self.lost = lost
                self.on_lost(lost)
                return

    def lost_peer(self) -> str | None:
        """Why some other rank counts as gone, or None while all are there."""
        now, here = time.time(), socket.gethostname()
        for r in range(self.size):
            if r == self.rank:
                continue
            beat = read_beat(heartbeat_path(self.folder, r))
            if beat is None or beat[0] < self.started_at - PEER_TIMEOUT:  # none, or one from an earlier session
                if now - self.started_at > STARTUP_TIMEOUT:
                    return f"rank {r} never started (see ranks/{r}.log)"
                continue
            t, pid, host = beat
            if host == here and not _pid_alive(pid):
                return f"rank {r} (pid {pid}) ended"
            if now - t > PEER_TIMEOUT:
                return f"rank {r} on {host} sent no heartbeat for {now - t:.0f} s"
        return None

    def stop_others(self) -> None:
        """End the other ranks on this host (mlx.launch ends the remote ones when a rank exits)."""
        here = socket.gethostname()
        for r in range(self.size):
            beat = read_beat(heartbeat_path(self.folder, r))
            if r != self.rank and beat and beat[2] == here and _pid_alive(beat[1]):
                with contextlib.suppress(psutil.Error):
                    psutil.Process(beat[1]).kill()


def lost_reason(watchdog: Watchdog | None, error: BaseException | None) -> str | None:
    """Why the run lost a rank, if it did: what the watchdog saw, or the ring's own 'connection lost'."""
    if watchdog is None:
        return None
    why = watchdog.lost or watchdog.lost_peer()
    if why is None and error is not None and "[ring]" in str(error):
        why = f"a peer dropped its connection ({error})"
    return why


def interrupted_reason(folder: RunFolder, why: str) -> str:
    its = folder.checkpoint_iterations()
    at = folder.info().get("iteration") or 0
    last = f"; resume from checkpoint {its[-1]}" if its else "; no checkpoint was written"
    return f"{why} after iteration {at}: every rank stopped{last}"


def rank_states(folder: RunFolder, cfg: dict[str, Any], last_train: dict[str, Any] | None,
                active: bool) -> list[dict[str, Any]]:
    """What the Monitor shows of each rank: host, pid, status, last heartbeat age, and throughput and memory
    from the latest train report. Status: ``starting`` (no heartbeat yet), ``training``, ``dead`` (its process
    on this host is gone), ``silent`` (no heartbeat for :data:`PEER_TIMEOUT`), or ``ended`` once the run is."""
    figures = {r["rank"]: r for r in (last_train or {}).get("ranks") or []}  # none before the first report
    out, now, here = [], time.time(), socket.gethostname()
    for r, host in enumerate(hosts(cfg)):
        beat = read_beat(heartbeat_path(folder, r))
        age = now - beat[0] if beat else None
        if not active:
            status = "ended"
        elif beat is None:
            status = "starting"
        elif beat[2] == here and not _pid_alive(beat[1]):
            status = "dead"
        else:
            status = "training" if age is not None and age <= PEER_TIMEOUT else "silent"
        out.append({"rank": r, "host": host["ssh"], "pid": beat[1] if beat else None, "status": status,
                    "heartbeat_age": age, **{k: figures.get(r, {}).get(k) for k in
                                            ("tokens_per_second", "peak_memory_gb", "rss_gb")}})
    return out


# ----------------------------------------------------------------------------------------- preflight


def _probe_script(paths: list[str]) -> str:
    return ("import json, os, mlx.core, mlx_lm, services; print(json.dumps({'forgellm': services.__version__, "
            f"'mlx': mlx.core.__version__, 'mlx_lm': mlx_lm.__version__, 'missing': [p for p in {paths!r} "
            "if not os.path.exists(p)]}))")


def local_versions() -> dict[str, str]:
    import mlx.core as mx  # noqa: PLC0415
    import mlx_lm  # noqa: PLC0415

    return {"forgellm": __version__, "mlx": mx.__version__, "mlx_lm": mlx_lm.__version__}


def check_host(host: dict[str, Any], cfg: dict[str, Any], python: str, timeout: float = 20.0) -> dict[str, Any]:
    """One host's preflight: reachable (ssh, for a remote one), the same ForgeLLM/MLX/mlx-lm versions, and the
    model and data at the same paths. ``{"host", "local", "ok", "problems": [...]}``."""
    paths = [p for p in (cfg.get("model"), cfg.get("data"), str(REPO_ROOT)) if p]
    if is_local(host):
        missing = [p for p in paths if not os.path.exists(p)]
        return {"host": host["ssh"], "local": True, "ok": not missing,
                "problems": [f"{p} does not exist" for p in missing]}
    cmd = [*SSH, host["ssh"], f"cd {shlex.quote(str(REPO_ROOT))} && {shlex.quote(python)} -c "
                              f"{shlex.quote(_probe_script(paths))}"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as e:
        return {"host": host["ssh"], "local": False, "ok": False, "problems": [f"ssh {host['ssh']} failed: {e}"]}
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"host": host["ssh"], "local": False, "ok": False, "problems": [
            f"cannot run {python} in {REPO_ROOT} over ssh {host['ssh']}: {tail} (set up ssh keys and the same "
            "paths, see the README)"]}
    theirs = json.loads(proc.stdout.strip().splitlines()[-1])
    ours = local_versions()
    problems = [f"{k} {theirs[k]} there, {v} here: install the same version" for k, v in ours.items()
                if theirs.get(k) != v]
    problems += [f"{p} is missing there: copy it to the same path" for p in theirs["missing"]]
    return {"host": host["ssh"], "local": False, "ok": not problems, "problems": problems}


def preflight(cfg: dict[str, Any]) -> list[dict[str, Any]]:
    """Every host's check, rank order (see :func:`check_host`)."""
    python = (cfg.get("distributed") or {}).get("python") or sys.executable
    return [{"rank": r, **check_host(h, cfg, python)} for r, h in enumerate(hosts(cfg))]


# ----------------------------------------------------------------------------------------- the launcher


def _free_port_base(n: int) -> int:
    """A base port with ``n`` consecutive free ports on this machine (two runs must not share the ring's)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + n < 65535 and all(_port_free(base + i) for i in range(n)):
            return base
    return 32323  # mlx.launch's own default


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def write_hostfile(folder: RunFolder, cfg: dict[str, Any]) -> Path:
    """``RUN/hostfile.json`` in mlx.launch's format (backend, environment, hosts with their IPs)."""
    dist = cfg.get("distributed") or {}
    ranks = hosts(cfg)
    per_host = max(collections.Counter(h["ssh"] for h in ranks).values())  # the ranks sharing one host's cores
    envs = ["HF_HUB_OFFLINE=1", "TOKENIZERS_PARALLELISM=false", f"PYTHONPATH={REPO_ROOT}",
            f"{blas.SHARE_ENV}={per_host}"]
    envs += [f"{k}={os.environ[k]}" for k in ("MLX_DISABLE_COMPILE", blas.POLICY_ENV) if k in os.environ]
    path = folder.path / "hostfile.json"
    write_json(path, {"backend": dist.get("backend") or "ring", "envs": envs,
                      "hosts": [{"ssh": h["ssh"], "ips": h["ips"], "rdma": h.get("rdma", [])} for h in ranks]})
    return path


def launch_command(folder: RunFolder, cfg: dict[str, Any], python: str, checkpoint: Path | None) -> list[str]:
    """``mlx.launch`` with the run's hostfile, starting the worker once per rank."""
    dist = cfg.get("distributed") or {}
    launcher = Path(python).with_name("mlx.launch")
    if not launcher.exists():
        launcher = Path(shutil.which("mlx.launch") or launcher)
    cmd = [str(launcher), "--hostfile", str(write_hostfile(folder, cfg)), "--python", dist.get("python") or python,
           "--cwd", str(REPO_ROOT), "--starting-port", str(_free_port_base(len(hosts(cfg)))),
           "--", "-m", blas.TRAINING_MODULE, str(folder.path)]
    return cmd + (["--resume", str(checkpoint)] if checkpoint is not None else [])


def worker_command(folder: RunFolder, cfg: dict[str, Any], python: str, checkpoint: Path | None) -> list[str]:
    """What the run manager starts for a run: the worker, or for a distributed config this module's launcher."""
    module = "services.training.distributed" if world_size(cfg) > 1 else blas.TRAINING_MODULE
    cmd = [python, "-m", module, str(folder.path)]
    return cmd + (["--resume", str(checkpoint)] if checkpoint is not None else [])


def _copy_to_hosts(folder: RunFolder, cfg: dict[str, Any], checkpoint: Path | None) -> None:
    """Give every remote host the run's config (and the checkpoint to resume) at the same path."""
    for host in hosts(cfg):
        if is_local(host):
            continue
        items = [folder.config_path] + ([checkpoint] if checkpoint is not None else [])
        subprocess.run([*SSH, host["ssh"], "mkdir", "-p", str(ranks_dir(folder))] +
                       ([str(checkpoint.parent)] if checkpoint is not None else []), check=True, timeout=60)
        for item in items:
            subprocess.run(["scp", "-q", "-r", "-o", "BatchMode=yes", str(item), f"{host['ssh']}:{item.parent}/"],
                           check=True, timeout=600)


def _fail(folder: RunFolder, reason: str) -> int:
    folder.update(status="failed", reason=reason, pid=None, ended=time.time())
    folder.append_metric({"type": "status", "step": folder.info().get("iteration") or 0, "status": "failed",
                          "reason": reason})
    folder.log(f"failed: {reason}")
    return 1


def main(argv: list[str] | None = None) -> int:
    """Check the hosts, copy what they need, then become ``mlx.launch`` (same pid, same session)."""
    p = argparse.ArgumentParser(prog="python -m services.training.distributed")
    p.add_argument("run_dir")
    p.add_argument("--resume")
    args = p.parse_args(argv)
    folder = RunFolder(args.run_dir)
    cfg = folder.config()
    checkpoint = Path(args.resume) if args.resume else None
    ranks_dir(folder).mkdir(exist_ok=True)
    for old in ranks_dir(folder).glob("*.heartbeat"):
        old.unlink(missing_ok=True)
    remote = [h for h in hosts(cfg) if not is_local(h)]
    if remote:
        problems = [f"{c['host']}: {p}" for c in preflight(cfg) for p in c["problems"]]
        if problems:
            return _fail(folder, "distributed preflight: " + "; ".join(problems))
        try:
            _copy_to_hosts(folder, cfg, checkpoint)
        except (OSError, subprocess.SubprocessError) as e:
            return _fail(folder, f"could not copy the run to the other hosts: {e}")
    cmd = launch_command(folder, cfg, sys.executable, checkpoint)
    folder.log(f"launching {world_size(cfg)} ranks: {shlex.join(cmd)}")
    sys.stdout.flush()
    os.execv(cmd[0], cmd)
    return 0  # not reached


def read_hostfile(folder: RunFolder) -> dict[str, Any] | None:
    return read_json(folder.path / "hostfile.json", None)


if __name__ == "__main__":
    raise SystemExit(main())
