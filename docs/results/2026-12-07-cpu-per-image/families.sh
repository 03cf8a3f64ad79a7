#!/usr/bin/env bash
# The plot families.png, from the repository root: validation against compute for each family.
set -euo pipefail
D=docs/results/2026-12-07-cpu-per-image
R=docs/results
python -m benchmarks.families plot --out "$D/families.png" \
  "activity perturbation (forward-only), one unit at a time=$D/activity_1000_seed0_val,$D/activity_2000_seed0_val" \
  "ES, weight space (the seed's method), unit members=$R/2026-11-30-cpu-es/summary.json:unit_members_4096_4096_1024_k32_300gen_lr0.003,$R/2026-11-30-cpu-es/summary.json:unit_members_4096_4096_1024_k32_600gen,$R/2026-11-30-cpu-es/summary.json:unit_members_4096_4096_1024_k32_3000gen,$R/2026-12-01-cpu-es/summary.json:unit_members_4096_4096_1024_k32_6000gen,$R/2026-12-01-cpu-es/summary.json:unit_members_16384_16384_1024_600gen"
