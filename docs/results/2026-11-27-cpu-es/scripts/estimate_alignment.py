"""How well one generation's ES estimate points along the true gradient, block by block.

Runs one generation of `es-service train` (in-process) from a checkpoint, keeps the ES estimate and the
generation's minibatch, and reports per parameter block the cosine between the estimate and minus the
masked autograd gradient of the cross-entropy on that minibatch. From the repository root:

    python docs/results/2026-11-27-cpu-es/scripts/estimate_alignment.py OUT.json train --config CONFIG \
        --executor local --run-dir RUN --init-from CHECKPOINT --stop-after 1 --set es.pop_size=P ...

For i.i.d. noise the cosine is about 1/sqrt(block size); the README's estimate predicts about
sqrt(P * |g_W1|^2 / (401,408 * |g|^2)) for W1.
"""
import json, sys, torch
from es_service import driver, network, strategy
from es_service.backprop import logits_fn

OUT = sys.argv[1]; sys.argv = [sys.argv[0]] + sys.argv[2:]
captured = {}
make_plan = driver.planning.make_plan
def capture_plan(*args, **kwargs):
    captured["plan"] = make_plan(*args, **kwargs)
    return captured["plan"]
driver.planning.make_plan = capture_plan
adam_step = strategy.AdamES.step
def capture_step(self, grad, lr):
    captured["grad"] = grad.detach().clone(); captured["theta"] = self.theta.detach().clone()
    return adam_step(self, grad, lr)
strategy.AdamES.step = capture_step
trainer_init = driver.Trainer.__init__
def capture_data(self, config, run_dir, data, *args, **kwargs):
    captured["data"], captured["config"] = data, config
    trainer_init(self, config, run_dir, data, *args, **kwargs)
driver.Trainer.__init__ = capture_data

from es_service import cli
cli.main()
data, plan = captured["data"], captured["plan"]
index = torch.as_tensor(plan.batch_indices, dtype=torch.long)
x = data.train_images[index].reshape(-1, 784).float() / 255.0
y = data.train_labels[index]
theta = captured["theta"].clone().requires_grad_(True)
loss = torch.nn.functional.cross_entropy(logits_fn("tf-ftz", "masked")(x, network.unflatten(theta)), y)
loss.backward()
es = captured["config"].es
row = {"pop_size": es.pop_size, "rank": es.rank, "batch_size": len(index)}
for (block, _), estimate, grad in zip(network.PARAM_SHAPES, network.unflatten(captured["grad"]), network.unflatten(theta.grad)):
    if grad.norm() > 0:
        row[block] = float(torch.nn.functional.cosine_similarity(estimate.flatten(), -grad.flatten(), dim=0))
print(json.dumps(row))
with open(OUT, "a") as handle:
    handle.write(json.dumps(row) + "\n")
