"""Golden-parity errors gathered while the tests compare, printed at the end of the run.

Each golden comparison calls `record(file, quantity, actual, expected)`; `tests/conftest.py`
moves the records onto the test's report (so they cross pytest-xdist workers) and prints the
worst max|actual - expected| / max|expected| per golden file in the terminal summary.
"""

from __future__ import annotations

import numpy as np

_RECORDS: list[tuple[str, str, float]] = []


def relative_error(actual, expected) -> float:
    """max|actual - expected| / max|expected| (the absolute max difference if expected is 0)."""
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    diff = float(np.max(np.abs(actual - expected))) if expected.size else 0.0
    scale = float(np.max(np.abs(expected))) if expected.size else 0.0
    return diff / scale if scale > 0 else diff


def record(golden_file: str, quantity: str, actual, expected) -> float:
    """Records one comparison against `<golden_file>.npz`; returns its relative error."""
    error = relative_error(actual, expected)
    _RECORDS.append((golden_file, quantity, error))
    return error


def take() -> list[tuple[str, str, float]]:
    """The records since the last call (and forgets them)."""
    records = list(_RECORDS)
    _RECORDS.clear()
    return records


def summary_lines(records) -> list[str]:
    """One line per golden file: its worst quantity and error, and how many were compared."""
    worst: dict[str, tuple[str, float, int]] = {}
    for golden_file, quantity, error in records:
        name, value, count = worst.get(golden_file, ("", -1.0, 0))
        if error > value:
            name, value = quantity, error
        worst[golden_file] = (name, value, count + 1)
    lines = [f"{'golden file':<34}{'compared':>9}  worst max|d|/max|ref|  (quantity)"]
    for golden_file in sorted(worst):
        name, value, count = worst[golden_file]
        lines.append(f"{golden_file:<34}{count:>9}  {value:>10.2e}             ({name})")
    return lines
