"""``fedpara demo --web-clients N``: one of the demo's three clients is a headless-chromium page
on the embedded broker's websockets listener; the signed run completes with all three."""
from __future__ import annotations

import json

import pytest
from conftest import fashion_mnist_available

from fedpara.runtime.webassets import WebAssetsMissing
from fedpara.runtime.cli import main
from fedpara.runtime.rundir import RunDir

pytestmark = pytest.mark.skipif(not fashion_mnist_available(),
                                reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")


@pytest.mark.browser
@pytest.mark.slow
def test_demo_with_a_browser_client(tmp_path, capsys):
    import shutil
    if shutil.which("chromium") is None:
        pytest.skip("chromium is not installed (apt-get install chromium)")
    try:
        from edge_client.web.site import vendor_files
        vendor_files()
    except WebAssetsMissing as exc:
        pytest.skip(str(exc))
    out = tmp_path / "demo"
    rc = main(["demo", "--clients", "3", "--web-clients", "1", "--model", "mlp", "--rounds", "2",
               "--limit", "150", "--out", str(out)])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "1 browser client(s) in headless chromium" in text
    rows = RunDir(out).read_metrics()
    assert [r["round"] for r in rows] == [1, 2]
    for r in rows:
        assert sorted(r["clients"]) == ["client-0", "client-1", "client-2"]
        assert r["client_metrics"]["client-2"]["steps"] == 5  # 150 examples, batch 32
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert "round 2 done" in (out / "logs" / "client-2.log").read_text(errors="replace")  # the page's console


def test_web_clients_flag_is_checked(tmp_path, capsys):
    assert main(["demo", "--clients", "2", "--web-clients", "3", "--out", str(tmp_path / "d")]) == 2
    assert "--web-clients must be in 0..--clients (2)" in capsys.readouterr().err
    assert main(["demo", "--web-clients", "1", "--broker", "mqtt://127.0.0.1:1", "--out", str(tmp_path / "d")]) == 2
    assert "--web-broker" in capsys.readouterr().err
