"""What a training step minimizes. The recipe calls `objective(engine, input_ids)` and backprops
the result, so a new objective is one small class here, not a new training loop."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM


def token_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Mean per-token KL(teacher || student) of the temperature-softened distributions."""
    vocab = student_logits.shape[-1]
    return F.kl_div(F.log_softmax(student_logits.reshape(-1, vocab) / temperature, dim=-1),
                    F.log_softmax(teacher_logits.reshape(-1, vocab) / temperature, dim=-1),
                    log_target=True, reduction="batchmean")


def causal_lm(engine, input_ids: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy (plus the MoE router's load-balancing loss, when the model has one)."""
    return engine(input_ids=input_ids, labels=input_ids).loss


class Distillation:
    """alpha * KL(teacher || student at temperature T) * T^2 + (1 - alpha) * CE (Hinton et al.).
    T^2 keeps the soft targets' gradient on the CE's scale whatever T is. The teacher is frozen and
    runs without autograd on every worker, beside its student."""

    def __init__(self, teacher_dir: str, alpha: float, temperature: float, device: torch.device):
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        self.teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=dtype).to(device).eval()
        self.teacher.requires_grad_(False)
        self.alpha, self.temperature = alpha, temperature

    def __call__(self, engine, input_ids: torch.Tensor) -> torch.Tensor:
        out = engine(input_ids=input_ids, labels=input_ids)
        with torch.no_grad():
            teacher_logits = self.teacher(input_ids=input_ids).logits.float()
        kl = token_kl(teacher_logits, out.logits.float(), self.temperature)
        return self.alpha * kl * self.temperature ** 2 + (1 - self.alpha) * out.loss


def make_objective(c: dict, device: torch.device):
    if c["objective"] == "distill":
        return Distillation(c["teacher"], c["alpha"], c["temperature"], device)
    return causal_lm
