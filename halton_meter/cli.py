"""The `halton-meter` command line: an argparse tree, each command a small function."""

from __future__ import annotations

import argparse
import sys

from halton_meter import __version__
from halton_meter.config import DEFAULT_PORT, ConfigError, load_settings, parse_upstream, resolve_home


def _upstream_arg(text: str) -> str:
    try:
        parse_upstream(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="halton-meter",
        description="A local proxy that meters LLM API spend into a SQLite ledger.",
    )
    parser.add_argument("--version", action="version", version=f"halton-meter {__version__}")
    parser.add_argument("--home", help="state directory (default: $HALTON_METER_HOME or ~/.halton-meter)")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    serve = commands.add_parser(
        "serve", help="run the metering proxy in the foreground",
        description="Run the metering proxy in the foreground; stops on Ctrl-C / SIGTERM, "
                    "flushing every pending row.",
    )
    serve.add_argument("--home", dest="serve_home", help=argparse.SUPPRESS)
    serve.add_argument("--port", type=int, help=f"listen port (default {DEFAULT_PORT}; 0 picks a free one)")
    serve.add_argument("--listen", help="loopback address to bind (default 127.0.0.1)")
    serve.add_argument("--upstream", action="append", metavar="HOST=ADDR:PORT", type=_upstream_arg,
                       help="send HOST's traffic to ADDR:PORT, keeping SNI, Host and verification for HOST (repeatable)")
    serve.add_argument("--upstream-ca", action="append", metavar="FILE",
                       help="extra trust anchors (PEM) for verifying upstream certificates (repeatable)")
    serve.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    serve.set_defaults(func=cmd_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"halton-meter: {exc}", file=sys.stderr)
        return 1


def cmd_serve(args: argparse.Namespace) -> int:
    # Heavy modules load only for the commands that need them: `--help` stays fast.
    import asyncio
    import logging

    from halton_meter.serve import ServeError, serve
    from halton_meter.tls.ca import CAError

    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    home = resolve_home(args.serve_home or args.home)
    settings = load_settings(home, port=args.port, listen=args.listen,
                             upstreams=args.upstream, upstream_ca_files=args.upstream_ca)
    try:
        return asyncio.run(serve(settings))
    except (ServeError, CAError) as exc:
        print(f"halton-meter: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
