"""The per-phase step timeline: the timer's arithmetic, the Chrome trace, TensorBoard scalars,
and what a training run (1 and 2 ranks) writes with ``logging.timeline=true``."""
from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from mpirun_helper import run_dtrain
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_app import FAST, dtrain, run_dirs

from dtrain.backend import gpu_available, xp_for
from dtrain.parallel.buckets import BucketTiming
from dtrain.timeline import (
    OTHER,
    PHASES,
    ChromeTrace,
    CudaEventClock,
    HostClock,
    PhaseTimer,
    StepRecord,
    bus_bandwidth,
    format_breakdown,
    make_clock,
    timeline_scalars,
)


class ScriptedTime:
    """A ``now()`` returning the given readings in order."""

    def __init__(self, *readings: float) -> None:
        self._readings = iter(readings)

    def __call__(self) -> float:
        return next(self._readings)


def scripted_timer(*readings: float, record_steps: bool = False) -> PhaseTimer:
    return PhaseTimer(record_steps=record_steps, clock=HostClock(ScriptedTime(*readings)))


# -- the timer ---------------------------------------------------------------------------------
def test_phases_add_up_per_step_and_aggregate_over_steps():
    # step 0: data 0-1, h2d 1-1.5, forward 2-4, backward 4-7, forward again 7-8, optimizer 9-9.25
    # step 1: data 20-21, optimizer 21-23
    timer = scripted_timer(0, 1, 1, 1.5, 2, 4, 4, 7, 7, 8, 9, 9.25, 20, 21, 21, 23, record_steps=True)
    for name in ("data", "h2d", "forward", "backward", "forward", "optimizer"):
        with timer.phase(name):
            pass
    assert timer.end_step(0) == 9.25
    for name in ("data", "optimizer"):
        timer.start(name)
        timer.stop(name)
    assert timer.end_step(1) == 3.0

    first, second = timer.take_records()
    assert dict(zip(PHASES, first.phase_seconds)) == {"data": 1, "h2d": 0.5, "forward": 3, "backward": 3,
                                                      "comm": 0, "optimizer": 0.25}
    assert first.intervals[2:5] == [("forward", 2, 4), ("backward", 4, 7), ("forward", 7, 8)]
    assert (first.step, first.start, first.seconds) == (0, 0, 9.25)
    assert (second.step, second.start, second.seconds) == (1, 20, 3.0)
    assert timer.take_records() == []

    b = timer.breakdown()
    assert b["steps"] == 2 and b["clock"] == "perf_counter"
    assert b["step_ms"] == pytest.approx(6125)  # (9.25 + 3) / 2 s
    ms = {name: v["ms_per_step"] for name, v in b["phases"].items()}
    assert ms == pytest.approx({"data": 1000, "h2d": 250, "forward": 1500, "backward": 1500, "comm": 0,
                                "optimizer": 1125, OTHER: 750})  # other: the gaps 1.5-2 and 8-9 of step 0
    assert sum(v["share_pct"] for v in b["phases"].values()) == pytest.approx(100)
    assert b["phases"]["forward"]["share_pct"] == pytest.approx(100 * 1500 / 6125)
    assert format_breakdown(b).startswith("step 6125.0 ms = data 1000.0 (16%) + h2d 250.0 (4%)")


def test_timed_iteration_counts_each_wait_and_drops_the_final_one():
    timer = scripted_timer(0, 2, 3, 3.5, 4, 4.5, 10, record_steps=True)
    seen = []
    for item in timer.timed(["a"], "data"):  # marks 0 and 2; then h2d 3-3.5
        seen.append(item)
        with timer.phase("h2d"):
            pass
        timer.end_step(0)
    (rec,) = timer.take_records()
    assert seen == ["a"] and rec.intervals == [("data", 0, 2), ("h2d", 3, 3.5)]
    # The wait that found the iterator exhausted (mark 4) is not part of any step.
    with timer.phase("forward"):  # 4.5-10
        pass
    assert timer.end_step(1) == 5.5


def test_closing_the_timed_iterator_closes_the_source():
    closed = []

    def source():
        try:
            yield from range(10)
        finally:
            closed.append(True)

    timer = PhaseTimer()
    for i in timer.timed(source()):
        timer.end_step(i)
        if i == 2:
            break
    assert closed == [True]


def test_real_clock_phases_fit_inside_the_step():
    timer = PhaseTimer(np, record_steps=True)
    a = np.ones((64, 64))
    for step in range(3):
        for name in PHASES:
            with timer.phase(name):
                a = a @ a / 64
        seconds = timer.end_step(step)
        (rec,) = timer.take_records()
        assert rec.seconds == seconds > 0
        assert 0 < sum(rec.phase_seconds) <= seconds
        assert all(s > 0 for s in rec.phase_seconds)
        assert [name for name, _, _ in rec.intervals] == list(PHASES)
        bounds = [t for _, start, stop in rec.intervals for t in (start, stop)]
        assert bounds == sorted(bounds)  # back to back, in order
    b = timer.breakdown()
    assert b["phases"][OTHER]["ms_per_step"] >= 0
    assert sum(v["ms_per_step"] for v in b["phases"].values()) == pytest.approx(b["step_ms"])
    assert timer.peak_device_bytes is None and isinstance(make_clock(np), HostClock)


def test_misuse_is_explained():
    timer = PhaseTimer()
    with pytest.raises(ValueError, match="unknown phase 'fwd'; phases are data, h2d"):
        timer.phase("fwd")
    with pytest.raises(RuntimeError, match="no phase was timed"):
        timer.end_step(0)
    timer.start("forward")
    with pytest.raises(RuntimeError, match="'backward' started while 'forward' is running"):
        timer.start("backward")
    with pytest.raises(RuntimeError, match="no phase was timed, or one is still running"):
        timer.end_step(0)
    with pytest.raises(RuntimeError, match="'backward' stopped but it is not running"):
        timer.stop("backward")


def test_without_record_steps_nothing_accumulates_per_step():
    timer = PhaseTimer()
    timer.add_buckets([BucketTiming(0, 8, 0.0, 1.0)])

    def steps(n: int) -> None:
        for step in range(n):
            for name in PHASES:
                with timer.phase(name):
                    pass
            timer.end_step(step)

    steps(10)  # warm up: the mark pool reaches its size
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    steps(2000)
    grown = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    assert grown < 1024, grown
    assert timer.take_records() == [] and timer.steps == 2010


# -- TensorBoard values and the trace ---------------------------------------------------------------
def phase_seconds(**values: float) -> tuple[float, ...]:
    return tuple(values.get(name, 0.0) for name in PHASES)


def test_timeline_scalars_per_rank_and_skew():
    rank0 = [(4, 0.010, phase_seconds(forward=0.004)), (5, 0.012, phase_seconds())]
    rank1 = [(4, 0.015, phase_seconds(comm=0.001)), (5, 0.011, phase_seconds())]
    rank2 = [(4, 0.013, phase_seconds()), (5, 0.020, phase_seconds())]
    values = timeline_scalars([rank0, rank1, rank2])
    assert sorted(values) == [4, 5]
    assert values[4]["timeline/skew_ms"] == pytest.approx(5.0) and values[4]["timeline/slowest_rank"] == 1
    assert values[5]["timeline/skew_ms"] == pytest.approx(9.0) and values[5]["timeline/slowest_rank"] == 2
    assert values[4]["timeline/rank0/forward_ms"] == pytest.approx(4.0)
    assert values[4]["timeline/rank1/comm_ms"] == pytest.approx(1.0)
    assert values[5]["timeline/rank2/step_ms"] == pytest.approx(20.0)
    assert len(values[4]) == 3 * (len(PHASES) + 1) + 2


def test_bus_bandwidth_is_the_nccl_tests_definition():
    assert bus_bandwidth(1000, 0.5, 2) == 2000  # 2 (n-1)/n = 1
    assert bus_bandwidth(1000, 0.5, 4) == pytest.approx(3000)  # 1.5
    assert bus_bandwidth(1000, 0.0, 4) == 0.0


def test_chrome_trace_holds_steps_phases_and_bucket_events(tmp_path):
    record = StepRecord(step=7, start=100.0, seconds=0.5, phase_seconds=phase_seconds(forward=0.2, backward=0.25),
                        intervals=[("forward", 100.0, 100.2), ("backward", 100.2, 100.45)],
                        buckets=[BucketTiming(0, 4_000_000, 100.3, 100.35), BucketTiming(1, 1_000_000, 100.4, 100.5)])
    path = tmp_path / "timeline-rank3.json"
    with ChromeTrace(path, rank=3, world_size=4) as trace:
        trace.write([record])
        trace.write([StepRecord(8, 101.0, 0.1, phase_seconds(), [("data", 101.0, 101.1)],
                                [BucketTiming(0, 4_000_000, 101.0, 101.1)])])
    events = json.loads(path.read_text())["traceEvents"]
    complete = [e for e in events if e["ph"] == "X"]
    assert all(e["pid"] == 3 for e in events)
    assert [(e["name"], e["tid"]) for e in complete[:3]] == [("step 7", 0), ("forward", 1), ("backward", 1)]
    assert complete[0]["ts"] == pytest.approx(100e6) and complete[0]["dur"] == pytest.approx(0.5e6)
    assert complete[2]["ts"] == pytest.approx(100.2e6) and complete[2]["dur"] == pytest.approx(0.25e6)
    buckets = [e for e in complete if e["cat"] == "allreduce"]
    assert [(e["tid"], e["args"]["step"]) for e in buckets] == [(100, 7), (101, 7), (100, 8)]
    first = buckets[0]
    assert first["name"] == "all-reduce bucket 0" and first["args"]["bytes"] == 4_000_000
    assert first["args"]["algbw_GBps"] == pytest.approx(4e6 / 0.05 / 1e9)
    assert first["args"]["busbw_GBps"] == pytest.approx(4e6 / 0.05 * 1.5 / 1e9)
    names = {(e.get("tid"), e["args"].get("name")) for e in events if e["name"] == "thread_name"}
    assert names == {(0, "steps"), (1, "phases"), (100, "all-reduce bucket 0"), (101, "all-reduce bucket 1")}
    assert {"name": "process_name", "ph": "M", "pid": 3, "args": {"name": "rank 3"}} in events


class StandInCupy:
    """Just the CuPy surface CudaEventClock uses: events stamped with a scripted device time
    (ms), elapsed time returned as float32 like cudaEventElapsedTime, a memory pool."""

    def __init__(self, *device_ms: float) -> None:
        stamps = iter(device_ms)
        self.pool_bytes = 0
        outer = self

        class Event:
            def record(self) -> None:
                self.ms = next(stamps)

            def synchronize(self) -> None:
                pass

        class Cuda:
            pass

        class Pool:
            def total_bytes(self) -> int:
                return outer.pool_bytes

        self.cuda = Cuda()
        self.cuda.Event = Event
        self.cuda.get_elapsed_time = lambda start, end: float(np.float32(end.ms - start.ms))
        self.get_default_memory_pool = lambda: Pool()


def test_event_clock_reads_durations_from_events_and_rebases_each_step():
    # Device times in ms. Step 1 comes 2 hours after step 0 (float32 ms that far from an
    # origin are 0.5 ms apart): its duration must still be exact to the microsecond.
    cp = StandInCupy(0, 1, 3, 3.25,  # origin, forward 1-3, origin after step 0
                     7.2e6, 7.2e6 + 0.5005, 7.2e6 + 1)  # backward, origin after step 1
    timer = PhaseTimer(cp, record_steps=True)
    assert isinstance(timer.clock, CudaEventClock) and timer.peak_device_bytes == 0
    cp.pool_bytes = 4096
    with timer.phase("forward"):
        pass
    assert timer.end_step(0) == pytest.approx(2e-3, abs=1e-9)
    cp.pool_bytes = 1024
    with timer.phase("backward"):
        pass
    assert timer.end_step(1) == pytest.approx(0.5005e-3, abs=1e-9)
    first, second = timer.take_records()
    assert second.intervals == [("backward", second.start, second.start + second.seconds)]
    # The stand-in's host clock barely moves: step 1 is placed by its device time since
    # the origin recorded after step 0, to float32 precision.
    assert second.start - first.start == pytest.approx((7.2e6 - 3.25 - 1) / 1e3, abs=1e-3)
    assert timer.peak_device_bytes == 4096 and timer.breakdown()["clock"] == "cuda_events"


@pytest.mark.skipif(not gpu_available(), reason="needs CuPy and a CUDA device")
def test_cuda_events_time_gpu_phases_and_track_the_memory_pool():
    cp = xp_for("gpu")
    timer = PhaseTimer(cp, record_steps=True)
    assert isinstance(timer.clock, CudaEventClock)
    a = cp.ones((1024, 1024), dtype=cp.float32)
    for step in range(2):
        with timer.phase("forward"):
            b = a @ a
        with timer.phase("backward"):
            b = b @ a
        timer.end_step(step)
    for rec in timer.take_records():
        assert 0 < sum(rec.phase_seconds) <= rec.seconds
        assert rec.phase_seconds[PHASES.index("forward")] > 0
    assert timer.peak_device_bytes >= 2 * a.nbytes
    assert timer.breakdown()["clock"] == "cuda_events"


# -- training runs ---------------------------------------------------------------------------------
def complete_events(path: Path) -> list[dict]:
    return [e for e in json.loads(path.read_text())["traceEvents"] if e["ph"] == "X"]


def scalars(run: Path) -> dict[str, list]:
    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: acc.Scalars(tag) for tag in acc.Tags()["scalars"]}


def test_training_with_timeline_writes_trace_scalars_and_summary(tmp_path):
    # 7 steps with log_interval 3: published at steps 3 and 6, the last one at the end.
    dtrain(tmp_path, *FAST, "trainer.max_steps=7", "logging.log_interval=3", "logging.timeline=true",
           "logging.images=false")
    (run,) = run_dirs(tmp_path)
    events = complete_events(run / "timeline-rank0.json")
    assert [e["name"] for e in events if e["tid"] == 0] == [f"step {s}" for s in range(7)]
    step0 = [e["name"] for e in events if e["tid"] == 1 and e["args"]["step"] == 0]
    assert step0 == ["data", "h2d", "forward", "backward", "comm", "optimizer"]

    summary = json.loads((run / "summary.json").read_text())
    b = summary["phase_breakdown"]
    assert b["steps"] == 7 and b["clock"] == "perf_counter" and set(b["phases"]) == {*PHASES, OTHER}
    assert sum(v["ms_per_step"] for v in b["phases"].values()) == pytest.approx(b["step_ms"])
    assert b["phases"]["forward"]["ms_per_step"] > 0 and b["phases"]["backward"]["ms_per_step"] > 0
    assert summary["forward_gflop_per_image"] == pytest.approx(563_280 / 1e9)  # lenet on 1x28x28
    assert summary["achieved_gflops_per_sec"] == pytest.approx(
        summary["images_per_sec"] * 3 * summary["forward_gflop_per_image"])
    assert summary["peak_host_rss_bytes"] > 2**20 and summary["peak_device_bytes"] is None

    values = scalars(run)
    assert [s.step for s in values["timeline/rank0/forward_ms"]] == list(range(7))
    assert all(s.value == 0 for s in values["timeline/skew_ms"])  # one rank
    ms = {name: values[f"timeline/rank0/{name}_ms"][0].value for name in PHASES}
    assert sum(ms.values()) <= values["timeline/rank0/step_ms"][0].value


def test_timeline_off_still_summarizes_phases_but_writes_no_trace(tmp_path):
    dtrain(tmp_path, *FAST, "trainer.max_steps=2", "logging.images=false")
    (run,) = run_dirs(tmp_path)
    assert not list(run.glob("timeline-rank*.json"))
    summary = json.loads((run / "summary.json").read_text())
    assert summary["phase_breakdown"]["steps"] == 2
    assert not [tag for tag in scalars(run) if tag.startswith("timeline/")]


def test_two_ranks_write_one_trace_each_with_bucket_events_and_rank_0_logs_the_skew(tmp_path):
    run = tmp_path / "run"
    result = run_dtrain(2, "model=lenet", "data=mnist_sample", "data.train_size=192", "data.test_size=64",
                        "trainer.batch_size=48", "trainer.max_steps=4", "trainer.progress=false", "device=cpu",
                        "logging.timeline=true", "logging.log_interval=2", "logging.images=false",
                        "parallel.bucket_mb=0.05", f"hydra.run.dir={run}", cwd=tmp_path)
    assert result.returncode == 0, result.output
    for rank in (0, 1):
        events = complete_events(run / f"timeline-rank{rank}.json")
        assert {e["pid"] for e in events} == {rank}
        assert len([e for e in events if e["cat"] == "step"]) == 4
        buckets = [e for e in events if e["cat"] == "allreduce"]
        assert len({e["tid"] for e in buckets}) >= 2  # lenet's 174 KB in 0.05 MiB buckets
        assert len(buckets) == 4 * len({e["tid"] for e in buckets})
        for e in buckets:
            assert e["args"]["busbw_GBps"] == pytest.approx(e["args"]["bytes"] / (e["dur"] / 1e6) / 1e9)  # 2(n-1)/n = 1
    values = scalars(run)
    assert [s.step for s in values["timeline/skew_ms"]] == [0, 1, 2, 3]
    assert {s.value for s in values["timeline/slowest_rank"]} <= {0.0, 1.0}
    for s in range(4):
        step_ms = [values[f"timeline/rank{r}/step_ms"][s].value for r in (0, 1)]
        assert values["timeline/skew_ms"][s].value == pytest.approx(abs(step_ms[0] - step_ms[1]), abs=1e-3)  # float32 events
    assert json.loads((run / "summary.json").read_text())["phase_breakdown"]["phases"]["comm"]["ms_per_step"] > 0
