"""Entry point `wmtp-operator` (and `python -m wmtp_operator`): the kopf operator for WMTPRun resources."""

from __future__ import annotations

import argparse
import logging
import os

import kopf

METRICS_PORT = 8000


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="wmtp-operator", description=__doc__)
    parser.add_argument(
        "-n",
        "--namespace",
        action="append",
        dest="namespaces",
        help="Watch this namespace (repeat for more; globs allowed). Default: $WMTP_OPERATOR_NAMESPACES "
        "(comma-separated), else every namespace.",
    )
    parser.add_argument(
        "--liveness",
        default=os.environ.get("WMTP_OPERATOR_LIVENESS", "http://0.0.0.0:8080/healthz"),
        help="Liveness endpoint URL (default: $WMTP_OPERATOR_LIVENESS or http://0.0.0.0:8080/healthz).",
    )
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=os.environ.get("WMTP_OPERATOR_METRICS_PORT", str(METRICS_PORT)),
        help="Serve Prometheus metrics at /metrics on this port, all addresses; 0: off (default: "
        f"$WMTP_OPERATOR_METRICS_PORT or {METRICS_PORT}).",
    )
    parser.add_argument(
        "--standalone",
        action="store_true",
        default=os.environ.get("WMTP_OPERATOR_STANDALONE", "") in ("1", "true"),
        help="Skip kopf peering (one replica only; default: $WMTP_OPERATOR_STANDALONE).",
    )
    parser.add_argument("--verbose", action="store_true", help="Log every request and handler.")
    args = parser.parse_args(argv)
    if not 0 <= args.metrics_port <= 65535:
        parser.error(f"--metrics-port: {args.metrics_port} is not a port (0 to 65535)")
    if not args.namespaces:
        env = os.environ.get("WMTP_OPERATOR_NAMESPACES", "")
        args.namespaces = [ns.strip() for ns in env.split(",") if ns.strip()]
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    import wmtp_operator.handlers  # noqa: F401  (registers the handlers with kopf)
    from wmtp_operator import metrics
    from wmtp_operator.decoding import install

    install()  # kopf decodes every object it lists and watches: never into a RecursionError
    if args.metrics_port:
        metrics.serve(args.metrics_port)

    kopf.configure(verbose=args.verbose)
    if not args.verbose:
        # A line per handler call and per probe would drown what matters (refusals, failed passes).
        for noisy in ("kopf.objects", "aiohttp.access"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
    kopf.run(
        clusterwide=not args.namespaces,
        namespaces=args.namespaces,
        liveness_endpoint=args.liveness,
        standalone=args.standalone or None,
    )


if __name__ == "__main__":
    main()
