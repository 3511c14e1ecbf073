"""`acestep-serverless dev` plus extra `worker` processes, in a fresh data directory and a fresh
database, for benchmarks that need the real pipeline behind the real API.

The database is a scratch one on the given Postgres server, else on 127.0.0.1:5432, else dev's own
embedded pgserver in the data directory. Without a checkpoint directory dev builds tiny random
checkpoints and the extra workers load the same ones.
"""

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from db.server import LOCAL_URL, reachable  # noqa: E402
from scratch_database import scratch_database  # noqa: E402

# Settings a caller's shell may hold that would point dev somewhere other than the fresh deployment.
INHERITED_OUT = ("ACESTEP_DATABASE_URL", "ACESTEP_PIPELINE", "ACESTEP_CHECKPOINT_DIR", "ACESTEP_STORAGE_URL",
                 "ACESTEP_DATA_DIR", "ACESTEP_PORT", "ACESTEP_HOST", "ACESTEP_PUBLIC_URL")
STORE_READY = "job store ready: "


class DeploymentError(RuntimeError):
    """dev or a worker did not come up; the message carries the end of its log."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(what: str, predicate, timeout: float, logs: list[Path], procs: list[subprocess.Popen]) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        for proc in procs:
            if proc.poll() is not None:
                raise DeploymentError(f"{proc.args[-1]} exited with code {proc.returncode} before {what}\n{tails(logs)}")
        if time.monotonic() > deadline:
            raise DeploymentError(f"timed out after {timeout:.0f} s waiting for {what}\n{tails(logs)}")
        time.sleep(0.2)


def tails(logs: list[Path], lines: int = 30) -> str:
    return "\n".join(f"--- {log.name} (last {lines} lines)\n" + "".join(log.read_text(errors="replace").splitlines(True)[-lines:])
                     for log in logs if log.exists())


def health(base: str) -> dict:
    try:
        return httpx.get(f"{base}/health", timeout=2).json().get("data") or {}
    except (httpx.HTTPError, ValueError):
        return {}


def _store_url(log: Path) -> str | None:
    if not log.exists():
        return None
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith(STORE_READY):
            return line[len(STORE_READY):].strip()
    return None


def _stop(proc: subprocess.Popen, sig: int, grace: float) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _pinned(index: int, pin: bool):
    """A preexec_fn that puts the child on one CPU (None: no pinning)."""
    if not pin:
        return None
    cpus = sorted(os.sched_getaffinity(0))
    cpu = cpus[index % len(cpus)]
    return lambda: os.sched_setaffinity(0, {cpu})


@contextmanager
def dev_deployment(
    *,
    workers: int = 2,
    env: dict[str, str] | None = None,
    postgres: str | None = None,
    checkpoint_dir: Path | None = None,
    keep: bool = False,
    start_timeout: float = 600.0,
    pin_cpus: bool = False,
) -> Iterator[dict]:
    """Yield {"url", "data_dir", "database_url"} once /health shows `workers` live job slots: dev's
    own worker plus `workers - 1` more `worker` processes with dev's environment.

    `pin_cpus`: process i (dev, then each worker, with their pipeline children) runs on CPU
    i mod the CPU count with one torch thread, so each worker slot has a device of its own, as on a
    GPU fleet, instead of every slot's torch threads sharing every core."""
    data_dir = Path(tempfile.mkdtemp(prefix="acestep-bench-"))
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    logs = [data_dir / "dev.log"] + [data_dir / f"worker-{i + 2}.log" for i in range(workers - 1)]
    procs: list[subprocess.Popen] = []
    with ExitStack() as stack:
        child_env = {k: v for k, v in os.environ.items() if k not in INHERITED_OUT}
        child_env |= (env or {}) | {"ACESTEP_DATA_DIR": str(data_dir), "ACESTEP_PORT": str(port)}
        if pin_cpus:
            child_env |= {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        server = postgres or (LOCAL_URL if reachable(LOCAL_URL) else None)
        if server:  # else dev starts its own embedded server in the data directory
            child_env["ACESTEP_DATABASE_URL"] = stack.enter_context(scratch_database(server, "bench_eta", migrate=False))
        if checkpoint_dir:
            child_env["ACESTEP_CHECKPOINT_DIR"] = str(checkpoint_dir.resolve())
        try:
            with logs[0].open("w") as out:
                procs.append(subprocess.Popen([sys.executable, "-m", "handler.cli", "dev"], cwd=ROOT, env=child_env,
                                              stdout=out, stderr=subprocess.STDOUT, preexec_fn=_pinned(0, pin_cpus)))
            tiny = data_dir / "tiny-checkpoints"
            builds_tiny = checkpoint_dir is None and "ACESTEP_PIPELINE" not in child_env  # as cmd_dev decides
            wait_for("the job store and checkpoints",
                     lambda: _store_url(logs[0]) and (not builds_tiny or (tiny / ".complete").exists()),
                     start_timeout, logs, procs)
            worker_env = child_env | {"ACESTEP_DATABASE_URL": _store_url(logs[0])}
            if builds_tiny:
                worker_env["ACESTEP_CHECKPOINT_DIR"] = str(tiny)
            for i, log in enumerate(logs[1:], start=1):
                with log.open("w") as out:
                    procs.append(subprocess.Popen([sys.executable, "-m", "handler.cli", "worker"], cwd=ROOT,
                                                  env=worker_env, stdout=out, stderr=subprocess.STDOUT,
                                                  preexec_fn=_pinned(i, pin_cpus)))
            wait_for(f"{workers} live worker slots", lambda: health(base).get("worker_slots", 0) >= workers,
                     start_timeout, logs, procs)
            yield {"url": base, "data_dir": data_dir, "database_url": worker_env["ACESTEP_DATABASE_URL"]}
        finally:
            for proc in procs[1:]:
                _stop(proc, signal.SIGTERM, 60)
            if procs:
                _stop(procs[0], signal.SIGINT, 90)  # dev stops its own worker, then its embedded database
            if keep:
                print(f"kept the data directory {data_dir} (logs: dev.log, worker-*.log)", flush=True)
            else:
                shutil.rmtree(data_dir, ignore_errors=True)
