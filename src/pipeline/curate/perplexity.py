"""Perplexity filter: a reference causal LM (any local HF directory) scores each document and keeps
those under data.perplexity.max_perplexity (20 by default). Runs as a Ray Data actor pool, so each actor loads the model
once (on a GPU when the cluster has them) and scores batch after batch."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from pipeline.curate.records import is_kept, reject
from pipeline.loading import load_model, load_tokenizer


class PerplexityScorer:
    def __init__(self, model_path: str, trust_remote_code: bool, max_tokens: int, max_perplexity: float):
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.tokenizer = load_tokenizer(model_path, trust_remote_code)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.tokenizer.padding_side = "right"
        self.model = load_model(AutoModelForCausalLM, model_path, trust_remote_code).to(self.device).eval()
        self.max_tokens, self.max_perplexity = max_tokens, max_perplexity

    @torch.no_grad()
    def perplexities(self, texts: list[str]) -> np.ndarray:
        enc = self.tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=self.max_tokens).to(
            self.device
        )
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
        return reject(batch, [self.reason(s) if o else "" for s, o in zip(scores, over)], "perplexity")

    def reason(self, score: float) -> str:
        return f"perplexity {score:.1f} >= {self.max_perplexity:g}" if math.isfinite(score) else "perplexity not finite"
