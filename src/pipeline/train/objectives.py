"""What a training step minimizes. The recipe calls `objective(engine, batch)` and backprops the loss
it returns (the dict beside it holds scalars worth logging), so a new objective is one small class
here, not a new training loop."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from pipeline.loading import load_model
from pipeline.train.data import IGNORE
from pipeline.train.recipe_config import RecipeConfig


def token_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Mean per-token KL(teacher || student) of the temperature-softened distributions."""
    vocab = student_logits.shape[-1]
    return F.kl_div(
        F.log_softmax(student_logits.reshape(-1, vocab) / temperature, dim=-1),
        F.log_softmax(teacher_logits.reshape(-1, vocab) / temperature, dim=-1),
        log_target=True,
        reduction="batchmean",
    )


def moe_stats(out, top_k: int | None) -> dict:
    """The router's load-balancing loss, and how uneven the experts' load is: the busiest expert's share
    of the routed tokens over the even share (1.0 = perfectly balanced)."""
    if getattr(out, "aux_loss", None) is None or not out.router_logits or not top_k:
        return {}
    logits = torch.cat([layer.detach().float() for layer in out.router_logits])
    load = torch.bincount(logits.topk(top_k, dim=-1).indices.flatten(), minlength=logits.shape[-1]).float()
    return {"moe_aux_loss": out.aux_loss.detach(), "moe_max_load": load.max() / load.mean()}


def causal_lm(engine, batch: dict) -> tuple[torch.Tensor, dict]:
    """Next-token cross-entropy over the tokens whose label is not IGNORE (all of them when pretraining,
    the responses in SFT), plus the MoE router's load-balancing loss when the model has one.

    Restarting position_ids keep the sequences packed into one row from attending to each other, but
    transformers (5.17) builds that mask only when no KV cache is passed, and a forward makes one unless
    told use_cache=False, in training mode too: every training forward here says it."""
    ids = batch["input_ids"]
    out = engine(
        input_ids=ids, labels=batch.get("labels", ids), position_ids=batch.get("position_ids"), use_cache=False
    )
    model = getattr(engine, "module", engine)  # an engine, or a bare model (EWC measures on one)
    return out.loss, moe_stats(out, getattr(model.config, "num_experts_per_tok", None))


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of log p(token) over each row's labelled (response) tokens."""
    logits, labels = logits[:, :-1].float(), labels[:, 1:]
    mask = labels != IGNORE
    picked = torch.gather(logits.log_softmax(-1), 2, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * mask).sum(-1)


class DPO:
    """Direct preference optimization (Rafailov et al. 2023): -log sigmoid(beta * margin), where margin is
    how much more the policy prefers chosen over rejected than the frozen reference, the model the stage
    started from, does. With LoRA that is the same model with its adapter switched off (each stage
    starts a fresh adapter on the previous stage's merged model); a full fine-tune loads a frozen copy."""

    def __init__(self, beta: float, reference_dir: str | None, trust_remote_code: bool, device: torch.device):
        self.beta = beta
        self.reference = (
            reference_dir and load_model(AutoModelForCausalLM, reference_dir, trust_remote_code).to(device).eval()
        )

    @torch.no_grad()
    def reference_logps(self, engine, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.reference:
            return sequence_logps(self.reference(input_ids=ids, use_cache=False).logits, labels)
        with engine.module.disable_adapter():
            return sequence_logps(engine.module(input_ids=ids, use_cache=False).logits, labels)

    def __call__(self, engine, batch: dict) -> tuple[torch.Tensor, dict]:
        ids = torch.cat([batch["chosen_ids"], batch["rejected_ids"]])
        labels = torch.cat([batch["chosen_labels"], batch["rejected_labels"]])
        out = engine(input_ids=ids, use_cache=False)
        policy_chosen, policy_rejected = sequence_logps(out.logits, labels).chunk(2)
        ref_chosen, ref_rejected = self.reference_logps(engine, ids, labels).chunk(2)
        margin = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
        loss = -F.logsigmoid(self.beta * margin).mean()
        if getattr(out, "aux_loss", None) is not None:  # keep the experts balanced here too
            loss = loss + engine.module.config.router_aux_loss_coef * out.aux_loss
        return loss, {
            "reward_margin": self.beta * margin.detach().mean(),
            "reward_accuracy": (margin.detach() > 0).float().mean(),
        }


class Distillation:
    """alpha * KL(teacher || student at temperature T) * T^2 + (1 - alpha) * CE (Hinton et al.).
    T^2 keeps the soft targets' gradient on the CE's scale whatever T is. The teacher is frozen and
    runs without autograd on every worker, beside its student."""

    def __init__(
        self, teacher_dir: str, alpha: float, temperature: float, trust_remote_code: bool, device: torch.device
    ):
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        self.teacher = load_model(AutoModelForCausalLM, teacher_dir, trust_remote_code, dtype=dtype).to(device).eval()
        self.teacher.requires_grad_(False)
        self.alpha, self.temperature = alpha, temperature

    def __call__(self, engine, batch: dict) -> tuple[torch.Tensor, dict]:
        ids = batch["input_ids"]
        out = engine(input_ids=ids, labels=ids, use_cache=False)
        with torch.no_grad():
            teacher_logits = self.teacher(input_ids=ids, use_cache=False).logits.float()
        kl = token_kl(teacher_logits, out.logits.float(), self.temperature)
        return self.alpha * kl * self.temperature**2 + (1 - self.alpha) * out.loss, {"kl": kl.detach()}


def make_objective(config: RecipeConfig, device: torch.device):
    trust = config.model.trust_remote_code
    if config.objective == "distill":
        return Distillation(config.teacher, config.distill.alpha, config.distill.temperature, trust, device)
    if config.objective == "dpo":
        # a full fine-tune has no adapter to switch off: its reference is the stage's starting model
        return DPO(config.dpo_beta, config.base_model if config.lora is None else None, trust, device)
    return causal_lm
