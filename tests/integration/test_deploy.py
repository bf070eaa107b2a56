"""deploy/docker-compose.yml against the files it names (no container engine here: what can be checked without one).

A YAML mapping with a repeated key is refused by Compose (its parser rejects duplicates, PyYAML keeps the last one
silently), so the file is read with a loader that refuses them too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
CREWS = ("ingest", "analytics", "alerting", "retention")


class StrictLoader(yaml.SafeLoader):
    """A safe loader that refuses a mapping with the same key twice."""


def _mapping(loader: StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _value in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":  # ``<<: *crew``: keys written beside it override it
            continue
        key = loader.construct_object(key_node, deep=deep)  # type: ignore[no-untyped-call]
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep)


StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)


def load_strict(text: str) -> Any:
    return yaml.load(text, Loader=StrictLoader)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    doc = load_strict((DEPLOY / "docker-compose.yml").read_text())
    assert isinstance(doc, dict)
    return doc


def test_the_strict_loader_refuses_a_repeated_key() -> None:
    with pytest.raises(yaml.constructor.ConstructorError, match="duplicate key 'services'"):
        load_strict("services:\nservices:\n  a: 1\n")
    assert load_strict("a: &x {k: 1, v: 2}\nb: {<<: *x, v: 3}\n") == {
        "a": {"k": 1, "v": 2},
        "b": {"k": 1, "v": 3},
    }


def test_compose_has_every_service_once(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) >= {"valkey", "mosquitto", *CREWS, "prometheus"}
    assert set(compose) <= {"services", "volumes"}


def test_every_mounted_file_exists(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith("./"):
                assert (DEPLOY / source).exists(), f"{name} mounts {source}, which deploy/ lacks"
            else:
                assert source in compose.get("volumes", {}), f"{name} uses an undeclared volume {source}"


def test_each_crew_connects_as_its_own_user_with_the_password_of_the_acl_file(
    compose: dict[str, Any],
) -> None:
    passwords = {}
    for line in (DEPLOY / "redis-users.acl").read_text().splitlines():
        words = line.split()
        secrets = [w[1:] for w in words[2:] if w.startswith(">")]
        if words[:1] == ["user"] and secrets:
            passwords[words[1]] = secrets[0]
    valkey = compose["services"]["valkey"]["command"]
    assert valkey[valkey.index("--aclfile") + 1] == "/etc/valkey/users.acl"
    for crew in CREWS:
        service = compose["services"][crew]
        assert service["command"][:2] == ["waterdoctor", crew]
        url = urlsplit(service["environment"]["WD_REDIS_URL"])
        assert url.username == crew, crew
        assert url.password == passwords[crew], crew
        assert url.hostname == "valkey"
