"""``fedpara client``: one edge client, or a pool of logical clients, until the run finishes."""
from __future__ import annotations

import argparse
import dataclasses
import signal

from fedpara.transport import add_broker_arguments, broker_from_args

from .config import ClientConfig


class ClientCommand:
    help = "run an edge client (or --pool M logical clients) that trains on local data"

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        add_broker_arguments(p)
        p.add_argument("--config", help="client TOML file ([client] table); flags override it")
        p.add_argument("--client-id", help="unique client id (pool: prefix)")
        p.add_argument("--run", dest="run_id", help="run id to join (default demo)")
        p.add_argument("--data", help="data spec, e.g. fashion-mnist,partition=dirichlet:0.5,clients=10,index=3")
        p.add_argument("--device", choices=["auto", "cpu", "cuda"], help="training device (default auto)")
        p.add_argument("--threads", type=int, help="torch CPU threads (default 1)")
        p.add_argument("--state-dir", help="local state directory (pFedPara local factors survive restarts)")
        p.add_argument("--energy", help="energy meter: auto|rapl|jetson|nvml|rpi|external|estimate|off")
        p.add_argument("--energy-link", choices=["wifi", "lte", "ethernet"], help="radio profile of the estimate")
        p.add_argument("--energy-cmd", help="external meter: command printing watts (or a joule counter)")
        p.add_argument("--energy-file", help="external meter: file whose last line ends with watts")
        p.add_argument("--export-on-finish", action="store_true", default=None,
                       help="export the final (personalised) model to STATE_DIR/model.onnx")
        p.add_argument("--stay", action="store_true", help="keep running after the run finishes")
        p.add_argument("--pool", type=int, default=0, help="run M logical clients in this process")
        p.add_argument("--pool-offset", type=int, default=0, help="first data index of the pool")

    def run(self, args) -> int:
        import torch

        from .client import EdgeClient
        from .pool import ClientPool, pool_configs

        energy_options = {k: v for k, v in (("link", args.energy_link), ("external_cmd", args.energy_cmd),
                                            ("external_file", args.energy_file)) if v is not None}
        cfg = ClientConfig.load(args.config, client_id=args.client_id, run_id=args.run_id, data=args.data,
                                device=args.device, threads=args.threads, state_dir=args.state_dir,
                                energy=args.energy, export_on_finish=args.export_on_finish,
                                exit_on_finish=False if args.stay else None)
        if energy_options:  # flags add to (and win over) the file's [client.energy_options]
            cfg = dataclasses.replace(cfg, energy_options={**cfg.energy_options, **energy_options})
        torch.set_num_threads(cfg.threads)
        broker = broker_from_args(args)
        if args.pool:
            runner = ClientPool(pool_configs(cfg, args.pool, args.pool_offset), broker)
        else:
            runner = EdgeClient(cfg, broker)
        signal.signal(signal.SIGTERM, lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
        runner.start()
        try:
            runner.wait()
        except KeyboardInterrupt:
            pass
        finally:
            runner.stop()
        return 0


CLIENT_COMMAND = ClientCommand()
