"""Which coordinator this client obeys: the newest session it has accepted, kept across restarts.

A signed ``finish`` is only as fresh as the signature's age window (10 minutes by default), and a
fresh process remembers no earlier message: a ``finish`` captured at the end of one run and
replayed while a new run of the same id trains (a re-run, a ``--resume``) used to stop every
client process started since. Now a client obeys a ``finish`` only when

- it names the coordinator session of the newest coordinator status this process accepted (the
  coordinator's retained online status carries its session token, refreshed every 30 s and put
  back by the coordinator when someone overwrites it): a session remembered from before a
  restart is not enough, and
- its ``seq`` is newer than every coordinator message the client accepted, before a restart
  too (a coordinator seals its finish after everything else it sent in that session).

The newest seq (and its session) is written to ``STATE_DIR/coordinator.json`` when a finish is
obeyed, when the session changes and at most every 30 s otherwise, so a restarted client
refuses what it obeyed or refused before.
"""
from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path

log = logging.getLogger(__name__)

SAVE_EVERY_S = 30.0


class CoordinatorWatch:
    def __init__(self, path: Path, run_id: str, clock=time.monotonic) -> None:
        self.path, self.run_id, self.clock = Path(path), run_id, clock
        self.seq, self.session = 0, ""
        self.live = False  # a session was learnt in this process (not only read from the file)
        self._saved = float("-inf")
        self._lock = threading.Lock()
        try:
            data = json.loads(self.path.read_text())
            if isinstance(data, dict) and data.get("run_id") == run_id:
                seq, session = data.get("seq"), data.get("session")
                if isinstance(seq, int) and not isinstance(seq, bool) and seq >= 0:
                    self.seq = seq
                if isinstance(session, str) and len(session) <= 32:
                    self.session = session
        except FileNotFoundError:
            pass
        except (OSError, ValueError) as exc:  # a damaged file: start afresh, say so
            log.warning("%s unreadable (%s): the coordinator's session is learnt again", self.path, exc)

    def saw(self, seq: int, session: str | None, *, save: bool = False) -> None:
        """A coordinator message with ``seq`` was accepted (or, ``save``, a finish obeyed);
        ``session``: the one its online status names (None for a task or a finish)."""
        if not isinstance(seq, int) or seq <= self.seq:
            return
        with self._lock:
            changed = bool(session) and session != self.session
            self.seq = seq
            if session:
                self.session, self.live = session, True
            if save or changed or self.clock() - self._saved >= SAVE_EVERY_S:
                self._save()

    def refuses(self, seq: int, session: str) -> str:
        """Why a signed control with ``seq`` naming ``session`` must not be obeyed ("" to obey)."""
        if not self.live:
            return "no status of the current coordinator was seen yet"
        if session != self.session:
            return f"it names coordinator session {session or '(none)'!r}, the current one is {self.session!r}"
        if not isinstance(seq, int) or seq <= self.seq:
            return "it is older than the coordinator's newest message (a replay)"
        return ""

    def _save(self) -> None:
        self._saved = self.clock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"run_id": self.run_id, "seq": self.seq, "session": self.session}))
            os.replace(tmp, self.path)
        except OSError as exc:  # a read-only or full disk: still refused in this process
            log.warning("cannot write %s: %s", self.path, exc)
