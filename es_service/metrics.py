"""metrics.jsonl: one JSON line per generation, appended and flushed as each generation ends.

A crash (or a full disk) in the middle of an append leaves a torn last line; readers drop it, as a
database drops a torn log record, and the resume that follows recomputes that generation. A damaged
line anywhere else is not a crash's doing and is refused.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from es_service import rundir


class MetricsError(RuntimeError):
    """A damaged line before the last one: the message names the file, the line and the fix."""


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _parse(line: str) -> dict | None:
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) and isinstance(record.get("generation"), int) else None


class MetricsLog:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    def truncate_after(self, generation: int) -> None:
        """Drop lines past a checkpoint's generation (and a torn last line): a resume recomputes them identically."""
        if not self.path.exists():
            return
        kept = [record for record in read(self.path) if record["generation"] <= generation]
        rundir.atomic_write(self.path, "".join(json.dumps(record) + "\n" for record in kept).encode())

    def append(self, record: dict[str, Any]) -> None:
        line = json.dumps({key: _clean(value) for key, value in record.items()}) + "\n"
        try:
            with open(self.path, "a") as handle:
                handle.write(line)
        except OSError as err:
            raise rundir.disk_full(self.path, err) or err from None


def read(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.exists():
        return []
    lines = [
        (number, line) for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1) if line.strip()
    ]
    records = []
    for index, (number, line) in enumerate(lines):
        record = _parse(line)
        if record is None and index == len(lines) - 1:
            break  # torn by a crash mid-append
        if record is None:
            raise MetricsError(
                f"{path}: line {number} is damaged ({line[:60]!r}); only a last line can be torn "
                f"by a crash: delete line {number} (and the lines after it, which a resume "
                "recomputes), or restore the file"
            )
        records.append(record)
    return records
