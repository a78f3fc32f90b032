"""The policy document: what a policy may say, parsed and checked with pydantic.

A policy selects objects (`selector`) and says where their replicas live (`placement`),
how placement changes as they age (`transitions`), when they are deleted (`retention`),
how often they are verified (`verification`) and when the reconciler acts (`schedule`).
Every fault in a document is raised as `InvalidPolicy` with `field` the dotted path of
the fault (`placement.replicas.desired`, `transitions[0].after`).

`to_document()` is the canonical form: durations compact ("1d12h"), sizes in bytes, label
expressions normalised, tags sorted, so two documents that mean the same thing compare
equal. `python -m policies.schema > docs/policy.schema.json` exports the JSON Schema.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from itertools import pairwise
from typing import Annotated, Any, Literal

import yaml
from cronsim import CronSim, CronSimError
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    ValidationError,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
    model_serializer,
    model_validator,
)
from pydantic_core import core_schema

from ferry.errors import InvalidPolicy

SCHEMA_ID = "urn:ferry:policy-schema:1"
NAME = r"^[a-z0-9][a-z0-9._-]{0,62}$"
LABEL = r"[A-Za-z0-9._/-]+"


def _in_model(parse: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """Pydantic locates a ValueError at its field; an InvalidPolicy would escape without the path."""
    def validate(value: Any) -> Any:
        try:
            return parse(value)
        except InvalidPolicy as exc:
            raise ValueError(exc.message) from None
    return validate


# -- durations and sizes ------------------------------------------------------------------

_UNIT_SECONDS = {"w": 604800, "d": 86400, "h": 3600, "m": 60, "s": 1}
_DURATION = re.compile(r"^(?:\d+[smhdw])+$")


def parse_duration(value: str | int | timedelta) -> timedelta:
    """"7d", "1d12h", "90s" or an int of seconds; always more than zero."""
    if isinstance(value, timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, int) and not isinstance(value, bool):
        seconds = value
    elif isinstance(value, str) and _DURATION.match(value.strip()):
        seconds = sum(int(n) * _UNIT_SECONDS[u] for n, u in re.findall(r"(\d+)([smhdw])", value))
    else:
        raise InvalidPolicy(f"{value!r} is not a duration: use a number and a unit s, m, h, d or w, e.g. 7d")
    if seconds <= 0 or seconds != int(seconds):
        raise InvalidPolicy(f"{value!r} is not a duration: it must be a whole number of seconds, more than zero")
    return timedelta(seconds=seconds)


def format_duration(value: timedelta) -> str:
    """The compact form parse_duration reads back: days, hours, minutes, seconds ("1d12h")."""
    rest, parts = int(value.total_seconds()), []
    for unit in "dhms":
        count, rest = divmod(rest, _UNIT_SECONDS[unit])
        if count:
            parts.append(f"{count}{unit}")
    return "".join(parts) or "0s"


_SIZE_UNITS = {"": 1, "B": 1, "KB": 1000, "MB": 1000**2, "GB": 1000**3, "TB": 1000**4,
               "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3, "TiB": 1024**4}
_SIZE = re.compile(r"^(\d+(?:\.\d+)?)\s*(B|[KMGT]i?B)?$")


def parse_size(value: str | int) -> int:
    """Bytes from an int or "10GiB", "1.5GB" (KB, MB... are powers of 1000; KiB, MiB... of 1024)."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    match = _SIZE.match(value.strip()) if isinstance(value, str) else None
    if not match:
        raise InvalidPolicy(f"{value!r} is not a size: use bytes or a number and a unit B, KB, MB, GB, TB, "
                            "KiB, MiB, GiB or TiB, e.g. 10GiB")
    size = Decimal(match[1]) * _SIZE_UNITS[match[2] or ""]
    if size != int(size):
        raise InvalidPolicy(f"{value!r} is not a whole number of bytes")
    return int(size)


_DURATION_SCHEMA = {"anyOf": [{"type": "string", "pattern": _DURATION.pattern, "examples": ["7d", "1d12h"]},
                              {"type": "integer", "exclusiveMinimum": 0, "description": "seconds"}]}
Duration = Annotated[timedelta, BeforeValidator(_in_model(parse_duration)),
                     PlainSerializer(format_duration, return_type=str), WithJsonSchema(_DURATION_SCHEMA)]
Size = Annotated[
    int, BeforeValidator(_in_model(parse_size)),
    WithJsonSchema({"anyOf": [{"type": "integer", "minimum": 0, "description": "bytes"},
                              {"type": "string", "pattern": _SIZE.pattern, "examples": ["1KiB", "10GB"]}]})]


# -- label expressions --------------------------------------------------------------------

_TERM_FORMS = "key=value, key!=value, key in (a, b), key notin (a, b), key or !key"
_COMPARE = re.compile(rf"^({LABEL})\s*(!=|=)\s*({LABEL})$")
_SET = re.compile(rf"^({LABEL})\s+(in|notin)\s*\((.*)\)$")
_EXISTS = re.compile(rf"^(!?)\s*({LABEL})$")


class LabelExpr:
    """Which backends, by their labels: terms joined by `&`, all must hold; `*` is every backend.

    As in Kubernetes selectors, `key!=value` and `key notin (...)` also hold when the label is absent.
    """

    def __init__(self, text: str):
        self.terms: tuple[tuple[str, str, tuple[str, ...]], ...] = self._parse(text)

    @staticmethod
    def _parse(text: str) -> tuple[tuple[str, str, tuple[str, ...]], ...]:
        if not isinstance(text, str):
            raise InvalidPolicy(f"a label expression is a string, not {type(text).__name__}")
        if text.strip() == "*":
            return ()
        if not text.strip():
            raise InvalidPolicy("the label expression is empty: use * for every backend")
        terms = set()
        for index, raw in enumerate(text.split("&"), start=1):
            term = raw.strip()
            if m := _COMPARE.match(term):
                terms.add((m[1], m[2], (m[3],)))
            elif (m := _SET.match(term)) and all(re.fullmatch(LABEL, v.strip()) for v in m[3].split(",")):
                terms.add((m[1], m[2], tuple(sorted({v.strip() for v in m[3].split(",")}))))
            elif m := _EXISTS.match(term):
                terms.add((m[2], "absent" if m[1] else "exists", ()))
            else:
                raise InvalidPolicy(f"term {index} {term!r} of {text!r} is not a label condition: use {_TERM_FORMS}"
                                    " (keys and values are letters, digits and . _ / -), or * alone")
        return tuple(sorted(terms))

    def matches(self, labels: Mapping[str, Any]) -> bool:
        def holds(value: str | None, op: str, wanted: tuple[str, ...]) -> bool:
            if op in ("exists", "absent"):
                return (value is None) == (op == "absent")
            return (value in wanted) == (op in ("=", "in"))

        values = {k: str(v) for k, v in labels.items()}
        return all(holds(values.get(key), op, wanted) for key, op, wanted in self.terms)

    def select(self, backends: Mapping[str, Any]) -> list[str]:
        """Names of the backends whose labels match; values are label dicts (or objects with `.labels`)."""
        return sorted(name for name, spec in backends.items() if self.matches(getattr(spec, "labels", spec)))

    def __str__(self) -> str:
        def term(key: str, op: str, values: tuple[str, ...]) -> str:
            if op in ("in", "notin"):
                return f"{key} {op} ({', '.join(values)})"
            return {"exists": key, "absent": f"!{key}"}.get(op) or f"{key}{op}{values[0]}"
        return " & ".join(term(*t) for t in self.terms) or "*"

    def __repr__(self) -> str:
        return f"LabelExpr({str(self)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LabelExpr) and self.terms == other.terms

    def __hash__(self) -> int:
        return hash(self.terms)

    @classmethod
    def __get_pydantic_core_schema__(cls, source: Any, handler: Any) -> core_schema.CoreSchema:
        return core_schema.no_info_plain_validator_function(
            _in_model(lambda v: v if isinstance(v, LabelExpr) else LabelExpr(v)),
            serialization=core_schema.plain_serializer_function_ser_schema(str))

    @classmethod
    def __get_pydantic_json_schema__(cls, schema: Any, handler: Any) -> dict[str, Any]:
        return {"type": "string", "description": f"label expression: terms {_TERM_FORMS}, joined by &; * alone "
                "means every backend", "examples": ["tier=hot & region!=us", "zone in (a, b)", "*"]}


# -- the document ---------------------------------------------------------------------------

class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)


def _scalar(value: Any) -> Any:
    if isinstance(value, str | int | float | bool):
        return value
    raise ValueError(f"{value!r} is not a string, number or bool (quote dates and other values)")


def _show(value: Any) -> str:
    return format_duration(value) if isinstance(value, timedelta) else str(value)


class _Range(_Model):
    @field_validator("max", check_fields=False)
    @classmethod
    def _max_not_below_min(cls, value: Any, info: ValidationInfo) -> Any:
        low = info.data.get("min")
        if value is not None and low is not None and value < low:
            raise ValueError(f"max ({_show(value)}) is less than min ({_show(low)})")
        return value


class SizeRange(_Range):
    """Inclusive bounds on an object's size."""

    min: Size | None = None
    max: Size | None = None


class AgeRange(_Range):
    """Inclusive bounds on the time since the object entered the catalog; either bound optional."""

    min: Duration | None = None
    max: Duration | None = None


class Selector(_Model):
    """Which objects the policy governs: every condition given must hold; empty means every object."""

    tags: list[str] = []
    """The object has all these tags."""
    backend: str | None = Field(None, pattern=NAME)
    """The object has a replica on this backend."""
    prefix: str | None = Field(None, max_length=1024)
    """The object's key starts with this (on `backend` if given, else on any backend)."""
    size: SizeRange | None = None
    media_type: str | None = Field(None, pattern=r"^[\w.+-]+/(\*|[\w.+-]+)$")
    """Exact ("text/csv") or a whole type ("text/*")."""
    metadata: dict[str, Annotated[str | bool | int | float, BeforeValidator(_scalar)]] = {}
    """Each key equals the value."""
    age: AgeRange | None = None
    index: bool = False
    """Keep the selected objects in the search indexes: each pass has objects indexed that
    have no entry yet, or whose tags or metadata changed since (index items of its pass)."""

    @field_validator("tags")
    @classmethod
    def _tags_as_set(cls, tags: list[str]) -> list[str]:
        return sorted(set(tags))

    @field_validator("tags", "prefix", "metadata")
    @classmethod
    def _no_control_characters(cls, value: Any) -> Any:
        # No key, tag or metadata value can hold them, and Postgres refuses NUL in text and
        # JSONB: refused here, they would fail every reconcile pass instead.
        texts = (value if isinstance(value, list) else [value] if isinstance(value, str)
                 else [*value.keys(), *(v for v in value.values() if isinstance(v, str))] if isinstance(value, dict)
                 else [])
        for text in texts:
            if any(ord(ch) < 0x20 or ch == "\x7f" for ch in text):
                raise ValueError(f"{text!r} holds a control character")
        return value


class Replicas(_Model):
    """How many replicas: never fewer than min, aim for desired, never more than max."""

    # max is declared before desired so that desired's check sees both bounds and a fault in
    # desired is reported on `desired`.
    min: int = Field(ge=1)
    max: int | None = None
    """Defaults to desired."""
    desired: int | None = None
    """Defaults to min."""

    @model_validator(mode="before")
    @classmethod
    def _bare_int(cls, data: Any) -> Any:
        if isinstance(data, int) and not isinstance(data, bool):
            return {"min": data, "desired": data, "max": data}
        return data

    @field_validator("max", "desired")
    @classmethod
    def _within_bounds(cls, value: int | None, info: ValidationInfo) -> int | None:
        low, high = info.data.get("min"), info.data.get("max")
        if value is not None and low is not None and value < low:
            raise ValueError(f"{info.field_name} ({value}) is less than min ({low})")
        if value is not None and high is not None and value > high:
            raise ValueError(f"desired ({value}) is more than max ({high})")
        return value

    @model_validator(mode="after")
    def _defaults(self) -> Replicas:
        self.desired = self.min if self.desired is None else self.desired
        self.max = self.desired if self.max is None else self.max
        return self

    @classmethod
    def __get_pydantic_json_schema__(cls, schema: Any, handler: Any) -> dict[str, Any]:
        return {"anyOf": [{"type": "integer", "minimum": 1, "description": "min = desired = max"}, handler(schema)]}


class Placement(_Model):
    """Where the replicas of selected objects live."""

    backends: LabelExpr = LabelExpr("*")
    replicas: Replicas = Field(default_factory=lambda: Replicas(min=1))
    """An int n means min = desired = max = n."""
    spread: str | None = Field(None, pattern=rf"^{LABEL}$")
    """A failure-domain label: replicas go to backends with distinct values of it."""


class Transition(_Model):
    """After some time, the placement's backends become `to` instead."""

    after: Duration
    since: Literal["access", "creation"] = "access"
    """access: last access, or entry in the catalog if never accessed; creation: entry in the catalog."""
    to: LabelExpr


class Retention(_Model):
    """When selected objects leave every backend."""

    delete_after: Duration
    """Delete every replica this long after the object entered the catalog."""


class Verification(_Model):
    """How often replicas are checked."""

    every: Duration
    """How often each replica is read back and checked against its CID; at least 1m."""

    @field_validator("every")
    @classmethod
    def _not_too_often(cls, value: timedelta) -> timedelta:
        if value < timedelta(minutes=1):
            raise ValueError(f"every ({format_duration(value)}) is less than the minimum of 1m")
        return value


class Schedule(_Model):
    """When the reconciler acts on the policy: continuous, manual, on a cron or every interval."""

    kind: Literal["continuous", "manual", "cron", "interval"] = "continuous"
    cron: str | None = None
    every: Duration | None = None
    window: Duration | None = None
    """How long a scheduled run may keep working before it stops and waits for the next one."""

    @model_validator(mode="before")
    @classmethod
    def _short_forms(cls, data: Any) -> Any:
        if isinstance(data, str):
            if data not in ("continuous", "manual"):
                raise ValueError(f"{data!r} is not a schedule: use continuous, manual, {{cron: \"0 2 * * *\"}} "
                                 "or {every: 6h}, either with an optional window")
            return {"kind": data}
        if isinstance(data, dict) and "kind" not in data:
            return {**data, "kind": "cron" if "cron" in data else "interval" if "every" in data else "continuous"}
        return data

    @field_validator("cron")
    @classmethod
    def _cron_parses(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                if len(value.split()) != 5:
                    raise CronSimError("a cron expression has 5 fields: minute hour day month weekday")
                CronSim(value, datetime.now(UTC))
            except CronSimError as exc:
                raise ValueError(f"{value!r} is not a cron expression: {exc}") from None
        return value

    @model_validator(mode="after")
    def _fields_fit_kind(self) -> Schedule:
        wanted = {"cron": {"cron"}, "interval": {"every"}}.get(self.kind, set())
        given = {f for f in ("cron", "every") if getattr(self, f) is not None}
        if len(given) == 2:
            raise ValueError("a schedule takes either cron or every, not both")
        if given != wanted:
            raise ValueError(f"a {self.kind} schedule takes {' and '.join(sorted(wanted)) or 'no cron or every'}")
        if self.window is not None and self.kind in ("continuous", "manual"):
            raise ValueError(f"a {self.kind} schedule has no window")
        return self

    def next_run_after(self, dt: datetime) -> datetime | None:
        """The first run strictly after `dt` (timezone-aware); None when not on a timetable."""
        if dt.tzinfo is None:
            raise ValueError("next_run_after needs a timezone-aware datetime")
        if self.kind == "cron":
            return next(CronSim(self.cron, dt.astimezone(UTC)))
        if self.kind == "interval":
            return dt.astimezone(UTC) + self.every
        return None

    @model_serializer
    def _compact(self) -> str | dict[str, str]:
        if self.kind in ("continuous", "manual"):
            return self.kind
        out = {"cron": self.cron} if self.kind == "cron" else {"every": format_duration(self.every)}
        return out | ({"window": format_duration(self.window)} if self.window else {})

    @classmethod
    def __get_pydantic_json_schema__(cls, schema: Any, handler: Any) -> dict[str, Any]:
        window = {"window": _DURATION_SCHEMA}
        return {"description": cls.__doc__, "default": "continuous", "oneOf": [
            {"enum": ["continuous", "manual"]},
            {"type": "object", "additionalProperties": False, "required": ["cron"],
             "properties": {"cron": {"type": "string", "examples": ["0 2 * * *"]}, **window}},
            {"type": "object", "additionalProperties": False, "required": ["every"],
             "properties": {"every": _DURATION_SCHEMA, **window}}]}


class FilecoinCopies(_Model):
    """Filecoin storage deals every selected object is kept in. Only active deals (sealed,
    unslashed, on chain) count as copies; deals in flight hold new ones back."""

    copies: int = Field(ge=1, le=16)
    backend: str = Field("filecoin", pattern=r"^[a-z0-9][a-z0-9._-]{0,62}$")
    """The filecoin backend that makes the deals."""
    verified: bool | None = None
    """Verified (datacap) deals; default: the backend's setting."""
    regions: list[str] | None = None
    spread_regions: bool = False
    max_price: int | None = Field(None, ge=0)
    """attoFIL per GiB per epoch, at most."""


class Policy(_Model):
    """A Ferry policy: which objects, where their replicas live, and how that changes over time."""

    name: str = Field(pattern=NAME)
    description: str | None = None
    selector: Selector = Field(default_factory=Selector)
    placement: Placement | None = None
    transitions: list[Transition] = []
    retention: Retention | None = None
    verification: Verification | None = None
    filecoin: FilecoinCopies | None = None
    schedule: Schedule = Field(default_factory=Schedule)

    @model_validator(mode="after")
    def _coherent(self) -> Policy:
        # Raised directly, not as ValueError, so each fault keeps its own path.
        if self.transitions and self.placement is None:
            raise InvalidPolicy("transitions change a placement: give a placement too", field="placement")
        if self.placement is None and self.retention is None and self.verification is None \
                and self.filecoin is None and not self.selector.index:
            raise InvalidPolicy("the policy does nothing: give a placement, a retention, a verification, "
                                "filecoin copies or `index: true` in the selector", field="placement")
        for i, (before, later) in enumerate(pairwise(self.transitions), start=1):
            if later.after <= before.after:
                raise InvalidPolicy(f"after ({format_duration(later.after)}) must be later than the previous "
                                    f"transition's ({format_duration(before.after)})", field=f"transitions[{i}].after")
        if self.retention and self.transitions and self.retention.delete_after <= self.transitions[-1].after:
            raise InvalidPolicy(f"delete_after ({format_duration(self.retention.delete_after)}) must be later than "
                                f"the last transition ({format_duration(self.transitions[-1].after)}), else the "
                                "transition is pointless", field="retention.delete_after")
        return self

    @classmethod
    def from_dict(cls, data: Any) -> Policy:
        if not isinstance(data, dict):
            got = "nothing" if data is None else f"a {type(data).__name__}"
            raise InvalidPolicy(f"the policy document must be a mapping of fields, got {got}")
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise _invalid(exc) from None

    @classmethod
    def from_yaml(cls, text: str) -> Policy:
        try:
            data = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
        except yaml.YAMLError as exc:
            mark, problem = getattr(exc, "problem_mark", None), getattr(exc, "problem", None) or str(exc)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            raise InvalidPolicy(f"the policy is not valid YAML{where}: {problem}") from None
        return cls.from_dict(data)

    def to_document(self) -> dict[str, Any]:
        """The canonical JSON-able form: equal for documents that mean the same thing."""
        return self.model_dump(mode="json", exclude_none=True)

    def placement_at(self, age_since_access: timedelta, age_since_creation: timedelta) -> LabelExpr | None:
        """The backends in force for an object of these ages: the last transition due, else the placement's."""
        if self.placement is None:
            return None
        current = self.placement.backends
        for t in self.transitions:
            if (age_since_access if t.since == "access" else age_since_creation) >= t.after:
                current = t.to
        return current


def _invalid(exc: ValidationError) -> InvalidPolicy:
    """The first pydantic error as an InvalidPolicy, located by its dotted path."""
    error = exc.errors(include_url=False)[0]
    field = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error["loc"]).lstrip(".") or None
    if error["type"] == "extra_forbidden":
        message = f"unknown field {error['loc'][-1]!r}"
    elif error["type"] == "missing":
        message = f"{error['loc'][-1]!r} is required"
    else:
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] in ("string_pattern_mismatch", "literal_error"):
            message += f", not {error['input']!r}"
    return InvalidPolicy(message, field=field)


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last one
    silently, so `replicas: 2 ... replicas: 3` would apply a document its author did not read)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} is given twice", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def json_schema() -> dict[str, Any]:
    """The JSON Schema of a policy document, as published in docs/policy.schema.json."""
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "$id": SCHEMA_ID,
            **Policy.model_json_schema(), "title": "Ferry policy"}


if __name__ == "__main__":
    print(json.dumps(json_schema(), indent=2, sort_keys=True))
