"""The overhead section's arithmetic over Ray timeline events (no Ray needed)."""

from __future__ import annotations

import pytest

from rayd.commands.bench.overhead import (
    Call,
    startup_breakdown,
    step_breakdown,
    timeline_calls,
    union_seconds,
)


def test_union_counts_overlaps_once_and_clips_to_the_window() -> None:
    assert union_seconds([(0, 2), (1, 3), (5, 6)], 0, 10) == pytest.approx(4)
    assert union_seconds([(0, 2), (1, 3), (5, 6)], 1.5, 5.5) == pytest.approx(2)
    assert union_seconds([(7, 8)], 0, 5) == 0
    assert union_seconds([], 0, 5) == 0


def _event(cat: str, tid: str, ts_s: float, dur_s: float) -> dict:
    return {"cat": cat, "tid": tid, "ph": "X", "ts": ts_s * 1e6, "dur": dur_s * 1e6}


def test_calls_take_the_name_of_the_outer_event_and_the_interval_of_its_execute() -> None:
    events = [
        _event("task::RolloutWorker.generate", "w1", 10.0, 1.0),
        _event("task:deserialize_arguments", "w1", 10.0, 0.3),
        _event("task:execute", "w1", 10.3, 0.6),
        _event("task::LearnerWorker.train_step", "w2", 10.5, 0.5),
        _event("task:execute", "w2", 10.6, 0.2),
        _event("submit_task", "driver", 9.9, 0.01),
    ]
    calls = timeline_calls(events)
    assert [(c.cls, c.method, c.role) for c in calls] == [
        ("RolloutWorker", "generate", "rollout"),
        ("LearnerWorker", "train_step", "learner"),
    ]
    assert (calls[0].start, calls[0].end) == pytest.approx((10.3, 10.9))
    assert (calls[1].start, calls[1].end) == pytest.approx((10.6, 10.8))


def test_a_step_splits_into_role_busy_time_and_idle_time() -> None:
    calls = [
        Call("RolloutWorker", "generate", 100.0, 100.4),
        Call("TeacherWorker", "score", 100.5, 100.7),
        Call("LearnerWorker", "train_step", 100.8, 100.9),
        Call("LearnerWorker", "train_step", 100.8, 100.95),  # the other rank, at once
        Call("RolloutWorker", "generate", 99.0, 99.5),  # the step before: outside the window
    ]
    record = {"time": 101.0, "completion_tokens": 100, "tokens_per_s": 100.0, "time/rollout": 0.45}
    out = step_breakdown(calls, [record])
    assert out["step"] == pytest.approx(1.0)
    assert out["busy.rollout"] == pytest.approx(0.4)
    assert out["busy.teacher"] == pytest.approx(0.2)
    assert out["busy.learner"] == pytest.approx(0.15)
    assert out["busy.any"] == pytest.approx(0.75)
    assert out["idle"] == pytest.approx(0.25)
    assert out["idle_share"] == pytest.approx(0.25)
    assert out["calls.LearnerWorker.train_step"] == 2
    assert out["exec.LearnerWorker.train_step"] == pytest.approx(0.25)
    assert out["stage.rollout"] == pytest.approx(0.45)


def test_startup_is_counted_from_the_train_call() -> None:
    calls = [
        Call("RolloutWorker", "__init__", 12.0, 20.0),
        Call("RolloutWorker", "ready", 20.0, 25.0),
        Call("LearnerWorker", "__init__", 13.0, 15.0),
        Call("LearnerWorker", "__init__", 14.0, 18.0),
    ]
    first = {"time": 40.0, "completion_tokens": 10, "tokens_per_s": 10.0}
    out = startup_breakdown(calls, first, train_called=10.0)
    assert out["rollout.first_init_begins"] == pytest.approx(2.0)
    assert out["rollout.init_seconds"] == pytest.approx(8.0)
    assert out["rollout.ready"] == pytest.approx(15.0)
    assert out["learner.actors"] == 2
    assert out["learner.init_seconds"] == pytest.approx(4.0)
    assert "teacher.actors" not in out
    assert out["first_step_begins"] == pytest.approx(29.0)
