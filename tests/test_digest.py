"""Envelope digests: SHA-256 or BLAKE3 (flags bit 0), agreed per peer (docs/wire.md, Digests).

A BLAKE3 envelope must be exactly as safe as a SHA-256 one: tampering is caught by the decoder
and by the reassembler, the signature binds the algorithm, reserved flag bits are refused, an
installation without the blake3 package refuses BLAKE3 clearly, and a run never sends a BLAKE3
task to a client that did not announce it can check one.
"""
from __future__ import annotations


import pytest
import torch
from conftest import needs_fmnist
from support import Sniffer, coord_cfg, start_clients, wait_until

import fedpara.wire.digest as digest_module
from coordinator.server import Coordinator
from fedpara.models import ModelSpec
from fedpara.runtime.messages import Status, Task, TrainParams
from fedpara.runtime.mqtt import parse_broker_url
from fedpara.runtime.signing import AuthError, Signer, Verifier, load_private_key, load_public_key, new_key
from fedpara.wire.digest import EnvelopeHasher
from fedpara.wire import Message, Reassembler, WireError, decode, encode
from fedpara.wire.limits import ENVELOPE_FLAGS, FLAG_BLAKE3
from fedpara.wire.digest import digests_available

TENSORS = {"w": torch.randn(600, 500), "b": torch.randn(7)}


def _msg(**meta) -> Message:
    return Message("task", "run-1", 3, "coordinator", TENSORS, meta)


@pytest.mark.parametrize("digest", ["sha256", "blake3"])
def test_round_trip_and_tampering(digest):
    enc = encode(_msg(x=1), digest=digest)
    assert enc.data[ENVELOPE_FLAGS] == (FLAG_BLAKE3 if digest == "blake3" else 0)
    out = decode(enc.data)
    assert torch.equal(out.tensors["w"], TENSORS["w"]) and out.meta == {"x": 1}
    for pos in (25, 60, len(enc.data) // 2, len(enc.data) - 1):  # digest, header, tensor bytes
        bad = bytearray(enc.data)
        bad[pos] ^= 0x10
        with pytest.raises(WireError, match="mismatch|JSON"):
            decode(bad)


@pytest.mark.parametrize("digest", ["sha256", "blake3"])
def test_a_big_message_hashed_while_written_has_the_same_bytes(monkeypatch, digest):

    serial = encode(_msg(), digest=digest).data
    monkeypatch.setattr(EnvelopeHasher, "THREADED_HASH_BYTES", 1)  # the second thread's path
    assert encode(_msg(), digest=digest).data == serial


def test_the_two_digests_differ_and_name_the_algorithm_in_the_digested_bytes():
    a, b = encode(_msg(), digest="sha256").data, encode(_msg(), digest="blake3").data
    assert a[52:] == b[52:] and a[20:52] != b[20:52]
    swapped = bytearray(b)
    swapped[ENVELOPE_FLAGS] = 0  # BLAKE3 bytes read as SHA-256: the digest no longer matches
    with pytest.raises(WireError, match="sha256 mismatch"):
        decode(swapped)


def test_reserved_flag_bits_are_refused():
    for flags in (0x02, 0x80, FLAG_BLAKE3 | 0x04):
        bad = bytearray(encode(_msg()).data)
        bad[ENVELOPE_FLAGS] = flags
        with pytest.raises(WireError, match="unknown flags"):
            decode(bad)
    with pytest.raises(WireError, match="unknown envelope digest"):
        encode(_msg(), digest="md5")


@pytest.mark.parametrize("digest", ["sha256", "blake3"])
def test_reassembler_checks_either_digest_as_frames_arrive(digest):
    enc = encode(_msg(), digest=digest)
    frames, _ = enc.split(50_000, "fedpara/v1/run-1/task")
    assert len(frames) > 10
    r = Reassembler()
    out = [r.add(f) for f in frames][-1]
    assert r.checked(out) and decode(out, digest_checked=True).round == 3
    # a flipped tensor byte inside one frame: the whole message is refused when it completes
    bad = bytearray(frames[5])
    bad[-3] ^= 1
    r = Reassembler()
    with pytest.raises(WireError, match="do not match the digest"):
        for f in frames[:5] + [bytes(bad)] + frames[6:]:
            r.add(f)
    assert r.rejected == 1 and r.partial_messages == 0
    # one frame with reserved flags: refused while hashing, nothing kept
    head = bytearray(frames[0])
    head[70 + ENVELOPE_FLAGS] = 0x40
    r = Reassembler()
    with pytest.raises(WireError, match="unknown envelope flags"):
        r.add(bytes(head))
    assert r.rejected == 1 and r.partial_messages == 0


def test_signature_binds_the_digest_algorithm(tmp_path):
    new_key("coordinator", tmp_path)
    signer = Signer(load_private_key(tmp_path / "coordinator.key"), "coordinator")
    verifier = Verifier({"coordinator": load_public_key(tmp_path / "coordinator.pub")})
    enc = signer.seal(_msg(), digest="blake3")
    assert verifier.open(enc.data, sender="coordinator").round == 3
    for flags in (0, 0x02):
        bad = bytearray(enc.data)
        bad[ENVELOPE_FLAGS] = flags
        with pytest.raises(AuthError, match="does not verify"):
            verifier.open(bad, sender="coordinator")


def test_without_the_blake3_package_blake3_is_refused_clearly(monkeypatch):
    enc = encode(_msg(), digest="blake3")
    monkeypatch.setattr(digest_module, "_blake3", lambda: None)
    assert digests_available() == ("sha256",)
    with pytest.raises(WireError, match="pip install blake3"):
        encode(_msg(), digest="blake3")
    with pytest.raises(WireError, match="pip install blake3"):
        decode(enc.data)
    assert decode(encode(_msg()).data).round == 3  # SHA-256 still works


def test_status_and_task_carry_the_digests():
    s = Status.from_meta(Status("online", digests=("sha256", "blake3")).to_meta())
    assert s.digests == ("sha256", "blake3")
    # an old client says nothing: SHA-256 only; junk and unknown names are dropped
    assert Status.from_meta({"state": "online"}).digests == ("sha256",)
    assert Status.from_meta({"state": "online", "digests": ["blake7", 3, "blake3"]}).digests == ("sha256", "blake3")
    assert Status.from_meta({"state": "online", "digests": "blake3"}).digests == ("sha256",)
    task = Task("t-1", ("c0",), ModelSpec(model="mlp"), TrainParams(), digest="blake3")
    assert Task.from_meta(task.to_meta()).digest == "blake3"
    # an old coordinator's task, or a digest this version does not know: SHA-256
    meta = task.to_meta()
    del meta["digest"]
    assert Task.from_meta(meta).digest == "sha256"
    assert Task.from_meta({**task.to_meta(), "digest": "sha3"}).digest == "sha256"


def _digests_seen(sniffer: Sniffer) -> dict[str, set[int]]:
    """Topic kind or sender -> the flags bytes of the reassembled envelopes the broker carried."""
    seen: dict[str, set[int]] = {}
    reassembler = Reassembler()
    for topic, payload in sniffer.messages:
        if "/task" not in topic and "/update/" not in topic:
            continue
        data = reassembler.add(payload)
        if data is not None and len(data) > 100_000:  # tasks and updates, not the small reports
            key = "task" if "/task" in topic else topic.rsplit("/", 1)[1]
            seen.setdefault(key, set()).add(data[ENVELOPE_FLAGS])
    return seen


@needs_fmnist
@pytest.mark.parametrize("legacy", [False, True])
def test_a_run_uses_blake3_only_with_peers_that_announced_it(mosquitto_broker, tmp_path, legacy):
    cfg = coord_cfg(tmp_path, rounds=1, scheme="dense")  # dense: updates well above 100 kB
    sniffer = Sniffer(mosquitto_broker, cfg.run_id)

    def version(client):  # legacy: c2 is of a version without BLAKE3 (announces and answers SHA-256)
        if legacy and client.cfg.client_id == "c2":
            client.digests = client.runner.digests = ("sha256",)

    clients = []
    try:
        clients = start_clients(mosquitto_broker, cfg, tmp_path, 3, before_start=version)
        summary = Coordinator(cfg, parse_broker_url(mosquitto_broker)).run()
        # every update the broker carried has reached the sniffer too
        wait_until(lambda: {"task", "c0", "c1", "c2"} <= set(_digests_seen(sniffer)), what="the sniffed envelopes")
    finally:
        for c in clients:
            c.stop()
        sniffer.stop()
    assert summary["status"] == "completed"
    seen = _digests_seen(sniffer)
    if legacy:  # the broadcast task reaches a client that cannot check BLAKE3: SHA-256
        assert seen["task"] == {0}
        assert seen["c2"] == {0}  # it answers in SHA-256; the others as the task asks
    else:
        assert seen["task"] == {FLAG_BLAKE3} and seen["c2"] == {FLAG_BLAKE3}
    assert seen["c0"] == seen["c1"] == {FLAG_BLAKE3}


def test_the_coordinator_digest_setting_is_checked():
    from coordinator.config import CoordinatorConfig

    assert CoordinatorConfig(insecure=True).digest == "auto"
    with pytest.raises(ValueError, match="digest: must be one of auto, sha256"):
        CoordinatorConfig(insecure=True, digest="md5")
