"""Where a run is: one progress model for training and generation, fed by events, shown by a view.

Events are plain dicts (they cross process boundaries: Ray workers send them to the driver):

* ``{"kind": "train_start", "total": N, "committed": C, "steps": S}``: N planned classes, C of
  them already committed by an earlier attempt, S steps per class;
* ``{"kind": "class_step", "class": key, "step": s, "loss": l}`` (throttled by the sender),
  ``{"kind": "class_done", "class": key, "loss": l}``, ``{"kind": "class_failed", "class": key,
  "error": e}``, ``{"kind": "train_end"}``;
* ``{"kind": "generate_start", "images": N, "units": U, "images_committed": n, "shards_committed":
  k, "bytes_committed": b}``; ``{"kind": "images", "unit": u, "n": k, "of": count}`` (rendered by
  an actor, before the unit commits); ``{"kind": "unit_done", "unit": u, "samples": n, "shards":
  k, "bytes": b}``; ``{"kind": "generate_end"}``.

``Display`` shows the model: a compact live view per phase (rich) on a terminal, plain lines
(at most one per 10 % of a phase or per ``LINE_EVERY_S``) otherwise. A leaf: imports nothing
from chimera_ray.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import IO

from rich.console import Console
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

__all__ = ["RunProgress", "Display", "format_seconds", "format_bytes"]

# A plain-line view prints at most one line per this many seconds (plus one per 10 % of a phase).
LINE_EVERY_S = 30.0


def format_seconds(s: float | None) -> str:
    if s is None or s != s or s < 0:
        return "-"
    s = int(round(s))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def format_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


@dataclass
class _Train:
    total: int = 0
    steps: int = 1
    committed: int = 0
    done: dict[str, float] = field(default_factory=dict)  # key -> final loss
    failed: dict[str, str] = field(default_factory=dict)  # key -> error
    running: dict[str, tuple[int, float]] = field(default_factory=dict)  # key -> (step, loss)
    started: float = 0.0
    ended: float | None = None
    first: tuple[float, float] | None = None  # (time, fraction) of the first progress seen

    def fraction_new(self) -> float:
        """Share of this attempt's work (classes not committed before it) that is done."""
        todo = self.total - self.committed
        if todo <= 0:
            return 1.0
        partial = sum(min(s, self.steps) / self.steps for s, _ in self.running.values())
        return min(1.0, (len(self.done) + len(self.failed) + partial) / todo)


@dataclass
class _Generate:
    images: int = 0
    units: int = 0
    committed_images: int = 0  # in units committed before this attempt or during it
    shards: int = 0
    bytes: int = 0
    units_done: int = 0
    at_start: int = 0  # images already committed when this attempt started
    rendered: dict[int, int] = field(default_factory=dict)  # unit -> images rendered, not yet committed
    started: float = 0.0
    ended: float | None = None
    first: tuple[float, float] | None = None

    def images_done(self) -> int:
        return min(self.images, self.committed_images + sum(self.rendered.values()))

    def fraction_new(self) -> float:
        todo = self.images - self.at_start
        return 1.0 if todo <= 0 else min(1.0, (self.images_done() - self.at_start) / todo)


def _eta(first: tuple[float, float] | None, fraction: float, now: float) -> float | None:
    """Seconds left at the rate since the phase's first progress ``(time, fraction)``: a phase's
    start-up (Ray Train's worker group, an actor's model load) says nothing about its rate."""
    if first is None or fraction <= first[1] or now <= first[0]:
        return None
    return (now - first[0]) * (1 - fraction) / (fraction - first[1])


class RunProgress:
    """The run's progress, updated by events from any thread (``apply``), read as text (``line``)."""

    def __init__(self, clock=time.monotonic):
        self.clock = clock
        self.phase: str | None = None
        # Phases started and not ended: training and generation overlap (a window generates as
        # soon as its classes are trained), so both can be in progress at once.
        self.active: set[str] = set()
        self.train = _Train()
        self.generate = _Generate()
        self._lock = threading.Lock()

    def apply(self, e: dict) -> None:
        with self._lock:
            self._apply(e)
            phase = self.train if self.phase == "train" else self.generate if self.phase == "generate" else None
            if phase is not None and phase.first is None and phase.fraction_new() > 0:
                phase.first = (self.clock(), phase.fraction_new())

    def _apply(self, e: dict) -> None:
        kind, now, t, g = e["kind"], self.clock(), self.train, self.generate
        if kind.endswith("_start"):
            self.active.add(kind[:-6])
        elif kind.endswith("_end"):
            self.active.discard(kind[:-4])
        if kind == "train_start":
            self.phase = "train"
            self.train = _Train(total=int(e["total"]), steps=max(1, int(e.get("steps", 1))),
                                committed=int(e.get("committed", 0)), started=now)
        elif kind == "class_step":
            if e["class"] not in t.done and e["class"] not in t.failed:
                t.running[e["class"]] = (int(e["step"]), float(e["loss"]))
        elif kind == "class_done":
            t.running.pop(e["class"], None)
            t.done[e["class"]] = float(e.get("loss", float("nan")))
        elif kind == "class_failed":
            t.running.pop(e["class"], None)
            t.failed[e["class"]] = str(e.get("error", ""))
        elif kind == "train_end":
            t.running.clear()
            t.ended = now
        elif kind == "generate_start":
            self.phase = "generate"
            self.generate = _Generate(images=int(e["images"]), units=int(e["units"]),
                                      committed_images=int(e.get("images_committed", 0)),
                                      shards=int(e.get("shards_committed", 0)), bytes=int(e.get("bytes_committed", 0)),
                                      units_done=int(e.get("units_committed", 0)),
                                      at_start=int(e.get("images_committed", 0)), started=now)
        elif kind == "images":
            u = int(e["unit"])
            # A retried unit renders its images again: count at most the unit's size.
            g.rendered[u] = min(int(e.get("of", 1 << 62)), g.rendered.get(u, 0) + int(e["n"]))
        elif kind == "unit_done":
            g.rendered.pop(int(e["unit"]), None)
            g.committed_images += int(e["samples"])
            g.shards += int(e["shards"])
            g.bytes += int(e["bytes"])
            g.units_done += 1
        elif kind == "generate_end":
            g.rendered.clear()
            g.ended = now
        else:
            raise ValueError(f"unknown progress event kind {kind!r}")

    def fraction(self) -> float:
        with self._lock:
            if self.phase == "train":
                return self.train.fraction_new()
            if self.phase == "generate":
                return self.generate.fraction_new()
            return 0.0

    def counts(self) -> tuple[float, int]:
        """(completed, total) of the current phase: classes, or images."""
        with self._lock:
            if self.phase == "train":
                t = self.train
                return t.total * 1.0 - (t.total - t.committed) * (1 - t.fraction_new()), t.total
            if self.phase == "generate":
                return float(self.generate.images_done()), self.generate.images
            return 0.0, 0

    def line(self, phase: str | None = None) -> str:
        """One line on ``phase`` (default: the current one; a line each while training and
        generation overlap), e.g. ``train 3/10 classes: 2 done, 0 failed, ...``."""
        with self._lock:
            if phase is None and self.active == {"train", "generate"}:
                return self._line("train") + "\n" + self._line("generate")
            return self._line(phase or self.phase)

    def _line(self, phase: str | None) -> str:
        now = self.clock()
        if phase == "train":
            t = self.train
            finished = t.committed + len(t.done) + len(t.failed)
            parts = [f"train     {finished}/{t.total} classes"]
            detail = [f"{len(t.done)} trained", f"{len(t.failed)} failed", f"{len(t.running)} running"]
            if t.committed:
                detail.insert(0, f"{t.committed} already committed")
            parts.append(", ".join(detail))
            losses = [loss for _, loss in t.running.values()] or list(t.done.values())[-3:]
            losses = [x for x in losses if x == x]
            if losses:
                parts.append(f"loss {sum(losses) / len(losses):.4f}")
            parts.append(self._times(t, now))
            return " | ".join(parts)
        if phase == "generate":
            g = self.generate
            elapsed = (g.ended or now) - g.started
            rate = (g.images_done() - g.at_start) / elapsed if elapsed > 0 else 0.0
            parts = [f"generate  {g.images_done()}/{g.images} images", f"{rate:.1f} images/s",
                     f"{g.shards} shard{'' if g.shards == 1 else 's'} committed ({format_bytes(g.bytes)})",
                     self._times(g, now)]
            return " | ".join(parts)
        return ""

    @staticmethod
    def _times(phase: _Train | _Generate, now: float) -> str:
        elapsed = (phase.ended or now) - phase.started
        if phase.ended is not None:
            return f"done in {format_seconds(elapsed)}"
        return f"{format_seconds(elapsed)} elapsed, ETA {format_seconds(_eta(phase.first, phase.fraction_new(), now))}"


class Display:
    """The run's console: messages (``print``), progress events (``event``), one view per phase.

    Args:
        out: where the person reading sees it (a terminal, a CI log, ``ray job logs``).
        live: a live rich view (True), plain lines (False), or None: live when ``out`` is a terminal.
        clock: seconds (tests pass a fake one).
    """

    def __init__(self, out: IO[str], live: bool | None = None, clock=time.monotonic):
        self.out = out
        self.live = out.isatty() if live is None else live
        self.progress = RunProgress(clock)
        self.clock = clock
        self._console = None
        self._live = None
        self._last_line = ""
        self._last_by_phase: dict[str, str] = {}
        self._last_time = 0.0
        self._last_fraction = 0.0
        self._lock = threading.RLock()
        if self.live:
            self._console = Console(file=out, highlight=False)

    def print(self, text: str = "") -> None:
        with self._lock:
            if self._console is not None:
                self._console.print(text, markup=False, highlight=False, soft_wrap=True)
            else:
                self.out.write(text + "\n")
                self.out.flush()

    def event(self, e: dict) -> None:
        """Applies one progress event and updates the view (any thread)."""
        self.progress.apply(e)
        kind = e["kind"]
        with self._lock:
            if kind in ("train_start", "generate_start"):
                self._start_phase()
            elif kind in ("train_end", "generate_end"):
                self._end_phase(kind[:-4])
            elif not self.live:
                self._maybe_line()

    def close(self) -> None:
        with self._lock:
            if self._live is not None:
                self._live.stop()
                self._live = None

    def _start_phase(self) -> None:
        self.close()
        self._last_fraction, self._last_time = 0.0, self.clock()
        if self.live:
            # No stdout/stderr redirection: whatever else this process prints (under a job: Ray's
            # worker logs, which go to the run's log file) must not reach the terminal through rich.
            self._live = Live(get_renderable=self._renderable, console=self._console, refresh_per_second=4,
                              transient=True, redirect_stdout=False, redirect_stderr=False)
            self._live.start()
        else:
            self._emit(self.progress.line())

    def _end_phase(self, phase: str) -> None:
        self.close()
        self._emit(self.progress.line(phase))  # the phase's final state stays on screen
        if self.progress.active:  # the other phase goes on (training and generation overlap)
            self._start_phase()

    def _renderable(self):
        done, total = self.progress.counts()
        grid = Table.grid(padding=(0, 1))
        grid.add_row(ProgressBar(total=max(total, 1), completed=done, width=30), Text(self.progress.line()))
        return grid

    def _maybe_line(self) -> None:
        f, now = self.progress.fraction(), self.clock()
        if f >= 1.0:
            return  # the phase's end line says it
        if f - self._last_fraction >= 0.1 or (now - self._last_time >= LINE_EVERY_S and f > self._last_fraction):
            self._emit(self.progress.line())

    def _emit(self, line: str) -> None:
        # One line per phase while training and generation overlap: print only those that changed.
        new = [x for x in line.splitlines() if x and self._last_by_phase.get(x.split()[0]) != x]
        if not new:
            return
        self._last_by_phase.update((x.split()[0], x) for x in new)
        self._last_line, self._last_time, self._last_fraction = line, self.clock(), self.progress.fraction()
        self.print("\n".join(new))
