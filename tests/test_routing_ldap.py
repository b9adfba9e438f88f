"""LdapSource (mjfilter/routing/ldap.py) against a real slapd on loopback (tests/ldap_rig.py)."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from ldap_rig import SUFFIX, SlapdServer
from lookups import assert_concurrent_lookups
from rig import LOOPBACK, free_port

from mjfilter.routing.ldap import (
    DEFAULT_ATTRIBUTE,
    DEFAULT_DOMAIN_FILTER,
    DEFAULT_USER_FILTER,
    LdapSource,
    LdapUnavailable,
)

DOMAINS = f"o=domains,{SUFFIX}"
VMAIL_DN = f"cn=vmail,{SUFFIX}"
VMAIL_PASSWORD = "Vm4il-S3cret"


def domain_ldif(domain: str, *relays: str, name: str | None = None) -> str:
    lines = [f"dn: domainName={name or domain},{DOMAINS}", "objectClass: mailDomain", f"domainName: {name or domain}"]
    lines += [f"senderRelayHost: {r}" for r in relays]
    lines += ["", f"dn: ou=Users,domainName={name or domain},{DOMAINS}", "objectClass: organizationalUnit", "ou: Users"]
    return "\n".join(lines) + "\n\n"


def user_ldif(mail: str, *relays: str, domain: str | None = None) -> str:
    domain = domain or mail.rpartition("@")[2]
    local = mail.rpartition("@")[0]
    rdn = mail.replace("\\", "\\5c")  # a backslash in a DN is escaped; ( ) * need not be
    lines = [f"dn: mail={rdn},ou=Users,domainName={domain},{DOMAINS}", "objectClass: inetOrgPerson",
             "objectClass: mailUser", f"cn: {local}", f"sn: {local}", f"mail: {mail}"]
    lines += [f"senderRelayHost: {r}" for r in relays]
    return "\n".join(lines) + "\n\n"


def iredmail_tree(server: SlapdServer) -> None:
    """An iRedMail-shaped tree: o=domains, domain entries, ou=Users under each, a service account."""
    server.add(f"""
        dn: {DOMAINS}
        objectClass: organization
        o: domains

        dn: {VMAIL_DN}
        objectClass: organizationalRole
        objectClass: simpleSecurityObject
        cn: vmail
        userPassword: {VMAIL_PASSWORD}
        """)
    server.add(
        domain_ldif("a.example", "[relay-a.example]:25")
        + domain_ldif("b.example", "[10.0.0.2]:2525", name="B.Example")  # LDAP matches without case
        + domain_ldif("norelay.example")
        + user_ldif("alice@a.example", "[relay-alice.example]:587")
        + user_ldif("bob@a.example")  # no senderRelayHost: the caller falls back to @a.example
        + user_ldif("padded@a.example", "  [padded.example]:25 ")
        + user_ldif("multi@a.example", "[one.example]:25")
        + user_ldif("o(dd)*x\\y@a.example", "[odd.example]:25")
        + user_ldif("carol@norelay.example", "[relay-carol.example]:465")
    )


@pytest.fixture(scope="module")
def slapd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlapdServer]:
    with SlapdServer(tmp_path_factory.mktemp("slapd")) as server:
        iredmail_tree(server)
        yield server


@pytest.fixture
def sources() -> Iterator[list[LdapSource]]:
    """LdapSources to close after the test (append them)."""
    made: list[LdapSource] = []
    yield made
    for s in made:
        s.close()


def source(sources: list[LdapSource], *args: Any, **kwargs: Any) -> LdapSource:
    kwargs.setdefault("timeout", 3.0)
    s = LdapSource(*args, **kwargs)
    sources.append(s)
    return s


# --------------------------------------------------------------------------- look-ups


def test_user_and_domain_hits(slapd: SlapdServer, sources: list[LdapSource]) -> None:
    s = source(sources, slapd.url, SUFFIX)
    assert s.lookup("alice@a.example") == "[relay-alice.example]:587"
    assert s.lookup("carol@norelay.example") == "[relay-carol.example]:465"
    assert s.lookup("@a.example") == "[relay-a.example]:25"
    assert s.lookup("@b.example") == "[10.0.0.2]:2525"  # the entry says B.Example


def test_entry_without_attribute_and_misses(slapd: SlapdServer, sources: list[LdapSource]) -> None:
    s = source(sources, slapd.url, SUFFIX)
    assert s.lookup("bob@a.example") is None  # entry, no senderRelayHost: only @a.example would match
    assert s.lookup("@norelay.example") is None  # domain entry without the attribute
    assert s.lookup("nobody@a.example") is None
    assert s.lookup("@c.example") is None
    assert s.lookup("") is None
    assert s.lookup("@") is None
    assert s.lookup("a.example") is None  # not an address: searched as one, finds nothing


def test_value_stripped_and_first_value(slapd: SlapdServer, sources: list[LdapSource]) -> None:
    s = source(sources, slapd.url, SUFFIX)
    assert s.lookup("padded@a.example") == "[padded.example]:25"
    slapd.modify(f"""
        dn: mail=multi@a.example,ou=Users,domainName=a.example,{DOMAINS}
        changetype: modify
        add: senderRelayHost
        senderRelayHost: [two.example]:25
        """)
    assert s.lookup("multi@a.example") in ("[one.example]:25", "[two.example]:25")  # LDAP values are a set


def test_search_is_per_key_not_per_source(slapd: SlapdServer, sources: list[LdapSource]) -> None:
    """A change in the directory shows at the next look-up: nothing is cached."""
    s = source(sources, slapd.url, SUFFIX)
    slapd.add(user_ldif("dave@a.example"))
    assert s.lookup("dave@a.example") is None
    slapd.modify(f"""
        dn: mail=dave@a.example,ou=Users,domainName=a.example,{DOMAINS}
        changetype: modify
        add: senderRelayHost
        senderRelayHost: [relay-dave.example]:25
        """)
    assert s.lookup("dave@a.example") == "[relay-dave.example]:25"


@pytest.mark.parametrize("key", [
    "*",
    "*@a.example",
    "*)(mail=*",
    "alice@a.example)(objectClass=*",
    "*))(|(objectClass=*",
    "\\2a",
    "x\x00y",
    "@*",
    "@*)(domainName=*",
    "@a.example)(|(domainName=*",
])
def test_filter_injection_matches_nothing(slapd: SlapdServer, sources: list[LdapSource], key: str) -> None:
    s = source(sources, slapd.url, SUFFIX)
    assert s.lookup(key) is None


def test_special_characters_are_matched_exactly(slapd: SlapdServer, sources: list[LdapSource]) -> None:
    """Escaping keeps the value intact: an address with ( ) * \\ in it is found, and only that one."""
    s = source(sources, slapd.url, SUFFIX)
    assert s.lookup("o(dd)*x\\y@a.example") == "[odd.example]:25"
    assert s.lookup("o(dd)*x@a.example") is None


def test_custom_filters_and_attribute(slapd: SlapdServer, sources: list[LdapSource]) -> None:
    slapd.add(f"""
        dn: cn=erin,{SUFFIX}
        objectClass: inetOrgPerson
        cn: erin
        sn: erin
        mail: erin@f.example
        description: [relay-erin.example]:2525

        dn: cn=f.example,{SUFFIX}
        objectClass: organizationalRole
        cn: f.example
        description: [relay-f.example]:25
        """)
    s = source(sources, slapd.url, SUFFIX,
               user_filter="(&(objectClass=inetOrgPerson)(mail={address}))",
               domain_filter="(&(objectClass=organizationalRole)(cn={domain}))",
               attribute="description")
    assert s.lookup("erin@f.example") == "[relay-erin.example]:2525"
    assert s.lookup("@f.example") == "[relay-f.example]:25"
    assert s.lookup("alice@a.example") is None  # has no description


def test_base_limits_the_search(slapd: SlapdServer, sources: list[LdapSource]) -> None:
    s = source(sources, slapd.url, f"domainName=b.example,{DOMAINS}")
    assert s.lookup("@b.example") == "[10.0.0.2]:2525"
    assert s.lookup("alice@a.example") is None  # outside the base


def test_missing_base_is_unavailable_and_connection_kept(slapd: SlapdServer, sources: list[LdapSource]) -> None:
    s = source(sources, slapd.url, "dc=nowhere,dc=example")
    with pytest.raises(LdapUnavailable, match="noSuchObject"):
        s.lookup("alice@a.example")
    with pytest.raises(LdapUnavailable, match="noSuchObject"):
        s.lookup("alice@a.example")
    assert len(s._idle) == 1  # the server answered: the connection stayed usable


# --------------------------------------------------------------------------- binding


def test_anonymous_vs_bind_dn(tmp_path: Path, sources: list[LdapSource]) -> None:
    """iRedMail's way: anonymous clients read nothing, the service account (or the rootdn) reads.

    Not even the base is visible anonymously, so slapd answers noSuchObject: a source missing
    its bind DN fails loudly instead of finding no relay host for anyone."""
    with SlapdServer(tmp_path / "slapd", anonymous_read=False) as server:
        iredmail_tree(server)
        anonymous = source(sources, server.url, SUFFIX)
        for key in ("alice@a.example", "@a.example"):
            with pytest.raises(LdapUnavailable, match="noSuchObject"):
                anonymous.lookup(key)
        vmail = source(sources, server.url, SUFFIX, bind_dn=VMAIL_DN, bind_password=VMAIL_PASSWORD)
        assert vmail.lookup("alice@a.example") == "[relay-alice.example]:587"
        assert vmail.lookup("@a.example") == "[relay-a.example]:25"
        root = source(sources, server.url, SUFFIX, bind_dn=server.bind_dn, bind_password=server.bind_password)
        assert root.lookup("@b.example") == "[10.0.0.2]:2525"
        assert VMAIL_PASSWORD not in vmail.describe() + repr(vmail)


def assert_fast_unavailable(s: LdapSource, budget: float, secret: str | None = None,
                            match: str | None = None) -> LdapUnavailable:
    t0 = time.monotonic()
    with pytest.raises(LdapUnavailable, match=match) as ei:
        s.lookup("alice@a.example")
    elapsed = time.monotonic() - t0
    assert elapsed < budget, f"took {elapsed:.2f}s: {ei.value}"
    if secret is not None:
        assert secret not in str(ei.value)
    assert s.describe() in str(ei.value)
    return ei.value


@pytest.mark.parametrize("bind_dn", [VMAIL_DN, f"cn=nobody,{SUFFIX}"])
def test_wrong_bind_password(slapd: SlapdServer, sources: list[LdapSource], bind_dn: str) -> None:
    s = source(sources, slapd.url, SUFFIX, bind_dn=bind_dn, bind_password="Wr0ng-Pa55word")
    e = assert_fast_unavailable(s, 2.0, "Wr0ng-Pa55word", match="invalidCredentials")
    assert bind_dn in str(e)
    assert VMAIL_PASSWORD not in str(e)
    assert_fast_unavailable(s, 2.0, "Wr0ng-Pa55word", match="invalidCredentials")  # and again


def test_right_bind_password(slapd: SlapdServer, sources: list[LdapSource]) -> None:
    s = source(sources, slapd.url, SUFFIX, bind_dn=VMAIL_DN, bind_password=VMAIL_PASSWORD)
    assert s.lookup("alice@a.example") == "[relay-alice.example]:587"


# --------------------------------------------------------------------------- failures, restarts


def test_nothing_listening(sources: list[LdapSource]) -> None:
    s = source(sources, f"ldap://{LOOPBACK}:{free_port()}", SUFFIX, bind_dn=VMAIL_DN,
               bind_password=VMAIL_PASSWORD, timeout=5)
    assert_fast_unavailable(s, 5 + 2, VMAIL_PASSWORD, match="(?i)refused")
    assert_fast_unavailable(s, 2.0, VMAIL_PASSWORD)  # refused at once, and no stuck state


def test_hung_server_times_out(sources: list[LdapSource]) -> None:
    """A peer that accepts TCP but never answers: the bind's reply is waited for ``timeout`` s."""
    with socket.socket() as listener:
        listener.bind((LOOPBACK, 0))
        listener.listen(8)  # the kernel completes handshakes; nobody ever answers
        port = listener.getsockname()[1]
        s = source(sources, f"ldap://{LOOPBACK}:{port}", SUFFIX, bind_dn=VMAIL_DN, bind_password=VMAIL_PASSWORD,
                   timeout=1)
        t0 = time.monotonic()
        assert_fast_unavailable(s, 1 + 2, VMAIL_PASSWORD, match="(?i)timed out")
        assert time.monotonic() - t0 >= 0.9


def test_server_stops_and_comes_back(tmp_path: Path, sources: list[LdapSource]) -> None:
    """A kept connection to a server that went away is dropped, connecting is refused at once;
    after a restart on the same port the source works again without being recreated."""
    with SlapdServer(tmp_path / "slapd") as server:
        server.add(f"dn: {DOMAINS}\nobjectClass: organization\no: domains\n\n"
                   + domain_ldif("a.example", "[r.example]:25"))
        s = source(sources, server.url, SUFFIX, bind_dn=server.bind_dn, bind_password=server.bind_password, timeout=3)
        assert s.lookup("@a.example") == "[r.example]:25"  # a connection is now kept
        server.stop()
        assert not server.running()
        assert_fast_unavailable(s, 3 + 2, server.bind_password)
        assert_fast_unavailable(s, 2.0, server.bind_password)
        server.start()  # same data, same port
        assert s.lookup("@a.example") == "[r.example]:25"
        # A restart between two look-ups: the kept connection is dead, the look-up still succeeds.
        server.stop()
        server.start()
        t0 = time.monotonic()
        assert s.lookup("@a.example") == "[r.example]:25"
        assert time.monotonic() - t0 < 2.0


def test_concurrent_lookups(slapd: SlapdServer, sources: list[LdapSource]) -> None:
    slapd.add(domain_ldif("c.example")
              + "".join(user_ldif(f"u{i}@c.example", f"[relay{i}.example]:{1000 + i}") for i in range(40)))
    s = source(sources, slapd.url, SUFFIX, bind_dn=VMAIL_DN, bind_password=VMAIL_PASSWORD)
    expected: dict[str, str | None] = {f"u{i}@c.example": f"[relay{i}.example]:{1000 + i}" for i in range(40)}
    expected |= {f"nobody{i}@c.example": None for i in range(10)} | {"@a.example": "[relay-a.example]:25"}
    assert_concurrent_lookups(s.lookup, expected)
    assert 1 <= len(s._idle) <= 8


def test_close_is_idempotent_and_reopens(slapd: SlapdServer) -> None:
    s = LdapSource(slapd.url, SUFFIX)
    assert s.lookup("@a.example") == "[relay-a.example]:25"
    s.close()
    s.close()
    assert s.lookup("@a.example") == "[relay-a.example]:25"  # a new connection
    s.close()


# --------------------------------------------------------------------------- no server needed


def test_defaults_are_iredmail() -> None:
    assert DEFAULT_USER_FILTER == "(&(objectClass=mailUser)(mail={address}))"
    assert DEFAULT_DOMAIN_FILTER == "(&(objectClass=mailDomain)(domainName={domain}))"
    assert DEFAULT_ATTRIBUTE == "senderRelayHost"


def test_describe_has_no_password() -> None:
    port = free_port()
    s = LdapSource(f"ldap://{LOOPBACK}:{port}", SUFFIX, bind_dn=VMAIL_DN, bind_password="S3cret-pw")
    assert s.describe() == f"ldap:ldap://{LOOPBACK}:{port} base={SUFFIX}"
    assert "S3cret-pw" not in repr(s)
    s.close()


def test_nothing_connects_at_creation() -> None:
    s = LdapSource(f"ldap://{LOOPBACK}:{free_port()}", SUFFIX)  # nothing listens: no error yet
    s.close()


@pytest.mark.parametrize("url", ["http://127.0.0.1:389", "ldapi:///var/run/slapd.sock", "127.0.0.1:389",
                                 "ldap://", "ldap://127.0.0.1:389/dc=example,dc=org??sub?(mail=x)",
                                 "ldap://cn=admin:S3cret-pw@127.0.0.1:389", "ldap://127.0.0.1:99999"])
def test_bad_url(url: str) -> None:
    with pytest.raises(ValueError, match="LDAP relay-map URL") as ei:
        LdapSource(url, SUFFIX)
    assert "S3cret-pw" not in str(ei.value)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"user_filter": "(&(objectClass=mailUser)(mail=%s))"}, r"user_filter must contain \{address\}"),
    ({"user_filter": "(mail={domain})"}, r"user_filter must contain \{address\}"),
    ({"domain_filter": "(domainName={address})"}, r"domain_filter must contain \{domain\}"),
    ({"user_filter": "(&(mail={address})"}, "not a valid LDAP filter"),
    ({"domain_filter": "domainName={domain}"}, "not a valid LDAP filter"),
    ({"attribute": ""}, "attribute"),
    ({"attribute": "sender relay"}, "attribute"),
    ({"bind_dn": VMAIL_DN}, "both bind_dn and bind_password"),
    ({"bind_password": "pw"}, "both bind_dn and bind_password"),
    ({"bind_dn": VMAIL_DN, "bind_password": ""}, "must not be empty"),
    ({"timeout": 0}, "timeout"),
    ({"timeout": float("inf")}, "timeout"),
])
def test_bad_settings(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        LdapSource(f"ldap://{LOOPBACK}:389", SUFFIX, **kwargs)


def test_bad_base() -> None:
    with pytest.raises(ValueError, match="base"):
        LdapSource(f"ldap://{LOOPBACK}:389", "")


def test_ldaps_url_accepted() -> None:
    s = LdapSource("ldaps://ldap.example.org", SUFFIX)
    assert s.describe() == f"ldap:ldaps://ldap.example.org base={SUFFIX}"
    s.close()
