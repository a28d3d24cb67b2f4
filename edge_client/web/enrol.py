"""Enrolling phones: one-time links the operator hands out and can revoke (docs/mobile.md).

The operator makes the phone's identity as for any device (``fedpara keys new phone-1 --dir
keys``), then ``fedpara web enrol phone-1 ...``: a random one-time code (128 bits) is stored
hashed in ``STORE/phone-1.json`` with what the phone needs (broker URL, run, the paths of its key
and of the coordinator's public key, its data bundle), and the link ``URL/app.html#enrol=CODE``
is printed. The code travels in the URL fragment, which browsers never send to a server or put in
a Referer. The phone's page POSTs it to ``/enrol`` once: the server answers with the phone's
configuration, its private key included, and marks the code used; a second use, an expired code
or a revoked enrolment is refused. ``fedpara web revoke phone-1`` kills an unused link and, with
``--trusted-keys``, moves ``phone-1.pub`` out of the coordinator's trust directory into
``revoked/`` there: every coordinator started from then on refuses the phone's messages.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import threading
import time
from pathlib import Path

from fedpara.runtime.topics import check_id

log = logging.getLogger(__name__)

DEFAULT_TTL_S = 24 * 3600.0


class EnrolError(ValueError):
    """An enrolment request that must be refused; ``status`` is the HTTP status to answer."""

    def __init__(self, message: str, status: int = 403) -> None:
        super().__init__(message)
        self.status = status


def _digest(code: str) -> str:
    return hashlib.sha256(code.encode()).hexdigest()


def read_credentials(path: str | os.PathLike, client_id: str) -> dict:
    """{"username", "password"} from a ``FEDPARA_MQTT_USERNAME=`` / ``FEDPARA_MQTT_PASSWORD=`` file
    (a directory: its ``<client_id>.env``). The username must be the client id (the ACL's %u)."""
    p = Path(path)
    if p.is_dir():
        p = p / f"{client_id}.env"
    if not p.is_file():
        raise FileNotFoundError(f"--credentials: {p} does not exist (fedpara broker-acl {client_id} ... writes it)")
    values = dict(line.split("=", 1) for line in p.read_text().splitlines() if "=" in line)
    user, password = values.get("FEDPARA_MQTT_USERNAME", ""), values.get("FEDPARA_MQTT_PASSWORD", "")
    if user != client_id or not password:
        raise ValueError(f"--credentials: {p} must hold FEDPARA_MQTT_USERNAME={client_id} and a FEDPARA_MQTT_PASSWORD")
    return {"username": user, "password": password}


class EnrolStore:
    """Pending, used and revoked enrolments: one JSON file per phone in ``directory``."""

    def __init__(self, directory: str | os.PathLike, clock=time.time) -> None:
        self.dir, self.clock = Path(directory), clock
        self._lock = threading.Lock()

    def _path(self, client_id: str) -> Path:
        return self.dir / f"{check_id('client id', client_id)}.json"

    def _write(self, record: dict) -> None:
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        path = self._path(record["client_id"])
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(record, f, indent=1)
        os.replace(tmp, path)

    def create(self, client_id: str, *, run: str, broker: str, key: str | os.PathLike,
               coordinator_pub: str | os.PathLike, data_url: str | None = None, ttl_s: float = DEFAULT_TTL_S,
               insecure: bool = False, heartbeat_s: float = 10.0, backend: str = "auto",
               credentials: str | os.PathLike | None = None) -> str:
        """A new one-time code for ``client_id`` (replacing an unused one); returns the code.
        ``credentials``: the phone's MQTT username/password file (``fedpara broker-acl``'s
        ``credentials/<client>.env``), handed to the phone with its key."""
        check_id("run", run)
        if not broker.startswith(("ws://", "wss://")):
            raise ValueError(f"--broker: a browser reaches MQTT over WebSockets: ws://HOST:PORT or wss://HOST:PORT, "
                             f"got {broker!r}")
        if ttl_s <= 0:
            raise ValueError(f"--ttl must be > 0 seconds, got {ttl_s}")
        if not insecure:
            from fedpara.runtime.signing import check_identity, load_private_key, load_public_key
            check_identity(key, client_id, load_private_key(key))  # the right phone's key, not readable by others
            load_public_key(coordinator_pub)
        mqtt_user = read_credentials(credentials, client_id) if credentials is not None else None
        code = secrets.token_urlsafe(16)
        now = self.clock()
        self._write({"client_id": client_id, "run": run, "broker": broker, "insecure": insecure,
                     "key": None if insecure else str(Path(key).resolve()),
                     "coordinator_pub": None if insecure else str(Path(coordinator_pub).resolve()),
                     "data_url": data_url, "heartbeat_s": heartbeat_s, "backend": backend, "mqtt": mqtt_user,
                     "code_sha256": _digest(code), "created": now, "expires": now + ttl_s, "used": None,
                     "revoked": None})
        return code

    def records(self) -> list[dict]:
        if not self.dir.is_dir():
            return []
        return [json.loads(p.read_text()) for p in sorted(self.dir.glob("*.json"))]

    def redeem(self, code: str) -> dict:
        """The configuration a phone gets for its code, once. EnrolError for anything else."""
        if not isinstance(code, str) or not 8 <= len(code) <= 64:
            raise EnrolError("malformed enrolment code", 400)
        want = _digest(code)
        with self._lock:
            for rec in self.records():
                if not secrets.compare_digest(rec["code_sha256"], want):
                    continue
                if rec["revoked"]:
                    raise EnrolError("this enrolment was revoked by the operator")
                if rec["used"]:
                    raise EnrolError("this enrolment link was used already: ask the operator for a new one")
                if self.clock() > rec["expires"]:
                    raise EnrolError("this enrolment link has expired: ask the operator for a new one")
                config = {"client_id": rec["client_id"], "run": rec["run"], "broker": rec["broker"],
                          "insecure": rec["insecure"], "heartbeat_s": rec["heartbeat_s"], "backend": rec["backend"]}
                if rec["data_url"]:
                    config["data_url"] = rec["data_url"]
                if rec.get("mqtt"):
                    config.update(rec["mqtt"])
                if not rec["insecure"]:
                    config["key_pem"] = Path(rec["key"]).read_text()
                    config["coordinator_pub_pem"] = Path(rec["coordinator_pub"]).read_text()
                rec["used"] = self.clock()
                self._write(rec)
                log.info("enrolled %s", rec["client_id"])
                return config
        raise EnrolError("unknown enrolment code", 404)

    def revoke(self, client_id: str, trusted_keys: str | os.PathLike | None = None) -> list[str]:
        """Kill the phone's link and, given the coordinator's trust directory, take its key out of
        it (into ``revoked/``). Returns what was done, for the operator."""
        done = []
        with self._lock:
            path = self._path(client_id)
            if path.is_file():
                rec = json.loads(path.read_text())
                rec["revoked"] = self.clock()
                self._write(rec)
                done.append(f"enrolment of {client_id} revoked" + ("" if rec["used"] else " (its link was unused)"))
        if trusted_keys is not None:
            pub = Path(trusted_keys) / f"{client_id}.pub"
            if pub.is_file():
                dest = Path(trusted_keys) / "revoked"
                dest.mkdir(exist_ok=True)
                os.replace(pub, dest / pub.name)
                done.append(f"{pub} moved to {dest}/: coordinators started from now on refuse {client_id}")
            else:
                done.append(f"{pub} was not trusted")
        if not done:
            raise ValueError(f"nothing to revoke for {client_id}: no enrolment in {self.dir} and no --trusted-keys")
        return done
