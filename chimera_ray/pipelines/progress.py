"""Progress events from Ray workers to the driver: a small actor collects them, a driver thread
drains it into a callback (``chimera_ray.progress`` describes the events).

Works the same on a laptop and under ``ray job submit``: workers hold the actor's handle, the
driver polls it. Losing progress never fails a run: a sink that dies only stops the updates.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

__all__ = ["progress_feed", "Reporter"]

log = logging.getLogger(__name__)

# The driver drains the sink this often; workers send step events at most this often.
POLL_S = 0.5
STEP_EVERY_S = 1.0


@ray.remote(num_cpus=0, max_restarts=0)
class _Sink:
    def __init__(self):
        self.events: list[dict] = []

    def put(self, events: list[dict]) -> None:
        self.events.extend(events)

    def drain(self) -> list[dict]:
        out, self.events = self.events, []
        return out


@contextlib.contextmanager
def progress_feed(on_event: Callable[[dict], None] | None) -> Iterator[object | None]:
    """Yields a sink handle for workers (None when ``on_event`` is None); a driver thread calls
    ``on_event`` with every event the workers put, in order, until the block ends."""
    if on_event is None:
        yield None
        return
    # On the driver's node: a worker node may be lost (a spot preemption), the driver's may not.
    here = ray.get_runtime_context().get_node_id()
    sink = _Sink.options(scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=False)).remote()
    stop = threading.Event()

    def drain() -> None:
        for e in ray.get(sink.drain.remote()):
            on_event(e)

    def poll() -> None:
        while not stop.wait(POLL_S):
            try:
                drain()
            except Exception as e:  # noqa: BLE001 - progress is best effort; the run goes on
                log.warning("progress updates stopped: %s: %s", type(e).__name__, e)
                return

    thread = threading.Thread(target=poll, name="chimera-progress", daemon=True)
    thread.start()
    try:
        yield sink
    finally:
        stop.set()
        thread.join()
        with contextlib.suppress(Exception):
            drain()
        with contextlib.suppress(Exception):
            ray.kill(sink)


class Reporter:
    """Sends events from a worker to the sink (fire and forget); ``step`` events are throttled.

    Args:
        sink: the handle ``progress_feed`` yielded, or None (then nothing is sent).
    """

    def __init__(self, sink):
        self.sink = sink
        self._last = 0.0

    def send(self, event: dict) -> None:
        if self.sink is not None:
            self.sink.put.remote([event])

    def step(self, event: dict) -> None:
        now = time.monotonic()
        if now - self._last >= STEP_EVERY_S:
            self._last = now
            self.send(event)
