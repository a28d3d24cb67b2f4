"""Network-namespace lab for link benchmarks: a hub namespace (broker + coordinator) and one
namespace per client, each client joined to the hub by its own veth pair, shaped with ``tc tbf``.

    +-------------------- <prefix>-hub ---------------------+
    |  lo 127.0.0.1: mosquitto / amqtt, coordinator          |
    |  <prefix>-h0 10.213.0.1/30   <prefix>-h1 10.213.0.5/30 |     (tbf on each: downlink)
    +------------|--------------------------|----------------+
    +- <prefix>-c0 ------------+   +- <prefix>-c1 ------------+
    | <prefix>-c0 10.213.0.2/30|   | <prefix>-c1 10.213.0.6/30|   (tbf on each: uplink)
    +--------------------------+   +--------------------------+

Nothing is created in the root namespace: both veth ends are created directly inside their
namespaces, so the root namespace's interfaces, routes and firewall are never touched, and no
address outside the lab's own /30s is routable from inside it (the namespaces have no default
route). Requires root (CAP_NET_ADMIN), iproute2 (``ip``) and ``tc``.

Safety: refuses to start when a namespace it would create already exists (pass
``force_cleanup=True`` to delete those first); tears everything down on exit, exception,
SIGINT/SIGTERM (atexit + signal handlers); kills only the processes it started, by PID.
"""
from __future__ import annotations

import atexit
import ipaddress
import logging
import os
import re
import signal
import subprocess
import threading
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

_NAME = re.compile(r"^[a-z][a-z0-9]{0,7}$")


def _run(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    res = subprocess.run(list(argv), capture_output=True, text=True)
    if check and res.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({res.returncode}): {res.stderr.strip()}")
    return res


def existing_namespaces() -> set[str]:
    out = _run("ip", "netns", "list", check=False).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


@dataclass
class ClientLink:
    index: int
    ns: str
    client_if: str
    hub_if: str
    client_addr: str
    hub_addr: str


@dataclass
class LinkLab:
    """``with LinkLab(n_clients=2, rate="2mbit") as lab: lab.popen(lab.hub, [...])``."""

    n_clients: int = 2
    rate: str = "2mbit"               # tc rate syntax: 2mbit, 20mbit, 500kbit
    uplink_rate: str | None = None    # client -> hub; default: rate
    prefix: str = "fpbw"
    subnet: str = "10.213.0.0/24"     # carved into one /30 per client
    burst: str = "32kb"
    latency: str = "200ms"            # tbf queue: how long a packet may wait (sets the queue limit)
    force_cleanup: bool = False
    # one MTU-sized skb per packet (no 64 KB GSO super-packets): tbf then drops single packets,
    # like a real narrow link, instead of whole 40-packet bursts that TCP must resend
    no_gso: bool = True
    links: list[ClientLink] = field(default_factory=list)
    _procs: list[subprocess.Popen] = field(default_factory=list)
    _created: list[str] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _closed: bool = False

    def __post_init__(self) -> None:
        if not _NAME.match(self.prefix):
            raise ValueError(f"prefix must be 1-8 lowercase letters/digits, got {self.prefix!r}")
        if not 1 <= self.n_clients <= 60:
            raise ValueError("n_clients must be 1..60")
        net = ipaddress.ip_network(self.subnet)
        if not net.is_private or net.prefixlen > 30 or net.num_addresses < 4 * self.n_clients:
            raise ValueError(f"subnet {self.subnet} must be private and hold {self.n_clients} /30s")
        self._subnets = list(net.subnets(new_prefix=30))[: self.n_clients]

    # --- names ---------------------------------------------------------------------------------
    @property
    def hub(self) -> str:
        return f"{self.prefix}-hub"

    def client_ns(self, i: int) -> str:
        return f"{self.prefix}-c{i}"

    @property
    def namespaces(self) -> list[str]:
        return [self.hub] + [self.client_ns(i) for i in range(self.n_clients)]

    # --- lifecycle ----------------------------------------------------------------------------
    def __enter__(self) -> LinkLab:
        self.setup()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def setup(self) -> None:
        if os.geteuid() != 0:
            raise PermissionError("network namespaces need root (CAP_NET_ADMIN)")
        clash = sorted(set(self.namespaces) & existing_namespaces())
        if clash:
            if not self.force_cleanup:
                raise RuntimeError(f"network namespace(s) {clash} already exist; another run? "
                                   f"Pass --force-cleanup to delete them first.")
            for ns in clash:
                log.warning("force-cleanup: deleting existing namespace %s", ns)
                _run("ip", "netns", "del", ns, check=False)
        atexit.register(self.close)
        self._install_signal_handlers()
        try:
            for ns in self.namespaces:
                _run("ip", "netns", "add", ns)
                self._created.append(ns)
                _run("ip", "-n", ns, "link", "set", "lo", "up")
            up_rate = self.uplink_rate or self.rate
            for i, sub in enumerate(self._subnets):
                hosts = list(sub.hosts())
                link = ClientLink(i, self.client_ns(i), f"{self.prefix}-c{i}", f"{self.prefix}-h{i}",
                                  str(hosts[1]), str(hosts[0]))
                # both ends created inside their namespaces: nothing appears in the root namespace
                _run("ip", "link", "add", link.client_if, "netns", link.ns, "type", "veth",
                     "peer", "name", link.hub_if, "netns", self.hub)
                _run("ip", "-n", link.ns, "addr", "add", f"{link.client_addr}/30", "dev", link.client_if)
                _run("ip", "-n", self.hub, "addr", "add", f"{link.hub_addr}/30", "dev", link.hub_if)
                for ns, dev in ((link.ns, link.client_if), (self.hub, link.hub_if)):
                    if self.no_gso:
                        _run("ip", "-n", ns, "link", "set", dev, "gso_max_size", "1500", "gso_max_segs", "1")
                    _run("ip", "-n", ns, "link", "set", dev, "up")
                # downlink: hub -> client, shaped on the hub end; uplink on the client end
                self._tbf(self.hub, link.hub_if, self.rate)
                self._tbf(link.ns, link.client_if, up_rate)
                self.links.append(link)
        except BaseException:
            self.close()
            raise

    def _tbf(self, ns: str, dev: str, rate: str) -> None:
        _run("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", "tbf",
             "rate", rate, "burst", self.burst, "latency", self.latency)

    def _install_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            prev = signal.getsignal(sig)

            def handler(signum, frame, prev=prev):
                self.close()
                if callable(prev) and prev not in (signal.SIG_DFL, signal.SIG_IGN):
                    prev(signum, frame)
                raise SystemExit(128 + signum)

            signal.signal(sig, handler)

    def popen(self, ns: str, argv: list[str], **kw) -> subprocess.Popen:
        """Start argv inside namespace ns (``ip netns exec`` execs in place: the PID is argv's)."""
        if ns not in self._created:
            raise ValueError(f"{ns} is not a namespace of this lab")
        proc = subprocess.Popen(["ip", "netns", "exec", ns, *argv], **kw)
        with self._lock:
            self._procs.append(proc)
        return proc

    def exec(self, ns: str, argv: list[str]) -> str:
        if ns not in self._created:
            raise ValueError(f"{ns} is not a namespace of this lab")
        return _run("ip", "netns", "exec", ns, *argv, check=False).stdout

    def stop(self, proc: subprocess.Popen, timeout: float = 5.0) -> None:
        """Terminate one process this lab started (by PID), then kill it if it lingers."""
        if proc.poll() is None:
            try:
                proc.terminate()
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout)
            except ProcessLookupError:
                pass

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            procs = list(self._procs)
        for p in procs:
            try:
                self.stop(p)
            except Exception:  # keep cleaning up
                log.exception("stopping pid %s", p.pid)
        for ns in reversed(self._created):  # deleting a namespace deletes its veth ends too
            _run("ip", "netns", "del", ns, check=False)
        self._created.clear()

    # --- measurement helpers ---------------------------------------------------------------------
    def tc_stats(self) -> dict[str, dict]:
        """Bytes/packets/drops per shaped device (from ``tc -s qdisc``)."""
        out = {}
        for link in self.links:
            for ns, dev in ((self.hub, link.hub_if), (link.ns, link.client_if)):
                text = self.exec(ns, ["tc", "-s", "qdisc", "show", "dev", dev])
                m = re.search(r"Sent (\d+) bytes (\d+) pkt \(dropped (\d+), overlimits (\d+)", text)
                if m:
                    out[dev] = {"bytes": int(m[1]), "packets": int(m[2]), "dropped": int(m[3]),
                                "overlimits": int(m[4])}
        return out


def parse_rate(rate: str) -> float:
    """tc rate string -> bits per second (tc units: kbit = 1000 bit, mbit = 10^6 bit)."""
    m = re.fullmatch(r"\s*([\d.]+)\s*(bit|kbit|mbit|gbit|bps|kbps|mbps|gbps)?\s*", rate.lower())
    if not m:
        raise ValueError(f"bad rate {rate!r}, expected e.g. 2mbit")
    v = float(m[1])
    unit = m[2] or "bit"
    mult = {"bit": 1, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9, "bps": 8, "kbps": 8e3, "mbps": 8e6, "gbps": 8e9}[unit]
    return v * mult


def ss_bytes(lab: LinkLab, ns: str, port: int) -> list[dict]:
    """TCP_INFO counters (via ``ss -ti``) of the established connections to/from ``port`` in ns."""
    text = lab.exec(ns, ["ss", "-tinH", "state", "established", f"( dport = :{port} or sport = :{port} )"])
    conns, cur = [], None
    for line in text.splitlines():
        if not line.startswith((" ", "\t")):
            cur = {"conn": " ".join(line.split()[2:4])}
            conns.append(cur)
        elif cur is not None:
            for key in ("bytes_acked", "bytes_received", "bytes_sent", "bytes_retrans"):
                m = re.search(rf"\b{key}:(\d+)", line)
                if m:
                    cur[key] = int(m[1])
    return conns


def _cleanup_main() -> None:  # python -m benchmarks.netns --cleanup PREFIX
    import argparse

    p = argparse.ArgumentParser(description="delete a LinkLab's namespaces left behind by a crash")
    p.add_argument("--cleanup", metavar="PREFIX", required=True)
    args = p.parse_args()
    if not _NAME.match(args.cleanup):
        raise SystemExit("bad prefix")
    for ns in sorted(existing_namespaces()):
        if ns == f"{args.cleanup}-hub" or re.fullmatch(rf"{args.cleanup}-c\d+", ns):
            print("deleting", ns)
            _run("ip", "netns", "del", ns, check=False)


if __name__ == "__main__":
    _cleanup_main()
