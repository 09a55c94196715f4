"""The terminal shows the pipeline's lines; what anything else prints (a child process, a C write, a
library's logger, a progress bar) lands in the stage's log. Run in a child Python: capture rewires
file descriptors 1 and 2, which are pytest's own here."""

import subprocess
import sys
import textwrap

SCRIPT = """
import contextlib, logging, os, subprocess, sys, time
from pathlib import Path
from pipeline import terminal

logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
terminal.capture(Path(sys.argv[1]), "curate", verbose=sys.argv[2] == "-v")
print("a library prints this")
with contextlib.suppress(OSError):  # a C write that fails sets errno; os.write raises it
    os.write(2, b"a C extension writes this\\n")
subprocess.run([sys.executable, "-c", "print('a child process prints this')"])
logging.getLogger("ray").warning("a library warns")
logging.getLogger("pipeline").info("curate: 3 in, 2 kept")
terminal.say("curate: line for the person")
terminal.log_to("train")
print("a training worker prints this")
reached = [None]
with terminal.progress(3, "train/sft", lambda: reached[0]):
    time.sleep(0.6)
    reached[0] = 1
    time.sleep(0.6)
    reached[0] = 3
logging.getLogger("pipeline").warning("train/sft: stopped early")
terminal.error("pipeline train: error: it broke")
"""


def run(tmp_path, verbose: bool) -> subprocess.CompletedProcess:
    script = tmp_path / "drive.py"
    script.write_text(textwrap.dedent(SCRIPT))
    argv = [sys.executable, str(script), str(tmp_path / "logs"), "-v" if verbose else "-q"]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60)


def test_the_terminal_gets_the_pipelines_lines_and_the_logs_get_everything(tmp_path):
    out = run(tmp_path, verbose=False)
    assert out.returncode == 0, out.stderr
    shown = out.stdout.splitlines()
    assert shown[:2] == ["curate: 3 in, 2 kept", "curate: line for the person"]
    assert "warning: train/sft: stopped early" in shown
    assert "train/sft: 100%" in out.stdout and "3/3" in out.stdout  # the bar reached its total
    assert out.stderr == "pipeline train: error: it broke\n"
    for noise in ("a library prints", "a C extension", "a child process", "a library warns", "a training worker"):
        assert noise not in out.stdout + out.stderr

    curate = (tmp_path / "logs/curate.log").read_text()
    for line in ("a library prints", "a C extension", "a child process", "ray: a library warns", "line for the"):
        assert line in curate
    train = (tmp_path / "logs/train.log").read_text()
    assert "a training worker prints this" in train and "pipeline train: error: it broke" in train
    assert "a library prints" not in train


def test_verbose_shows_the_logs_as_they_are_written_without_repeating_the_pipelines_lines(tmp_path):
    out = run(tmp_path, verbose=True)
    assert out.returncode == 0, out.stderr
    for line in ("a library prints this", "a child process prints this", "a training worker prints this"):
        assert out.stdout.count(line) == 1
    assert out.stdout.count("curate: line for the person") == 1
    assert "%|" not in out.stdout  # no bar: the log says the same
    assert out.stderr.endswith("pipeline train: error: it broke\n")


def test_a_log_on_a_full_disk_loses_its_lines_not_the_run(tmp_path):
    (tmp_path / "logs").mkdir()
    for stage in ("curate", "train"):
        (tmp_path / "logs" / f"{stage}.log").symlink_to("/dev/full")  # every write: ENOSPC
    out = run(tmp_path, verbose=False)
    assert out.returncode == 0, out.stderr
    assert "curate: line for the person" in out.stdout
    assert out.stderr == "pipeline train: error: it broke\n"
