"""``mjfilter`` commands that read and change the state store.

``suppress`` (add, remove, list, import, export), ``campaigns``, ``store check``
and ``events``. ``mjfilter.cli`` wires them in through ``add_commands`` and
``COMMANDS``.

Every command loads the configuration (``-c``, ``$MJFILTER_CONFIG``, default
file), opens the store it names and exits 0 on success, 1 when the store does
not answer (or a check/lookup fails), 2 on a usage or configuration error.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
import textwrap
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import IO, Any

from .cliutil import EXIT_CONFIG, EXIT_FAIL, EXIT_OK, HelpFormatter
from .config import ConfigError, config_path, load_config
from .store import LISTS, Store, StoreUnavailable, SuppressionEntry, mask_url, normalize_entry, open_store

MAX_REASON = 200
CSV_COLUMNS = ("entry", "code", "reason")
EXPORT_COLUMNS = ("list", "entry", "code", "reason")

Command = Callable[[argparse.Namespace], int]


class UsageError(Exception):
    """Bad input from the user (an entry, a file): printed, exit 2."""


# -- argument types ---------------------------------------------------------------------
def smtp_code(text: str) -> int:
    """``--code``: a 4xx or 5xx SMTP reply code."""
    try:
        code = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 400 <= code <= 599:
        raise argparse.ArgumentTypeError(f"{code} is not a 4xx or 5xx SMTP code")
    return code


def reason_text(text: str) -> str:
    """``--reason``: one line of printable text, at most 200 characters."""
    return check_reason(text)


def check_reason(text: str) -> str:
    if any(not c.isprintable() for c in text):
        raise argparse.ArgumentTypeError("the reason must be one line of printable text")
    if len(text) > MAX_REASON:
        raise argparse.ArgumentTypeError(f"the reason is longer than {MAX_REASON} characters")
    return text.strip()


def positive(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if n < 1:
        raise argparse.ArgumentTypeError("must be 1 or more")
    return n


# -- helpers ----------------------------------------------------------------------------
def iso(ts: float | None) -> str | None:
    """A Unix time as ISO 8601 UTC (``2026-01-02T03:04:05Z``)."""
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def cell(value: Any, width: int | None = None) -> str:
    """A value for a terminal: control characters escaped, optionally shortened."""
    text = "" if value is None else str(value)
    text = "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in text)
    if width is not None and len(text) > width:
        text = text[: width - 3] + "..."
    return text


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Left-aligned columns, numbers right-aligned, two spaces apart."""
    texts = [[cell(v) for v in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in texts]) for i, h in enumerate(header)]
    numeric = [all(isinstance(row[i], int) for row in rows) and bool(rows) for i in range(len(header))]

    def line(values: Sequence[str]) -> str:
        parts = [v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric, strict=True)]
        return "  ".join(parts).rstrip()

    return "\n".join([line(header)] + [line(r) for r in texts]) + "\n"


def fail(message: str, code: int) -> int:
    print(f"mjfilter: {message}", file=sys.stderr)
    return code


def with_store(body: Callable[[argparse.Namespace, Store], int]) -> Command:
    """Run ``body`` with the store the configuration names; map errors to exit codes 1 and 2."""

    def run(args: argparse.Namespace) -> int:
        try:
            loaded = load_config(config_path(args.config))
        except ConfigError as e:
            print(str(e), file=sys.stderr)
            return EXIT_CONFIG
        cfg = loaded.config
        try:
            store = open_store(cfg.store_url, cfg.store.timeout, base=loaded.path.resolve().parent,
                               prefix=cfg.store.prefix)
            try:
                return body(args, store)
            finally:
                store.close()
        except UsageError as e:
            return fail(str(e), EXIT_CONFIG)
        except StoreUnavailable as e:
            return fail(f"store unavailable ({mask_url(cfg.store_url)}): {e}", EXIT_FAIL)

    run.__doc__ = body.__doc__
    return run


def parse_entry(text: str) -> str:
    try:
        return normalize_entry(text)
    except ValueError as e:
        raise UsageError(str(e)) from None


# -- suppress -----------------------------------------------------------------------------
def suppress_add(args: argparse.Namespace, store: Store) -> int:
    """``suppress add LIST ENTRY``."""
    entry = SuppressionEntry(args.list, parse_entry(args.entry), args.code, args.reason or None)
    store.suppress_add([entry])
    print(f"added {entry.entry} to {entry.list}")
    return EXIT_OK


def suppress_remove(args: argparse.Namespace, store: Store) -> int:
    """``suppress remove LIST ENTRY``: exit 1 when the entry was not there."""
    entry = parse_entry(args.entry)
    if store.suppress_remove(args.list, entry):
        print(f"removed {entry} from {args.list}")
        return EXIT_OK
    return fail(f"{entry} is not on the {args.list} list", EXIT_FAIL)


def entry_json(e: SuppressionEntry) -> dict[str, Any]:
    return {**e.as_dict(), "added": iso(e.added)}


def suppress_list(args: argparse.Namespace, store: Store) -> int:
    """``suppress list [LIST]``."""
    entries = store.suppress_entries(args.list)
    if args.json:
        print(json.dumps([entry_json(e) for e in entries], indent=2, ensure_ascii=False))
        return EXIT_OK
    if not entries:
        print(f"no entries{f' on the {args.list} list' if args.list else ''}")
        return EXIT_OK
    rows = [(e.list, e.entry, e.code if e.code is not None else "-", cell(e.reason or "", 60), iso(e.added))
            for e in entries]
    sys.stdout.write(table(("LIST", "ENTRY", "CODE", "REASON", "ADDED"), rows))
    return EXIT_OK


@dataclass(slots=True)
class ParsedCsv:
    entries: list[SuppressionEntry]
    errors: list[str]
    skipped: int  # rows of another list (exported files carry a list column)


def _row_entry(list_name: str, values: dict[str, str]) -> SuppressionEntry:
    """One CSV row -> an entry; ``ValueError``/``ArgumentTypeError`` say what is wrong."""
    entry = normalize_entry(values.get("entry", ""))
    code_text = values.get("code", "").strip()
    code = None
    if code_text:
        code = smtp_code(code_text)
    reason = check_reason(values.get("reason", "")) or None
    return SuppressionEntry(list_name, entry, code, reason)


def _header(row: list[str]) -> list[str] | None:
    """The column names when ``row`` is a header row (it names an ``entry`` column)."""
    names = [c.strip().lower() for c in row]
    return names if "entry" in names else None


def parse_csv(name: str, stream: IO[str], list_name: str) -> ParsedCsv:
    """Read ``entry[,code[,reason]]`` rows (or named columns after a header row)."""
    out = ParsedCsv([], [], 0)
    columns: list[str] = list(CSV_COLUMNS)
    positional = True
    seen_data = False
    reader = csv.reader(stream)
    while True:
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            out.errors.append(f"{name}:{reader.line_num}: {e}")
            break
        line = reader.line_num
        if not row or all(not c.strip() for c in row) or row[0].lstrip().startswith("#"):
            continue
        if not seen_data:
            seen_data = True
            header = _header(row)
            if header is not None:
                unknown = [c for c in header if c not in EXPORT_COLUMNS]
                if unknown or len(set(header)) != len(header):
                    out.errors.append(f"{name}:{line}: header columns must be among "
                                      f"{', '.join(EXPORT_COLUMNS)} (each once), got {', '.join(header)}")
                    break
                columns, positional = header, False
                continue
        if len(row) > len(columns):
            what = "entry[,code[,reason]]" if positional else ",".join(columns)
            out.errors.append(f"{name}:{line}: {len(row)} columns, expected {what}")
            continue
        values = dict(zip(columns, row, strict=False))
        row_list = values.get("list", list_name).strip().lower() or list_name
        if row_list not in LISTS:
            out.errors.append(f"{name}:{line}: unknown list {row_list!r} (lists: {', '.join(LISTS)})")
            continue
        if row_list != list_name:
            out.skipped += 1
            continue
        try:
            out.entries.append(_row_entry(list_name, values))
        except (ValueError, argparse.ArgumentTypeError) as e:
            out.errors.append(f"{name}:{line}: {e}")
    return out


def read_csv(path: str, list_name: str) -> ParsedCsv:
    """Parse FILE (``-``: standard input); an unreadable file is a ``UsageError``."""
    if path == "-":
        return parse_csv("<stdin>", io.TextIOWrapper(sys.stdin.buffer, encoding="utf-8-sig", newline=""), list_name)
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            return parse_csv(path, f, list_name)
    except OSError as e:
        raise UsageError(f"cannot read {path}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise UsageError(f"{path}: not UTF-8 text: {e.reason} at byte {e.start}") from None


def suppress_import(args: argparse.Namespace, store: Store) -> int:
    """``suppress import LIST FILE``: all rows or nothing."""
    parsed = read_csv(args.file, args.list)
    if parsed.errors:
        for err in parsed.errors:
            print(err, file=sys.stderr)
        return fail(f"nothing imported ({len(parsed.errors)} bad row{'s' if len(parsed.errors) != 1 else ''})",
                    EXIT_CONFIG)
    n = store.suppress_add(parsed.entries)
    skipped = f" (skipped {parsed.skipped} rows of other lists)" if parsed.skipped else ""
    print(f"imported {n} entr{'ies' if n != 1 else 'y'} into {args.list}{skipped}")
    return EXIT_OK


def write_export(entries: Sequence[SuppressionEntry], out: IO[str]) -> None:
    w = csv.writer(out, lineterminator="\n")
    w.writerow(EXPORT_COLUMNS)
    for e in entries:
        w.writerow((e.list, e.entry, "" if e.code is None else e.code, e.reason or ""))


def suppress_export(args: argparse.Namespace, store: Store) -> int:
    """``suppress export [LIST] [--output FILE]``."""
    entries = store.suppress_entries(args.list)
    if args.output in (None, "-"):
        write_export(entries, sys.stdout)
        return EXIT_OK
    try:
        with open(args.output, "w", encoding="utf-8", newline="") as f:
            write_export(entries, f)
    except OSError as e:
        raise UsageError(f"cannot write {args.output}: {e.strerror or e}") from None
    print(f"exported {len(entries)} entr{'ies' if len(entries) != 1 else 'y'} to {args.output}", file=sys.stderr)
    return EXIT_OK


SUPPRESS: dict[str, Command] = {
    "add": with_store(suppress_add),
    "remove": with_store(suppress_remove),
    "list": with_store(suppress_list),
    "import": with_store(suppress_import),
    "export": with_store(suppress_export),
}


def cmd_suppress(args: argparse.Namespace) -> int:
    return SUPPRESS[args.suppress_command](args)


# -- campaigns, store check, events -------------------------------------------------------------
def campaigns(args: argparse.Namespace, store: Store) -> int:
    """``campaigns``: every campaign's counters, most recently seen first."""
    stats = store.campaigns()
    if args.json:
        print(json.dumps([{**c.as_dict(), "first_seen": iso(c.first_seen), "last_seen": iso(c.last_seen)}
                          for c in stats], indent=2, ensure_ascii=False))
        return EXIT_OK
    if not stats:
        print("no campaigns yet")
        return EXIT_OK
    rows = [(c.tenant, c.campaign, c.messages, c.delivered, c.blocked, iso(c.first_seen) or "-",
             iso(c.last_seen) or "-") for c in stats]
    sys.stdout.write(table(("TENANT", "CAMPAIGN", "MESSAGES", "DELIVERED", "BLOCKED", "FIRST SEEN", "LAST SEEN"),
                           rows))
    return EXIT_OK


def store_check(args: argparse.Namespace, store: Store) -> int:
    """``store check``: exit 0 when the report says ok."""
    report = store.check()
    ok = report.get("ok") is True
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    else:
        for key, value in report.items():
            if isinstance(value, dict):
                value = ", ".join(f"{k}={v}" for k, v in value.items())
            elif isinstance(value, list):
                value = "; ".join(str(v) for v in value) or "none"
            print(f"{key}: {cell(value)}")
    return EXIT_OK if ok else EXIT_FAIL


STORE: dict[str, Command] = {"check": with_store(store_check)}


def cmd_store(args: argparse.Namespace) -> int:
    return STORE[args.store_command](args)


def event_value(value: Any) -> str:
    """One event field for a terminal: JSON-quoted, at most 80 characters, no control characters."""
    if isinstance(value, str):
        short = value if len(value) <= 80 else value[:77] + "..."
        return cell(json.dumps(short, ensure_ascii=False))
    return cell(json.dumps(value, ensure_ascii=False, default=str), 80)


def event_line(ev: dict[str, Any]) -> str:
    """``TIME EVENT EMAIL key="value" ...`` (values shortened, control characters escaped)."""
    t = ev.get("time")
    when = iso(t) if isinstance(t, (int, float)) else cell(t)
    rest = [f"{cell(k)}={event_value(v)}" for k, v in ev.items()
            if k not in ("time", "event", "email") and v is not None]
    return " ".join([when or "-", cell(ev.get("event")) or "-", cell(ev.get("email")) or "-", *rest])


def events(args: argparse.Namespace, store: Store) -> int:
    """``events``: the most recent events, oldest first."""
    found = store.events(limit=args.limit)
    for ev in found:
        print(json.dumps(ev, ensure_ascii=False) if args.json else event_line(ev))
    if not found and not args.json:
        print("no events yet")
    return EXIT_OK


COMMANDS: dict[str, Command] = {
    "suppress": cmd_suppress,
    "campaigns": with_store(campaigns),
    "store": cmd_store,
    "events": with_store(events),
}


# -- parsers ------------------------------------------------------------------------------
SUPPRESS_DESCRIPTION = """\
Manage the master suppression lists the `suppression` step checks:

  unsubscribe  checked only when a message sets X-Mxm-Flags bit 4, or when the
               step's check_unsubscribe is on
  bounce       checked for every message unless X-Mxm-Flags bit 8 is set

An ENTRY is an address (user@example.org) or a whole domain (example.org or
@example.org); entries are stored lowercased, and an address entry wins over
its domain's. A recipient found on a list is removed from the message; when
no recipient is left the message is refused with the entry's --code (default
550; a 4xx code makes the client retry later) and its --reason."""

SUPPRESS_EXAMPLES = """\
examples:
  mjfilter suppress add unsubscribe bob@example.org --reason "unsubscribed by mail"
  mjfilter suppress add bounce gone.example --code 550 --reason "domain does not exist"
  mjfilter suppress remove unsubscribe bob@example.org
  mjfilter suppress list --json
  mjfilter suppress import unsubscribe unsubscribed.csv
  mjfilter suppress export unsubscribe --output unsubscribed.csv
"""

IMPORT_DESCRIPTION = """\
Add every row of a CSV file (FILE, or - for standard input) to LIST.

Rows are entry[,code[,reason]]: an address or domain, an optional 4xx/5xx code
and an optional reason. Blank lines and lines starting with # are skipped. A
first row that names an `entry` column is a header: its column names (entry,
code, reason and list, in any order) are then used, so a file written by
`mjfilter suppress export` imports as it is (rows of another list are skipped).
An entry already on the list is replaced.

All or nothing: a bad row is reported as FILE:LINE: reason, nothing is
imported, and the exit status is 2."""

IMPORT_EXAMPLES = """\
example file:
  entry,code,reason
  bob@example.org,550,unsubscribed 2026-01-02
  # a whole domain, default code
  example.net

examples:
  mjfilter suppress import unsubscribe unsubscribed.csv
  mjfilter suppress export | mjfilter suppress import bounce -
"""

CAMPAIGNS_DESCRIPTION = """\
Print the counters the `dedup` step keeps for every campaign (X-Mailjet-Campaign)
of every accepted or discarded message, most recently seen first:

  TENANT      the SASL login that sent the campaign ('-' when unauthenticated)
  CAMPAIGN    the campaign name
  MESSAGES    messages that named the campaign
  DELIVERED   recipients the messages went to
  BLOCKED     recipients removed as duplicates (X-Mailjet-DeduplicateCampaign)
  FIRST SEEN, LAST SEEN   ISO 8601, UTC

--json prints a list of objects with the keys tenant, campaign, messages,
delivered, blocked, first_seen, last_seen."""

STORE_DESCRIPTION = """\
Check the state store the configuration names (SQLite file or Redis): can it be
reached, is it intact (SQLite integrity_check), how large is it. Prints the
backend's report; exit status 0 when it is ok, 1 when it is not or when the
store does not answer within store.timeout."""

EVENTS_DESCRIPTION = """\
Print the most recent events kept in the store, oldest first: blocked
recipients (duplicates, suppressed addresses) and whatever else the chain
reports. Events of tempfailed attempts are not kept (the client retries, and
the retry reports them).

Each line: TIME EVENT EMAIL key="value" ... (long values are shortened).
--json prints one JSON object per line, complete, with the keys event, email,
time (Unix seconds), MessageID, customcampaign, CustomID, Payload, queue_id,
plus the event's own (error, campaign, list, entry, reason ...)."""


def _sub(sub: Any, name: str, help: str, description: str, epilog: str | None,
         formatter: type[argparse.HelpFormatter]) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = sub.add_parser(name, help=help, description=description, epilog=epilog,
                                                formatter_class=formatter)
    return p


def _list_arg(p: argparse.ArgumentParser, optional: bool = False) -> None:
    if optional:
        p.add_argument("list", metavar="LIST", nargs="?", choices=LISTS,
                       help="unsubscribe or bounce (default: both)")
    else:
        p.add_argument("list", metavar="LIST", choices=LISTS, help="unsubscribe or bounce")


def add_suppress(sub: Any, add_config: Callable[[argparse.ArgumentParser], None],
                 formatter: type[argparse.HelpFormatter]) -> None:
    p = _sub(sub, "suppress", "manage the unsubscribe and bounce suppression lists",
             SUPPRESS_DESCRIPTION, SUPPRESS_EXAMPLES, formatter)
    ssub = p.add_subparsers(dest="suppress_command", metavar="SUBCOMMAND", required=True)

    sp = _sub(ssub, "add", "add or replace an entry", textwrap.dedent("""\
        Add ENTRY (an address or a domain) to LIST, or replace the entry that is there.
        --code is the SMTP code a message gets when every recipient is suppressed
        (4xx: the client retries later; 5xx: refused); --reason appears in that reply
        (shortened) and in the recipient's blocked event."""),
              "examples:\n  mjfilter suppress add unsubscribe bob@example.org --reason \"unsubscribed\"\n"
              "  mjfilter suppress add bounce example.net --code 550 --reason \"no such domain\"\n", formatter)
    add_config(sp)
    _list_arg(sp)
    sp.add_argument("entry", metavar="ENTRY", help="user@domain, or domain / @domain for a whole domain")
    sp.add_argument("--code", type=smtp_code, metavar="N", help="4xx or 5xx reply code (default: the step's, 550)")
    sp.add_argument("--reason", type=reason_text, metavar="TEXT", help="why (one line, at most 200 characters)")

    sp = _sub(ssub, "remove", "remove an entry", textwrap.dedent("""\
        Remove ENTRY from LIST. Exit status 1 when it was not on the list. A domain
        entry and the address entries of that domain are separate entries."""),
              "example:\n  mjfilter suppress remove unsubscribe bob@example.org\n", formatter)
    add_config(sp)
    _list_arg(sp)
    sp.add_argument("entry", metavar="ENTRY", help="user@domain, or domain / @domain")

    sp = _sub(ssub, "list", "print the entries of one list or both", textwrap.dedent("""\
        Print the entries of LIST (default: both lists) as a table: list, entry, code,
        reason, when it was added (ISO 8601, UTC). --json prints a list of objects
        with the keys list, entry, code, reason, added."""),
              "examples:\n  mjfilter suppress list\n  mjfilter suppress list bounce --json\n", formatter)
    add_config(sp)
    _list_arg(sp, optional=True)
    sp.add_argument("--json", action="store_true", help="print JSON instead of a table")

    sp = _sub(ssub, "import", "add the entries of a CSV file (all or nothing)", IMPORT_DESCRIPTION,
              IMPORT_EXAMPLES, formatter)
    add_config(sp)
    _list_arg(sp)
    sp.add_argument("file", metavar="FILE", help="CSV file; - reads standard input")

    sp = _sub(ssub, "export", "write the entries as CSV", textwrap.dedent("""\
        Write the entries of LIST (default: both lists) as CSV with a header row:
        list,entry,code,reason (an empty code means the step's default). The output
        imports back with `mjfilter suppress import`."""),
              "examples:\n  mjfilter suppress export > lists.csv\n"
              "  mjfilter suppress export bounce --output bounce.csv\n", formatter)
    add_config(sp)
    _list_arg(sp, optional=True)
    sp.add_argument("--output", "-o", metavar="FILE", help="write to FILE (default: standard output)")


def add_commands(sub: Any, add_config: Callable[[argparse.ArgumentParser], None],
                 formatter_class: type[argparse.HelpFormatter] | None = None) -> None:
    """Add ``suppress``, ``campaigns``, ``store`` and ``events`` to the ``mjfilter`` subparsers ``sub``."""
    fmt = formatter_class or HelpFormatter
    add_suppress(sub, add_config, fmt)

    p = _sub(sub, "campaigns", "show per-campaign message, delivery and duplicate counters",
             CAMPAIGNS_DESCRIPTION, "examples:\n  mjfilter campaigns\n  mjfilter campaigns --json\n", fmt)
    add_config(p)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")

    p = _sub(sub, "store", "state store tools", textwrap.dedent("""\
        State store tools. The store keeps dedup reservations, the suppression lists,
        campaign counters and events: store.url in the configuration (default: SQLite
        at STATE_DIR/mjfilter.db; redis://HOST:PORT/DB for several nodes)."""),
             "examples:\n  mjfilter store check\n  mjfilter store check --json\n", fmt)
    ssub = p.add_subparsers(dest="store_command", metavar="SUBCOMMAND", required=True)
    sp = _sub(ssub, "check", "check that the store answers and is intact", STORE_DESCRIPTION,
              "examples:\n  mjfilter store check\n  mjfilter store check --json\n", fmt)
    add_config(sp)
    sp.add_argument("--json", action="store_true", help="print the report as JSON")

    p = _sub(sub, "events", "print the most recent events (blocked recipients ...)", EVENTS_DESCRIPTION,
             "examples:\n  mjfilter events --limit 50\n  mjfilter events --json | jq 'select(.event == \"blocked\")'\n",
             fmt)
    add_config(p)
    p.add_argument("--limit", type=positive, default=20, metavar="N", help="how many events (default 20)")
    p.add_argument("--json", action="store_true", help="one JSON object per line")

