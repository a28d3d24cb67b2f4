"""``fedpara web``: the browser client's operator commands (docs/mobile.md).

    fedpara web serve --site DIR --store DIR [--host H --port P --cert C --tls-key K]
    fedpara web enrol phone-1 [phone-2 ...] --store DIR --run RUN --broker wss://HOST:PORT
                      --url https://HOST:PORT/ [--keys keys] [--credentials fleet/credentials]
                      [--data SPEC --site DIR]
    fedpara web revoke phone-1 --store DIR [--trusted-keys DIR]
    fedpara web list --store DIR

Also ``python -m edge_client.web.cli ...`` (the same arguments).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


class WebCommand:
    help = "serve the browser client to phones, enrol them with one-time links, revoke them"

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        sub = p.add_subparsers(dest="web_action", metavar="ACTION", required=True)
        s = sub.add_parser("serve", help="stage the client page into --site and serve it with /enrol")
        s.add_argument("--site", required=True, type=Path, help="directory to stage the page into and serve")
        s.add_argument("--store", required=True, type=Path, help="the enrolments directory (fedpara web enrol)")
        s.add_argument("--host", default="127.0.0.1")
        s.add_argument("--port", type=int, default=8080)
        s.add_argument("--cert", help="TLS certificate (PEM): serve https, which phones need off localhost")
        s.add_argument("--tls-key", help="the certificate's private key (PEM)")
        e = sub.add_parser("enrol", help="one-time enrolment links for phones (their keys from fedpara keys new)")
        e.add_argument("client_ids", nargs="+", metavar="CLIENT_ID")
        e.add_argument("--store", required=True, type=Path)
        e.add_argument("--run", required=True, help="the run id the phone joins")
        e.add_argument("--broker", required=True, help="MQTT over WebSockets as the phone reaches it: wss://HOST:PORT")
        e.add_argument("--url", required=True, help="where fedpara web serve is reached: https://HOST:PORT/")
        e.add_argument("--keys", type=Path, default=Path("keys"),
                       help="where fedpara keys new wrote <client_id>.key and coordinator.pub (default keys/)")
        e.add_argument("--key", type=Path, help="one phone's private key, instead of --keys/<client_id>.key")
        e.add_argument("--coordinator-pub", type=Path,
                       help="the coordinator's public key (default: coordinator.pub beside the phone's key)")
        e.add_argument("--credentials", type=Path,
                       help="MQTT username/password: fedpara broker-acl's credentials/ directory (<client_id>.env)")
        e.add_argument("--data", help="bundle this client data spec for the phone (the demo's Fashion-MNIST shard); "
                                      "with several phones it must contain {index}: their position in the list")
        e.add_argument("--site", type=Path, help="the served directory (with --data: the bundle goes in DIR/data/)")
        e.add_argument("--ttl-h", type=float, default=24.0, help="hours the link stays valid (default 24)")
        e.add_argument("--insecure", action="store_true", help="an unsigned phone (no key handed out)")
        r = sub.add_parser("revoke", help="kill a phone's link and take its key out of the coordinator's trust")
        r.add_argument("client_id")
        r.add_argument("--store", required=True, type=Path)
        r.add_argument("--trusted-keys", type=Path, help="the coordinator's trusted_keys directory")
        ls = sub.add_parser("list", help="the enrolments and their state")
        ls.add_argument("--store", required=True, type=Path)

    def run(self, args) -> int:
        from .enrol import EnrolStore
        store = EnrolStore(args.store)
        if args.web_action == "serve":
            return self._serve(args, store)
        if args.web_action == "enrol":
            return self._enrol(args, store)
        if args.web_action == "revoke":
            for line in store.revoke(args.client_id, args.trusted_keys):
                print(line)
            return 0
        for rec in store.records():
            state = ("revoked" if rec["revoked"] else "enrolled" if rec["used"]
                     else "expired" if time.time() > rec["expires"] else "link pending")
            print(f"{rec['client_id']:20s} {state:13s} run {rec['run']} broker {rec['broker']}")
        return 0

    def _enrol(self, args, store) -> int:
        many = len(args.client_ids) > 1
        if many and args.key:
            raise ValueError("--key names one phone's key: with several phones use --keys DIR")
        if args.data and args.site is None:
            raise ValueError("--data needs --site (the directory fedpara web serve serves)")
        if args.data and many and "{index}" not in args.data:
            raise ValueError("--data: with several phones the spec needs {index} (e.g. ...,clients=40,index={index})")
        base = args.url.rstrip("/")
        for i, cid in enumerate(args.client_ids):
            data_url = None
            if args.data:
                from .data import write_bundle
                write_bundle(args.data.replace("{index}", str(i)), args.site / "data" / f"{cid}.bin")
                data_url = f"data/{cid}.bin"
            code = store.create(cid, run=args.run, broker=args.broker, key=args.key or args.keys / f"{cid}.key",
                                coordinator_pub=args.coordinator_pub or (args.key.parent if args.key else args.keys)
                                / "coordinator.pub",
                                data_url=data_url, ttl_s=args.ttl_h * 3600, insecure=args.insecure,
                                credentials=args.credentials)
            link = f"{base}/app.html#enrol={code}"
            print(f"enrolment link for {cid} (one use, {args.ttl_h:g} h; revoke: fedpara web revoke {cid} "
                  f"--store {args.store}); as a QR code on your screen: {base}/qr.html#{link}\n{link}")
        return 0

    def _serve(self, args, store) -> int:
        from .serve import WebServer
        from .site import stage_client
        stage_client(args.site)
        server = WebServer(args.site, store, args.host, args.port, certfile=args.cert, keyfile=args.tls_key)
        print(f"serving the browser client on {server.url} (enrolment links: fedpara web enrol; Ctrl-C to stop)")
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass
        finally:
            server.stop()
        return 0


COMMAND = WebCommand()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="fedpara web", description=COMMAND.help)
    COMMAND.add_arguments(p)
    args = p.parse_args(argv)
    try:
        return COMMAND.run(args)
    except (ValueError, FileNotFoundError, FileExistsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
