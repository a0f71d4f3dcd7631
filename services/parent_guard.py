"""Exec a command that dies with its parent: ``python -m services.parent_guard PID cmd args...``.

The local launcher starts every child through this guard instead of a ``preexec_fn``: a
``preexec_fn`` forces a real ``fork()`` of the launcher, and in a process that uses gRPC the
fork handlers can abort the child before it execs. Here the guard (a fresh interpreter,
started with posix_spawn) sets ``PR_SET_PDEATHSIG`` — kept across ``execve`` — checks the
parent is still ``PID`` (it may have died in between), and execs the real command.
"""
from __future__ import annotations

import os
import sys

from engine.runtime.lifetime import die_with_parent


def main(argv: list[str]) -> int:
    if len(argv) < 2 or not argv[0].isdigit():
        print("usage: python -m services.parent_guard PARENT_PID COMMAND [ARGS...]", file=sys.stderr)
        return 2
    parent = int(argv[0])
    die_with_parent()
    if os.getppid() != parent:
        return 1  # the launcher is already gone
    os.execvp(argv[1], argv[1:])
    return 127


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
