"""Progress of long loops: a tqdm bar on a terminal; in a log file (stderr not a terminal) one plain
line every `interval` seconds instead, since a bar redrawn every step fills a log with carriage
returns (a 2500-step demo wrote 256 KB of them), and one at the end (a run shorter than the interval
still says where it ended, its loss included).

While a bar is open on a terminal, whatever else the process prints there (an evaluation line, the
decode path, a library's warning) goes above the bar: sys.stdout and sys.stderr write through
_AboveBars, which clears the bar, writes the complete lines and redraws it, so the bar is never cut
and the screen ends with one final bar."""
from __future__ import annotations

import sys
import time

_OPEN_BARS: list = []  # the tqdm bars open on a terminal, in the order they opened


class _AboveBars:
    """A terminal stream whose complete lines are written above the open bars (see the module doc)."""

    def __init__(self, stream):
        self.real, self._pending = stream, ""

    def write(self, text: str) -> int:
        self._pending += text
        if "\n" in self._pending:
            lines, self._pending = self._pending.rsplit("\n", 1)
            self._write_above(lines + "\n")
        return len(text)

    def flush(self) -> None:
        if self._pending:
            text, self._pending = self._pending, ""
            self._write_above(text)
        self.real.flush()

    def _write_above(self, text: str) -> None:
        for bar in _OPEN_BARS:
            bar.clear()
        self.real.write(text)
        self.real.flush()
        for bar in _OPEN_BARS:
            bar.refresh()

    def __getattr__(self, name):
        return getattr(self.real, name)


def _real(stream):
    return getattr(stream, "real", stream)


def _route_around(bar) -> None:
    """The first bar on a terminal sends sys.stdout / sys.stderr (those that are terminals) through
    _AboveBars; the last one closed gives them back."""
    if not _OPEN_BARS:
        for name in ("stdout", "stderr"):
            stream = getattr(sys, name)
            if not isinstance(stream, _AboveBars) and stream.isatty():
                setattr(sys, name, _AboveBars(stream))
    _OPEN_BARS.append(bar)


def _release(bar) -> None:
    if bar in _OPEN_BARS:
        _OPEN_BARS.remove(bar)
    if not _OPEN_BARS:
        for name in ("stdout", "stderr"):
            stream = getattr(sys, name)
            if isinstance(stream, _AboveBars):
                stream.flush()
                setattr(sys, name, stream.real)


def close_bars() -> None:
    """Close every open bar, each left as it stands (an error then prints below the bars, not above
    one redrawn after it) and the streams given back."""
    for bar in list(_OPEN_BARS):
        _release(bar)
        bar.close()


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


class Progress:
    interval = 30.0  # seconds between two lines outside a terminal

    def __init__(self, total: int, desc: str, unit: str, initial: int = 0, stream=None, leave: bool = True):
        self.stream = _real(stream or sys.stderr)
        self.total, self.desc, self.unit, self.done, self.leave = total, desc, unit, initial, leave
        self.start_done, self.start = initial, time.time()
        self.last_line, self.postfix = self.start, {}
        self.bar = None
        if self.stream.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True, mininterval=0.2,
                            file=self.stream, leave=leave)
            _route_around(self.bar)

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
            _release(self.bar)
            self.bar.close()
            self.bar = None
        elif self.done > self.start_done and (self.leave or time.time() - self.start >= self.interval):
            self._line()  # where the loop ended (a quick one of a conversion, leave=False, is not worth a line)
            self.start_done = self.done


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
