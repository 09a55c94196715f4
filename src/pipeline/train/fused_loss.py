"""Cross-entropy from the final hidden states, without the full-vocabulary logits (train.fused_cross_entropy).

A causal LM's forward computes logits for every position (batch x seq x vocab) and its loss upcasts them
to fp32: for a Qwen2-0.5B shape at micro-batch 8 x 2048 tokens that is 8 * 2048 * 151,936 * 4 bytes = 10 GB,
more than the model and its optimizer state together. Here the model's own forward runs with no logits
kept, and the loss is computed from the last hidden states: by Liger Kernel's fused linear cross-entropy
on CUDA when it is installed, elsewhere in chunks of tokens whose logits are recomputed in backward, so
only one chunk's logits exist at a time. The MoE router's load-balancing loss is added as the model's
own forward would.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE = -100
CHUNK_TOKENS = 2048
NO_LOGITS = torch.empty(0, dtype=torch.long)  # `logits_to_keep` as positions: none of them


def _summed_cross_entropy(hidden: torch.Tensor, labels: torch.Tensor, head: Callable) -> torch.Tensor:
    return F.cross_entropy(head(hidden).float(), labels, reduction="sum")


def chunked_cross_entropy(
    hidden: torch.Tensor, labels: torch.Tensor, head: Callable, chunk_tokens: int = CHUNK_TOKENS
) -> torch.Tensor:
    """Mean cross-entropy of head(hidden) against labels over the tokens labelled other than IGNORE;
    hidden (tokens, width), labels (tokens,). Calls `head` itself (not its weight), so a head that is
    sharded, or wrapped by peft, works as in the model's forward."""
    keep = labels != IGNORE
    hidden, labels = hidden[keep], labels[keep]
    if not len(labels):
        return hidden.sum() * 0.0
    total = sum(
        checkpoint(
            _summed_cross_entropy, hidden[i : i + chunk_tokens], labels[i : i + chunk_tokens], head, use_reentrant=False
        )
        for i in range(0, len(labels), chunk_tokens)
    )
    return total / len(labels)


def liger_cross_entropy(hidden: torch.Tensor, labels: torch.Tensor, head: torch.nn.Linear) -> torch.Tensor:
    from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss

    weight = head.weight.to(hidden.dtype)  # fp32 master weights under autocast: the kernel wants one dtype
    bias = head.bias.to(hidden.dtype) if head.bias is not None else None
    return LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE)(weight, hidden, labels, bias)


def choose(head: torch.nn.Module, device: torch.device) -> str:
    """liger where it can run (CUDA, installed, a plain Linear head), chunked everywhere else."""
    liger = importlib.util.find_spec("liger_kernel") is not None
    return "liger" if liger and device.type == "cuda" and type(head) is torch.nn.Linear else "chunked"


def install(model: torch.nn.Module, device: torch.device) -> str:
    """Patch the causal LM inside `model` (a peft model or the LM itself) so that a forward with labels
    returns the loss computed here and no logits. Returns the implementation chosen."""
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    head, original = lm.get_output_embeddings(), lm.forward
    kind = choose(head, device)
    loss_fn = liger_cross_entropy if kind == "liger" else chunked_cross_entropy
    last_hidden: list[torch.Tensor] = []
    lm.get_decoder().register_forward_hook(lambda module, args, out: last_hidden.append(out.last_hidden_state))

    def forward(*args, labels: torch.Tensor | None = None, **kwargs):
        if labels is None:  # logits wanted (generation, DPO, distillation)
            last_hidden.clear()
            return original(*args, **kwargs)
        out = original(*args, logits_to_keep=NO_LOGITS, **kwargs)
        hidden = last_hidden.pop()[:, :-1]
        last_hidden.clear()
        loss = loss_fn(hidden.reshape(-1, hidden.shape[-1]), labels[:, 1:].reshape(-1), head)
        if getattr(out, "aux_loss", None) is not None:
            loss = loss + lm.router_aux_loss_coef * out.aux_loss.to(loss.device)
        out.loss = loss
        return out

    lm.forward = forward
    return kind
