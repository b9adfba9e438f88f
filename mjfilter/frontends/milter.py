"""The milter front end (pymilter): Postfix ``smtpd_milters``/``non_smtpd_milters``, Sendmail.

One ``MilterSession`` per MTA connection; a fresh ``Transaction`` at every MAIL
FROM; the chain runs at end-of-message and its ``Outcome`` is replayed as milter
actions. Only the actions the configured steps declare are negotiated, every
callback but DATA and end-of-message is ``noreply`` (the MTA does not wait), and
the DATA step is negotiated so that Postfix waits for our answer instead of
stalling on Nagle/delayed-ACK over TCP.

Fail closed: any error answers 451 4.3.0 with a generic text, details in the log.
"""

from __future__ import annotations

import grp
import logging
import os
import socket
import stat
import time
from pathlib import Path
from typing import Any
from collections.abc import Callable

import Milter
import milter

from ..actions import (ROUTE_HEADER, TEMPFAIL_REPLY, AddHeader, AddRecipient, ChangeHeader, ChangeSender,
                       DeleteRecipient, InsertHeader, ReplaceBody, Reply)
from ..app import App, Runtime
from ..chain import Outcome, tempfail_outcome
from ..config import libmilter_address, parse_listen
from ..logsetup import queue_id
from ..model import Body, Connection, Envelope, Message, Transaction
from ..sender import ReinjectError, reinject

log = logging.getLogger(__name__)

SHUTDOWN_REPLY = Reply(451, "4.3.2", "Content filter shutting down, please try again later")

# capability -> libmilter action flag
_ACTION_FLAGS = {
    "add_header": Milter.ADDHDRS,
    "change_header": Milter.CHGHDRS,
    "replace_body": Milter.CHGBODY,
    "change_sender": Milter.CHGFROM,
    "add_recipient": Milter.ADDRCPT | Milter.ADDRCPT_PAR,
    "delete_recipient": Milter.DELRCPT,
    "quarantine": Milter.QUARANTINE,
}


def action_flags(capabilities: frozenset[str]) -> int:
    flags = 0
    for cap in capabilities:
        flags |= _ACTION_FLAGS[cap]
    return flags | Milter.ADDHDRS  # the route hand-back header


def _strip_brackets(addr: str) -> str:
    addr = addr.strip()
    if addr.startswith("<") and addr.endswith(">"):
        addr = addr[1:-1]
    return addr


def _params(args: tuple[str, ...]) -> dict[str, str | None]:
    return Milter.param2dict(list(args)) if args else {}


def _milter_text(text: str) -> str:
    return text.replace("%", "%%")


class MilterSession(Milter.Base):
    """One MTA connection."""

    def __init__(self, app: App) -> None:
        self.app = app
        self.conn = Connection()
        self.txn: Transaction | None = None
        self.rt: Runtime | None = None
        self.too_big = False
        self.refused = False  # began while the daemon was shutting down

    # -- negotiation -----------------------------------------------------------
    def negotiate(self, opts: list[int]) -> Any:
        offered = opts[0]
        rc = super().negotiate(opts)
        wanted = action_flags(self.app.runtime.chain.capabilities)
        opts[0] = self._actions = offered & wanted
        return rc

    # -- connection-level callbacks ----------------------------------------------
    @Milter.noreply
    def connect(self, hostname: str, family: int, hostaddr: Any) -> int:
        self.conn.hostname = hostname
        if family in (socket.AF_INET, socket.AF_INET6) and isinstance(hostaddr, tuple):
            self.conn.client_addr, self.conn.client_port = hostaddr[0], hostaddr[1]
        for m in ("j", "{daemon_name}", "{daemon_addr}", "_", "v"):
            v = self.getsymval(m)
            if v:
                self.conn.macros[m] = v
        return Milter.CONTINUE

    @Milter.noreply
    def hello(self, heloname: str) -> int:
        self.conn.helo = heloname
        return Milter.CONTINUE

    # -- transaction ---------------------------------------------------------------
    def _reset(self) -> None:
        if self.txn is not None:
            self.txn.message.body.close()
        self.txn = None
        if self.rt is not None:
            self.app.release(self.rt)
            self.rt = None
        self.too_big = False

    @Milter.noreply
    def envfrom(self, sender: str, *args: str) -> int:
        self._reset()
        self.rt = self.app.acquire()
        self.refused = self.app.draining
        cfg = self.rt.config.milter
        macros = {}
        for m in ("{auth_authen}", "{auth_type}", "{auth_author}", "i"):
            v = self.getsymval(m)
            if v:
                macros[m] = v
        self.txn = Transaction(
            self.conn,
            Envelope(_strip_brackets(sender), [], _params(args)),
            Message([], Body(spool_bytes=cfg.body_spool_bytes)),
            macros=macros,
            queue_id=macros.get("i"),
            auth_user=macros.get("{auth_authen}"),
        )
        return Milter.CONTINUE

    @Milter.noreply
    def envrcpt(self, rcpt: str, *args: str) -> int:
        if self.txn is not None:
            addr = _strip_brackets(rcpt)
            self.txn.envelope.recipients.append(addr)
            if args:
                self.txn.envelope.recipient_params[addr] = _params(args)
        return Milter.CONTINUE

    def data(self) -> int:
        # Negotiated on purpose: Postfix then waits for this reply instead of
        # sending the DATA macros and the headers back to back (a ~40 ms stall on TCP).
        if self.txn is not None and not self.txn.queue_id:
            self.txn.queue_id = self.getsymval("i") or None
        return Milter.CONTINUE

    @Milter.noreply
    def header(self, name: str, value: bytes) -> int:
        if self.txn is not None:
            self.txn.message.headers.append((name, value if isinstance(value, bytes) else value.encode()))
        return Milter.CONTINUE

    @Milter.noreply
    def eoh(self) -> int:
        return Milter.CONTINUE

    @Milter.noreply
    def body(self, chunk: bytes) -> int:
        txn = self.txn
        if txn is not None and not self.too_big:
            body = txn.message.body
            if self.rt is not None and body.size + len(chunk) > self.rt.config.milter.max_message_bytes:
                self.too_big = True
            else:
                body.write(chunk)
        return Milter.CONTINUE

    def eom(self) -> int:
        txn, rt = self.txn, self.rt
        if txn is None or rt is None:
            self.setreply("451", "4.3.0", _milter_text(TEMPFAIL_REPLY.text))
            return Milter.TEMPFAIL
        txn.queue_id = txn.queue_id or self.getsymval("i") or None
        token = queue_id.set(txn.queue_id or "-")
        t0 = time.perf_counter()
        outcome: Outcome | None = None
        note = ""
        try:
            if self.refused:
                outcome = Outcome("tempfail", SHUTDOWN_REPLY)
            elif self.too_big:
                outcome = Outcome("reject", Reply(552, "5.3.4", "Message too big for the content filter"))
            else:
                outcome = self.app.process(txn, rt)
            rc = self._apply(outcome, txn, rt)
        except ReinjectError as e:
            log.error("%s", e)
            self.app.metrics.reinject_failed()
            note = "reinjection failed"
            outcome = tempfail_outcome(str(e), outcome.trace if outcome else None)
            rc = self._reply(outcome.reply)
        except Exception as e:
            log.exception("internal error at end-of-message")
            note = f"internal error: {type(e).__name__}"
            outcome = tempfail_outcome(f"{type(e).__name__}: {e}", outcome.trace if outcome else None)
            rc = self._reply(outcome.reply)
        try:
            self.app.summarize(txn, outcome, (time.perf_counter() - t0) * 1e3, note)
            self.app.end(txn, outcome, rt)
        finally:
            queue_id.reset(token)
            self._reset()
        return rc

    def _reply(self, reply: Reply | None) -> int:
        reply = reply or TEMPFAIL_REPLY
        self.setreply(str(reply.code), reply.status, _milter_text(reply.text))
        return Milter.TEMPFAIL if reply.code < 500 else Milter.REJECT

    def _apply(self, outcome: Outcome, txn: Transaction, rt: Runtime) -> int:
        if outcome.verdict in ("reject", "tempfail"):
            return self._reply(outcome.reply)
        if outcome.deliveries:
            self.app.resolve([reinject(outcome.deliveries, rt.config.reinject)],
                             timeout=rt.config.reinject.timeout * (len(outcome.deliveries) + 1))
        if outcome.verdict == "discard":
            return Milter.DISCARD
        for edit in outcome.edits:
            if isinstance(edit, ChangeHeader):
                self.chgheader(edit.name, edit.occurrence,
                               None if edit.value is None else edit.value.decode("utf-8"))
            elif isinstance(edit, AddHeader):
                self.addheader(edit.name, edit.value.decode("utf-8"))
            elif isinstance(edit, InsertHeader):
                self.addheader(edit.name, edit.value.decode("utf-8"), edit.index)
            elif isinstance(edit, ReplaceBody):
                self._replace_body(edit.body)
            elif isinstance(edit, ChangeSender):
                self.chgfrom(f"<{edit.sender}>", " ".join(edit.params) or None)
            elif isinstance(edit, AddRecipient):
                self.addrcpt(f"<{edit.recipient}>", " ".join(edit.params) or None)
            elif isinstance(edit, DeleteRecipient):
                self.delrcpt(f"<{edit.recipient}>")
        if outcome.route is not None:
            self.addheader(ROUTE_HEADER, outcome.route.target)
        if outcome.verdict == "quarantine":
            self.quarantine(outcome.quarantine_reason or "held by mjfilter")
        return Milter.CONTINUE

    def _replace_body(self, body: Body) -> None:
        any_chunk = False
        for chunk in body.chunks(65535):
            self.replacebody(chunk)
            any_chunk = True
        if not any_chunk:
            self.replacebody(b"")

    def abort(self) -> int:
        # The client went away or sent RSET before end-of-message: the chain has not run.
        self._reset()
        return Milter.CONTINUE

    def close(self) -> int:
        self._reset()
        return Milter.CONTINUE


# -- running -----------------------------------------------------------------------
def _session(ctx: Any, app: App) -> MilterSession:
    s = ctx.getpriv()
    if s is None:
        s = MilterSession(app)
        s._setctx(ctx)
    return s


def set_nodelay(host: str, port: int) -> bool:
    """Set TCP_NODELAY on libmilter's listening socket (accepted sockets inherit it on Linux)."""
    for fd_name in os.listdir("/proc/self/fd"):
        try:
            fd = int(fd_name)
            if not stat.S_ISSOCK(os.fstat(fd).st_mode):
                continue
            s = socket.socket(fileno=os.dup(fd))
        except OSError:
            continue
        try:
            if s.family in (socket.AF_INET, socket.AF_INET6) and s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
                if s.getsockname()[1] == port:
                    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    return True
        except OSError:
            pass
        finally:
            s.close()
    return False


def _socket_permissions(path: str, group: str | None, mode: int) -> None:
    """Let the MTA reach a unix: socket: its group (``postfix`` by default) and mode."""
    if group:
        try:
            os.chown(path, -1, grp.getgrnam(group).gr_gid)
        except KeyError:
            log.warning("milter.socket_group %r does not exist: the socket keeps its group", group)
        except PermissionError:
            log.warning("cannot give the milter socket group %r (not root?)", group)
    os.chmod(path, mode)


def serve(app: App, on_ready: Callable[[], None] | None = None) -> None:
    """Run the milter until libmilter is told to stop (SIGTERM, SIGINT)."""
    cfg = app.config.milter
    kind, host, port, path = parse_listen(cfg.listen)
    if kind == "unix" and path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    milter.set_flags(action_flags(frozenset(_ACTION_FLAGS)))  # per connection, negotiate narrows it

    def negotiate(ctx: Any, opts: list[int]) -> Any:
        s = MilterSession(app)
        s._setctx(ctx)
        return s.negotiate(opts)

    milter.set_connect_callback(lambda ctx, h, f, a: _session(ctx, app).connect(h, f, a))
    milter.set_helo_callback(lambda ctx, h: ctx.getpriv().hello(h))
    milter.set_envfrom_callback(lambda ctx, *b: ctx.getpriv().envfrom(*[x.decode("utf-8", "surrogateescape") for x in b]))
    milter.set_envrcpt_callback(lambda ctx, *b: ctx.getpriv().envrcpt(*[x.decode("utf-8", "surrogateescape") for x in b]))
    milter.set_header_callback(lambda ctx, f, v: ctx.getpriv().header(f, v))
    milter.set_eoh_callback(lambda ctx: ctx.getpriv().eoh())
    milter.set_body_callback(lambda ctx, chunk: ctx.getpriv().body(chunk))
    milter.set_eom_callback(lambda ctx: ctx.getpriv().eom())
    milter.set_abort_callback(lambda ctx: ctx.getpriv().abort())
    milter.set_close_callback(_close)
    milter.setconn(libmilter_address(cfg.listen))
    milter.settimeout(cfg.timeout)
    milter.register(cfg.name, data=lambda ctx: ctx.getpriv().data(),
                    unknown=lambda ctx, cmd: Milter.CONTINUE, negotiate=negotiate)
    milter.opensocket(True)
    if kind == "unix" and path:
        _socket_permissions(path, cfg.socket_group, int(cfg.socket_mode, 8))
    elif port:
        if not set_nodelay(host or "", port):
            log.warning("could not set TCP_NODELAY on the milter socket: expect 40 ms stalls over TCP")
    log.info("milter listening on %s (%d steps: %s)", cfg.listen, len(app.runtime.chain.steps),
             ", ".join(s.name for s in app.runtime.chain.steps) or "none")
    if on_ready is not None:
        on_ready()
    milter.main()


def _close(ctx: Any) -> int:
    s = ctx.getpriv()
    if s is None:
        return Milter.CONTINUE
    try:
        return s.close()
    finally:
        s._setctx(None)
