"""Shakespeare: play parsing into roles, fixed vocabulary, 80-char windows, natural clients."""

import numpy as np
import pytest
import torch

from fedpara.data import shakespeare as sh
from fedpara.data.loaders import load_client_data, load_client_test, load_test_data

torch.set_num_threads(1)

MODERN = """THE TRAGEDY OF TESTING

PERSONS REPRESENTED.

ACT I. Scene I.

HAMLET.
To be, or not to be, that is the question:
Whether 'tis nobler in the mind to suffer
[Aside.] The slings and arrows of outrageous fortune,

Hor.
So have I heard, and do in part believe it.

[Exit Ghost.]

FIRST CLOWN.
Is she to be buried in Christian burial when she wilfully seeks her own salvation?

HAMLET.
Alas, poor Yorick! I knew him, Horatio: a fellow of infinite jest, of most excellent fancy.
"""

FOLIO = """The Tragedie of Testing

   Ham. To be, or not to be, that is the Question:
Whether 'tis Nobler in the minde to suffer
The Slings and Arrowes of outragious Fortune

   Hor. So haue I heard, and do in part beleeue it.

   Ham. Alas poore Yorick, I knew him Horatio
"""


def test_parse_modern_layout():
    roles = sh.parse_play(MODERN)
    assert set(roles) == {"HAMLET", "Hor", "FIRST CLOWN"}
    assert roles["HAMLET"].startswith("To be, or not to be, that is the question: Whether")
    assert "[Aside.]" not in roles["HAMLET"] and "Yorick" in roles["HAMLET"]
    assert roles["Hor"] == "So have I heard, and do in part believe it."


def test_parse_folio_layout():
    roles = sh.parse_play(FOLIO)
    assert set(roles) == {"Ham", "Hor"}
    assert roles["Ham"].endswith("outragious Fortune Alas poore Yorick, I knew him Horatio")


def test_vocab_and_windows():
    assert sh.VOCAB_SIZE == 96 and sh.VOCAB[0] == " " and "~" in sh.VOCAB
    ids = sh.encode("Ab~\té")
    assert ids.dtype == np.int64 and ids[-1] == sh.UNKNOWN and ids[-2] == sh.UNKNOWN
    assert sh.decode(sh.encode("Hello, world!")) == "Hello, world!"
    text = "".join(chr(32 + i % 90) for i in range(100))
    x, y = sh.char_windows(text)
    assert x.shape == (20, 80) and y.shape == (20,)
    assert sh.decode(x[3]) == text[3:83] and sh.decode([y[3]]) == text[83]


@pytest.fixture
def plays(tmp_path):
    d = tmp_path / "texts"
    d.mkdir()
    (d / "testing_gut.txt").write_text(MODERN * 3)
    (d / "testing_gut_f.txt").write_text(FOLIO)  # folio copy: skipped when modern files exist
    (d / "metadata.txt").write_text("[testing_gut]\ntitle = Testing\n")
    return d


def test_roles_and_split(plays):
    roles = sh.load_roles(plays)
    assert list(roles) == ["testing_FIRST_CLOWN", "testing_HAMLET", "testing_HOR"]
    x_tr, y_tr, used = sh.load_shakespeare("train", plays, roles=["testing_HAMLET"])
    x_te, y_te, _ = sh.load_shakespeare("test", plays, roles=["testing_HAMLET"])
    m = len(roles["testing_HAMLET"]) - 80
    assert used == ["testing_HAMLET"] and len(y_tr) == int(m * 0.8) and len(y_te) == m - len(y_tr)
    assert x_tr.dtype == torch.int64 and x_tr.shape[1] == 80
    text = roles["testing_HAMLET"]
    assert sh.decode(x_te[0]) == text[len(y_tr):len(y_tr) + 80]
    x_lim, _, _ = sh.load_shakespeare("train", plays, limit=7, seed=1)
    assert x_lim.shape == (7, 80)


def test_natural_clients(plays):
    spec = f"shakespeare,path={plays},clients=3,index=1,seed=0"
    train, info = load_client_data(spec)
    assert info["vocab_size"] == 96 and info["seq_len"] == 80 and len(info["roles"]) == 1
    owners = [load_client_data(f"shakespeare,path={plays},clients=3,index={i}")[1]["roles"]
              for i in range(3)]
    assert sorted(r for o in owners for r in o) == sorted(sh.load_roles(plays))
    local = load_client_test(spec)
    full = load_test_data(f"shakespeare,path={plays}")
    assert 0 < len(local) < len(full) and len(train) > len(local)
    with pytest.raises(ValueError, match="cannot be split over 4"):
        load_client_data(f"shakespeare,path={plays},clients=4,index=0")


def test_missing_texts(tmp_path, monkeypatch):
    monkeypatch.delenv("FEDPARA_DATA", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.cache/fedpara/shakespeare either
    with pytest.raises(FileNotFoundError, match="fedpara fetch shakespeare"):
        sh.find_texts()
    with pytest.raises(FileNotFoundError, match="no .txt plays"):
        sh.find_texts(tmp_path)
