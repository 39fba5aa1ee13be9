"""The run's progress model and its two views (live, plain lines), fed the events workers send."""

import io
import math
import sys

import pytest

from chimera_ray.progress import Display, RunProgress, format_bytes, format_seconds


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def _train_events(n_classes=10, steps=100, step_every=5):
    yield {"kind": "train_start", "total": n_classes + 2, "committed": 2, "steps": steps}
    for c in range(n_classes):
        for s in range(step_every, steps + 1, step_every):
            yield {"kind": "class_step", "class": f"c{c}", "step": s, "loss": 1.0 / s}
        if c == 3:
            yield {"kind": "class_failed", "class": f"c{c}", "error": "boom"}
        else:
            yield {"kind": "class_done", "class": f"c{c}", "loss": 0.01}
    yield {"kind": "train_end"}


def test_training_counts_losses_and_eta():
    clock = Clock()
    p = RunProgress(clock)
    p.apply({"kind": "train_start", "total": 4, "committed": 1, "steps": 10})
    clock.t = 10  # start-up (worker group, model load) takes 10 s: it says nothing about the rate
    p.apply({"kind": "class_done", "class": "a", "loss": 0.5})
    assert "ETA -" in p.line()
    clock.t = 20
    p.apply({"kind": "class_step", "class": "b", "step": 5, "loss": 0.25})
    # 1.5 of the 3 classes to train are done; 1/6 of the work took the last 10 s: 30 s left.
    assert p.fraction() == pytest.approx(0.5)
    line = p.line()
    assert "2/4 classes" in line and "1 already committed" in line and "1 trained" in line
    assert "0 failed" in line and "1 running" in line and "loss 0.2500" in line and "ETA 30s" in line
    p.apply({"kind": "class_failed", "class": "b", "error": "x"})
    p.apply({"kind": "class_step", "class": "b", "step": 6, "loss": 0.1})  # late step of a failed class: ignored
    p.apply({"kind": "class_done", "class": "c", "loss": 0.1})
    clock.t = 25
    p.apply({"kind": "train_end"})
    assert "4/4 classes" in p.line() and "1 failed" in p.line() and "done in 25s" in p.line()


def test_generation_images_shards_rate_and_retried_units():
    clock = Clock()
    p = RunProgress(clock)
    p.apply({"kind": "generate_start", "images": 100, "units": 2, "images_committed": 40, "shards_committed": 1,
             "bytes_committed": 4000, "units_committed": 1})
    clock.t = 10
    p.apply({"kind": "images", "unit": 1, "n": 16, "of": 60})
    p.apply({"kind": "images", "unit": 1, "n": 16, "of": 60})
    assert p.counts() == (72.0, 100)
    for _ in range(5):  # a retried unit renders again: never more than its size
        p.apply({"kind": "images", "unit": 1, "n": 16, "of": 60})
    assert p.counts() == (100.0, 100)
    p.apply({"kind": "unit_done", "unit": 1, "samples": 60, "shards": 2, "bytes": 6000})
    p.apply({"kind": "generate_end"})
    line = p.line()
    assert "100/100 images" in line and "6.0 images/s" in line and "3 shards committed (10.0 KB)" in line
    with pytest.raises(ValueError, match="unknown progress event"):
        p.apply({"kind": "nope"})


def test_plain_lines_are_few_and_never_repeated():
    clock = Clock()
    out = io.StringIO()
    d = Display(out, live=False, clock=clock)
    for e in _train_events():
        clock.t += 0.2
        d.event(e)
    lines = out.getvalue().splitlines()
    # ~1000 events: a line at the start, one per 10 % of the phase, one at the end.
    assert 3 <= len(lines) <= 13, lines
    assert len(set(lines)) == len(lines)
    assert lines[-1].startswith("train     12/12 classes") and "1 failed" in lines[-1] and "done in" in lines[-1]


def test_plain_lines_also_come_with_time_on_a_slow_phase():
    clock = Clock()
    out = io.StringIO()
    d = Display(out, live=False, clock=clock)
    d.event({"kind": "generate_start", "images": 10_000, "units": 10})
    for i in range(100):  # 1 % per 10 minutes: a line every 30 s of progress, not one per event
        clock.t += 6
        d.event({"kind": "images", "unit": 0, "n": 1, "of": 10_000})
    lines = out.getvalue().splitlines()
    assert 15 <= len(lines) <= 25, lines


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_live_view_leaves_one_line_per_phase(monkeypatch):
    out, elsewhere = Terminal(), io.StringIO()
    monkeypatch.setattr(sys, "stdout", elsewhere)  # under a job: the run's log file
    monkeypatch.setenv("COLUMNS", "200")
    d = Display(out)  # a terminal: the live view
    d.print("plan: 2 classes")
    for e in _train_events(2, 10, 5):
        d.event(e)
        print("(RayTrainWorker pid=1) a worker's log line")  # Ray's log monitor writes to sys.stdout
    d.event({"kind": "generate_start", "images": 4, "units": 1})
    d.event({"kind": "unit_done", "unit": 0, "samples": 4, "shards": 1, "bytes": 10})
    d.event({"kind": "generate_end"})
    d.close()
    text = out.getvalue()
    assert "plan: 2 classes" in text and "\x1b[" in text  # drawn live (cursor moves)
    # Each phase's live frames are erased when it ends (transient); its final line stays.
    lines = [x.strip() for x in text.replace("\x1b[2K", "\n").splitlines()]
    assert "train     4/4 classes | 2 already committed, 2 trained, 0 failed, 0 running | loss 0.0100 | done in 0s" in lines
    assert lines[-1].startswith("generate  4/4 images") and lines[-1].endswith("done in 0s")
    assert "RayTrainWorker" not in text and "RayTrainWorker" in elsewhere.getvalue()


def test_formats():
    assert format_seconds(5) == "5s" and format_seconds(65) == "1m05s" and format_seconds(3700) == "1h01m"
    assert format_seconds(None) == "-" and format_seconds(math.nan) == "-"
    assert format_bytes(999) == "999 B" and format_bytes(1_500_000) == "1.5 MB"
