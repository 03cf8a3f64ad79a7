"""The ablation tools: the backprop row and `es-service report`."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from es_service import checkpoint
from es_service.backprop import train_backprop
from es_service.metrics import read as read_metrics
from es_service.report import ReportError, report, summarize
from es_workers.evaluator import accuracy
from tests.helpers import run_local, tiny_config


@pytest.fixture(scope="module")
def small_mnist(mnist):
    """The first 3,000 training images: enough for a real backprop epoch in seconds; the last 1,000 held out."""
    return dataclasses.replace(
        mnist.hold_out(1000), train_images=mnist.train_images[:3000], train_labels=mnist.train_labels[:3000]
    )


def test_backprop_learns_and_writes_a_run(small_mnist, tmp_path, capsys):
    run_dir = tmp_path / "bp"
    run_dir.mkdir()
    (run_dir / "run.json").write_text(json.dumps({"method": "backprop", "status": "finished", "device": "cpu"}))
    (run_dir / "config.yaml").write_text("network: {arithmetic: tf-ftz}\n")
    record = train_backprop(tiny_config(), run_dir, small_mnist, "cpu", epochs=2, batch_size=100)
    assert record["test_accuracy"] > 0.6 and record["validation_accuracy"] > 0.6 and record["generation"] == 2
    assert f"validation {record['validation_accuracy']:.4f}" in capsys.readouterr().out.splitlines()[-1]
    assert checkpoint.load(run_dir / "checkpoint.pt")["generation"] == 2
    es_dir = tmp_path / "es"
    run_local(tiny_config(), small_mnist, es_dir)
    (es_dir / "run.json").write_text(json.dumps({"status": "finished", "device": "cpu"}))
    text = report([run_dir, es_dir], tmp_path / "curves.png")
    assert "| bp | backprop | tf-ftz |" in text and "| es | es |" in text
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert summarize(run_dir)["test_accuracy"] == record["test_accuracy"]
    # the same theta evaluated with denormals kept: the column that shows whether the flushes matter
    es_row = summarize(es_dir)
    theta = checkpoint.load(es_dir / "checkpoint.pt")["theta"]
    unflushed = accuracy(theta, small_mnist.test_images, small_mnist.test_labels, "linear")
    assert es_row["test_accuracy_unflushed"] == unflushed
    assert unflushed != accuracy(theta, small_mnist.test_images, small_mnist.test_labels, "tf-ftz")
    assert "| test, no flush |" in text and f"{100 * es_row['test_accuracy_unflushed']:.2f}%" in text


def test_backprop_continued_from_an_epochs_checkpoint_is_the_uninterrupted_run(small_mnist, tmp_path):
    """Two epochs, then a third from the second's checkpoint (theta, Adam state, epoch): the same theta and
    metrics lines, bit for bit, as three epochs in one go. The skipped epochs' orders are drawn all the same."""
    config = tiny_config()
    full, split = tmp_path / "full", tmp_path / "split"
    full.mkdir(), split.mkdir()
    train_backprop(config, full, small_mnist, "cpu", epochs=3, batch_size=100, quiet=True)
    train_backprop(config, split, small_mnist, "cpu", epochs=2, batch_size=100, quiet=True)
    with open(split / "metrics.jsonl", "a") as log:  # a line past the checkpoint, as a kill can leave
        log.write('{"generation": 3, "stale": true}\n')
    state = checkpoint.load(split / "checkpoint.pt")
    assert state["generation"] == 2
    train_backprop(
        config,
        split,
        small_mnist,
        "cpu",
        epochs=3,
        batch_size=100,
        theta=state["theta"],
        optimizer_state=state["optimizer"],
        start_epoch=2,
        quiet=True,
    )
    assert torch.equal(
        checkpoint.load(full / "checkpoint.pt")["theta"], checkpoint.load(split / "checkpoint.pt")["theta"]
    )
    drop = ("wall_s", "time")
    lines = [
        [{k: v for k, v in r.items() if k not in drop} for r in read_metrics(d / "metrics.jsonl")]
        for d in (full, split)
    ]
    assert lines[0] == lines[1] and [r["generation"] for r in lines[0]] == [1, 2, 3]


def test_report_refuses_a_directory_that_is_not_a_run(tmp_path):
    with pytest.raises(ReportError, match="not a run directory"):
        summarize(tmp_path)
