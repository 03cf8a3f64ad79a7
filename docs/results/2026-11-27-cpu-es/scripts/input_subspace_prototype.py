"""Prototype (stop 12, not shipped): rank-1 members whose first-layer input factor a1 lies in the top-K
principal subspace of the training images (uncentered): a1 -> U U^T a1. W1's perturbations then move
x W1 only along directions the images occupy, and the estimate drops the rest. The driver and the
evaluator both read network.low_rank_factors, so the patch covers members and gradient alike
(in-process executor only). From the repository root:
    python docs/results/2026-11-27-cpu-es/scripts/input_subspace_prototype.py 64 train \
        --config docs/results/2026-11-26-cpu-es/long_r1_a256b256/config.yaml --executor local --run-dir RUN
"""
import sys, torch
from es_service import network, data
K = int(sys.argv[1]); sys.argv = [sys.argv[0]] + sys.argv[2:]
X = data.load_mnist().train_images.reshape(-1, 784).double() / 255
evals, evecs = torch.linalg.eigh(X.T @ X)
U = evecs[:, -K:].float().contiguous()
print("top-%d uncentered PCs hold %.4f of the images' energy" % (K, (evals[-K:].sum() / evals.sum()).item()), flush=True)
orig = network.low_rank_factors
def low_rank_factors(noise, rank):
    parts = orig(noise, rank)
    a1, b1, e1 = parts[0]
    a1 = torch.matmul(U, torch.matmul(U.T, a1))
    return [(a1, b1, e1)] + parts[1:]
network.low_rank_factors = low_rank_factors
from es_service import cli
sys.exit(cli.main())
