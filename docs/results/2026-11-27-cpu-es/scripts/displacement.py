"""How far each weight matrix moved from the seed's initialisation, and how much of that move is structure.

    python displacement.py OUT.json NAME=CHECKPOINT ...

For each W: the norm of the displacement D = W - W_init, and the share of ||D||^2 in D's top 10 singular
values. A matrix of i.i.d. noise of W's shape puts about 6% (784 x 512) or 7% (512 x 512) there: a
displacement at that share is a random walk, not learned features. Also the fraction of the first two
hidden layers' activations that tf-ftz flushes on the 10,000 test images.
"""

from __future__ import annotations

import argparse
import json

import torch

from es_service import checkpoint, network
from es_service.data import load_mnist


def top10_share(matrix: torch.Tensor) -> float:
    values = torch.linalg.svdvals(matrix.double())
    return float((values[:10] ** 2).sum() / (values**2).sum())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("thetas", nargs="+", help="NAME=CHECKPOINT")
    args = parser.parse_args()
    torch.manual_seed(0)
    x = load_mnist().test_images.reshape(-1, 784).float() / 255.0
    init = network.unflatten(network.init_theta(0))
    report = {"noise_top10_share": {name: top10_share(torch.randn(shape)) for name, shape in network.PARAM_SHAPES
                                    if name.startswith("W")}}
    for item in args.thetas:
        name, _, path = item.partition("=")
        params = network.unflatten(checkpoint.load(path)["theta"].float())
        ops = network.EAGER["tf-ftz"]
        h1 = ops.hidden1(x @ params[0], params[1])
        h2 = ops.hidden2(h1 @ params[2], params[3])
        row = {"checkpoint": path, "h1_flushed": float((h1 == 0).float().mean()),
               "h2_flushed": float((h2 == 0).float().mean())}
        for (layer, _), now, start in zip(network.PARAM_SHAPES, params, init):
            if layer.startswith("W"):
                row[layer] = {"norm": float(now.norm()), "displacement": float((now - start).norm()),
                              "top10_share": top10_share(now - start)}
        report[name] = row
        print(name, json.dumps(row), flush=True)
    with open(args.out, "w") as handle:
        json.dump(report, handle, indent=2)


if __name__ == "__main__":
    main()
