"""What the option nodes' widgets mean is decided by the settings classes, once: empty, zero and padding."""

from __future__ import annotations

import pytest

from sdxl_lora_trainer.trainer.run.checkpoints import CheckpointSettings
from sdxl_lora_trainer.trainer.run.previews import PreviewSettings


def test_preview_prompts_are_the_text_lines():
    settings = PreviewSettings(prompts="a red cube\n\n  a blue ball  \n")
    assert settings.prompts == ("a red cube", "a blue ball")
    assert PreviewSettings(prompts=("kept as given",)).prompts == ("kept as given",)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"prompts": " \n \n"}, "at least one prompt"),
        ({"prompts": "x", "width": 1020}, "multiples of 8"),
        ({"prompts": "x", "height": 60}, "multiples of 8"),
    ],
)
def test_bad_preview_settings_fail_when_the_node_runs(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PreviewSettings(**kwargs)


def test_checkpoint_settings_trim_the_resume_path_and_refuse_negative_counts():
    assert CheckpointSettings(resume_from="  /runs/state-000010\n").resume_from == "/runs/state-000010"
    with pytest.raises(ValueError, match="keep_last_n must be >= 0"):
        CheckpointSettings(keep_last_n=-1)
