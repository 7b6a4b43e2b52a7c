"""Tests for qpgevent.address: parsing and formatting RFC 5321 paths."""

from __future__ import annotations

import dataclasses

import pytest

from qpgevent.address import Address, AddressError


def parse_error(text: str, **kwargs: bool) -> str:
    with pytest.raises(AddressError) as info:
        Address.parse(text, **kwargs)
    return str(info.value)


# --- simple and local parts -------------------------------------------------


def test_simple() -> None:
    a = Address.parse("<john.doe@example.test>")
    assert a == Address("john.doe", "example.test")
    assert a.address == "john.doe@example.test"
    assert a.format() == "<john.doe@example.test>"
    assert str(a) == "<john.doe@example.test>"
    assert not a.is_null
    assert a.is_ascii


def test_atext_specials_in_dot_string() -> None:
    a = Address.parse("<a!#$%&'*+-/=?^_`{|}~z@x.test>")
    assert a.user == "a!#$%&'*+-/=?^_`{|}~z"


def test_local_part_case_preserved_domain_lowercased() -> None:
    a = Address.parse("<John.DOE@Example.TEST>")
    assert a == Address("John.DOE", "example.test")


def test_quoted_with_space() -> None:
    a = Address.parse('<"john doe"@example.test>')
    assert a.user == "john doe"
    assert a.format() == '<"john doe"@example.test>'
    assert a.address == '"john doe"@example.test'


def test_quoted_with_escaped_quote_and_backslash() -> None:
    a = Address.parse(r'<"a\"b\\c"@x.test>')
    assert a.user == 'a"b\\c'
    assert a.format() == r'<"a\"b\\c"@x.test>'


def test_quoted_unneeded_quoting_is_dropped_on_format() -> None:
    a = Address.parse(r'<"j\ohn"@x.test>')
    assert a == Address("john", "x.test")
    assert a.format() == "<john@x.test>"


def test_quoted_may_hold_at_and_angle_bracket() -> None:
    a = Address.parse('<"a@b>c"@x.test>')
    assert a == Address("a@b>c", "x.test")
    assert a.format() == '<"a@b>c"@x.test>'


def test_empty_quoted_local_part() -> None:
    a = Address.parse('<""@x.test>')
    assert a == Address("", "x.test")
    assert not a.is_null
    assert a.format() == '<""@x.test>'


@pytest.mark.parametrize(
    "text",
    [
        "<.a@x.test>",  # leading dot
        "<a.@x.test>",  # trailing dot
        "<a..b@x.test>",  # double dot
        "<a b@x.test>",  # space outside quotes
        "<a(b)@x.test>",  # specials not in atext
        "<a,b@x.test>",
        "<@x.test>",  # empty local part (looks like a route without ':')
        '<"a"b@x.test>',  # text after the quoted string
        '<a"b"@x.test>',
        '<"abc@x.test>',  # unterminated quote (the '>' is inside it)
        r'<"a\é"@x.test>',  # quoted-pair is ASCII only, even with SMTPUTF8
    ],
)
def test_bad_local_part(text: str) -> None:
    with pytest.raises(AddressError):
        Address.parse(text, smtputf8=True)


def test_local_part_length_limit() -> None:
    assert Address.parse(f"<{'a' * 64}@x.test>").user == "a" * 64
    assert parse_error(f"<{'a' * 65}@x.test>") == "local part too long"
    # the limit is on the local part as written, quotes included
    assert Address.parse(f'<"{"a" * 62}"@x.test>').user == "a" * 62
    assert parse_error(f'<"{"a b" * 21}"@x.test>') == "local part too long"  # 63 + 2 quotes
    # and in octets, not characters
    assert parse_error(f"<{'é' * 33}@x.test>", smtputf8=True) == "local part too long"


# --- null path and postmaster -------------------------------------------------


def test_null_allowed() -> None:
    a = Address.parse("<>")
    assert a == Address.null() == Address("", "")
    assert a.is_null
    assert a.address == ""
    assert a.format() == "<>"
    assert str(a) == "<>"


def test_null_forbidden() -> None:
    assert parse_error("<>", allow_null=False) == "null path not allowed here"


@pytest.mark.parametrize("text", ["<postmaster>", "<Postmaster>", "<POSTMASTER>"])
def test_postmaster_allowed_keeps_case(text: str) -> None:
    a = Address.parse(text, allow_postmaster=True)
    assert a == Address(text[1:-1], "")
    assert not a.is_null
    assert a.address == text[1:-1]
    assert a.format() == text


def test_postmaster_forbidden() -> None:
    with pytest.raises(AddressError):
        Address.parse("<postmaster>")
    # other users need a domain even when bare postmaster is allowed
    assert parse_error("<abuse>", allow_postmaster=True) == "missing domain"
    with pytest.raises(AddressError):
        Address.parse('<"postmaster">', allow_postmaster=True)


def test_postmaster_with_domain_is_ordinary() -> None:
    assert Address.parse("<Postmaster@X.test>") == Address("Postmaster", "x.test")


# --- source routes --------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    ["<@a.test:user@c.test>", "<@a.test,@b.test:user@c.test>", "<@A.test,@b.test:user@C.TEST>"],
)
def test_source_route_dropped(text: str) -> None:
    a = Address.parse(text)
    assert a == Address("user", "c.test")
    assert a.format() == "<user@c.test>"


@pytest.mark.parametrize(
    "text",
    [
        "<@a.test>",
        "<@a.test:>",
        "<@a.test,b.test:user@c.test>",  # hop without '@'
        "<@a..test:user@c.test>",  # bad hop domain
        "<@a.test,:user@c.test>",
    ],
)
def test_bad_source_route(text: str) -> None:
    with pytest.raises(AddressError):
        Address.parse(text)


# --- domains ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "<a@>",
        "<a@x..test>",
        "<a@.x.test>",
        "<a@x.test.>",
        "<a@-x.test>",
        "<a@x-.test>",
        "<a@x_y.test>",
        "<a@x test>",
        "<a@b@c.test>",
    ],
)
def test_bad_domain(text: str) -> None:
    with pytest.raises(AddressError):
        Address.parse(text)


def test_domain_with_hyphen_and_digits() -> None:
    assert Address.parse("<a@3com-x.Example1.TEST>").host == "3com-x.example1.test"


def test_label_length_limit() -> None:
    assert Address.parse(f"<a@{'b' * 63}.test>").host == f"{'b' * 63}.test"
    assert parse_error(f"<a@{'b' * 64}.test>") == "domain label too long"


def test_domain_length_limit() -> None:
    ok = ".".join(["d" * 63] * 3 + ["e" * 63])  # 4 * 63 + 3 dots = 255
    assert Address.parse(f"<a@{ok}>").host == ok
    too_long = ok[:-2] + ".ff"  # 256 octets, every label still legal
    assert parse_error(f"<a@{too_long}>") == "domain too long"


# --- address literals ---------------------------------------------------------------


def test_ipv4_literal() -> None:
    a = Address.parse("<a@[192.0.2.1]>")
    assert a == Address("a", "[192.0.2.1]")
    assert a.format() == "<a@[192.0.2.1]>"


@pytest.mark.parametrize(
    ("text", "host"),
    [
        ("<a@[IPv6:2001:DB8:0:0:0:0:0:1]>", "[IPv6:2001:db8::1]"),
        ("<a@[ipv6:2001:db8::1]>", "[IPv6:2001:db8::1]"),
        ("<a@[IPV6:0:0:0:0:0:0:0:1]>", "[IPv6:::1]"),
        ("<a@[IPv6:2001:0db8:0000:0000:0000:ff00:0042:8329]>", "[IPv6:2001:db8::ff00:42:8329]"),
    ],
)
def test_ipv6_literal_normalised(text: str, host: str) -> None:
    assert Address.parse(text) == Address("a", host)


def test_ipv6_v4_literal_accepted() -> None:
    host = Address.parse("<a@[IPv6:::ffff:192.0.2.1]>").host
    assert host.startswith("[IPv6:::ffff:") and host.endswith("]")


@pytest.mark.parametrize(
    "text",
    [
        "<a@[]>",
        "<a@[192.0.2]>",
        "<a@[192.0.2.256]>",
        "<a@[192.0.2.01]>",  # leading zero
        "<a@[192.0.2.1>",  # unterminated
        "<a@[192.0.2.1]x>",
        "<a@[ 192.0.2.1]>",
        "<a@[IPv6:]>",
        "<a@[IPv6:2001:db8::g]>",
        "<a@[IPv6:2001:db8::1::2]>",
        "<a@[IPv6:fe80::1%eth0]>",  # zone ids are not part of RFC 5321
        "<a@[IPv6:192.0.2.1]>",
        "<a@[2001:db8::1]>",  # IPv6 without the tag
    ],
)
def test_bad_literal(text: str) -> None:
    with pytest.raises(AddressError):
        Address.parse(text)


@pytest.mark.parametrize("text", ["<a@[x-tag:content]>", "<a@[tcp:host]>"])
def test_general_literal_refused(text: str) -> None:
    assert parse_error(text) == "general address literals are not supported"


# --- SMTPUTF8 -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    ["<jösé@example.test>", "<a@bücher.example>", '<"jö sé"@x.test>', "<a@@bücher.example>"],
)
def test_utf8_requires_smtputf8(text: str) -> None:
    assert "SMTPUTF8" in parse_error(text)


def test_utf8_with_smtputf8() -> None:
    a = Address.parse("<Jösé@Bücher.ÉXAMPLE>", smtputf8=True)
    assert a == Address("Jösé", "bücher.éxample")
    assert not a.is_ascii
    assert a.format() == "<Jösé@bücher.éxample>"


def test_utf8_quoted_with_smtputf8() -> None:
    a = Address.parse('<"δοκιμή χρήστης"@παράδειγμα.δοκιμή>', smtputf8=True)
    assert a == Address("δοκιμή χρήστης", "παράδειγμα.δοκιμή")
    assert a.format() == '<"δοκιμή χρήστης"@παράδειγμα.δοκιμή>'


def test_utf8_label_length_is_the_a_label() -> None:
    # The 63-octet limit applies to the label DNS sees, the "xn--" A-label:
    # 40 x "ü" is 80 UTF-8 octets but "xn--" + 42 punycode characters.
    assert Address.parse(f"<a@{'ü' * 40}.test>", smtputf8=True).host == f"{'ü' * 40}.test"
    # 60 x "ü" makes a 66-character A-label.
    assert parse_error(f"<a@{'ü' * 60}.test>", smtputf8=True) == "domain label too long"


def test_ascii_address_is_ascii_even_with_smtputf8() -> None:
    assert Address.parse("<a@b.test>", smtputf8=True).is_ascii


# --- control characters, brackets, trailing garbage -----------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "<a\x00b@x.test>",
        "<a@x.test\r\n>",
        "<a@x.test>\r\n",
        '<"a\tb"@x.test>',
        '<"a\\\tb"@x.test>',  # quoted-pair of TAB is not %d32-126
        '<"a\x7fb"@x.test>',
        "<a@x\x85.test>",  # C1 control
        "<a\udcc3@x.test>",  # surrogate-escaped undecodable byte
    ],
)
def test_control_characters(text: str) -> None:
    with pytest.raises(AddressError):
        Address.parse(text, smtputf8=True)


@pytest.mark.parametrize(
    "text", ["a@x.test", "", "<", ">", "a@x.test>", "<a@x.test", " <a@x.test>", "[a@x.test]"]
)
def test_missing_brackets(text: str) -> None:
    with pytest.raises(AddressError):
        Address.parse(text)


@pytest.mark.parametrize(
    "text", ["< a@x.test>", "<a@x.test >", "< >", "< a@x.test >"]
)
def test_whitespace_inside_brackets(text: str) -> None:
    with pytest.raises(AddressError):
        Address.parse(text)


@pytest.mark.parametrize(
    "text", ["<a@x.test> ", "<a@x.test>x", "<a@x.test> SIZE=100", "<a@x.test>>", "<>>", "<> "]
)
def test_trailing_garbage(text: str) -> None:
    assert parse_error(text) == "unexpected text after '>'"


# --- formatting and round-trip -----------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "formatted"),
    [
        (Address("a", "x.test"), "<a@x.test>"),
        (Address("a.b", "x.test"), "<a.b@x.test>"),
        (Address("a b", "x.test"), '<"a b"@x.test>'),
        (Address(".a", "x.test"), '<".a"@x.test>'),
        (Address("a..b", "x.test"), '<"a..b"@x.test>'),
        (Address('a"b', "x.test"), r'<"a\"b"@x.test>'),
        (Address("a\\b", "x.test"), r'<"a\\b"@x.test>'),
        (Address("a@b", "x.test"), '<"a@b"@x.test>'),
        (Address("", "x.test"), '<""@x.test>'),
        (Address("é", "x.test"), "<é@x.test>"),
        (Address("é b", "x.test"), '<"é b"@x.test>'),
        (Address("a", "[IPv6:2001:db8::1]"), "<a@[IPv6:2001:db8::1]>"),
        (Address.null(), "<>"),
        (Address("postmaster", ""), "<postmaster>"),
    ],
)
def test_format(address: Address, formatted: str) -> None:
    assert address.format() == formatted
    assert str(address) == formatted
    assert address.address == formatted[1:-1]


VALID_PATHS = [
    "<>",
    "<postmaster>",
    "<PostMaster>",
    "<a@b.test>",
    "<John.Doe@Example.TEST>",
    "<a!#$%&'*+-/=?^_`{|}~z@x.test>",
    '<"john doe"@x.test>',
    r'<"a\"b\\c"@x.test>',
    '<"a@b>c"@x.test>',
    '<"a..b"@x.test>',
    '<""@x.test>',
    r'<"\a"@x.test>',
    "<@r1.test,@r2.test:a@x.test>",
    "<a@[192.0.2.1]>",
    "<a@[IPv6:2001:DB8::1]>",
    "<a@[IPv6:::ffff:192.0.2.1]>",
    f"<{'a' * 64}@{'b' * 63}.test>",
    f'<"{"a" * 62}"@x.test>',
    "<jösé@bücher.example>",
    '<"δοκιμή χρήστης"@ΠΑΡΆΔΕΙΓΜΑ.δοκιμή>',
]


@pytest.mark.parametrize("text", VALID_PATHS)
def test_round_trip(text: str) -> None:
    a = Address.parse(text, smtputf8=True, allow_postmaster=True)
    again = Address.parse(a.format(), smtputf8=not a.is_ascii, allow_postmaster=True)
    assert again == a
    assert again.format() == a.format()


# --- value semantics and ordering -------------------------------------------------------


def test_frozen_and_hashable() -> None:
    a = Address.parse("<a@x.test>")
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.user = "b"  # type: ignore[misc]
    assert len({a, Address("a", "x.test"), Address.parse("<a@X.TEST>")}) == 1
    assert a != Address("A", "x.test")


def test_ordering_by_host_then_user() -> None:
    addresses = [
        Address("a", "z.test"),
        Address("z", "a.test"),
        Address("b", "m.test"),
        Address("a", "a.test"),
        Address.null(),
    ]
    assert sorted(addresses) == [
        Address.null(),
        Address("a", "a.test"),
        Address("z", "a.test"),
        Address("b", "m.test"),
        Address("a", "z.test"),
    ]
    assert Address("z", "a.test") < Address("a", "b.test")
    assert Address("a", "b.test") > Address("z", "a.test")
    assert Address("a", "b.test") <= Address("a", "b.test")
    assert not Address("a", "b.test") < Address("a", "b.test")


def test_ordering_against_other_types() -> None:
    with pytest.raises(TypeError):
        Address("a", "b.test") < "a@b.test"  # noqa: B015
