"""The one object a training run reports to and asks: progress, cancel, and what happens after each step.

Why an object: a run has one observer (the train node's job: progress bar, previews, intermediate saves,
resumable states, cancel; or a test watching the run). Passing it down the session and the loop replaces a set of
callbacks threaded through three layers and a mutable holder for "the current result".
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .loop import StepRecord
    from .validation import ValidationRecord


class RunEvents:
    """What a training run tells its observer and asks it. Every method does nothing by default.

    Order: ``training_started`` once (inside the training context: the network is attached), then per optimizer
    step ``cancel_requested`` (before the step), ``step_finished`` (after it) and ``validation_finished`` (after a
    step that was validated), and ``training_finished`` once after the last step when the run was not cancelled
    (still inside the context, e.g. for final previews).
    """

    def training_started(self, run: Any) -> None:
        """``run`` is the session's TrainResult: network, optimizer, loop state, the models trained through."""

    def cancel_requested(self) -> bool:
        """Checked at every step boundary: True stops the run there (the state stays resumable)."""
        return False

    def is_cancel(self, error: BaseException) -> bool:
        """True for the host's cancel exception raised from inside a forward/backward (ComfyUI checks its interrupt
        flag in every op): the unfinished step is dropped and the run ends at the last finished one."""
        return False

    def step_finished(self, record: StepRecord) -> None:
        """After every optimizer step; the run's loop state is complete (it can be saved and resumed)."""

    def validation_finished(self, record: ValidationRecord) -> None:
        """After a validation (trainer/run/validation.py), which follows the ``step_finished`` of its step."""

    def training_finished(self) -> None:
        """After the last step of a run that was not cancelled."""
