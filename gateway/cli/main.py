"""The `switchboard` command: serve, policy validate|schema|explain|diff|simulate, keys list|new|revoke|rotate,
usage, spend, experiments report."""

from __future__ import annotations

import argparse
import asyncio
import atexit
import json
import logging
import logging.handlers
import os
import queue
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Any

from gateway.auth import new_key
from gateway.compiled.policy import PolicyError, load_policy
from gateway.policy.key_files import KeyBook, KeysFileError
from gateway.policy.schema import json_schema

DEFAULT_PORT = 8080
# uvicorn's httptools protocol with connection, head and body bounds (gateway/http/connections.py); named by
# import path so that worker processes can load it.
GUARDED_PROTOCOL = "gateway.http.connections:GuardedHttpToolsProtocol"


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    return int(args.run(args) or 0)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="switchboard", description="An OpenAI-compatible LLM gateway.")
    parser.add_argument("--version", action="version", version=f"switchboard {_version()}")
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the gateway")
    serve.add_argument("--policy", required=True, help="policy YAML file")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=None, help=f"default: $PORT or {DEFAULT_PORT}")
    serve.add_argument("--workers", type=int, default=1, help="worker processes (each loads the policy)")
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    serve.add_argument("--no-access-log", action="store_true",
                       help="do not write the JSON line per request to stdout")
    serve.set_defaults(run=_serve)

    policy = commands.add_parser("policy", help="check or describe policy files").add_subparsers(
        required=True, metavar="ACTION")
    validate = policy.add_parser("validate", help="check a policy file; exit 1 listing every problem")
    validate.add_argument("file")
    validate.set_defaults(run=_validate)
    schema = policy.add_parser("schema", help="print the policy file's JSON Schema")
    schema.set_defaults(run=_schema)
    explain = policy.add_parser("explain", help="print the route a request would take")
    explain.add_argument("file")
    explain.add_argument("--model", required=True, help="public model name")
    explain.add_argument("--team", default=None, help="show whether the team may use it and its limits")
    explain.add_argument("--prompt-file", default=None,
                         help="a request body (JSON with messages or prompt) or plain text sent as one user message")
    explain.set_defaults(run=_explain)
    diff = policy.add_parser("diff", help="say what changes between two policy files, per team and model")
    diff.add_argument("old", help="the policy file in use")
    diff.add_argument("new", help="the proposed policy file")
    diff.add_argument("--format", default="text", choices=["text", "json"], help="text (default) or json")
    diff.set_defaults(run=_diff)
    simulate = policy.add_parser("simulate", help="replay a usage ledger's requests against a policy: who would be "
                                 "limited, downgraded or rerouted, and the cost difference")
    simulate.add_argument("file", help="the policy to try")
    simulate.add_argument("--ledger", required=True, help="a usage ledger file (ledger.path of the running policy)")
    simulate.add_argument("--since", default=None, help="2026-11-01, 2026-11-01T12:00 (UTC), or relative: 24h, 7d")
    simulate.add_argument("--until", default=None, help="same forms as --since; default: the ledger's end")
    simulate.add_argument("--format", default="table", choices=["table", "csv", "json"])
    simulate.add_argument("--workers", type=int, default=1, help="processes to replay in, teams split among "
                          "them (exactly the same result; default 1)")
    simulate.set_defaults(run=_simulate)

    keys = commands.add_parser("keys", help="manage virtual keys").add_subparsers(required=True, metavar="ACTION")
    listing = keys.add_parser("list", help="list the keys of a policy and its keys file (ids and state only)")
    listing.add_argument("--policy", required=True)
    listing.add_argument("--team", default=None)
    listing.set_defaults(run=_list_keys)
    new = keys.add_parser("new", help="create a key: printed once; its hash goes to the policy's keys file")
    new.add_argument("--team", required=True)
    new.add_argument("--id", default=None, help="key id (default: <team>-<random>)")
    new.add_argument("--policy", default=None, help="add the key to this policy's keys file (created if needed); "
                     "without it, print the YAML to paste")
    new.set_defaults(run=_new_key)
    revoke = keys.add_parser("revoke", help="disable a key (applies when the gateway reloads)")
    revoke.add_argument("--policy", required=True)
    revoke.add_argument("--id", required=True)
    revoke.set_defaults(run=_revoke_key)
    rotate = keys.add_parser("rotate", help="create a successor key; the old one expires after an overlap")
    rotate.add_argument("--policy", required=True)
    rotate.add_argument("--id", required=True, help="the key to replace")
    rotate.add_argument("--overlap", default="24h", help="how long the old key keeps working: 30m, 24h, 7d")
    rotate.set_defaults(run=_rotate_key)

    usage = commands.add_parser("usage", help="print a team's usage, limits and budgets (JSON)")
    usage.add_argument("--policy", required=True, help="policy YAML file (its state: block says where to read)")
    usage.add_argument("--team", required=True)
    usage.add_argument("--period", default="current", choices=["current", "previous"])
    usage.add_argument("--end-user", default=None, help="also report this end user's budget (teams.<t>.end_users)")
    usage.set_defaults(run=_usage)

    spend = commands.add_parser("spend", help="report spend from the usage ledger (gateway/accounting/ledger.py)")
    spend.add_argument("--policy", required=True, help="policy YAML file (its ledger.path says where to read)")
    spend.add_argument("--by", default="team", help="team, model, key, day, organization, end_user, or tag:<key> "
                       "(e.g. tag:feature)")
    spend.add_argument("--since", default=None, help="2026-11-01, 2026-11-01T12:00 (UTC), or relative: 24h, 7d, 4w")
    spend.add_argument("--until", default=None, help="same forms as --since; default: now")
    spend.add_argument("--format", default="table", choices=["table", "csv", "json"])
    spend.set_defaults(run=_spend)

    experiments = commands.add_parser("experiments", help="canary and shadow traffic (gateway/routing/experiments.py)"
                                      ).add_subparsers(required=True, metavar="ACTION")
    compare = experiments.add_parser("report", help="compare each experimenting model's variants from a usage "
                                     "ledger, with 95% confidence intervals")
    compare.add_argument("--ledger", required=True, help="a usage ledger file (ledger.path of the policy)")
    compare.add_argument("--model", default=None, help="only this public model")
    compare.add_argument("--since", default=None, help="2026-11-01, 2026-11-01T12:00 (UTC), or relative: 24h, 7d")
    compare.add_argument("--until", default=None, help="same forms as --since; default: now")
    compare.add_argument("--format", default="table", choices=["table", "json"])
    compare.set_defaults(run=_experiments_report)
    return parser


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("switchboard")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown (not installed)"


def _serve(args: argparse.Namespace) -> int:
    import uvicorn
    from uvicorn.config import STARTUP_FAILURE

    from gateway.accounting.usage import AccessLogSink
    from gateway.app import ACCESS_LOG_ENV, POLICY_ENV, create_app
    from gateway.compiled.store import PolicyStore
    from gateway.http.admin_surface import AdminListener
    from gateway.http.draining import DrainingServer

    configure_logging(args.log_level)
    try:
        policy = load_policy(args.policy)
    except PolicyError as exc:
        logging.getLogger("switchboard").error("%s", exc)
        return 1
    port = args.port if args.port is not None else int(os.environ.get("PORT", DEFAULT_PORT))
    admin = policy.server.admin
    if admin is not None and args.workers > 1:
        logging.getLogger("switchboard").error(
            "server.admin: the admin listener needs --workers 1 (one process serves both ports); run one gateway "
            "per core behind a load balancer, or leave server.admin out and scrape /metrics with the admin key")
        return 1
    if policy.server.drain_s > 0 and args.workers > 1:
        # uvicorn's supervisor runs its own server in each worker; a drain there would be a fork of it.
        logging.getLogger("switchboard").error(
            "server.drain_s: draining after SIGTERM needs --workers 1; run one gateway per core behind the load "
            "balancer, or set drain_s to 0 and let the orchestrator pause before SIGTERM (a Kubernetes preStop)")
        return 1
    # proxy_headers off: nothing in the gateway reads the client address, and uvicorn's
    # X-Forwarded-For middleware measured ~2.5% of a proxied request's CPU.
    common = dict(log_config=None, access_log=False, server_header=False, proxy_headers=False,
                  timeout_graceful_shutdown=policy.server.shutdown_grace_s, loop="auto", http=GUARDED_PROTOCOL)
    if args.workers > 1:
        os.environ[POLICY_ENV] = os.path.abspath(args.policy)
        os.environ[ACCESS_LOG_ENV] = "0" if args.no_access_log else "1"
        uvicorn.run("gateway.app:app_from_environment", factory=True, workers=args.workers, host=args.host,
                    port=port, **common)
        return 0
    sinks = [] if args.no_access_log else [AccessLogSink()]
    store = PolicyStore(args.policy, policy)
    app = create_app(store, sinks=sinks, serving_process=True)
    tenant = DrainingServer(uvicorn.Config(app, host=args.host, port=port, **common),
                            drain_s=lambda: store.current.server.drain_s, on_drain=app.begin_draining)
    if admin is None:
        tenant.run()
        return 0 if tenant.started else STARTUP_FAILURE  # as uvicorn.run exits
    admin_side = uvicorn.Config(AdminListener(app), host=admin.host, port=admin.port, lifespan="off", **common)
    with asyncio.Runner(loop_factory=tenant.config.get_loop_factory()) as runner:
        runner.run(serve_with_admin_listener(tenant, admin_side))
    return 0


async def serve_with_admin_listener(tenant: Any, admin: Any) -> None:
    """The tenant server (a `uvicorn.Server`) and the admin listener (a uvicorn config;
    gateway/http/admin_surface.py) in one event loop.

    The admin server runs no lifespan (the tenant server's runs the app's) and takes no signals: the tenant
    server takes them, so SIGTERM drains it (the admin listener keeps answering meanwhile), and the admin server
    stops with it.
    """
    from gateway.http.draining import FollowingServer

    admin_server = FollowingServer(admin)
    admin_task = asyncio.create_task(admin_server.serve())
    try:
        await tenant.serve()
    finally:
        admin_server.should_exit = True
        await admin_task


def _validate(args: argparse.Namespace) -> int:
    try:
        policy = load_policy(args.file)
    except PolicyError as exc:
        sys.stderr.write(f"{exc}\n")
        return 1
    sys.stdout.write(f"{args.file}: ok ({len(policy.providers)} providers, {len(policy.models)} models, "
                     f"{len(policy.teams)} teams, {len(policy.keys)} keys)\n")
    return 0


def _explain(args: argparse.Namespace) -> int:
    from gateway.routing.explain import explain_route
    from gateway.tokens.counter import TokenCounter

    try:
        policy = load_policy(args.file)
    except PolicyError as exc:
        sys.stderr.write(f"{exc}\n")
        return 1
    body = None
    if args.prompt_file:
        with open(args.prompt_file, encoding="utf-8") as handle:
            text = handle.read()
        try:
            body = json.loads(text)
        except json.JSONDecodeError:
            body = None
        if not isinstance(body, dict):
            body = {"messages": [{"role": "user", "content": text}]}
    try:
        lines = explain_route(policy, args.model, team=args.team, body=body, counter=TokenCounter())
    except KeyError as exc:
        sys.stderr.write(f"{exc.args[0]}\n")
        return 1
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


def _diff(args: argparse.Namespace) -> int:
    from gateway.compiled.diff import diff_policies, render_json, render_text

    try:
        old, new = load_policy(args.old), load_policy(args.new)
    except PolicyError as exc:
        sys.stderr.write(f"{exc}\n")
        return 1
    changes = diff_policies(old, new)
    if args.format == "json":
        sys.stdout.write(json.dumps({"old": args.old, "new": args.new, "changes": render_json(changes)},
                                    indent=2) + "\n")
    else:
        sys.stdout.write(render_text(changes))
    return 0


def _simulate(args: argparse.Namespace) -> int:
    from gateway.cli.simulate import print_simulation

    return print_simulation(args.file, args.ledger, args.since, args.until, args.format, args.workers)


def _schema(args: argparse.Namespace) -> int:
    sys.stdout.write(json.dumps(json_schema(), indent=2) + "\n")
    return 0


def _new_key(args: argparse.Namespace) -> int:
    key, digest = new_key()
    key_id = args.id or f"{args.team}-{key[-6:].lower()}"
    if args.policy is None:
        sys.stdout.write(
            f"New key for team {args.team} (shown once; store it in your secret manager):\n\n  {key}\n\n"
            f"Add this under teams.{args.team}.keys in the policy:\n\n"
            f"  - id: {key_id}\n    hash: \"{digest}\"\n"
        )
        return 0
    return _keys_edit(args.policy, lambda book: _created(book, args.team, key_id, key, digest))


def _created(book: KeyBook, team: str, key_id: str, key: str, digest: str) -> str:
    where = book.add(team, key_id, digest)
    return (f"New key {key_id} for team {team} (shown once; store it in your secret manager):\n\n  {key}\n\n"
            f"Its hash is in {where}; the gateway picks it up when it reloads (file watch or SIGHUP).\n")


def _list_keys(args: argparse.Namespace) -> int:
    import datetime as dt

    try:
        book = KeyBook(args.policy)
    except (OSError, KeysFileError) as exc:
        sys.stderr.write(f"{exc}\n")
        return 1
    now = dt.datetime.now(dt.UTC)
    rows = [r for r in book.rows() if args.team is None or r.team == args.team]
    cells = [("team", "id", "stored in", "state")] + [(r.team, r.key_id, r.where, r.state(now)) for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(4)]
    sys.stdout.write("".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() + "\n"
                             for row in cells))
    return 0


def _revoke_key(args: argparse.Namespace) -> int:
    def revoke(book: KeyBook) -> str:
        team = book.team_of(args.id)
        where = book.set_field(args.id, "disabled", True)
        return f"Revoked key {args.id} of {team} (in the {where}); refused from the gateway's next reload.\n"

    return _keys_edit(args.policy, revoke)


def _rotate_key(args: argparse.Namespace) -> int:
    import datetime as dt
    import re

    def rotate(book: KeyBook) -> str:
        team = book.team_of(args.id)
        if team == "(admin)":
            raise KeyError("admin keys are not rotated here: add a new admin key, then revoke the old one")
        overlap = re.fullmatch(r"(\d+)([mhdw])", args.overlap.strip())
        if overlap is None:
            raise KeyError(f"--overlap {args.overlap!r}: use 30m, 24h, 7d or 4w")
        overlap_s = int(overlap.group(1)) * {"m": 60, "h": 3600, "d": 86400, "w": 604800}[overlap.group(2)]
        expires = (dt.datetime.now(dt.UTC) + dt.timedelta(seconds=overlap_s)).isoformat(timespec="seconds")
        # The old key's expiry first: a reload between the two writes never sees two keys without one.
        book.set_field(args.id, "expires_at", expires.replace("+00:00", "Z"))
        key, digest = new_key()
        created = _created(book, team, f"{team}-{key[-6:].lower()}", key, digest)
        return created + f"The old key {args.id} keeps working until {expires.replace('+00:00', 'Z')}.\n"

    return _keys_edit(args.policy, rotate)


def _keys_edit(policy_path: str, edit: Callable[[KeyBook], str]) -> int:
    """Apply an edit to a policy's keys, then check that the policy still loads; print the edit's message."""
    try:
        book = KeyBook(policy_path)
        message = edit(book)
    except (OSError, KeysFileError) as exc:
        sys.stderr.write(f"{exc}\n")
        return 1
    except KeyError as exc:
        sys.stderr.write(f"{exc.args[0]}\n")
        return 1
    sys.stdout.write(message)
    try:
        load_policy(policy_path)
    except PolicyError as exc:  # e.g. the policy was already invalid: say so now, not at the next reload
        sys.stderr.write(f"warning: the policy does not load:\n{exc}\n")
        return 1
    return 0


def _experiments_report(args: argparse.Namespace) -> int:
    from gateway.cli.experiments_report import print_experiments

    return print_experiments(args.ledger, args.model, args.since, args.until, args.format)


def _spend(args: argparse.Namespace) -> int:
    from gateway.cli.reports import print_spend

    return print_spend(args.policy, args.by, args.since, args.until, args.format)


def _usage(args: argparse.Namespace) -> int:
    from gateway.cli.reports import print_usage

    return print_usage(args.policy, args.team, args.period, args.end_user)


def configure_logging(level: str) -> None:
    """Log through a queue so the event loop never blocks writing to a terminal or pipe.

    The queue is written out however the process ends: at exit, and when SIGTERM or SIGINT ends it. uvicorn
    restores the handlers it found and raises the signal again once its graceful shutdown is done, which skips
    `atexit`: without the handler below the last lines ("Application shutdown complete", "Finished server
    process") were lost and the log seemed to stop at "Waiting for application shutdown".
    """
    records: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    listener = logging.handlers.QueueListener(records, handler)
    listener.start()
    atexit.register(listener.stop)

    def drain_then_die(signum: int, frame: object) -> None:
        listener.stop()  # writes out what is queued, then joins the writer thread
        signal.signal(signum, signal.SIG_DFL)
        signal.raise_signal(signum)  # the exit status supervisors expect (143 for SIGTERM)

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, drain_then_die)
    root = logging.getLogger()
    root.handlers[:] = [logging.handlers.QueueHandler(records)]
    root.setLevel(level.upper())


if __name__ == "__main__":
    raise SystemExit(main())
