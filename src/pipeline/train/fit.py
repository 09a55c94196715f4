"""Running the recipe on Ray Train, for the train stage and the distill stage alike: worker group,
run name (what makes a resubmitted job resume), checkpoint storage, and the history it leaves."""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path

import pyarrow.fs as pafs
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer
from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback

from pipeline.config import PipelineConfig
from pipeline.loading import write_adapter_record
from pipeline.plots import plot_loss
from pipeline.runtime import disk_full, state_api_answers
from pipeline.terminal import progress, say
from pipeline.train.checkpoint_manifest import damage
from pipeline.train.disk_full import explain
from pipeline.train.recipe import PROGRESS, train_loop
from pipeline.train.recipe_config import RecipeConfig


def run_label(cfg: PipelineConfig, out: Path) -> str:
    """`out` relative to the pipeline's folder; a run outside it (a benchmark's) is named by its folder."""
    root = cfg.stage_dir("train").parent
    return str(out.relative_to(root)) if out.is_relative_to(root) else out.name


def checkpoint_storage(cfg: PipelineConfig, out: Path) -> str:
    uri = cfg.train.checkpoint_uri
    # beside the stage folders, not in them: a stage folder pushed to a URI replaces what was there
    return f"{uri.rstrip('/')}/checkpoints/{run_label(cfg, out)}" if uri else str(out / "ray")


def run_name(cfg: PipelineConfig, recipe: RecipeConfig, out: Path) -> str:
    """Ray Train resumes a run of the same name from its latest checkpoint. Naming it after the
    recipe's settings means a resubmitted job picks up where it died, while a changed config starts
    fresh instead of loading checkpoints that do not fit it."""
    return f"{cfg.name}-{out.name}-{recipe.digest()}"


RUN_RECORD = "run.json"  # in the stage folder: which Ray Train run it last used, and what that run read


def _storage(location: str) -> tuple[pafs.FileSystem, str]:
    return pafs.FileSystem.from_uri(location) if "://" in location else (pafs.LocalFileSystem(), location)


def latest_checkpoint(storage: str, run: str) -> tuple[int, str] | None:
    """(step, folder) of the newest checkpoint of a Ray Train run in `storage`, if it has one."""
    fs, root = _storage(storage)
    found = fs.get_file_info(pafs.FileSelector(f"{root}/{run}", allow_not_found=True))
    for info in sorted(
        (i for i in found if i.base_name.startswith("checkpoint_")), key=lambda i: i.base_name, reverse=True
    ):
        try:
            with fs.open_input_stream(f"{info.path}/state.json") as f:
                return json.loads(f.read())["step"], info.path
        except (FileNotFoundError, OSError, ValueError):
            continue  # a checkpoint being written when the run died
    return None


def start_or_resume(cfg: PipelineConfig, recipe: RecipeConfig, out: Path, fresh: bool) -> tuple[str, tuple | None]:
    """Say on the terminal whether this run resumes and why not; with `fresh`, discard earlier runs.
    Returns the run's name and its latest checkpoint (step, folder), if it resumes."""
    run, storage = run_name(cfg, recipe, out), checkpoint_storage(cfg, out)
    found = None if fresh else latest_checkpoint(storage, run)
    label = run_label(cfg, out)
    record = out / RUN_RECORD
    before = json.loads(record.read_text()) if record.is_file() else None
    if fresh:
        fs, root = _storage(storage)
        for info in fs.get_file_info(pafs.FileSelector(root, allow_not_found=True)):
            if info.base_name.startswith(f"{cfg.name}-{out.name}-"):
                fs.delete_dir(info.path)
        say(f"{label}: --fresh: earlier checkpoints discarded; starting at step 0 of {recipe.train.max_steps}")
    elif found:
        say(f"{label}: resuming from step {found[0]} of {recipe.train.max_steps}, checkpoint {found[1]}")
    elif before and before["run"] != run:
        changed = [
            k
            for k in sorted(set(before["inputs"]) | set(recipe.inputs))
            if before["inputs"].get(k) != recipe.inputs.get(k)
        ]
        why = f"its inputs changed ({', '.join(changed)})" if changed else "its settings changed"
        say(f"{label}: starting fresh: {why} since the run in {storage}/{before['run']}")
    else:
        say(f"{label}: starting at step 0 of {recipe.train.max_steps}")
    out.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps({"run": run, "inputs": recipe.inputs}, indent=2))
    return run, found


def fit(
    cfg: PipelineConfig, recipe: RecipeConfig, out: Path, datasets: dict, fresh: bool = False
) -> tuple[Path, list[dict]]:
    """Run the recipe on Ray Train; return the final checkpoint folder (out/final) and the logged
    history. Rank 0 writes TensorBoard scalars to out/tensorboard (and profiler traces to out/profile).
    A run whose settings and inputs are unchanged resumes from its latest checkpoint, unless `fresh`."""
    recipe = recipe.model_copy(update={"output_dir": str(out)})
    (run, found), storage = start_or_resume(cfg, recipe, out, fresh), checkpoint_storage(cfg, out)
    final = out / "final"
    shutil.rmtree(final, ignore_errors=True)
    if found and found[0] >= recipe.train.max_steps and take_whole(found[1], storage, final):
        say(f"{run_label(cfg, out)}: step {found[0]} was its last; nothing left to train")
    else:
        run_trainer(cfg, recipe, out, run, storage, datasets).to_directory(str(final))
    if (final / "model" / "adapter_config.json").is_file():  # an adapter says which base it belongs to
        write_adapter_record(final / "model", recipe.base_model, recipe.inputs.get("base_model"))
    history = json.loads((final / "state.json").read_text())["history"]
    plot_loss({out.name: history}, out / "loss.png")
    return final, history


def take_whole(checkpoint: str, storage: str, final: Path) -> bool:
    """A rerun of a run that reached its last step: its checkpoint, copied to `final`, is the result and
    no worker group starts. Not when it is damaged: the recipe then passes over it to the one before."""
    Checkpoint(checkpoint, filesystem=_storage(storage)[0]).to_directory(str(final))
    if damage(final) is None:
        return True
    shutil.rmtree(final)
    return False


class Trainer(TorchTrainer):
    """Ray's TorchTrainer, less its placement-group cleaner where Ray's state API does not answer (the local
    Ray). The cleaner is a detached actor that asks that API every second whether the run's controller still
    lives, to free the workers' placement group if it died: without the API it can never tell, and it cost a
    process per run (3 CPU-seconds here) and a warning a second in the run's log."""

    def _create_default_callbacks(self):
        callbacks = super()._create_default_callbacks()
        if state_api_answers():
            return callbacks
        return [c for c in callbacks if not isinstance(c, PlacementGroupCleanerCallback)]


def run_trainer(cfg: PipelineConfig, recipe: RecipeConfig, out: Path, run: str, storage: str, datasets: dict):
    """The recipe on a Ray Train worker group (resuming `run` from its latest checkpoint in `storage`);
    returns the final checkpoint."""
    train = cfg.train
    resources = {"CPU": train.cpus_per_worker, **({"GPU": 1} if train.use_gpu else {})}
    trainer = Trainer(
        functools.partial(train_loop, recipe),
        scaling_config=ScalingConfig(
            num_workers=train.num_workers, use_gpu=train.use_gpu, resources_per_worker=resources
        ),
        torch_config=TorchConfig(backend="nccl" if train.use_gpu else "gloo"),
        datasets=datasets,
        run_config=RunConfig(
            name=run,
            storage_path=storage,
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            failure_config=FailureConfig(max_failures=2),
        ),
    )
    (out / PROGRESS).unlink(missing_ok=True)
    try:
        with progress(recipe.train.max_steps, run_label(cfg, out), functools.partial(step_reached, out)):
            result = trainer.fit()
    except Exception as e:
        if (full := disk_full(e)) is None:
            raise
        raise explain(full, None if "://" in storage else Path(storage) / run, out) from e
    return result.checkpoint


def step_reached(out: Path) -> int | None:
    """The last step rank 0 logged (None before its first): read while the run goes on, so it may be mid-write."""
    try:
        return json.loads((out / PROGRESS).read_text())["step"]
    except (OSError, ValueError, KeyError):
        return None


def history_summary(history: list[dict]) -> dict:
    evals = [h["eval_loss"] for h in history if "eval_loss" in h]
    previous = [h["previous_eval_loss"] for h in history if "previous_eval_loss" in h]
    return {
        "steps": history[-1]["step"],
        "loss_first": history[0]["loss"],
        "loss_last": history[-1]["loss"],
        **({"eval_loss_best": min(evals), "eval_loss_last": evals[-1]} if evals else {}),
        **({"eval_loss_before": history[0]["eval_loss_before"]} if "eval_loss_before" in history[0] else {}),
        **({"previous_eval_loss_last": previous[-1]} if previous else {}),
        "stopped_early": any(h.get("stopped_early") for h in history),
        "tokens_per_s": round(sum(h["tokens_per_s"] for h in history) / len(history), 1),
        "history": history,
    }
