"""Where the browser pieces' npm packages are, for both apps that serve them (the export's model
page, ``export/web.py``, and the browser client, ``edge_client/web/site.py``), without either
importing the other (docs/architecture.md, rule 4).

``npm ci`` in ``edge_client/web`` (``.ci/setup`` runs it) installs them into its ``node_modules``;
``$FEDPARA_WEB_MODULES`` names another ``node_modules`` directory. Nothing here needs node.
"""
from __future__ import annotations

import os
from pathlib import Path

WEB_ROOT = Path(__file__).resolve().parents[2] / "edge_client" / "web"  # package.json, the lockfile
MODULES_ENV = "FEDPARA_WEB_MODULES"


class WebAssetsMissing(FileNotFoundError):
    """npm packages a page needs are not installed; the message names the fix."""


def node_modules() -> Path:
    """``$FEDPARA_WEB_MODULES`` or ``edge_client/web/node_modules``."""
    env = os.environ.get(MODULES_ENV)
    return Path(env) if env else WEB_ROOT / "node_modules"


def require(paths: list[Path], what: str) -> list[Path]:
    """``paths`` if every one is a file, else WebAssetsMissing saying how to install them."""
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise WebAssetsMissing(
            f"{what} needs npm packages that are not installed ({missing[0]} is missing); run `npm ci` in "
            f"{WEB_ROOT} (bash .ci/setup does it when node and npm are present; apt-get install nodejs npm), "
            f"or set {MODULES_ENV} to a node_modules directory holding them")
    return paths
