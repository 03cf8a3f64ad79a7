"""es_service.checkpoint (pure): one dict, saved atomically, loaded only when layout and config hash match."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch

from es_service import checkpoint
from es_service.checkpoint import CheckpointError
from es_service.strategy import AdamES
from es_workers import network
from tests.helpers import tiny_config

NOISE_SEED = 123456789


@pytest.fixture(scope="module")
def config():
    return tiny_config("es.weight_decay=0.001")


@pytest.fixture(scope="module")
def trained(config):
    """theta and Adam after two steps: non-trivial moments, with -0.0 and a subnormal planted in theta."""
    theta = network.init_theta(config.seed)
    theta[0] = -0.0
    theta[1] = 1e-40  # subnormal: must survive bit for bit
    adam = AdamES(theta, config.es.learning_rate, config.es.weight_decay)
    generator = torch.Generator().manual_seed(0)
    for _ in range(2):
        adam.step(torch.randn(network.NUM_PARAMS, generator=generator), config.es.learning_rate)
    adam.theta.detach()[0] = -0.0
    adam.theta.detach()[1] = 1e-40
    return adam


def build_state(config, adam, generation=5):
    return checkpoint.build(config, adam.theta.detach(), adam.state_dict(), generation, NOISE_SEED)


@pytest.fixture
def saved(tmp_path, config, trained):
    path = tmp_path / "checkpoint.pt"
    checkpoint.save(build_state(config, trained), path)
    return path


def bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous().view(torch.int32)


def test_round_trip(saved, config, trained):
    state = checkpoint.load(saved)
    theta = state["theta"]
    assert theta.dtype == torch.float32 and theta.shape == (network.NUM_PARAMS,)
    assert torch.equal(bits(theta), bits(trained.theta.detach()))
    assert bits(theta)[0].item() == bits(torch.tensor([-0.0]))[0].item()
    assert state["generation"] == 5
    assert state["config"] == config
    assert state["config_digest"] == config.digest()
    assert state["noise"] == {"seed": NOISE_SEED, "table_size": config.noise.table_size}
    assert state["rng"]["seed"] == config.seed


def test_round_trip_optimizer_continues_identically(saved, config, trained):
    """The restored Adam state takes exactly the step the original would have taken."""
    state = checkpoint.load(saved)
    original = AdamES(trained.theta.detach(), config.es.learning_rate, config.es.weight_decay)
    original.load_state_dict(trained.state_dict())
    restored = AdamES(state["theta"], config.es.learning_rate, config.es.weight_decay)
    restored.load_state_dict(state["optimizer"])
    saved_moments = state["optimizer"]["state"][0]
    live_moments = trained.state_dict()["state"][0]
    assert float(saved_moments["step"]) == float(live_moments["step"]) == 2
    assert torch.equal(saved_moments["exp_avg"], live_moments["exp_avg"])
    assert torch.equal(saved_moments["exp_avg_sq"], live_moments["exp_avg_sq"])
    grad = torch.randn(network.NUM_PARAMS, generator=torch.Generator().manual_seed(1))
    original.step(grad, config.es.learning_rate)
    restored.step(grad, config.es.learning_rate)
    assert torch.equal(bits(original.theta.detach()), bits(restored.theta.detach()))
    # A fresh Adam (no moments) would step differently: the comparison above can fail.
    fresh = AdamES(state["theta"], config.es.learning_rate, config.es.weight_decay)
    fresh.step(grad, config.es.learning_rate)
    assert not torch.equal(fresh.theta.detach(), original.theta.detach())


def test_build_copies_theta(config, trained):
    theta = trained.theta.detach().clone()
    state = checkpoint.build(config, theta, trained.state_dict(), 1, NOISE_SEED)
    theta += 1.0
    assert not torch.equal(state["theta"], theta)


def test_save_overwrites_and_leaves_no_temporary(saved, config, trained):
    checkpoint.save(build_state(config, trained, generation=6), saved)
    assert checkpoint.load(saved)["generation"] == 6
    assert [p.name for p in saved.parent.iterdir()] == ["checkpoint.pt"]


def test_save_creates_missing_parents(tmp_path, config, trained):
    path = tmp_path / "a" / "b" / "checkpoint.pt"
    checkpoint.save(build_state(config, trained), path)
    assert checkpoint.load(path)["generation"] == 5
    assert [p.name for p in path.parent.iterdir()] == ["checkpoint.pt"]


def test_failed_save_keeps_the_old_checkpoint(saved, config, trained):
    before = saved.read_bytes()
    bad = build_state(config, trained, generation=9)
    bad["unpicklable"] = lambda: None  # torch.save cannot pickle a lambda: fails mid-write
    with pytest.raises((AttributeError, pickle.PicklingError)):  # a local lambda: "Can't pickle local object"
        checkpoint.save(bad, saved)
    assert saved.read_bytes() == before
    assert checkpoint.load(saved)["generation"] == 5
    assert [p.name for p in saved.parent.iterdir()] == ["checkpoint.pt"]


def test_failed_first_save_leaves_nothing(tmp_path, config, trained):
    bad = build_state(config, trained)
    bad["unpicklable"] = lambda: None
    with pytest.raises((AttributeError, pickle.PicklingError)):  # a local lambda: "Can't pickle local object"
        checkpoint.save(bad, tmp_path / "checkpoint.pt")
    assert list(tmp_path.iterdir()) == []


# ---- refusals ---------------------------------------------------------------------------------------


def refusal(path) -> str:
    with pytest.raises(CheckpointError) as info:
        checkpoint.load(path)
    message = str(info.value)
    assert str(path) in message, message
    return message


def resave(path, config, trained, edit) -> None:
    """Write a checkpoint altered by edit(state) with plain torch.save, as a foreign tool would."""
    state = build_state(config, trained)
    edit(state)
    torch.save(state, path)


def test_missing_file(tmp_path):
    assert "does not exist" in refusal(tmp_path / "absent.pt")


def test_a_directory_is_not_a_checkpoint(tmp_path):
    assert "is a directory" in refusal(tmp_path) and "checkpoint.pt" in refusal(tmp_path)


def test_garbage_file(tmp_path):
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(b"this is not a checkpoint\n" * 10)
    assert "cannot be read" in refusal(path)


def test_truncated_file(saved):
    data = saved.read_bytes()
    saved.write_bytes(data[: len(data) // 2])
    assert "cannot be read" in refusal(saved)


def test_other_format_version(tmp_path, config, trained):
    path = tmp_path / "checkpoint.pt"
    resave(path, config, trained, lambda state: state.update(format_version=checkpoint.FORMAT_VERSION + 1))
    assert f"format {checkpoint.FORMAT_VERSION}" in refusal(path)


def test_not_a_dict(tmp_path):
    path = tmp_path / "checkpoint.pt"
    torch.save(torch.zeros(network.NUM_PARAMS), path)
    assert "not an es-service checkpoint" in refusal(path)


def test_wrong_theta_shape(tmp_path, config, trained):
    path = tmp_path / "checkpoint.pt"
    resave(path, config, trained, lambda state: state.update(theta=state["theta"][:-10]))
    assert "parameter layout" in refusal(path)


def test_wrong_layout(tmp_path, config, trained):
    path = tmp_path / "checkpoint.pt"
    resave(path, config, trained, lambda state: state.update(layout=[["W1", [784, 256]]]))
    assert "parameter layout" in refusal(path)


def test_wrong_theta_dtype(tmp_path, config, trained):
    path = tmp_path / "checkpoint.pt"
    resave(path, config, trained, lambda state: state.update(theta=state["theta"].double()))
    message = refusal(path)
    assert "float64" in message and "float32" in message


def test_config_edited_after_hashing(tmp_path, config, trained):
    path = tmp_path / "checkpoint.pt"
    resave(path, config, trained, lambda state: state["config"]["es"].update(noise_std=0.05))
    assert "does not match its digest" in refusal(path)


def test_digest_edited(tmp_path, config, trained):
    path = tmp_path / "checkpoint.pt"
    resave(path, config, trained, lambda state: state.update(config_digest="0" * 16))
    assert "does not match its digest" in refusal(path)


def test_invalid_config_inside(tmp_path, config, trained):
    path = tmp_path / "checkpoint.pt"
    resave(path, config, trained, lambda state: state["config"]["es"].update(pop_size=7))
    message = refusal(path)
    assert "invalid config" in message and "es.pop_size" in message


def test_edits_that_keep_the_trajectory_are_accepted(tmp_path, config, trained):
    """workers/eval/generations are outside the digest: a checkpoint edited there still loads."""
    path = tmp_path / "checkpoint.pt"

    def edit(state):
        state["config"]["workers"]["count"] = 7
        state["config"]["eval"]["every"] = 1
        state["config"]["generations"] = 99

    resave(path, config, trained, edit)
    loaded = checkpoint.load(path)["config"]
    assert loaded.workers.count == 7 and loaded.generations == 99


def test_a_checkpoint_from_before_newer_fields_still_loads(tmp_path, config, trained):
    """Checkpoints written before es.fitness_shaping and es.rank existed (the 2026-11-26 GPU runs) hold a config
    without them, hashed without them. They ran with what is now the default, so they must load as that."""
    import hashlib
    import json

    def written_by_the_old_version(state):
        for name in ("fitness_shaping", "rank"):
            del state["config"]["es"][name]
        del state["config"]["es"]["w3"]["kind"]  # newer still
        del state["config"]["network"]["layer_sizes"], state["config"]["network"]["scale_exponent"]  # newest
        data = json.loads(json.dumps(state["config"]))  # the old writer's digest, literally
        data.pop("workers"), data.pop("data_dir"), data.pop("generations")
        data["eval"] = data["checkpoint"] = None
        state["config_digest"] = hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]

    path = tmp_path / "checkpoint.pt"
    resave(path, config, trained, written_by_the_old_version)
    loaded = checkpoint.load(path)["config"]
    assert loaded == config and loaded.es.rank == 0 and loaded.es.fitness_shaping == "centered_rank"


@pytest.mark.parametrize(
    "edit, expected",
    [
        (lambda state: state.update(generation=-3), "generation is -3"),
        (lambda state: state.update(generation=True), "generation is True"),
        (lambda state: state.pop("noise"), "noise is None"),
        (lambda state: state["noise"].update(seed="7"), "noise is"),
        (lambda state: state["noise"].update(table_size=99), "noise.table_size is 99"),
        (lambda state: state.update(optimizer=[]), "optimizer is not the state"),
        (lambda state: state["optimizer"]["state"][0].update(exp_avg_sq=torch.zeros(3, 3)), "exp_avg_sq is (3, 3)"),
        (lambda state: state["theta"].__setitem__(4, float("inf")), "theta with inf or nan"),
        (
            lambda state: state["optimizer"]["state"][0]["exp_avg"].__setitem__(0, float("nan")),
            "optimizer state with inf",
        ),
    ],
)
def test_every_field_is_checked(tmp_path, config, trained, edit, expected):
    path = tmp_path / "checkpoint.pt"
    state = copy.deepcopy(build_state(config, trained))  # an edit must not reach the shared optimizer state
    edit(state)
    torch.save(state, path)
    assert expected in refusal(path)
