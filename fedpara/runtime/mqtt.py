"""MQTT transport shared by the coordinator and the edge client: the one module that imports paho.

Habits: paho's ``CallbackAPIVersion.VERSION2``; subscriptions are (re)made in
``on_connect`` so that reconnects resubscribe; ``reconnect_delay_set`` backoff; an optional
retained last will; callbacks only enqueue ``(topic, payload)`` -- all work happens on the caller's
threads. Broker URLs: ``mqtt://host:port`` and ``mqtts://host:port`` (TLS, optional CA file);
credentials from arguments or ``FEDPARA_MQTT_USERNAME`` / ``FEDPARA_MQTT_PASSWORD``, never logged.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import socket
import ssl
import threading
import time
from urllib.parse import unquote, urlsplit

from .inbox import Inbox

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class BrokerURL:
    host: str
    port: int
    tls: bool = False
    username: str | None = None
    password: str | None = dataclasses.field(default=None, repr=False)
    ca_file: str | None = None

    def __str__(self) -> str:  # redacted: safe to log
        user = f"{self.username}:***@" if self.username else ""
        return f"{'mqtts' if self.tls else 'mqtt'}://{user}{self.host}:{self.port}"


def parse_broker_url(url: str, *, username: str | None = None, password: str | None = None,
                     ca_file: str | None = None) -> BrokerURL:
    """``mqtt://host[:1883]`` or ``mqtts://host[:8883]``; user:pass in the URL or the environment."""
    if not isinstance(url, str) or "://" not in url:
        raise ValueError(f"broker: expected mqtt://host:port or mqtts://host:port, got {url!r}")
    parts = urlsplit(url)
    if parts.scheme not in ("mqtt", "mqtts", "tcp", "ssl"):
        raise ValueError(f"broker: unsupported scheme {parts.scheme!r} (use mqtt:// or mqtts://)")
    tls = parts.scheme in ("mqtts", "ssl")
    if not parts.hostname:
        raise ValueError(f"broker: no host in {url!r}")
    try:
        port = parts.port or (8883 if tls else 1883)
    except ValueError as exc:
        raise ValueError(f"broker: bad port in {url!r}") from exc
    user = username or (unquote(parts.username) if parts.username else None) or os.environ.get("FEDPARA_MQTT_USERNAME")
    pw = password or (unquote(parts.password) if parts.password else None) or os.environ.get("FEDPARA_MQTT_PASSWORD")
    if ca_file and not os.path.isfile(ca_file):
        raise ValueError(f"broker: CA file {ca_file!r} does not exist")
    return BrokerURL(parts.hostname, port, tls, user, pw, ca_file)


class MqttSession:
    """One MQTT connection. Incoming messages land in ``self.inbox`` as (topic, payload bytes)."""

    def __init__(self, url: BrokerURL, client_id: str, subscriptions: list[tuple[str, int]], *,
                 will: tuple[str, bytes, int, bool] | None = None, keepalive: int = 30,
                 inbox: Inbox | None = None, on_connect=None, renew_will=None) -> None:
        import paho.mqtt.client as mqtt

        self.url, self.client_id = url, client_id
        self.subscriptions = list(subscriptions)
        self.inbox: Inbox = inbox if inbox is not None else Inbox()
        self.connected = threading.Event()
        self.connects = 0
        self._on_connect_hook = on_connect
        self._client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                                   protocol=mqtt.MQTTv311, clean_session=True)
        self._client.max_inflight_messages_set(64)
        self._client.reconnect_delay_set(min_delay=1, max_delay=30)
        if url.username:
            self._client.username_pw_set(url.username, url.password)
        if url.tls:
            ctx = ssl.create_default_context(cafile=url.ca_file)
            self._client.tls_set_context(ctx)
        if will is not None:
            self._client.will_set(will[0], will[1], qos=will[2], retain=will[3])
        # ``renew_will()``: a fresh will payload for the next connection (a signed will is sealed per
        # connection, so that one published by the broker cannot be replayed after a reconnect)
        self._will, self._renew_will = will, renew_will
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message
        self.keepalive = keepalive
        self._sock_lock = threading.Lock()
        self._sock = None
        self._sock_last: tuple[int, int] | None = None
        self._sock_base = (0, 0)
        self._stopped = False
        self.refused: str | None = None  # the broker's reason when it refused our CONNECT
        self._refused_event = threading.Event()

    # --- paho callbacks (network thread): enqueue only -------------------------------------
    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            # before the first connection start() raises it as an error; later it is news
            log.log(logging.WARNING if self.connects else logging.DEBUG, "%s: connection to %s refused: %s",
                    self.client_id, self.url, reason_code)
            self.refused = str(reason_code)
            self._refused_event.set()
            return
        for topic, qos in self.subscriptions:
            client.subscribe(topic, qos)
        self.connects += 1
        self.connected.set()
        log.debug("%s: connected to %s", self.client_id, self.url)
        if self._on_connect_hook is not None:
            self._on_connect_hook(self)

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self.connected.clear()
        if self._renew_will is not None and self._will is not None and not self._stopped:
            try:  # paho sends the will set now with its next CONNECT
                client.will_set(self._will[0], self._renew_will(), qos=self._will[2], retain=self._will[3])
            except Exception:  # never let a callback error stop the network thread
                log.exception("%s: could not renew the last will", self.client_id)
        if reason_code != 0:
            log.info("%s: disconnected (%s); reconnecting", self.client_id, reason_code)

    def _on_message(self, client, userdata, msg) -> None:
        self.inbox.put(msg.topic, bytes(msg.payload))  # over its budget: dropped and counted

    # --- API ---------------------------------------------------------------------------------
    def start(self, timeout: float = 30.0) -> None:
        """Connect and start the network thread. A refused TCP connection is retried until
        ``timeout`` (the broker may be starting); an unknown host, a TLS failure or a broker that
        refuses our credentials fail at once. Every failure is a one-line ``ConnectionError``."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                self._client.connect(self.url.host, self.url.port, keepalive=self.keepalive)
                break
            except socket.gaierror as exc:
                raise ConnectionError(f"MQTT broker {self.url}: unknown host ({exc.strerror})") from None
            except (ssl.SSLError, ConnectionResetError) as exc:
                if not self.url.tls and not isinstance(exc, ssl.SSLError):
                    raise ConnectionError(f"MQTT broker {self.url}: connection reset (a TLS port spoken "
                                          "to in plain MQTT? use mqtts://)") from None
                reason = getattr(exc, "reason", None) or exc.strerror or exc
                raise ConnectionError(f"MQTT broker {self.url}: TLS failed ({reason}); is it a TLS port, "
                                      "and does --ca-file sign its certificate?") from None
            except OSError as exc:
                if time.monotonic() > deadline:
                    raise ConnectionError(f"cannot reach MQTT broker {self.url}: "
                                          f"{exc.strerror or exc} (after {timeout:.0f} s)") from None
                time.sleep(0.5)
        self._client.loop_start()
        while not self.connected.wait(0.05):
            if self._refused_event.is_set() or time.monotonic() > deadline:
                self.stop(graceful=False)
                why = f"refused the connection: {self.refused}" if self.refused else \
                    "did not accept the connection (a TLS port spoken to in plain MQTT, or not a broker?)"
                raise ConnectionError(f"MQTT broker {self.url} {why}")

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False):
        return self._client.publish(topic, payload, qos=qos, retain=retain)

    def publish_all(self, topic: str, frames: list[bytes], qos: int = 1, timeout: float = 120.0) -> bool:
        """Publish chunk frames in order and wait until the broker has them (QoS 1 PUBACKs)."""
        infos = [self.publish(topic, f, qos) for f in frames]
        deadline = time.monotonic() + timeout
        for info in infos:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            try:
                info.wait_for_publish(left)
            except RuntimeError:  # not queued because disconnected: paho will not retry it
                return False
            if not info.is_published():
                return False
        return True

    def publish_until_acked(self, topic: str, frames: list[bytes], qos: int = 1, timeout: float = 120.0) -> bool:
        """:meth:`publish_all`, repeated after each reconnect until the broker has every frame or
        ``timeout`` passed: an update finished while the broker was away still arrives. A repeat
        the broker had already taken is harmless (the receiver drops duplicates)."""
        deadline = time.monotonic() + timeout
        while not self._stopped:
            left = deadline - time.monotonic()
            if left <= 0 or not self.connected.wait(left):
                return False
            if self.publish_all(topic, frames, qos, timeout=deadline - time.monotonic()):
                return True
            log.info("%s: publishing on %s did not complete; again after reconnecting", self.client_id, topic)
            time.sleep(0.2)  # the connection is going down: let paho notice before waiting on it
        return False

    def socket_bytes(self) -> tuple[int, int] | None:
        """(sent, received) bytes this session's TCP connections moved, from the kernel (TCP_INFO;
        all MQTT packets and TLS records, not TCP/IP headers), summed over reconnects; None where
        the platform has no such counters."""
        from .netstats import tcp_bytes

        sock = self._client.socket()
        now = tcp_bytes(sock) if sock is not None else None
        with self._sock_lock:
            if sock is not self._sock and self._sock_last is not None:  # reconnected: bank the old one
                self._sock_base = (self._sock_base[0] + self._sock_last[0], self._sock_base[1] + self._sock_last[1])
                self._sock_last = None
            self._sock = sock
            if now is None:
                return None if self._sock_last is None and self._sock_base == (0, 0) else self._sock_base
            self._sock_last = now
            return self._sock_base[0] + now[0], self._sock_base[1] + now[1]

    def subscribe(self, topic: str, qos: int = 1) -> None:
        self.subscriptions.append((topic, qos))
        if self.connected.is_set():
            self._client.subscribe(topic, qos)

    def stop(self, *, graceful: bool = True) -> None:
        self._stopped = True
        try:
            if graceful:
                self._client.disconnect()
        finally:
            self._client.loop_stop()
