"""The cluster-launcher configs under cluster/ pass Ray's own validation, offline.

Cloud configs (cluster/config.yaml) go through what `ray up` does before it talks to the
cloud: ray.autoscaler._private.util.prepare_config (merge with the provider's shipped
defaults.yaml, merge setup commands, fill per-type min/max workers) and then
validate_config (the JSON schema ray/autoscaler/ray-schema.json plus Ray's extra checks).
The fake-cluster config (cluster/local.yaml) is read as-is by the autoscaler that
`ray start --head --autoscaling-config=...` runs, so it is validated raw, and the
autoscaler class itself is built from the file (no GCS, no processes).
"""

from __future__ import annotations

import copy
import ipaddress
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

REPO = Path(__file__).resolve().parents[1]
CLUSTER_DIR = REPO / "cluster"
CONFIG_FILES = sorted([*CLUSTER_DIR.glob("*.yaml"), *CLUSTER_DIR.glob("*.yml")])
DASHBOARD_PORT = 8265
FAKE_PROVIDERS = {"fake_multinode"}


def load(path: Path) -> dict:
    with open(path) as f:
        return yaml.safe_load(f)


def is_fake(config: dict) -> bool:
    return config.get("provider", {}).get("type") in FAKE_PROVIDERS


def validate_like_ray(config: dict) -> dict:
    """Validate a cluster config the way Ray consumes it; returns the checked config.

    Raises jsonschema.ValidationError (schema) or ValueError/RuntimeError (Ray's checks).
    """
    config = copy.deepcopy(config)
    if not is_fake(config):
        # What `ray up` does first (commands._bootstrap_config), minus the cloud calls.
        config = prepare_config(config)
    validate_config(config)
    return config


def test_there_are_configs_to_check():
    names = {p.name for p in CONFIG_FILES}
    assert {"config.yaml", "local.yaml"} <= names


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.name)
def test_config_passes_ray_validation(path):
    validate_like_ray(load(path))


def test_fake_cluster_config_loads_into_the_autoscaler(monkeypatch):
    """The monitor process builds a StandardAutoscaler straight from the YAML file."""
    from ray.autoscaler._private.autoscaler import StandardAutoscaler
    from ray.autoscaler._private.load_metrics import LoadMetrics

    monkeypatch.setenv("RAY_FAKE_CLUSTER", "1")  # the fake provider insists on it
    autoscaler = StandardAutoscaler(str(CLUSTER_DIR / "local.yaml"), LoadMetrics(), gcs_client=None)
    assert type(autoscaler.provider).__name__ == "FakeMultiNodeProvider"
    workers = autoscaler.available_node_types["ray.worker.cpu"]
    assert workers["resources"]["CPU"] == 1
    assert workers["min_workers"] == 0 and workers["max_workers"] == 3
    assert autoscaler.config["idle_timeout_minutes"] < 1


def mutations():
    """Deliberately broken variants: each must fail validation."""

    def typo_in_node_type(c):
        node_type = next(t for t in c["available_node_types"] if t != c["head_node_type"])
        c["available_node_types"][node_type]["max_worker"] = c["available_node_types"][node_type].pop("max_workers")

    def unknown_top_level_key(c):
        c["idle_timeout_minute"] = 5

    def wrong_type(c):
        c["max_workers"] = "eight"

    def head_type_missing(c):
        c["head_node_type"] = "no.such.type"

    return [typo_in_node_type, unknown_top_level_key, wrong_type, head_type_missing]


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.name)
@pytest.mark.parametrize("mutate", mutations(), ids=lambda f: f.__name__)
def test_broken_config_fails_validation(path, mutate):
    config = load(path)
    validate_like_ray(config)  # the original is fine...
    mutate(config)
    with pytest.raises((jsonschema.ValidationError, ValueError, RuntimeError)):
        validate_like_ray(config)  # ...the mutant is not


def test_schema_rejects_typo_with_a_useful_message():
    config = load(CLUSTER_DIR / "config.yaml")
    config["available_node_types"]["worker.gpu.spot"]["max_worker"] = 8
    with pytest.raises(jsonschema.ValidationError, match="max_worker"):
        validate_like_ray(config)


# --- dashboard exposure ----------------------------------------------------------------

OPEN_TO_WORLD = {ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0")}


def ingress_rules(node):
    """Every AWS-style ingress rule (a dict in an IpPermissions list) anywhere in node."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "IpPermissions" and isinstance(value, list):
                yield from value
            else:
                yield from ingress_rules(value)
    elif isinstance(node, list):
        for item in node:
            yield from ingress_rules(item)


def rule_problems(rule: dict) -> list[str]:
    problems = []
    all_ports = str(rule.get("IpProtocol", "")) == "-1" or rule.get("FromPort") in (None, -1)
    low, high = rule.get("FromPort", -1), rule.get("ToPort", -1)
    if all_ports or (low is not None and high is not None and low <= DASHBOARD_PORT <= high):
        problems.append(f"rule opens the dashboard port {DASHBOARD_PORT}: {rule}")
    cidrs = [r.get("CidrIp") for r in rule.get("IpRanges", [])] + [r.get("CidrIpv6") for r in rule.get("Ipv6Ranges", [])]
    for cidr in filter(None, cidrs):
        if ipaddress.ip_network(cidr, strict=False) in OPEN_TO_WORLD:
            problems.append(f"rule opens {cidr}: {rule}")
    return problems


def dashboard_hosts(config: dict) -> list[str]:
    hosts = []
    for command in config.get("head_start_ray_commands", []):
        hosts += re.findall(r"--dashboard-host[= ]+(\S+)", command)
    return hosts


def published_ports(config: dict) -> list[str]:
    docker = config.get("docker", {})
    options = [
        *docker.get("run_options", []),
        *docker.get("head_run_options", []),
        *docker.get("worker_run_options", []),
    ]
    words = [w for option in options for w in shlex.split(option)]
    return [w for w in words if w in ("-p", "-P", "--publish", "--publish-all") or w.startswith("--publish=")]


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.name)
def test_dashboard_not_reachable_from_the_internet(path):
    config = load(path)
    problems = [p for rule in ingress_rules(config) for p in rule_problems(rule)]
    assert problems == []
    # Ray listens on the head only where --dashboard-host says (default: localhost).
    for host in dashboard_hosts(config):
        assert host in ("127.0.0.1", "localhost", "::1"), f"dashboard bound to {host}"
    assert published_ports(config) == []


def test_exposure_checks_can_fail():
    assert rule_problems({"IpProtocol": "tcp", "FromPort": 8265, "ToPort": 8265, "IpRanges": [{"CidrIp": "10.0.0.0/8"}]})
    assert rule_problems({"IpProtocol": "tcp", "FromPort": 8000, "ToPort": 9000, "IpRanges": [{"CidrIp": "10.0.0.0/8"}]})
    assert rule_problems({"IpProtocol": "-1", "UserIdGroupPairs": [{"GroupId": "sg-1"}]})
    assert rule_problems({"IpProtocol": "tcp", "FromPort": 443, "ToPort": 443, "IpRanges": [{"CidrIp": "0.0.0.0/0"}]})
    assert not rule_problems({"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22, "IpRanges": [{"CidrIp": "203.0.113.7/32"}]})
    nested = {"provider": {"security_group": {"IpPermissions": [{"FromPort": 8265, "ToPort": 8265}]}}}
    assert list(ingress_rules(nested)) == [{"FromPort": 8265, "ToPort": 8265}]
    assert dashboard_hosts({"head_start_ray_commands": ["ray start --head --dashboard-host=0.0.0.0"]}) == ["0.0.0.0"]
    assert published_ports({"docker": {"run_options": ["-p 8265:8265"]}}) == ["-p"]


# --- what the AWS config promises --------------------------------------------------------


@pytest.fixture(scope="module")
def aws():
    return validate_like_ray(load(CLUSTER_DIR / "config.yaml"))


def test_aws_head_and_spot_gpu_workers(aws):
    head = aws["available_node_types"][aws["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    assert head["max_workers"] == 0
    workers = [t for name, t in aws["available_node_types"].items() if name != aws["head_node_type"]]
    assert len(workers) == 1
    (gpu,) = workers
    assert gpu["resources"]["GPU"] >= 1
    assert gpu["min_workers"] == 0 and gpu["max_workers"] >= 1
    assert gpu["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot"
    assert aws["idle_timeout_minutes"] > 0
    assert aws["provider"]["cache_stopped_nodes"] is False


def test_aws_commands_use_the_image_not_ray_defaults(aws):
    # Ray's AWS defaults.yaml would pip-install a nightly Ray wheel and boto3 if these were
    # left out; the image already has everything.
    for key in ("setup_commands", "head_setup_commands", "worker_setup_commands"):
        assert aws[key] == [], key
    assert aws["docker"]["image"]
    head_start = " ".join(aws["head_start_ray_commands"])
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in head_start
    assert "--head" in head_start
    assert "--num-cpus=0" in head_start


def test_aws_token_auth_reaches_every_node(aws):
    assert "-e RAY_AUTH_MODE=token" in aws["docker"]["run_options"]
    mounts = aws["file_mounts"]
    assert mounts["/home/ray/.ray/auth_token"] == "~/.ray/auth_token"
    assert mounts["/home/ray/configs"] == "./configs"
