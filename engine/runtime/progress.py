"""Progress of long loops: a tqdm bar on a terminal; in a log file (stderr not a terminal) one plain
line every `interval` seconds instead, since a bar redrawn every step fills a log with carriage
returns (a 2500-step demo wrote 256 KB of them)."""
from __future__ import annotations

import sys
import time


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


class Progress:
    interval = 30.0  # seconds between two lines outside a terminal

    def __init__(self, total: int, desc: str, unit: str, initial: int = 0, stream=None, leave: bool = True):
        self.stream = stream or sys.stderr
        self.total, self.desc, self.unit, self.done = total, desc, unit, initial
        self.start_done, self.start = initial, time.time()
        self.last_line, self.postfix = self.start, {}
        self.bar = None
        if self.stream.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True, mininterval=0.2,
                            file=self.stream, leave=leave)

    def update(self, n: int = 1, **postfix) -> None:
        self.done += n
        self.postfix.update(postfix)
        if self.bar is not None:
            self.bar.update(n)
            if postfix:
                self.bar.set_postfix(refresh=False, **postfix)
        elif time.time() - self.last_line >= self.interval:
            self._line()

    def _line(self) -> None:
        now = time.time()
        self.last_line = now
        rate = (self.done - self.start_done) / max(now - self.start, 1e-9)
        parts = [f"{self.desc}: {self.done}/{self.total} {self.unit}"]
        if self.total:
            parts[0] += f" ({100 * self.done / self.total:.0f}%)"
        parts.append(f"{rate:.2f} {self.unit}/s")
        if rate > 0 and self.total > self.done:
            parts.append(f"eta {_duration((self.total - self.done) / rate)}")
        parts += [f"{k} {v}" for k, v in self.postfix.items()]
        print(", ".join(parts), file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.done > self.start_done and time.time() - self.start >= self.interval:
            self._line()  # where a long loop ended (a quick one is not worth a line)


def progress(iterable, total: int, desc: str, unit: str, show: bool = True, leave: bool = True):
    """Iterate with a Progress (or plainly when `show` is False)."""
    if not show:
        yield from iterable
        return
    p = Progress(total, desc, unit, leave=leave)
    try:
        for item in iterable:
            yield item
            p.update(1)
    finally:
        p.close()
