"""What a run prints: chimera_ray's own messages go through ``logging`` (a module logger each);
entry points (the CLI, ``jobs/``, Ray workers) call ``setup_logging`` once to show them.
``captured_output`` sends everything else a run's processes print (Ray, its workers, libraries)
to a log file, leaving the terminal to the run's own display.

A leaf module: it imports nothing from chimera_ray.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from typing import IO

__all__ = ["setup_logging", "captured_output"]


def setup_logging(level: int = logging.INFO) -> None:
    """Shows chimera_ray's messages (plain text, stderr) at ``level``; other libraries' loggers are
    left as they are. Idempotent: a second call changes only the level."""
    root = logging.getLogger("chimera_ray")
    root.setLevel(level)
    if not any(getattr(h, "_chimera_ray", False) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler._chimera_ray = True
        root.addHandler(handler)
    root.propagate = False


@contextlib.contextmanager
def captured_output(log_path: str) -> Iterator[IO[str]]:
    """Sends this process's stdout and stderr, at the file-descriptor level, to ``log_path``
    (appended); yields a text stream on the original stdout for the run's own display.

    File descriptors, not ``sys.stdout``: Ray's log monitor (worker output), its C++ core, the
    processes ``ray.init`` starts and libraries' warnings all write to fds 1 and 2, and each
    of them would otherwise reach the terminal. chimera_ray's log messages follow stderr into
    the file. Restores both on exit. Where stdout has no file descriptor (an embedding
    application), yields ``sys.stdout`` and captures nothing.
    """
    try:
        fds = (sys.stdout.fileno(), sys.stderr.fileno())
    except (AttributeError, OSError, ValueError):
        yield sys.stdout
        return
    os.makedirs(os.path.dirname(os.path.abspath(log_path)), exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(fd) for fd in fds]
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    user = os.fdopen(os.dup(saved[0]), "w", buffering=1, encoding="utf-8", errors="replace")
    try:
        for fd in fds:
            os.dup2(log_fd, fd)
        yield user
    finally:
        user.flush()
        sys.stdout.flush()
        sys.stderr.flush()
        for fd, old in zip(fds, saved):
            os.dup2(old, fd)
            os.close(old)
        os.close(log_fd)
        user.close()
