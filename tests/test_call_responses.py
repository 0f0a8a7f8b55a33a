"""The response.create queue on its own: one in-band response at a time, races, out-of-band ones."""

from __future__ import annotations

from typing import Any

import orjson

from relay.call.effects import Outbox
from relay.call.responses import Responses

PLAIN: dict[str, Any] = {"type": "response.create"}


def plain() -> dict[str, Any]:
    return dict(PLAIN)


def spoken(text: str) -> dict[str, Any]:
    return {"type": "response.create", "response": {"instructions": text}}


def summary() -> dict[str, Any]:
    return {"type": "response.create", "response": {"conversation": "none"}}


def sent(outbox: Outbox) -> list[dict[str, Any]]:
    return [orjson.loads(m) for m in outbox.take()[1]]


def responses() -> tuple[Responses, Outbox]:
    outbox = Outbox()
    return Responses(outbox), outbox


def test_a_create_goes_out_at_once_when_nothing_is_active_with_a_numbered_event_id() -> None:
    resp, outbox = responses()
    resp.request(plain(), session_ready=True)
    assert sent(outbox) == [{"type": "response.create", "event_id": "relay_create_1"}]
    assert resp.in_flight == {"type": "response.create", "event_id": "relay_create_1"}
    assert not resp.idle


def test_creates_wait_for_the_active_response_and_go_out_one_per_done() -> None:
    resp, outbox = responses()
    resp.request(plain(), session_ready=True)
    resp.created("resp_1", out_of_band=False)
    assert (resp.active, resp.in_flight) == ("resp_1", None)
    resp.request(spoken("a"), session_ready=True)
    resp.request(spoken("b"), session_ready=True)
    outbox.take()
    assert not resp.done("resp_1")
    resp.flush(session_ready=True)
    assert [m["event_id"] for m in sent(outbox)] == ["relay_create_2"]
    resp.flush(session_ready=True)  # the second is in flight now
    assert sent(outbox) == []
    assert [q["event_id"] for q in resp.queued] == ["relay_create_3"]


def test_one_plain_create_waiting_is_enough() -> None:
    resp, outbox = responses()
    resp.created("resp_1", out_of_band=False)
    resp.request(plain(), session_ready=True)
    resp.request(plain(), session_ready=True)
    assert [q["event_id"] for q in resp.queued] == ["relay_create_1"]
    assert resp.has_plain_queued()
    assert sent(outbox) == []


def test_without_a_ready_session_every_create_is_queued() -> None:
    resp, outbox = responses()
    resp.request(plain(), session_ready=False)
    resp.request(plain(), session_ready=False)
    assert len(resp.queued) == 2
    resp.flush(session_ready=False)
    assert sent(outbox) == []
    resp.flush(session_ready=True)
    assert [m["event_id"] for m in sent(outbox)] == ["relay_create_1"]


def test_a_create_refused_for_a_race_is_found_by_event_id_and_goes_out_first_after_the_next_done() -> None:
    resp, outbox = responses()
    resp.request(plain(), session_ready=True)
    create = resp.in_flight
    assert create is not None
    resp.created("resp_server", out_of_band=False)  # the server's own response won
    resp.request(spoken("later"), session_ready=True)
    outbox.take()
    assert resp.refused("relay_create_1", raced=True) is None  # not given up: queued again, first
    assert resp.in_flight is None
    assert [q["event_id"] for q in resp.queued] == ["relay_create_1", "relay_create_2"]
    assert resp.queued[0] is create
    assert resp.refused("relay_create_1", raced=True) is None  # forgotten once found
    assert len(resp.queued) == 2
    resp.done("resp_server")
    resp.flush(session_ready=True)
    assert [m["event_id"] for m in sent(outbox)] == ["relay_create_1"]


def test_only_recent_creates_are_kept_for_errors() -> None:
    resp, _ = responses()
    for _ in range(17):
        resp.request(plain(), session_ready=True)
        resp.created("r", out_of_band=False)
        resp.done("r")
    assert resp.refused("relay_create_1", raced=False) is None
    assert resp.refused("relay_create_2", raced=False) == {"type": "response.create", "event_id": "relay_create_2"}


def test_a_create_refused_for_another_reason_is_given_up() -> None:
    resp, _ = responses()
    resp.request(summary(), session_ready=True)
    create = resp.in_flight
    assert resp.refused("relay_create_1", raced=False) is create
    assert (resp.in_flight, list(resp.queued)) == (None, [])
    assert resp.refused(None, raced=False) is None


def test_out_of_band_responses_never_become_active_nor_count_against_idle() -> None:
    resp, _ = responses()
    resp.request(summary(), session_ready=True)
    resp.created("resp_oob", out_of_band=True)
    assert (resp.active, resp.in_flight, resp.out_of_band) == (None, None, {"resp_oob"})
    resp.created("resp_1", out_of_band=False)
    resp.request(summary(), session_ready=True)
    assert resp.queued and not resp.idle  # resp_1 is active
    resp.done("resp_1")
    assert resp.idle  # only an out-of-band create waits
    assert resp.done("resp_oob")
    assert resp.out_of_band == set()


def test_a_cut_response_is_dropped_cancelled_and_blocks_creates_until_its_done() -> None:
    resp, outbox = responses()
    resp.created("resp_1", out_of_band=False)
    assert resp.cut_active(cancel=True) == "resp_1"
    assert sent(outbox) == [{"type": "response.cancel", "response_id": "resp_1"}]
    assert (resp.active, resp.dropped, resp.ending) == (None, {"resp_1"}, {"resp_1"})
    resp.request(plain(), session_ready=True)
    assert sent(outbox) == []  # it would be refused: resp_1 has not ended
    resp.done("resp_1")
    resp.flush(session_ready=True)
    assert [m["type"] for m in sent(outbox)] == ["response.create"]
    assert resp.cut_active(cancel=True) is None


def test_a_cut_the_server_makes_itself_sends_no_cancel() -> None:
    resp, outbox = responses()
    resp.created("resp_1", out_of_band=False)
    resp.cut_active(cancel=False)
    assert sent(outbox) == []


def test_a_lost_session_drops_what_it_was_generating_and_what_waited_for_it() -> None:
    resp, _ = responses()
    resp.created("resp_1", out_of_band=False)
    resp.request(plain(), session_ready=True)
    resp.session_lost()
    assert (resp.active, resp.in_flight, list(resp.queued), resp.dropped) == (None, None, [], {"resp_1"})
    assert resp.idle
