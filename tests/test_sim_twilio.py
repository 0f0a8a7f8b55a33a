"""The simulated Twilio runs TwiML as Twilio does: verbs in order, <Redirect> as a signed POST of the
call's parameters, and every request through a round-robin balancer that passes over an instance
refusing connections or answering 503. Real HTTP servers on loopback; the signatures are checked
with the official twilio package."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qsl

import pytest
from conftest import AUTH_TOKEN, free_port
from twilio.request_validator import RequestValidator

from relay.sim.caller import Balancer, CallerConfig, CallRejected, NoInstance, TwilioCall

PUBLIC = "https://relay.example.com"


@dataclass
class TwimlServer:
    """Answers each path with the next of its (status, TwiML) answers; records what it got."""

    answers: dict[str, list[tuple[int, str]]]
    got: list[tuple[str, dict[str, str], bool]] = field(default_factory=list)  # path, form, signature valid
    url: str = ""

    def serve(self) -> ThreadingHTTPServer:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                form = dict(parse_qsl(self.rfile.read(int(self.headers["content-length"])).decode()))
                signed = RequestValidator(AUTH_TOKEN).validate(
                    PUBLIC + self.path, form, self.headers.get("X-Twilio-Signature", "")
                )
                server.got.append((self.path, form, signed))
                status, body = server.answers[self.path].pop(0)
                data = body.encode()
                self.send_response(status)
                self.send_header("content-type", "text/xml")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                return

        httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{httpd.server_address[1]}"
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        return httpd


Serve = Callable[[dict[str, list[tuple[int, str]]]], TwimlServer]


@pytest.fixture
def serve() -> Iterator[Serve]:
    """``serve(answers)`` starts a TwimlServer; all are stopped after the test."""
    running: list[ThreadingHTTPServer] = []

    def start(answers: dict[str, list[tuple[int, str]]]) -> TwimlServer:
        server = TwimlServer(answers)
        running.append(server.serve())
        return server

    yield start
    for httpd in running:
        httpd.shutdown()
        httpd.server_close()


def doc(*verbs: str) -> str:
    return '<?xml version="1.0" encoding="UTF-8"?><Response>' + "".join(verbs) + "</Response>"


def call_on(instances: list[str] | Balancer, delay_s: float = 0.0) -> TwilioCall:
    config = CallerConfig(base_url="http://unused.invalid", auth_token=AUTH_TOKEN, public_url=PUBLIC)
    return TwilioCall(config, instances, reconnect_delay_s=delay_s)


async def test_verbs_run_in_order_and_a_redirect_is_a_signed_post_whose_answer_replaces_the_document(
    serve: Serve,
) -> None:
    twiml = serve(
        {
            "/incoming-call": [
                (200, doc("<Say>One moment.</Say>", '<Pause length="0.3"/>', f"<Redirect>{PUBLIC}/next</Redirect>"))
            ],
            "/next": [(200, doc("<Say>Connecting you.</Say>", "<Dial>+15550009999</Dial>", "<Say>never</Say>"))],
        }
    )
    call = call_on([twiml.url])
    began = time.monotonic()
    await call.start()
    assert await call.wait_ended(timeout=5) == "dialled"
    assert time.monotonic() - began >= 0.3
    assert call.said == ["One moment.", "Connecting you."]
    assert call.dialled == ["+15550009999"]
    assert [(path, form["CallStatus"], signed) for path, form, signed in twiml.got] == [
        ("/incoming-call", "ringing", True),
        ("/next", "in-progress", True),
    ]
    assert {form["CallSid"] for _, form, _ in twiml.got} == {call.call_sid}
    assert [kind for _, kind, _ in call.events] == ["webhook", "say", "pause", "redirect", "say", "dial", "ended"]
    assert call.legs == [] and call.errors == []


@pytest.mark.parametrize(
    ("document", "outcome"),
    [
        (doc("<Say>Goodbye.</Say>", "<Hangup/>", "<Say>never</Say>"), "hung_up"),
        (doc("<Say>Goodbye.</Say>"), "completed"),
        (doc("<Gather/>"), "application_error"),
        ("not xml", "application_error"),
    ],
)
async def test_a_call_ends_with_a_hangup_the_end_of_its_document_or_an_error(
    serve: Serve, document: str, outcome: str
) -> None:
    twiml = serve({"/incoming-call": [(200, document)]})
    call = call_on([twiml.url])
    await call.start()
    assert await call.wait_ended(timeout=5) == outcome
    assert call.said == (["Goodbye."] if outcome != "application_error" else [])
    assert len(call.errors) == (outcome == "application_error")


async def test_a_redirect_answered_with_an_error_ends_the_call_and_a_refused_webhook_rejects_it(
    serve: Serve,
) -> None:
    twiml = serve(
        {"/incoming-call": [(200, doc(f"<Redirect>{PUBLIC}/next</Redirect>")), (403, "")], "/next": [(500, "")]}
    )
    call = call_on([twiml.url])
    await call.start()
    assert await call.wait_ended(timeout=5) == "application_error"
    assert call.errors == [f"<Redirect> to {PUBLIC}/next answered 500"]
    refused = call_on([twiml.url])
    with pytest.raises(CallRejected):
        await refused.start()
    assert refused.outcome == "rejected"


async def test_the_balancer_goes_round_robin_passing_over_refused_connections_and_503(
    serve: Serve,
) -> None:
    ok = doc("<Hangup/>")
    draining = serve({"/incoming-call": [(503, "draining")] * 3})
    first = serve({"/incoming-call": [(200, ok)] * 3})
    second = serve({"/incoming-call": [(200, ok)] * 3})
    dead = f"http://127.0.0.1:{free_port()}"
    balancer = Balancer([dead, draining.url, first.url, second.url])
    for _ in range(4):
        call = call_on(balancer)
        await call.start()
        assert await call.wait_ended(timeout=5) == "hung_up"
    # rotations start at dead, draining, first, second: dead and draining are passed over each time
    assert (len(first.got), len(second.got), len(draining.got)) == (3, 1, 2)
    assert balancer.passed_over == [dead, draining.url, draining.url]
    with pytest.raises(NoInstance):
        await call_on([dead]).start()
