"""The one object a training run reports to and asks: progress, cancel, and what happens after each step.

Why an object: a run has one observer (the train node's job: progress bar, previews, intermediate saves,
resumable states, cancel; or a test watching the run). Passing it down the session and the loop replaces a set of
callbacks threaded through three layers and a mutable holder for "the current result".
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

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

    def previews_rendered(self, step: int, images: list[torch.Tensor]) -> None:
        """Sample previews of the LoRA at optimizer step ``step`` (ComfyUI IMAGEs [1,H,W,3], one per prompt); told
        by the observer that renders them."""


class RunObservers(RunEvents):
    """Several observers of one run (the train node's job, the live log), each told every event in the order given;
    the run stops when any of them asks to cancel or recognises a cancel."""

    def __init__(self, *observers: RunEvents) -> None:
        self.observers = observers

    def training_started(self, run: Any) -> None:
        for o in self.observers:
            o.training_started(run)

    def cancel_requested(self) -> bool:
        return any(o.cancel_requested() for o in self.observers)

    def is_cancel(self, error: BaseException) -> bool:
        return any(o.is_cancel(error) for o in self.observers)

    def step_finished(self, record: StepRecord) -> None:
        for o in self.observers:
            o.step_finished(record)

    def training_finished(self) -> None:
        for o in self.observers:
            o.training_finished()

    def previews_rendered(self, step: int, images: list[torch.Tensor]) -> None:
        for o in self.observers:
            o.previews_rendered(step, images)

    def validation_finished(self, record: ValidationRecord) -> None:
        for o in self.observers:
            o.validation_finished(record)
