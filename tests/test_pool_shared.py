"""A client pool checks a broadcast task once: equal bytes share the verdict, anything else is
checked in full, and each client still refuses replays on its own (edge_client/shared.py)."""
import threading

import pytest
import torch

from edge_client.config import ClientConfig
from edge_client.pool import ClientPool, pool_configs
from edge_client.pool_verify import SharedVerified
from fedpara.runtime.mqtt import parse_broker_url
from fedpara.runtime.signing import AuthError, endpoints, load_public_key, new_key
from fedpara.wire import Limits, Message, MessageKind, WireError

torch.set_num_threads(1)


@pytest.fixture
def keys(tmp_path):
    for name in ("coordinator", "intruder"):
        new_key(name, tmp_path)
    return tmp_path


class Counting:
    """A client's verifier that counts full checks."""

    def __init__(self, keys):
        _, self.inner = endpoints("c", insecure=False, key_path=keys / "intruder.key",
                                  trusted={"coordinator": load_public_key(keys / "coordinator.pub")})
        self.full = 0

    def open(self, *a, **kw):
        self.full += 1
        return self.inner.open(*a, **kw)

    def admit(self, *a, **kw):
        return self.inner.admit(*a, **kw)


def _task(keys, sender="coordinator", key="coordinator"):
    seal, _ = endpoints(sender, insecure=False, key_path=keys / f"{key}.key", trusted={})
    state = {"w": torch.randn(64, 32), "b": torch.zeros(64)}
    return seal.seal(Message(MessageKind.TASK, "run", 1, sender, state, {"task_id": "t-1-1"})), state


def test_equal_bytes_are_checked_once_and_each_client_keeps_its_own_replay_check(keys):
    enc, state = _task(keys)
    shared, a, b = SharedVerified(), Counting(keys), Counting(keys)
    first = shared.open(bytes(enc.data), a, Limits(), sender="coordinator")
    second = shared.open(bytes(enc.data), b, Limits(), sender="coordinator")
    assert (a.full, b.full, shared.misses, shared.hits) == (1, 0, 1, 1)
    assert second.tensors is first.tensors and torch.equal(second.tensors["w"], state["w"])
    with pytest.raises(AuthError, match="replayed"):  # b accepted it once already
        shared.open(bytes(enc.data), b, Limits(), sender="coordinator")
    with pytest.raises(AuthError, match="bad_signature"):  # the sender a client expects is checked too
        shared.open(bytes(enc.data), Counting(keys), Limits(), sender="someone-else")


def test_bytes_that_differ_take_the_full_path(keys):
    enc, _ = _task(keys)
    shared, a, b = SharedVerified(), Counting(keys), Counting(keys)
    shared.open(bytes(enc.data), a, Limits(), sender="coordinator")
    tampered = bytearray(enc.data)
    tampered[-100] ^= 0xFF  # same claimed digest, one body byte changed: not the verified bytes
    with pytest.raises((AuthError, WireError)):
        shared.open(bytes(tampered), b, Limits(), sender="coordinator")
    assert b.full == 1
    forged, _ = _task(keys, key="intruder")  # signed by the wrong key: refused, and never cached
    c, d = Counting(keys), Counting(keys)
    for client in (c, d):
        with pytest.raises(AuthError, match="bad_signature"):
            shared.open(bytes(forged.data), client, Limits(), sender="coordinator")
    assert (c.full, d.full) == (1, 1)


def test_concurrent_clients_wait_for_one_check(keys):
    enc, _ = _task(keys)
    data = bytes(enc.data)
    shared = SharedVerified()
    clients = [Counting(keys) for _ in range(8)]
    gate, out = threading.Barrier(len(clients)), []

    def run(client):
        gate.wait()
        out.append(shared.open(data, client, Limits(), sender="coordinator"))

    threads = [threading.Thread(target=run, args=(c,)) for c in clients]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(out) == 8 and sum(c.full for c in clients) == 1 and (shared.misses, shared.hits) == (1, 7)


def test_pool_shares_only_between_clients_that_trust_the_same_keys(tmp_path):
    base = ClientConfig(client_id="p", run_id="r", data="synthetic,n=64,shape=1x28x28,classes=10,clients=4",
                        state_dir=str(tmp_path), energy="off", insecure=True)
    url = parse_broker_url("mqtt://127.0.0.1:1")
    configs = pool_configs(base, 4)
    pool = ClientPool(configs, url)
    assert pool.shared is not None and all(c.shared is pool.shared for c in pool.clients)
    configs[1] = ClientConfig(**{**configs[1].__dict__, "max_message_age_s": 60.0})
    assert ClientPool(configs, url).shared is None


def test_one_client_of_the_pool_hashes_the_task_as_it_arrives(keys):
    from fedpara.wire import Reassembler

    enc, state = _task(keys)
    shared = SharedVerified()
    frames, _ = enc.split(2000, "fedpara/v1/run/task")
    first, second = (Reassembler(hash_envelope=shared.claim) for _ in range(2))
    a = [x for x in map(first.add, frames) if x is not None][0]
    b = [x for x in map(second.add, frames) if x is not None][0]
    assert first.checked(a) and not second.checked(b)  # only the claimant hashed
    ca, cb = Counting(keys), Counting(keys)
    ma = shared.open(a, ca, Limits(), sender="coordinator", digest_checked=True, alias=True)
    mb = shared.open(b, cb, Limits(), sender="coordinator", alias=True)
    assert (ca.full, cb.full, shared.hits) == (1, 0, 1) and torch.equal(mb.tensors["w"], state["w"])
    assert ma.tensors is mb.tensors
    # the client that did not hash got different bytes: compared, refused by the full check
    enc2, _ = _task(keys)
    frames2, _ = enc2.split(2000, "fedpara/v1/run/task")
    tampered = bytearray(frames2[-1])
    tampered[-100] ^= 0xFF
    one, two = (Reassembler(hash_envelope=shared.claim) for _ in range(2))
    good = [x for x in map(one.add, frames2) if x is not None][0]
    bad = [x for x in map(two.add, [*frames2[:-1], bytes(tampered)]) if x is not None][0]
    shared.open(good, Counting(keys), Limits(), sender="coordinator", digest_checked=one.checked(good), alias=True)
    with pytest.raises(WireError, match="sha256"):
        shared.open(bad, Counting(keys), Limits(), sender="coordinator", alias=True)
