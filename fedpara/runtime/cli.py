"""The ``fedpara`` console script.

Subcommands are plugins: each package declares its commands under the ``fedpara.commands``
entry-point group in pyproject.toml (``name = "package.module:COMMAND"``), where COMMAND has
``help: str``, ``add_arguments(parser)`` and ``run(args) -> int``. This keeps the method library
free of imports of the coordinator, the edge client and the exporter.
"""
from __future__ import annotations

import argparse
import logging
import sys
from importlib.metadata import entry_points


def _commands() -> dict:
    return {ep.name: ep for ep in sorted(entry_points(group="fedpara.commands"), key=lambda e: e.name)}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    eps = _commands()
    parser = argparse.ArgumentParser(prog="fedpara", description="Federated learning on edge devices with FedPara.")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    wanted = next((a for a in argv if not a.startswith("-")), None)
    loaded = {}
    for name, ep in eps.items():
        if wanted not in (None, name) and wanted in eps:
            sub.add_parser(name)  # listed, not loaded: keeps start-up fast
            continue
        try:
            cmd = ep.load()
        except ImportError as exc:  # an optional dependency is missing
            p = sub.add_parser(name, help=f"(unavailable: {exc})")
            loaded[name] = exc
            continue
        p = sub.add_parser(name, help=cmd.help, description=cmd.help)
        cmd.add_arguments(p)
        loaded[name] = cmd
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    logging.basicConfig(level=logging.WARNING - 10 * min(args.verbose, 2),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cmd = loaded[args.command]
    if isinstance(cmd, Exception):
        print(f"fedpara {args.command}: unavailable, {cmd}. Install the missing package.", file=sys.stderr)
        return 2
    from .memory import tune_malloc

    tune_malloc()  # large buffers are reused, not page-faulted in anew every message (memory.py)
    try:
        return int(cmd.run(args) or 0)
    except KeyboardInterrupt:
        return 130
    except (ValueError, TypeError, OSError) as exc:  # OSError: ConnectionError, missing file, full disk
        print(f"fedpara {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
