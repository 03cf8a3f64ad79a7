#!/usr/bin/env bash
# curves.png, from the repository root: validation accuracy by generation of each run in summary.json.
set -euo pipefail
python - <<'PY'
import json
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
D = "docs/results/2026-12-07-cpu-architecture"
runs = json.load(open(f"{D}/summary.json"))["runs"]
labels = {"exp121": "e = 121", "exp123": "e = 123", "exp125": "e = 125 (the seed's)", "exp126": "e = 126",
          "exp127": "e = 127", "linear": "linear (no flushes)", "w256": "784-256-256-10, e = 125",
          "w128": "784-128-128-10, e = 125", "g1000_exp123": "e = 123", "g1000_exp124": "e = 124",
          "g1000_exp125": "e = 125 (the seed's)", "g1000_linear": "linear (no flushes)"}
groups = (
    ["exp121", "exp123", "exp125", "exp126", "exp127", "linear"],
    ["exp125", "w256", "w128"],
    ["g1000_exp123", "g1000_exp124", "g1000_exp125", "g1000_linear"],
)
fig, axes = plt.subplots(1, 3, figsize=(16, 4.2))
for axis, names in zip(axes, groups):
    for name in names:
        curve = sorted((int(g), v) for g, v in runs[name]["validation_by_generation"].items())
        axis.plot(*zip(*curve), marker="o", label=labels[name])
    axis.set_xlabel("generation")
    axis.grid(alpha=0.3)
    axis.legend()
axes[0].set_ylabel("validation accuracy (10,000 held-out images)")
axes[0].set_title("scale exponent, 784-512-512-10, 200 generations")
axes[1].set_title("hidden widths, 200 generations")
axes[2].set_title("1000 generations (schedules stretched), 784-512-512-10")
fig.suptitle("configs/quick.yaml (ES, rank-1 members, 128 a generation), seed 0, 2-core CPU, 2026-12-07")
fig.tight_layout()
fig.savefig(f"{D}/curves.png", dpi=110)
PY
