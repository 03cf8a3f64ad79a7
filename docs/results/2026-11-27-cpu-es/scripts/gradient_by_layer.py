"""Squared norm of the masked (autograd through the flushes) gradient of the cross-entropy on the first
2048 training images, per parameter block, at each given theta ("init": the seed's initialisation).

    python gradient_by_layer.py OUT.json NAME=CHECKPOINT|init ...

W1's share of the total, over its 401,408 weights, sets ES's per-coordinate signal-to-noise there.
"""

from __future__ import annotations

import argparse
import json

import torch

from es_service import checkpoint, network
from es_service.backprop import logits_fn
from es_service.data import load_mnist


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("thetas", nargs="+", help="NAME=CHECKPOINT or NAME=init")
    args = parser.parse_args()
    data = load_mnist()
    x = data.train_images[:2048].reshape(-1, 784).float() / 255.0
    y = data.train_labels[:2048]
    logits_of = logits_fn("tf-ftz", "masked")
    report = {}
    for item in args.thetas:
        name, _, path = item.partition("=")
        theta = network.init_theta(0) if path == "init" else checkpoint.load(path)["theta"].float()
        theta = theta.clone().requires_grad_(True)
        loss = torch.nn.functional.cross_entropy(logits_of(x, network.unflatten(theta)), y)
        loss.backward()
        report[name] = {"loss": float(loss.detach()), **{block: float(grad.pow(2).sum()) for (block, _), grad
                                                 in zip(network.PARAM_SHAPES, network.unflatten(theta.grad))}}
        print(name, json.dumps(report[name]), flush=True)
    with open(args.out, "w") as handle:
        json.dump(report, handle, indent=2)


if __name__ == "__main__":
    main()
