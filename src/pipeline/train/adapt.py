"""Personalization: LoRA adapters trained on the run's own model, each from its own data, and served
beside that model under their names (pipeline/serving/adapters.py).

runs/<name>/adapters/<adapter>/   adapter_config.json, adapter_model.safetensors, pipeline.json (its base):
                                  what the endpoint serves as model <adapter>
                                  manifest.json: base, data, settings, metrics, held-out loss before/after
                                  <stage>/: the training run (checkpoints, TensorBoard, loss.png)

Every adapter of a run trains on the same base, the 16-bit model quantize/merged holds, so all of them
apply to the one copy of it (or its 4-bit export) that a replica serves.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil

from pipeline.config import AdapterSpec, PipelineConfig
from pipeline.digest import path_digest
from pipeline.handoff import merged_model_dir
from pipeline.loading import RECORD, load_model_config
from pipeline.train.stage import check_lora_targets, train_stages

log = logging.getLogger("pipeline.adapt")
MANIFEST = "manifest.json"
# copied out of the training run; adapter_config.json last, since its arrival makes the folder an adapter
SERVED_FILES = ("adapter_model.safetensors", RECORD, "adapter_config.json")


def adapter_config(cfg: PipelineConfig, spec: AdapterSpec) -> PipelineConfig:
    """The run's config as an adapter trains: its one stage and LoRA settings, never a full fine-tune."""
    lora = spec.lora or cfg.train.lora
    train = cfg.train.model_copy(update={"stages": [spec.stage], "lora": lora, "full_finetune": False})
    return cfg.model_copy(update={"train": train})


def identity(adapting: PipelineConfig, base_digest: str, data_digest: str) -> str:
    """What the adapter is made from: the base's and the data's fingerprints and every setting that trains it."""
    what = [base_digest, data_digest, adapting.train.model_dump(mode="json")]
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:16]


def run_adapt(cfg: PipelineConfig, name: str, fresh: bool = False) -> dict:
    """Train one adapter (unless one made from the same inputs and settings is there); its manifest."""
    spec, base, out = cfg.adapter(name), merged_model_dir(cfg), cfg.stage_dir("adapters") / name
    adapting = adapter_config(cfg, spec)
    base_digest, data_digest = path_digest(base), path_digest(spec.stage.data)
    made_from = identity(adapting, base_digest, data_digest)
    if not fresh and (out / MANIFEST).is_file():
        manifest = json.loads((out / MANIFEST).read_text())
        if manifest["identity"] == made_from:
            log.info("adapt %s: done earlier from the same base, data and settings (%s)", name, out)
            return manifest
    for served in SERVED_FILES[::-1] + (MANIFEST,):  # the folder stops being an adapter first
        (out / served).unlink(missing_ok=True)
    trust = cfg.model.trust_remote_code
    check_lora_targets(load_model_config(base, trust), adapting.train.lora, str(base), trust)
    trained, (summary,), _ = train_stages(adapting, base, out, fresh)
    for served in SERVED_FILES:
        shutil.copy2(trained.model / served, out / served)
    manifest = {
        "adapter": name,
        "identity": made_from,
        "base_model": str(base),
        "base_digest": base_digest,
        "data": {"path": str(spec.stage.data), "digest": data_digest, "kind": spec.stage.kind},
        "lora": adapting.train.lora.model_dump(mode="json"),
        "metrics": summary,
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2))
    log.info(
        "adapt %s: held-out loss %s -> %s on %s",
        name,
        summary.get("eval_loss_before"),
        summary.get("eval_loss_last"),
        spec.stage.data,
    )
    return manifest
