"""Shared fixtures. Tests run single-threaded: on 2 cores, torch threads fight other processes."""
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


# --- brokers ------------------------------------------------------------------------------------
import subprocess  # noqa: E402

from support import MOSQUITTO, start_mosquitto  # noqa: E402,F401  (tests import them from here)


@pytest.fixture
def amqtt_broker():
    """The embedded amqtt broker on a free loopback port (in this process, on its own thread)."""
    from coordinator.broker import EmbeddedBroker

    with EmbeddedBroker() as broker:
        yield broker.url


@pytest.fixture
def mosquitto_broker(tmp_path):
    """A real Mosquitto started as a subprocess on a free loopback port (skipped if not installed)."""
    if MOSQUITTO is None:
        pytest.skip("mosquitto is not installed (apt-get install mosquitto)")
    proc, url = start_mosquitto(tmp_path)
    try:
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(params=["amqtt", "mosquitto"])
def any_broker(request):
    return request.getfixturevalue(f"{request.param}_broker")


def fashion_mnist_available() -> bool:
    try:
        from fedpara.data import find_fashion_mnist
        find_fashion_mnist()
        return True
    except (FileNotFoundError, ValueError):
        return False


needs_fmnist = pytest.mark.skipif(not fashion_mnist_available(),
                                  reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")


# --- markers (registered in pyproject.toml) -------------------------------------------------------
# ``broker``: the test runs an MQTT broker (a fixture above, its own Mosquitto, or CLI processes that
# start one). Tagged here, at collection, from the fixtures a test asks for and the helpers its body
# calls, so that a new test cannot forget it: ``pytest -m "not broker"`` runs the rest in seconds.
# ``browser`` and ``slow`` are written on the tests themselves.
_BROKER_FIXTURES = {"amqtt_broker", "mosquitto_broker", "any_broker"}
_BROKER_CALLS = ("start_mosquitto(", "start_bridged_brokers(", "EmbeddedBroker(", '"demo"', '"broker"', "netns.")


def _starts_a_broker(item) -> bool:
    import inspect

    if any(name in _BROKER_FIXTURES or name.endswith(("_broker", "_brokers")) for name in item.fixturenames):
        return True
    try:
        source = inspect.getsource(item.function)
    except (OSError, TypeError):
        return False
    return any(call in source for call in _BROKER_CALLS)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if _starts_a_broker(item):
            item.add_marker(pytest.mark.broker)
