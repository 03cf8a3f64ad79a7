"""Prototype (stop 14, not shipped): every K generations, replace W1's and W2's displacement from the
seed's initialisation by its top-R singular part, discarding the rest as ES's random walk (the
displacement of every ES-from-scratch theta has i.i.d. noise's spectrum; see displacement.py).
Pure ES: no gradients but ES's. From the repository root:
    DENOISE_EVERY=100 DENOISE_RANK=32 python docs/results/2026-11-27-cpu-es/scripts/lowrank_denoise_prototype.py \
        train --config docs/results/2026-11-26-cpu-es/long_r1_a256b256/config.yaml --executor local --run-dir RUN
"""
import os, sys, torch
from es_service import driver, network
EVERY = int(os.environ.get("DENOISE_EVERY", "100")); RANK = int(os.environ.get("DENOISE_RANK", "32"))
init = None
orig_step = driver.Trainer.step
def step(self, evaluate=False):
    global init
    if init is None:
        init = network.unflatten(driver.planning.seed_theta(self.config.seed))
    record = orig_step(self, evaluate)
    if self.generation % EVERY == 0:
        params = network.unflatten(self.adam.theta.data)
        for k in (0, 2):
            d = (params[k] - init[k]).double()
            u, s, vh = torch.linalg.svd(d, full_matrices=False)
            kept = (u[:, :RANK] * s[:RANK]) @ vh[:RANK]
            record[f"denoise_kept_share_{network.PARAM_SHAPES[k][0]}"] = float((s[:RANK] ** 2).sum() / (s ** 2).sum())
            params[k].copy_((init[k].double() + kept).float())
    return record
driver.Trainer.step = step
from es_service import cli
sys.exit(cli.main())
