"""What a run prints: chimera_ray's own messages go through ``logging`` (a module logger each);
entry points (the CLI, ``jobs/``, Ray workers) call ``setup_logging`` once to show them.

A leaf module: it imports nothing from chimera_ray.
"""

from __future__ import annotations

import logging
import sys

__all__ = ["setup_logging"]


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
