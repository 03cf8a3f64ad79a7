"""es_service.config (pure): YAML + --set loading, every validation rule's message, the trajectory digest."""

from __future__ import annotations

import pytest
from pydantic import BaseModel, ValidationError

from es_service import config_docs
from es_service.config import Config, ConfigError, digest_of, from_dict, load, parse_override
from es_workers.network import NUM_PARAMS
from tests.helpers import REPO, TINY, write_config


def refused(data: dict, overrides: list[str] = ()) -> str:
    with pytest.raises(ConfigError) as info:
        from_dict(data, list(overrides))
    return str(info.value)


def assert_names(message: str, *parts: str) -> None:
    for part in parts:
        assert part in message, f"{part!r} missing from the message: {message}"


# ---- loading ----------------------------------------------------------------------------------------


def test_defaults_validate_and_an_empty_mapping_means_defaults():
    assert Config.model_validate(Config().to_dict()) == Config()  # every default, checked by every rule
    assert from_dict({}) == Config()


def test_shipped_configs_load():
    paths = sorted((REPO / "configs").glob("*.yaml"))
    assert paths, "no configs/*.yaml shipped"
    for path in paths:
        assert isinstance(load(path), Config), path


def test_yaml_file_with_overrides(tmp_path):
    path = write_config(tmp_path / "run.yaml", TINY)
    config = load(
        path,
        [
            "es.noise_std=0.05",
            "es.antithetic=false",
            "es.learning_rate=1",  # an int where a float is wanted: widened, stays a float
            "es.noise_std_final=null",
            "generations=7",
            "workers.count=3",
            "checkpoint.every=5",
            "seed=11",
            "seed=12",  # the last --set of a key wins
        ],
    )
    assert config.es.noise_std == 0.05 and type(config.es.noise_std) is float
    assert config.es.antithetic is False
    assert config.es.learning_rate == 1.0 and type(config.es.learning_rate) is float
    assert config.es.noise_std_final is None
    assert config.generations == 7 and type(config.generations) is int
    assert config.workers.count == 3
    assert config.checkpoint.every == 5
    assert config.seed == 12
    # Fields neither in the file's section nor overridden keep the file's values, then the defaults.
    assert config.es.pop_size == TINY["es"]["pop_size"]
    assert config.noise.table_size == TINY["noise"]["table_size"]
    assert config.es.weight_decay == Config().es.weight_decay


def test_override_creates_a_section_absent_from_the_file(tmp_path):
    path = write_config(tmp_path / "run.yaml", {"generations": 2})
    config = load(path, ["eval.train_size=500", "network.arithmetic=linear"])
    assert config.eval.train_size == 500 and config.network.arithmetic == "linear"
    assert config.generations == 2


def test_an_empty_file_is_the_defaults(tmp_path):
    (tmp_path / "empty.yaml").write_text("# nothing set\n")
    assert load(tmp_path / "empty.yaml") == Config()


def test_config_is_frozen():
    config = from_dict(TINY)
    with pytest.raises(ValidationError, match="frozen"):
        config.seed = 1  # type: ignore[misc]
    with pytest.raises(ValidationError, match="frozen"):
        config.es.noise_std = 1.0  # type: ignore[misc]


def test_to_dict_round_trips():
    config = from_dict(TINY, ["es.noise_std_final=0.01", "es.schedule=cosine"])
    assert from_dict(config.to_dict()) == config


# ---- file and --set problems ------------------------------------------------------------------------


def test_nonexistent_config_file(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load(path)
    assert_names(str(info.value), str(path), "does not exist", "--config")


def test_invalid_yaml(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("es: [unclosed\n")
    with pytest.raises(ConfigError) as info:
        load(path)
    assert_names(str(info.value), str(path), "not valid YAML")


def test_top_level_list(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- seed: 1\n- generations: 2\n")
    with pytest.raises(ConfigError) as info:
        load(path)
    assert_names(str(info.value), str(path), "expected a mapping")


@pytest.mark.parametrize(
    "content, parts",
    [
        (b"seed: 3\ngenerations: \xff\xfe\n", ["not UTF-8", "byte"]),
        (b"0\n", ["expected a mapping", "got 0"]),
        (b"[]\n", ["expected a mapping", "got []"]),
        (b"seed: 3\ngenerations: 2\nseed: 4\n", ["duplicate key 'seed'", "line 3"]),
        (b"# " + b"x" * (1 << 20) + b"\n", ["larger than 1 MiB", "a few KB"]),
        (b"es: " + b"[" * 17 + b"]" * 17 + b"\n", ["line 1, column 20", "nest more than 16 deep"]),
        (b"es: &e {w1: *e}\n", ["line 1, column 13", "alias *e lies inside the node it names"]),
        (b"seed: " + b"1" * 101 + b"\n", ["line 1, column 7", "an integer of 101 digits"]),
        (b"seed: 2001-13-45\n", ["line 1, column 7", "month must be in 1..12"]),
        (b"? {a: 1}\n: 1\n", ["line 1, column 3", "a dict used as a key"]),
    ],
    ids=[
        "not UTF-8",
        "a number",
        "an empty list",
        "a key twice",
        "past 1 MiB",
        "17 deep",
        "an alias in its own node",
        "a 101-digit integer",
        "a 13th month",
        "a mapping as a key",
    ],
)
def test_a_file_that_is_not_a_mapping_of_fields(tmp_path, content, parts):
    path = tmp_path / "c.yaml"
    path.write_bytes(content)
    with pytest.raises(ConfigError) as info:
        load(path)
    assert_names(str(info.value), str(path), *parts)


def test_a_merged_key_may_be_overridden(tmp_path):
    """`<<:` merges keys (YAML 1.1), and a key of the mapping itself wins over a merged one: no duplicate."""
    path = tmp_path / "c.yaml"
    path.write_text("es:\n  <<: {pop_size: 8, batch_size: 64}\n  pop_size: 16\n")
    es = load(path).es
    assert (es.pop_size, es.batch_size) == (16, 64)


def test_a_directory_is_not_a_config_file(tmp_path):
    with pytest.raises(ConfigError) as info:
        load(tmp_path)
    assert_names(str(info.value), str(tmp_path), "is a directory", "--config")


@pytest.mark.parametrize(
    "text, parts",
    [
        ("es.noise_std", ["--set 'es.noise_std'", "expected key=value"]),
        ("=3", ["'=3'", "empty key"]),
        ("es..noise_std=0.1", ["'es..noise_std=0.1'", "empty key"]),
    ],
)
def test_malformed_override(text, parts):
    with pytest.raises(ConfigError) as info:
        parse_override(text)
    assert_names(str(info.value), *parts)
    assert_names(refused(TINY, [text]), *parts)


@pytest.mark.parametrize(
    "text, parts",
    [
        ("seed=[1", ["'seed=[1'", "not valid YAML"]),
        ("seed=!!python/object/apply:os.getpid []", ["not valid YAML", "python/object"]),  # safe loading: no tag runs
    ],
)
def test_override_value_that_is_not_yaml(text, parts):
    assert_names(refused(TINY, [text]), *parts)


def test_override_into_a_scalar_is_refused():
    assert_names(refused(TINY, ["seed.low=1"]), "seed.low=1", "seed is not a section")


def test_override_values_are_yaml_typed():
    assert parse_override("es.antithetic=false") == (["es", "antithetic"], False)
    assert parse_override("es.noise_std=0.5") == (["es", "noise_std"], 0.5)
    assert parse_override("es.noise_std_final=null") == (["es", "noise_std_final"], None)
    assert parse_override("es.noise_std_final=") == (["es", "noise_std_final"], None)
    assert parse_override("data_dir=/a=b") == (["data_dir"], "/a=b")  # only the first '=' splits
    assert parse_override("network.arithmetic=linear") == (["network", "arithmetic"], "linear")


# ---- structure and types (_build) -------------------------------------------------------------------

TYPE_CASES = {
    "unknown top-level key": ({"sed": 1}, ["sed", "unknown field", "seed", "generations"]),
    "unknown nested key": ({"es": {"noise_sd": 0.1}}, ["es.noise_sd", "unknown field", "noise_std"]),
    "unknown section": ({"optimizer": {"lr": 1}}, ["optimizer", "unknown field", "es"]),
    "section not a mapping": ({"es": 5}, ["es", "expected a mapping", "5"]),
    "string for int": ({"es": {"pop_size": "eight"}}, ["es.pop_size", "expected an integer", "'eight'"]),
    "bool for int": ({"es": {"pop_size": True}}, ["es.pop_size", "expected an integer", "True"]),
    "float for int": ({"es": {"pop_size": 8.5}}, ["es.pop_size", "expected an integer", "8.5"]),
    "integral float for int": ({"generations": 4.0}, ["generations", "expected an integer", "4.0"]),
    "null for int": ({"seed": None}, ["seed", "expected an integer", "None"]),
    "string for float": ({"es": {"noise_std": "big"}}, ["es.noise_std", "expected a number", "'big'"]),
    "bool for float": ({"es": {"noise_std": True}}, ["es.noise_std", "expected a number", "True"]),
    "string for optional float": ({"es": {"noise_std_final": "x"}}, ["es.noise_std_final", "expected a number", "'x'"]),
    "string for bool": ({"es": {"antithetic": "yes"}}, ["es.antithetic", "expected true or false", "'yes'"]),
    "int for bool": ({"es": {"antithetic": 1}}, ["es.antithetic", "expected true or false", "1"]),
    "int for string": ({"network": {"arithmetic": 5}}, ["network.arithmetic", "expected a string", "5"]),
    "list for string": ({"data_dir": ["a"]}, ["data_dir", "expected a string", "['a']"]),
}


@pytest.mark.parametrize("data, parts", TYPE_CASES.values(), ids=TYPE_CASES.keys())
def test_structure_and_type_errors(data, parts):
    merged = {**TINY, **data}
    for name, fields in data.items():  # a section's fields go in beside TINY's own
        if isinstance(fields, dict) and isinstance(TINY.get(name), dict):
            merged[name] = {**TINY[name], **fields}
    assert_names(refused(merged), *parts)


def test_type_errors_through_set():
    assert_names(refused(TINY, ["es.pop_size=eight"]), "es.pop_size", "expected an integer", "'eight'")
    assert_names(refused(TINY, ["es.pop_size=8.0"]), "es.pop_size", "expected an integer", "8.0")
    assert_names(refused(TINY, ["workers.count=true"]), "workers.count", "expected an integer", "True")
    assert_names(refused(TINY, ["es.noise_sd=0.1"]), "es.noise_sd", "unknown field", "noise_std")


# ---- value ranges and cross-field rules ------------------------------------------------------------

RANGE_CASES = {
    "negative seed": (["seed=-1"], ["seed", "-1", ">= 0"]),
    "zero generations": (["generations=0"], ["generations", "0", ">= 1"]),
    "unknown arithmetic": (
        ["network.arithmetic=fast"],
        ["network.arithmetic", "'fast'", "tf-ftz", "linear", "cpu-ftz"],
    ),
    "cpu-ftz with gpus": (
        ["network.arithmetic=cpu-ftz", "workers.gpus_per_worker=0.5"],
        ["network.arithmetic", "cpu-ftz", "gpus_per_worker", "set_flush_denormal does nothing on CUDA", "tf-ftz"],
    ),
    "cpu-ftz on cuda": (
        ["network.arithmetic=cpu-ftz", "workers.device=cuda"],
        ["network.arithmetic", "cpu-ftz", "workers.device", "cuda", "set_flush_denormal does nothing on CUDA"],
    ),
    "pop of one": (["es.pop_size=1", "es.antithetic=false"], ["es.pop_size", "1", ">= 2"]),
    "odd pop with antithetic": (["es.pop_size=7"], ["es.pop_size", "7", "odd", "antithetic", "even"]),
    "zero sigma": (["es.noise_std=0"], ["es.noise_std", "0", "> 0"]),
    "negative sigma": (["es.noise_std=-0.02"], ["es.noise_std", "-0.02", "> 0"]),
    "zero final sigma": (["es.noise_std_final=0"], ["es.noise_std_final", "0", "> 0"]),
    "zero learning rate": (["es.learning_rate=0"], ["es.learning_rate", "0", "> 0"]),
    "negative final learning rate": (["es.learning_rate_final=-1"], ["es.learning_rate_final", "-1", "> 0"]),
    "nan sigma": (["es.noise_std=.nan"], ["es.noise_std", "nan", "> 0"]),
    "sigma that overflows float32": (["es.noise_std=1e-50"], ["es.noise_std", "1e-50", "float32"]),
    "huge learning rate": (["es.learning_rate=1e30"], ["es.learning_rate", "1e+30", "at most 10"]),
    "negative weight decay": (["es.weight_decay=-0.1"], ["es.weight_decay", "-0.1", ">= 0"]),
    "unknown fitness": (["es.fitness=mse"], ["es.fitness", "'mse'", "cross_entropy", "accuracy"]),
    "unknown schedule": (["es.schedule=exp"], ["es.schedule", "'exp'", "constant", "linear", "cosine"]),
    "zero batch": (["es.batch_size=0"], ["es.batch_size", "0", "1 to 60000"]),
    "batch above MNIST": (["es.batch_size=60001"], ["es.batch_size", "60001", "1 to 60000"]),
    "final batch above MNIST": (["es.batch_size_final=70000"], ["es.batch_size_final", "70000", "1 to 60000"]),
    "negative shard": (["es.shard_size=-8"], ["es.shard_size", "-8", "positive integer"]),
    "negative rank": (["es.rank=-1"], ["es.rank", "-1", "0 (full-rank", "1 to 64"]),
    "rank too high": (["es.rank=65"], ["es.rank", "65", "1 to 64"]),
    "beta1 of one": (["es.adam_beta1=1"], ["es.adam_beta1", "1", "[0, 1)"]),
    "negative beta2": (["es.adam_beta2=-0.5"], ["es.adam_beta2", "-0.5", "[0, 1)"]),
    "odd layer population": (["es.w3.pop_size=7"], ["es.w3.pop_size", "7", "even"]),
    "layer members with cpu-ftz": (
        ["es.w2.pop_size=8", "network.arithmetic=cpu-ftz"],
        ["es.w2.pop_size", "cpu-ftz", "tf-ftz"],
    ),
    "layer sigma scale zero": (["es.w1.noise_scale=0"], ["es.w1.noise_scale", "0", "> 0"]),
    "subspace past the pixels": (["es.w1.subspace=785"], ["es.w1.subspace", "785", "784"]),
    "a subspace power past 2": (
        ["es.w1.subspace=32", "es.w1.subspace_power=3"],
        ["es.w1.subspace_power", "3", "-2 to 2"],
    ),
    "a subspace power with no subspace": (
        ["es.w1.subspace_power=0.5"],
        ["es.w1.subspace_power", "es.w1.subspace 0", "subspace_power: 0"],
    ),
    "a layer-2 subspace past its inputs": (
        ["es.w1.subspace=32", "es.w2.kind=unit", "es.w2.subspace=513"],
        ["es.w2.subspace", "513", "1 to 512"],
    ),
    "a layer-2 subspace for rank-1 members": (
        ["es.w1.pop_size=8", "es.w1.subspace=32", "es.w2.subspace=16"],
        ["es.w2.subspace", "'rank1'", "es.w2.kind: unit"],
    ),
    "a layer-2 subspace wider than layer 1's": (
        ["es.w1.pop_size=8", "es.w1.subspace=16", "es.w2.kind=unit", "es.w2.subspace=32"],
        ["es.w2.subspace", "es.w1.subspace 16", "es.w1.subspace >= 32"],
    ),
    "a layer-2 subspace with no layer-1 members": (
        ["es.w2.kind=unit", "es.w2.subspace=32"],
        ["es.w2.subspace", "es.w1.pop_size 0", "es.w1.pop_size > 0"],
    ),
    "unknown member kind": (["es.w2.kind=column"], ["es.w2.kind", "column", "rank1, unit"]),
    "no unit members for layer 3": (["es.w3.kind=unit"], ["es.w3.kind", "'unit'", "full", "activity"]),
    "a layer with no members": (
        ["es.pop_size=0", "es.w1.pop_size=8", "es.w3.pop_size=8"],
        ["es.pop_size", "layer 2", "es.w2.pop_size"],
    ),
    "zero norm cap": (["es.weight_norm_cap=0"], ["es.weight_norm_cap", "null", "> 0"]),
    "infinite norm cap": (["es.weight_norm_cap=.inf"], ["es.weight_norm_cap", "finite"]),
    "low rank with cpu-ftz": (["es.rank=1", "network.arithmetic=cpu-ftz"], ["es.rank", "cpu-ftz", "tf-ftz"]),
    "shared first layer with low rank": (
        ["es.shared_first_layer=true", "es.rank=1"],
        ["es.shared_first_layer", "es.rank: 1", "already share", "false"],
    ),
    "shared first layer with cpu-ftz": (
        ["es.shared_first_layer=true", "network.arithmetic=cpu-ftz"],
        ["es.shared_first_layer", "cpu-ftz", "tf-ftz"],
    ),
    "zero members per tile": (["workers.members_per_tile=0"], ["members_per_tile", "0", ">= 1"]),
    "table not above the parameter count": (
        [f"noise.table_size={NUM_PARAMS}"],
        ["noise.table_size", str(NUM_PARAMS), "must exceed"],
    ),
    "table too large": ([f"noise.table_size={(1 << 31) + 1}"], ["noise.table_size", str((1 << 31) + 1), "at most"]),
    "unknown executor": (["workers.executor=k8s"], ["workers.executor", "'k8s'", "ray", "local"]),
    "unknown device": (["workers.device=tpu"], ["workers.device", "'tpu'", "auto", "cpu", "cuda"]),
    "negative count": (["workers.count=-1"], ["workers.count", "-1", "0 (auto)"]),
    "zero min count": (["workers.min_count=0"], ["workers.min_count", "0", ">= 1"]),
    "max below min": (
        ["workers.min_count=4", "workers.max_count=2"],
        ["workers.max_count", "2", "workers.min_count", "4"],
    ),
    "zero cpus per worker": (["workers.cpus_per_worker=0"], ["workers.cpus_per_worker", "0", ">= 1"]),
    "negative gpus per worker": (["workers.gpus_per_worker=-1"], ["workers.gpus_per_worker", "-1", ">= 0"]),
    "infinite gpus per worker": (["workers.gpus_per_worker=.inf"], ["workers.gpus_per_worker", "inf", "finite"]),
    "zero tile timeout": (["workers.tile_timeout_s=0"], ["workers.tile_timeout_s", "0", "> 0"]),
    "infinite tile timeout": (["workers.tile_timeout_s=.inf"], ["workers.tile_timeout_s", "inf", "finite"]),
    "zero no-worker timeout": (["workers.no_worker_timeout_s=0"], ["workers.no_worker_timeout_s", "0", "> 0"]),
    "zero eval interval": (["eval.every=0"], ["eval.every", "0", ">= 1"]),
    "eval train size above MNIST": (["eval.train_size=60001"], ["eval.train_size", "60001", "up to 60000"]),
    "zero checkpoint interval": (["checkpoint.every=0"], ["checkpoint.every", "0", ">= 1"]),
    "negative validation": (["validation_size=-1"], ["validation_size", "-1", "0 (none) up to 50000"]),
    "validation leaving too little training": (["validation_size=50001"], ["validation_size", "50001", "10,000"]),
    "eval train size above what validation leaves": (
        ["validation_size=10000", "eval.train_size=55000"],
        ["eval.train_size", "55000", "50000", "validation_size", "0 (all"],
    ),
    "negative warm-start epochs": (["warm_start.epochs=-1"], ["warm_start.epochs", "-1", "0 (none)"]),
    "fine-tuning without warm start": (
        ["warm_start.finetune_epochs=10"],
        ["warm_start.finetune_epochs", "10", "warm_start.epochs 0", ">= 1"],
    ),
    "zero warm-start step": (
        ["warm_start.epochs=1", "warm_start.learning_rate=0"],
        ["warm_start.learning_rate", "> 0"],
    ),
    "zero warm-start batch": (["warm_start.batch_size=0"], ["warm_start.batch_size", "0", "1 to 60000"]),
    "unknown warm-start gradient": (
        ["warm_start.gradient=sign"],
        ["warm_start.gradient", "'sign'", "masked", "straight-through"],
    ),
    "activity members, not one pair per unit": (
        ["es.w2.pop_size=1000", "es.w2.kind=activity"],
        ["es.w2.pop_size", "1000", "activity", "es.w2.pop_size: 1024"],
    ),
    "activity members of the output layer": (
        ["es.w3.pop_size=64", "es.w3.kind=activity"],
        ["es.w3.pop_size", "64", "es.w3.pop_size: 20"],
    ),
    "activity members in a subspace": (
        ["es.w1.pop_size=1024", "es.w1.kind=activity", "es.w1.subspace=32"],
        ["es.w1.subspace", "32", "activity", "es.w1.subspace: 0"],
    ),
    "warm start with cpu-ftz": (
        ["warm_start.epochs=1", "network.arithmetic=cpu-ftz"],
        ["warm_start", "cpu-ftz", "tf-ftz"],
    ),
}


@pytest.mark.parametrize("overrides, parts", RANGE_CASES.values(), ids=RANGE_CASES.keys())
def test_range_errors(overrides, parts):
    assert_names(refused(TINY, overrides), *parts)


@pytest.mark.parametrize(
    "overrides",
    [
        ["es.pop_size=7", "es.antithetic=false"],  # odd is fine without mirrored pairs
        ["es.pop_size=2"],
        [f"noise.table_size={NUM_PARAMS + 1}"],
        ["noise.table_size=2147483648"],
        ["es.batch_size=1", "es.batch_size_final=60000"],
        ["eval.train_size=0", "eval.train_size=60000"],
        ["network.arithmetic=cpu-ftz", "workers.device=cpu", "workers.gpus_per_worker=0"],
        ["network.arithmetic=tf-ftz", "workers.device=cuda", "workers.gpus_per_worker=1"],
        ["workers.min_count=3", "workers.max_count=3"],
        ["seed=0", "es.weight_decay=0", "es.shard_size=0", "workers.count=0"],
        ["es.rank=1", "network.arithmetic=linear"],
        ["es.rank=64"],
        ["es.shared_first_layer=true", "network.arithmetic=linear", "es.antithetic=false", "es.pop_size=3"],
        ["validation_size=0", "validation_size=50000"],
    ],
)
def test_boundary_values_are_accepted(overrides):
    config = from_dict(TINY, overrides)
    assert isinstance(config, Config)


def test_of_several_problems_the_first_in_the_file_is_reported():
    """Problems of structure and type before broken rules (a value of the wrong type meets no rule), each
    kind in the order a reader meets it."""
    assert_names(refused(TINY, ["es.pop_size=7", "seed=-1"]), "seed: -1 is negative")
    assert_names(refused(TINY, ["es.w2.pop_size=7", "es.w1.noise_scale=0"]), "es.w1.noise_scale: 0")
    assert_names(refused(TINY, ["seed=-1", "checkpoint.every=x"]), "checkpoint.every", "expected an integer")


def test_odd_population_without_antithetic_keeps_its_size():
    config = from_dict(TINY, ["es.pop_size=7", "es.antithetic=false"])
    assert config.es.pop_size == 7 and config.es.antithetic is False


# ---- digest -----------------------------------------------------------------------------------------


def digest(*overrides: str) -> str:
    return from_dict(TINY, list(overrides)).digest()


def test_digest_is_stable():
    assert digest() == digest() == from_dict(TINY).digest()
    assert len(digest()) == 16 and int(digest(), 16) >= 0


@pytest.mark.parametrize(
    "override",
    [
        "seed=4",
        "es.noise_std=0.03",
        "es.noise_std_final=0.01",
        "es.learning_rate=0.02",
        "es.pop_size=6",
        "es.antithetic=false",
        "es.batch_size=32",
        "es.fitness=accuracy",
        "es.weight_decay=0.001",
        "network.arithmetic=linear",
        "noise.table_size=2097152",
    ],
)
def test_digest_changes_with_a_trajectory_field(override):
    assert digest(override) != digest()


def test_a_field_added_later_changes_the_digest_only_when_set():
    """es.w3.kind came after runs were recorded: at its default the digest is the one taken before it
    existed (the dict without it); set, it is part of the trajectory."""
    data = from_dict(TINY, ["es.w3.pop_size=20"]).to_dict()
    del data["es"]["w3"]["kind"]
    assert digest_of(data) == digest("es.w3.pop_size=20")
    assert digest("es.w3.pop_size=20", "es.w3.kind=activity") != digest("es.w3.pop_size=20")


@pytest.mark.parametrize(
    "override",
    [
        "generations=50",
        "data_dir=/elsewhere",
        "workers.executor=ray",
        "workers.device=auto",
        "workers.count=5",
        "workers.members_per_tile=1",
        "workers.gpus_per_worker=1",
        "workers.tile_timeout_s=5",
        "eval.every=1",
        "eval.train_size=0",
        "checkpoint.every=1",
    ],
)
def test_digest_ignores_where_and_how_often(override):
    assert digest(override) == digest()


# ---- the generated reference ------------------------------------------------------------------------


def test_configuration_reference_is_generated_from_the_models():
    path = REPO / "docs" / "configuration.md"
    assert path.read_text(encoding="utf-8") == config_docs.render(), (
        f"docs/configuration.md is stale: regenerate it with `{config_docs.COMMAND}`"
    )


def test_every_field_has_a_description_for_the_reference():
    for path, _, model in config_docs.sections(Config, "", None):
        for name, field in model.model_fields.items():
            assert isinstance(field.default, BaseModel) or field.description, f"{path}{name} has no docstring"
    text = config_docs.render()
    assert "| `es.w1.subspace` | int | 0 |" in text and "| `es.noise_std_final` | float \\| null | null |" in text
