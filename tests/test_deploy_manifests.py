"""deploy/: the Kubernetes overlays render and validate strictly, and keep the promises the docs make.

Every object `kubectl kustomize` renders is validated against Kubernetes' own API schema
(kubernetes-validate, strict: unknown fields are errors). The policy each overlay ships in its
ConfigMap loads with the gateway's own loader. The Dockerfile is checked statically here; the slow
test in test_deploy_image.py builds and runs it where podman can.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import httpx
import kubernetes_validate
import pytest
import yaml

from gateway.compiled.policy import parse_policy
from tests.conftest import RunningGateway, key_hash, run_gateway

ROOT = Path(__file__).resolve().parents[1]
KUBERNETES = ROOT / "deploy" / "kubernetes"
OVERLAYS = sorted(p.name for p in (KUBERNETES / "overlays").iterdir() if p.is_dir())
KUBERNETES_VERSION = "1.33.0"  # the oldest minor still supported upstream when this was written


def render(directory: Path) -> list[dict[str, Any]]:
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl is needed to render the overlays (.ci/run installs it)"
    out = subprocess.run([kubectl, "kustomize", str(directory)], check=True, capture_output=True, text=True,
                         timeout=60).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def one(objects: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, f"{kind} {name}: {len(found)} found"
    return found[0]


@pytest.fixture(scope="module", params=OVERLAYS)
def overlay(request: pytest.FixtureRequest) -> tuple[str, list[dict[str, Any]]]:
    return request.param, render(KUBERNETES / "overlays" / request.param)


def test_the_overlays_are_single_and_ha() -> None:
    assert OVERLAYS == ["ha", "single"]


def test_every_object_validates_strictly_against_the_kubernetes_api(
        overlay: tuple[str, list[dict[str, Any]]]) -> None:
    _, objects = overlay
    assert {o["kind"] for o in objects} >= {"Deployment", "Service", "ConfigMap", "ServiceAccount"}
    for obj in objects:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)


def test_strict_validation_refuses_an_unknown_field(overlay: tuple[str, list[dict[str, Any]]]) -> None:
    _, objects = overlay
    deployment = dict(one(objects, "Deployment"))
    deployment["spec"] = {**deployment["spec"], "replica": 3}  # a typo a lenient check would let through
    with pytest.raises(kubernetes_validate.ValidationError, match="replica"):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)


def shipped_policy(objects: list[dict[str, Any]]) -> Any:
    text = one(objects, "ConfigMap", "switchboard-policy")["data"]["policy.yaml"]
    return parse_policy(text, environ={"REDIS_URL": "redis://redis:6379/0"})


def test_pods_drain_before_they_are_killed(overlay: tuple[str, list[dict[str, Any]]]) -> None:
    _, objects = overlay
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    pause = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    server = shipped_policy(objects).server
    # kubelet's SIGKILL comes terminationGracePeriodSeconds after the preStop hook starts.
    assert pod["terminationGracePeriodSeconds"] > pause + server.drain_s + server.shutdown_grace_s
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True


def test_policy_comes_from_the_configmap_and_keys_from_a_secret(overlay: tuple[str, list[dict[str, Any]]]) -> None:
    _, objects = overlay
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    # Mounted as a directory (no subPath): only then does kubelet's ..data swap reach the pod.
    assert volumes["policy"]["configMap"]["name"] == "switchboard-policy"
    assert mounts["policy"]["mountPath"] == "/etc/switchboard" and "subPath" not in mounts["policy"]
    assert container["args"][:2] == ["--policy", "/etc/switchboard/policy.yaml"]
    # A fixed ConfigMap name: a hash suffix would restart pods instead of hot-reloading.
    assert one(objects, "ConfigMap")["metadata"]["name"] == "switchboard-policy"
    assert [e["secretRef"]["name"] for e in container["envFrom"]] == ["switchboard-provider-keys"]


def test_admin_surface_has_its_own_service(overlay: tuple[str, list[dict[str, Any]]]) -> None:
    _, objects = overlay
    tenant, admin = one(objects, "Service", "switchboard"), one(objects, "Service", "switchboard-admin")
    assert [p["name"] for p in tenant["spec"]["ports"]] == ["http"]
    assert [p["name"] for p in admin["spec"]["ports"]] == ["admin"]


PROMETHEUS_ON_KUBERNETES = ROOT / "deploy" / "prometheus" / "kubernetes.yml"
# Where the Prometheus Operator mounts `spec.secrets: [switchboard-metrics]`: /etc/prometheus/secrets/<name>/<key>.
METRICS_KEY_FILE = "/etc/prometheus/secrets/switchboard-metrics/key"
NO_KEY_HASH = "sha256:" + "0" * 64


def test_prometheus_scrapes_every_pod_with_the_admin_key_metrics_asks_for(
        overlay: tuple[str, list[dict[str, Any]]]) -> None:
    _, objects = overlay
    template = one(objects, "Deployment")["spec"]["template"]
    (container,) = template["spec"]["containers"]
    # Annotation-driven scrape jobs cannot send a key: they would only collect 401s.
    assert not any(k.startswith("prometheus.io/") for k in template["metadata"].get("annotations", {}))
    (job,) = yaml.safe_load(PROMETHEUS_ON_KUBERNETES.read_text())["scrape_configs"]
    assert job["authorization"] == {"type": "Bearer", "credentials_file": METRICS_KEY_FILE}
    # Every ready pod, through a headless Service over the gateway pods, on the tenant port.
    (discovery,) = job["dns_sd_configs"]
    service = one(objects, "Service", discovery["names"][0])
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["selector"].items() <= template["metadata"]["labels"].items()
    (port,) = service["spec"]["ports"]
    http = next(p for p in container["ports"] if p["name"] == port["targetPort"])
    assert http["name"] == "http" and discovery["port"] == port["port"] == http["containerPort"]
    # The pods read the key's hash from the same Secret; the policy makes it an admin key.
    (variable,) = [e for e in container["env"] if e["name"] == "SWITCHBOARD_METRICS_KEY_HASH"]
    assert variable["valueFrom"]["secretKeyRef"] == {"name": "switchboard-metrics", "key": "hash", "optional": True}
    text = one(objects, "ConfigMap", "switchboard-policy")["data"]["policy.yaml"]
    environ = {"REDIS_URL": "redis://redis:6379/0", "SWITCHBOARD_METRICS_KEY_HASH": key_hash("sk-scraper")}
    assert parse_policy(text, environ=environ).admin_keys == {hashlib.sha256(b"sk-scraper").digest()}
    # Without the Secret no admin key works (no key hashes to zeros), rather than the policy failing to load.
    assert parse_policy(text, environ={"REDIS_URL": "redis://redis:6379/0"}).admin_keys == {bytes(32)}


def test_the_shipped_policy_serves_metrics_to_the_secrets_key_only(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    objects = render(KUBERNETES / "overlays" / "single")
    text = one(objects, "ConfigMap", "switchboard-policy")["data"]["policy.yaml"]
    path = tmp_path / "policy.yaml"
    path.write_text(text.replace("/var/lib/switchboard/", str(tmp_path) + "/"))

    def scrape(gateway: RunningGateway, key: str | None) -> int:
        headers = {"authorization": f"Bearer {key}"} if key else {}
        return httpx.get(gateway.base_url + "/metrics", headers=headers).status_code

    monkeypatch.setenv("SWITCHBOARD_METRICS_KEY_HASH", key_hash("sk-scraper"))
    gateway = run_gateway(path)
    try:
        assert scrape(gateway, "sk-scraper") == 200
        assert scrape(gateway, None) == 401 and scrape(gateway, "sk-switchboard-demo") == 401
    finally:
        gateway.stop()


def test_ha_runs_three_replicas_on_redis_scaled_spread_and_protected() -> None:
    objects = render(KUBERNETES / "overlays" / "ha")
    deployment = one(objects, "Deployment")
    assert deployment["spec"]["replicas"] >= 3
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    policy = shipped_policy(objects)
    assert policy.state.backend == "redis" and policy.state.url == "redis://redis:6379/0"
    hpa = one(objects, "HorizontalPodAutoscaler")
    assert hpa["spec"]["minReplicas"] >= 3 and hpa["spec"]["scaleTargetRef"]["name"] == "switchboard"
    assert [m["resource"]["name"] for m in hpa["spec"]["metrics"]] == ["cpu"]
    pdb = one(objects, "PodDisruptionBudget")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert 0 < pdb["spec"]["minAvailable"] < hpa["spec"]["minReplicas"]
    spread = deployment["spec"]["template"]["spec"]["topologySpreadConstraints"]
    assert {c["topologyKey"] for c in spread} == {"topology.kubernetes.io/zone", "kubernetes.io/hostname"}
    assert all(c["labelSelector"]["matchLabels"].items() <= labels.items() for c in spread)


def test_single_keeps_the_embedded_store_on_a_persistent_volume() -> None:
    objects = render(KUBERNETES / "overlays" / "single")
    deployment = one(objects, "Deployment")
    assert deployment["spec"]["replicas"] == 1 and deployment["spec"]["strategy"]["type"] == "Recreate"
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    claim = volumes["data"]["persistentVolumeClaim"]["claimName"]
    assert "emptyDir" not in volumes["data"]
    one(objects, "PersistentVolumeClaim", claim)
    state = shipped_policy(objects).state
    assert state.backend == "durable" and state.path.startswith("/var/lib/switchboard/")


# --- the container image, statically --------------------------------------------------------


DOCKERFILE = ROOT / "deploy" / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    pairs = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            pairs.append((word.upper(), rest.strip()))
    return pairs


def final_stage() -> list[tuple[str, str]]:
    steps = instructions()
    start = max(i for i, (word, _) in enumerate(steps) if word == "FROM")
    return steps[start:]


def test_image_is_multi_stage_and_runs_as_a_numeric_non_root_user() -> None:
    stages = [args for word, args in instructions() if word == "FROM"]
    assert len(stages) >= 2 and stages[0].endswith("AS build")
    final = final_stage()
    # Nothing from the build stage but the venv, the app and the encodings reaches the runtime image.
    copies = [args for word, args in final if word == "COPY" and "--from=build" in args]
    assert sorted(c.split()[1] for c in copies) == ["/app", "/opt/tiktoken", "/opt/venv"]
    (user,) = [args for word, args in final if word == "USER"]
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) > 0  # numeric, so runAsNonRoot can verify it


def test_image_health_check_stop_signal_and_pid_1() -> None:
    final = dict(final_stage())
    assert "/healthz" in final["HEALTHCHECK"] and final["HEALTHCHECK"].startswith("--interval")
    assert final["STOPSIGNAL"] == "SIGTERM"
    # Exec form (a JSON array): the signal goes to tini, which passes it on, not to a shell that drops it.
    entrypoint = yaml.safe_load(final["ENTRYPOINT"])
    assert entrypoint[0] == "tini" and entrypoint[-2:] == ["switchboard", "serve"]
    assert isinstance(yaml.safe_load(final["CMD"]), list)


def test_image_bakes_the_tiktoken_encodings_at_build_time() -> None:
    build = instructions()[:max(i for i, (w, _) in enumerate(instructions()) if w == "FROM")]
    baking = [args for word, args in build if word == "RUN" and "tiktoken.get_encoding" in args]
    assert baking and "TIKTOKEN_CACHE_DIR=/opt/tiktoken" in baking[0] and "PRELOAD_ENCODINGS" in baking[0]
    env = " ".join(args for word, args in final_stage() if word == "ENV")
    assert "TIKTOKEN_CACHE_DIR=/opt/tiktoken" in env


def test_build_context_sends_only_what_the_image_copies() -> None:
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ignored[ignored.index("*") + 1:][:6] == ["!pyproject.toml", "!README.md", "!gateway/", "!providers/",
                                                    "!policies/", "!deploy/"]
