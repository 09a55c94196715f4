"""A damaged checkpoint (a truncated or garbled file of it) is never trained on: a resume passes over
it to the newest whole checkpoint with a warning that names the file, or stops with a clear error when
no checkpoint of the run is whole. Figure: the step resumed from, and the final loss against the
undisturbed run's."""

import json
import shutil

import pytest

from conftest import derived_config

pytestmark = [pytest.mark.faults, pytest.mark.integration]


def test_a_damaged_checkpoint_is_passed_over_for_the_one_before_or_stops_the_run(tiny_run, tmp_path):
    from pipeline.cli import describe
    from pipeline.train.stage import run_train

    cfg = derived_config(tiny_run, tmp_path, "train.max_steps=10", "train.checkpoint_every=5", "train.log_every=1")
    run_train(cfg)
    out = cfg.stage_dir("train") / "pretrain"
    undisturbed = json.loads((out / "final" / "state.json").read_text())["history"]
    older, latest = sorted(out.glob("ray/*/checkpoint_2*"))  # Ray keeps two; their names sort by age
    assert json.loads((older / "state.json").read_text())["step"] == 5
    whole_older = tmp_path / "older-copy"
    shutil.copytree(older, whole_older)

    # rank 1's optimizer shard in the latest (its manifest is rank 1's), the model states in the older
    truncated = latest / "ds" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    garbled = older / "ds" / "mp_rank_00_model_states.pt"
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    garbled.write_bytes(bytes(b ^ 0xFF for b in garbled.read_bytes()))
    with pytest.raises(Exception) as failed:
        run_train(cfg)
    message = describe(failed.value)
    print(f"\nFIGURE both checkpoints damaged: {message}")
    assert message.startswith("no whole checkpoint to resume from")
    assert f"{latest.name}: ds/{truncated.name} has" in message
    assert f"{older.name}: ds/{garbled.name} does not" in message

    shutil.rmtree(older)
    shutil.copytree(whole_older, older)  # the older one whole again, the latest still truncated
    run_train(cfg)
    state = json.loads((out / "final" / "state.json").read_text())
    last, first_run_last = state["history"][-1]["loss"], undisturbed[-1]["loss"]
    print(
        f"\nFIGURE latest checkpoint truncated: resumed from step {state['resumed_at']}, final loss {last:.4f} "
        f"(undisturbed run {first_run_last:.4f})"
    )
    assert state["resumed_at"] == [5] and state["step"] == 10
    [passed_over] = state["passed_over"]
    assert passed_over.startswith(f"{latest.name}: ds/{truncated.name} has {truncated.stat().st_size} bytes")
    assert abs(last - first_run_last) < 0.01 * first_run_last
