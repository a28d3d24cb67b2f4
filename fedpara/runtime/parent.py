"""Child processes that end with the process that started them.

``fedpara demo`` starts its broker and client processes itself. When the demo is killed
(SIGKILL, an OOM kill, a CI timeout) nothing would stop them: the clients would keep retrying a
dead broker forever. A parent sets ``FEDPARA_EXIT_WITH=<its pid>`` in the child's environment;
the child calls :func:`exit_with_parent` first thing, which asks Linux to send it SIGTERM when
its parent dies (``prctl(PR_SET_PDEATHSIG)``) and exits at once if the parent is already gone.
Elsewhere (macOS, Windows) a watcher thread polls the parent's pid every second instead.
"""
from __future__ import annotations

import logging
import os
import signal
import sys
import threading

ENV = "FEDPARA_EXIT_WITH"
PR_SET_PDEATHSIG = 1

log = logging.getLogger(__name__)


def child_env(env: dict | None = None) -> dict:
    """``env`` (default: ours) plus the variable that ties a child to this process."""
    return {**(os.environ if env is None else env), ENV: str(os.getpid())}


def _parent_gone(pid: int) -> bool:
    return os.getppid() != pid


def exit_with_parent(*, use_prctl: bool | None = None) -> bool:
    """Arrange to end when the parent named by ``FEDPARA_EXIT_WITH`` ends; True when arranged.
    ``use_prctl``: None means on Linux; False forces the polling watcher (tests)."""
    value = os.environ.get(ENV, "")
    if not value.isdigit():
        return False
    pid = int(value)
    armed = False
    if sys.platform.startswith("linux") if use_prctl is None else use_prctl:
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            armed = libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) == 0
        except (OSError, AttributeError):  # no libc prctl (e.g. a static interpreter): poll below
            armed = False
    if _parent_gone(pid):  # it died before we could ask: the signal will never come
        log.warning("parent process %d is gone; exiting", pid)
        os.kill(os.getpid(), signal.SIGTERM)
        return True
    if not armed:
        def watch() -> None:
            while not _parent_gone(pid):
                threading.Event().wait(1.0)
            log.warning("parent process %d is gone; exiting", pid)
            os.kill(os.getpid(), signal.SIGTERM)
        threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()
    return True
