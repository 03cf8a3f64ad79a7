"""Prototype: layer-2 members. Extra antithetic rank-1 members perturb only W2, b2, W3, b3 around the
center; h1 and h1 W2 of the center are shared, each member costs a rank-1 correction, the layer-2
epilogue and h2 W3. Their estimate replaces the members' for W2..b3.
Not part of the service (stop 11 tried it, see README "Results"): it patches the driver's update in
process. From the repository root:
    python docs/results/2026-11-26-cpu-es/scripts/layer2_prototype.py 1024 train \
        --config docs/results/2026-11-26-cpu-es/long_r1_a256b256_layer2proto1024/config.yaml --executor local --run-dir RUN
"""
import sys, numpy as np, torch
from es_service import driver, strategy, network, noise, cli
from es_service import plan as planning
L2 = int(sys.argv[1]); sys.argv = [sys.argv[0]] + sys.argv[2:]
START = 784 * 512 + 512
LEN = (512 + 512 + 512) + (512 + 10 + 10)
state = {}
orig_step = driver.Trainer.step
def step(self, evaluate=False):
    state["trainer"] = self
    return orig_step(self, evaluate)
driver.Trainer.step = step
orig_plan = planning.make_plan
def make_plan(config, generation, num_train):
    p = orig_plan(config, generation, num_train); state["plan"] = p; return p
driver.planning.make_plan = make_plan
orig_grad = strategy.grad_estimate
def factors(rows):
    n = rows.shape[0]
    a2, f2, e2 = rows[:, :512], rows[:, 512:1024], rows[:, 1024:1536]
    a3, f3, e3 = rows[:, 1536:2048], rows[:, 2048:2058], rows[:, 2058:2068]
    return a2, f2, e2, a3, f3, e3
def grad_estimate(table, offsets, weights, noise_std, pop_size, rank=0):
    g = orig_grad(table, offsets, weights, noise_std, pop_size, rank)
    if not L2: return g
    tr, p = state["trainer"], state["plan"]
    theta = tr.theta
    x, y = tr.executor.evaluator.batch(p.batch_indices)
    w1, b1, w2, b2, w3, b3 = network.unflatten(theta)
    ops = network.low_rank_epilogues(tr.config.network.arithmetic, fused=True)
    plain = network.epilogues(tr.config.network.arithmetic)
    rng = np.random.default_rng([54321, p.generation])
    offs = rng.integers(0, noise.max_offset(len(table)) + 1, size=L2 // 2)
    sigma = p.noise_std
    with torch.no_grad():
        h1 = plain.hidden1(x @ w1, b1); z2 = h1 @ w2; z3c = None
        rows_all = noise.slices(table, offs, LEN)
        fit = np.zeros((len(offs), 2))
        for start in range(0, len(offs), 128):
            rows = rows_all[start:start + 128]
            a2, f2, e2, a3, f3, e3 = factors(rows)
            for col, sign in enumerate((1.0, -1.0)):
                sc = torch.full((len(rows), 1, 1), sign * sigma)
                u, v = network.low_rank_correction(h1, a2[:, :, None], f2[:, :, None], sc)
                h2 = ops.hidden2(z2, u, v, b2, e2[:, None, :], sc)
                u3, v3 = network.low_rank_correction(h2, a3[:, :, None], f3[:, :, None], sc)
                logits = ops.logits(torch.matmul(h2, w3), u3, v3, b3, e3[:, None, :], sc)
                loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 10), y.repeat(len(rows)), reduction="none")
                fit[start:start + len(rows), col] = -loss.reshape(len(rows), -1).double().mean(1).numpy()
        shaped = strategy.shape_fitness(fit.reshape(-1), tr.config.es.fitness_shaping)
        w = torch.as_tensor(strategy.slice_weights(shaped, True), dtype=torch.float32)
        a2, f2, e2, a3, f3, e3 = factors(rows_all)
        scale = 1.0 / (L2 * sigma)
        parts = [((a2 * w[:, None]).T @ f2).flatten(), e2.T @ w, ((a3 * w[:, None]).T @ f3).flatten(), e3.T @ w]
        gl = torch.cat(parts) * scale
    g = g.clone(); g[START:] = gl
    return g
strategy.grad_estimate = grad_estimate
sys.exit(cli.main())
