"""Deploying the relay as shipped: the proxy in front of two instances, drain behind it, the files an
operator copies, and what the documentation promises about them.

The nginx tests run Debian's nginx (``apt-get install nginx-light``) as a real reverse proxy on
loopback with the shipped ``infra/nginx.conf``, only its addresses rewritten, in front of real
``python -m relay serve`` processes; they are skipped when no nginx binary is installed.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from conftest import AUTH_TOKEN, free_port
from ops_support import RelayProcess, metric, parse_metrics
from twilio.request_validator import RequestValidator

from relay.sim.caller import CallerConfig, SimulatedCaller
from relay.sim.realtime import RealtimeSimulator

pytestmark = pytest.mark.timeout(90)

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
NGINX_CONF = INFRA / "nginx.conf"
COMPOSE = INFRA / "docker-compose.yml"
WEBHOOK = "/incoming-call"


def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return data


def compose_relay_environment() -> dict[str, str]:
    """The `environment:` the compose file gives both relays (they share one definition)."""
    envs = [svc.get("environment", {}) for svc in compose()["services"].values() if "build" in svc]
    assert len(envs) == 2 and envs[0] == envs[1]
    return {k: str(v) for k, v in envs[0].items()}


def stream_url_of(body: str) -> str | None:
    root = ET.fromstring(body)
    stream = root.find("./Connect/Stream")
    return None if stream is None else stream.get("url")


def webhook_form(call_sid: str) -> dict[str, str]:
    return {
        "CallSid": call_sid,
        "AccountSid": "AC" + "0" * 32,
        "From": "+15550001111",
        "To": "+15550002222",
        "CallStatus": "ringing",
        "Direction": "inbound",
    }


async def post_signed_webhook(
    url: str, signed_url: str, call_sid: str, headers: dict[str, str] | None = None
) -> httpx.Response:
    """POST Twilio's voice webhook to `url`, signed (as Twilio does) over `signed_url`."""
    form = webhook_form(call_sid)
    signature = RequestValidator(AUTH_TOKEN).compute_signature(signed_url, form)
    async with httpx.AsyncClient(trust_env=False, timeout=10.0) as http:
        return await http.post(url, data=form, headers={"X-Twilio-Signature": signature, **(headers or {})})


async def start_draining_with_a_live_call(relay: RelayProcess, caller: SimulatedCaller) -> None:
    """SIGTERM while a call is up: the instance stays draining (DRAIN_SECONDS is long) with that call."""
    await caller.connect()
    assert await caller.wait_for_audio(200, timeout=10)
    relay.signal(signal.SIGTERM)
    deadline = time.monotonic() + 5
    while (await relay.get("/readyz")).status_code != 503:
        assert time.monotonic() < deadline, "the relay did not start draining"
        await asyncio.sleep(0.05)


# ---- drain: the webhook is refused with 503, not answered "all lines busy" ------------------------


async def test_a_draining_instance_answers_the_webhook_with_503_and_retry_after(fast_sim: RealtimeSimulator) -> None:
    relay = RelayProcess(fast_sim.url, DRAIN_SECONDS="60", LOG_LEVEL="warning")
    await relay.start()
    try:
        live = SimulatedCaller(CallerConfig(base_url=relay.base_url, auth_token=AUTH_TOKEN))
        await start_draining_with_a_live_call(relay, live)

        response = await post_signed_webhook(relay.base_url + WEBHOOK, relay.base_url + WEBHOOK, "CA" + "1" * 32)
        assert response.status_code == 503
        assert response.headers["retry-after"] == "1"
        assert "<Response" not in response.text  # no TwiML: nothing for Twilio to play
        samples = parse_metrics((await relay.get("/metrics")).text)[1]
        assert metric(samples, "relay_calls_refused_total", reason="draining") == 1
        assert metric(samples, "relay_calls_refused_total", reason="full") == 0
        assert live.close_code is None  # the call in progress goes on
        # a bad signature is still a 403 while draining: the 503 is only for genuine calls
        elsewhere = "https://elsewhere.test" + WEBHOOK
        forged = await post_signed_webhook(relay.base_url + WEBHOOK, elsewhere, "CA" + "2" * 32)
        assert forged.status_code == 403
    finally:
        await relay.close()


# ---- nginx: the shipped configuration ----------------------------------------------------------


def crossplane_config(path: Path = NGINX_CONF) -> list[dict[str, Any]]:
    crossplane = pytest.importorskip("crossplane", reason="crossplane (nginx config parser) is not installed")
    payload = crossplane.parse(str(path), check_ctx=True, check_args=True, comments=False, single=True)
    assert payload["status"] == "ok", payload["errors"]
    parsed: list[dict[str, Any]] = payload["config"][0]["parsed"]
    return parsed


def directives(block: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [d for d in block if d["directive"] == name]


def server_block(config: list[dict[str, Any]]) -> list[dict[str, Any]]:
    (http,) = directives(config, "http")
    (server,) = directives(http["block"], "server")
    block: list[dict[str, Any]] = server["block"]
    return block


def location_block(config: list[dict[str, Any]], *args: str) -> list[dict[str, Any]]:
    found = [d["block"] for d in directives(server_block(config), "location") if d["args"] == list(args)]
    assert len(found) == 1, f"expected one `location {' '.join(args)}` in nginx.conf"
    block: list[dict[str, Any]] = found[0]
    return block


def effective(config: list[dict[str, Any]], location: list[dict[str, Any]], name: str) -> list[str] | None:
    """A directive's arguments as nginx applies them in `location`: its own, else the server's."""
    for block in (location, server_block(config)):
        found = directives(block, name)
        if found:
            args: list[str] = found[-1]["args"]
            return args
    return None


def test_nginx_sets_forwarded_host_and_proto_itself_in_every_proxied_location() -> None:
    config = crossplane_config()
    proxied = [d["block"] for d in directives(server_block(config), "location") if directives(d["block"], "proxy_pass")]
    assert len(proxied) == 3  # /, /incoming-call, /continue-call
    for location in proxied:
        # nginx inherits proxy_set_header only into a location that sets none of its own
        own = directives(location, "proxy_set_header")
        headers = {
            d["args"][0].lower(): d["args"][1] for d in own or directives(server_block(config), "proxy_set_header")
        }
        assert headers["x-forwarded-host"] == "$host"
        assert headers["x-forwarded-proto"] == "$scheme"


@pytest.mark.parametrize("path", [WEBHOOK, "/continue-call"])
def test_nginx_retries_the_webhook_on_the_other_relay_when_one_refuses_or_fails(path: str) -> None:
    config = crossplane_config()
    webhook = location_block(config, "=", path)
    next_upstream = effective(config, webhook, "proxy_next_upstream")
    assert next_upstream is not None
    # a draining relay's 503 and an unreachable relay are retried; POST needs non_idempotent to be retried
    assert {"error", "timeout", "http_503", "non_idempotent"} <= set(next_upstream)
    (upstream,) = directives(directives(config, "http")[0]["block"], "upstream")
    relays = len(directives(upstream["block"], "server"))
    tries = effective(config, webhook, "proxy_next_upstream_tries")
    assert tries is not None and int(tries[0]) == relays == 2
    # nginx can only send a body again if it buffered it
    assert effective(config, webhook, "proxy_request_buffering") != ["off"]
    assert effective(config, webhook, "proxy_pass") == [f"http://{upstream['args'][0]}"]
    # the WebSocket location keeps the default: an established call is never replayed
    root = location_block(config, "/")
    assert "non_idempotent" not in (effective(config, root, "proxy_next_upstream") or [])
    assert effective(config, root, "proxy_set_header") is not None


# ---- nginx for real: Debian's nginx in front of two serve processes ---------------------------------


NGINX_LOG_FORMAT = "$request_uri $status $upstream_addr|$upstream_status"


class NginxProcess:
    """The shipped nginx.conf with loopback addresses, run by the nginx binary in the foreground."""

    def __init__(self, binary: str, workdir: Path, upstream_ports: list[int], *, bind: str | None = None) -> None:
        self.binary = binary
        self.workdir = workdir
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.access_log = workdir / "access.log"
        self.conf = workdir / "nginx.conf"
        self.conf.write_text(self._config(upstream_ports, bind))
        self.proc: subprocess.Popen[bytes] | None = None

    def _config(self, upstream_ports: list[int], bind: str | None) -> str:
        import crossplane

        config = crossplane_config()
        for d in config:
            if d["directive"] == "worker_processes":
                d["args"] = ["1"]  # one worker: the upstream choice is then made in one place
        config.insert(0, {"directive": "pid", "args": [str(self.workdir / "nginx.pid")]})
        (http,) = directives(config, "http")
        block = http["block"]
        (upstream,) = directives(block, "upstream")
        servers = directives(upstream["block"], "server")
        assert len(servers) == len(upstream_ports)
        for server, port in zip(servers, upstream_ports, strict=True):
            server["args"][0] = f"127.0.0.1:{port}"
        for d in directives(block, "access_log"):
            d["args"] = [str(self.access_log), "retries"]
        extra = [
            {"directive": "log_format", "args": ["retries", NGINX_LOG_FORMAT]},
            *(
                {"directive": f"{kind}_temp_path", "args": [str(self.workdir / kind)]}
                for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
            ),
        ]
        if bind:
            extra.append({"directive": "proxy_bind", "args": [bind]})
        block[0:0] = extra
        server = server_block(config)
        for d in directives(server, "listen"):
            d["args"] = [f"127.0.0.1:{self.port}"]
        built: str = crossplane.build(config)
        return built + "\n"

    def _launch(self) -> subprocess.Popen[bytes]:
        """`nginx -t` on the configuration, then nginx in the foreground in its own process group."""
        test = subprocess.run(
            [self.binary, "-t", "-q", "-p", str(self.workdir), "-c", str(self.conf), "-e", "stderr"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert test.returncode == 0, f"nginx -t: {test.stderr}"
        return subprocess.Popen(
            [self.binary, "-p", str(self.workdir), "-c", str(self.conf), "-e", "stderr", "-g", "daemon off;"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )

    async def start(self, timeout: float = 10.0) -> NginxProcess:
        self.proc = self._launch()
        deadline = time.monotonic() + timeout
        async with httpx.AsyncClient(trust_env=False, timeout=1.0) as http:
            while True:
                assert self.proc.poll() is None, f"nginx exited with {self.proc.returncode}"
                try:
                    if (await http.get(self.base_url + "/healthz")).status_code == 200:
                        return self
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, "nginx did not answer"
                await asyncio.sleep(0.05)

    def webhook_log(self) -> list[tuple[int, list[str], list[str]]]:
        """(final status, upstreams tried, their statuses) of every webhook request, in order."""
        entries = []
        for line in self.access_log.read_text().splitlines():
            uri, status, upstream = line.split(" ", 2)
            if uri != WEBHOOK:
                continue
            addresses, _, statuses = upstream.partition("|")
            entries.append((int(status), addresses.split(", "), statuses.split(", ")))
        return entries

    def stop(self) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=10)
        self.proc = None


@pytest.fixture
def nginx_binary() -> str:
    binary = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if os.access(p, os.X_OK)), None)
    if binary is None:
        if os.environ.get("CI") == "true":
            pytest.fail("nginx is missing under CI: .ci/run installs Debian's nginx-light package")
        pytest.skip("nginx is not installed (apt-get install nginx-light): the real-proxy tests need it")
    return binary


@pytest.fixture
def nginx_processes() -> Iterator[list[NginxProcess]]:
    started: list[NginxProcess] = []
    yield started
    for proxy in started:
        proxy.stop()


async def test_behind_nginx_a_new_call_reaches_the_idle_relay_while_the_other_drains(
    fast_sim: RealtimeSimulator, nginx_binary: str, nginx_processes: list[NginxProcess], tmp_path: Path
) -> None:
    draining = RelayProcess(fast_sim.url, DRAIN_SECONDS="60", LOG_LEVEL="warning")
    idle = RelayProcess(fast_sim.url, DRAIN_SECONDS="60", LOG_LEVEL="warning")
    proxy = NginxProcess(nginx_binary, tmp_path, [draining.port, idle.port])
    nginx_processes.append(proxy)
    for relay in (draining, idle):
        relay.env["PUBLIC_URL"] = proxy.base_url  # what Twilio signs and the stream URL both name the proxy
    try:
        await asyncio.gather(draining.start(), idle.start())
        await proxy.start()
        live = SimulatedCaller(
            CallerConfig(base_url=draining.base_url, public_url=proxy.base_url, auth_token=AUTH_TOKEN)
        )
        await start_draining_with_a_live_call(draining, live)

        # new calls through the proxy until one was first offered to the draining relay
        answered = 0
        for _ in range(6):
            caller = SimulatedCaller(CallerConfig(base_url=proxy.base_url, auth_token=AUTH_TOKEN))
            status, body = await caller.webhook()
            assert status == 200, body
            assert stream_url_of(body) == proxy.base_url.replace("http://", "ws://") + "/media-stream", body
            answered += 1
            if any(len(tried) == 2 for _, tried, _ in proxy.webhook_log()):
                break
        deadline = time.monotonic() + 5  # nginx writes the line once the response has gone out
        while len(proxy.webhook_log()) < answered and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        log = proxy.webhook_log()
        assert len(log) == answered
        draining_addr, idle_addr = f"127.0.0.1:{draining.port}", f"127.0.0.1:{idle.port}"
        retried = [entry for entry in log if len(entry[1]) == 2]
        assert retried, log
        for status, tried, statuses in log:
            assert status == 200
            assert tried[-1] == idle_addr and statuses[-1] == "200"
        for _, tried, statuses in retried:
            assert (tried, statuses) == ([draining_addr, idle_addr], ["503", "200"])
        # every offer to the draining relay was refused there, as a drain and not as a full instance
        samples = parse_metrics((await draining.get("/metrics")).text)[1]
        assert metric(samples, "relay_calls_refused_total", reason="draining") == len(retried)
        idle_samples = parse_metrics((await idle.get("/metrics")).text)[1]
        assert metric(idle_samples, "relay_calls_refused_total") == 0
        assert live.close_code is None
    finally:
        await asyncio.gather(draining.close(), idle.close())


async def test_a_signed_webhook_through_the_shipped_proxy_validates_without_public_url(
    fast_sim: RealtimeSimulator, nginx_binary: str, nginx_processes: list[NginxProcess], tmp_path: Path
) -> None:
    """The proxy reaches the relays from an address other than 127.0.0.1 (as in compose or Kubernetes).
    The relay rebuilds the URL Twilio signed from the scheme and host nginx saw, believed only because it
    trusts the proxy (the FORWARDED_ALLOW_IPS the compose file ships); the client's own X-Forwarded-Host
    and -Proto are overwritten by nginx, so they cannot choose the stream URL."""
    env = compose_relay_environment()
    allow = env["FORWARDED_ALLOW_IPS"]
    relay = RelayProcess(fast_sim.url, PUBLIC_URL="", FORWARDED_ALLOW_IPS=allow, LOG_LEVEL="warning")
    await relay.start()
    proxy = NginxProcess(nginx_binary, tmp_path, [relay.port, relay.port], bind="127.0.0.2")
    nginx_processes.append(proxy)
    try:
        await proxy.start()
        public = "http://relay.example.test"
        response = await post_signed_webhook(
            proxy.base_url + WEBHOOK,
            public + WEBHOOK,
            "CA" + "3" * 32,
            headers={"Host": "relay.example.test", "X-Forwarded-Proto": "https", "X-Forwarded-Host": "evil.example"},
        )
        assert response.status_code == 200, response.text
        assert stream_url_of(response.text) == "ws://relay.example.test/media-stream"
        samples = parse_metrics((await relay.get("/metrics")).text)[1]
        assert metric(samples, "relay_calls_refused_total", reason="bad_signature") == 0
    finally:
        await relay.close()


def trusted(allow: str, address: str) -> bool:
    """Whether uvicorn, given FORWARDED_ALLOW_IPS=`allow`, believes X-Forwarded-* from `address`."""
    from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

    async def app(scope: Any, receive: Any, send: Any) -> None:
        return None

    return address in ProxyHeadersMiddleware(app, trusted_hosts=allow).trusted_hosts


def test_the_shipped_proxies_are_trusted_and_the_internet_is_not() -> None:
    compose_allow = compose_relay_environment()["FORWARDED_ALLOW_IPS"]
    (configmap,) = [d for d in yaml.safe_load_all((INFRA / "k8s" / "configmap.yaml").read_text()) if d]
    k8s_allow = configmap["data"]["FORWARDED_ALLOW_IPS"]
    # docker networks (default bridge pools), common pod CIDRs (flannel, calico, GKE, EKS, CGNAT)
    for address in ("172.18.0.5", "172.30.4.2", "192.168.16.3", "10.0.3.8"):
        assert trusted(compose_allow, address), address
    for address in ("10.244.3.17", "192.168.12.40", "172.20.1.9", "100.64.2.9", "fd00:10:244::5", "127.0.0.1"):
        assert trusted(k8s_allow, address), address
    for allow in (compose_allow, k8s_allow):
        assert "*" not in allow
        for address in ("8.8.8.8", "203.0.113.9", "2001:db8::1", "100.128.0.1"):
            assert not trusted(allow, address), (allow, address)


# ---- repository hygiene: what git and the image build leave out ----------------------------------


def ignored_by(ignore_file: Path, paths: list[str], tmp_path: Path) -> set[str]:
    """The paths `git check-ignore` reports as ignored by these patterns, in a scratch repository
    holding exactly those (empty) files, so directory patterns apply as they would in the checkout."""
    repo = tmp_path / "repo"
    repo.mkdir()
    git = ["git", "-c", "init.defaultBranch=main", "-C", str(repo)]
    subprocess.run([*git, "init", "-q"], check=True, timeout=30)
    (repo / ".gitignore").write_text(ignore_file.read_text())
    for path in paths:
        target = repo / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.touch()
    result = subprocess.run(
        [*git, "check-ignore", "--no-index", "--stdin"],
        input="\n".join(paths) + "\n",
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode in (0, 1), result.stderr  # 1: nothing ignored
    return set(result.stdout.split())


def test_gitignore_keeps_the_operators_env_file_out_of_git(tmp_path: Path) -> None:
    secret = ["infra/relay.env", ".env"]
    kept = ["infra/relay.env.example", "infra/docker-compose.yml", "infra/k8s/secret.example.yaml", "relay/app.py"]
    assert ignored_by(ROOT / ".gitignore", secret + kept, tmp_path) == set(secret)


def dockerfile_copy_sources() -> list[str]:
    sources: list[str] = []
    for line in (INFRA / "Dockerfile").read_text().splitlines():
        words = line.split()
        if words[:1] == ["COPY"] and not any(w.startswith("--from=") for w in words):
            sources += words[1:-1]
    return sources


def test_dockerignore_keeps_secrets_and_clutter_out_of_the_build_context(tmp_path: Path) -> None:
    dockerignore = ROOT / ".dockerignore"
    assert dockerignore.is_file(), "the build context is the repository root: .dockerignore belongs there"
    sources = dockerfile_copy_sources()
    assert sources == ["pyproject.toml", "README.md", "requirements.lock", "relay", "handlers"]
    needed = [
        "pyproject.toml",
        "README.md",
        "requirements.lock",
        "relay/app.py",
        "relay/store/redis.py",
        "relay/twilio/twiml.py",
        "handlers/orders.py",
        "handlers/data/orders.json",
    ]
    left_out = [
        ".git/HEAD",
        ".env",
        "infra/relay.env",
        "relay/.env",
        "bench/out/results.json",
        "bench/runner.py",
        "tests/test_deploy.py",
        ".pytest_cache/v/cache/lastfailed",
        ".mypy_cache/3.11/relay/app.data.json",
        ".ruff_cache/content",
        ".hypothesis/examples/x",
        "relay/__pycache__/app.cpython-311.pyc",
        "handlers/__pycache__/orders.cpython-311.pyc",
        ".venv/bin/python",
        "phone_relay.egg-info/PKG-INFO",
        "demo-call.wav",
    ]
    ignored = ignored_by(dockerignore, needed + left_out, tmp_path)
    assert not ignored & set(needed), f"the image build needs these: {sorted(ignored & set(needed))}"
    assert ignored >= set(left_out), f"these would enter the build context: {sorted(set(left_out) - ignored)}"
    # every COPY source exists in the context
    for source in sources:
        assert (ROOT / source).exists(), source


def test_compose_never_loads_the_example_env_file() -> None:
    for name, svc in compose()["services"].items():
        entries = svc.get("env_file", [])
        entries = [entries] if isinstance(entries, str) else entries
        for entry in entries:
            path = entry if isinstance(entry, str) else entry["path"]
            assert not path.endswith(".example"), f"{name} loads {path}: its placeholders would reach the relay"
            if "build" in svc:
                assert path == "relay.env"
                assert isinstance(entry, dict) and entry.get("required", True) is True, (
                    f"{name}: relay.env must be required, so a missing one stops compose instead of starting "
                    "a relay without secrets"
                )
    assert all("env_file" in svc for svc in compose()["services"].values() if "build" in svc)


def test_deploy_md_describes_the_state_redis_really_holds() -> None:
    text = (INFRA / "DEPLOY.md").read_text()
    redis_section = " ".join(text.split("## Redis (managed)", 1)[1].split("\n## ", 1)[0].split())
    assert "active-calls registry" not in redis_section
    # two pub/sub uses: each instance's presence channel, which also carries commands to its calls,
    # and the console's event feed
    assert "one pub/sub subscription open (`{prefix}presence:{id}`)" in redis_section
    assert "publish their events on `{prefix}console:events`" in redis_section
    store_code = "\n".join(p.read_text() for p in (ROOT / "relay" / "store").glob("*.py"))
    assert store_code.count(".publish(") == 2
    assert store_code.count(".subscribe(") == 2


def test_deploy_md_describes_the_live_stream_registry_and_an_eviction_policy_that_keeps_it() -> None:
    from relay.store.base import LIVE_HEARTBEAT_S, LIVE_TTL_S

    text = (INFRA / "DEPLOY.md").read_text()
    redis_section = " ".join(text.split("## Redis (managed)", 1)[1].split("\n## ", 1)[0].split())
    assert "no registry" not in redis_section
    assert "`{prefix}live:{call_sid}`" in redis_section
    assert f"renews it every {LIVE_HEARTBEAT_S:g} s with a {LIVE_TTL_S:g} s TTL" in redis_section
    # the shortest TTLs are the live holds and token markers: an evicting policy drops exactly those
    assert "**Eviction policy: `noeviction`**" in redis_section
    assert "relay_store_dropped_writes_total" in redis_section
    command = compose()["services"]["redis"]["command"]
    assert command[command.index("--maxmemory-policy") + 1] == "noeviction"


# ---- DEPLOY.md agrees with the code and the manifests -----------------------------------------------


def markdown_table(text: str, header: str) -> list[list[str]]:
    """The rows (cells stripped) of the first markdown table whose header row starts with `header`."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.strip().startswith(f"| {header}"):
            rows = []
            for row in lines[i + 2 :]:
                if not row.strip().startswith("|"):
                    break
                rows.append([cell.strip() for cell in row.strip().strip("|").split("|")])
            return rows
    raise AssertionError(f"no table with header {header!r}")


def app_endpoints() -> set[tuple[str, str]]:
    from starlette.routing import Route, WebSocketRoute

    from relay.app import create_app

    endpoints: set[tuple[str, str]] = set()
    for route in create_app().routes:
        if isinstance(route, WebSocketRoute):
            endpoints.add(("WS", route.path))
        elif isinstance(route, Route):
            endpoints |= {(method, route.path) for method in route.methods or () if method != "HEAD"}
    return endpoints


def test_deploy_md_lists_every_endpoint_of_the_app() -> None:
    documented: set[tuple[str, str]] = set()
    for row in markdown_table((INFRA / "DEPLOY.md").read_text(), "method and path"):
        quoted = row[0].split("`")[1::2]
        method, path = quoted[0].split()
        documented.add((method, path))
        documented |= {(also, path) for also in quoted[1:]}  # "(also `GET`)"
    assert documented == app_endpoints()


def k8s_docs(name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((INFRA / "k8s" / name).read_text()) if d]


def test_deploy_md_resources_match_the_deployment() -> None:
    (deployment,) = k8s_docs("deployment.yaml")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    resources = container["resources"]
    manifest = {
        (kind, resource): str(resources.get(kind, {}).get(resource, "none"))
        for kind in ("requests", "limits")
        for resource in ("cpu", "memory")
    }
    rows = markdown_table((INFRA / "DEPLOY.md").read_text(), "resource | request | limit")
    documented = {}
    for resource, request, limit in rows:
        key = {"CPU": "cpu", "memory": "memory"}[resource]
        documented[("requests", key)] = request
        documented[("limits", key)] = limit
    assert documented == manifest
    # the HPA's target is a share of that CPU request
    assert "cpu" in resources["requests"]


def test_the_example_ingress_publishes_only_what_twilio_and_openai_call() -> None:
    (ingress,) = k8s_docs("ingress.yaml")
    paths = [(p["path"], p["pathType"]) for rule in ingress["spec"]["rules"] for p in rule["http"]["paths"]]
    assert sorted(paths) == [
        ("/amd-status", "Exact"),
        ("/call-status", "Exact"),
        ("/continue-call", "Exact"),
        ("/incoming-call", "Exact"),
        ("/media-stream", "Exact"),
        ("/openai/webhook", "Exact"),  # SIP mode's project webhook
        ("/recording-status", "Exact"),
        ("/transfer-whisper", "Exact"),
    ]

    def published(request_path: str) -> bool:
        for path, kind in paths:
            if kind == "Exact" and request_path == path:
                return True
            if kind == "Prefix" and (request_path == path or request_path.startswith(path.rstrip("/") + "/")):
                return True
        return False

    for internal in ("/metrics", "/readyz", "/healthz", "/calls", "/calls/CA0123"):
        assert not published(internal), internal
    annotations = ingress["metadata"]["annotations"]
    retry = annotations["nginx.ingress.kubernetes.io/proxy-next-upstream"].split()
    assert {"error", "timeout", "http_503", "non_idempotent"} <= set(retry)  # the webhooks are POSTs


# ---- the suite itself on a shared Redis ----------------------------------------------------------


def test_the_suites_redis_server_and_databases_come_from_the_environment() -> None:
    from conftest import BENCH_REDIS_DB_ENV, DEFAULT_BENCH_DB, redis_db_from_env, shared_redis_server

    assert shared_redis_server({}) == "redis://127.0.0.1:6379"
    assert redis_db_from_env(env={}) == 15
    assert redis_db_from_env(BENCH_REDIS_DB_ENV, DEFAULT_BENCH_DB, env={}) == 14
    env = {"RELAY_TEST_REDIS_URL": "rediss://:pw@cache.internal:6380", "RELAY_TEST_REDIS_DB": "3"}
    env[BENCH_REDIS_DB_ENV] = "4"
    assert shared_redis_server(env) == "rediss://:pw@cache.internal:6380"
    assert redis_db_from_env(env=env) == 3
    assert redis_db_from_env(BENCH_REDIS_DB_ENV, DEFAULT_BENCH_DB, env=env) == 4
    with pytest.raises(pytest.UsageError, match="RELAY_TEST_REDIS_DB"):
        redis_db_from_env(env={"RELAY_TEST_REDIS_DB": "fifteen"})
    with pytest.raises(pytest.UsageError, match="server only"):
        shared_redis_server({"RELAY_TEST_REDIS_URL": "redis://127.0.0.1:6379/15"})


def test_the_suite_writes_only_to_the_configured_redis_database(private_redis: Any) -> None:
    """A real run of a Redis test against a server named by RELAY_TEST_REDIS_URL, watched with MONITOR."""
    import redis

    server = f"redis://127.0.0.1:{private_redis.port}"
    monitor_client = redis.Redis.from_url(server)
    seen: list[str] = []
    with monitor_client.monitor() as monitor:
        env = {**os.environ, "RELAY_TEST_REDIS_URL": server, "RELAY_TEST_REDIS_DB": "9"}
        env.pop("CI", None)
        run = subprocess.run(
            [
                *("python", "-m", "pytest", "-q", "-p", "no:cacheprovider"),
                "tests/test_store.py::test_call_ttls_are_refreshed_after_the_refresh_interval",
            ],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
        probe = redis.Redis.from_url(server + "/0")
        probe.set("monitor-end", "1")  # the last command MONITOR will report
        probe.close()
        for command in monitor.listen():
            seen.append(f"{command['db']} {command['command']}")
            if "monitor-end" in command["command"]:
                break
    monitor_client.close()
    # every command but connection set-up and the availability PING went to database 9
    handshake = {"PING", "HELLO", "SELECT", "CLIENT", "AUTH"}
    commands = [line for line in seen if "monitor-end" not in line and line.split(" ", 2)[1].upper() not in handshake]
    assert len(commands) > 5, seen[:20]
    assert {line.split(" ", 1)[0] for line in commands} == {"9"}, [c for c in commands if not c.startswith("9 ")]
