"""Helpers of the browser tests (tests/test_web_*.py): a static file server on loopback and
Debian's headless chromium with a phone's viewport and a throttled CPU, driven by selenium."""
from __future__ import annotations

import contextlib
import functools
import http.server
import shutil
import threading
from pathlib import Path

import pytest
from support import wait_until

from edge_client.web.site import stage_client
from export.web import WebAssetsMissing, check_assets

PHONE = {"deviceMetrics": {"width": 390, "height": 844, "pixelRatio": 3.0, "mobile": True, "touch": True},
         "userAgent": "Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 (KHTML, like Gecko) "
                      "Chrome/130.0 Mobile Safari/537.36"}
CPU_SLOWDOWN = 4  # CDP Emulation.setCPUThrottlingRate: a mid-range phone against this machine's core


def fleet_writer():
    """``fedpara broker-acl``'s writer."""
    from coordinator.broker_acl import write_fleet
    return write_fleet


def needs_web_assets():
    try:
        check_assets()
    except WebAssetsMissing as exc:
        pytest.skip(str(exc))


class _Handler(http.server.SimpleHTTPRequestHandler):
    extensions_map = {**http.server.SimpleHTTPRequestHandler.extensions_map,
                      ".mjs": "text/javascript", ".js": "text/javascript", ".wasm": "application/wasm",
                      ".json": "application/json", ".onnx": "application/octet-stream"}

    def log_message(self, *args):  # quiet
        pass


class StaticServer:
    """``python -m http.server`` on 127.0.0.1 (a secure context for service workers), in a thread."""

    def __init__(self, directory: Path) -> None:
        handler = functools.partial(_Handler, directory=str(directory))
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def chromium(tmp_path: Path, *args: str, phone: bool = False):
    """Headless Debian chromium (never a downloaded one) through its chromedriver; ``phone``: a
    390x844 viewport, touch and a mobile user agent. Skips when chromium is not installed."""
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver") or next((p for p in ("/usr/bin/chromedriver",) if Path(p).exists()), None)
    if binary is None or driver is None:
        pytest.skip("chromium and chromedriver are not installed (apt-get install chromium chromium-driver; "
                    ".ci/setup does this as root)")
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    opts = Options()
    opts.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--no-first-run",
                f"--user-data-dir={tmp_path / 'chromium'}", *args):
        opts.add_argument(arg)
    if phone:
        opts.add_experimental_option("mobileEmulation", PHONE)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(driver), options=opts)


def phone_browser(tmp_path: Path, *, throttle: float = CPU_SLOWDOWN, args: tuple = ()):
    """:func:`chromium` as a phone, its CPU slowed ``throttle`` times by CDP."""
    d = chromium(tmp_path, *args, phone=True)
    if throttle and throttle > 1:
        d.execute_cdp_cmd("Emulation.setCPUThrottlingRate", {"rate": throttle})
    return d


@contextlib.contextmanager
def harness_page(tmp: Path):
    """The browser client's test harness page, served from a staged site, in a phone browser."""
    try:
        site = stage_client(tmp / "site")
    except WebAssetsMissing as exc:
        pytest.skip(str(exc))
    server = StaticServer(site)
    driver = phone_browser(tmp, throttle=1)
    try:
        driver.get(server.url + "harness.html")
        yield driver
    finally:
        driver.quit()
        server.stop()


def wait_for(fn, what: str, timeout: float = 60.0, every: float = 0.1, driver=None):
    """:func:`support.wait_until`; on timeout the failure also shows the page's console."""
    try:
        return wait_until(fn, timeout, interval=every, what=what)
    except AssertionError as exc:
        logs = ""
        if driver is not None:
            try:
                logs = "\n".join(e["message"] for e in driver.get_log("browser"))
            except Exception:  # noqa: BLE001  (the log is a courtesy)
                pass
        raise AssertionError(f"{exc}\nbrowser console:\n{logs}") from None
