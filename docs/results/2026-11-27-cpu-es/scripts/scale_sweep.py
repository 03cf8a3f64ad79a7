"""Accuracy of c * theta for a range of c: how the size of the weights sets the tf-ftz net's nonlinearity.

    python scale_sweep.py OUT.json NAME=CHECKPOINT ... [--scales 1.0,0.95,...]

Scaling theta by c < 1 shrinks every pre-activation (the biases too), so more of them fall inside the
flush threshold (|z| < 0.5 in the scaled frame). With no flushing the argmax barely moves (the linear net
is homogeneous apart from the biases). c is chosen here by *training* accuracy (all 60,000 images); the
test set is only reported, never used to choose.
"""

from __future__ import annotations

import argparse
import json

from es_service import checkpoint
from es_service.data import load_mnist
from workers.evaluator import accuracy


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("thetas", nargs="+", help="NAME=CHECKPOINT")
    parser.add_argument("--scales", default=",".join(f"{1 - 0.05 * k:.2f}" for k in range(12)))
    args = parser.parse_args()
    data = load_mnist()
    scales = [float(v) for v in args.scales.split(",")]
    report = {}
    for item in args.thetas:
        name, _, path = item.partition("=")
        theta = checkpoint.load(path)["theta"]
        rows = []
        for c in scales:
            scaled = theta * c
            rows.append({"scale": c,
                         "train_accuracy": accuracy(scaled, data.train_images, data.train_labels, "tf-ftz"),
                         "test_accuracy": accuracy(scaled, data.test_images, data.test_labels, "tf-ftz")})
            print(name, rows[-1], flush=True)
        best = max(rows, key=lambda row: (row["train_accuracy"], row["scale"]))
        report[name] = {"checkpoint": path, "rows": rows, "chosen_by_train_accuracy": best}
        print(name, "chosen by train accuracy:", best, flush=True)
    with open(args.out, "w") as handle:
        json.dump(report, handle, indent=2)


if __name__ == "__main__":
    main()
