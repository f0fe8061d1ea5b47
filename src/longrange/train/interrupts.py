"""SIGINT (Ctrl-C) and SIGTERM (what schedulers send) during training.

The handlers only record the request; the training loop honours it between steps: it saves
a checkpoint (atomically, unless the last one is of this very step), releases what the run
holds outside Python (the Memorizing family's memory files, the run folder's lock) and
raises :class:`TrainingInterrupted`, which the CLI turns into exit status 128 + the signal
number (130 for SIGINT, 143 for SIGTERM). A second signal abandons the current step at once,
without a checkpoint. Handlers are installed only in the main thread (Python allows no
other), and the previous ones come back when training ends.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped by a signal after ``step``. ``checkpoint`` is the folder saved on the
    way out; None when none was (the step's checkpoint existed already, the step was part of
    a run of non-finite steps, or training had not started). ``run_dir`` is set once the run
    folder exists, ``saved_step`` is the step of its latest checkpoint (None: none yet)."""

    def __init__(
        self,
        signum: int,
        *,
        step: int | None = None,
        checkpoint: Path | None = None,
        run_dir: Path | None = None,
        saved_step: int | None = None,
        again: bool = False,
    ) -> None:
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        self.run_dir, self.saved_step = run_dir, saved_step
        name = signal.Signals(signum).name
        if again:
            text = f"interrupted by {name} a second time: stopped at once, without a checkpoint"
        elif checkpoint is not None:
            text = f"interrupted by {name} after step {step}: saved checkpoint {checkpoint}"
        elif run_dir is not None:
            latest = "none yet" if saved_step is None else f"step {saved_step}"
            text = f"interrupted by {name} after step {step}; latest checkpoint: {latest}"
        else:
            text = f"interrupted by {name} before training started; nothing was written"
        super().__init__(text)

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class StopRequests:
    """``with StopRequests() as stop:`` ... ``stop.signum`` is the first signal received (or
    None); a second signal raises :class:`TrainingInterrupted` where the code is."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, _frame) -> None:
        if self.signum is not None:
            raise TrainingInterrupted(signum, again=True)
        self.signum = signum
