"""The SIP headers of a realtime.call.incoming webhook are untrusted: numbers only from tel:/sip:
URIs in E.164 form, bounded lengths, and a profile header only for a profile that allows it."""

from __future__ import annotations

import orjson
import pytest

from relay.agent_settings import AgentSettings
from relay.profiles import parse_profiles
from relay.sip.headers import MAX_HEADER_VALUE, MalformedWebhook, choose_profile, number_of, parse_incoming


@pytest.mark.parametrize(
    ("value", "number"),
    [
        ("<tel:+15550002222>", "+15550002222"),
        ("tel:+15550002222", "+15550002222"),
        ('"Alice" <sip:+15550001111@pstn.twilio.com>;tag=abc', "+15550001111"),
        ("<sip:+15550001111@sip.api.openai.com;transport=tls>", "+15550001111"),
        ("<sips:+15550001111@[2001:db8::1]>", "+15550001111"),
        ("<sip:alice@example.com>", ""),
        ("<sip:15550001111@example.com>", ""),  # not E.164: no +
        ("<sip:+0555000111@example.com>", ""),
        ("<http:+15550001111@example.com>", ""),
        ("<sip:+15550001111@>", ""),
        ("<sip:+15550001111@exa mple.com>", ""),
        ("<tel:+15550001111", ""),
        ("<tel:+1555000111122223333>", ""),
        ("<sip:+1555;0001111@example.com>", ""),
        ("<tel:+15550002222>" + " " * MAX_HEADER_VALUE, ""),
    ],
)
def test_numbers_come_only_from_e164_tel_and_sip_uris(value: str, number: str) -> None:
    assert number_of(value) == number


def body(headers: list[dict[str, str]], call_id: str = "rtc_0123abcd") -> bytes:
    return orjson.dumps(
        {"object": "event", "type": "realtime.call.incoming", "data": {"call_id": call_id, "sip_headers": headers}}
    )


def test_the_first_of_repeated_headers_counts_and_names_are_case_insensitive() -> None:
    _, call = parse_incoming(
        body(
            [
                {"name": "from", "value": "<sip:+15550001111@a.example>"},
                {"name": "FROM", "value": "<sip:+15559999999@b.example>"},
                {"name": "To", "value": "<tel:+15550002222>"},
                {"name": "X-Relay-Profile", "value": "vip"},
                {"name": "Call-ID", "value": "x" * 500},
            ]
        )
    )
    assert call is not None
    assert (call.caller, call.called, call.profile_header, len(call.sip_call_id)) == (
        "+15550001111",
        "+15550002222",
        "vip",
        128,
    )


@pytest.mark.parametrize(
    "raw",
    [
        b"not json",
        b"[]",
        orjson.dumps({"type": "realtime.call.incoming"}),
        body([], call_id="rtc_../../etc"),
        orjson.dumps({"type": "realtime.call.incoming", "data": {"call_id": "rtc_0123abcd"}}),
    ],
)
def test_a_malformed_event_is_refused(raw: bytes) -> None:
    with pytest.raises(MalformedWebhook):
        parse_incoming(raw)


def test_other_events_are_named_and_not_acted_on() -> None:
    assert parse_incoming(orjson.dumps({"type": "response.completed", "data": {}})) == ("response.completed", None)


def test_a_profile_header_counts_only_for_a_profile_that_allows_it() -> None:
    base = AgentSettings()
    profiles = parse_profiles(
        {
            "profiles": {"vip": {"allow_sip_profile_header": True}, "internal": {}, "sales": {}},
            "numbers": {"+15550003333": "sales"},
        },
        base,
        {},
    )

    def chosen(headers: list[dict[str, str]]) -> tuple[str, str]:
        _, call = parse_incoming(body(headers))
        assert call is not None
        profile, how = choose_profile(profiles, call)
        return profile.name, how

    to = {"name": "To", "value": "<tel:+15550003333>"}
    assert chosen([to, {"name": "X-Relay-Profile", "value": "vip"}]) == ("vip", "header")
    assert chosen([to, {"name": "X-Relay-Profile", "value": "internal"}]) == ("sales", "number")
    assert chosen([to, {"name": "X-Relay-Profile", "value": "vip;drop table"}]) == ("sales", "number")
    assert chosen([{"name": "To", "value": "<sip:bob@example.com>"}]) == ("default", "default")
