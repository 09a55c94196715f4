"""What the person at the terminal sees: a few lines per stage (the pipeline's own log lines and what
`say` says) and a progress bar for its long step. Everything else a run prints (Ray's worker and Serve
logs, libraries' warnings and progress bars) goes to runs/<name>/logs/<stage>.log. The switch is made
on file descriptors 1 and 2, not on sys.stdout, so that C extensions and the processes Ray starts from
this one are caught too. With `-v` the logs are shown on the terminal as they are written.

Capture is started by the `pipeline` program (cli.entry), never by a library call: a test that
calls cli.main keeps its own stdout."""

from __future__ import annotations

import atexit
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import TextIO

from tqdm import tqdm


class Capture:
    """Descriptors 1 and 2 point at the current stage's log; `terminal` and `errors` at what they were."""

    def __init__(self, log_dir: Path, verbose: bool):
        self.log_dir, self.verbose = Path(log_dir), verbose
        self.log_dir.mkdir(parents=True, exist_ok=True)
        sys.stdout.flush()
        sys.stderr.flush()
        self.terminal: TextIO = os.fdopen(os.dup(1), "w", buffering=1)
        self.errors: TextIO = os.fdopen(os.dup(2), "w", buffering=1)
        self.logs: list[Path] = []
        self._follow: Path | None = None
        self._shown: dict[Path, int] = {}
        self._lock = threading.Lock()
        if verbose:
            threading.Thread(target=self._show_logs, daemon=True, name="show-logs").start()
            atexit.register(self._show_new)  # the last lines, written after the thread's last look

    def log_to(self, name: str) -> Path:
        """From now on, what this process and its children print goes to logs/<name>.log."""
        path = self.log_dir / f"{name}.log"
        if self.verbose:
            self._show_new()  # the rest of the log being left
        sys.stdout.flush()
        sys.stderr.flush()
        with open(path, "ab") as f:
            os.dup2(f.fileno(), 1)
            os.dup2(f.fileno(), 2)
        if path not in self.logs:
            self.logs.append(path)
        self._follow = path
        return path

    def _show_logs(self) -> None:
        """-v: copy the log to the terminal as it grows, moving on to the next when the stage changes."""
        while True:
            self._show_new()
            time.sleep(0.2)

    def _show_new(self) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        with self._lock:
            path = self._follow
            if path is None or not path.is_file():
                return
            with open(path, "rb") as f:
                f.seek(self._shown.get(path, 0))
                chunk = f.read()
            self._shown[path] = self._shown.get(path, 0) + len(chunk)
            if chunk:
                self.terminal.write(chunk.decode(errors="replace"))
                self.terminal.flush()


_capture: Capture | None = None


class _Forgiving:
    """sys.stdout and sys.stderr while captured: a log on a full disk loses lines; it does not fail the run
    (before, these went to a terminal or a pipe, which never fill)."""

    def __init__(self, stream: TextIO):
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except OSError:
            return len(text)

    def flush(self) -> None:
        with suppress(OSError):
            self._stream.flush()

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


class _Lines(logging.Handler):
    """The pipeline's own log lines (this process's), on the terminal as well as in the log."""

    def emit(self, record: logging.LogRecord) -> None:
        prefix = f"{record.levelname.lower()}: " if record.levelno >= logging.WARNING else ""
        tqdm.write(f"{prefix}{record.getMessage()}", file=_capture.terminal)  # above a running bar


def capture(log_dir: Path, first: str, verbose: bool) -> Capture:
    """Send this process's output to log_dir/<first>.log from now until it exits."""
    global _capture
    _capture = Capture(log_dir, verbose)
    sys.stdout, sys.stderr = _Forgiving(sys.stdout), _Forgiving(sys.stderr)
    _capture.log_to(first)
    if not verbose:
        logging.getLogger("pipeline").addHandler(_Lines(logging.INFO))
    return _capture


def log_to(name: str) -> None:
    """The stage that starts now writes its log to logs/<name>.log (nothing when output is not captured)."""
    if _capture is not None:
        _capture.log_to(name)


def say(text: str = "") -> None:
    """A line for the person running the pipeline; the stage's log gets it too, so it reads whole."""
    print(text, flush=True)
    if _capture is not None and not _capture.verbose:  # with -v the log, this line included, is shown
        tqdm.write(text, file=_capture.terminal)


def error(text: str) -> None:
    """A failure's one line, on the terminal's stderr and in the log."""
    print(text, file=sys.stderr, flush=True)
    if _capture is not None:
        if _capture.verbose:
            _capture._show_new()  # the log's last lines before the error
        _capture.errors.write(text + "\n")


def logs() -> list[Path]:
    return list(_capture.logs) if _capture is not None else []


class _Bar:
    """A tqdm bar drawn from the first figure `done()` gives: the minutes Ray takes to start the workers
    are not step time, and a resumed run's bar starts where it resumed."""

    def __init__(self, total: int, desc: str, unit: str, done: Callable[[], int | None]):
        self.total, self.desc, self.unit, self.done = total, desc, unit, done
        self.bar: tqdm | None = None

    def advance(self) -> None:
        if (n := self.done()) is None:
            return
        n = min(n, self.total)
        if self.bar is None:
            self.bar = tqdm(
                total=self.total, initial=n, desc=self.desc, unit=self.unit, file=_capture.terminal, dynamic_ncols=True
            )
        elif n > self.bar.n:
            self.bar.update(n - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


@contextmanager
def progress(total: int, desc: str, done: Callable[[], int | None], unit: str = "step"):
    """A bar on the terminal for a long step run elsewhere (Ray workers): `done()` is polled for how far
    it got. Shown only while output is captured and not with -v (the log shows the same then)."""
    if _capture is None or _capture.verbose or total <= 0:
        yield
        return
    bar = _Bar(total, desc, unit, done)
    stop = threading.Event()

    def poll() -> None:
        while not stop.wait(0.5):
            bar.advance()

    thread = threading.Thread(target=poll, daemon=True, name=f"progress-{desc}")
    thread.start()
    try:
        yield
        bar.advance()
    finally:
        stop.set()
        thread.join()
        bar.close()
