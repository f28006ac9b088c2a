"""Elastic launch: a small supervisor that keeps a data-parallel job going when ranks die.

    python -m dtrain.launch --nproc 2 --max-restarts 3 --min-ranks 1 -- model=lenet trainer.epochs=5

It starts ``mpirun -n N python -m dtrain <overrides>`` in one run directory (the one you
pass as ``hydra.run.dir=``, else a new one from ``conf/config.yaml``'s pattern). When the
job fails (a rank raised, was killed, or the collective watchdog fired), it waits (a
back-off that doubles from ``--backoff`` seconds up to a minute), then starts the job again
in the same directory with ``trainer.resume=auto``, which continues from that directory's
newest checkpoint: the data order continues where it stopped, and in deterministic mode
the final parameters are the bits of a run that never failed. Each restart takes ``N`` =
``--nproc`` ranks, or the slots of ``--hostfile`` (read again at every start, so dropping
a lost node from it shrinks the job), at least ``--min-ranks``.

A job that stops on request (SIGTERM or SIGUSR1 to one of its ranks: exit status
:data:`~dtrain.preemption.PREEMPTED`) is resumed at once and is no failure. A signal to the
supervisor itself (Ctrl-C, SIGTERM, Slurm's ``--signal``) is passed on as a stop request:
the job checkpoints and the supervisor exits with PREEMPTED, for the scheduler to requeue.

Every restart is one log line and one record in ``<run dir>/restarts.json`` (exit status,
ranks, the step the job had reached, the checkpoint step it resumed from, steps redone,
seconds of work lost, back-off), which the run's ``summary.json`` and TensorBoard repeat.

Exit status: 0 the run finished; :data:`~dtrain.preemption.PREEMPTED` stopped on request
with a checkpoint; :data:`GAVE_UP` the restart budget is spent or too few ranks are left;
2 a usage error.
"""
from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from types import FrameType

from dtrain.checkpoint import checkpoint_step
from dtrain.comm.watchdog import ArrivalBoard
from dtrain.preemption import PREEMPTED, STOP_FILE, request_stop
from dtrain.rundir import RESTARTS_FILE, dir_templates, read_restarts, resolve_now, run_checkpoints_in

log = logging.getLogger("dtrain.launch")

GAVE_UP = 3
MAX_BACKOFF_S = 60.0
FORWARDED_PREFIXES = ("NCCL_", "DTRAIN_", "OPENBLAS_", "OMP_")


@dataclass
class Restart:
    """One restart of the job (what ``restarts.json`` lists)."""

    attempt: int  # the attempt that ended (1 = the first start)
    exit_status: int
    kind: str  # "failed" or "preempted"
    ranks: int
    reached_step: int | None  # the newest step (0-based) any rank had begun, from the ranks' arrival board
    resumed_step: int | None  # the step of the checkpoint the next attempt resumes from
    steps_redone: int | None  # steps known complete after that checkpoint (the one in flight not counted)
    seconds_lost: float | None  # from that checkpoint's write to the end of the attempt
    backoff_s: float


def hostfile_slots(path: Path) -> int:
    """The slots an Open MPI hostfile offers (``host slots=N`` lines; 1 without ``slots=``)."""
    total = 0
    for line in path.read_text().splitlines():
        words = line.split("#", 1)[0].split()
        if words:
            slots = [w.split("=", 1)[1] for w in words[1:] if w.startswith("slots=")]
            total += int(slots[0]) if slots else 1
    return total


def find_mpirun() -> str:
    beside = Path(sys.executable).parent / "mpirun"
    found = str(beside) if beside.is_file() else shutil.which("mpirun")
    if found is None:
        raise SystemExit("dtrain.launch: mpirun not found: pip install 'dtrain[mpi]' or install Open MPI")
    return found


def srun_has_pmix() -> bool:
    """Inside a Slurm allocation, whether ``srun --mpi=pmix`` really starts a task: stock
    slurm-wlm lists a pmix plugin that cannot load its library ("Invalid MPI type 'pmix'")."""
    if "SLURM_JOB_ID" not in os.environ or shutil.which("srun") is None:
        return False
    try:
        probe = subprocess.run(["srun", "--mpi=pmix", "--ntasks=1", "true"], capture_output=True, text=True,
                               timeout=60, check=False)
    except subprocess.TimeoutExpired:
        return False
    return probe.returncode == 0


class Supervisor:
    """Starts the job, watches it end, and starts it again while the budget allows."""

    def __init__(self, args: argparse.Namespace, overrides: list[str]) -> None:
        self.args = args
        given = [o.split("=", 1)[1] for o in overrides if o.split("=", 1)[0].lstrip("+") == "hydra.run.dir"]
        template = given[-1] if given else dir_templates()["hydra.run.dir"]
        self.run_dir = Path(resolve_now(template, datetime.datetime.now())).resolve()
        self.overrides = [o for o in overrides if o.split("=", 1)[0].lstrip("+") not in
                          ("hydra.run.dir", "trainer.resume")]
        self.stop_signal: str | None = None
        self.restarts = [Restart(**r) for r in read_restarts(self.run_dir)]  # a requeued supervisor continues
        self.job: subprocess.Popen | None = None
        self.launcher = args.launcher if args.launcher != "auto" else ("srun" if srun_has_pmix() else "mpirun")
        log.info("dtrain.launch: starting ranks with %s", self.launcher)

    def ranks(self) -> int:
        available = self.args.nproc
        if self.args.hostfile is not None:
            available = min(available, hostfile_slots(Path(self.args.hostfile)))
        return available

    def command(self, ranks: int, resume: bool) -> list[str]:
        app = [sys.executable, "-m", "dtrain", *self.overrides, f"hydra.run.dir={self.run_dir}"]
        if resume:
            app.append("trainer.resume=auto")
        if self.launcher == "srun":
            return ["srun", "--mpi=pmix", "-n", str(ranks), *app]
        cmd = [find_mpirun(), "-n", str(ranks)]
        if self.args.hostfile is not None:
            cmd += ["--hostfile", self.args.hostfile]
        if self.args.oversubscribe:
            cmd.append("--oversubscribe")
        # mpirun copies no environment to other nodes: pass on what the ranks read
        forwarded = {var for var in os.environ if var.startswith(FORWARDED_PREFIXES) or var == "PYTHONPATH"}
        for var in sorted(forwarded | {"DTRAIN_ATTEMPT"}):
            cmd += ["-x", var]
        return [*cmd, *self.args.mpirun_arg, *app]

    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        attempt = len(self.restarts) + 1
        failures = sum(r.kind == "failed" for r in self.restarts)
        while True:
            ranks = self.ranks()
            if ranks < self.args.min_ranks:
                log.error("dtrain.launch: %d rank(s) available, fewer than --min-ranks %d: giving up", ranks,
                          self.args.min_ranks)
                return GAVE_UP
            own = run_checkpoints_in(self.run_dir)
            (self.run_dir / STOP_FILE).unlink(missing_ok=True)
            log.info("dtrain.launch: attempt %d on %d rank(s) in %s%s", attempt, ranks, self.run_dir,
                     f", resuming {own[-1].name}" if own else "")
            env = {**os.environ, "DTRAIN_ATTEMPT": str(attempt)}
            if os.geteuid() == 0:  # Open MPI refuses root unless told
                env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
            started = time.time()
            self.job = subprocess.Popen(self.command(ranks, resume=bool(own)), env=env)
            status = self.job.wait()
            if status == 0:
                log.info("dtrain.launch: the run finished after %d restart(s)", len(self.restarts))
                return 0
            preempted = status == PREEMPTED
            if self.stop_signal is not None:  # the supervisor was asked to stop: so did the job
                if preempted:  # a requeued job's supervisor continues this record
                    self._record(attempt, status, True, ranks, started, 0.0)
                log.info("dtrain.launch: stopped by %s, exit status %d%s", self.stop_signal, status,
                         "" if preempted else " (the job did not stop cleanly)")
                return PREEMPTED if preempted else status
            if not preempted:
                failures += 1
                if failures > self.args.max_restarts:
                    log.error("dtrain.launch: attempt %d failed with exit status %d; the restart budget "
                              "(--max-restarts %d) is spent: giving up", attempt, status, self.args.max_restarts)
                    return GAVE_UP
            backoff = 0.0 if preempted else min(self.args.backoff * 2 ** (failures - 1), MAX_BACKOFF_S)
            record = self._record(attempt, status, preempted, ranks, started, backoff)
            log.warning("dtrain.launch: attempt %d %s (exit status %d) at step %s; restart %d%s from step %s "
                        "(%s steps to redo) in %.0f s", attempt, record.kind, status, record.reached_step,
                        len(self.restarts), "" if preempted else f" of {self.args.max_restarts}",
                        record.resumed_step, record.steps_redone, backoff)
            time.sleep(backoff)
            attempt += 1

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.stop_signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: leave now
        self.stop_signal = name
        if self.run_dir.is_dir():
            request_stop(self.run_dir, name)  # rank 0 sees it at its next step

    def _record(self, attempt: int, status: int, preempted: bool, ranks: int, started: float,
                backoff: float) -> Restart:
        reached = None
        board = self.run_dir / ".collectives"
        if board.is_dir():
            arrivals = [a for a in ArrivalBoard.read_all(board) if a.step is not None and a.at >= started]
            reached = max((a.step for a in arrivals), default=None)
        own = run_checkpoints_in(self.run_dir)
        resumed = checkpoint_step(own[-1]) if own else 0
        lost = time.time() - (own[-1].stat().st_mtime if own else started)
        record = Restart(attempt, status, "preempted" if preempted else "failed", ranks, reached, resumed,
                         None if reached is None else max(0, reached - resumed), round(lost, 3), backoff)
        self.restarts.append(record)
        (self.run_dir / RESTARTS_FILE).write_text(json.dumps([asdict(r) for r in self.restarts], indent=2) + "\n")
        return record


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dtrain.launch", description=__doc__.split("\n\n")[0],
                                 usage="%(prog)s [options] -- [dtrain overrides ...]")
    ap.add_argument("--nproc", type=int, default=2, help="ranks to start (default 2)")
    ap.add_argument("--min-ranks", type=int, default=1, help="restart with fewer ranks down to this many")
    ap.add_argument("--max-restarts", type=int, default=3, help="failed attempts to restart (stops do not count)")
    ap.add_argument("--backoff", type=float, default=2.0, help="seconds before the first restart, doubling")
    ap.add_argument("--hostfile", help="Open MPI hostfile, read again at every start: its slots cap the ranks")
    ap.add_argument("--launcher", choices=["auto", "mpirun", "srun"], default="auto",
                    help="auto: srun --mpi=pmix inside a Slurm allocation that has PMIx, else mpirun")
    ap.add_argument("--oversubscribe", action="store_true", help="mpirun --oversubscribe (more ranks than cores)")
    ap.add_argument("--mpirun-arg", action="append", default=[], help="an extra mpirun option (repeatable)")
    argv = sys.argv[1:] if argv is None else argv
    if "--" in argv:
        at = argv.index("--")
        argv, overrides = argv[:at], argv[at + 1:]
    else:
        overrides = []
    args = ap.parse_args(argv)
    if args.nproc < 1 or args.min_ranks < 1 or args.max_restarts < 0 or args.backoff < 0:
        ap.error("--nproc and --min-ranks must be >= 1, --max-restarts and --backoff >= 0")
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s] %(message)s")
    return Supervisor(args, overrides).run()


if __name__ == "__main__":
    sys.exit(main())
