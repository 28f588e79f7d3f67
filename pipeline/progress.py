"""Progress of a long write on stderr, shared by the commands that write datasets."""

from __future__ import annotations

import sys
import time


class Progress:
    """Progress on stderr: one redrawn line on a terminal, a line per quarter in logs."""

    def __init__(self, label: str, total: int) -> None:
        self.label, self.total = label, total
        self.tty = sys.stderr.isatty()
        self.start = self.last = time.monotonic()
        self.next_fraction = 0.25

    def update(self, done: int) -> None:
        now = time.monotonic()
        if self.tty and (now - self.last > 0.2 or done == self.total):
            self.last = now
            rate = done / max(now - self.start, 1e-9)
            sys.stderr.write(f"\r{self.label}: {done}/{self.total} images ({rate:.0f}/s)")
            if done == self.total:
                sys.stderr.write("\n")
            sys.stderr.flush()
        elif not self.tty and self.total >= 100 and done / self.total >= self.next_fraction:
            sys.stderr.write(f"{self.label}: {done}/{self.total} images\n")
            self.next_fraction += 0.25
