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
    cidrs = [r.get("CidrIp") for r in rule.get("IpRanges", [])] + [
        r.get("CidrIpv6") for r in rule.get("Ipv6Ranges", [])
    ]
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
    assert rule_problems(
        {"IpProtocol": "tcp", "FromPort": 8265, "ToPort": 8265, "IpRanges": [{"CidrIp": "10.0.0.0/8"}]}
    )
    assert rule_problems(
        {"IpProtocol": "tcp", "FromPort": 8000, "ToPort": 9000, "IpRanges": [{"CidrIp": "10.0.0.0/8"}]}
    )
    assert rule_problems({"IpProtocol": "-1", "UserIdGroupPairs": [{"GroupId": "sg-1"}]})
    assert rule_problems({"IpProtocol": "tcp", "FromPort": 443, "ToPort": 443, "IpRanges": [{"CidrIp": "0.0.0.0/0"}]})
    assert not rule_problems(
        {"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22, "IpRanges": [{"CidrIp": "203.0.113.7/32"}]}
    )
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


# --- IAM and the instance metadata service ----------------------------------------------

IAM_DIR = CLUSTER_DIR / "iam"
PROFILES = {"head.cpu": "es-service-ray-head", "worker.gpu.spot": "es-service-ray-worker"}
HEAD_ACTIONS = {
    "ec2:DescribeInstances",
    "ec2:DescribeInstanceTypes",
    "ec2:DescribeImages",
    "ec2:DescribeSubnets",
    "ec2:DescribeSecurityGroups",
    "ec2:RunInstances",
    "ec2:CreateTags",
    "ec2:TerminateInstances",
    "iam:PassRole",
    "ecr:GetAuthorizationToken",
    "ecr:BatchCheckLayerAvailability",
    "ecr:BatchGetImage",
    "ecr:GetDownloadUrlForLayer",
}
ECR_PULL = {
    "ecr:GetAuthorizationToken",
    "ecr:BatchCheckLayerAvailability",
    "ecr:BatchGetImage",
    "ecr:GetDownloadUrlForLayer",
}


def imds_problems(node_config: dict) -> list[str]:
    """What keeps a node_config from requiring IMDSv2 with a hop limit of 1."""
    options = node_config.get("MetadataOptions") or {}
    problems = []
    if options.get("HttpTokens") != "required":
        problems.append(f"HttpTokens is {options.get('HttpTokens')!r}, not 'required' (IMDSv1 stays open)")
    if options.get("HttpPutResponseHopLimit") != 1:
        problems.append(f"HttpPutResponseHopLimit is {options.get('HttpPutResponseHopLimit')!r}, not 1")
    if options.get("HttpEndpoint", "enabled") != "enabled":
        problems.append("HttpEndpoint disabled: the head's autoscaler would have no credentials")
    return problems


def statements(policy: dict) -> list[dict]:
    found = policy["Statement"]
    return [found] if isinstance(found, dict) else found


def as_list(value) -> list:
    return value if isinstance(value, list) else [value]


def policy_problems(policy: dict, allowed: set[str], cluster_name: str, region: str, worker_role: str) -> list[str]:
    """Where a policy grants more than the autoscaler needs."""
    problems = []
    for statement in statements(policy):
        sid = statement.get("Sid", "?")
        if statement.get("Effect") != "Allow":
            continue
        if "NotAction" in statement or "NotResource" in statement:
            problems.append(f"{sid}: NotAction/NotResource grant everything else")
        actions = as_list(statement.get("Action", []))
        resources = as_list(statement.get("Resource", []))
        conditions = statement.get("Condition", {})
        for action in actions:
            if "*" in action or action not in allowed:
                problems.append(f"{sid}: action {action} is not one the autoscaler needs")
        for resource in resources:
            if resource.startswith("arn:aws:ec2:") and resource.split(":")[3] != region:
                problems.append(f"{sid}: {resource} is outside the cluster's region {region}")
        if "ec2:TerminateInstances" in actions or (
            "ec2:CreateTags" in actions and "ec2:CreateAction" not in conditions.get("StringEquals", {})
        ):
            if conditions.get("StringEquals", {}).get("ec2:ResourceTag/ray-cluster-name") != cluster_name:
                problems.append(f"{sid}: {actions} not limited to instances tagged ray-cluster-name={cluster_name}")
        if "ec2:RunInstances" in actions and any(r.endswith(":instance/*") or r == "*" for r in resources):
            equals = conditions.get("StringEquals", {})
            if equals.get("aws:RequestTag/ray-cluster-name") != cluster_name:
                problems.append(f"{sid}: launches instances not tagged ray-cluster-name={cluster_name}")
            if equals.get("ec2:MetadataHttpTokens") != "required":
                problems.append(f"{sid}: launches instances without IMDSv2")
        if "iam:PassRole" in actions:
            if resources != [f"arn:aws:iam::*:role/{worker_role}"]:
                problems.append(f"{sid}: passes roles other than {worker_role}: {resources}")
            if conditions.get("StringEquals", {}).get("iam:PassedToService") != "ec2.amazonaws.com":
                problems.append(f"{sid}: the role may be passed to services other than EC2")
        if any(a.startswith("ecr:") and a != "ecr:GetAuthorizationToken" for a in actions):
            if any(not r.endswith(":repository/es-service") for r in resources):
                problems.append(f"{sid}: pulls from repositories other than es-service: {resources}")
    return problems


def load_policy(name: str) -> dict:
    import json

    return json.loads((IAM_DIR / name).read_text())


def test_every_aws_node_type_names_its_profile_and_requires_imdsv2():
    raw = load(CLUSTER_DIR / "config.yaml")
    assert set(raw["available_node_types"]) == set(PROFILES)
    for name, node_type in raw["available_node_types"].items():
        node_config = node_type["node_config"]
        assert node_config.get("IamInstanceProfile") == {"Name": PROFILES[name]}, name
        assert imds_problems(node_config) == [], name
    prepared = validate_like_ray(raw)  # Ray's merge with its AWS defaults keeps both
    for name, node_type in prepared["available_node_types"].items():
        assert node_type["node_config"]["IamInstanceProfile"] == {"Name": PROFILES[name]}
        assert imds_problems(node_type["node_config"]) == []


def test_ray_keeps_the_head_profile_instead_of_its_full_access_default():
    """`ray up`'s IAM step (ray.autoscaler._private.aws.config) attaches its ray-autoscaler-v1 role, with
    EC2 and S3 full access, only when the head's node_config names no profile; with ours it returns at
    once, without an AWS call (none could succeed here: no credentials, no network). Needs boto3, which
    `ray up` for AWS needs too (cluster/README.md), not the package."""
    pytest.importorskip("boto3", reason="boto3 (for `ray up` on AWS) is not installed")
    from ray.autoscaler._private.aws import config as aws_config

    prepared = validate_like_ray(load(CLUSTER_DIR / "config.yaml"))
    configured = aws_config._configure_iam_role(copy.deepcopy(prepared))
    head = configured["available_node_types"][configured["head_node_type"]]["node_config"]
    assert head["IamInstanceProfile"] == {"Name": PROFILES["head.cpu"]}
    assert "IamInstanceProfile" not in configured.get("head_node", {})


def test_the_policies_grant_what_the_autoscaler_needs_and_nothing_else():
    raw = load(CLUSTER_DIR / "config.yaml")
    cluster_name, region = raw["cluster_name"], raw["provider"]["region"]
    head = load_policy("head-policy.json")
    assert policy_problems(head, HEAD_ACTIONS, cluster_name, region, PROFILES["worker.gpu.spot"]) == []
    granted = {a for s in statements(head) for a in as_list(s["Action"])}
    assert granted == HEAD_ACTIONS  # every action there is one the autoscaler or the image pull uses
    worker = load_policy("worker-policy.json")
    assert policy_problems(worker, ECR_PULL, cluster_name, region, PROFILES["worker.gpu.spot"]) == []
    trust = load_policy("trust-policy.json")
    assert [s["Principal"] for s in statements(trust)] == [{"Service": "ec2.amazonaws.com"}]
    assert [s["Action"] for s in statements(trust)] == ["sts:AssumeRole"]


def test_iam_and_imds_checks_can_fail():
    raw = load(CLUSTER_DIR / "config.yaml")
    cluster_name, region, worker = raw["cluster_name"], raw["provider"]["region"], PROFILES["worker.gpu.spot"]
    assert imds_problems({}) and imds_problems({"MetadataOptions": {"HttpTokens": "optional"}})
    assert imds_problems({"MetadataOptions": {"HttpTokens": "required", "HttpPutResponseHopLimit": 2}})
    head = load_policy("head-policy.json")

    def mutated(change) -> list[str]:
        policy = copy.deepcopy(head)
        change(statements(policy))
        return policy_problems(policy, HEAD_ACTIONS, cluster_name, region, worker)

    assert mutated(lambda s: s.append({"Effect": "Allow", "Action": "s3:*", "Resource": "*"}))
    assert mutated(lambda s: s.append({"Effect": "Allow", "Action": "ec2:*", "Resource": "*"}))
    assert mutated(lambda s: s.append({"Effect": "Allow", "Action": "ec2:TerminateInstances", "Resource": "*"}))
    assert mutated(lambda s: s.append({"Effect": "Allow", "Action": "iam:PassRole", "Resource": "*"}))
    assert mutated(lambda s: s.append({"Effect": "Allow", "NotAction": "iam:*", "Resource": "*"}))
    assert mutated(
        lambda s: s.append(
            {"Effect": "Allow", "Action": "ec2:RunInstances", "Resource": "arn:aws:ec2:us-west-2:*:instance/*"}
        )
    )
    assert mutated(lambda s: s.append({"Effect": "Allow", "Action": "ecr:BatchGetImage", "Resource": "*"}))
    assert mutated(
        lambda s: s.append(
            {"Effect": "Allow", "Action": "ec2:DescribeInstances", "Resource": "arn:aws:ec2:eu-west-1:*:instance/*"}
        )
    )
    # the config check: a node type without the profile or IMDSv2
    config = copy.deepcopy(raw)
    del config["available_node_types"]["worker.gpu.spot"]["node_config"]["MetadataOptions"]
    assert imds_problems(config["available_node_types"]["worker.gpu.spot"]["node_config"])


def test_aws_image_has_a_fixed_tag():
    image = load(CLUSTER_DIR / "config.yaml")["docker"]["image"]
    name, _, tag = image.rpartition("/")[2].partition(":")
    assert name and tag and tag != "latest", image
