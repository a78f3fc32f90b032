"""The policy document schema: parsing, validation faults with their paths, canonical form."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import jsonschema
import pytest
import yaml

from ferry.errors import InvalidPolicy
from policies import schema
from policies.schema import LabelExpr, Policy, Schedule

ROOT = Path(__file__).parents[2]
EXAMPLES = sorted((ROOT / "policies" / "examples").glob("*.yaml"))
SCHEMA_FILE = ROOT / "docs" / "policy.schema.json"


def policy(**fields) -> Policy:
    return Policy.from_dict({"name": "p", **fields})


def fault(**fields) -> InvalidPolicy:
    with pytest.raises(InvalidPolicy) as caught:
        policy(**fields)
    return caught.value


# -- examples and the published schema ----------------------------------------------------------

def test_there_are_examples():
    assert len(EXAMPLES) >= 3


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_loads_and_matches_the_json_schema(path):
    loaded = Policy.from_yaml(path.read_text())
    assert loaded.name == path.stem
    jsonschema.validate(yaml.safe_load(path.read_text()), schema.json_schema())
    jsonschema.validate(loaded.to_document(), schema.json_schema())
    assert Policy.from_dict(loaded.to_document()) == loaded


def test_published_json_schema_is_current():
    text = json.dumps(schema.json_schema(), indent=2, sort_keys=True) + "\n"
    jsonschema.Draft202012Validator.check_schema(schema.json_schema())
    assert SCHEMA_FILE.read_text() == text, \
        "docs/policy.schema.json is stale: .venv/bin/python -m policies.schema > docs/policy.schema.json"


# -- label expressions ----------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "canonical", "matching", "other"), [
    ("tier=hot", "tier=hot", {"tier": "hot"}, {"tier": "cold"}),
    ("region != us", "region!=us", {"region": "eu"}, {"region": "us"}),
    ("zone in (b, a,a)", "zone in (a, b)", {"zone": "b"}, {"zone": "c"}),
    ("zone notin(a)", "zone notin (a)", {"zone": "b"}, {"zone": "a"}),
    ("ssd", "ssd", {"ssd": "yes"}, {}),
    ("! retired", "!retired", {}, {"retired": "1"}),
    ("*", "*", {}, None),
    ("tier=hot & region!=us", "region!=us & tier=hot", {"tier": "hot"}, {"tier": "hot", "region": "us"}),
    ("a.b/c-d_e=X.1", "a.b/c-d_e=X.1", {"a.b/c-d_e": "X.1"}, {"a.b/c-d_e": "x.1"}),
])
def test_label_expression_terms(text, canonical, matching, other):
    expr = LabelExpr(text)
    assert str(expr) == canonical
    assert LabelExpr(str(expr)) == expr
    assert expr.matches(matching)
    if other is not None:
        assert not expr.matches(other)


def test_negative_terms_hold_when_the_label_is_absent():
    assert LabelExpr("region!=us").matches({}) and LabelExpr("zone notin (a)").matches({})
    assert not LabelExpr("region=us").matches({}) and not LabelExpr("zone in (a)").matches({})


def test_label_values_compare_as_strings_and_select_sorts_names():
    assert LabelExpr("replicas=3").matches({"replicas": 3})
    backends = {"s3": {"tier": "cold"}, "b": {"tier": "hot"}, "a": {"tier": "hot", "zone": "1"}}
    assert LabelExpr("tier=hot").select(backends) == ["a", "b"]
    assert LabelExpr("*").select(backends) == ["a", "b", "s3"]
    assert LabelExpr("zone").select(backends) == ["a"]


@pytest.mark.parametrize(("text", "pointer"), [
    ("tier==hot", "term 1 'tier==hot'"),
    ("tier=hot & region=", "term 2 'region='"),
    ("tier=hot &", "term 2 ''"),
    ("zone in ()", "term 1 'zone in ()'"),
    ("zone in (a b)", "term 1"),
    ("* & tier=hot", "term 1 '*'"),
    ("tier=hot|cold", "term 1"),
])
def test_label_expression_syntax_errors_point_at_the_term(text, pointer):
    with pytest.raises(InvalidPolicy, match="is not a label condition") as caught:
        LabelExpr(text)
    assert pointer in caught.value.message


def test_empty_label_expression_and_its_path_in_a_document():
    with pytest.raises(InvalidPolicy, match=r"use \* for every backend"):
        LabelExpr(" ")
    assert fault(placement={"backends": "tier=="}).field == "placement.backends"


# -- durations and sizes --------------------------------------------------------------------------

@pytest.mark.parametrize(("value", "expected"), [
    ("7d", timedelta(days=7)), ("1d12h", timedelta(days=1, hours=12)), ("2w", timedelta(weeks=2)),
    ("90s", timedelta(seconds=90)), ("1h30m", timedelta(minutes=90)), (3600, timedelta(hours=1)),
])
def test_durations(value, expected):
    assert schema.parse_duration(value) == expected


@pytest.mark.parametrize("value", ["7x", "7", "d", "1.5d", "-1d", "0d", 0, -5, True, None, "7 d"])
def test_bad_durations(value):
    with pytest.raises(InvalidPolicy, match="is not a duration"):
        schema.parse_duration(value)


def test_duration_serialises_compact():
    doc = policy(retention={"delete_after": "36h"}, verification={"every": 604800}).to_document()
    assert doc["retention"] == {"delete_after": "1d12h"} and doc["verification"] == {"every": "7d"}
    assert fault(retention={"delete_after": "7x"}).message == \
        "'7x' is not a duration: use a number and a unit s, m, h, d or w, e.g. 7d"


@pytest.mark.parametrize(("value", "expected"), [
    (0, 0), (512, 512), ("512", 512), ("10B", 10), ("1KB", 1000), ("1KiB", 1024), ("1.5GB", 1_500_000_000),
    ("10GiB", 10 * 1024**3), ("2 TB", 2 * 1000**4), ("1TiB", 1024**4), ("3MiB", 3 * 1024**2),
])
def test_sizes(value, expected):
    assert schema.parse_size(value) == expected


@pytest.mark.parametrize("value", ["1XB", "kb", "1kib", "-1", -1, "1.5B", "GB", None, True])
def test_bad_sizes(value):
    with pytest.raises(InvalidPolicy, match=r"size|whole number"):
        schema.parse_size(value)


def test_size_range_in_a_selector():
    doc = policy(verification={"every": "1d"}, selector={"size": {"min": "1KiB", "max": "1MB"}}).to_document()
    assert doc["selector"]["size"] == {"min": 1024, "max": 1_000_000}
    bad = fault(verification={"every": "1d"}, selector={"size": {"min": "1MB", "max": "1KB"}})
    assert (bad.field, bad.message) == ("selector.size.max", "max (1000) is less than min (1000000)")
    bad = fault(verification={"every": "1d"}, selector={"age": {"min": "2d", "max": "1d"}})
    assert (bad.field, bad.message) == ("selector.age.max", "max (1d) is less than min (2d)")


# -- placement and replicas -----------------------------------------------------------------------

@pytest.mark.parametrize(("replicas", "expected"), [
    (2, (2, 2, 2)), ({"min": 1}, (1, 1, 1)), ({"min": 1, "desired": 2}, (1, 2, 2)),
    ({"min": 1, "desired": 2, "max": 3}, (1, 2, 3)), ({"min": 1, "max": 3}, (1, 1, 3)),
])
def test_replica_forms(replicas, expected):
    r = policy(placement={"replicas": replicas}).placement.replicas
    assert (r.min, r.desired, r.max) == expected


@pytest.mark.parametrize(("replicas", "field", "message"), [
    ({"min": 1, "desired": 4, "max": 3}, "placement.replicas.desired", "desired (4) is more than max (3)"),
    ({"min": 2, "desired": 1}, "placement.replicas.desired", "desired (1) is less than min (2)"),
    ({"min": 3, "max": 2}, "placement.replicas.max", "max (2) is less than min (3)"),
    ({"min": 0}, "placement.replicas.min", "greater than or equal to 1"),
    (0, "placement.replicas.min", "greater than or equal to 1"),
    ({"desired": 2}, "placement.replicas.min", "'min' is required"),
    (True, "placement.replicas", "valid dictionary"),
])
def test_replica_checks(replicas, field, message):
    bad = fault(placement={"replicas": replicas})
    assert bad.field == field and message in bad.message


def test_placement_defaults_to_one_replica_anywhere():
    placement = policy(placement={}).placement
    assert str(placement.backends) == "*" and placement.replicas.desired == 1 and placement.spread is None


# -- unknown fields, names, selectors -------------------------------------------------------------

@pytest.mark.parametrize(("fields", "field"), [
    ({"placement": {"replica": 2}}, "placement.replica"),
    ({"placement": {}, "colour": "red"}, "colour"),
    ({"placement": {}, "transitions": [{"after": "1d", "to": "*", "from": "x"}]}, "transitions[0].from"),
    ({"placement": {}, "selector": {"size": {"minimum": 1}}}, "selector.size.minimum"),
    ({"placement": {}, "schedule": {"cron": "0 2 * * *", "at": "2"}}, "schedule.at"),
    ({"placement": {"replicas": {"min": 1, "maximum": 2}}}, "placement.replicas.maximum"),
])
def test_unknown_fields_are_rejected_with_their_path(fields, field):
    bad = fault(**fields)
    assert bad.field == field and bad.message == f"unknown field {field.rsplit('.', 1)[-1].split(']')[-1]!r}"
    assert bad.status == 400 and bad.code == "invalid_policy"


@pytest.mark.parametrize("name", ["Hot", "-hot", "", "a" * 64, "hot data"])
def test_bad_names(name):
    with pytest.raises(InvalidPolicy) as caught:
        Policy.from_dict({"name": name, "placement": {}})
    assert caught.value.field == "name" and repr(name) in caught.value.message


def test_selector_fields():
    sel = policy(placement={}, selector={"tags": ["b", "a", "b"], "metadata": {"n": 1, "ok": True, "s": "x"},
                                         "media_type": "text/*", "backend": "local", "prefix": "d/"}).selector
    assert sel.tags == ["a", "b"] and sel.metadata == {"n": 1, "ok": True, "s": "x"} and not sel.index
    assert fault(placement={}, selector={"metadata": {"when": [1]}}).field == "selector.metadata.when"
    assert fault(placement={}, selector={"media_type": "text"}).field == "selector.media_type"
    assert fault(placement={}, selector={"backend": "Local!"}).field == "selector.backend"
    assert policy(placement={}).selector.model_dump(exclude_defaults=True) == {}


# -- transitions, retention, what a policy must say -----------------------------------------------

def test_transitions_must_increase():
    bad = fault(placement={}, transitions=[{"after": "30d", "to": "tier=warm"}, {"after": "30d", "to": "tier=cold"}])
    assert bad.field == "transitions[1].after" and "later than the previous" in bad.message
    bad = fault(placement={}, transitions=[{"after": "1d", "to": "a"}, {"after": "2d", "to": "b"},
                                           {"after": "1w", "to": "c"}, {"after": "3d", "to": "d"}])
    assert bad.field == "transitions[3].after"
    assert fault(placement={}, transitions=[{"after": "0d", "to": "a"}]).field == "transitions[0].after"
    assert fault(placement={}, transitions=[{"after": "1d", "to": "a", "since": "x"}]).field == "transitions[0].since"


def test_transitions_need_a_placement():
    bad = fault(retention={"delete_after": "1w"}, transitions=[{"after": "1d", "to": "a"}])
    assert bad.field == "placement" and "placement" in bad.message


def test_retention_must_come_after_the_last_transition():
    transitions = [{"after": "30d", "to": "tier=warm"}, {"after": "90d", "to": "tier=cold"}]
    bad = fault(placement={}, transitions=transitions, retention={"delete_after": "90d"})
    assert bad.field == "retention.delete_after" and "pointless" in bad.message
    assert policy(placement={}, transitions=transitions, retention={"delete_after": "91d"}).retention


def test_a_policy_must_do_something():
    bad = fault(selector={"tags": ["x"]})
    assert bad.field == "placement" and "does nothing" in bad.message
    assert policy(retention={"delete_after": "1d"}) and policy(verification={"every": "1d"})


def test_verification_at_least_a_minute():
    bad = fault(verification={"every": "59s"})
    assert bad.field == "verification.every" and "1m" in bad.message
    assert policy(verification={"every": "1m"})


# -- schedules ------------------------------------------------------------------------------------

T = datetime(2026, 1, 1, 3, 0, tzinfo=UTC)


@pytest.mark.parametrize(("given", "kind", "document"), [
    (None, "continuous", "continuous"), ("continuous", "continuous", "continuous"), ("manual", "manual", "manual"),
    ({"cron": "0 2 * * *", "window": "4h"}, "cron", {"cron": "0 2 * * *", "window": "4h"}),
    ({"cron": "*/15 * * * 1-5"}, "cron", {"cron": "*/15 * * * 1-5"}),
    ({"every": "6h", "window": "60m"}, "interval", {"every": "6h", "window": "1h"}),
])
def test_schedule_forms(given, kind, document):
    fields = {"verification": {"every": "1d"}} | ({"schedule": given} if given else {})
    p = policy(**fields)
    assert p.schedule.kind == kind and p.to_document()["schedule"] == document


def test_next_run_after():
    nightly = Schedule.model_validate({"cron": "0 2 * * *", "window": "4h"})
    assert nightly.next_run_after(T) == datetime(2026, 1, 2, 2, 0, tzinfo=UTC)
    assert nightly.window == timedelta(hours=4)
    assert Schedule.model_validate({"every": "6h"}).next_run_after(T) == T + timedelta(hours=6)
    assert Schedule.model_validate({"every": "6h"}).window is None
    assert Schedule.model_validate("continuous").next_run_after(T) is None
    assert Schedule.model_validate("manual").next_run_after(T) is None
    paris = T.astimezone(ZoneInfo("Europe/Paris"))
    assert nightly.next_run_after(paris) == datetime(2026, 1, 2, 2, 0, tzinfo=UTC)
    with pytest.raises(ValueError, match="timezone-aware"):
        nightly.next_run_after(datetime(2026, 1, 1))


@pytest.mark.parametrize(("given", "field", "message"), [
    ("hourly", "schedule", "'hourly' is not a schedule"),
    ({"cron": "0 25 * * *"}, "schedule.cron", "is not a cron expression"),
    ({"cron": "0 2 * *"}, "schedule.cron", "5 fields"),
    ({"cron": "0 0 30 2 *"}, "schedule.cron", "is not a cron expression"),
    ({"cron": "0 2 * * *", "every": "1h"}, "schedule", "not both"),
    ({"every": "1x"}, "schedule.every", "is not a duration"),
    ({"every": "1h", "window": 0}, "schedule.window", "is not a duration"),
    ({"kind": "manual", "window": "1h"}, "schedule", "has no window"),
    ({"window": "1h"}, "schedule", "has no window"),
])
def test_bad_schedules(given, field, message):
    bad = fault(verification={"every": "1d"}, schedule=given)
    assert bad.field == field and message in bad.message


# -- placement over time --------------------------------------------------------------------------

def test_placement_at_follows_transitions():
    p = policy(placement={"backends": "tier=hot"}, transitions=[
        {"after": "30d", "to": "tier=warm"}, {"after": "90d", "since": "creation", "to": "tier=cold"}])
    day = timedelta(days=1)
    assert str(p.placement_at(1 * day, 1 * day)) == "tier=hot"
    assert str(p.placement_at(30 * day, 40 * day)) == "tier=warm"
    assert str(p.placement_at(5 * day, 100 * day)) == "tier=cold"  # creation age counts for the second
    assert str(p.placement_at(100 * day, 60 * day)) == "tier=warm"
    assert policy(retention={"delete_after": "1d"}).placement_at(day, day) is None
    assert str(policy(placement={"backends": "tier=hot"}).placement_at(999 * day, 999 * day)) == "tier=hot"


# -- canonical documents --------------------------------------------------------------------------

def test_equivalent_documents_give_equal_dicts():
    a = Policy.from_yaml("""
name: p
placement: {backends: "tier=hot & region!=us", replicas: 2}
selector: {tags: [b, a], size: {max: 1KiB}}
transitions: [{after: 24h, to: "zone in (b, a)"}]
retention: {delete_after: 2w}
""")
    b = Policy.from_yaml("""
name: p
schedule: continuous
placement: {backends: "region != us&tier=hot", replicas: {min: 2, desired: 2, max: 2}}
selector: {tags: [a, b, a], size: {max: 1024}, index: false}
transitions: [{after: 1d, since: access, to: "zone in (a,b)"}]
retention: {delete_after: 14d}
""")
    assert a.to_document() == b.to_document()
    assert json.loads(json.dumps(a.to_document())) == a.to_document()
    assert a.to_document() != policy(placement={"replicas": 3}).to_document()


# -- YAML and document shape ----------------------------------------------------------------------

def test_yaml_syntax_error_names_the_line():
    with pytest.raises(InvalidPolicy, match="not valid YAML at line 3, column 25: mapping values") as caught:
        Policy.from_yaml("name: p\nplacement: {}\nretention:  delete_after: 1d\n")
    assert caught.value.field is None


@pytest.mark.parametrize("text", ["", "- name: p", "just words"])
def test_document_must_be_a_mapping(text):
    with pytest.raises(InvalidPolicy, match="must be a mapping") as caught:
        Policy.from_yaml(text)
    assert caught.value.field is None


def test_a_key_given_twice_is_refused_with_its_line():
    with pytest.raises(InvalidPolicy, match=r"line 4.*'replicas' is given twice"):
        Policy.from_yaml("name: a\nplacement:\n  replicas: 2\n  replicas: 3\n")


@pytest.mark.parametrize("selector,field", [
    ({"prefix": "a\x00b"}, "selector.prefix"),
    ({"tags": ["ok", "bad\nline"]}, "selector.tags"),
    ({"metadata": {"k": "v\x00"}}, "selector.metadata"),
    ({"metadata": {"k\x01": "v"}}, "selector.metadata"),
])
def test_control_characters_in_a_selector_are_refused(selector, field):
    with pytest.raises(InvalidPolicy, match="control character") as err:
        Policy.from_dict({"name": "cc", "selector": selector, "verification": {"every": "7d"}})
    assert err.value.field == field
