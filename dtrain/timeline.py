"""Where a training step's time goes: per-phase timing, aggregates and a Chrome trace.

A step is split into the phases of :data:`PHASES`: waiting for the loader's next batch
(``data``), the host-to-device copy (``h2d``), ``forward`` (loss included), ``backward``,
waiting on gradient communication (``comm``) and the ``optimizer`` step; whatever runs
between them (accuracy counts, the finite-gradient check) is ``other``.

:class:`PhaseTimer` marks the start and stop of every phase with a clock chosen once, in
:func:`make_clock`: ``time.perf_counter`` on NumPy, CUDA events on CuPy (their times are
those of the GPU stream, so a phase is the device work it queued, not the launch time).
Marks are reused from step to step and resolved in :meth:`PhaseTimer.end_step`, which
waits for the step's last mark (on GPU, for the stream to reach it). The timer always
keeps per-phase totals (a few floats); with ``record_steps=True`` it also keeps each
step's intervals and all-reduce buckets until :meth:`PhaseTimer.take_records` hands them
out, for TensorBoard and for :class:`ChromeTrace`.

All times are seconds on the host ``perf_counter`` scale (CUDA event times are anchored to
it after every step), so the buckets' ``perf_counter`` stamps from
:class:`dtrain.parallel.buckets.BucketTiming` land on the same axis, and ranks on one host
share it.
"""
from __future__ import annotations

import json
import resource
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from dtrain.parallel.buckets import BucketTiming

PHASES = ("data", "h2d", "forward", "backward", "comm", "optimizer")
OTHER = "other"


# -- clocks -------------------------------------------------------------------------------
class HostClock:
    """Marks are ``now()`` readings (``time.perf_counter`` unless a test passes another)."""

    kind = "perf_counter"

    def __init__(self, now: Callable[[], float] = time.perf_counter) -> None:
        self._now = now
        self._marks: list[float] = []

    def record(self, slot: int) -> None:
        if slot == len(self._marks):
            self._marks.append(0.0)
        self._marks[slot] = self._now()

    def settle(self, last: int) -> None:
        """Host marks are final when taken."""

    def seconds(self, slot: int) -> float:
        return self._marks[slot]

    def rebase(self) -> None:
        """Host marks need no anchor."""

    def device_bytes(self) -> int | None:
        return None


class CudaEventClock:
    """Marks are CUDA events on the current stream, read as ``perf_counter`` seconds.

    An origin event is recorded and waited for next to one ``perf_counter`` reading
    (:meth:`rebase`, after every step). Elapsed times come as float32 milliseconds, so marks
    are measured from the step's first mark (short spans: durations precise to the event
    resolution, ~0.5 us); only that first mark is placed from the origin."""

    kind = "cuda_events"

    def __init__(self, cupy: ModuleType) -> None:
        self._cupy = cupy
        self._events: list[Any] = []
        self._origin = cupy.cuda.Event()
        self._origin_s = 0.0
        self._first_s = 0.0  # the current step's first mark, in perf_counter seconds
        self.rebase()
        self._pool = cupy.get_default_memory_pool()

    def record(self, slot: int) -> None:
        if slot == len(self._events):
            self._events.append(self._cupy.cuda.Event())
        self._events[slot].record()

    def settle(self, last: int) -> None:
        """Wait until the stream has passed mark ``last`` (and every mark before it)."""
        self._events[last].synchronize()
        self._first_s = self._origin_s + self._elapsed_s(self._origin, self._events[0])

    def seconds(self, slot: int) -> float:
        return self._first_s + self._elapsed_s(self._events[0], self._events[slot])

    def _elapsed_s(self, start: Any, end: Any) -> float:
        return self._cupy.cuda.get_elapsed_time(start, end) / 1e3

    def rebase(self) -> None:
        """Record a new origin and wait for it (cheap once the step's work is done)."""
        self._origin.record()
        self._origin.synchronize()
        self._origin_s = time.perf_counter()

    def device_bytes(self) -> int | None:
        """Bytes the CuPy memory pool holds (allocated and cached) now."""
        return int(self._pool.total_bytes())


def make_clock(xp: ModuleType) -> HostClock | CudaEventClock:
    """The clock for arrays of ``xp``: the one place that picks events over host time."""
    return HostClock() if xp is np else CudaEventClock(xp)


def peak_host_rss_bytes() -> int:
    """This process's peak resident set size (``ru_maxrss``: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024


# -- the timer ----------------------------------------------------------------------------
@dataclass
class StepRecord:
    """One timed step: ``start``/``seconds`` of the whole step, ``phase_seconds`` summed per
    phase (in :data:`PHASES` order), every ``(phase, start, stop)`` interval, and the
    all-reduce buckets of the step."""

    step: int
    start: float
    seconds: float
    phase_seconds: tuple[float, ...]
    intervals: list[tuple[str, float, float]]
    buckets: list[BucketTiming] = field(default_factory=list)

    def brief(self) -> tuple[int, float, tuple[float, ...]]:
        """``(step, seconds, phase_seconds)``: what ranks exchange for TensorBoard."""
        return self.step, self.seconds, self.phase_seconds


class _Phase:
    """``with timer.phase(name):`` without allocating a context manager per use."""

    def __init__(self, timer: PhaseTimer, index: int) -> None:
        self._timer, self._index = timer, index

    def __enter__(self) -> None:
        self._timer._open(self._index)

    def __exit__(self, *exc: object) -> None:
        self._timer._close(self._index)


class PhaseTimer:
    """Times the phases of every training step on one rank.

    Use ``with timer.phase("forward"): ...`` (or :meth:`start` / :meth:`stop`) for each
    phase, any number of times per step, phases never nested; wrap the batch iterator in
    :meth:`timed` to time the wait for data; call :meth:`end_step` after the last phase.
    ``clock`` defaults to :func:`make_clock` of ``xp``.
    """

    def __init__(self, xp: ModuleType = np, record_steps: bool = False,
                 clock: HostClock | CudaEventClock | None = None) -> None:
        self.clock = clock if clock is not None else make_clock(xp)
        self.record_steps = record_steps
        self.steps = 0
        self.total_s = 0.0
        self.phase_total_s = [0.0] * len(PHASES)
        self.peak_device_bytes: int | None = self.clock.device_bytes()
        self._index = {name: i for i, name in enumerate(PHASES)}
        self._phases = {name: _Phase(self, i) for name, i in self._index.items()}
        self._interval_phase: list[int] = []  # phase of interval k (marks 2k and 2k+1), reused
        self._marks = 0  # marks taken in the current step
        self._step_s = [0.0] * len(PHASES)
        self._buckets: list[BucketTiming] = []
        self._records: list[StepRecord] = []

    # -- marking phases ------------------------------------------------------------------
    def phase(self, name: str) -> _Phase:
        """A context manager timing one occurrence of phase ``name``."""
        try:
            return self._phases[name]
        except KeyError:
            raise ValueError(f"PhaseTimer: unknown phase {name!r}; phases are {', '.join(PHASES)}") from None

    def start(self, name: str) -> None:
        self.phase(name).__enter__()

    def stop(self, name: str) -> None:
        self.phase(name).__exit__(None, None, None)

    def timed(self, items: Iterable[Any], name: str = "data") -> Iterator[Any]:
        """``items``, timing each wait for the next one as phase ``name`` (the wait that
        ends the iteration is not counted); closing this iterator closes ``items``'."""
        iterator = iter(items)
        phase = self.phase(name)
        try:
            while True:
                phase.__enter__()
                try:
                    item = next(iterator)
                except StopIteration:
                    self._marks -= 1  # drop the unfinished interval
                    return
                phase.__exit__(None, None, None)
                yield item
        finally:
            close = getattr(iterator, "close", None)
            if close is not None:
                close()

    def _open(self, index: int) -> None:
        if self._marks % 2:
            open_name = PHASES[self._interval_phase[self._marks // 2]]
            raise RuntimeError(f"PhaseTimer: phase {PHASES[index]!r} started while {open_name!r} is running")
        k = self._marks // 2
        if k == len(self._interval_phase):
            self._interval_phase.append(index)
        else:
            self._interval_phase[k] = index
        self.clock.record(self._marks)
        self._marks += 1

    def _close(self, index: int) -> None:
        if not self._marks % 2 or self._interval_phase[self._marks // 2] != index:
            raise RuntimeError(f"PhaseTimer: phase {PHASES[index]!r} stopped but it is not running")
        self.clock.record(self._marks)
        self._marks += 1

    def add_buckets(self, buckets: Sequence[BucketTiming]) -> None:
        """The all-reduce buckets of this step (kept only with ``record_steps``)."""
        if self.record_steps:
            self._buckets.extend(buckets)

    # -- closing a step -------------------------------------------------------------------
    def end_step(self, step: int) -> float:
        """Close step number ``step`` (waiting for its last mark); returns its seconds, from
        the first phase's start to the last phase's stop."""
        marks = self._marks
        if marks == 0 or marks % 2:
            raise RuntimeError("PhaseTimer.end_step: no phase was timed, or one is still running")
        clock, per_phase = self.clock, self._step_s
        clock.settle(marks - 1)
        for i in range(len(per_phase)):
            per_phase[i] = 0.0
        for k in range(marks // 2):
            per_phase[self._interval_phase[k]] += clock.seconds(2 * k + 1) - clock.seconds(2 * k)
        start = clock.seconds(0)
        seconds = clock.seconds(marks - 1) - start
        self.steps += 1
        self.total_s += seconds
        for i, s in enumerate(per_phase):
            self.phase_total_s[i] += s
        device_bytes = clock.device_bytes()
        if device_bytes is not None:
            self.peak_device_bytes = max(self.peak_device_bytes or 0, device_bytes)
        if self.record_steps:
            intervals = [(PHASES[self._interval_phase[k]], clock.seconds(2 * k), clock.seconds(2 * k + 1))
                         for k in range(marks // 2)]
            self._records.append(StepRecord(step, start, seconds, tuple(per_phase), intervals, self._buckets))
            self._buckets = []
        self._marks = 0
        clock.rebase()
        return seconds

    def take_records(self) -> list[StepRecord]:
        """The steps recorded since the last call (empty without ``record_steps``)."""
        records, self._records = self._records, []
        return records

    def breakdown(self) -> dict[str, Any]:
        """Mean milliseconds per step of each phase and of ``other`` (step time not in any
        phase), with each one's share of the mean step in percent."""
        n = max(self.steps, 1)
        step_ms = self.total_s / n * 1e3
        ms = {name: total / n * 1e3 for name, total in zip(PHASES, self.phase_total_s)}
        ms[OTHER] = step_ms - sum(ms.values())
        return {
            "steps": self.steps,
            "clock": self.clock.kind,
            "step_ms": step_ms,
            "phases": {name: {"ms_per_step": v, "share_pct": 100 * v / step_ms if step_ms > 0 else 0.0}
                       for name, v in ms.items()},
        }


def format_breakdown(breakdown: dict[str, Any]) -> str:
    """One line from :meth:`PhaseTimer.breakdown`: ``step 12.3 ms = data 0.1 (1%) + ...``."""
    parts = [f"{name} {v['ms_per_step']:.1f} ({v['share_pct']:.0f}%)" for name, v in breakdown["phases"].items()]
    return f"step {breakdown['step_ms']:.1f} ms = " + " + ".join(parts)


# -- TensorBoard ----------------------------------------------------------------------------
def timeline_scalars(per_rank: Sequence[Sequence[tuple[int, float, tuple[float, ...]]]]) -> dict[int, dict[str, float]]:
    """TensorBoard scalars by step from every rank's :meth:`StepRecord.brief` list (index =
    rank): ``timeline/rank<R>/<phase>_ms`` and ``.../step_ms`` per rank, ``timeline/skew_ms``
    (slowest minus fastest rank's step time) and ``timeline/slowest_rank``."""
    by_step: dict[int, dict[int, tuple[float, tuple[float, ...]]]] = {}
    for rank, briefs in enumerate(per_rank):
        for step, seconds, phase_seconds in briefs:
            by_step.setdefault(step, {})[rank] = (seconds, phase_seconds)
    out: dict[int, dict[str, float]] = {}
    for step, ranks in sorted(by_step.items()):
        values: dict[str, float] = {}
        for rank, (seconds, phase_seconds) in sorted(ranks.items()):
            values[f"timeline/rank{rank}/step_ms"] = seconds * 1e3
            for name, s in zip(PHASES, phase_seconds):
                values[f"timeline/rank{rank}/{name}_ms"] = s * 1e3
        step_s = {rank: seconds for rank, (seconds, _) in ranks.items()}
        slowest = max(step_s, key=step_s.get)
        values["timeline/skew_ms"] = (step_s[slowest] - min(step_s.values())) * 1e3
        values["timeline/slowest_rank"] = float(slowest)
        out[step] = values
    return out


# -- Chrome trace ---------------------------------------------------------------------------
STEP_TID, PHASE_TID, BUCKET_TID0 = 0, 1, 100


def bus_bandwidth(nbytes: int, seconds: float, ranks: int) -> float:
    """All-reduce bus bandwidth in bytes/s, nccl-tests' definition:
    ``nbytes / seconds * 2 (n - 1) / n`` (what each link carries in a ring)."""
    if seconds <= 0:
        return 0.0
    return nbytes / seconds * 2 * (ranks - 1) / ranks


class ChromeTrace:
    """A ``{"traceEvents": [...]}`` JSON file for chrome://tracing or Perfetto, written as the
    run goes (:meth:`write` appends, :meth:`close` ends the JSON; a run killed before that
    leaves the closing brackets missing).

    One process per rank (``pid = rank``); thread 0 holds a ``step N`` event per step,
    thread 1 the phases, thread ``100 + b`` the all-reduce of bucket ``b`` with its bytes,
    algorithm bandwidth and bus bandwidth in GB/s (1e9) in ``args``. Times are microseconds
    of ``perf_counter``. A bucket's span is host-observed: from starting its all-reduce to
    first seeing it complete (a poke during backward, or the wait in ``finish``), so its
    bandwidth is a lower bound on what the link did.
    """

    def __init__(self, path: str | Path, rank: int, world_size: int) -> None:
        self.path = Path(path)
        self.rank, self.world_size = rank, world_size
        self._file = self.path.open("w")
        self._file.write('{"displayTimeUnit": "ms", "traceEvents": [\n')
        self._first = True
        self._bucket_rows: set[int] = set()
        self._emit([self._meta("process_name", None, f"rank {rank}"), self._meta("process_sort_index", None, rank),
                    self._meta("thread_name", STEP_TID, "steps"), self._meta("thread_name", PHASE_TID, "phases")])

    def write(self, records: Iterable[StepRecord]) -> None:
        """Append the events of ``records`` and flush the file."""
        events: list[dict[str, Any]] = []
        for rec in records:
            events.append(self._complete(f"step {rec.step}", "step", STEP_TID, rec.start, rec.seconds,
                                         {"step": rec.step}))
            for name, start, stop in rec.intervals:
                events.append(self._complete(name, "phase", PHASE_TID, start, stop - start, {"step": rec.step}))
            for b in rec.buckets:
                events.extend(self._bucket_events(rec.step, b))
        self._emit(events)
        self._file.flush()

    def close(self) -> None:
        if not self._file.closed:
            self._file.write("\n]}\n")
            self._file.close()

    def _bucket_events(self, step: int, b: BucketTiming) -> list[dict[str, Any]]:
        events = []
        tid = BUCKET_TID0 + b.bucket
        if b.bucket not in self._bucket_rows:
            self._bucket_rows.add(b.bucket)
            events.append(self._meta("thread_name", tid, f"all-reduce bucket {b.bucket}"))
        seconds = b.seconds
        args = {"step": step, "bucket": b.bucket, "bytes": b.nbytes,
                "algbw_GBps": b.nbytes / seconds / 1e9 if seconds > 0 else 0.0,
                "busbw_GBps": bus_bandwidth(b.nbytes, seconds, self.world_size) / 1e9}
        events.append(self._complete(f"all-reduce bucket {b.bucket}", "allreduce", tid, b.started, seconds, args))
        return events

    def _complete(self, name: str, cat: str, tid: int, start: float, seconds: float,
                  args: dict[str, Any]) -> dict[str, Any]:
        return {"name": name, "cat": cat, "ph": "X", "pid": self.rank, "tid": tid,
                "ts": start * 1e6, "dur": max(seconds, 0.0) * 1e6, "args": args}

    def _meta(self, kind: str, tid: int | None, value: str | int) -> dict[str, Any]:
        key = "sort_index" if kind.endswith("sort_index") else "name"
        event = {"name": kind, "ph": "M", "pid": self.rank, "args": {key: value}}
        if tid is not None:
            event["tid"] = tid
        return event

    def _emit(self, events: list[dict[str, Any]]) -> None:
        for event in events:
            self._file.write(("" if self._first else ",\n") + json.dumps(event))
            self._first = False

    def __enter__(self) -> ChromeTrace:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
