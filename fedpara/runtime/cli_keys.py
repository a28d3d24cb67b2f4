"""``fedpara keys``: make Ed25519 identities for the coordinator and the devices."""
from __future__ import annotations

import argparse

from .signing import new_key


class KeysCommand:
    help = "make Ed25519 device identities for signed runs: fedpara keys new NAME [NAME ...] --dir DIR"

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        sub = p.add_subparsers(dest="keys_action", metavar="ACTION", required=True)
        new = sub.add_parser("new", help="write DIR/NAME.key (mode 0600) and DIR/NAME.pub for each NAME")
        new.add_argument("names", nargs="+", metavar="NAME", help="'coordinator' or a client id")
        new.add_argument("--dir", required=True, help="where the key files go")

    def run(self, args) -> int:
        for name in args.names:
            key, pub = new_key(name, args.dir)
            print(f"{name}: private key {key} (keep it on that machine only), public key {pub}")
        print("coordinator: coordinator_key = <DIR>/coordinator.key, trusted_keys = a directory of the clients' "
              ".pub files; each client: --key <its .key> --coordinator-pub <DIR>/coordinator.pub")
        return 0


COMMAND = KeysCommand()
