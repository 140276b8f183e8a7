"""The service's settings table against the CRD: any spec the API server
accepts must give pods that start.

The CRD's ranges are checked by the API server at `kubectl apply`; the
service checks its settings again when it starts (chatstream.settings) and
exits when one is out of range. If the CRD accepts a value the server
refuses, the user's apply succeeds and the pods crash-loop. So every row of
the table that names a CRD field must have the same range, choices and
default there (one default per setting, whichever way it is set), and, as a
check of the whole path, every bound the CRD states is turned into the pod's
environment by the operator's own builders and given to the server's
settings loader.
"""

from __future__ import annotations

import copy
import itertools

import pytest
import yaml

from chatstream.settings import TABLE, Settings
from chatstream_operator import resources

from builder_helpers import ROOT, SCHEMA, make_resource

CHART_CRD = ROOT / "charts/chatstream/templates/crd.yaml"

# spec fields that reach the service as a setting (through resources._env).
NUMERIC = [
    ("concurrency", "maxConcurrentStreams"),
    ("concurrency", "maxQueueSize"),
    ("generation", "maxNewTokens"),
    ("generation", "contextLength"),
    ("generation", "windowKeep"),
    ("shutdownGraceSeconds",),
]
ENUMS = [("model", "dtype"), ("model", "device"), ("sessions", "store")]
# What the pod would read from Secrets (valueFrom) in a cluster.
# What the kubelet fills in from Secrets and from the downward API.
FROM_SECRETS = {"CHATSTREAM_REDIS_URL": "redis://redis:6379/0", "CHATSTREAM_SESSION_SECRET": "s3cret",
                "POD_NAME": "chat-5d8f-abcde", "POD_NAMESPACE": "team-a", "CHATSTREAM_CPU_REQUEST": "250"}


MAPPED = [row for row in TABLE if row.crd]


def field_schema(path: tuple[str, ...], schema: dict = SCHEMA) -> dict:
    for key in path:
        schema = schema["properties"][key]
    return schema


def set_field(spec: dict, path: tuple[str, ...], value) -> None:
    for key in path[:-1]:
        spec = spec.setdefault(key, {})
    spec[path[-1]] = value


def crd_accepts(spec: dict) -> bool:
    """The CRD's cross-field rules that concern these fields (CEL in the CRD)."""
    gen = spec.get("generation", {})
    if "maxNewTokens" in gen and "contextLength" in gen and not gen["maxNewTokens"] < gen["contextLength"]:
        return False
    return not (spec.get("sessions", {}).get("store") == "redis" and "redisURLSecretRef" not in spec["sessions"])


def pod_environment(spec: dict) -> dict[str, str]:
    """The container's environment as the kubelet would give it."""
    dep = resources.deployment(make_resource(spec))
    env = {}
    for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]:
        env[e["name"]] = e["value"] if "value" in e else FROM_SECRETS[e["name"]]
    return env


def starts(spec: dict) -> None:
    """Fails the test (with the server's own message) if the server would exit."""
    try:
        Settings.from_env(pod_environment(spec))
    except SystemExit as exit_:
        pytest.fail(f"the CRD accepts {spec} but the server exits: {exit_}")


def bounded_specs():
    """One spec per bound of each numeric field (others defaulted), made
    consistent with the CRD's cross-field rule, plus all minimums and all
    maximums at once."""
    base = {"model": {"source": "builtin:smollm2-135m-instruct"}}
    for path, end in itertools.product(NUMERIC, ("minimum", "maximum")):
        schema = field_schema(path)
        assert end in schema, f"spec.{'.'.join(path)} has no {end}: the API server would accept anything"
        spec = copy.deepcopy(base)
        set_field(spec, path, schema[end])
        filled = make_resource(spec)["spec"]
        if not crd_accepts(filled):  # maxNewTokens < contextLength: move the other one
            gen = filled["generation"]
            if path[-1] == "maxNewTokens":
                set_field(spec, ("generation", "contextLength"), gen["maxNewTokens"] + 1)
            else:
                set_field(spec, ("generation", "maxNewTokens"), gen["contextLength"] - 1)
        yield f"{'.'.join(path)}={schema[end]}", spec
    for end in ("minimum", "maximum"):
        spec = copy.deepcopy(base)
        for path in NUMERIC:
            set_field(spec, path, field_schema(path)[end])
        yield f"all {end}s", spec


def crd_field(row) -> dict:
    try:
        return field_schema(tuple(row.crd.split(".")))
    except KeyError:
        pytest.fail(f"setting {row.name} names spec.{row.crd}, which the CRD does not have")


@pytest.mark.parametrize("row", MAPPED, ids=[r.name for r in MAPPED])
def test_the_crd_field_has_the_settings_range(row):
    field = crd_field(row)
    for end in ("minimum", "maximum"):
        want = getattr(row, end)
        if want is not None:
            assert field.get(end) == want, f"spec.{row.crd} {end} is {field.get(end)}, the server's is {want}"
    if row.choices:
        assert set(field.get("enum", ())) <= set(row.choices), f"spec.{row.crd} accepts values the server refuses"


@pytest.mark.parametrize("row", MAPPED, ids=[r.name for r in MAPPED])
def test_the_crd_default_is_the_servers(row):
    """One default per setting: a resource that leaves a field out gets what
    `chatstream serve` without the flag gets."""
    field = crd_field(row)
    *parent, leaf = row.crd.split(".")
    if leaf in field_schema(tuple(parent)).get("required", ()):
        assert "default" not in field  # the user must say (the model to serve)
    elif "default" in field:
        assert field["default"] == row.default, f"spec.{row.crd} defaults to {field['default']}, the server to {row.default}"
    else:
        assert row.default is None, f"spec.{row.crd} has no default; the pod would get the server's {row.default!r} silently"


def test_every_spec_field_that_becomes_a_setting_is_in_the_table():
    """A spec field the operator turns into a CHATSTREAM_* variable is a
    setting the table must know by its CRD path (else nothing holds their
    ranges together)."""
    base = {"model": {"source": "builtin:smollm2-135m-instruct"}}
    before = pod_environment(base)
    by_env = {row.env: row for row in TABLE if row.env}
    for path in NUMERIC:
        spec = copy.deepcopy(base)
        set_field(spec, path, field_schema(path)["minimum"] + 1)
        after = pod_environment(spec)
        changed = [k for k in after if after[k] != before.get(k) and k.startswith("CHATSTREAM_")]
        assert changed, f"spec.{'.'.join(path)} reaches no setting"
        for var in changed:
            assert by_env[var].crd == ".".join(path), f"{var} comes from spec.{'.'.join(path)}; its row says {by_env[var].crd}"


@pytest.mark.parametrize("spec", [s for _, s in bounded_specs()], ids=[i for i, _ in bounded_specs()])
def test_every_bound_the_crd_accepts_starts_the_server(spec):
    assert crd_accepts(make_resource(spec)["spec"]), "the case itself breaks a CRD rule"
    starts(spec)


@pytest.mark.parametrize("path", ENUMS, ids=[".".join(p) for p in ENUMS])
def test_every_enum_value_the_crd_accepts_starts_the_server(path):
    for value in field_schema(path)["enum"]:
        spec = {"model": {"source": "builtin:smollm2-135m-instruct"}}
        set_field(spec, path, value)
        if path == ("sessions", "store") and value == "redis":
            spec["sessions"]["redisURLSecretRef"] = {"name": "redis"}
        starts(spec)


def test_the_defaults_start_the_server():
    starts({"model": {"source": "builtin:smollm2-135m-instruct"}})


def test_the_chart_crd_has_the_same_schema():
    """The chart's copy is generated from manifests/crd.yaml; a schema that
    differs would make `helm install` and `kubectl apply` accept different
    values."""
    text = "\n".join(line for line in CHART_CRD.read_text().splitlines() if not line.lstrip().startswith("{{"))
    chart = yaml.safe_load(text)
    assert chart["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"] == SCHEMA
