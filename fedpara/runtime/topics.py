"""MQTT topic layout of protocol v1 (docs/protocol.md). Both sides build topics only here.

    fedpara/v1/<run>/status/<client>     client -> all     retained presence (+ last will: offline)
    fedpara/v1/<run>/coordinator         coordinator       retained presence (+ last will)
    fedpara/v1/<run>/task                coordinator -> sampled clients, fan-out by the broker
    fedpara/v1/<run>/task/<client>       coordinator -> one client (when only some are sampled)
    fedpara/v1/<run>/update/<client>     client -> coordinator (chunked factor updates)
    fedpara/v1/<run>/control             coordinator -> all (finish)
"""
from __future__ import annotations

import re

PREFIX = "fedpara/v1"
_ID = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def check_id(what: str, value: str) -> str:
    """Run and client ids become topic levels: no wildcards, separators or empty strings."""
    if not isinstance(value, str) or not _ID.match(value):
        raise ValueError(f"{what} must be 1-64 characters of [A-Za-z0-9_.-], got {value!r}")
    return value


class Topics:
    def __init__(self, run_id: str) -> None:
        self.run = check_id("run_id", run_id)
        self.base = f"{PREFIX}/{run_id}"
        self.coordinator = f"{self.base}/coordinator"
        self.task = f"{self.base}/task"
        self.control = f"{self.base}/control"
        self.status_all = f"{self.base}/status/+"
        self.update_all = f"{self.base}/update/+"

    def status(self, client: str) -> str:
        return f"{self.base}/status/{client}"

    def task_for(self, client: str) -> str:
        return f"{self.base}/task/{client}"

    def update(self, client: str) -> str:
        return f"{self.base}/update/{client}"

    def client_of(self, topic: str) -> str | None:
        """The client id a status/update topic names, or None for anything else."""
        head, _, client = topic.rpartition("/")
        if head in (f"{self.base}/status", f"{self.base}/update", f"{self.base}/task") and _ID.match(client):
            return client
        return None
