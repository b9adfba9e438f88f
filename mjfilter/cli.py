"""The ``mjfilter`` command."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import textwrap
from pathlib import Path
from typing import Any
from collections.abc import Sequence

from . import __version__, store_cli
from .cliutil import EXIT_CONFIG, EXIT_FAIL, EXIT_OK, HelpFormatter, add_config
from .config import ConfigError, config_path, load_config

log = logging.getLogger("mjfilter")

DESCRIPTION = """\
mjfilter runs a chain of plugins on every message an MTA (Postfix, Sendmail;
Exim through an SMTP front end) receives, and understands the control headers
applications already send to Mailjet, MailerQ, SMTPeter and Maxemail.
"""

EPILOG = """\
configuration:
  -c FILE, else $MJFILTER_CONFIG, else /etc/mjfilter/mjfilter.yaml.

exit status:
  0 success; 1 runtime failure (store, socket, daemon not answering);
  2 usage or configuration error (printed as FILE:LINE:COL: reason).

see also: docs/ in the source tree, `mjfilter COMMAND --help`.
"""


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not above 0")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mjfilter", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version", version=f"mjfilter {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("run", help="run the milter daemon in the foreground", formatter_class=HelpFormatter,
                       description=textwrap.dedent("""\
        Run the milter in the foreground until SIGTERM or SIGINT.

        Listens where `milter.listen` says (default inet:127.0.0.1:8894), keeps state
        in the store (default: SQLite in state_dir), and answers `mjfilter reload` on
        its control socket. SIGHUP stops the daemon (libmilter's rule): use
        `mjfilter reload` to re-read the configuration.
        Logs go to standard error, or to syslog with logging.target: syslog; one INFO
        line per message. With metrics.listen set, serves Prometheus metrics on
        http://HOST:PORT/metrics."""))
    add_config(p)
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"],
                   help="override logging.level of the configuration")

    p = sub.add_parser("check", help="run the chain on an .eml file, with no MTA", formatter_class=HelpFormatter,
                       description=textwrap.dedent("""\
        Run the configured chain on one message file with the given envelope, exactly
        as the milter would, and print what would happen: the trace of every step,
        the verdict, and the resulting message(s). Nothing is sent anywhere. Steps
        read the configured store (suppression lists, dedup reservations) but, unless
        --commit is given, leave nothing behind: the run ends as if the MTA had
        not taken the message (dedup releases its reservations, no event is kept).

        --json prints one object: verdict (accept|reject|tempfail|discard|quarantine),
        reply ({code, status, text} or null), route ({transport, nexthop, target,
        reason, step}: the Postfix FILTER target and the rule or map entry that chose
        it; null: Postfix routes the message itself), deliveries
        (list of {sender, recipients, message}), events, trace (list of {step, action,
        ms}), directives (what the control headers asked), queue_id."""),
                       epilog="example:\n  mjfilter check -c conf/mjfilter.yaml --sender app@example.com "
                              "--rcpt bob@example.org message.eml --json")
    add_config(p)
    p.add_argument("--sender", required=True, metavar="ADDR", help="envelope sender (MAIL FROM); '' for <>")
    p.add_argument("--rcpt", required=True, action="append", metavar="ADDR",
                   help="envelope recipient (RCPT TO); repeat for several")
    p.add_argument("--auth", metavar="USER", help="SASL login of the client ({auth_authen})")
    p.add_argument("--client-ip", metavar="IP", default="127.0.0.1", help="client address (default 127.0.0.1)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the report")
    p.add_argument("--commit", action="store_true",
                   help="keep the effects in the store, as if the MTA had accepted the message")
    p.add_argument("file", metavar="FILE.eml", help="the message (RFC 5322); - reads standard input")

    p = sub.add_parser("config", help="configuration tools", formatter_class=HelpFormatter,
                       description="Configuration tools.")
    csub = p.add_subparsers(dest="config_command", metavar="SUBCOMMAND", required=True)
    cp = csub.add_parser("check", help="validate the configuration without starting anything",
                         formatter_class=HelpFormatter, description=textwrap.dedent("""\
        Validate the configuration like `postfix check`: YAML syntax, duplicate keys,
        unknown keys, wrong types, unknown or broken plugins, each step's own config.
        Binds no socket and opens no store. Prints FILE:LINE:COL: reason per problem
        and exits 2, or prints a one-line summary and exits 0."""))
    add_config(cp)

    p = sub.add_parser("plugins", help="list plugins and the effective chain order", formatter_class=HelpFormatter,
                       description=textwrap.dedent("""\
        List every installed plugin (entry-point group mjfilter.plugins) with its
        distribution and version, the hooks the configured ones implement, and the
        effective chain order with each step's when: rule and on_error policy."""))
    add_config(p)

    p = sub.add_parser("postfix-config", help="print the Postfix main.cf/master.cf lines this configuration needs",
                       formatter_class=HelpFormatter, description=textwrap.dedent("""\
        Print the main.cf parameters (smtpd_milters, milter_default_action = tempfail,
        timeouts, macros, header_checks that keep credential headers out of the queue
        file) and the master.cf reinjection listener this configuration needs. With
        routing configured, also milter_header_checks (the route header becomes
        FILTER transport:nexthop), one master.cf transport per TLS policy and
        priority (SASL credentials from mjfilter's socketmap), and, commented, the
        sender_dependent_*_maps alternative. The test suite installs exactly this
        output into a real Postfix."""))
    add_config(p)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--main", action="store_true", help="print only the main.cf lines")
    g.add_argument("--master", action="store_true", help="print only the master.cf lines")

    p = sub.add_parser("reload", help="make the running daemon re-read its configuration", formatter_class=HelpFormatter,
                       description=textwrap.dedent("""\
        Ask the running daemon (through its control socket, control.socket or
        STATE_DIR/control.sock) to re-read its configuration file. An invalid file is
        refused with FILE:LINE:COL: reason and the running chain stays; a valid one
        takes effect for the next message, without dropping connections. Changes of
        milter, store, state_dir, control, metrics and logging settings need a restart."""))
    add_config(p)

    p = sub.add_parser("status", help="show what the running daemon is running", formatter_class=HelpFormatter,
                       description="Print the running daemon's pid, version, configuration file, chain, "
                                   "configuration generation,\ntransactions in flight and whether it is "
                                   "shutting down (JSON).")
    add_config(p)

    p = sub.add_parser("health", help="check that the running daemon, its store and its sockets answer",
                       formatter_class=HelpFormatter, description=textwrap.dedent("""\
        For supervisors and monitoring: check, with the configuration the daemon runs
        with, that

          daemon   the control socket answers `status` and the daemon is not
                   shutting down (reports pid, configuration generation, in flight);
          store    the store answers a ping (store.url, within store.timeout);
          milter   the milter socket (milter.listen, inet: or unix:) accepts a
                   connection and answers the milter protocol's option negotiation,
                   as the MTA's first command;
          metrics  when metrics.listen is set: GET /metrics answers 200.

        Prints one line per check (`ok` or `FAIL`, the check, the detail) and exits
        0 when every check passes, 1 when one fails, 2 on a configuration error.
        Run it as the daemon's user: the control socket is mode 0600."""),
                       epilog="examples:\n  mjfilter health -c /etc/mjfilter/mjfilter.yaml\n"
                              "  mjfilter health --json   # with $MJFILTER_CONFIG set")
    add_config(p)
    p.add_argument("--json", action="store_true",
                   help='print one JSON object: {"ok": bool, "checks": [{"check", "ok", "detail"}]}')
    p.add_argument("--timeout", type=_positive_float, default=5.0, metavar="SECONDS",
                   help="seconds each check may take (default 5)")
    store_cli.add_commands(sub, add_config, formatter_class=HelpFormatter)
    return parser


def _load(args: argparse.Namespace) -> Any:
    return load_config(config_path(args.config))


def _config_error(e: ConfigError) -> int:
    print(str(e), file=sys.stderr)
    return EXIT_CONFIG


def cmd_run(args: argparse.Namespace) -> int:
    from .app import App
    from .logsetup import setup_logging, shutdown_logging

    try:
        loaded = _load(args)
        app = App(loaded)
    except ConfigError as e:
        return _config_error(e)
    # libmilter stops on SIGTERM/SIGINT/SIGHUP through sigwait() in a thread of its own.
    # Block them before any thread starts (the log writer is the first) so every thread
    # inherits the mask: else the kernel may hand a signal to one of our threads and its
    # default action kills us.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT, signal.SIGHUP})
    lcfg = loaded.config.logging
    problem = setup_logging(args.log_level or lcfg.level, target=lcfg.target, facility=lcfg.facility,
                            syslog_socket=lcfg.syslog_socket, background=True)
    if problem:  # mail keeps flowing; the lines are lost until syslog answers (as with openlog(3))
        print(f"mjfilter: warning: {problem}; log lines are lost until it answers", file=sys.stderr)
    try:
        return _run(app, loaded)
    finally:
        shutdown_logging()  # write every queued line before the process ends


def _run(app: Any, loaded: Any) -> int:
    from .control import ControlServer
    from .frontends.milter import serve
    from .store import StoreUnavailable

    control = ControlServer(app, loaded.config.control_socket)
    metrics_server: Any = None
    socketmap: Any = None
    try:
        app.store.ping()
        app.start()
        control.start()
        log.info("mjfilter %s: configuration %s, store %s, control socket %s", __version__, loaded.path,
                 app.store.url, loaded.config.control_socket)  # store.url has any password masked
        routing = loaded.config.routing
        if routing.enabled:
            from .frontends.socketmap import Answer, SocketmapServer

            socketmap = SocketmapServer(routing.socketmap,
                                        lambda table, key, conn: Answer(*app.table_lookup(table, key, conn)),
                                        with_connection=True,
                                        inline=lambda table, key: not app.table_lookup_blocks(table, key),
                                        socket_group=loaded.config.milter.socket_group)
            app.resolve([socketmap.start()])
            log.info("socketmap on %s (tables sasl, mqsasl, relayhost, transport, credential)", socketmap.address)
        address = loaded.config.metrics.address
        if address is not None:
            from prometheus_client import start_http_server

            metrics_server, _ = start_http_server(address[1], address[0], registry=app.metrics.registry)
            log.info("metrics on http://%s/metrics", loaded.config.metrics.listen)
        serve(app, on_ready=lambda: log.info("ready"))
        drain = loaded.config.milter.drain_timeout
        log.info("stopping: letting in-flight messages finish (up to %gs)", drain)
        left = app.drain(drain)
        if left:
            log.warning("stopping with %d transaction(s) unfinished: the MTA answers their clients 4xx", left)
    except StoreUnavailable as e:
        log.error("store unavailable: %s", e)
        return EXIT_FAIL
    except Exception as e:
        log.error("cannot run: %s: %s", type(e).__name__, e)
        return EXIT_FAIL
    finally:
        if metrics_server is not None:
            metrics_server.shutdown()
            metrics_server.server_close()
        if socketmap is not None:
            try:
                app.resolve([socketmap.close()], timeout=5)
            except Exception as e:  # still close the rest
                log.warning("socketmap close: %s", e)
        control.stop()
        app.close()
    log.info("stopped")
    return EXIT_OK


def cmd_check(args: argparse.Namespace) -> int:
    from .app import App
    from .frontends.replay import replay
    from .logsetup import setup_logging

    try:
        app = App(_load(args))
    except ConfigError as e:
        return _config_error(e)
    setup_logging("warning")
    data = sys.stdin.buffer.read() if args.file == "-" else Path(args.file).read_bytes()
    try:
        app.start()
        r = replay(app, data, args.sender, args.rcpt, auth_user=args.auth, client_ip=args.client_ip,
                   commit=args.commit)
    finally:
        app.close()
    if args.json:
        print(json.dumps(r.outcome.as_dict(r.txn), indent=2, ensure_ascii=False))
        return EXIT_OK
    out = sys.stdout
    out.write("trace:\n")
    for t in r.outcome.trace:
        out.write(f"  {t.step:<24} {t.ms:8.3f} ms  {t.action}\n")
    for p in r.txn.directives.problems:
        out.write(f"problem: {p.header}: {p.reason}\n")
    reply = r.outcome.reply
    out.write(f"verdict: {r.outcome.verdict}" + (f" ({reply.code} {reply.status} {reply.text})" if reply else "") + "\n")
    if r.outcome.route:
        out.write(f"route: {r.outcome.route.target} (chosen by {r.outcome.route.reason or r.outcome.route.step})\n")
    for ev in r.outcome.events:
        out.write(f"event: {json.dumps(ev.as_dict())}\n")
    for i, d in enumerate(r.outcome.all_deliveries(r.txn), 1):
        out.write(f"\n--- delivery {i}: from <{d.sender}> to {', '.join(f'<{x}>' for x in d.recipients)}\n")
        out.write(d.message.as_bytes().decode("utf-8", "replace").replace("\r\n", "\n"))
    return EXIT_OK


def cmd_config_check(args: argparse.Namespace) -> int:
    from .app import prepare

    try:
        loaded = _load(args)
        rt = prepare(loaded)
    except ConfigError as e:
        return _config_error(e)
    print(f"{loaded.path}: OK ({len(rt.chain.steps)} steps: {', '.join(s.name for s in rt.chain.steps) or 'none'})")
    return EXIT_OK


def cmd_plugins(args: argparse.Namespace) -> int:
    from .app import prepare
    from .plugins import distribution_of, available_plugins

    try:
        rt = prepare(_load(args))
    except ConfigError as e:
        return _config_error(e)
    print("installed plugins (entry-point group mjfilter.plugins):")
    for name, ep in sorted(available_plugins().items()):
        dist, version = distribution_of(ep)
        info = rt.plugins.get(name)
        hooks = ", ".join(info.hooks) if info else "(not loaded: not in the chain)"
        print(f"  {name:<16} {dist} {version:<10} {ep.value}")
        print(f"  {'':<16} hooks: {hooks}")
    print("\nchain (effective order):")
    if not rt.chain.steps:
        print("  (empty: every message is accepted unchanged)")
    for i, s in enumerate(rt.chain.steps, 1):
        when = f" when: {s.rule.describe}" if s.rule else ""
        caps = ",".join(sorted(s.capabilities)) or "no edits"
        print(f"  {i}. {s.name} (use: {s.plugin}; on_error: {s.on_error}; may: {caps}){when}")
    return EXIT_OK


def cmd_postfix_config(args: argparse.Namespace) -> int:
    from .postfix import render

    try:
        loaded = _load(args)
    except ConfigError as e:
        return _config_error(e)
    from .app import prepare

    try:
        rt = prepare(loaded)
    except ConfigError as e:
        return _config_error(e)
    try:
        sys.stdout.write(render(loaded.config, main=not args.master, master=not args.main, router=rt.router))
    finally:
        rt.router.close()
    return EXIT_OK


def _control(args: argparse.Namespace, command: str) -> int:
    from .control import send_command

    try:
        loaded = _load(args)
    except ConfigError as e:
        return _config_error(e)
    path = loaded.config.control_socket
    try:
        reply = send_command(path, command)
    except OSError as e:
        print(f"mjfilter: no daemon answers on {path}: {e.strerror or e}", file=sys.stderr)
        return EXIT_FAIL
    if command == "status":
        print(json.dumps(reply, indent=2))
        return EXIT_OK if reply.get("ok") else EXIT_FAIL
    if reply.get("ok"):
        print(reply.get("message", "reloaded"))
        return EXIT_OK
    print(f"reload refused, the running configuration stays:\n{reply.get('error')}", file=sys.stderr)
    return EXIT_CONFIG


def cmd_health(args: argparse.Namespace) -> int:
    from .health import run_checks

    try:
        loaded = _load(args)
    except ConfigError as e:
        return _config_error(e)
    checks = run_checks(loaded, timeout=args.timeout)
    ok = all(c.ok for c in checks)
    if args.json:
        print(json.dumps({"ok": ok, "checks": [c.as_dict() for c in checks]}, indent=2))
    else:
        for c in checks:
            print(f"{'ok  ' if c.ok else 'FAIL'} {c.check:<8} {c.detail}")
    return EXIT_OK if ok else EXIT_FAIL


COMMANDS = {
    "run": cmd_run,
    "check": cmd_check,
    "plugins": cmd_plugins,
    "postfix-config": cmd_postfix_config,
    "reload": lambda a: _control(a, "reload"),
    "status": lambda a: _control(a, "status"),
    "health": cmd_health,
    **store_cli.COMMANDS,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "config":
        return cmd_config_check(args)
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
