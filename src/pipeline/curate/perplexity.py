"""Perplexity filter: a reference causal LM (any local HF directory) scores each document; the
seed's rule keeps perplexity < 20. Runs as a Ray Data actor pool, so each actor loads the model
once (on a GPU when the cluster has them) and scores batch after batch."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline.curate.records import is_kept
from pipeline.loading import load_model


class PerplexityScorer:
    def __init__(self, model_path: str, max_tokens: int, max_perplexity: float):
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.tokenizer.padding_side = "right"
        self.model = load_model(AutoModelForCausalLM, model_path).to(self.device).eval()
        self.max_tokens, self.max_perplexity = max_tokens, max_perplexity

    @torch.no_grad()
    def perplexities(self, texts: list[str]) -> np.ndarray:
        enc = self.tokenizer(texts, return_tensors="pt", padding=True, truncation=True,
                             max_length=self.max_tokens).to(self.device)
        logits = self.model(**enc).logits[:, :-1].float()
        labels, mask = enc["input_ids"][:, 1:], enc["attention_mask"][:, 1:].float()
        nll = F.cross_entropy(logits.transpose(1, 2), labels, reduction="none") * mask
        return torch.exp(nll.sum(1) / mask.sum(1).clamp(min=1)).cpu().numpy()

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        kept = is_kept(batch).to_numpy()
        scores = np.full(len(batch), np.nan)
        if kept.any():
            scores[kept] = self.perplexities(batch.loc[kept, "text"].tolist())
        batch["perplexity"] = scores
        over = kept & (scores >= self.max_perplexity)
        batch["reason"] = [self.reason(s) if o else r for s, o, r in zip(scores, over, batch["reason"].tolist())]
        return batch

    def reason(self, score: float) -> str:
        return f"perplexity {score:.1f} >= {self.max_perplexity:g}" if math.isfinite(score) else "perplexity not finite"
