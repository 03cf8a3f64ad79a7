#!/usr/bin/env bash
# curves.png, from the repository root: validation accuracy by generation of each run in summary.json.
set -euo pipefail
python - <<'PY'
import json
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
D = "docs/results/2026-12-07-cpu-exponent"
runs = json.load(open(f"{D}/summary.json"))["runs"]
labels = {
    "ws1500_e124": "e = 124",
    "ws1500_e125": "e = 125 (the seed's)",
    "ws1500_e126": "e = 126",
    "ws1500_linear": "linear (no flushes)",
}
fig, axis = plt.subplots(figsize=(9.5, 4.2))
for color, (name, label) in zip(("C0", "C1", "C3", "C2"), labels.items()):
    for seed, style in ((0, "-"), (1, "--")):
        run = runs.get(name if seed == 0 else f"{name}_s1")
        if run is None:
            continue
        curve = sorted((int(g), v) for g, v in run["validation_by_generation"].items())
        axis.plot(*zip(*curve), style, color=color, marker="o", markersize=3, label=f"{label}, seed {seed}")
axis.set_xlabel("generation")
axis.set_ylabel("validation accuracy (10,000 held-out images)")
axis.grid(alpha=0.3)
axis.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)
axis.set_title("ES alone, unit members (configs/mnist_es_weight_space.yaml), 1500 generations\n"
               "seeds 0 (solid) and 1 (dashed), 2-core CPU, 2026-12-07", fontsize=10)
fig.tight_layout()
fig.savefig(f"{D}/curves.png", dpi=110)
PY
