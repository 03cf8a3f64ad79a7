"""Diagnostic (stop 12): `es-service train --init-from CKPT`, and hold each weight matrix at most at its norm in the
starting theta (a per-layer cap), instead of es.weight_norm_cap's multiple of the He-init norm. Needs
--set es.weight_norm_cap=1.0 so the optimizer calls the cap (its value is then ignored).
From the repository root:
    python docs/results/2026-11-27-cpu-es/scripts/start_from_checkpoint_capped.py BACKPROP_RUN/checkpoint.pt train \
        --config docs/results/2026-11-26-cpu-es/long_r1_a256b256/config.yaml --set es.weight_norm_cap=1.0 --executor local --run-dir RUN
"""
import sys, math, torch
from es_service import network, strategy
CK = sys.argv[1]; sys.argv = [sys.argv[0]] + sys.argv[2:]
ck = torch.load(CK, weights_only=False, map_location="cpu")
start = (ck["theta"] if "theta" in ck else ck["state"]["theta"]).float().clone()
network.init_theta = lambda seed: start.clone()
caps = [float(torch.linalg.vector_norm(w, dtype=torch.float64)) for w in network.unflatten(start)[0::2]]
print("per-layer caps", caps, flush=True)
def cap_weight_norms(theta, multiplier):
    with torch.no_grad(), network.single_threaded():
        for weights, cap in zip(network.unflatten(theta)[0::2], caps):
            norm = float(torch.linalg.vector_norm(weights, dtype=torch.float64))
            if norm > cap:
                weights.mul_(cap / norm)
strategy.cap_weight_norms = cap_weight_norms
from es_service import cli
sys.exit(cli.main())
