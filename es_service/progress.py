"""A one-line live progress bar (carriage-return updates on a terminal, periodic lines otherwise)."""

from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, total: int, start: int = 0, stream=None, line_every_s: float = 10.0):
        self.total = total
        self.start_generation = start
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.started = time.monotonic()
        self.line_every_s = line_every_s
        self._last_line = 0.0

    def render(self, record: dict, accuracy: dict) -> str:
        generation = record["generation"]
        done = generation / self.total
        bar = "#" * int(24 * done) + "-" * (24 - int(24 * done))
        rate = (generation - self.start_generation) / max(1e-9, time.monotonic() - self.started)
        test = accuracy.get("test_accuracy")
        best, mean = record.get("fitness_max"), record.get("fitness_mean")
        return (
            f"[{bar}] gen {generation}/{self.total}  best {best if best is None else f'{best:.4f}'}"
            f"  mean {mean if mean is None else f'{mean:.4f}'}"
            f"  test {'-' if test is None else f'{test:.4f}'}  {rate:.2f} gen/s"
            f"  workers {record.get('workers_alive')}"
        )

    def update(self, record: dict, accuracy: dict) -> None:
        line = self.render(record, accuracy)
        now = time.monotonic()
        if self.tty:
            self.stream.write("\r" + line)
            if record["generation"] >= self.total:
                self.stream.write("\n")
        elif now - self._last_line >= self.line_every_s or record["generation"] >= self.total:
            self.stream.write(line + "\n")
            self._last_line = now
        self.stream.flush()
