"""Log lines for refused input, rate-limited with counts.

Every refused message used to write a WARNING line of its own: 200,000 junk frames of 71 bytes
made 34 MB of log on a device's SD card. :class:`Throttled` lets ``burst`` lines per kind through
every ``window_s`` seconds and then only counts; the first line after a quiet window says how
many were held back (``... and 4,812 more like this in the last 60 s``). Counters elsewhere
(``ignored`` in metrics.jsonl, a client's ``counters``) still count every message.
"""
from __future__ import annotations

import logging
import threading
import time


class Throttled:
    def __init__(self, logger: logging.Logger, burst: int = 10, window_s: float = 60.0, max_kinds: int = 256,
                 clock=time.monotonic) -> None:
        self.logger, self.burst, self.window_s, self.max_kinds, self.clock = logger, burst, window_s, max_kinds, clock
        self._kinds: dict[str, list] = {}  # kind -> [window start, lines in window, held back]
        self._lock = threading.Lock()

    def log(self, level: int, kind: str, msg: str, *args) -> bool:
        """Log ``msg % args`` at ``level`` unless ``kind`` used up its burst in this window;
        returns whether a line was written."""
        now = self.clock()
        with self._lock:
            k = self._kinds.get(kind)
            if k is None:
                if len(self._kinds) >= self.max_kinds:  # bounded: unknown kinds share one slot
                    kind = "other"
                    k = self._kinds.get(kind)
                if k is None:
                    k = self._kinds[kind] = [now, 0, 0]
            held = 0
            if now - k[0] >= self.window_s:
                held, k[0], k[1], k[2] = k[2], now, 0, 0
            if k[1] >= self.burst:
                k[2] += 1
                return False
            k[1] += 1
        if held:
            self.logger.log(level, msg + " (and %d more like this in the last %.0f s)", *args, held, self.window_s)
        else:
            self.logger.log(level, msg, *args)
        if k[1] == self.burst:
            self.logger.log(level, "more %s messages in the next %.0f s are counted, not logged", kind, self.window_s)
        return True

    def held(self) -> int:
        """Lines held back in the current windows."""
        with self._lock:
            return sum(k[2] for k in self._kinds.values())
