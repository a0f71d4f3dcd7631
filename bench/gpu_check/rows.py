"""Result rows of the GPU check: how its worker scripts report, and the one table it prints.

Each worker (``parity.py``, ``handoff.py``, ``decode.py``) calls :func:`emit` once per check;
``run.py`` reads those lines back from the worker's output with :func:`parse` (anything else the
worker prints is log), adds rows of its own, and prints :func:`table` at the end.
"""
from __future__ import annotations

import contextlib
import json
import traceback
from dataclasses import asdict, dataclass

PREFIX = "GPU_CHECK_ROW "
RESULTS = ("pass", "fail", "skip")


@dataclass(frozen=True)
class Row:
    """One line of the summary: ``result`` is pass, fail or skip; ``figure`` says what was
    measured or why it was skipped."""

    name: str
    result: str
    figure: str = ""

    def __post_init__(self) -> None:
        if self.result not in RESULTS:
            raise ValueError(f"result must be one of {RESULTS}, got {self.result!r}")


def emit(name: str, result: str, figure: str = "") -> None:
    """Print one row for ``run.py`` (flushed, so a worker killed later still reported it)."""
    print(PREFIX + json.dumps(asdict(Row(name, result, figure))), flush=True)


@contextlib.contextmanager
def guard(name: str):
    """Turn an exception inside the block into a FAIL row named ``name`` (traceback printed),
    so one broken check does not hide the ones after it."""
    try:
        yield
    except Exception as exc:  # noqa: BLE001  (reported as a row, never swallowed silently)
        traceback.print_exc()
        emit(name, "fail", f"{type(exc).__name__}: {exc}"[:300])


def parse(output: str) -> list[Row]:
    """The rows a worker emitted, in order."""
    return [Row(**json.loads(line[len(PREFIX):])) for line in output.splitlines()
            if line.startswith(PREFIX)]


def table(rows: list[Row]) -> str:
    """A Markdown table: check | result | figure."""
    lines = ["| check | result | figure |", "|---|---|---|"]
    for r in rows:
        figure = r.figure.replace("|", "/").replace("\n", " ")
        lines.append(f"| {r.name} | {r.result.upper() if r.result == 'fail' else r.result} | {figure} |")
    return "\n".join(lines)
