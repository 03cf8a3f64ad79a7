"""Diagnostic (stop 12): an ES run that starts from a checkpoint's theta (e.g. a backprop run's) instead
of the seed's initialisation, with a fresh Adam. From the repository root:
    python docs/results/2026-11-27-cpu-es/scripts/start_from_checkpoint.py BACKPROP_RUN/checkpoint.pt train \
        --config docs/results/2026-11-26-cpu-es/long_r1_a256b256/config.yaml --executor local --run-dir RUN
"""
import sys, torch
from es_service import network
CK = sys.argv[1]; sys.argv = [sys.argv[0]] + sys.argv[2:]
ck = torch.load(CK, weights_only=False, map_location="cpu")
start = (ck["theta"] if "theta" in ck else ck["state"]["theta"]).float().clone()
network.init_theta = lambda seed: start.clone()
from es_service import cli
sys.exit(cli.main())
