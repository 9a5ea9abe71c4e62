"""Progress of long work: a line per stage, then a bar per face while sampling and per file while downloading. When
the output is not a terminal (a log, a file), plain lines every few seconds instead of bars."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any, TextIO


class Progress:
    def __init__(self, stream: TextIO | None = None, every: float = 10.0) -> None:
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.every = every  # seconds between plain lines
        self.bar: Any = None  # the open tqdm bar, on a terminal
        self.started = self.last_line = 0.0

    def __call__(self, line: str) -> None:
        """A stage or report line."""
        if self.bar is not None:
            self.bar.write(line, file=self.stream)
        else:
            print(line, file=self.stream, flush=True)

    def step(self, step: int, total: int, *_: object) -> None:
        """The sampler's callback. The rate counts from the end of the first step: sampling only, not the encoding
        before it or the decoding after."""
        now = time.monotonic()
        if step == 1:
            self.started = self.last_line = now
            if self.tty:
                from tqdm import tqdm

                self.bar = tqdm(total=total, initial=1, desc="sampling", unit="step", file=self.stream)
        elif self.bar is not None:
            self.bar.update(step - self.bar.n)
        rate = (now - self.started) / (step - 1) if step > 1 else None
        if step == total:
            self._close()
            if rate is not None:
                self(f"sampled {total} steps, {rate:.2f} s/step")
        elif self.bar is None and rate is not None and now - self.last_line >= self.every:
            self.last_line = now
            self(f"sampling: step {step}/{total}, {rate:.2f} s/step, about {rate * (total - step):.0f} s left")

    def counter(self, what: str, unit: str) -> Callable[[int, int], None]:
        """A (done, total) callback for work counted in items: a bar with its ETA on a terminal, else a line every
        few seconds with the rate and the time left."""
        began = time.monotonic()
        self.last_line = began

        def update(done: int, total: int) -> None:
            if self.tty:
                if self.bar is None:
                    from tqdm import tqdm

                    self.bar = tqdm(total=total, desc=what, unit=unit, file=self.stream)
                self.bar.update(done - self.bar.n)
            elif done and (done == total or time.monotonic() - self.last_line >= self.every):
                self.last_line = time.monotonic()
                rate = (self.last_line - began) / done
                self(f"{what}: {done}/{total} {unit}s, {rate:.1f} s/{unit}, about {rate * (total - done):.0f} s left")
            if done >= total:
                self._close()

        return update

    def download(self, name: str) -> Callable[[int, int | None], None]:
        """A (bytes so far, total or None) callback for downloading ``name``."""
        self.last_line = time.monotonic()

        def update(done: int, total: int | None) -> None:
            if self.tty:
                if self.bar is None:
                    from tqdm import tqdm

                    self.bar = tqdm(total=total, desc=name, unit="B", unit_scale=True, file=self.stream)
                self.bar.update(done - self.bar.n)
            elif time.monotonic() - self.last_line >= self.every:
                self.last_line = time.monotonic()
                of = f" of {total / 1e6:,.0f} MB ({100 * done / total:.0f}%)" if total else ""
                self(f"{name}: {done / 1e6:,.0f} MB{of}")
            if total is not None and done >= total:
                self._close()

        return update

    def _close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
