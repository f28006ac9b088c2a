"""Failures on cue for the elastic-launch tests (never part of dtrain itself).

Put this directory first on PYTHONPATH and set ``DTRAIN_CHAOS`` to a plan, entries
separated by ``;``, each ``ATTEMPT:ACTION:RANK:STEP`` for the attempt numbered by the
supervisor's ``DTRAIN_ATTEMPT``:

* ``kill``: the rank SIGKILLs itself as it begins the step (a crashed node);
* ``killsave``: the rank (0: it writes checkpoints) SIGKILLs itself half-way through
  writing the checkpoint of the step;
* ``term``: the rank gets SIGTERM as it begins the step (a preemption notice);
* ``shrink``: the rank rewrites ``DTRAIN_CHAOS_HOSTFILE`` to one slot, then SIGKILLs
  itself (a node lost for good).
"""
import os

_plan = [entry.split(":") for entry in os.environ.get("DTRAIN_CHAOS", "").split(";") if entry]
_attempt = os.environ.get("DTRAIN_ATTEMPT")
_rank = os.environ.get("OMPI_COMM_WORLD_RANK", "0")
_mine = [(action, int(step)) for attempt, action, rank, step in _plan if attempt == _attempt and rank == _rank]

if _mine:
    import signal

    import dtrain.checkpoint as _checkpoint
    import dtrain.parallel.workers as _workers

    _forward_backward = _workers.ComputeWorker.forward_backward
    _write_npz = _checkpoint._write_npz
    _fired = set()

    def forward_backward(self, x, y, step, *args, **kwargs):
        for action, at in _mine:
            if at == step and (action, at) not in _fired:
                _fired.add((action, at))
                if action == "kill":
                    os.kill(os.getpid(), signal.SIGKILL)
                if action == "term":
                    os.kill(os.getpid(), signal.SIGTERM)
                if action == "shrink":
                    with open(os.environ["DTRAIN_CHAOS_HOSTFILE"], "w") as f:
                        f.write("localhost slots=1\n")
                    os.kill(os.getpid(), signal.SIGKILL)
        return _forward_backward(self, x, y, step, *args, **kwargs)

    def write_npz(f, arrays):
        step = int(arrays["meta/step"])
        if ("killsave", step) in _mine:
            f.write(b"\0" * 4096)  # part of the file: the temporary file stays behind
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        return _write_npz(f, arrays)

    _workers.ComputeWorker.forward_backward = forward_backward
    _checkpoint._write_npz = write_npz
