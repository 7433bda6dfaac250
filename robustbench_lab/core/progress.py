"""Progress of long work: bars over attack batches and sanity checks, and one-line stage banners.

Silent unless asked for, so library callers and tests see nothing. On an interactive stream a bar is a tqdm
bar; on anything else (SLURM logs, ``| tee``, a file) it is reduced to a few plain lines, one per tenth of
the work and otherwise one per ``heartbeat`` seconds, because a log full of carriage returns is unreadable.
Banners are log records (``[2/6] model: resnet20 (cache hit, 92.5% test accuracy)``), so they land in the
run's log file too and follow its logging configuration, with or without bars.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import IO, Sequence

from tqdm.auto import tqdm

log = logging.getLogger(__name__)


class Bar:
    """Progress over ``total`` units of work; ``update(n, **counts)`` adds ``n`` done units and adds each
    count (e.g. ``broken=3``) to its running total. The bar closes itself when the work is done (so a loop
    needs no ``try``/``finally`` around it), or on ``close()``, or when used as a context manager."""

    def __init__(self, total: int, desc: str, unit: str, stream: IO[str] | None, heartbeat: float) -> None:
        self.total, self.desc, self.unit = int(total), desc, unit
        self.n = 0
        self.counts: dict[str, int] = {}
        self.t0 = time.perf_counter()
        self._stream = stream
        self._heartbeat = heartbeat
        self._last_line = self.t0
        self._last_tenth = 0
        self._tqdm = None
        self._closed = False
        if self.total <= 0:   # nothing to do: nothing to show
            self._stream = None
        elif stream is not None and is_interactive(stream):
            self._tqdm = tqdm(total=self.total, desc=desc, unit=unit, file=stream, leave=True, dynamic_ncols=True)

    def __enter__(self) -> "Bar":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def update(self, n: int = 1, **counts: int) -> None:
        self.n += int(n)
        for k, v in counts.items():
            self.counts[k] = self.counts.get(k, 0) + int(v)
        if self._closed:
            return
        if self._tqdm is not None:
            self._tqdm.set_postfix(self.counts, refresh=False)
            self._tqdm.update(int(n))
        elif self._stream is not None:
            now = time.perf_counter()
            tenth = 10 * self.n // max(self.total, 1)
            if self.n >= self.total or tenth > self._last_tenth or now - self._last_line >= self._heartbeat:
                self._line(now)
            self._last_tenth = tenth
        if self.n >= self.total:
            self.close()

    def line(self) -> str:
        """The bar's state as one line: ``pgd: 500/915 points (55%), 498 broken, 12 s elapsed, ~10 s left``."""
        elapsed = time.perf_counter() - self.t0
        pct = 100 * self.n // max(self.total, 1)
        parts = [f"{self.desc}: {self.n}/{self.total} {self.unit}s ({pct}%)"]
        parts += [f"{v} {k}" for k, v in self.counts.items()]
        parts.append(f"{elapsed:.0f} s elapsed")
        if 0 < self.n < self.total and elapsed >= 1:   # an estimate from under a second of work is noise
            parts.append(f"~{elapsed * (self.total - self.n) / self.n:.0f} s left")
        return ", ".join(parts)

    def _line(self, now: float) -> None:
        assert self._stream is not None
        self._stream.write(self.line() + "\n")
        self._stream.flush()
        self._last_line = now

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._tqdm is not None:
            self._tqdm.close()
        elif self._stream is not None and self.n < self.total and self.n > 0:
            self._line(time.perf_counter())   # stopped early: say where


def is_interactive(stream: IO[str]) -> bool:
    """Whether ``stream`` is a terminal (where a redrawn bar reads well) rather than a log or a pipe."""
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except (ValueError, OSError):   # a closed or detached stream
        return False


class Progress:
    """The switch and the stream for bars, and the stage list for banners.

    ``enabled=False`` (the default) draws no bar; banners are still logged at INFO level (invisible unless
    logging is configured, as it is in a Hydra run). ``stages``: the names of a task's stages in order, which
    numbers the banners (``[4/6] attacks: ...``). ``stream``: where bars go (default: ``sys.stderr`` as it is
    when the bar starts, so a redirected or captured stream is honoured). ``heartbeat``: seconds between
    lines on a non-interactive stream when no tenth of the work was completed in between.
    """

    def __init__(self, enabled: bool = False, stages: Sequence[str] = (), stream: IO[str] | None = None,
                 heartbeat: float = 30.0) -> None:
        self.enabled = bool(enabled)
        self.stages = tuple(stages)
        self.heartbeat = float(heartbeat)
        self._stream = stream

    def bar(self, total: int, desc: str, unit: str = "point") -> Bar:
        stream = (self._stream if self._stream is not None else sys.stderr) if self.enabled else None
        return Bar(total, desc, unit, stream, self.heartbeat)

    def stage(self, name: str, detail: str) -> str:
        """Log the banner of stage ``name``; returns it."""
        pos = f"[{self.stages.index(name) + 1}/{len(self.stages)}] " if name in self.stages else ""
        text = f"{pos}{name}: {detail}"
        log.info("%s", text)
        return text


SILENT = Progress()   # the default of every function that takes a ``progress``
