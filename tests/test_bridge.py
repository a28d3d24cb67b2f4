"""Beyond one broker: clients on a site Mosquitto bridged to a central one (docs/brokers.md).

The coordinator connects to the central broker, the clients to the site broker; the site broker
bridges ``fedpara/v1/#`` both ways. The run completes, and the brokers' logs say what each hop
carried: the task crosses the bridge once per round and the site broker fans it out.
"""
from __future__ import annotations

import os
import time

import pytest
from conftest import needs_fmnist
from support import MOSQUITTO, coord_cfg, publish_bytes_by_peer, start_bridged_brokers, start_clients

from coordinator.server import Coordinator
from fedpara.runtime.mqtt import parse_broker_url
from fedpara.runtime.rundir import read_json_lines

pytestmark = [needs_fmnist, pytest.mark.skipif(MOSQUITTO is None, reason="mosquitto is not installed")]

BRIDGE_ID = "site-bridge"


def test_a_run_through_a_site_broker_bridged_to_a_central_one(tmp_path):
    (central, cport), (site, sport) = start_bridged_brokers(tmp_path, BRIDGE_ID)
    try:
        cfg = coord_cfg(tmp_path, rounds=2)
        clients = start_clients(f"mqtt://127.0.0.1:{sport}", cfg, tmp_path, 3)
        try:
            summary = Coordinator(cfg, parse_broker_url(f"mqtt://127.0.0.1:{cport}")).run()
        finally:
            for c in clients:
                c.stop()
        time.sleep(0.5)  # let both brokers write their last log lines
    finally:
        for proc in (site, central):
            proc.terminate()
            proc.wait(10)
    assert summary["status"] == "completed"
    rows = read_json_lines(tmp_path / "run" / "metrics.jsonl")
    assert [r["replied"] for r in rows] == [3, 3]
    task_topic = f"fedpara/v1/{cfg.run_id}/task"
    wan = publish_bytes_by_peer((tmp_path / "central" / "mosquitto.log").read_text())
    lan = publish_bytes_by_peer((tmp_path / "site" / "mosquitto.log").read_text())
    one_copy = [r["bytes_down"] // 3 for r in rows]  # payload bytes of one task copy, per round
    # the WAN hop (central -> site) carried each round's task once; the site broker sent it 3 times
    wan_down = wan["tx"][BRIDGE_ID].get(task_topic, 0)
    lan_down = sum(v.get(task_topic, 0) for peer, v in lan["tx"].items() if peer != BRIDGE_ID)
    assert sum(one_copy) <= wan_down < 1.01 * sum(one_copy)
    assert lan_down == pytest.approx(3 * wan_down, rel=0.001)
    # the updates crossed the bridge once each: what the coordinator accepted, byte for byte
    up_topics = {f"fedpara/v1/{cfg.run_id}/update/c{i}" for i in range(3)}
    wan_up = sum(n for t, n in wan["rx"][BRIDGE_ID].items() if t in up_topics)
    lan_up = sum(n for peer, v in lan["rx"].items() if peer != BRIDGE_ID for t, n in v.items() if t in up_topics)
    assert wan_up == lan_up and wan_up >= sum(r["bytes_up"] for r in rows)
    # what the coordinator counted on its own connection matches what the central broker sent it
    coord_rx = sum(n for peer, v in wan["tx"].items() if peer.startswith("coordinator-")
                   for t, n in v.items() if t in up_topics)
    assert coord_rx == wan_up
    assert os.path.exists(summary["checkpoint"])
