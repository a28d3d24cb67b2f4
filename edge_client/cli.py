"""``fedpara client``: one edge client, or a pool of logical clients, until the run finishes."""
from __future__ import annotations

import argparse
import dataclasses
import signal

from fedpara.runtime.flags import (
    add_broker_arguments,
    add_config_flags,
    broker_from_args,
    config_overrides,
)

from .config import ClientConfig


class ClientCommand:
    help = "run an edge client (or --pool M logical clients) that trains on local data"

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        add_broker_arguments(p)
        p.add_argument("--config", help="client TOML file (keys flat or under [client]); flags override it")
        add_config_flags(p, ClientConfig)
        p.add_argument("--energy-link", choices=["wifi", "lte", "ethernet"], help="radio profile of the estimate")
        p.add_argument("--energy-cmd", help="external meter: command printing watts (or a joule counter)")
        p.add_argument("--energy-file", help="external meter: file whose last line ends with watts")
        p.add_argument("--energy-profile", help="estimate: device class (rpi4, rpi5, jetson, laptop)")
        p.add_argument("--energy-cpu-watts", type=float, help="estimate: W per busy core above idle")
        p.add_argument("--energy-idle-watts", type=float, help="estimate: board idle W")
        p.add_argument("--stay", action="store_true", help="keep running after the run finishes "
                                                           "(same as --no-exit-on-finish)")
        p.add_argument("--pool", type=int, default=0, help="run M logical clients in this process (ids <client-id>-NNN)")
        p.add_argument("--pool-offset", type=int, default=0, help="first data index of the pool")
        p.add_argument("--profile", help="run inside a device profile's CPU share and memory, enforced by cgroups "
                                         "(root; deploy/lab/profiles.toml: pi-zero-2w, pi4-1gb, pi4-4gb, pi5-4gb, "
                                         "jetson-nano-4gb, laptop; docs/lab.md)")
        p.add_argument("--profile-report", help="with --profile: write the client's peak RSS, limit and exit "
                                                "(OOM kill or not) to this JSON file")

    def run(self, args) -> int:
        energy_options = {k: v for k, v in (("link", args.energy_link), ("external_cmd", args.energy_cmd),
                                            ("external_file", args.energy_file), ("profile", args.energy_profile),
                                            ("cpu_watts", args.energy_cpu_watts),
                                            ("idle_watts", args.energy_idle_watts)) if v is not None}
        if args.stay:
            args.exit_on_finish = False
        broker = broker_from_args(args)  # the broker URL first: the cheapest mistake to report
        cfg = ClientConfig.load(args.config, **config_overrides(args, ClientConfig))
        if args.profile:  # the client itself runs as a child, inside the profile's cgroup
            import sys

            from .devprofile import get_profile, run_client, strip_profile_args

            if "--profile" not in " ".join(sys.argv):
                raise ValueError("--profile is for the command line (fedpara client --profile NAME ...)")
            return run_client(get_profile(args.profile), strip_profile_args(sys.argv[1:]), threads=cfg.threads,
                              echo=lambda s: print(s, file=sys.stderr, flush=True),
                              label=cfg.client_id, report=args.profile_report)
        import torch

        from .client import EdgeClient
        from .pool import ClientPool, pool_configs

        if energy_options:  # flags add to (and win over) the file's [client.energy_options]
            cfg = dataclasses.replace(cfg, energy_options={**cfg.energy_options, **energy_options})
        torch.set_num_threads(cfg.threads)
        if args.pool:
            runner = ClientPool(pool_configs(cfg, args.pool, args.pool_offset), broker)
        else:
            runner = EdgeClient(cfg, broker)
        signal.signal(signal.SIGTERM, lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
        from fedpara.runtime.parent import exit_with_parent

        exit_with_parent()  # started by fedpara demo: a SIGTERM (a graceful stop) when the demo dies
        runner.start()
        try:
            runner.wait()
        except KeyboardInterrupt:
            pass
        finally:
            # stopping already (offline status, state written): a second SIGTERM (a supervisor that
            # repeats it, the demo ending) must not interrupt that, nor the interpreter's exit
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            runner.stop()
        return 0


CLIENT_COMMAND = ClientCommand()
