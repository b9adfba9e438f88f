"""The dialects: every vendor's control headers -> one Directives value (no MTA)."""

from __future__ import annotations

import json
import random

import pytest

from conftest import eml
from mjfilter.directives import Directives, Smarthost
from mjfilter.dialects import (
    CONTROL_HEADER_PREFIXES,
    INTERNAL_PREFIX,
    PRECEDENCE,
    DialectResult,
    decode_encoded_words,
    is_control_header,
    parse_directives,
)
from mjfilter.dialects import mailerq, mailjet, maxemail, smtpeter
from mjfilter.model import Message


def parse(*pairs: tuple[str, bytes | str]) -> Directives:
    """parse_directives on (name, value) pairs; str values are encoded as UTF-8."""
    return parse_directives([(n, v.encode() if isinstance(v, str) else v) for n, v in pairs])


def reasons(d: Directives) -> dict[str, str]:
    """header name (lowercase) -> reason, for the last problem of each header."""
    return {p.header.lower(): p.reason for p in d.problems}


def problems_of(d: Directives, header: str) -> list[str]:
    return [p.reason for p in d.problems if p.header.lower() == header.lower()]


# -- the interface ------------------------------------------------------------

def test_control_header_prefixes_cover_every_family():
    assert set(CONTROL_HEADER_PREFIXES) == {"x-mailjet-", "x-mj-", "x-mq-", "x-smtpeter-", "x-mxm-", "x-mjfilter-"}
    assert INTERNAL_PREFIX == "x-mjfilter-" and INTERNAL_PREFIX in CONTROL_HEADER_PREFIXES
    assert all(p == p.lower() for p in CONTROL_HEADER_PREFIXES)
    assert PRECEDENCE == ("mailjet", "smtpeter", "mailerq", "maxemail")
    for module in (mailjet, mailerq, smtpeter, maxemail):
        assert module.NAME in PRECEDENCE
        assert set(module.PREFIXES) <= set(CONTROL_HEADER_PREFIXES)


@pytest.mark.parametrize("name", [
    "X-Mailjet-Campaign", "x-mailjet-anything", "X-MJ-Vars", "x-mj-customid", "X-MQ-Smarthost-Port",
    "x-mq-whatever", "X-SMTPeter-TrackOpens", "X-Mxm-Flags", "x-MXM-tag", "X-Mjfilter-Route", "X-MJFILTER-X",
])
def test_is_control_header(name):
    assert is_control_header(name)


@pytest.mark.parametrize("name", [
    "Subject", "X-Mailer", "X-Mailjet", "X-MJ", "X-Mjfilter", "X-Original-Subject", "Received", "", "X-Mq",
    "Mailjet-Campaign", "X-Keep-Me", " X-Mailjet-Campaign",
])
def test_is_not_control_header(name):
    assert not is_control_header(name)


def test_dialect_parse_is_pure_and_typed():
    r = mailjet.parse([("X-Mailjet-Prio", "1")])
    assert isinstance(r, DialectResult)
    assert r.values == {"priority": 1} and r.sources == {"priority": "X-Mailjet-Prio"} and r.problems == []


def test_no_control_headers_gives_defaults():
    d = parse(("Subject", "hello"), ("X-Mailer", "x"), ("Received", "from a by b"))
    assert d == Directives()


def test_fixture_all_vendors():
    d = parse_directives(Message.from_bytes(eml("all-vendors.eml")).headers)
    assert d.campaign == "spring_sale-2026" and d.dedup is True
    assert d.custom_id == "order-1234"
    assert d.payload == '{"order": 1234, "items": 3}'
    assert d.track_open is True and d.track_click is False and d.priority == 2
    assert d.template_vars == {"name": "Bob"}
    assert d.smarthost == Smarthost("relay.example.net", 2525, "mquser", "s3cr3t-pass")
    assert d.tags == ("receipts", "order", "confirmation", "guest")
    assert d.track_bounces is True and d.inline_css is False
    assert d.check_unsubscribe is False and d.ignore_bounce_list is False
    # X-Mxm-Flags: 3 asks for click tracking, X-Mailjet-TrackClick: 0 wins
    assert reasons(d) == {"x-mxm-flags": "overridden by X-Mailjet-TrackClick"}
    assert d.sources["track_click"] == "X-Mailjet-TrackClick" and d.sources["track_open"] == "X-MAILJET-TRACKOPEN"
    assert "s3cr3t-pass" not in repr(d) and "s3cr3t-pass" not in json.dumps(d.as_dict())


def test_fixture_bad_values():
    d = parse_directives(Message.from_bytes(eml("bad-values.eml")).headers)
    r = reasons(d)
    assert r["x-mj-vars"] == "not valid JSON: Expecting ',' delimiter at char 15"
    assert r["x-mailjet-campaign"] == "too long (300 characters, at most 255)"
    assert r["x-mxm-flags"] == "not a non-negative decimal integer"
    assert d.template_vars is None and d.campaign is None and d.track_open is None


# -- unfolding, decoding --------------------------------------------------------

@pytest.mark.parametrize("raw", [
    b'{"a": 1,\r\n\t"b": 2}', b'{"a": 1,\n "b": 2}', b'{"a": 1,\n\t"b": 2}', b'{"a": 1,\r\n    \t "b": 2}',
    b'  {"a": 1, "b": 2}  ', b'\r\n {"a": 1, "b": 2}\r\n',
])
def test_folded_and_padded_values(raw):
    d = parse(("X-MJ-EventPayload", raw), ("X-MJ-Vars", raw))
    assert d.payload == '{"a": 1, "b": 2}'
    assert d.template_vars == {"a": 1, "b": 2}


def test_folded_campaign_is_one_line():
    assert parse(("X-Mailjet-Campaign", b"spring\r\n sale")).campaign == "spring sale"


def test_rfc2047_in_vars_payload_customid_campaign():
    d = parse(
        ("X-MJ-Vars", '{"name": "=?UTF-8?Q?Ren=C3=A9?=", "city": "=?utf-8?B?S8O2bG4=?="}'),
        ("X-MJ-EventPayload", "=?UTF-8?B?eyJrIjogImNhZsOpIn0=?="),
        ("X-MJ-CustomID", "=?ISO-8859-1?Q?caf=E9?= =?ISO-8859-1?Q?_cr=E8me?="),
        ("X-Mailjet-Campaign", "=?UTF-8?Q?No=C3=ABl_2026?="),
    )
    assert d.template_vars == {"name": "René", "city": "Köln"}
    assert d.payload == '{"k": "café"}'
    assert d.custom_id == "café crème"  # white space between adjacent encoded words dropped
    assert d.campaign == "Noël 2026"
    assert d.problems == []


def test_whole_vars_value_encoded_and_folded():
    # what a mail library writes for a long non-ASCII header: several encoded words, folded
    d = parse(("X-MJ-Vars", b"=?utf-8?b?eyJuYW1lIjogIlJl?=\r\n =?utf-8?b?bsOpIn0=?="))
    assert d.template_vars == {"name": "René"}


@pytest.mark.parametrize("word,expected", [
    ("=?utf-8?b?!!!?=", ""),  # no base64 characters at all: nothing
    ("=?utf-8?b?YQ?=", "a"),  # missing padding is forgiven
    ("=?no-such-charset?q?abc?=", "=?no-such-charset?q?abc?="),  # kept as it came
    ("=?utf-8?q?=FF=FE?=", "\ufffd\ufffd"),
    ("=?utf-8?x?abc?=", "=?utf-8?x?abc?="),
    ("=?", "=?"),
    ("=?utf-8?b?", "=?utf-8?b?"),
    ("=?utf-8*en?q?abc?=", "abc"),  # RFC 2231 language suffix
    ("=?\u00e9?q?\u00e9?=", "=?\u00e9?q?\u00e9?="),
])
def test_malformed_encoded_words_never_raise(word, expected):
    assert decode_encoded_words(word) == expected
    d = parse(("X-MJ-CustomID", word), ("X-MJ-Vars", word), ("X-Mailjet-Campaign", word), ("X-MJ-EventPayload", word))
    assert d.custom_id == (expected or None)


def test_rfc2047_only_where_it_matters():
    # a tag is taken as written
    assert parse(("X-Mxm-Tag", "=?utf-8?q?abc?=")).tags == ("=?utf-8?q?abc?=",)
    # text around encoded words is kept verbatim, including 8-bit text
    assert decode_encoded_words("Köln =?utf-8?q?x?=, done") == "Köln x, done"


def test_eight_bit_values():
    d = parse(("X-MJ-CustomID", "commande-été".encode()), ("X-MJ-EventPayload", b"\xff\xferaw"),
              ("X-Mailjet-Campaign", "Soldes d\u00e9t\u00e9".encode("latin-1")))
    assert d.custom_id == "commande-été"
    assert d.payload == "\ufffd\ufffdraw"
    assert d.campaign is None  # latin-1 bytes decode to U+FFFD, not a letter
    assert "bad character" in reasons(d)["x-mailjet-campaign"]


def test_mixed_case_names():
    d = parse(("x-MAILJET-campaign", "c1"), ("X-mj-CUSTOMid", "id"), ("X-MQ-SMARTHOST-HOSTNAME", "h.example"),
              ("X-SmtPeter-TrackOpens", "TRUE"), ("x-mXm-flags", "8"))
    assert d.campaign == "c1" and d.custom_id == "id" and d.smarthost == Smarthost("h.example")
    assert d.track_open is True and d.ignore_bounce_list is True
    assert d.sources["campaign"] == "x-MAILJET-campaign"


# -- Mailjet --------------------------------------------------------------------

@pytest.mark.parametrize("value", ["a", "spring_sale-2026", "Spring sale 2026", "x" * 255, "Noël", "---", "1"])
def test_campaign_valid(value):
    d = parse(("X-Mailjet-Campaign", value))
    assert d.campaign == value and d.problems == []


@pytest.mark.parametrize("value,reason", [
    ("c" * 300, "too long (300 characters, at most 255)"),
    ("c" * 256, "too long (256 characters, at most 255)"),
    ("", "empty campaign"),
    ("spring!", "bad character '!'"),
    ("a.b", "bad character '.'"),
    ("a/b", "bad character '/'"),
    ("a\tb", "bad character '\\t'"),
])
def test_campaign_invalid(value, reason):
    d = parse(("X-Mailjet-Campaign", value))
    assert d.campaign is None
    [p] = d.problems
    assert p.header == "X-Mailjet-Campaign" and p.reason.startswith(reason)
    assert len(p.value) <= 80


@pytest.mark.parametrize("value,expected", [
    ("true", True), ("TRUE", True), ("yes", True), ("Y", True), ("1", True),
    ("false", False), ("No", False), ("n", False), ("0", False),
])
def test_dedup(value, expected):
    d = parse(("X-Mailjet-Campaign", "c"), ("X-Mailjet-DeduplicateCampaign", value))
    assert d.dedup is expected and d.problems == []


def test_dedup_bad_value():
    d = parse(("X-Mailjet-Campaign", "c"), ("X-Mailjet-DeduplicateCampaign", "maybe"))
    assert d.dedup is False and "not a boolean" in reasons(d)["x-mailjet-deduplicatecampaign"]


def test_dedup_needs_a_campaign():
    d = parse(("X-Mailjet-DeduplicateCampaign", "yes"))
    assert d.dedup is False and "dedup" not in d.sources
    assert reasons(d) == {"x-mailjet-deduplicatecampaign": "X-Mailjet-DeduplicateCampaign needs X-Mailjet-Campaign"}
    # an invalid campaign is no campaign
    d = parse(("X-Mailjet-Campaign", "bad!"), ("X-Mailjet-DeduplicateCampaign", "yes"))
    assert d.dedup is False
    assert problems_of(d, "X-Mailjet-DeduplicateCampaign") == ["X-Mailjet-DeduplicateCampaign needs X-Mailjet-Campaign"]


def test_custom_id_and_payload_any_text():
    payload = '<order id="1"><item>a, b; c</item></order>'
    d = parse(("X-MJ-CustomID", "id with spaces & symbols!"), ("X-MJ-EventPayload", payload))
    assert d.custom_id == "id with spaces & symbols!" and d.payload == payload and d.problems == []
    assert parse(("X-MJ-CustomID", "  ")).custom_id is None  # empty = no header


@pytest.mark.parametrize("header,field", [("X-Mailjet-TrackOpen", "track_open"), ("X-Mailjet-TrackClick", "track_click")])
def test_tracking(header, field):
    assert getattr(parse((header, "1")), field) is True
    assert getattr(parse((header, "0")), field) is False
    for bad in ("2", "true", "", "on"):
        d = parse((header, bad))
        assert getattr(d, field) is None
        assert "default" in reasons(d)[header.lower()]


@pytest.mark.parametrize("value,expected", [("0", 0), ("1", 1), ("2", 2), ("3", 3)])
def test_priority(value, expected):
    assert parse(("X-Mailjet-Prio", value)).priority == expected


@pytest.mark.parametrize("value", ["4", "-1", "high", "", "1.5", "+1", "1_0", "\u0661", "9" * 5000])
def test_priority_invalid(value):
    d = parse(("X-Mailjet-Prio", value))
    assert d.priority is None and reasons(d)["x-mailjet-prio"] == "not a priority (0..3)"


@pytest.mark.parametrize("value,expected", [
    ("true", True), ("True", True), ("1", True), ("yes", True), ("false", False), ("0", False), ("NO", False),
])
def test_template_language(value, expected):
    d = parse(("X-MJ-TemplateLanguage", value))
    assert d.template_language is expected and d.problems == []


def test_template_language_invalid():
    d = parse(("X-MJ-TemplateLanguage", "enabled"))
    assert d.template_language is False and "x-mj-templatelanguage" in reasons(d)


def test_template_id():
    assert parse(("X-MJ-TemplateID", "12345")).template_id == "12345"
    assert parse(("X-MJ-TemplateID", "order confirmation")).template_id == "order confirmation"
    d = parse(("X-MJ-TemplateID", ""))
    assert d.template_id is None and reasons(d) == {"x-mj-templateid": "empty template id"}


def test_vars_valid():
    d = parse(("X-MJ-Vars", '{"varname1": "value1", "items": [1, 2], "n": {"x": null}}'))
    assert d.template_vars == {"varname1": "value1", "items": [1, 2], "n": {"x": None}}


@pytest.mark.parametrize("value,reason", [
    ('{"name": "Bob" "x": 1}', "not valid JSON: Expecting ',' delimiter at char 15"),
    ('{"a": 1,', "not valid JSON: Expecting property name enclosed in double quotes at char 8"),
    ("", "not valid JSON: Expecting value at char 0"),
    ('{"a": NaN}', "not valid JSON: NaN is not allowed"),
    ("[1, 2]", "not a JSON object (a JSON array)"),
    ('"text"', "not a JSON object (a JSON string)"),
    ("42", "not a JSON object (a JSON number)"),
    ("null", "not a JSON object (a JSON null)"),
])
def test_vars_invalid(value, reason):
    d = parse(("X-MJ-Vars", value))
    assert d.template_vars is None
    assert reasons(d) == {"x-mj-vars": reason}


def test_vars_pathological_json_is_a_problem():
    for value in ["[" * 100_000 + "]" * 100_000, '{"a": ' + "9" * 10_000 + "}"]:
        d = parse(("X-MJ-Vars", value))
        assert d.template_vars is None and reasons(d)["x-mj-vars"].startswith("not ")


@pytest.mark.parametrize("value,expected", [
    ("errors@example.com", "errors@example.com"), ("<errors@example.com>", "errors@example.com"),
])
def test_template_error_reporting(value, expected):
    assert parse(("X-MJ-TemplateErrorReporting", value)).template_error_reporting == expected


@pytest.mark.parametrize("value", ["no-at-sign", "a@b@c", "a b@example.com", "@example.com", "a@", "",
                                   "Ops <ops@example.com>", "a@b,c@d"])
def test_template_error_reporting_invalid(value):
    d = parse(("X-MJ-TemplateErrorReporting", value))
    assert d.template_error_reporting is None
    assert reasons(d)["x-mj-templateerrorreporting"].startswith("not an address")


def test_template_error_deliver():
    assert parse(("X-MJ-TemplateErrorDeliver", "deliver")).template_error_deliver is True
    assert parse(("X-MJ-TemplateErrorDeliver", "Deliver")).template_error_deliver is True
    assert parse(("X-MJ-TemplateErrorDeliver", "0")).template_error_deliver is False
    d = parse(("X-MJ-TemplateErrorDeliver", "1"))
    assert d.template_error_deliver is None and "x-mj-templateerrordeliver" in reasons(d)


def test_other_mailjet_headers_are_ignored_without_problem():
    d = parse(("X-Mailjet-Unknown", "x"), ("X-MJ-Something", "y"), ("X-MJ-", "z"))
    assert d == Directives()


def test_repeated_header_first_value_counts():
    d = parse(("X-Mailjet-Campaign", "first"), ("X-Mailjet-Campaign", "first"), ("x-mailjet-campaign", "second"))
    assert d.campaign == "first"
    [p] = d.problems
    assert (p.header, p.value, p.reason) == ("x-mailjet-campaign", "second", "repeated header, first value used")


def test_repeated_header_first_counts_even_when_invalid():
    d = parse(("X-Mailjet-Prio", "9"), ("X-Mailjet-Prio", "1"))
    assert d.priority is None
    assert sorted(p.reason for p in d.problems) == ["not a priority (0..3)", "repeated header, first value used"]


# -- MailerQ --------------------------------------------------------------------

def test_smarthost_full():
    d = parse(("x-mq-smarthost-hostname", "relay.example.net"), ("x-mq-smarthost-port", "587"),
              ("x-mq-smarthost-username", "user"), ("x-mq-smarthost-password", "pw-123"))
    assert d.smarthost == Smarthost("relay.example.net", 587, "user", "pw-123")
    assert d.sources["smarthost"] == "x-mq-smarthost-hostname" and d.problems == []
    assert d.properties == {}


@pytest.mark.parametrize("host,expected", [
    ("relay.example.net", "relay.example.net"), ("[192.0.2.1]", "192.0.2.1"), ("192.0.2.1", "192.0.2.1"),
    ("[IPv6:2001:db8::1]", "2001:db8::1"), ("2001:db8::1", "2001:db8::1"), ("localhost", "localhost"),
    ("[relay.example.net]", "relay.example.net"),
])
def test_smarthost_hostname_forms(host, expected):
    d = parse(("x-mq-smarthost-hostname", host))
    assert d.smarthost == Smarthost(expected, 25) and d.problems == []


@pytest.mark.parametrize("host", ["", "relay example", "relay.example:25", "-bad.example", "a" * 300,
                                  "evil]:25", "[relay", "x\u00e9.example"])
def test_smarthost_bad_hostname(host):
    d = parse(("x-mq-smarthost-hostname", host), ("x-mq-smarthost-password", "pw-123"))
    assert d.smarthost is None
    assert reasons(d)["x-mq-smarthost-hostname"].endswith("no smarthost")


@pytest.mark.parametrize("port", ["0", "65536", "abc", "", "-25", "25.0", "99999999"])
def test_smarthost_bad_port(port):
    d = parse(("x-mq-smarthost-hostname", "relay.example.net"), ("x-mq-smarthost-port", port),
              ("x-mq-smarthost-password", "pw-123"), ("x-mq-smarthost-username", "u"))
    assert d.smarthost is None
    assert reasons(d) == {"x-mq-smarthost-port": "not a port (1..65535): no smarthost"}


def test_smarthost_parts_without_hostname():
    d = parse(("x-mq-smarthost-port", "2525"), ("x-mq-smarthost-username", "u"),
              ("x-mq-smarthost-password", "pw-123"))
    assert d.smarthost is None
    assert {p.header: p.reason for p in d.problems} == {
        "x-mq-smarthost-port": "needs x-mq-smarthost-hostname: no smarthost",
        "x-mq-smarthost-username": "needs x-mq-smarthost-hostname: no smarthost",
        "x-mq-smarthost-password": "needs x-mq-smarthost-hostname: no smarthost",
    }
    assert [p.value for p in d.problems if p.header == "x-mq-smarthost-password"] == ["***"]


def test_smarthost_half_credentials():
    d = parse(("x-mq-smarthost-hostname", "h.example"), ("x-mq-smarthost-username", "u"))
    assert d.smarthost == Smarthost("h.example")
    assert reasons(d)["x-mq-smarthost-username"] == "without x-mq-smarthost-password"
    d = parse(("x-mq-smarthost-hostname", "h.example"), ("x-mq-smarthost-password", "pw-123"))
    assert d.smarthost == Smarthost("h.example")
    [p] = d.problems
    assert p.value == "***" and "pw-123" not in p.reason


def test_password_never_shown():
    secret = "pw-s3cr3t"
    d = parse(
        ("x-mq-smarthost-hostname", "h.example"),
        ("x-mq-smarthost-password", secret),
        ("X-MQ-Smarthost-Password", secret + "-other"),  # repeated, different: a problem
        ("x-mq-smarthost-port", "0"),  # bad port: no smarthost
        ("x-mq-db-password", secret),  # not a property
    )
    dumped = json.dumps(d.as_dict()) + repr(d) + str(d.problems)
    assert secret not in dumped
    assert all(p.value == "***" for p in d.problems if "password" in p.header.lower())
    assert "db-password" not in d.properties
    ok = parse(("x-mq-smarthost-hostname", "h.example"), ("x-mq-smarthost-username", "u"),
               ("x-mq-smarthost-password", secret))
    assert ok.smarthost is not None and ok.smarthost.password == secret
    assert secret not in json.dumps(ok.as_dict()) and secret not in repr(ok)
    assert ok.as_dict()["smarthost"]["password"] == "***"


def test_mq_tags():
    d = parse(("x-mq-tag", " a, b ,,c "), ("X-MQ-Tag", "b, d"), ("x-mq-tag", ""))
    assert d.tags == ("a", "b", "c", "d") and d.problems == []


@pytest.mark.parametrize("value,expected", [("true", True), ("1", True), ("yes", True), ("False", False),
                                            ("0", False), ("no", False)])
def test_mq_inlinecss(value, expected):
    assert parse(("x-mq-inlinecss", value)).inline_css is expected


def test_mq_inlinecss_invalid():
    d = parse(("x-mq-inlinecss", "sometimes"))
    assert d.inline_css is None and "not a boolean" in reasons(d)["x-mq-inlinecss"]


def test_mq_properties():
    d = parse(("x-mq-delayed", "2026-01-01 00:00:00"), ("X-MQ-DSN-Notify", "FAILURE"), ("x-mq-tag", "t"),
              ("x-mq-inlinecss", "true"), ("x-mq-smarthost-hostname", "h.example"))
    assert d.properties == {"delayed": "2026-01-01 00:00:00", "dsn-notify": "FAILURE"}
    assert d.sources["properties"] == "x-mq-delayed"
    d = parse(("x-mq-delayed", "a"), ("x-mq-delayed", "b"))
    assert d.properties == {"delayed": "a"} and reasons(d) == {"x-mq-delayed": "repeated header, first value used"}


# -- SMTPeter -------------------------------------------------------------------

@pytest.mark.parametrize("header,field", [
    ("x-smtpeter-inlinecss", "inline_css"), ("x-smtpeter-trackclicks", "track_click"),
    ("x-smtpeter-trackopens", "track_open"), ("x-smtpeter-trackbounces", "track_bounces"),
])
def test_smtpeter(header, field):
    for value, expected in (("true", True), ("TRUE", True), ("1", True), ("yes", True),
                            ("false", False), ("False", False), ("0", False), ("no", False)):
        d = parse((header, value))
        assert getattr(d, field) is expected and d.sources[field] == header and d.problems == []
    d = parse((header, "enabled"))
    assert getattr(d, field) is None and "not a boolean" in reasons(d)[header]


def test_other_smtpeter_headers_are_ignored():
    assert parse(("x-smtpeter-whatever", "1")) == Directives()


# -- Maxemail -------------------------------------------------------------------

@pytest.mark.parametrize("mask", range(16))
def test_mxm_flags(mask):
    d = parse(("X-Mxm-Flags", str(mask)))
    assert (d.track_open, d.track_click, d.check_unsubscribe, d.ignore_bounce_list) == (
        bool(mask & 1), bool(mask & 2), bool(mask & 4), bool(mask & 8))
    assert d.problems == [] and d.sources["track_open"] == "X-Mxm-Flags"


@pytest.mark.parametrize("value", ["abc", "-1", "", "0x3", "3.0", "+3", "1 2"])
def test_mxm_flags_invalid(value):
    d = parse(("X-Mxm-Flags", value))
    assert d.track_open is None and d.check_unsubscribe is None
    assert reasons(d) == {"x-mxm-flags": "not a non-negative decimal integer"}


def test_mxm_flags_unknown_bits_keep_known_ones():
    d = parse(("X-Mxm-Flags", "19"))  # 16 + 2 + 1
    assert d.track_open is True and d.track_click is True and d.check_unsubscribe is False
    assert reasons(d) == {"x-mxm-flags": "unknown bits 16 ignored (known: 1, 2, 4, 8)"}
    d = parse(("X-Mxm-Flags", "9" * 40))
    assert d.track_open is None and reasons(d) == {"x-mxm-flags": "number too large"}


def test_mxm_flags_only_the_first_counts():
    d = parse(("X-Mxm-Flags", "1"), ("X-Mxm-Flags", "1"), ("x-mxm-flags", "2"))
    assert d.track_open is True and d.track_click is False
    assert [(p.header, p.value, p.reason) for p in d.problems] == [
        ("x-mxm-flags", "2", "only the first X-Mxm-Flags counts")]


def test_mxm_tags():
    d = parse(("X-Mxm-Tag", "order,confirmation,guest"))
    assert d.tags == ("order", "confirmation", "guest")
    d = parse(("X-Mxm-Tag", "order"), ("X-Mxm-Tag", " confirmation "), ("x-mxm-tag", "guest, order"))
    assert d.tags == ("order", "confirmation", "guest") and d.sources["tags"] == "X-Mxm-Tag"


def test_other_maxemail_headers_are_ignored():
    assert parse(("X-Mxm-Other", "1")) == Directives()


# -- precedence -----------------------------------------------------------------

def test_precedence_mailjet_wins_over_everyone():
    d = parse(("X-Mxm-Flags", "3"), ("x-smtpeter-trackopens", "true"), ("X-Mailjet-TrackOpen", "0"))
    assert d.track_open is False and d.sources["track_open"] == "X-Mailjet-TrackOpen"
    assert sorted((p.header, p.reason) for p in d.problems) == [
        ("X-Mxm-Flags", "overridden by X-Mailjet-TrackOpen"),
        ("x-smtpeter-trackopens", "overridden by X-Mailjet-TrackOpen"),
    ]
    assert d.track_click is True  # from X-Mxm-Flags: nobody else asked


def test_precedence_smtpeter_over_mailerq_and_maxemail():
    d = parse(("x-mq-inlinecss", "true"), ("x-smtpeter-inlinecss", "false"),
              ("X-Mxm-Flags", "0"), ("x-smtpeter-trackclicks", "true"))
    assert d.inline_css is False and d.track_click is True
    assert {(p.header, p.value, p.reason) for p in d.problems} == {
        ("x-mq-inlinecss", "true", "overridden by x-smtpeter-inlinecss"),
        ("X-Mxm-Flags", "0", "overridden by x-smtpeter-trackclicks"),
    }


def test_agreeing_dialects_are_no_conflict():
    d = parse(("X-Mailjet-TrackOpen", "1"), ("x-smtpeter-trackopens", "true"), ("X-Mxm-Flags", "1"))
    assert d.track_open is True and d.problems == []


def test_an_invalid_winner_does_not_hide_a_valid_loser():
    d = parse(("X-Mailjet-TrackOpen", "maybe"), ("x-smtpeter-trackopens", "false"))
    assert d.track_open is False and d.sources["track_open"] == "x-smtpeter-trackopens"
    assert reasons(d) == {"x-mailjet-trackopen": "not 0 or 1: the configured default applies"}


def test_tags_merge_in_precedence_order():
    # message order puts Maxemail first; precedence puts MailerQ first
    d = parse(("X-Mxm-Tag", "b, c"), ("x-mq-tag", "a, b"), ("X-Mxm-Tag", "d"))
    assert d.tags == ("a", "b", "c", "d")
    assert d.sources["tags"] == "x-mq-tag, X-Mxm-Tag"
    assert d.problems == []


def test_internal_headers_are_control_headers_but_set_nothing():
    d = parse(("X-Mjfilter-Route", "smtp:[evil.example]:25"), ("X-Mjfilter-Campaign", "x"))
    assert d == Directives()


# -- never raises -----------------------------------------------------------------

NAMES = [
    "X-Mailjet-Campaign", "X-Mailjet-DeduplicateCampaign", "X-MJ-CustomID", "X-MJ-EventPayload",
    "X-Mailjet-TrackOpen", "X-Mailjet-TrackClick", "X-Mailjet-Prio", "X-MJ-TemplateLanguage", "X-MJ-TemplateID",
    "X-MJ-Vars", "X-MJ-TemplateErrorReporting", "X-MJ-TemplateErrorDeliver", "x-mq-smarthost-hostname",
    "x-mq-smarthost-port", "x-mq-smarthost-username", "x-mq-smarthost-password", "x-mq-tag", "x-mq-inlinecss",
    "x-mq-other", "x-smtpeter-inlinecss", "x-smtpeter-trackclicks", "x-smtpeter-trackopens",
    "x-smtpeter-trackbounces", "X-Mxm-Flags", "X-Mxm-Tag", "X-Mjfilter-Route", "Subject", "x-", "X-MQ-",
]
SEEDS = [b"", b"\0", b"\r\n", b"\n\t", b"=?", b"=?utf-8?b?", b"{", b"[", b"1", b"true", b"\xff", b",", b"@",
         b"=?utf-8?q?=00?=", b"\r", b"\x85\xa0"]


def test_fuzz_never_raises_and_problems_are_clean():
    rng = random.Random(20261124)
    for _ in range(400):
        headers = []
        for _ in range(rng.randint(1, 12)):
            name = rng.choice(NAMES)
            if rng.random() < 0.3:
                name = "".join(c.upper() if rng.random() < 0.5 else c for c in name)
            kind = rng.random()
            if kind < 0.4:
                value = bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 200)))
            elif kind < 0.8:
                value = b"".join(rng.choice(SEEDS) for _ in range(rng.randint(0, 20)))
            else:
                value = rng.choice(SEEDS) * rng.randint(1, 5000)
            headers.append((name, value))
        d = parse_directives(headers)
        assert isinstance(d, Directives)
        json.dumps(d.as_dict())
        for p in d.problems:
            assert len(p.value) <= 80
            assert not any(c in p.value for c in "\r\n\0")
            if "password" in p.header.lower():
                assert p.value == "***"


def test_huge_values_and_nuls():
    big = b"x" * 5_000_000
    d = parse(("X-MJ-EventPayload", big), ("X-Mailjet-Campaign", big), ("X-MJ-Vars", b"{\0}"),
              ("X-MJ-CustomID", b"a\0b"), ("X-Mxm-Tag", b",\0,"))
    assert d.payload is not None and len(d.payload) == 5_000_000
    assert d.campaign is None and "too long" in reasons(d)["x-mailjet-campaign"]
    assert d.template_vars is None and d.custom_id == "a\0b"
    assert all(len(p.value) <= 80 for p in d.problems)


def test_odd_inputs_never_raise():
    assert parse_directives([]) == Directives()
    assert parse_directives(iter([("X-MJ-CustomID", "already text")])).custom_id == "already text"
    assert parse_directives([("X-MJ-CustomID", bytearray(b"ba"))]).custom_id == "ba"
    d = parse_directives([("X-MJ-CustomID", b"ok"), ("X-MJ-Vars", None), ("X-Mailjet-Prio", b"1")])  # type: ignore[list-item]
    assert d.custom_id == "ok"
    assert parse_directives([("X-MJ-CustomID", b"ok"), None]).custom_id == "ok"  # type: ignore[list-item]
    assert parse_directives(None) == Directives()  # type: ignore[arg-type]
