"""Broker-level defence for a fleet: a Mosquitto password file and ACL (docs/security.md).

Each device gets an MQTT user named after its client id and a random password; the ACL lets it
publish only its own ``status/<id>`` and ``update/<id>`` and read only the tasks (fan-out and its
own), ``control`` and the coordinator's status. Only the coordinator user publishes tasks, control
and its status, and reads statuses and updates. Passwords are stored as Mosquitto 2's ``$7$``
hashes (PBKDF2-HMAC-SHA512, the format ``mosquitto_passwd`` writes) via hashlib; the clear
passwords go to one 0600 ``credentials/<user>.env`` file per user, to copy onto that machine.
"""
from __future__ import annotations

import base64
import hashlib
import os
import secrets
from pathlib import Path

from fedpara.runtime.topics import PREFIX, check_id

ITERATIONS = 1000


def password_hash(password: str, *, salt: bytes | None = None, iterations: int = ITERATIONS) -> str:
    """Mosquitto 2 password-file hash: ``$7$<iterations>$<b64 salt>$<b64 PBKDF2-SHA512>``."""
    salt = secrets.token_bytes(12) if salt is None else salt
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def acl_text(run: str = "+", coordinator: str = "coordinator") -> str:
    """The ACL: ``run`` is one run id, or ``+`` for every run on this broker."""
    base = f"{PREFIX}/{run}"
    return "\n".join([
        "# fedpara fleet ACL (docs/security.md); %u is the MQTT username = the client id",
        f"user {coordinator}",
        f"topic write {base}/task",
        f"topic write {base}/task/+",
        f"topic write {base}/control",
        f"topic readwrite {base}/coordinator",
        f"topic read {base}/status/+",
        f"topic read {base}/update/+",
        "",
        f"pattern readwrite {base}/status/%u",
        f"pattern write {base}/update/%u",
        f"pattern read {base}/task",
        f"pattern read {base}/task/%u",
        f"pattern read {base}/control",
        f"pattern read {base}/coordinator",
        "",
    ])


def write_fleet(out: str | os.PathLike, clients: list[str], *, run: str = "+",
                coordinator: str = "coordinator") -> dict[str, str]:
    """OUT/passwd, OUT/acl, OUT/mosquitto.conf (the lines to include) and OUT/credentials/<user>.env;
    returns {user: password}."""
    if run != "+":
        check_id("run", run)
    users = [check_id("coordinator user", coordinator)] + [check_id("client id", c) for c in clients]
    if len(set(users)) != len(users):
        raise ValueError(f"clients: duplicate or reserved ids in {users}")
    d = Path(out)
    (d / "credentials").mkdir(parents=True, exist_ok=True)
    passwords = {u: secrets.token_urlsafe(18) for u in users}
    _write_private(d / "passwd", "".join(f"{u}:{password_hash(p)}\n" for u, p in passwords.items()))
    (d / "acl").write_text(acl_text(run, coordinator))
    (d / "mosquitto.conf").write_text(f"allow_anonymous false\npassword_file {d.resolve() / 'passwd'}\n"
                                      f"acl_file {d.resolve() / 'acl'}\n")
    for u, p in passwords.items():
        _write_private(d / "credentials" / f"{u}.env", f"FEDPARA_MQTT_USERNAME={u}\nFEDPARA_MQTT_PASSWORD={p}\n")
    return passwords


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(path, 0o600)
