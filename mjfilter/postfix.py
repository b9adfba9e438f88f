"""What Postfix needs for a given configuration: main.cf and master.cf lines.

``mjfilter postfix-config`` prints these, and the real-Postfix tests install
exactly this output, so the documentation and the code cannot drift apart.
"""

from __future__ import annotations

from .config import Config, parse_listen

MAIL_MACROS = "i {auth_type} {auth_authen} {auth_author} {mail_addr} {mail_host} {mail_mailer}"


def milter_address(config: Config) -> str:
    kind, host, port, path = parse_listen(config.milter.listen)
    if kind == "unix":
        return f"unix:{path}"
    return f"{kind}:[{host}]:{port}" if kind == "inet6" else f"{kind}:{host}:{port}"


def main_cf(config: Config) -> list[tuple[str, str]]:
    """(parameter, value) pairs for main.cf."""
    return [
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


def render(config: Config, main: bool = True, master: bool = True) -> str:
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
    return "\n".join(out) + "\n"
