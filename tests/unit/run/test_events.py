"""RunObservers: several observers of one run hear every event in order; any one of them can stop it."""

from __future__ import annotations

from sdxl_lora_trainer.trainer.run.events import RunEvents, RunObservers
from sdxl_lora_trainer.trainer.run.loop import StepRecord
from sdxl_lora_trainer.trainer.run.validation import ValidationRecord


class Recorder(RunEvents):
    def __init__(self, name: str, log: list, cancel: bool = False) -> None:
        self.name, self.log, self.cancel = name, log, cancel

    def training_started(self, run) -> None:
        self.log.append((self.name, "started", run))

    def cancel_requested(self) -> bool:
        return self.cancel

    def is_cancel(self, error: BaseException) -> bool:
        return self.cancel and isinstance(error, KeyboardInterrupt)

    def step_finished(self, record) -> None:
        self.log.append((self.name, "step", record.step))

    def training_finished(self) -> None:
        self.log.append((self.name, "finished"))

    def previews_rendered(self, step, images) -> None:
        self.log.append((self.name, "previews", step, len(images)))

    def validation_finished(self, record) -> None:
        self.log.append((self.name, "validation", record.step, record.loss))


def test_every_observer_hears_every_event_in_order():
    log: list = []
    group = RunObservers(Recorder("job", log), Recorder("log", log))
    group.training_started("run")
    group.step_finished(StepRecord(step=3, epoch=1, loss=0.1, lr=1e-4, timestep_mean=1.0, seconds=0.1))
    group.previews_rendered(3, [object(), object()])
    group.validation_finished(ValidationRecord(step=3, epoch=1, loss=0.25, kind="step", seconds=0.0))
    group.training_finished()
    assert log == [
        ("job", "started", "run"),
        ("log", "started", "run"),
        ("job", "step", 3),
        ("log", "step", 3),
        ("job", "previews", 3, 2),
        ("log", "previews", 3, 2),
        ("job", "validation", 3, 0.25),
        ("log", "validation", 3, 0.25),
        ("job", "finished"),
        ("log", "finished"),
    ]


def test_any_observer_can_cancel():
    quiet = RunObservers(Recorder("a", []), RunEvents())
    assert not quiet.cancel_requested() and not quiet.is_cancel(KeyboardInterrupt())
    stopping = RunObservers(RunEvents(), Recorder("b", [], cancel=True))
    assert stopping.cancel_requested() and stopping.is_cancel(KeyboardInterrupt())
    assert not stopping.is_cancel(ValueError())
