"""``fedpara export RUN --web DIR``: the page runs the composed model with onnxruntime-web in a real
headless chromium with a phone's viewport and a throttled CPU, classifies its bundled test samples
(``?selftest``) exactly as onnxruntime does in Python, and works again offline once loaded."""
from __future__ import annotations

import json

import pytest
from conftest import fashion_mnist_available
from web_support import StaticServer, needs_web_assets, phone_browser, wait_for

import fedpara
from export.web import WebAssetsMissing, check_assets
from fedpara.models import ModelSpec
from fedpara.runtime.checkpoint import save_checkpoint
from fedpara.runtime.cli import main

SAMPLES = 60
DATA = "fashion-mnist,limit=500"


def trained_run(tmp_path, model="mlp", scheme="fedpara"):
    """A run directory whose checkpoint is a FedPara model trained a little on Fashion-MNIST."""
    from fedpara.data import load_client_data, parse_data_spec
    from fedpara.training import train_epochs

    spec = ModelSpec(model=model, scheme=scheme, ratio=0.3)
    net = spec.build(seed=0)
    train, _ = load_client_data(parse_data_spec("fashion-mnist,limit=2000"))
    train_epochs(net, train, epochs=1, batch_size=32, lr=0.05, seed=0)
    run = tmp_path / "run"
    save_checkpoint(run / "checkpoints" / "round-0001.safetensors", fedpara.global_state(net), spec,
                    round=1, accuracy=0.7)
    return run


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    needs_web_assets()
    if not fashion_mnist_available():
        pytest.skip("Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
    tmp = tmp_path_factory.mktemp("web")
    run = trained_run(tmp)
    out = tmp / "site"
    rc = main(["export", str(run), "--web", str(out), "--data", DATA, "--web-samples", str(SAMPLES), "--json"])
    assert rc == 0
    return out, json.loads((out / "model.json").read_text())


def test_export_writes_one_self_contained_directory(page):
    out, meta = page
    assert meta["format"] == "fedpara-web/1" and meta["spec"]["model"] == "mlp"
    assert meta["samples"]["count"] == SAMPLES and len(meta["samples"]["labels"]) == SAMPLES
    assert (out / "samples.f32").stat().st_size == SAMPLES * 784 * 4
    for name in meta["files"]:
        assert (out / name).is_file(), name
    assert {"index.html", "page.js", "sw.js", "model.onnx", "vendor/ort-wasm-simd-threaded.wasm"} <= set(meta["files"])
    # nothing on the page comes from another origin
    for name in ("index.html", "page.js", "sw.js"):
        text = (out / name).read_text()
        assert "http://" not in text and "https://" not in text, name
    # a trained model: well above chance on the bundled samples (onnxruntime in Python)
    assert meta["python_correct"] > SAMPLES // 2


@pytest.mark.browser
def test_selftest_in_a_throttled_phone_browser_then_offline(page, tmp_path):
    out, meta = page
    server = StaticServer(out)
    driver = None
    try:
        driver = phone_browser(tmp_path)
        driver.get(server.url + "index.html?selftest")
        text = wait_for(lambda: driver.execute_script(
            "const e = document.getElementById('selftest'); return e && e.dataset.total ? e.textContent : ''"),
            "the selftest result", driver=driver)
        assert text.startswith(f"{meta['python_correct']}/{SAMPLES} correct"), text
        assert driver.execute_script("return window.innerWidth") == 390  # the phone's viewport
        assert driver.execute_script("return window.fedparaSelftest.p50_ms") > 0
        # the service worker has cached every file of this export
        version = meta["version"]
        wait_for(lambda: driver.execute_async_script(
            "const done = arguments[arguments.length - 1];"
            f"caches.open('fedpara-web-{version}').then(c => c.keys()).then(k => done(k.length))")
            >= len(meta["files"]) + 2, "the offline cache", driver=driver)
        server.stop()
        server = None
        driver.get(driver.current_url)  # reload with the server gone: served by the service worker
        text = wait_for(lambda: driver.execute_script(
            "const e = document.getElementById('selftest'); return e && e.dataset.total ? e.textContent : ''"),
            "the selftest result offline", driver=driver)
        assert text.startswith(f"{meta['python_correct']}/{SAMPLES} correct"), text
    finally:
        if driver is not None:
            driver.quit()
        if server is not None:
            server.stop()


def test_missing_assets_name_the_fix(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FEDPARA_WEB_MODULES", str(tmp_path / "nowhere"))
    with pytest.raises(WebAssetsMissing, match="npm ci"):
        check_assets()
    spec = ModelSpec(model="mlp", scheme="lowrank", ratio=0.2)
    save_checkpoint(tmp_path / "run" / "checkpoints" / "round-0001.safetensors",
                    fedpara.global_state(spec.build()), spec, round=1)
    assert main(["export", str(tmp_path / "run"), "--web", str(tmp_path / "site")]) == 2
    assert "npm ci" in capsys.readouterr().err
    assert not (tmp_path / "site").exists() and not (tmp_path / "run" / "model.onnx").exists()


def test_char_lstm_is_refused(tmp_path):
    needs_web_assets()
    from export.web import write_web
    with pytest.raises(ValueError, match="char_lstm"):
        write_web(tmp_path / "m.onnx", ModelSpec(model="char_lstm", num_classes=80), tmp_path / "site")
