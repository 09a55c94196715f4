"""Elastic weight consolidation (Kirkpatrick et al. 2017) for a stage that follows another:

    penalty = weight/2 * sum_i F_i * (theta_i - theta*_i)^2

theta* are the weights the stage starts from (the previous stage's result) and F the diagonal of the
Fisher information on the previous stage's data, estimated by squared gradients of its loss. Weights
that mattered for the previous task are held in place; the others stay free for the new one.

With Adam the penalty must not dominate the loss: Adam scales every weight's step to about the
learning rate whatever the gradient's size, so a huge penalty does not hold weights still, it makes
them oscillate around the anchor. Measured on the tiny model (tests/test_train.py): weight 10 cut
forgetting 6x, weight 100 less, with a spike on the way.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


class EWC:
    def __init__(self, model: torch.nn.Module, objective, batches, weight: float):
        """`batches`: micro-batches of the previous stage's data (this worker's share)."""
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.anchor = [p.detach().clone() for p in self.params]
        self.fisher = [torch.zeros_like(p) for p in self.params]
        count = torch.zeros((), device=self.params[0].device)  # beside the Fisher: NCCL reduces GPU tensors only
        for batch in batches:
            model.zero_grad(set_to_none=True)
            objective(model, batch)[0].backward()
            for f, p in zip(self.fisher, self.params):
                if p.grad is not None:
                    f += p.grad.detach() ** 2
            count += 1
        model.zero_grad(set_to_none=True)
        for f in [*self.fisher, count]:  # the mean over every worker's batches
            dist.all_reduce(f)
        # normalized to mean 1: `weight` then means the same whatever the loss scale or model size
        mean = sum(f.sum() for f in self.fisher) / sum(f.numel() for f in self.fisher) / count.clamp(min=1)
        self.fisher = [f / count.clamp(min=1) / mean.clamp(min=1e-30) for f in self.fisher]
        self.weight = weight

    def penalty(self) -> torch.Tensor:
        return self.weight / 2 * sum((f * (p - a) ** 2).sum() for f, p, a in zip(self.fisher, self.params, self.anchor))
