"""Process lifetime ties, torch-free so a launcher guard can import it cheaply.

Callers: ``engine.runtime.spawn`` (every rank process it starts) and ``services.parent_guard``
(every child of the local stack)."""
from __future__ import annotations

import ctypes
import signal

PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """Ask the kernel to SIGTERM this process when its parent dies (kept across ``execve``;
    Linux only, a no-op elsewhere)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass
