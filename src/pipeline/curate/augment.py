"""Optional augmentation of the curated documents, as Ray Data actor pools (models load once per
actor, on a GPU when the cluster has them). Augmented rows are new kept documents that carry
`augmented_from` = the id of the document they were made from; the inputs stay as they were.

- Back-translation (en -> zh -> en, say): two seq2seq models from local paths
  (MarianMT-style `AutoModelForSeq2SeqLM`), forward to the pivot language and back.
- Synonym perturbation: a fill-mask model from a local path proposes, for a share of the words,
  the most likely other word in that context.
"""

from __future__ import annotations

import random
import re
import zlib

import pandas as pd
import ray
import torch
from transformers import AutoModelForMaskedLM, AutoModelForSeq2SeqLM

from pipeline.config import AugmentConfig
from pipeline.curate.records import is_kept
from pipeline.loading import load_model, load_tokenizer


def selected(doc_id: str, share: float, salt: str) -> bool:
    """Which documents get augmented: a stable pick by id, whatever the block layout."""
    return zlib.crc32(f"{salt}:{doc_id}".encode()) % 10_000 < share * 10_000


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _augmented(batch: pd.DataFrame, texts: list[str], suffix: str) -> pd.DataFrame:
    out = batch.copy()
    out["augmented_from"] = batch["id"]
    out["id"] = batch["id"] + suffix
    out["text"] = texts
    out["raw"] = ""
    if "perplexity" in out:
        out["perplexity"] = float("nan")  # scored was the source, not this text
    return out[[t.strip() != "" for t in texts]]


class BackTranslator:
    def __init__(self, forward_model: str, backward_model: str, max_tokens: int, trust_remote_code: bool):
        self.stages = [
            (
                load_tokenizer(p, trust_remote_code),
                load_model(AutoModelForSeq2SeqLM, p, trust_remote_code).to(_device()).eval(),
            )
            for p in (forward_model, backward_model)
        ]
        self.max_tokens = max_tokens

    @torch.no_grad()
    def translate(self, texts: list[str]) -> list[str]:
        for tokenizer, model in self.stages:
            todo = [i for i, t in enumerate(texts) if t.strip()]  # a pivot text can come back empty
            if not todo:
                break
            enc = tokenizer(
                [texts[i] for i in todo], return_tensors="pt", padding=True, truncation=True, max_length=self.max_tokens
            ).to(model.device)
            ids = model.generate(**enc, max_new_tokens=self.max_tokens, num_beams=1, do_sample=False)
            out = [""] * len(texts)
            for i, text in zip(todo, tokenizer.batch_decode(ids, skip_special_tokens=True)):
                out[i] = text
            texts = out
        return texts

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        return _augmented(batch, self.translate(batch["text"].tolist()) if len(batch) else [], "#bt")


class SynonymReplacer:
    def __init__(self, model_path: str, word_share: float, trust_remote_code: bool, window: int = 24):
        self.tokenizer = load_tokenizer(model_path, trust_remote_code)
        if self.tokenizer.mask_token is None:
            raise ValueError(f"{model_path}: the tokenizer has no mask token; a fill-mask model is needed")
        self.model = load_model(AutoModelForMaskedLM, model_path, trust_remote_code).to(_device()).eval()
        self.word_share, self.window = word_share, window

    @torch.no_grad()
    def best_other_word(self, words: list[str], i: int) -> str:
        lo, hi = max(0, i - self.window), i + self.window
        context = " ".join(words[lo:i] + [self.tokenizer.mask_token] + words[i + 1 : hi])
        enc = self.tokenizer(context, return_tensors="pt", truncation=True, max_length=256).to(self.model.device)
        where = (enc["input_ids"][0] == self.tokenizer.mask_token_id).nonzero()
        if not len(where):
            return words[i]
        logits = self.model(**enc).logits[0, where[0, 0]]
        for token in logits.topk(10).indices.tolist():
            word = self.tokenizer.decode([token]).strip()
            if word.isalpha() and word.lower() != words[i].lower():
                return word
        return words[i]

    def perturb(self, doc_id: str, text: str) -> str:
        pieces = re.split(r"(\s+)", text)  # words at even positions; the whitespace between is kept
        words = pieces[::2]
        rng = random.Random(zlib.crc32(doc_id.encode()))
        for i in sorted(rng.sample(range(len(words)), int(len(words) * self.word_share))):
            if words[i].isalpha():
                words[i] = self.best_other_word(words, i)
        pieces[::2] = words
        return "".join(pieces)

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        return _augmented(batch, [self.perturb(i, t) for i, t in zip(batch["id"], batch["text"])], "#syn")


def pick(batch: pd.DataFrame, share: float, salt: str) -> pd.DataFrame:
    return batch[is_kept(batch) & batch["id"].map(lambda i: selected(i, share, salt))]


def augment(ds: ray.data.Dataset, settings: AugmentConfig, trust_remote_code: bool) -> ray.data.Dataset:
    """`ds` plus the augmented rows (none when no augmentation model is configured)."""
    gpus = 1 if ray.cluster_resources().get("GPU", 0) > 0 else 0
    pool = {"batch_format": "pandas", "batch_size": 8, "concurrency": settings.concurrency, "num_gpus": gpus}
    parts = []
    if settings.back_translation_models:
        forward, backward = settings.back_translation_models
        parts.append(
            ds.map_batches(
                pick, batch_format="pandas", fn_kwargs={"share": settings.back_translation_share, "salt": "bt"}
            ).map_batches(
                BackTranslator,
                **pool,
                fn_constructor_kwargs={
                    "forward_model": forward,
                    "backward_model": backward,
                    "max_tokens": settings.max_tokens,
                    "trust_remote_code": trust_remote_code,
                },
            )
        )
    if settings.synonym_model:
        parts.append(
            ds.map_batches(
                pick, batch_format="pandas", fn_kwargs={"share": settings.synonym_share, "salt": "syn"}
            ).map_batches(
                SynonymReplacer,
                **pool,
                fn_constructor_kwargs={
                    "model_path": settings.synonym_model,
                    "word_share": settings.synonym_word_share,
                    "trust_remote_code": trust_remote_code,
                },
            )
        )
    return ds.union(*parts) if parts else ds
