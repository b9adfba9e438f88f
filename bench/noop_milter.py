"""A no-op pymilter milter, the Python floor the benchmark compares mjfilter with.

    python bench/noop_milter.py inet:127.0.0.1:PORT | unix:/PATH

It asks Postfix for the same events mjfilter does (connect, HELO, MAIL, RCPT,
DATA, each header, end of headers, the body, end of message), answers none of
them but DATA and end-of-message (``@Milter.noreply``, so Postfix does not wait),
and changes nothing: every message is accepted as it came.

The 40 ms stall over TCP is fixed the way mjfilter fixes it: the DATA step is
negotiated (Postfix then waits for its reply instead of sending the DATA macros
and the headers back to back), and TCP_NODELAY is set on libmilter's listening
socket (accepted sockets inherit it on Linux). A unix socket is made 0666 so
that Postfix's smtpd (user postfix) can connect.

Prints ``ready`` on stdout once the socket listens; SIGTERM/SIGINT stop it.
"""

from __future__ import annotations

import os
import sys

import Milter
import milter

from mjfilter.frontends.milter import set_nodelay  # the helper mjfilter itself uses


class NoOp(Milter.Base):
    """Sees the whole message, does nothing."""

    @Milter.noreply
    def connect(self, hostname, family, hostaddr):  # type: ignore[no-untyped-def]
        return Milter.CONTINUE

    @Milter.noreply
    def hello(self, heloname):  # type: ignore[no-untyped-def]
        return Milter.CONTINUE

    @Milter.noreply
    def envfrom(self, sender, *args):  # type: ignore[no-untyped-def]
        return Milter.CONTINUE

    @Milter.noreply
    def envrcpt(self, rcpt, *args):  # type: ignore[no-untyped-def]
        return Milter.CONTINUE

    def data(self):  # type: ignore[no-untyped-def]
        # Replied on purpose (not @noreply): the stall fix, see the module docstring.
        return Milter.CONTINUE

    @Milter.noreply
    def header(self, name, value):  # type: ignore[no-untyped-def]
        return Milter.CONTINUE

    @Milter.noreply
    def eoh(self):  # type: ignore[no-untyped-def]
        return Milter.CONTINUE

    @Milter.noreply
    def body(self, chunk):  # type: ignore[no-untyped-def]
        return Milter.CONTINUE

    def eom(self):  # type: ignore[no-untyped-def]
        return Milter.ACCEPT


def to_libmilter(listen: str) -> tuple[str, str | None, int | None, str | None]:
    """``inet:HOST:PORT`` or ``unix:/PATH`` -> (libmilter address, host, port, path)."""
    kind, _, rest = listen.partition(":")
    if kind in ("unix", "local"):
        return f"unix:{rest}", None, None, rest
    if kind == "inet":
        host, _, port = rest.rpartition(":")
        return f"inet:{port}@{host}", host, int(port), None
    raise SystemExit(f"usage: {sys.argv[0]} inet:HOST:PORT | unix:/PATH (got {listen!r})")


def main() -> int:
    if len(sys.argv) != 2:
        raise SystemExit(f"usage: {sys.argv[0]} inet:HOST:PORT | unix:/PATH")
    address, host, port, path = to_libmilter(sys.argv[1])
    Milter.factory = NoOp
    # What Milter.runmilter does, with the socket opened first so TCP_NODELAY can be set on it.
    milter.set_connect_callback(Milter.connect_callback)
    milter.set_helo_callback(lambda ctx, h: ctx.getpriv().hello(h))
    milter.set_envfrom_callback(lambda ctx, *b: ctx.getpriv().envfrom_bytes(*b))
    milter.set_envrcpt_callback(lambda ctx, *b: ctx.getpriv().envrcpt_bytes(*b))
    milter.set_header_callback(lambda ctx, f, v: ctx.getpriv().header_bytes(f, v))
    milter.set_eoh_callback(lambda ctx: ctx.getpriv().eoh())
    milter.set_body_callback(lambda ctx, chunk: ctx.getpriv().body(chunk))
    milter.set_eom_callback(lambda ctx: ctx.getpriv().eom())
    milter.set_abort_callback(lambda ctx: ctx.getpriv().abort())
    milter.set_close_callback(Milter.close_callback)
    milter.setconn(address)
    milter.settimeout(60)
    milter.register("noop", data=lambda ctx: ctx.getpriv().data(),
                    unknown=lambda ctx, cmd: ctx.getpriv().unknown(cmd),
                    negotiate=Milter.negotiate_callback)
    milter.opensocket(True)
    if path:
        os.chmod(path, 0o666)
    elif port and not set_nodelay(host or "", port):
        print("noop_milter: could not set TCP_NODELAY: expect 40 ms stalls", file=sys.stderr)
    print("ready", flush=True)
    milter.main()
    return 0


if __name__ == "__main__":
    sys.exit(main())
