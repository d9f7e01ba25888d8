"""Spec, resources and capability detection."""
from __future__ import annotations

import os

import pytest

from executor.capabilities import detect
from mesh.errors import InvalidArgument
from mesh.model.resources import Resources, format_bytes, parse_memory
from mesh.model.spec import AppSpec, load_spec, parse_spec

EXAMPLE = """\
metadata:
  name: echo-app
  description: optional text
spec:
  working_directory: /opt/examples/echo
  command: /usr/bin/python3
  arguments: [echo_service.py]
  environments: {ZMESH_LOG_LEVEL: INFO}
  labels: {zone: a}
  resreq: {cpu: 1, memory: 2g, gpu: 0}
  max_instances: 8
  max_retries: 3
  prefetch: 16
"""

GiB = 1024 ** 3


def _raises(text: str, *needles: str) -> InvalidArgument:
    with pytest.raises(InvalidArgument) as info:
        parse_spec(text)
    for needle in needles:
        assert needle in str(info.value)
    return info.value


def test_example_parses():
    s = parse_spec(EXAMPLE)
    assert s.name == "echo-app" and s.description == "optional text"
    assert s.command == "/usr/bin/python3"
    assert s.arguments == ("echo_service.py",)
    assert s.working_directory == "/opt/examples/echo"
    assert s.environments == {"ZMESH_LOG_LEVEL": "INFO"}
    assert s.labels == {"zone": "a"}
    assert s.resreq == Resources(cpu=1, memory=2 * GiB, gpu=0)
    assert (s.max_instances, s.max_retries, s.prefetch) == (8, 3, 16)
    hash(s)  # dict fields are excluded from the hash


def test_minimal_defaults():
    s = parse_spec("metadata: {name: a}\nspec: {command: run}\n")
    assert s.arguments == () and s.working_directory is None
    assert s.environments == {} and s.labels == {} and s.resreq == Resources()
    assert s.max_instances is None and s.prefetch is None and s.max_retries == 3


def test_missing_command():
    err = _raises("metadata: {name: a}\nspec: {arguments: [x]}\n", "spec.command is required")
    assert err.details["field"] == "spec.command"
    _raises("metadata: {name: a}\n", "spec.command is required")


def test_missing_name():
    _raises("spec: {command: run}\n", "metadata.name is required")
    _raises("metadata: {description: x}\nspec: {command: run}\n", "metadata.name is required")


@pytest.mark.parametrize("name", ["Echo", "-x", "a b", "a" * 64, "ä"])
def test_bad_name(name):
    _raises(f"metadata: {{name: '{name}'}}\nspec: {{command: run}}\n", "metadata.name")


def test_bad_yaml_has_line():
    err = _raises("metadata:\n  name: a\nspec: [command: x\n", "invalid YAML", "line")
    assert err.details["line"] >= 3


@pytest.mark.parametrize("text", ["", "- a\n- b\n", "just a string\n"])
def test_not_a_mapping(text):
    _raises(text, "mapping")


def test_unknown_keys():
    _raises("metadata: {name: a}\nspec: {command: x, max_retires: 2}\n",
            "spec.max_retires", "max_retries")
    _raises("metadata: {name: a, labels: {}}\nspec: {command: x}\n", "metadata.labels")
    _raises("metadata: {name: a}\nspec: {command: x}\nkind: App\n", "kind")
    _raises("metadata: {name: a}\nspec: {command: x, resreq: {cpus: 1}}\n", "spec.resreq.cpus")


@pytest.mark.parametrize("field,value,needle", [
    ("command", "[a, b]", "spec.command must be a string"),
    ("arguments", "run.py", "spec.arguments must be a list"),
    ("arguments", "[[x]]", "spec.arguments[0] must be a string"),
    ("environments", "[A]", "spec.environments must be a mapping"),
    ("environments", "{A: [1]}", "spec.environments.A must be a string"),
    ("labels", "x", "spec.labels must be a mapping"),
    ("resreq", "2", "spec.resreq must be a mapping"),
    ("max_instances", "'8'", "spec.max_instances must be an integer"),
    ("max_instances", "0", "spec.max_instances must be >= 1"),
    ("max_retries", "-1", "spec.max_retries must be >= 0"),
    ("max_retries", "true", "spec.max_retries must be an integer"),
    ("prefetch", "1.5", "spec.prefetch must be an integer"),
    ("working_directory", "5", "spec.working_directory must be a string"),
])
def test_wrong_types(field, value, needle):
    _raises(f"metadata: {{name: a}}\nspec: {{command: x, {field}: {value}}}\n", needle)


def test_scalars_coerced_to_str():
    s = parse_spec("metadata: {name: a}\nspec: {command: x, arguments: [--port, 80],"
                   " environments: {PORT: 8080, DEBUG: true}, labels: {rack: 3}}\n")
    assert s.arguments == ("--port", "80")
    assert s.environments == {"PORT": "8080", "DEBUG": "true"}
    assert s.labels == {"rack": "3"}


def test_relative_working_directory(tmp_path):
    text = "metadata: {name: a}\nspec: {command: x, working_directory: sub/../svc}\n"
    assert parse_spec(text, base_dir="/base").working_directory == "/base/svc"
    assert parse_spec(text).working_directory == "sub/../svc"  # no base: left as is
    abs_text = text.replace("sub/../svc", "/abs/dir")
    assert parse_spec(abs_text, base_dir="/base").working_directory == "/abs/dir"
    path = tmp_path / "app.yaml"
    path.write_text(text)
    assert load_spec(str(path)).working_directory == os.path.join(str(tmp_path), "svc")


def test_load_spec_errors(tmp_path):
    missing = str(tmp_path / "nope.yaml")
    with pytest.raises(InvalidArgument, match="nope.yaml"):
        load_spec(missing)
    bad = tmp_path / "bad.yaml"
    bad.write_text("metadata: {name: a}\nspec: {}\n")
    with pytest.raises(InvalidArgument, match=r"bad\.yaml: spec\.command is required"):
        load_spec(str(bad))


def test_dict_roundtrip():
    msgpack = pytest.importorskip("msgpack")

    s = parse_spec(EXAMPLE)
    wire = msgpack.unpackb(msgpack.packb(s.to_dict()), raw=False)
    assert AppSpec.from_dict(wire) == s
    assert AppSpec.from_dict(s.to_dict()).to_dict() == s.to_dict()
    d = s.to_dict()
    d["spec"]["environments"]["X"] = "1"  # to_dict hands out copies
    assert "X" not in s.environments


def test_from_dict_validates():
    with pytest.raises(InvalidArgument, match="spec.command is required"):
        AppSpec.from_dict({"metadata": {"name": "a"}, "spec": {}})
    with pytest.raises(InvalidArgument, match="spec.bogus"):
        AppSpec.from_dict({"metadata": {"name": "a"}, "spec": {"command": "x", "bogus": 1}})
    with pytest.raises(InvalidArgument):
        AppSpec.from_dict(["not", "a", "dict"])


@pytest.mark.parametrize("text,expected", [
    ("512m", 512 * 1024 ** 2), ("4g", 4 * GiB), ("4G", 4 * GiB), ("1.5gi", int(1.5 * GiB)),
    ("100k", 102400), ("2t", 2 * 1024 ** 4), ("4GiB", 4 * GiB), ("123", 123), (2048, 2048),
])
def test_parse_memory(text, expected):
    assert parse_memory(text) == expected


def test_resources_parse():
    r = Resources.parse({"cpu": 2, "memory": "4g", "gpu": 0})
    assert r == Resources(cpu=2.0, memory=4 * GiB, gpu=0)
    assert Resources.parse(None) == Resources()
    assert Resources.parse({"cpu": 0.5}).cpu == 0.5
    assert Resources.parse(r.to_dict()) == r


@pytest.mark.parametrize("value,needle", [
    ({"disk": 1}, "disk"), ({"cpu": -1}, "cpu"), ({"memory": -5}, "memory"),
    ({"gpu": -1}, "gpu"), ({"memory": "4x"}, "memory"), ({"memory": "-1g"}, "memory"),
    ({"gpu": 1.5}, "gpu"), ({"cpu": "lots"}, "cpu"), ({"cpu": True}, "cpu"), ("2", "mapping"),
])
def test_resources_errors(value, needle):
    with pytest.raises(InvalidArgument, match=needle):
        Resources.parse(value)


def test_fits_and_arithmetic():
    free = Resources(cpu=4, memory=8 * GiB, gpu=1)
    req = Resources(cpu=1.5, memory=2 * GiB)
    assert req.fits(free) and not Resources(gpu=2).fits(free)
    assert not Resources(cpu=4.1).fits(free) and not Resources(memory=9 * GiB).fits(free)
    left = free - req - req
    assert left == Resources(cpu=1, memory=4 * GiB, gpu=1)
    assert left + req + req == free
    assert Resources(cpu=0.1 + 0.2).fits(Resources(cpu=0.3))  # float rounding tolerated


def test_format_bytes():
    assert format_bytes(512) == "512 B"
    assert format_bytes(int(3.8 * GiB)) == "3.8 GiB"
    assert format_bytes(1536) == "1.5 KiB"


def test_detect_capabilities():
    caps = detect(4, {"zone": "a"})
    assert caps["cpu"] >= 1 and caps["memory"] > 0 and caps["gpu"] >= 0
    assert caps["slots"] == 4 and caps["labels"] == {"zone": "a"}
    assert caps["hostname"] and caps["pid"] == os.getpid()
    assert isinstance(caps["gpu_names"], list) and caps["python"] and caps["platform"]
    msgpack = pytest.importorskip("msgpack")

    assert msgpack.unpackb(msgpack.packb(caps), raw=False) == caps


def test_detect_gpu_from_env(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,2")
    assert detect(1, {})["gpu"] == 2
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert detect(1, {})["gpu"] == 0
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1,-1,2")
    assert detect(1, {})["gpu"] == 1
