"""Embedded MQTT broker (amqtt, pure Python, MQTT 3.1.1), bound to loopback unless told otherwise.

Used by ``fedpara broker``, ``fedpara demo`` and the tests. For production fleets use Mosquitto,
EMQX or another real broker and point every component at it with ``--broker mqtt://host:port``.
"""
from __future__ import annotations

import asyncio
import logging
import socket
import subprocess
import sys
import threading
import time

log = logging.getLogger(__name__)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_for_port(host: str, port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listening on {host}:{port} after {timeout:.0f}s") from None
            time.sleep(0.05)


def broker_config(host: str, port: int, ws_port: int | None = None) -> dict:
    listeners = {"default": {"type": "tcp", "bind": f"{host}:{port}", "max_connections": 0}}
    if ws_port:  # MQTT over WebSockets, for browser clients (edge_client/web, docs/mobile.md)
        listeners["ws"] = {"type": "ws", "bind": f"{host}:{ws_port}", "max_connections": 0}
    return {
        "listeners": listeners,
        # anonymous access on loopback; $SYS off; no per-packet logging plugin (it is slow)
        "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
    }


async def serve(host: str, port: int, stop: asyncio.Event, ready: threading.Event | None = None,
                ws_port: int | None = None) -> None:
    from amqtt.broker import Broker

    broker = Broker(broker_config(host, port, ws_port))
    await broker.start()
    log.info("embedded MQTT broker listening on %s:%d%s", host, port,
             f" (websockets on {ws_port})" if ws_port else "")
    if ready is not None:
        ready.set()
    try:
        await stop.wait()
    finally:
        await broker.shutdown()


class EmbeddedBroker:
    """The amqtt broker on its own thread and event loop (context manager)."""

    def __init__(self, host: str = "127.0.0.1", port: int | None = None, ws_port: int | None = None) -> None:
        self.host, self.port = host, port or free_port(host)
        self.ws_port = ws_port  # MQTT over WebSockets too (0: a free port)
        if ws_port == 0:
            self.ws_port = free_port(host)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    @property
    def ws_url(self) -> str | None:
        return f"ws://{self.host}:{self.ws_port}" if self.ws_port else None

    def start(self) -> EmbeddedBroker:
        ready = threading.Event()

        def run() -> None:
            self._loop = asyncio.new_event_loop()
            self._stop = asyncio.Event()
            try:
                self._loop.run_until_complete(serve(self.host, self.port, self._stop, ready, self.ws_port))
            except BaseException as exc:  # reported to start()
                self._error = exc
                ready.set()

        self._thread = threading.Thread(target=run, name="amqtt-broker", daemon=True)
        self._thread.start()
        ready.wait(30)
        if self._error is not None:
            raise RuntimeError(f"embedded broker failed to start: {self._error}") from self._error
        wait_for_port(self.host, self.port)
        if self.ws_port:
            wait_for_port(self.host, self.ws_port)
        return self

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(10)

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def spawn_broker(host: str = "127.0.0.1", port: int | None = None,
                 ws_port: int | None = None) -> tuple[subprocess.Popen, str]:
    """Start the embedded broker in a child process (keeps its GIL away from training); with
    ``ws_port`` it also serves MQTT over WebSockets there."""
    import tempfile

    port = port or free_port(host)
    errlog = tempfile.TemporaryFile()
    from fedpara.runtime.parent import child_env

    ws = ["--ws-port", str(ws_port)] if ws_port else []
    proc = subprocess.Popen([sys.executable, "-m", "coordinator.broker", "--host", host, "--port", str(port), *ws],
                            stdout=subprocess.DEVNULL, stderr=errlog, env=child_env())  # ends with us
    try:
        wait_for_port(host, port)
        if ws_port:
            wait_for_port(host, ws_port)
    except TimeoutError:
        proc.kill()
        errlog.seek(0)
        err = errlog.read().decode(errors="replace")[-2000:]
        raise RuntimeError(f"embedded broker did not start on {host}:{port}: {err}") from None
    return proc, f"mqtt://{host}:{port}"


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m coordinator.broker")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=1883)
    p.add_argument("--ws-port", type=int, default=None, help="also serve MQTT over WebSockets on this port")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    from fedpara.runtime.parent import exit_with_parent

    exit_with_parent()  # started by fedpara demo: do not outlive it

    async def run() -> None:
        await serve(args.host, args.port, asyncio.Event(), ws_port=args.ws_port)

    try:
        asyncio.run(run())
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
