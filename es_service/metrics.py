"""metrics.jsonl: one JSON line per generation, appended and flushed as each generation ends.

A crash (or a full disk) in the middle of an append leaves a torn last line; readers drop it, as a
database drops a torn log record, and the resume that follows recomputes that generation. A damaged
line anywhere else is not a crash's doing and is refused.

Every numeric field also goes to TensorBoard event files in the same directory (the format Ray Tune
writes), where the ``tensorboard`` package is installed (the README's set-up installs it); without it
a run writes metrics.jsonl alone. A resume opens its writer with ``purge_step`` at the checkpoint's
next generation, so TensorBoard drops the events a crash left past it, as metrics.jsonl drops lines.
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


def tensorboard_writer(log_dir: Path, purge_step: int | None = None):
    """A TensorBoard ``SummaryWriter`` for ``log_dir``, or None where the tensorboard package is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    try:
        return SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)
    except UnicodeError:  # TensorBoard writes UTF-8 paths only: a directory named otherwise gets metrics.jsonl alone
        return None


class MetricsLog:
    def __init__(self, path: str | Path, tensorboard: bool = True):
        self.path = Path(path)
        self.tensorboard = tensorboard
        self._writer = None
        self._purge_step: int | None = None

    def truncate_after(self, generation: int) -> None:
        """Drop lines past a checkpoint's generation (and a torn last line): a resume recomputes them identically."""
        self._purge_step = generation + 1
        if not self.path.exists():
            return
        kept = [record for record in read(self.path) if record["generation"] <= generation]
        rundir.atomic_write(self.path, "".join(json.dumps(record) + "\n" for record in kept).encode())

    def append(self, record: dict[str, Any]) -> None:
        line = json.dumps({key: _clean(value) for key, value in record.items()}) + "\n"
        try:
            with open(self.path, "a") as handle:
                handle.write(line)
            self._to_tensorboard(record)
        except OSError as err:
            raise rundir.disk_full(self.path, err) or err from None

    def _to_tensorboard(self, record: dict[str, Any]) -> None:
        if not self.tensorboard:
            return
        if self._writer is None:
            self._writer = tensorboard_writer(self.path.parent, self._purge_step)
            if self._writer is None:
                self.tensorboard = False
                return
        step = record["generation"]
        for key, value in record.items():
            if key not in ("generation", "time") and isinstance(value, (int, float)) and not isinstance(value, bool):
                if math.isfinite(value):
                    self._writer.add_scalar(key, value, step)
        self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


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
