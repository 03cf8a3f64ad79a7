"""Prototype (stop 12, not shipped): Polyak averages (EMA, decays 0.99, 0.995, 0.998) of the center theta,
scored beside the center at each evaluation. The run's theta is untouched (it matched long_r1_a256b256
bit for bit). From the repository root:
    python docs/results/2026-11-27-cpu-es/scripts/ema_prototype.py OUT.jsonl train \
        --config docs/results/2026-11-26-cpu-es/long_r1_a256b256/config.yaml --executor local --run-dir RUN
"""
import sys, json, torch
from es_service import driver
from workers.evaluator import center_accuracies
OUT = sys.argv[1]; sys.argv = [sys.argv[0]] + sys.argv[2:]
DECAYS = (0.99, 0.995, 0.998)
emas = {}
orig_step = driver.Trainer.step
def step(self, evaluate=False):
    record = orig_step(self, evaluate)
    theta = self.theta
    for d in DECAYS:
        if d not in emas: emas[d] = theta.clone()
        else: emas[d].mul_(d).add_(theta, alpha=1 - d)
    if "test_accuracy" in record:
        line = {"generation": record["generation"], "center": {k: record[k] for k in record if k.endswith("accuracy") or k.endswith("unflushed")}}
        for d, e in emas.items():
            line[str(d)] = center_accuracies(e, self.eval_sets, self.config.network.arithmetic, fused=True)
        with open(OUT, "a") as f: f.write(json.dumps(line) + "\n")
    return record
driver.Trainer.step = step
from es_service import cli
sys.exit(cli.main())
