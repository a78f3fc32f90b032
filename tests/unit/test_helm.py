"""The Helm chart in helm/: linted, rendered, validated, and read for what must hold.

No cluster, helm binary or kubeconform here: the Helm SDK (helm-python-sdk, Helm's Go
code behind ctypes) lints in strict mode and renders; kubernetes-validate checks every
built-in object against the Kubernetes OpenAPI schemas of KUBE_VERSION in strict mode
(unknown fields are errors); yamllint checks the chart's YAML and what it renders, with
helm/.yamllint. KEDA's and the Prometheus Operator's kinds are CRDs those schemas do not
hold: test_custom_resources_match_their_crds checks the fields the chart writes against
hand-written subsets of the CRDs, so no rendered object goes unchecked.

The chart renders with its defaults and with each file in helm/ci/ (backends with
credentials by reference, ingress and monitors on, scale to zero, an existing Secret).
"""

from __future__ import annotations

import base64
import copy
import functools
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import helm_python as helm
import jsonschema
import kubernetes_validate
import kubernetes_validate.utils
import pytest
import yaml
from yamllint import linter
from yamllint.config import YamlLintConfig

from ferry.settings import BackendsFile, Settings

CHART = Path(__file__).resolve().parents[2] / "helm"
KUBE_VERSION = "1.33.0"
RELEASE, NAMESPACE = "ferry", "ferry"
UID = 10001
VARIANTS = {
    "defaults": None,
    "backends": "backends-values.yaml",
    "ingress-monitoring": "ingress-monitoring-values.yaml",
    "scale-to-zero": "scale-to-zero-values.yaml",
    "existing-secret": "existing-secret-values.yaml",
}
# Kinds whose schemas kubernetes-validate does not have: checked by CRD_SCHEMAS below.
CUSTOM_KINDS = {
    ("keda.sh/v1alpha1", "ScaledObject"),
    ("keda.sh/v1alpha1", "TriggerAuthentication"),
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
    ("monitoring.coreos.com/v1", "PodMonitor"),
}
# Lint findings that are not problems: Helm's "icon is recommended" is informational.
LINT_INFO = 1


@dataclass
class Render:
    effective: dict         # what Helm uses: the chart's defaults with the file over them
    templates: dict         # template path -> rendered text
    docs: list[dict]        # every object rendered

    def of(self, kind: str, component: str | None = None) -> list[dict]:
        return [d for d in self.docs if d["kind"] == kind
                and (component is None or _labels(d).get("app.kubernetes.io/component") == component)]

    def one(self, kind: str, name: str) -> dict:
        found = [d for d in self.docs if d["kind"] == kind and d["metadata"]["name"] == name]
        assert len(found) == 1, f"{kind}/{name}: {len(found)} rendered"
        return found[0]

    def stream(self) -> str:
        """The manifests as `helm template` prints them."""
        parts = [f"---\n# Source: {path}\n{text.strip()}\n" for path, text in sorted(self.templates.items())
                 if path.endswith(".yaml") and text.strip()]
        return "".join(parts)


def _labels(doc: dict) -> dict:
    return doc["metadata"].get("labels") or {}


def merge(base: dict, over: dict) -> dict:
    """Helm's coalescing of values: maps merge key by key, anything else is replaced."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def load_values(name: str | None) -> dict:
    return yaml.safe_load((CHART / "ci" / name).read_text()) if name else {}


def render(values: dict | None) -> Render:
    with helm.Chart.load(str(CHART)) as chart:
        templates = chart.render(values or None, name=RELEASE, namespace=NAMESPACE)
        effective = chart.merge_values(values or None)
    docs = [d for path, text in templates.items() if path.endswith(".yaml")
            for d in yaml.safe_load_all(text) if d]
    return Render(effective, templates, docs)


@pytest.fixture(scope="module")
def renders() -> dict[str, Render]:
    # Loading the Helm SDK and rendering are done once for the module.
    return {variant: render(load_values(f)) for variant, f in VARIANTS.items()}


@pytest.fixture(scope="module", autouse=True)
def _schemas_read_once():
    # kubernetes-validate re-reads its multi-megabyte definitions for every object; reading
    # each file once keeps the module fast. The validation itself is unchanged.
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(kubernetes_validate.utils, "schema_contents",
                   functools.cache(kubernetes_validate.utils.schema_contents))
        yield


@pytest.fixture(params=list(VARIANTS))
def variant(request, renders) -> Render:
    return renders[request.param]


def pod_specs(r: Render) -> list[tuple[str, dict]]:
    """(object name, pod spec) of every Deployment and Job."""
    return [(d["metadata"]["name"], d["spec"]["template"]["spec"])
            for d in r.docs if d["kind"] in ("Deployment", "Job")]


def container(doc: dict) -> dict:
    containers = doc["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def env_of(c: dict) -> dict[str, dict]:
    return {e["name"]: e for e in c.get("env", [])}


def arg_after(c: dict, flag: str) -> str:
    return c["args"][c["args"].index(flag) + 1]


def expected_groups(r: Render) -> list[dict]:
    """The worker groups as the values describe them, each over workerDefaults."""
    return [merge(r.effective["workerDefaults"], g) for g in r.effective["workers"]]


def secret_name(r: Render) -> str:
    return r.effective["secret"]["existingSecret"] or RELEASE


def secret_data(r: Render, name: str) -> dict[str, str]:
    return {k: base64.b64decode(v).decode() for k, v in r.one("Secret", name)["data"].items()}


# --- lint, schemas, yamllint ---------------------------------------------------------------

@pytest.mark.parametrize("name", list(VARIANTS))
def test_chart_lints_clean_in_strict_mode(name):
    report = helm.lint(str(CHART), load_values(VARIANTS[name]) or None, strict=True, kube_version=f"v{KUBE_VERSION}")
    assert report["total_charts_linted"] == 1
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] > LINT_INFO] == []


def test_every_manifest_validates_against_kubernetes_schemas(variant):
    unchecked, failures = [], []
    for doc in variant.docs:
        if (doc["apiVersion"], doc["kind"]) in CUSTOM_KINDS:
            continue  # test_custom_resources_match_their_crds
        try:
            kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            unchecked.append(f"{doc['apiVersion']} {doc['kind']}")
        except kubernetes_validate.ValidationError as exc:
            failures.append(f"{doc['kind']}/{doc['metadata']['name']} at {list(exc.path)}: {exc.message}")
    assert unchecked == [], "kinds with no schema and no check here"
    assert failures == []


def _trigger_metadata_schema() -> dict:
    # KEDA's metadata is map[string]string: a number or boolean there is refused by the API server.
    keys = ["address", "listName", "listLength", "activationListLength", "databaseIndex", "enableTLS"]
    return {"type": "object", "additionalProperties": False, "required": ["address", "listName", "listLength"],
            "properties": {k: {"type": "string", "minLength": 1} for k in keys}}


def _strict(properties: dict, required: list[str]) -> dict:
    return {"type": "object", "additionalProperties": False, "required": required, "properties": properties}


_META = {"type": "object", "required": ["name"]}
_INT = {"type": "integer", "minimum": 0}
# Subsets of KEDA's v2 and the Prometheus Operator's v1 CRDs: the fields this chart writes,
# with their types; any other field is refused so a typo cannot pass.
CRD_SCHEMAS = {
    "ScaledObject": _strict({"apiVersion": {}, "kind": {}, "metadata": _META, "spec": _strict({
        "scaleTargetRef": _strict({"apiVersion": {"const": "apps/v1"}, "kind": {"const": "Deployment"},
                                   "name": {"type": "string", "minLength": 1}}, ["name"]),
        "minReplicaCount": _INT, "maxReplicaCount": {"type": "integer", "minimum": 1},
        "pollingInterval": {"type": "integer", "minimum": 1}, "cooldownPeriod": _INT,
        "advanced": _strict({"horizontalPodAutoscalerConfig": _strict({"behavior": {"type": "object"}}, ["behavior"])},
                            []),
        "triggers": {"type": "array", "minItems": 1, "items": _strict({
            "type": {"const": "redis"}, "metadata": _trigger_metadata_schema(),
            "authenticationRef": _strict({"name": {"type": "string", "minLength": 1}}, ["name"])},
            ["type", "metadata"])},
    }, ["scaleTargetRef", "triggers"])}, ["apiVersion", "kind", "metadata", "spec"]),
    "TriggerAuthentication": _strict({"apiVersion": {}, "kind": {}, "metadata": _META, "spec": _strict({
        "secretTargetRef": {"type": "array", "minItems": 1, "items": _strict({
            "parameter": {"enum": ["password", "username", "address"]}, "name": {"type": "string", "minLength": 1},
            "key": {"type": "string", "minLength": 1}}, ["parameter", "name", "key"])}},
        ["secretTargetRef"])}, ["apiVersion", "kind", "metadata", "spec"]),
    "ServiceMonitor": _strict({"apiVersion": {}, "kind": {}, "metadata": _META, "spec": _strict({
        "selector": _strict({"matchLabels": {"type": "object", "minProperties": 1}}, ["matchLabels"]),
        "endpoints": {"type": "array", "minItems": 1, "items": _strict({
            "port": {"type": "string"}, "path": {"type": "string"}, "interval": {"type": "string"},
            "scrapeTimeout": {"type": "string"},
            "authorization": _strict({"type": {"const": "Bearer"}, "credentials": _strict(
                {"name": {"type": "string"}, "key": {"type": "string"}}, ["name", "key"])}, ["type", "credentials"]),
        }, ["port", "path"])}}, ["selector", "endpoints"])}, ["apiVersion", "kind", "metadata", "spec"]),
    "PodMonitor": _strict({"apiVersion": {}, "kind": {}, "metadata": _META, "spec": _strict({
        "selector": _strict({"matchLabels": {"type": "object", "minProperties": 1}}, ["matchLabels"]),
        "podTargetLabels": {"type": "array", "items": {"type": "string"}},
        "podMetricsEndpoints": {"type": "array", "minItems": 1, "items": _strict({
            "port": {"type": "string"}, "path": {"type": "string"}, "interval": {"type": "string"},
            "scrapeTimeout": {"type": "string"},
            "relabelings": {"type": "array", "items": _strict({
                "action": {"enum": ["replace"]}, "targetLabel": {"type": "string"},
                "replacement": {"type": "string"}}, ["targetLabel"])}},
            ["port", "path"])}}, ["selector", "podMetricsEndpoints"])}, ["apiVersion", "kind", "metadata", "spec"]),
}


def test_custom_resources_match_their_crds(variant):
    customs = [d for d in variant.docs if (d["apiVersion"], d["kind"]) in CUSTOM_KINDS]
    for doc in customs:
        jsonschema.validate(doc, CRD_SCHEMAS[doc["kind"]])
    # Where the schemas above really ran: ScaledObjects everywhere KEDA scales a group.
    if any(g["autoscaling"]["enabled"] for g in expected_groups(variant)):
        assert any(d["kind"] == "ScaledObject" for d in customs)


def test_crd_subset_schemas_refuse_what_keda_would():
    # The hand-written schemas must bite: a numeric listLength and an unknown field fail.
    good = {"apiVersion": "keda.sh/v1alpha1", "kind": "ScaledObject", "metadata": {"name": "w"},
            "spec": {"scaleTargetRef": {"name": "w"},
                     "triggers": [{"type": "redis", "metadata": {"address": "r:6379", "listName": "q",
                                                                 "listLength": "2"}}]}}
    jsonschema.validate(good, CRD_SCHEMAS["ScaledObject"])
    numeric = copy.deepcopy(good)
    numeric["spec"]["triggers"][0]["metadata"]["listLength"] = 2
    typo = copy.deepcopy(good)
    typo["spec"]["minReplicas"] = 0
    for bad in (numeric, typo):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, CRD_SCHEMAS["ScaledObject"])


def _yamllint_config() -> YamlLintConfig:
    return YamlLintConfig(file=str(CHART / ".yamllint"))


def test_rendered_manifests_pass_yamllint(variant):
    problems = list(linter.run(variant.stream(), _yamllint_config()))
    assert [f"{p.line}:{p.column} {p.desc}" for p in problems] == []


CHART_YAML = ["Chart.yaml", "values.yaml", ".yamllint", *[f"ci/{f}" for f in VARIANTS.values() if f]]


@pytest.mark.parametrize("path", CHART_YAML)
def test_chart_yaml_passes_yamllint(path):
    problems = list(linter.run((CHART / path).read_text(), _yamllint_config(), filepath=path))
    assert [f"{p.line}:{p.column} {p.desc}" for p in problems] == []


def test_yamllint_config_catches_problems():
    problems = list(linter.run("a: yes\nb:  [1,2]   \n", _yamllint_config()))
    assert {p.rule for p in problems} >= {"truthy", "trailing-spaces"}


# --- beat, workers, scalers ----------------------------------------------------------------------

def test_exactly_one_beat_that_is_never_two(variant):
    beats = [d for d in variant.of("Deployment") if "beat" in container(d)["args"]]
    assert len(beats) == 1
    beat = beats[0]
    assert beat["spec"]["replicas"] == 1
    assert beat["spec"]["strategy"] == {"type": "Recreate"}
    assert container(beat)["args"] == ["beat"]
    assert not [d for d in variant.docs if d["kind"] in ("ScaledObject", "HorizontalPodAutoscaler")
                and d["spec"]["scaleTargetRef"]["name"] == beat["metadata"]["name"]]


def test_one_worker_deployment_per_group_and_every_queue_consumed_once(variant):
    groups = expected_groups(variant)
    workers = {d["metadata"]["name"]: d for d in variant.of("Deployment", "worker")}
    assert sorted(workers) == sorted(f"{RELEASE}-worker-{g['name']}" for g in groups)
    consumed: list[str] = []
    for g in groups:
        c = container(workers[f"{RELEASE}-worker-{g['name']}"])
        assert c["args"][0] == "worker"
        assert arg_after(c, "--queues").split(",") == g["queues"]
        assert arg_after(c, "--concurrency") == str(g["concurrency"])
        assert c["resources"] == g["resources"]
        consumed += g["queues"]
    queues = ["ferry.control", "index"] + [f"backend.{b['name']}" for b in variant.effective["backends"]]
    assert sorted(consumed) == sorted(queues)


def test_one_scaler_per_autoscaled_group_on_its_queues(variant):
    scalers = {d["spec"]["scaleTargetRef"]["name"]: d for d in variant.of("ScaledObject")}
    autoscaled = [g for g in expected_groups(variant) if g["autoscaling"]["enabled"]]
    assert len(variant.of("ScaledObject")) == len(scalers) == len(autoscaled)
    broker = urlsplit(variant.effective["secret"]["brokerUrl"])
    redis_address = variant.effective["keda"]["redis"]["address"] or f"{broker.hostname}:{broker.port or 6379}"
    for g in expected_groups(variant):
        deployment = variant.one("Deployment", f"{RELEASE}-worker-{g['name']}")
        scaler = scalers.get(deployment["metadata"]["name"])
        if not g["autoscaling"]["enabled"]:
            assert scaler is None
            assert deployment["spec"]["replicas"] == g["replicas"]
            continue
        # KEDA owns the count: a replicas field would be reset by every upgrade.
        assert "replicas" not in deployment["spec"]
        spec, scaling = scaler["spec"], g["autoscaling"]
        assert spec["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                          "name": deployment["metadata"]["name"]}
        assert (spec["minReplicaCount"], spec["maxReplicaCount"]) == (scaling["minReplicaCount"],
                                                                       scaling["maxReplicaCount"])
        assert (spec["pollingInterval"], spec["cooldownPeriod"]) == (scaling["pollingInterval"],
                                                                      scaling["cooldownPeriod"])
        # kombu keeps a queue's (priority 0) messages in a Redis list named after the queue.
        assert [t["metadata"]["listName"] for t in spec["triggers"]] == g["queues"]
        for t in spec["triggers"]:
            assert t["type"] == "redis"
            assert t["metadata"]["listLength"] == str(scaling["listLength"] or g["concurrency"])
            assert t["metadata"]["address"] == redis_address


def test_scale_to_zero_group(renders):
    r = renders["scale-to-zero"]
    scaler = r.one("ScaledObject", f"{RELEASE}-worker-s3-cold")["spec"]
    assert scaler["minReplicaCount"] == 0
    assert scaler["cooldownPeriod"] == 900
    assert scaler["triggers"][0]["metadata"]["activationListLength"] == "2"
    behavior = r.effective["workers"][2]["autoscaling"]["behavior"]
    assert scaler["advanced"]["horizontalPodAutoscalerConfig"]["behavior"] == behavior
    deployment = r.one("Deployment", f"{RELEASE}-worker-s3-cold")
    assert "replicas" not in deployment["spec"]
    assert deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 120
    # A group may take two queues; with autoscaling off it runs its fixed replicas.
    control = r.one("Deployment", f"{RELEASE}-worker-control")
    assert arg_after(container(control), "--queues") == "ferry.control,backend.local"
    assert control["spec"]["replicas"] == 2


def test_keda_reads_the_brokers_redis_with_the_secrets_password(renders):
    r = renders["backends"]
    trigger = r.one("ScaledObject", f"{RELEASE}-worker-s3-archive")["spec"]["triggers"][0]
    # From secret.brokerUrl redis://:broker-password@redis-master.redis.svc:6379/2
    assert trigger["metadata"]["address"] == "redis-master.redis.svc:6379"
    assert trigger["metadata"]["databaseIndex"] == "2"
    assert trigger["metadata"]["enableTLS"] == "false"
    auth = r.one("TriggerAuthentication", trigger["authenticationRef"]["name"])
    ref = auth["spec"]["secretTargetRef"][0]
    assert (ref["parameter"], ref["name"]) == ("password", secret_name(r))
    assert secret_data(r, ref["name"])[ref["key"]] == "broker-password"

    existing = renders["existing-secret"]
    trigger = existing.one("ScaledObject", f"{RELEASE}-worker-index")["spec"]["triggers"][0]
    assert trigger["metadata"] == {"address": "redis-master.redis.svc:6379", "listName": "index", "listLength": "1",
                                   "activationListLength": "0", "databaseIndex": "3", "enableTLS": "true"}
    ref = existing.one("TriggerAuthentication", trigger["authenticationRef"]["name"])["spec"]["secretTargetRef"][0]
    assert (ref["name"], ref["key"]) == ("ferry-credentials", "redis-password")
    # No password known, none asked for.
    assert renders["defaults"].of("TriggerAuthentication") == []
    assert "authenticationRef" not in renders["defaults"].of("ScaledObject")[0]["spec"]["triggers"][0]


def test_worker_grace_period_per_group(variant, renders):
    for g in expected_groups(variant):
        pod = variant.one("Deployment", f"{RELEASE}-worker-{g['name']}")["spec"]["template"]["spec"]
        assert pod["terminationGracePeriodSeconds"] == g["terminationGracePeriodSeconds"]
    grace = {d["metadata"]["name"]: d["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
             for d in renders["backends"].of("Deployment", "worker")}
    assert grace == {f"{RELEASE}-worker-{n}": s for n, s in
                     [("control", 300), ("index", 300), ("s3-archive", 600), ("ipfs-eu-1", 300)]}


# --- pods: security, resources, probes -----------------------------------------------------------

def test_every_pod_runs_non_root_read_only_with_requests_and_limits(variant):
    specs = pod_specs(variant)
    assert len(specs) >= 5  # api, beat, migrations, two worker groups at least
    for name, pod in specs:
        psc = pod["securityContext"]
        assert psc["runAsNonRoot"] is True and psc["runAsUser"] == UID, name
        assert psc["seccompProfile"] == {"type": "RuntimeDefault"}, name
        assert pod["automountServiceAccountToken"] is False, name
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        for c in pod.get("initContainers", []) + pod["containers"]:
            sc = c["securityContext"]
            assert sc["runAsNonRoot"] is True and sc["runAsUser"] == UID, (name, c["name"])
            assert sc["allowPrivilegeEscalation"] is False, (name, c["name"])
            assert sc["readOnlyRootFilesystem"] is True, (name, c["name"])
            assert sc["capabilities"] == {"drop": ["ALL"]}, (name, c["name"])
            assert sc["seccompProfile"] == {"type": "RuntimeDefault"}, (name, c["name"])
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(c["resources"][kind]), (name, c["name"], kind)
            mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
            assert "emptyDir" in volumes[mounts["/tmp"]], (name, "a writable /tmp")
            assert "emptyDir" in volumes[mounts["/var/lib/ferry"]], (name, "a writable HOME and data dir")


def _http_probe(c: dict, probe: str) -> tuple[str, int]:
    get = c[probe]["httpGet"]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    return get["path"], ports.get(get["port"], get["port"])


def test_api_worker_and_flower_probes(variant):
    api = container(variant.one("Deployment", f"{RELEASE}-api"))
    assert _http_probe(api, "livenessProbe") == ("/healthz", 8470)
    assert _http_probe(api, "readinessProbe") == ("/readyz", 8470)
    assert _http_probe(api, "startupProbe") == ("/healthz", 8470)
    assert api["args"][:3] == ["api", "--bind", "0.0.0.0:8470"]
    settings = variant.one("ConfigMap", f"{RELEASE}-settings")["data"]
    assert settings["FERRY_WORKER_METRICS_PORT"] == "9808"
    for d in variant.of("Deployment", "worker"):
        c = container(d)
        assert _http_probe(c, "livenessProbe") == ("/metrics", 9808)
        assert _http_probe(c, "startupProbe") == ("/metrics", 9808)
    flowers = variant.of("Deployment", "flower")
    assert len(flowers) == 1
    c = container(flowers[0])
    assert c["args"][0] == "flower"
    assert _http_probe(c, "livenessProbe") == ("/healthcheck", 5555)
    assert _http_probe(c, "readinessProbe") == ("/healthcheck", 5555)


def test_selectors_match_their_pods(variant):
    pods = {d["metadata"]["name"]: d["spec"]["template"]["metadata"]["labels"] for d in variant.of("Deployment")}
    for d in variant.of("Deployment"):
        selector = d["spec"]["selector"]["matchLabels"]
        matched = [n for n, labels in pods.items() if selector.items() <= labels.items()]
        assert matched == [d["metadata"]["name"]], "a Deployment must select only its own pods"
    for s in variant.of("Service"):
        matched = [n for n, labels in pods.items() if s["spec"]["selector"].items() <= labels.items()]
        assert len(matched) == 1, s["metadata"]["name"]
        target = variant.one("Deployment", matched[0])
        assert s["spec"]["ports"][0]["targetPort"] in {p["name"] for p in container(target)["ports"]}


# --- migration, secrets, config ------------------------------------------------------------------

def test_migration_job_is_a_pre_install_and_pre_upgrade_hook(variant):
    job = variant.one("Job", f"{RELEASE}-migrations")
    notes = job["metadata"]["annotations"]
    assert notes["helm.sh/hook"] == "pre-install,pre-upgrade"
    assert "before-hook-creation" in notes["helm.sh/hook-delete-policy"].split(",")
    c = container(job)
    assert c["args"] == ["db", "upgrade"]
    assert job["spec"]["template"]["spec"]["restartPolicy"] == "Never"
    ref = env_of(c)["FERRY_DATABASE_URL"]["valueFrom"]["secretKeyRef"]
    if variant.effective["secret"]["existingSecret"]:
        assert ref["name"] == "ferry-credentials"
        return
    # On install the release's own Secret does not exist yet when hooks run: the URL comes
    # from a hook Secret made before the Job (lower weight) and holding the same URL.
    hook_secret = variant.one("Secret", ref["name"])
    annotations = hook_secret["metadata"]["annotations"]
    assert annotations["helm.sh/hook"] == "pre-install,pre-upgrade"
    assert int(annotations["helm.sh/hook-weight"]) < int(notes["helm.sh/hook-weight"])
    assert secret_data(variant, ref["name"])[ref["key"]] == variant.effective["secret"]["databaseUrl"]


def test_secret_holds_the_urls_and_pods_read_them_from_it(variant):
    name = secret_name(variant)
    if variant.effective["secret"]["existingSecret"]:
        assert [s["metadata"]["name"] for s in variant.of("Secret")] == [], "the chart makes no Secret then"
    else:
        data = secret_data(variant, name)
        assert data["database-url"] == variant.effective["secret"]["databaseUrl"]
        assert data["broker-url"] == variant.effective["secret"]["brokerUrl"]
    for d in variant.of("Deployment"):
        env = env_of(container(d))
        if container(d)["args"][0] == "flower":
            assert "FERRY_DATABASE_URL" not in env, "Flower needs the broker only"
            wanted = ["FERRY_BROKER_URL"]
        else:
            wanted = ["FERRY_DATABASE_URL", "FERRY_BROKER_URL"]
        for var in wanted:
            assert "value" not in env[var], (d["metadata"]["name"], var)
            assert env[var]["valueFrom"]["secretKeyRef"]["name"] == name


def test_no_credential_outside_a_secret(renders):
    r = renders["backends"]
    outside = yaml.safe_dump_all([d for d in r.docs if d["kind"] != "Secret"])
    for credential in ("catalog-password", "broker-password", "flower-password", "another-password"):
        assert credential not in outside


def test_flower_basic_auth_comes_from_a_secret(variant):
    flower = container(variant.of("Deployment", "flower")[0])
    ref = env_of(flower)["FERRY_FLOWER_BASIC_AUTH"]["valueFrom"]["secretKeyRef"]
    assert ref == {"name": secret_name(variant), "key": "flower-basic-auth"}
    if variant.effective["secret"]["existingSecret"]:
        return
    users = secret_data(variant, ref["name"])[ref["key"]]
    given = variant.effective["secret"]["flowerBasicAuth"]
    if given:
        assert users == given
    else:
        assert re.fullmatch(r"admin:[A-Za-z0-9]{32}", users), "a generated password, never a fixed one"


def test_backends_file_is_mounted_and_is_what_ferry_accepts(variant):
    settings = variant.one("ConfigMap", f"{RELEASE}-settings")["data"]
    assert settings["FERRY_BACKENDS_FILE"] == "/etc/ferry/backends.yaml"
    backends_map = variant.one("ConfigMap", f"{RELEASE}-backends")
    parsed = BackendsFile.model_validate(yaml.safe_load(backends_map["data"]["backends.yaml"]))
    assert [b.model_dump(exclude_defaults=True) for b in parsed.backends] == variant.effective["backends"]
    for name, pod in pod_specs(variant):
        if name.endswith("-migrations"):
            continue
        volumes = {v["name"]: v for v in pod["volumes"]}
        mounts = {m["mountPath"]: m["name"] for m in pod["containers"][0]["volumeMounts"]}
        assert volumes[mounts["/etc/ferry"]]["configMap"]["name"] == backends_map["metadata"]["name"], name


def test_settings_configmap_is_what_ferry_accepts(variant, monkeypatch):
    data = variant.one("ConfigMap", f"{RELEASE}-settings")["data"]
    for key, value in data.items():
        monkeypatch.setenv(key, value)
    settings = Settings()
    assert settings.backends_file == Path("/etc/ferry/backends.yaml")
    assert settings.data_dir == Path("/var/lib/ferry/data")
    for key, value in variant.effective["config"].items():
        actual = getattr(settings, key.removeprefix("FERRY_").lower())
        assert actual == (value if isinstance(value, list) else type(actual)(value)), key


# --- ingress, monitors ---------------------------------------------------------------------------

def test_ingress_routes_to_the_api_service(renders):
    assert renders["defaults"].of("Ingress") == []
    r = renders["ingress-monitoring"]
    (ingress,) = r.of("Ingress")
    service = r.one("Service", f"{RELEASE}-api")
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend["name"] == service["metadata"]["name"]
    assert backend["port"]["name"] in {p["name"] for p in service["spec"]["ports"]}
    assert ingress["spec"]["tls"] == r.effective["ingress"]["tls"]


def test_monitors_scrape_the_api_and_every_worker(renders):
    assert renders["defaults"].of("ServiceMonitor") == renders["defaults"].of("PodMonitor") == []
    r = renders["ingress-monitoring"]
    (monitor,) = r.of("ServiceMonitor")
    service = r.one("Service", f"{RELEASE}-api")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= _labels(service).items()
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    endpoint = monitor["spec"]["endpoints"][0]
    assert (endpoint["port"], endpoint["path"]) == ("http", "/metrics")
    credentials = endpoint["authorization"]["credentials"]
    assert secret_data(r, credentials["name"])[credentials["key"]] == "fk_viewer_example"
    (pods,) = r.of("PodMonitor")
    selector = pods["spec"]["selector"]["matchLabels"]
    workers = r.of("Deployment", "worker")
    assert workers and all(selector.items() <= d["spec"]["template"]["metadata"]["labels"].items() for d in workers)
    assert not [d for d in r.of("Deployment") if d not in workers
                and selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()]
    endpoint = pods["spec"]["podMetricsEndpoints"][0]
    assert (endpoint["port"], endpoint["path"]) == ("metrics", "/metrics")
    assert endpoint["relabelings"] == [{"action": "replace", "targetLabel": "job", "replacement": "ferry-workers"}]


# --- values that must be refused ----------------------------------------------------------------

REFUSED = {
    "a backend no group consumes": (
        {"backends": [{"name": "s3-new", "driver": "s3"}]}, 'no group consumes queue "backend.s3-new"'),
    "a queue in two groups": (
        {"workers": [{"name": "control", "queues": ["ferry.control"]}, {"name": "index", "queues": ["index"]},
                     {"name": "again", "queues": ["index"]}]}, 'queue "index" is consumed by groups'),
    "a group on an unknown backend": (
        {"workers": [{"name": "control", "queues": ["ferry.control", "index", "backend.nowhere"]}]},
        'consumes "backend.nowhere"'),
    "a credential in the ConfigMap": (
        {"config": {"FERRY_DATABASE_URL": "postgresql://x"}}, "is a credential"),
    "a monitor without the viewer key": (
        {"metrics": {"serviceMonitor": {"enabled": True}}}, "needs secret.metricsApiKey"),
    "KEDA on a broker that is not Redis": (
        {"secret": {"brokerUrl": "amqp://rabbit:5672//"}}, "scalers read Redis lists"),
    "an existing Secret without KEDA's address": (
        {"secret": {"existingSecret": "mine"}}, "keda.redis.address is required"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_bad_values_fail_to_render(case):
    values, message = REFUSED[case]
    with pytest.raises(helm.HelmRenderError, match=re.escape(message)):
        render(values)


@pytest.mark.parametrize("values", [
    {"workers": [{"name": "control", "queues": ["ferry.control"], "concurency": 2}]},   # a misspelled key
    {"workers": [{"name": "Control", "queues": ["ferry.control"]}]},                     # not a DNS label
    {"workers": [{"name": "control", "queues": ["backend"]}]},                           # not a queue name
    {"api": {"resources": {"limits": None}}},                                            # no limits
    {"apii": {"replicas": 3}},
], ids=["misspelled-key", "group-name", "queue-name", "no-limits", "unknown-top-level"])
def test_schema_refuses_malformed_values(values):
    with helm.Chart.load(str(CHART)) as chart, pytest.raises(helm.HelmValuesError):
        chart.validate_schema(values)
    report = helm.lint(str(CHART), values, strict=True)
    assert report["errors"] or [m for m in report["messages"] if m["severity"] > LINT_INFO]


# --- documentation -------------------------------------------------------------------------------

# Documented as one value each: Kubernetes' own structures (resources, probe timings,
# security contexts, HPA behavior).
WHOLE_VALUES = {"resources", "probes", "podSecurityContext", "securityContext", "behavior"}


def _value_paths(values: dict, prefix: str = "") -> list[str]:
    """Dotted paths of every value; a list is one value (workers, ingress.hosts)."""
    paths = []
    for key, value in values.items():
        if isinstance(value, dict) and value and key not in WHOLE_VALUES:
            paths += _value_paths(value, f"{prefix}{key}.")
        else:
            paths.append(f"{prefix}{key}")
    return paths


def test_every_value_is_documented_in_the_readme():
    readme = (CHART / "README.md").read_text()
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    paths = _value_paths(values)
    assert len(paths) > 50
    assert [p for p in paths if f"| `{p}` |" not in readme] == []
