"""Running the recipe on Ray Train, for the train stage and the distill stage alike: worker group,
run name (what makes a resubmitted job resume), checkpoint storage, and the history it leaves."""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path

from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from pipeline.config import PipelineConfig
from pipeline.plots import plot_loss
from pipeline.train.recipe import train_loop
from pipeline.train.recipe_config import RecipeConfig


def checkpoint_storage(cfg: PipelineConfig, out: Path) -> str:
    uri = cfg.train.checkpoint_uri
    # beside the stage folders, not in them: a stage folder pushed to a URI replaces what was there
    return (
        f"{uri.rstrip('/')}/checkpoints/{out.relative_to(cfg.stage_dir('train').parent)}" if uri else str(out / "ray")
    )


def run_name(cfg: PipelineConfig, recipe: RecipeConfig, out: Path) -> str:
    """Ray Train resumes a run of the same name from its latest checkpoint. Naming it after the
    recipe's settings means a resubmitted job picks up where it died, while a changed config starts
    fresh instead of loading checkpoints that do not fit it."""
    return f"{cfg.name}-{out.name}-{recipe.digest()}"


def fit(cfg: PipelineConfig, recipe: RecipeConfig, out: Path, datasets: dict) -> tuple[Path, list[dict]]:
    """Run the recipe on Ray Train; return the final checkpoint folder (out/final) and the logged
    history. Rank 0 writes TensorBoard scalars to out/tensorboard (and profiler traces to out/profile)."""
    recipe = recipe.model_copy(update={"output_dir": str(out)})
    train = cfg.train
    resources = {"CPU": train.cpus_per_worker, **({"GPU": 1} if train.use_gpu else {})}
    trainer = TorchTrainer(
        functools.partial(train_loop, recipe),
        scaling_config=ScalingConfig(
            num_workers=train.num_workers, use_gpu=train.use_gpu, resources_per_worker=resources
        ),
        torch_config=TorchConfig(backend="nccl" if train.use_gpu else "gloo"),
        datasets=datasets,
        run_config=RunConfig(
            name=run_name(cfg, recipe, out),
            storage_path=checkpoint_storage(cfg, out),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            failure_config=FailureConfig(max_failures=2),
        ),
    )
    result = trainer.fit()
    final = out / "final"
    shutil.rmtree(final, ignore_errors=True)
    result.checkpoint.to_directory(str(final))
    history = json.loads((final / "state.json").read_text())["history"]
    plot_loss({out.name: history}, out / "loss.png")
    return final, history


def history_summary(history: list[dict]) -> dict:
    evals = [h["eval_loss"] for h in history if "eval_loss" in h]
    previous = [h["previous_eval_loss"] for h in history if "previous_eval_loss" in h]
    return {
        "steps": history[-1]["step"],
        "loss_first": history[0]["loss"],
        "loss_last": history[-1]["loss"],
        **({"eval_loss_best": min(evals), "eval_loss_last": evals[-1]} if evals else {}),
        **({"previous_eval_loss_last": previous[-1]} if previous else {}),
        "stopped_early": any(h.get("stopped_early") for h in history),
        "tokens_per_s": round(sum(h["tokens_per_s"] for h in history) / len(history), 1),
        "history": history,
    }
