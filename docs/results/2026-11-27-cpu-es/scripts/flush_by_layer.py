"""Diagnostic (stop 12): which layer's flushes carry a theta's accuracy. Runs the tf-ftz network on the
10,000 test images with each layer's epilogue flushing (F) or keeping denormals (-), in all 8
combinations: "FFF" is tf-ftz, "---" the linear network, "F--" flushes only after the first layer.
Also prints each weight matrix's norm over its He-init norm, the bias norms and the fraction of zeros
in h1, h2 and the logits (tf-ftz). From the repository root, with ES_DATA_DIR or the cache set:
    python docs/results/2026-11-27-cpu-es/scripts/flush_by_layer.py RUN/checkpoint.pt [...] [--json OUT]
"""
import itertools, json, math, sys
from pathlib import Path
import torch
from es_service import checkpoint, data, network

args = sys.argv[1:]
out = args[args.index("--json") + 1] if "--json" in args else None
paths = [a for a in args if a != "--json" and a != out]
mnist = data.load_mnist()
x, y = mnist.test_images.reshape(-1, 784).float() / 255, mnist.test_labels
flushing, linear = network.epilogues("tf-ftz"), network.epilogues("linear")
he_norms = [math.sqrt(2 * fan_out) for fan_out in network.LAYER_SIZES[1:]]
results = {}
for path in paths:
    state = checkpoint.load(path)
    w1, b1, w2, b2, w3, b3 = network.unflatten(state["theta"].float())
    row = {"generation": state["generation"],
           "weight_norm_over_init": [round(float(w.norm()) / n, 3) for w, n in zip((w1, w2, w3), he_norms)],
           "bias_norms": [round(float(b.norm()), 3) for b in (b1, b2, b3)]}
    with torch.no_grad():
        for ops in itertools.product((flushing, linear), repeat=3):
            h1 = ops[0].hidden1(x @ w1, b1)
            h2 = ops[1].hidden2(h1 @ w2, b2)
            logits = ops[2].logits(h2 @ w3, b3)
            tag = "".join("F" if o is flushing else "-" for o in ops)
            row[tag] = float((logits.argmax(1) == y).float().mean())
            if tag == "FFF":
                row["zero_fraction_h1_h2_logits"] = [round(float((t == 0).float().mean()), 3) for t in (h1, h2, logits)]
    results[Path(path).parent.name] = row
    print(path, json.dumps(row))
if out:
    with open(out, "w") as f:
        json.dump(results, f, indent=1)
