"""What Postfix needs for a given configuration: main.cf and master.cf lines.

``mjfilter postfix-config`` prints these, and the real-Postfix tests install
exactly this output, so the documentation and the code cannot drift apart.
"""

from __future__ import annotations

from .config import Config, parse_listen
from .actions import ROUTE_HEADER
from .routing import Router

# milter_header_checks: the route header becomes FILTER transport:nexthop. "$$1" is main.cf's
# escape for the regexp table's "$1" (a lone "$" starts a main.cf macro).
ROUTE_FILTER = "regexp:{{/^" + ROUTE_HEADER + ":[[:space:]]*([^[:space:]]+)/ FILTER $$1}}"
# Credentials in control headers (x-mq-smarthost-password) must not reach the queue file:
# a milter's header delete leaves the original bytes in it, while cleanup's header_checks
# drop the header before it is written (the milter then never sees it either).
CREDENTIAL_STRIP = "regexp:{{/^x-mq-[^:]*password[^:]*:/ IGNORE}}"
# With per-message rules, Received lines (a message's first header) and the smarthost username
# and password lines go to the socketmap instead: it keeps the credentials under a token,
# drops the password line (IGNORE: not logged) and replaces the username line with the
# token, which the milter redeems (mjfilter.routing.vault).
CREDENTIAL_PIPE = ("pipemap:{regexp:{{/^((received|x-mq-smarthost-(username|password|username-ref))"
                   "[[:space:]]*:.*)/ $$1}}, SOCKETMAP}")
# The route transports remove the route header on the way out.
ROUTE_STRIP = "regexp:{{/^" + ROUTE_HEADER + ":/ IGNORE}}"
TLS_OPTIONS = {
    "none": ["smtp_tls_security_level=none"],
    "may": ["smtp_tls_security_level=may"],
    "required": ["smtp_tls_security_level=encrypt"],
    "implicit": ["smtp_tls_wrappermode=yes", "smtp_tls_security_level=encrypt"],
}

MAIL_MACROS = "i {auth_type} {auth_authen} {auth_author} {mail_addr} {mail_host} {mail_mailer}"


def milter_address(config: Config) -> str:
    kind, host, port, path = parse_listen(config.milter.listen)
    if kind == "unix":
        return f"unix:{path}"
    return f"{kind}:[{host}]:{port}" if kind == "inet6" else f"{kind}:{host}:{port}"


def socketmap_table(config: Config, table: str) -> str:
    """``socketmap:inet:HOST:PORT:TABLE`` (or ``socketmap:unix:PATH:TABLE``) for mjfilter's table."""
    kind, host, port, path = parse_listen(config.routing.socketmap)
    where = f"unix:{path}" if kind == "unix" else f"inet:{host}:{port}"
    return f"socketmap:{where}:{table}"


def main_cf(config: Config) -> list[tuple[str, str]]:
    """(parameter, value) pairs for main.cf.

    A priority route without a smarthost is ``FILTER transport:`` with no next hop:
    Postfix then delivers to the recipient domain's MX (``default_filter_nexthop``
    empty). A Postfix that sends through ``relayhost`` should set
    ``default_filter_nexthop = $relayhost`` (docs/routing.md).
    """
    routing = [("milter_header_checks", ROUTE_FILTER)] if config.routing.enabled else []
    return routing + [
        # The socketmap sees header lines only where per-message smarthosts are allowed.
        ("header_checks", CREDENTIAL_PIPE.replace("SOCKETMAP", socketmap_table(config, "credential"))
                          if config.routing.per_message.allow else CREDENTIAL_STRIP),
        ("smtpd_milters", milter_address(config)),
        ("non_smtpd_milters", "$smtpd_milters"),
        # Never relay unfiltered mail: if mjfilter is down or errs, clients get 4xx and retry.
        ("milter_default_action", "tempfail"),
        ("milter_protocol", "6"),
        ("milter_connect_timeout", "30s"),
        ("milter_command_timeout", "30s"),
        ("milter_content_timeout", "300s"),
        ("milter_mail_macros", MAIL_MACROS),
    ]


def master_cf(config: Config) -> str:
    """The reinjection listener: a second smtpd on loopback that skips the milter."""
    r = config.reinject
    opts = [
        "content_filter=",
        "receive_override_options=no_unknown_recipient_checks,no_header_body_checks,no_milters",
        "smtpd_milters=",
        "non_smtpd_milters=",
        "smtpd_helo_restrictions=",
        "smtpd_client_restrictions=",
        "smtpd_sender_restrictions=",
        "smtpd_relay_restrictions=permit_mynetworks,reject",
        "smtpd_recipient_restrictions=permit_mynetworks,reject",
        "smtpd_data_restrictions=",
        "mynetworks=127.0.0.0/8",
        "smtpd_authorized_xforward_hosts=127.0.0.0/8",
    ]
    lines = [f"{r.host}:{r.port} inet n - n - - smtpd"] + [f"  -o {o}" for o in opts]
    return "\n".join(lines) + "\n"


def transports_cf(config: Config, router: Router) -> str:
    """master.cf entries of the transports routes name: one per TLS policy and priority."""
    lines: list[str] = []
    for name, tls, table, per_sender in router.transports():
        lines.append(f"{name} unix - - n - - smtp")
        opts = [f"syslog_name=postfix/{name}"] + (TLS_OPTIONS[tls] if tls else [])
        if table:
            opts += [
                "smtp_sasl_auth_enable=yes",
                f"smtp_sasl_password_maps={socketmap_table(config, table)}",
                # yes: credentials by sender first (Postfix then does not reuse connections);
                # no: by [host]:port, connections to the smarthost are reused
                f"smtp_sender_dependent_authentication={'yes' if per_sender else 'no'}",
                "smtp_sasl_security_options=noanonymous",
                "smtp_sasl_tls_security_options=noanonymous",
            ]
        lines += [f"  -o {o}" for o in opts]
        lines.append(f"  -o {{ smtp_header_checks = {ROUTE_STRIP} }}")
    return "\n".join(lines) + "\n" if lines else ""


def alternative_cf(config: Config) -> list[str]:
    """Commented main.cf lines for routing by Postfix's own sender-dependent maps instead."""
    return [
        "# Instead of the route header, Postfix can ask mjfilter's maps itself (per sender only:",
        "# no per-message smarthosts or priorities then): remove milter_header_checks and set",
        f"#   smtp_header_checks = {ROUTE_STRIP}",
        f"#   sender_dependent_default_transport_maps = {socketmap_table(config, 'transport')}",
        f"#   sender_dependent_relayhost_maps = {socketmap_table(config, 'relayhost')}",
        "#   smtp_sasl_auth_enable = yes",
        "#   smtp_sender_dependent_authentication = yes",
        f"#   smtp_sasl_password_maps = {socketmap_table(config, 'sasl')}",
    ]


def render(config: Config, main: bool = True, master: bool = True, router: Router | None = None) -> str:
    out = []
    if main:
        out.append("# --- main.cf (append, or set with `postconf -e`) ---")
        out.extend(f"{k} = {v}" for k, v in main_cf(config))
        if config.milter.listen.startswith(("unix:", "local:")):
            out.append("# smtpd must not be chrooted to reach this socket (master.cf chroot column = n),")
            out.append("# or the socket must live inside the queue directory.")
    if master:
        if out:
            out.append("")
        out.append("# --- master.cf (append): the reinjection listener mjfilter hands extra copies to ---")
        out.append(master_cf(config).rstrip("\n"))
    if router is not None and config.routing.enabled:
        if main:
            out.append("")
            out.append("# --- main.cf (routing): the alternative to the route header ---")
            out.extend(alternative_cf(config))
        if master:
            out.append("")
            out.append("# --- master.cf (append): the transports mjfilter's routes name "
                       "(TLS policy, SASL through mjfilter's socketmap, priority) ---")
            out.append(transports_cf(config, router).rstrip("\n"))
    return "\n".join(out) + "\n"
