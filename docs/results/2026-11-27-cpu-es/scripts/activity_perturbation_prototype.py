"""Prototype: activity-perturbation (node-perturbation) training of the tf-ftz net, no backprop.

Each member perturbs the three matmul outputs a_k (per example) by sigma * xi, with antithetic pairs;
per-example loss differences estimate dL/da_k (through the flushes, smoothed), and the weight gradient
is the exact linear-map rule dW_k = input_k^T dL/da_k. Biases stay 0 (as masked backprop leaves them).
Not ES (the perturbations live in activation space, 1,034 per example against 669,706 weights), and not
shipped. Stop 14 (2026-11-27, this CPU) ran, from the repository root with ES_DATA_DIR set:
    python docs/results/2026-11-27-cpu-es/scripts/activity_perturbation_prototype.py --out run_A.jsonl        # lr 1e-3
    ... --sigma 0.3 --out run_B.jsonl; ... --lr 3e-4 --out run_C.jsonl; ... --lr 3e-4 --split --pairs 24 --out run_D.jsonl
"""
import argparse, json, time, torch
from es_service import network
from es_service.data import load_mnist
from workers.evaluator import accuracy

p = argparse.ArgumentParser()
p.add_argument("--pairs", type=int, default=16)
p.add_argument("--batch", type=int, default=128)
p.add_argument("--sigma", type=float, default=0.1)
p.add_argument("--lr", type=float, default=1e-3)
p.add_argument("--steps", type=int, default=3000)
p.add_argument("--eval-every", type=int, default=500)
p.add_argument("--out", required=True)
p.add_argument("--threads", type=int, default=1)
p.add_argument("--layers", default="123")
p.add_argument("--split", action="store_true", help="each pair perturbs one layer (thirds of the pairs)")
args = p.parse_args()
torch.set_num_threads(args.threads)
torch.manual_seed(0)
d = load_mnist()
X = d.train_images.reshape(-1, 784).float() / 255.0
Y = d.train_labels
theta = network.init_theta(0)
W1, b1, W2, b2, W3, b3 = network.unflatten(theta)
ops = network.EAGER["tf-ftz"]
adam = torch.optim.Adam([theta], lr=args.lr)
theta.grad = torch.zeros_like(theta)
G = network.unflatten(theta.grad)
K, B, s = args.pairs, args.batch, args.sigma
gen = torch.Generator().manual_seed(1)
started = time.time()
for step in range(1, args.steps + 1):
    idx = torch.randint(0, X.shape[0], (B,), generator=gen)
    x, y = X[idx], Y[idx]
    a1 = x @ W1
    xi1 = torch.randn(K, B, 512, generator=gen) * ("1" in args.layers)
    xi2 = torch.randn(K, B, 512, generator=gen) * ("2" in args.layers)
    xi3 = torch.randn(K, B, 10, generator=gen) * ("3" in args.layers)
    if args.split:
        group = torch.arange(K) % 3
        xi1 = xi1 * (group == 0)[:, None, None]; xi2 = xi2 * (group == 1)[:, None, None]; xi3 = xi3 * (group == 2)[:, None, None]
    losses = []
    for sign in (1.0, -1.0):
        h1 = ops.hidden1(a1 + sign * s * xi1, b1)                  # (K, B, 512)
        h2 = ops.hidden2(h1 @ W2 + sign * s * xi2, b2)
        logits = ops.logits(h2 @ W3 + sign * s * xi3, b3)
        losses.append(torch.nn.functional.cross_entropy(logits.reshape(-1, 10), y.repeat(K), reduction="none").reshape(K, B))
    diff = (losses[0] - losses[1]) / (2 * s)                       # (K, B): directional derivatives
    share = 3.0 if args.split else 1.0                             # each layer's pairs are a third of K
    g1 = (diff[..., None] * xi1).mean(0) * share                   # (B, 512) estimate of dL/da1
    g2 = (diff[..., None] * xi2).mean(0) * share
    g3 = (diff[..., None] * xi3).mean(0) * share
    with torch.no_grad():
        h1c = ops.hidden1(a1, b1)
        h2c = ops.hidden2(h1c @ W2, b2)
    G[0].copy_(x.T @ g1 / B); G[2].copy_(h1c.T @ g2 / B); G[4].copy_(h2c.T @ g3 / B)
    adam.step()
    if step % args.eval_every == 0 or step == args.steps:
        with torch.no_grad():
            rec = {"step": step, "wall_s": time.time() - started, "loss": float(losses[0].mean()),
                   "train_10k": accuracy(theta, d.train_images[:10000], d.train_labels[:10000], "tf-ftz"),
                   "test": accuracy(theta, d.test_images, d.test_labels, "tf-ftz"),
                   "test_unflushed": accuracy(theta, d.test_images, d.test_labels, "linear"),
                   "norm": float(theta.norm()), "args": vars(args)}
        print(json.dumps({k: v for k, v in rec.items() if k != "args"}), flush=True)
        with open(args.out, "a") as f:
            f.write(json.dumps(rec) + "\n")
