"""A problem of your own: a small torch MLP classifying two interleaved spirals, trained by the service.

The service needs four things from a problem: theta's length, an initialisation per seed, each
member's loss on a minibatch of training examples, and (optionally) metrics of the center. Everything
else, the noise table, the members, the executors (in-process or Ray actors), the update, checkpoints
and resume, is the service's. Run it from the repository's root:

    python -m examples.spirals                      # in-process
    python -m examples.spirals --executor ray       # on a local embedded Ray (or $RAY_ADDRESS)
    python -m examples.spirals --resume             # continue runs/spirals where it stopped
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
from torch import nn

from es_service import Config, Problem, resume, train


def spirals(count: int, seed: int, noise: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` points of two spirals, each turning 1.5 times, with Gaussian noise; labels 0 and 1."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(count) % 2
    radius = torch.rand(count, generator=generator)
    angle = 3.0 * math.pi * radius + math.pi * labels
    points = torch.stack([radius * torch.cos(angle), radius * torch.sin(angle)], dim=1)
    return points + noise * radius[:, None] * torch.randn(count, 2, generator=generator), labels


class Spirals(Problem):
    """A 2-32-32-2 tanh MLP (a torch module) on 2,000 training points; 1,000 more measure accuracy."""

    def __init__(self, hidden: int = 32, num_examples: int = 2000):
        self.module = nn.Sequential(
            nn.Linear(2, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, 2)
        )
        self.shapes = {name: value.shape for name, value in self.module.named_parameters()}
        self.num_params = sum(value.numel() for value in self.module.parameters())
        self.num_examples = num_examples
        self.x, self.y = spirals(num_examples, seed=1)
        self.test_x, self.test_y = spirals(1000, seed=2)

    def init_theta(self, seed: int) -> torch.Tensor:
        with torch.random.fork_rng():  # nn.Linear's own initialisation, drawn for this seed
            torch.manual_seed(seed)
            for layer in self.module:
                if isinstance(layer, nn.Linear):
                    layer.reset_parameters()
        return nn.utils.parameters_to_vector(self.module.parameters()).detach().clone()

    def logits(self, theta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        params, start = {}, 0
        for name, shape in self.shapes.items():
            params[name] = theta[start : start + shape.numel()].view(shape)
            start += shape.numel()
        return torch.func.functional_call(self.module, params, (x,))

    def losses(self, params: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        x, y = self.x[indices], self.y[indices]
        losses = [nn.functional.cross_entropy(self.logits(theta, x), y, reduction="none") for theta in params]
        return torch.stack(losses)

    def metrics(self, theta: torch.Tensor) -> dict[str, float]:
        accuracy = {}
        for name, (x, y) in {"train": (self.x, self.y), "test": (self.test_x, self.test_y)}.items():
            accuracy[f"{name}_accuracy"] = float((self.logits(theta, x).argmax(dim=1) == y).float().mean())
        return accuracy


def config(executor: str = "local", generations: int = 300) -> Config:
    """ES settings for the spirals: 64 antithetic members, 128 points a generation, Adam."""
    return Config.model_validate(
        {
            "generations": generations,
            "es": {"pop_size": 64, "batch_size": 128, "noise_std": 0.05, "learning_rate": 0.05},
            "noise": {"table_size": 1 << 20},
            "workers": {"executor": executor, "count": 2, "cpus_per_worker": 1, "members_per_tile": 16},
            "eval": {"every": 50},
            "checkpoint": {"every": 50},
        }
    )


def main() -> None:
    parser = argparse.ArgumentParser(description="Train an MLP on two spirals with the ES service.")
    parser.add_argument("--executor", choices=("local", "ray"), default="local")
    parser.add_argument("--run-dir", type=Path, default=Path("runs/spirals"))
    parser.add_argument("--resume", action="store_true", help="continue the run in --run-dir")
    args = parser.parse_args()
    if args.resume:
        result = resume(args.run_dir, problem=Spirals())
    else:
        result = train(config(args.executor), Spirals(), args.run_dir, force=True)
    print(result)


if __name__ == "__main__":
    main()
