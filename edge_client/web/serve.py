"""The phones' web server: the staged client (static files) and ``POST /enrol`` (one-time codes,
:mod:`edge_client.web.enrol`). HTTPS with ``certfile``/``keyfile``: phones need a secure origin
for service workers and WebCrypto, and ``wss://`` for the broker (docs/mobile.md)."""
from __future__ import annotations

import functools
import http.server
import json
import logging
import ssl
import threading
from pathlib import Path

from .enrol import EnrolError, EnrolStore

log = logging.getLogger(__name__)

MAX_BODY = 4096


class _Handler(http.server.SimpleHTTPRequestHandler):
    extensions_map = {**http.server.SimpleHTTPRequestHandler.extensions_map, ".mjs": "text/javascript",
                      ".js": "text/javascript", ".wasm": "application/wasm", ".json": "application/json",
                      ".onnx": "application/octet-stream", ".bin": "application/octet-stream"}
    store: EnrolStore
    on_exit = None  # the demo's page server only: POST /exit when the page saw the run finish

    def end_headers(self) -> None:
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")
        # cross-origin isolation: SharedArrayBuffer, hence WebAssembly threads (TF.js's threaded
        # XNNPACK, onnxruntime-web's threads); the page loads nothing from other origins anyway
        self.send_header("Cross-Origin-Opener-Policy", "same-origin")
        self.send_header("Cross-Origin-Embedder-Policy", "require-corp")
        super().end_headers()

    def log_message(self, fmt, *args) -> None:
        log.debug("%s " + fmt, self.address_string(), *args)

    def _json(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Cache-Control", "no-store")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self) -> None:  # noqa: N802  (http.server's naming)
        leaf = self.path.split("?")[0].rstrip("/").rsplit("/", 1)[-1]
        if leaf == "exit" and self.on_exit is not None:
            self._json(200, {"ok": True})
            threading.Thread(target=self.on_exit, daemon=True).start()
            return
        if leaf != "enrol":
            self._json(404, {"error": "not found"})
            return
        try:
            n = int(self.headers.get("Content-Length", "0"))
            if not 0 < n <= MAX_BODY:
                raise EnrolError("request body missing or too large", 400)
            try:
                code = json.loads(self.rfile.read(n)).get("code")
            except (ValueError, AttributeError):
                raise EnrolError("request body must be JSON {\"code\": ...}", 400) from None
            config = self.store.redeem(code)
        except EnrolError as exc:
            log.warning("enrolment refused for %s: %s", self.address_string(), exc)
            self._json(exc.status, {"error": str(exc)})
            return
        self._json(200, config)


class WebServer:
    """Serve ``site`` (a staged client directory) and the enrolments of ``store`` on a thread."""

    def __init__(self, site: str | Path, store: EnrolStore, host: str = "127.0.0.1", port: int = 0, *,
                 certfile: str | None = None, keyfile: str | None = None, on_exit=None) -> None:
        handler = type("Handler", (_Handler,), {"store": store, "on_exit": staticmethod(on_exit) if on_exit else None})
        self.httpd = http.server.ThreadingHTTPServer((host, port), functools.partial(handler, directory=str(site)))
        scheme = "http"
        if certfile:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(certfile, keyfile)
            self.httpd.socket = ctx.wrap_socket(self.httpd.socket, server_side=True)
            scheme = "https"
        h = f"[{host}]" if ":" in host else host
        self.url = f"{scheme}://{h}:{self.httpd.server_address[1]}/"
        self._thread: threading.Thread | None = None

    def start(self) -> WebServer:
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="web-server", daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        self.httpd.serve_forever()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
