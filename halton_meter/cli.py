"""The `halton-meter` command line: an argparse tree, each command a small function."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from halton_meter import __version__
from halton_meter.config import DEFAULT_API_PORT, DEFAULT_PORT, ConfigError, load_settings, parse_upstream, resolve_home


def _upstream_arg(text: str) -> str:
    try:
        parse_upstream(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _count_arg(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a count. Use a whole number like 20.")
    return int(text)


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
    _proxy_arguments(serve)
    serve.set_defaults(func=cmd_serve, mode="serve")

    edge = commands.add_parser(
        "edge", help="the always-on listener in front of the metering daemon (run by start)",
        description="The user-facing listener: hands each connection to the metering daemon when it "
                    "is healthy, and tunnels straight to the provider (unmetered, logged) when it is not.")
    _proxy_arguments(edge)
    edge.set_defaults(func=cmd_serve, mode="edge")

    daemon = commands.add_parser(
        "daemon", help="the metering daemon behind the edge (run by start)",
        description="Interception, metering and the ledger, fed by the edge over <home>/run/daemon.sock; "
                    "also listens on --port (default: a free one) for direct use.")
    _proxy_arguments(daemon)
    daemon.set_defaults(func=cmd_serve, mode="daemon")

    report = commands.add_parser(
        "report", help="spend by project and model over a time window",
        description="Calls, tokens and cost over a time window, grouped into tables "
                    "(JSON and CSV formats: halton_meter/report.py).",
    )
    report.add_argument("--home", dest="report_home", help=argparse.SUPPRESS)
    report.add_argument("--since", metavar="WHEN", help="start: 30m, 24h, 7d, 2w back from now, "
                                                        "or a local 2026-11-01[T12:00] (default 30d)")
    report.add_argument("--until", metavar="WHEN",
                        help="end, same forms (default now; a date alone includes that day)")
    report.add_argument("--by", action="append", metavar="GROUPING",
                        choices=["project", "model", "provider", "client", "endpoint", "day", "week", "month"],
                        help="one table per grouping: project, model, provider, client, endpoint, day, week, "
                             "month (repeatable; default project and model)")
    report.add_argument("--project", action="append", default=[], help="only this project (repeatable)")
    report.add_argument("--provider", action="append", default=[], help="only this provider (repeatable)")
    report.add_argument("--model", action="append", default=[], help="only this model (repeatable)")
    output = report.add_mutually_exclusive_group()
    output.add_argument("--json", dest="format", action="store_const", const="json", help="print JSON")
    output.add_argument("--csv", dest="format", action="store_const", const="csv", help="print CSV")
    report.set_defaults(func=cmd_report, format="text")

    tail = commands.add_parser(
        "tail", help="the latest calls, one line each; -f follows new ones",
        description="The latest calls, oldest first, one line each; -f follows new calls until Ctrl-C.",
    )
    tail.add_argument("--home", dest="tail_home", help=argparse.SUPPRESS)
    tail.add_argument("-n", "--lines", type=_count_arg, default=20, metavar="N", help="how many calls (default 20)")
    tail.add_argument("-f", "--follow", action="store_true", help="keep printing new calls until Ctrl-C")
    tail.add_argument("--project", action="append", default=[], help="only this project (repeatable)")
    tail.add_argument("--json", action="store_true", help="print one JSON object per line")
    tail.set_defaults(func=cmd_tail)

    pricing = commands.add_parser(
        "pricing", help="show the rate table or import LiteLLM's price file",
        description="The rates calls are priced with: bundled, imported (`pricing import`) and "
                    "[pricing.models] in config.toml, later layers winning.",
    )
    pricing.add_argument("--home", dest="pricing_home", help=argparse.SUPPRESS)
    pricing_commands = pricing.add_subparsers(dest="pricing_command", metavar="ACTION", required=True)
    show = pricing_commands.add_parser("show", help="every model's rates, or one model's and how its name resolves")
    show.add_argument("model", nargs="?", help="a model id as clients send it (dated ids and aliases work)")
    show.add_argument("--json", action="store_true", help="print JSON")
    show.set_defaults(func=cmd_pricing_show)
    load = pricing_commands.add_parser(
        "import", help="import LiteLLM's model_prices_and_context_window.json",
        description="Convert LiteLLM's model_prices_and_context_window.json into <home>/pricing-imported.json, "
                    "which overrides the bundled rates. Run `halton-meter reprice` to apply it to past calls.")
    load.add_argument("file", help="path to model_prices_and_context_window.json")
    load.set_defaults(func=cmd_pricing_import)

    reprice = commands.add_parser(
        "reprice", help="recompute stored costs with the current rates",
        description="Recompute the cost of recorded calls with the current rate table. Costs never "
                    "change otherwise: each row keeps the rates it was priced with.",
    )
    reprice.add_argument("--home", dest="reprice_home", help=argparse.SUPPRESS)
    reprice.add_argument("--since", metavar="WHEN", help="only calls from then on (same forms as report; default all)")
    reprice.add_argument("--until", metavar="WHEN", help="only calls before then")
    reprice.add_argument("--dry-run", action="store_true", help="say what would change, change no cost")
    reprice.set_defaults(func=cmd_reprice)

    _ledger_commands(commands)
    _lifecycle_commands(commands)

    demo = commands.add_parser(
        "demo", help="see it work, offline, in seconds",
        description="Start a throwaway proxy and a loopback fake provider in a temp directory, send "
                    "streaming and non-streaming calls for two projects to three providers, and print "
                    "the report they make. Touches neither your ~/.halton-meter nor the internet.")
    demo.add_argument("--keep", action="store_true", help="keep the temp directory to explore it")
    demo.set_defaults(func=cmd_demo)
    return parser


def _ledger_commands(commands) -> None:
    project = commands.add_parser(
        "project", help="list, rename, merge projects; per-project body capture",
        description="Projects calls are attributed to (X-Halton-Project header, `run --project`, the calling "
                    "process's HALTON_PROJECT or git repository, [[attribution.rules]], else default).")
    project.add_argument("--home", dest="project_home", help=argparse.SUPPRESS)
    actions = project.add_subparsers(dest="project_command", metavar="ACTION", required=True)
    listing = actions.add_parser("list", help="every project: calls, cost, last call, body capture, sources")
    listing.add_argument("--json", action="store_true", help="print JSON")
    listing.set_defaults(func=cmd_project, action="list")
    renaming = actions.add_parser("rename", help="rename OLD to NEW; calls still arriving as OLD are recorded as NEW")
    renaming.add_argument("old")
    renaming.add_argument("new")
    renaming.set_defaults(func=cmd_project, action="rename")
    merging = actions.add_parser("merge", help="fold project A into B (B keeps its settings)")
    merging.add_argument("source", metavar="A")
    merging.add_argument("target", metavar="B")
    merging.set_defaults(func=cmd_project, action="merge")
    setting = actions.add_parser("set", help="per-project settings: body-capture on|off|default")
    setting.add_argument("name", metavar="PROJECT")
    setting.add_argument("setting", choices=["body-capture"])
    setting.add_argument("value", choices=["on", "off", "default"])
    setting.set_defaults(func=cmd_project, action="set")

    budget = commands.add_parser(
        "budget", help="spend limits per period, project and provider: warn or block",
        description="Budgets count the priced cost of calls started this period (local day, week from Monday, "
                    "month). warn: an event in `status` and `tail` (and a desktop notification) at 80%% and 100%%; "
                    "block: once used up, the proxy answers the scope's calls itself with HTTP 429 in the "
                    "provider's error format, without contacting the provider.")
    budget.add_argument("--home", dest="budget_home", help=argparse.SUPPRESS)
    actions = budget.add_subparsers(dest="budget_command", metavar="ACTION", required=True)
    setting = actions.add_parser("set", help="set (or change) the budget of a scope and period")
    setting.add_argument("--project", help="only this project's calls (default: every project)")
    setting.add_argument("--provider", help="only this provider's calls, e.g. anthropic (default: every provider)")
    period = setting.add_mutually_exclusive_group(required=True)
    for name in ("daily", "weekly", "monthly"):
        period.add_argument(f"--{name}", metavar="AMOUNT", help=f"US dollars per {name[:-2] if name != 'daily' else 'day'}")
    setting.add_argument("--action", choices=["warn", "block"], default="warn",
                         help="warn (default): events and a notification; block: refuse calls once used up")
    setting.set_defaults(func=cmd_budget, verb="set")
    listing = actions.add_parser("list", help="every budget with this period's spend")
    listing.add_argument("--json", action="store_true", help="print JSON")
    listing.set_defaults(func=cmd_budget, verb="list")
    removing = actions.add_parser("rm", help="remove budgets by id (see `budget list`)")
    removing.add_argument("ids", metavar="ID", type=int, nargs="+")
    removing.set_defaults(func=cmd_budget, verb="rm")

    policy = commands.add_parser(
        "policy", help="model allow/deny rules per project (e.g. no opus in CI)",
        description="Model rules are globs on the requested model name, case-insensitive. A deny rule refuses "
                    "matching models; once a project has allow rules, only matching models may be called. "
                    "Refused calls get HTTP 403 in the provider's error format and never reach the provider.")
    policy.add_argument("--home", dest="policy_home", help=argparse.SUPPRESS)
    actions = policy.add_subparsers(dest="policy_command", metavar="ACTION", required=True)
    for kind, summary in (("allow", "only models matching these patterns may be called"),
                          ("deny", "models matching these patterns are refused")):
        rule = actions.add_parser(kind, help=summary)
        rule.add_argument("--project", help="the project (default: every project)")
        rule.add_argument("patterns", metavar="PATTERN", nargs="+", help="a model name or glob, e.g. 'claude-opus-*'")
        rule.set_defaults(func=cmd_policy, verb=kind)
    listing = actions.add_parser("list", help="every model rule")
    listing.add_argument("--json", action="store_true", help="print JSON")
    listing.set_defaults(func=cmd_policy, verb="list")
    removing = actions.add_parser("rm", help="remove model rules by id (see `policy list`)")
    removing.add_argument("ids", metavar="ID", type=int, nargs="+")
    removing.set_defaults(func=cmd_policy, verb="rm")

    bodies = commands.add_parser(
        "bodies", help="stored request/response bodies (redacted): show, purge, stats",
        description="Bodies are stored redacted ([bodies] in config.toml; `project set P body-capture off` "
                    "per project), cut at max_body_bytes, and deleted after retention_days.")
    bodies.add_argument("--home", dest="bodies_home", help=argparse.SUPPRESS)
    actions = bodies.add_subparsers(dest="bodies_command", metavar="ACTION", required=True)
    show = actions.add_parser("show", help="one call's headers and bodies")
    show.add_argument("call_id", metavar="CALL_ID", help="the call id (`tail` shows it; a unique prefix works)")
    show.add_argument("--json", action="store_true", help="print JSON")
    show.set_defaults(func=cmd_bodies, action="show")
    purge = actions.add_parser("purge", help="delete stored bodies older than a duration")
    purge.add_argument("--older-than", required=True, metavar="AGE", help="30m, 24h, 30d, 2w")
    purge.add_argument("--vacuum", action="store_true", help="then compact the database file")
    purge.set_defaults(func=cmd_bodies, action="purge")
    stats = actions.add_parser("stats", help="stored bodies, truncations, redactions per category")
    stats.add_argument("--json", action="store_true", help="print JSON")
    stats.set_defaults(func=cmd_bodies, action="stats")

    export = commands.add_parser(
        "export", help="every call as CSV or JSON lines, for spreadsheets and data tools",
        description="Write recorded calls, oldest first, one per row/line (columns: halton_meter/export.py "
                    "and the README). All calls unless --since/--until/--project narrow them.")
    export.add_argument("--home", dest="export_home", help=argparse.SUPPRESS)
    export.add_argument("--format", required=True, choices=["csv", "jsonl"])
    export.add_argument("--since", metavar="WHEN", help="30m, 24h, 7d, 2w back, or a local 2026-11-01[T12:00]")
    export.add_argument("--until", metavar="WHEN", help="end, same forms (a date alone includes that day)")
    export.add_argument("--project", action="append", default=[], help="only this project (repeatable)")
    export.add_argument("-o", "--output", metavar="FILE", help="write to FILE instead of standard output")
    export.set_defaults(func=cmd_export)

    dashboard = commands.add_parser(
        "dashboard", help="open the local dashboard in a browser (or print its address)",
        description="The dashboard is served by the metering daemon at http://127.0.0.1:API_PORT/.")
    dashboard.add_argument("--home", dest="dashboard_home", help=argparse.SUPPRESS)
    dashboard.add_argument("--print", dest="print_only", action="store_true", help="only print the address")
    dashboard.set_defaults(func=cmd_dashboard)


def _lifecycle_commands(commands) -> None:
    init = commands.add_parser(
        "init", help="install: CA, supervision, optional shell/app environment, trust, self-test",
        description="Set halton-meter up on this machine, or bring an earlier setup to the mode asked for "
                    "(safe to re-run). Creates the CA and client bundle, installs supervision (systemd "
                    "--user, launchd, or detached processes with pid files), trusts the CA where permitted, "
                    "and ends with a self-test through the installed proxy; a failed self-test is rolled back.")
    init.add_argument("--home", dest="init_home", help=argparse.SUPPRESS)
    which = init.add_mutually_exclusive_group()
    which.add_argument("--apps", dest="mode", action="store_const", const="apps",
                       help="also write a marked, removable block of proxy variables into your shell rc files "
                            "(and launchctl for macOS apps)")
    which.add_argument("--full", dest="mode", action="store_const", const="full",
                       help="--apps plus the macOS system proxy (on Linux, says what is not supported)")
    init.add_argument("--non-interactive", action="store_true", help="never ask; do everything permitted")
    init.add_argument("--no-shell-rc", action="store_true", help="with --apps/--full: leave shell rc files alone")
    init.add_argument("--port", type=int, help=f"the proxy (edge) port (default {DEFAULT_PORT}, or the next free one)")
    init.add_argument("--api-port", type=int, help=f"the local API port (default {DEFAULT_API_PORT}, or the next free one)")
    init.add_argument("--timeout", type=float, default=20.0, metavar="SECONDS",
                      help="how long the stack may take to come up before init rolls back (default 20)")
    init.set_defaults(func=cmd_init, mode="run")

    run = commands.add_parser(
        "run", help="run a command with its provider calls metered (starts the proxy if needed)",
        description="Run CMD with HTTPS_PROXY/HTTP_PROXY (naming --project), SSL_CERT_FILE, REQUESTS_CA_BUNDLE, "
                    "CURL_CA_BUNDLE, NODE_EXTRA_CA_CERTS and NO_PROXY set; CMD replaces this process, so its "
                    "exit code and signals are its own.")
    run.add_argument("--home", dest="run_home", help=argparse.SUPPRESS)
    run.add_argument("--project", help="attribute the calls to this project (letters, digits, . _ -)")
    run.add_argument("--shell", action="store_true",
                     help="run CMD through $SHELL -c (pipes, aliases); without CMD, start an interactive $SHELL")
    run.add_argument("argv", nargs=argparse.REMAINDER, metavar="[--] CMD [ARGS...]")
    run.set_defaults(func=cmd_run)

    for name, summary in (("start", "start the proxy (through the installed supervisor)"),
                          ("stop", "stop metering; the edge keeps forwarding so no program breaks (--all: "
                                   "stop the edge too)"),
                          ("restart", "restart the metering daemon, then the edge")):
        command = commands.add_parser(name, help=summary, description=summary[0].upper() + summary[1:] + ".")
        command.add_argument("--home", dest="ctl_home", help=argparse.SUPPRESS)
        if name == "stop":
            command.add_argument("--all", action="store_true",
                                 help="also stop the edge: programs still pointed at it fail until `start`")
        command.set_defaults(func=cmd_control, action=name)

    for name, summary in (("status", "HEALTHY / INCONSISTENT / BROKEN, one row per component"),
                          ("doctor", "every diagnostic, each failure with its fix, and an end-to-end check")):
        command = commands.add_parser(name, help=summary, description=summary[0].upper() + summary[1:] +
                                      ". Exit code 0 when HEALTHY, 1 otherwise; --json is documented in the README.")
        command.add_argument("--home", dest="ctl_home", help=argparse.SUPPRESS)
        command.add_argument("--json", action="store_true", help="print JSON")
        command.set_defaults(func=cmd_status, doctor=name == "doctor")

    uninstall = commands.add_parser(
        "uninstall", help="remove trust, supervision, the shell rc block and proxy settings",
        description="Remove the CA from trust stores first, then supervision, the shell rc block, launchctl "
                    "variables and the system proxy. Keeps the home directory (and always the database, "
                    "unless --include-logs).")
    uninstall.add_argument("--home", dest="ctl_home", help=argparse.SUPPRESS)
    uninstall.add_argument("--purge", action="store_true",
                           help="also delete the home directory: CA, config, imported prices, service logs "
                                "(not the database)")
    uninstall.add_argument("--include-logs", action="store_true",
                           help="also delete the database, the log of every call (implies --purge)")
    uninstall.set_defaults(func=cmd_uninstall)


def _proxy_arguments(command: argparse.ArgumentParser) -> None:
    command.add_argument("--home", dest="serve_home", help=argparse.SUPPRESS)
    command.add_argument("--port", type=int, help=f"listen port (default {DEFAULT_PORT}; 0 picks a free one)")
    command.add_argument("--listen", help="loopback address to bind (default 127.0.0.1)")
    if command.prog.split()[-1] != "edge":
        command.add_argument("--api-port", type=int, metavar="PORT",
                             help=f"the local HTTP API's port (default {DEFAULT_API_PORT}; 0 picks a free one)")
    command.add_argument("--upstream", action="append", metavar="HOST=ADDR:PORT", type=_upstream_arg,
                         help="send HOST's traffic to ADDR:PORT, keeping SNI, Host and verification for HOST "
                              "(repeatable)")
    command.add_argument("--upstream-ca", action="append", metavar="FILE",
                         help="extra trust anchors (PEM) for verifying upstream certificates (repeatable)")
    command.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])


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
    except _lifecycle_errors() as exc:
        print(f"halton-meter: {exc}", file=sys.stderr)
        return 1


def _lifecycle_errors() -> tuple[type[Exception], ...]:
    """The errors lifecycle commands report as one line; imported only once one was raised."""
    from halton_meter.lifecycle.install import STEP_ERRORS
    from halton_meter.lifecycle.state import StateError
    from halton_meter.tls.ca import CAError

    return (*STEP_ERRORS, StateError, CAError)


def cmd_serve(args: argparse.Namespace) -> int:
    # Heavy modules load only for the commands that need them: `--help` stays fast.
    import asyncio
    import logging

    from halton_meter.edge_process import EdgeError, handoff_path, run_edge
    from halton_meter.serve import ServeError, serve
    from halton_meter.tls.ca import CAError

    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    home = resolve_home(args.serve_home or args.home)
    port = args.port if args.port is not None or args.mode != "daemon" else 0
    settings = load_settings(home, port=port, listen=args.listen, api_port=getattr(args, "api_port", None),
                             upstreams=args.upstream, upstream_ca_files=args.upstream_ca)
    try:
        if args.mode == "edge":
            return asyncio.run(run_edge(settings, search_port=args.port is None))
        handoff = handoff_path(settings) if args.mode == "daemon" else None
        return asyncio.run(serve(settings, handoff=handoff))
    except (ServeError, CAError, EdgeError) as exc:
        print(f"halton-meter: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def cmd_report(args: argparse.Namespace) -> int:
    from halton_meter.report import run_report

    settings = load_settings(resolve_home(args.report_home or args.home))
    return run_report(settings.db_path, since=args.since, until=args.until, by=args.by,
                      projects=args.project, providers=args.provider, models=args.model, fmt=args.format)


def cmd_tail(args: argparse.Namespace) -> int:
    from halton_meter.tail import run_tail

    settings = load_settings(resolve_home(args.tail_home or args.home))
    return run_tail(settings.db_path, lines=args.lines, follow=args.follow, projects=args.project,
                    as_json=args.json)


def _ledger_for(args: argparse.Namespace, home_flag: str, *, required: bool = True):
    """(settings, connection) for a ledger command; None connection when there is no ledger yet."""
    from halton_meter.bodies import open_for_commands

    settings = load_settings(resolve_home(getattr(args, home_flag) or args.home))
    db = open_for_commands(settings.db_path)
    if db is None and required:
        raise ConfigError(f"There is no ledger at {settings.db_path} yet. Send a call through the proxy first "
                          "(`halton-meter run -- CMD`), or pass the right --home.")
    return settings, db


def cmd_project(args: argparse.Namespace) -> int:
    from halton_meter import projects
    from halton_meter.attribution import ProjectNameError

    _settings, db = _ledger_for(args, "project_home", required=args.action != "list")
    try:
        if db is None:
            print("No projects yet: every call is attributed to one (`default` when nothing names it).")
            return 0
        if args.action == "list":
            return projects.list_projects(db, as_json=args.json, out=sys.stdout)
        if args.action == "rename":
            return projects.rename(db, args.old, args.new, out=sys.stdout)
        if args.action == "merge":
            return projects.merge(db, args.source, args.target, out=sys.stdout)
        return projects.set_body_capture(db, args.name, args.value, out=sys.stdout)
    except (projects.ProjectError, ProjectNameError) as exc:
        print(f"halton-meter project: {exc}", file=sys.stderr)
        return 1
    finally:
        if db is not None:
            db.close()


def _policy_ledger(args: argparse.Namespace, home_flag: str, *, create: bool):
    """The ledger for `budget`/`policy`: created when a rule is added before any call was made."""
    from halton_meter.ledger import connect

    settings = load_settings(resolve_home(getattr(args, home_flag) or args.home))
    if create and not settings.db_path.exists():
        settings.home.mkdir(mode=0o700, parents=True, exist_ok=True)
        return connect(settings.db_path)
    return _ledger_for(args, home_flag, required=False)[1]


def cmd_budget(args: argparse.Namespace) -> int:
    from halton_meter import budgets

    db = _policy_ledger(args, "budget_home", create=args.verb == "set")
    try:
        if args.verb == "set":
            period = next(name for name in budgets.PERIODS if getattr(args, name) is not None)
            return budgets.set_budget(db, project=args.project, provider=args.provider, period=period,
                                      amount=getattr(args, period), action=args.action, out=sys.stdout)
        if args.verb == "list":
            if db is None:
                print("No budgets. Set one with `halton-meter budget set --daily 10`.")
                return 0
            settings = load_settings(resolve_home(args.budget_home or args.home))
            return budgets.list_budgets(db, as_json=args.json, out=sys.stdout,
                                        warn_at_percent=settings.budget_warn_at_percent)
        if db is None:
            raise budgets.PolicyError(f"There is no budget {args.ids[0]}; see `halton-meter budget list`.")
        return budgets.remove_budgets(db, args.ids, out=sys.stdout)
    except budgets.PolicyError as exc:
        print(f"halton-meter budget: {exc}", file=sys.stderr)
        return 1
    finally:
        if db is not None:
            db.close()


def cmd_policy(args: argparse.Namespace) -> int:
    from halton_meter import budgets

    db = _policy_ledger(args, "policy_home", create=args.verb in ("allow", "deny"))
    try:
        if args.verb in ("allow", "deny"):
            return budgets.add_rules(db, kind=args.verb, project=args.project, patterns=args.patterns, out=sys.stdout)
        if args.verb == "list":
            if db is None:
                print("No model rules. Add one with `halton-meter policy deny --project ci 'claude-opus-*'`.")
                return 0
            return budgets.list_rules(db, as_json=args.json, out=sys.stdout)
        if db is None:
            raise budgets.PolicyError(f"There is no model rule {args.ids[0]}; see `halton-meter policy list`.")
        return budgets.remove_rules(db, args.ids, out=sys.stdout)
    except budgets.PolicyError as exc:
        print(f"halton-meter policy: {exc}", file=sys.stderr)
        return 1
    finally:
        if db is not None:
            db.close()


def cmd_bodies(args: argparse.Namespace) -> int:
    import time

    from halton_meter import bodies
    from halton_meter.report import TimeError, parse_time

    settings, db = _ledger_for(args, "bodies_home", required=args.action == "show")
    if db is None and args.action == "purge":
        print("No ledger yet: nothing to purge.")
        return 0
    try:
        if args.action == "show":
            return bodies.show(db, args.call_id, as_json=args.json, out=sys.stdout)
        if args.action == "stats":
            return bodies.stats(db, settings.bodies, as_json=args.json, out=sys.stdout)
        now = time.time()
        try:
            cutoff = parse_time(args.older_than, now, flag="--older-than")
        except TimeError as exc:
            print(f"halton-meter bodies: {exc}", file=sys.stderr)
            return 2
        return bodies.purge(db, now - cutoff, vacuum=args.vacuum, out=sys.stdout, now=now)
    finally:
        if db is not None:
            db.close()


def _time_window(args: argparse.Namespace, command: str) -> tuple[float | None, float | None] | None:
    """--since/--until as unix seconds (None where not given); None after a usage error."""
    import time

    from halton_meter.report import TimeError, parse_time

    now = time.time()
    try:
        return (parse_time(args.since, now) if args.since else None,
                parse_time(args.until, now, flag="--until", end=True) if args.until else None)
    except TimeError as exc:
        print(f"halton-meter {command}: {exc}", file=sys.stderr)
        return None


def cmd_export(args: argparse.Namespace) -> int:
    from halton_meter.export import export
    from halton_meter.report import open_ledger

    settings = load_settings(resolve_home(args.export_home or args.home))
    window = _time_window(args, "export")
    if window is None:
        return 2
    since, until = window
    db = open_ledger(settings.db_path)
    try:
        out = open(args.output, "w", encoding="utf-8", newline="") if args.output else sys.stdout
    except OSError as exc:
        print(f"halton-meter export: cannot write {args.output} ({exc.strerror}). Pick a writable path.",
              file=sys.stderr)
        return 1
    try:
        if db is not None:
            db.execute("BEGIN")  # one snapshot while the proxy keeps writing
        count = export(db, args.format, out, since=since, until=until, projects=tuple(args.project))
        out.flush()
    except BrokenPipeError:  # `export … | head`: the reader has what it wanted
        sys.stdout = None
        return 0
    finally:
        if db is not None:
            db.close()
        if args.output:
            out.close()
    if args.output:
        print(f"Wrote {count:,} call(s) to {args.output}.", file=sys.stderr)
    return 0


def cmd_dashboard(args: argparse.Namespace) -> int:
    from halton_meter.lifecycle.stack import api_health

    settings = load_settings(resolve_home(args.dashboard_home or args.home))
    # The daemon writes the port it really bound (the configured one may have been busy).
    try:
        port = int((settings.run_dir / "api.port").read_text())
    except (OSError, ValueError):
        port = settings.api_port
    if api_health(settings, port) is None:
        print("halton-meter dashboard: the metering daemon's API is not answering. Start it with "
              "`halton-meter start` (or `halton-meter serve`), then run this again.", file=sys.stderr)
        return 1
    url = f"http://127.0.0.1:{port}/"
    print(url)
    if not args.print_only:
        import webbrowser

        if not webbrowser.open(url):
            print("No browser could be opened here; open the address above.", file=sys.stderr)
    return 0


def _load_prices(home):
    from halton_meter.pricing import PriceTable, PricingError

    try:
        return PriceTable.load(home)
    except PricingError as exc:
        raise ConfigError(str(exc)) from None


def cmd_pricing_show(args: argparse.Namespace) -> int:
    import json

    from halton_meter.pricing_show import describe, describe_json

    table = _load_prices(resolve_home(args.pricing_home or args.home))
    if args.json:
        print(json.dumps(describe_json(table, args.model), indent=2))
    else:
        print(describe(table, args.model))
    return 0 if args.model is None or table.resolve(args.model) is not None else 1


def cmd_pricing_import(args: argparse.Namespace) -> int:
    from halton_meter.pricing import PricingError
    from halton_meter.pricing_import import import_litellm

    home = resolve_home(args.pricing_home or args.home)
    try:
        summary = import_litellm(Path(args.file), home)
    except PricingError as exc:
        print(f"halton-meter: {exc}", file=sys.stderr)
        return 1
    print(f"Imported {summary.imported:,} model prices into {summary.path}")
    print(f"  new models: {len(summary.added):,}, changed rates: {len(summary.changed):,}, "
          f"unchanged: {summary.unchanged:,}")
    for reason, count in sorted(summary.skipped.items()):
        print(f"  skipped {count:,}: {reason}")
    for warning in summary.warnings[:10]:
        print(f"  warning: {warning}")
    if summary.changed:
        print("  changed: " + ", ".join(summary.changed[:12]) + (" …" if len(summary.changed) > 12 else ""))
    print("New calls use these rates once the proxy restarts; `halton-meter reprice` applies them to past calls.")
    return 0


def cmd_reprice(args: argparse.Namespace) -> int:
    import sqlite3

    from halton_meter.reprice import reprice

    settings = load_settings(resolve_home(args.reprice_home or args.home))
    window = _time_window(args, "reprice")
    if window is None:
        return 2
    since, until = window
    if not settings.db_path.exists():
        print("No captures yet: there is nothing to reprice.")
        return 0
    prices = _load_prices(settings.home)
    try:
        summary = reprice(settings.db_path, prices, since=since, until=until, dry_run=args.dry_run)
    except sqlite3.Error as exc:
        print(f"halton-meter: cannot reprice {settings.db_path} ({exc}). Check the file, or retry "
              "if another process holds it locked.", file=sys.stderr)
        return 1
    verb = "would change" if args.dry_run else "changed"
    print(f"Repriced {summary.examined:,} calls: {summary.changed:,} {verb}.")
    print(f"  total cost {_usd(summary.before_nanousd)} -> {_usd(summary.after_nanousd)}; "
          f"unpriced calls {summary.unpriced_before:,} -> {summary.unpriced_after:,}")
    return 0


def _usd(nanousd: int) -> str:
    from halton_meter.report import format_usd

    return format_usd(nanousd)


def cmd_demo(args: argparse.Namespace) -> int:
    from halton_meter.demo import run_demo

    return run_demo(keep=args.keep)


def _home(args: argparse.Namespace, name: str) -> Path:
    return resolve_home(getattr(args, name, None) or args.home)


def cmd_init(args: argparse.Namespace) -> int:
    from halton_meter.lifecycle.install import run_init

    settings = load_settings(_home(args, "init_home"))
    interactive = not args.non_interactive and sys.stdin.isatty()
    return run_init(settings, mode=args.mode, shell_rc=not args.no_shell_rc, interactive=interactive,
                    port=args.port, api_port=args.api_port, ready_timeout_s=args.timeout, ask=_ask)


def _ask(question: str) -> bool:
    try:
        return input(f"{question} [Y/n] ").strip().lower() in ("", "y", "yes")
    except EOFError:
        return False


def cmd_run(args: argparse.Namespace) -> int:
    from halton_meter.lifecycle.runenv import run_command

    argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    if not argv and not args.shell:
        print("halton-meter run: name a command, e.g. `halton-meter run --project my-app -- claude`",
              file=sys.stderr)
        return 2
    home = _home(args, "run_home")
    try:
        settings = load_settings(home)
    except ConfigError as exc:  # never block the user's command: run it, unmetered, and say why
        print(f"halton-meter: {exc}", file=sys.stderr)
        settings = None
    return run_command(settings, argv, project=args.project, shell=args.shell)


def cmd_control(args: argparse.Namespace) -> int:
    from halton_meter.lifecycle.stack import control

    return control(load_settings(_home(args, "ctl_home")), args.action, everything=getattr(args, "all", False))


def cmd_status(args: argparse.Namespace) -> int:
    import json

    from halton_meter.lifecycle.status import as_json, collect, doctor_rows, render, verdict

    from halton_meter.config import Settings
    from halton_meter.lifecycle.status import FAIL, Row

    home = _home(args, "ctl_home")
    try:
        settings, broken = load_settings(home), []
    except ConfigError as exc:  # report it as a row, and check the rest with the defaults
        settings, broken = Settings(home=home), [Row("config", FAIL, str(exc), f"edit {home / 'config.toml'}")]
    state, rows = doctor_rows(settings) if args.doctor else collect(settings)
    rows = broken + [row for row in rows if not (broken and row.name == "config")]
    if args.json:
        print(json.dumps(as_json(settings, state, rows), indent=2))
    else:
        print(render(settings, state, rows, "doctor" if args.doctor else "status"))
    return 0 if verdict(rows) == "HEALTHY" else 1


def cmd_uninstall(args: argparse.Namespace) -> int:
    from halton_meter.lifecycle.install import run_uninstall

    return run_uninstall(load_settings(_home(args, "ctl_home")), purge=args.purge, include_logs=args.include_logs)
