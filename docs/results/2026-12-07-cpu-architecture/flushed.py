"""flushed.json: the share of hidden activations the flushes zero, at quick.yaml's initialisation (seed 0)
and at each exponent's final theta, on the first 2,000 of the 10,000 held-out images.

    python docs/results/2026-12-07-cpu-architecture/flushed.py RUNS    # RUNS/exp121 ... RUNS/exp127
"""

import json
import sys
from pathlib import Path

from es_service import checkpoint, plan
from es_service.data import load_mnist
from es_workers import network
from es_workers.architecture import Architecture

runs = Path(sys.argv[1])
x = load_mnist(None).hold_out(10000).validation_images[:2000].reshape(-1, 784).float() / 255.0
out = {}
for exponent in (121, 123, 125, 126, 127):
    arch = Architecture((784, 512, 512, 10), exponent)
    thetas = {
        "init": plan.seed_theta(0, arch),
        "final": checkpoint.load(runs / f"exp{exponent}/checkpoint.pt")["theta"],
    }
    out[exponent] = {}
    for name, theta in thetas.items():
        w1, b1, w2, b2, _, _ = network.unflatten(theta, arch=arch)
        ops = network.epilogues("tf-ftz", arch=arch)
        h1 = ops.hidden1(x @ w1, b1)
        h2 = ops.hidden2(h1 @ w2, b2)
        out[exponent][name] = {
            key: round(float((h == 0).float().mean()), 4) for key, h in (("h1_zero", h1), ("h2_zero", h2))
        }
Path(__file__).with_name("flushed.json").write_text(json.dumps(out, indent=1) + "\n")
