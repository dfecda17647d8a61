"""Hand the graph's training to kohya sd-scripts (an accelerate run folder) and read kohya's settings back."""

from __future__ import annotations

from dataclasses import replace

from comfy_api.latest import io

from ..trainer.comfyui import graph as comfy_graph
from ..trainer.comfyui import models as comfy_models
from ..trainer.comfyui import services as comfy_services
from ..trainer.data.sources import resolve_dataset_path
from ..trainer.kohya_config.config_import import (
    args_from_metadata,
    from_kohya_args,
    read_kohya_config_file,
)
from ..trainer.kohya_config.export_folder import export_kohya_run
from ..trainer.kohya_config.run import CacheChoices, KohyaRun
from ..trainer.network.safetensors_file import read_metadata
from ..trainer.objective.batch_loss import ObjectiveSettings
from ..trainer.run.checkpoints import CheckpointSettings
from ..trainer.run.config import TrainSettings
from ..trainer.run.validation import ValidationRequest
from .common import CATEGORY
from .sockets import (
    CheckpointingSocket,
    DatasetSocket,
    LatentCacheSocket,
    NetworkSocket,
    ObjectiveSocket,
    PreviewsSocket,
    TextCacheSocket,
    TrainSettingsSocket,
    ValidationSocket,
)
from .train_node import with_objective

NONE = "none"


class ImportKohyaConfig(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SDXLLoraKohyaImport",
            display_name="SDXL LoRA: Import kohya Config",
            category=f"{CATEGORY}/kohya",
            description="Reads a kohya sd-scripts training config (--config_file TOML) or the ss_* metadata of a "
            "kohya LoRA and outputs the Network, Loss & Noise, Train and Save Every N settings. Every key is "
            "either applied or named in the report with where the graph sets it instead.",
            inputs=[
                io.String.Input(
                    "config_file",
                    default="",
                    tooltip="Path of kohya's config .toml (relative paths: ComfyUI's input directory). Leave empty "
                    "to read a LoRA's metadata instead.",
                ),
                io.Combo.Input(
                    "lora_metadata",
                    options=[NONE] + comfy_services.lora_file_names(),
                    default=NONE,
                    tooltip="A kohya LoRA whose ss_* metadata holds the settings it was trained with.",
                ),
            ],
            outputs=[
                NetworkSocket.Output(display_name="network"),
                ObjectiveSocket.Output(display_name="objective"),
                TrainSettingsSocket.Output(display_name="train_settings"),
                CheckpointingSocket.Output(display_name="checkpointing"),
                io.String.Output(display_name="report"),
                ValidationSocket.Output(
                    display_name="validation",
                    tooltip="kohya's validate_every_n_steps/epochs, max_validation_steps and validation_seed, for the "
                    "Train node's validation input (validation_split is set on the dataset node).",
                ),
            ],
        )

    @classmethod
    def validate_inputs(cls, config_file: str = "", lora_metadata: str = NONE) -> bool | str:
        """Exactly one source, said when the prompt is queued (lora_metadata named here also skips ComfyUI's
        stale-list check, so a LoRA saved after the page loaded is accepted)."""
        if not isinstance(config_file, str) or not isinstance(lora_metadata, str):
            return True
        if bool(config_file.strip()) == (lora_metadata != NONE):
            return "Give either config_file (a kohya config .toml) or lora_metadata (a kohya LoRA), not both or none."
        return True

    @classmethod
    def execute(cls, config_file: str, lora_metadata: str) -> io.NodeOutput:
        from ..trainer.network.config import NetworkSetup

        if config_file.strip():
            path, _ = resolve_dataset_path(config_file, comfy_services.input_directory())
            imported = from_kohya_args(read_kohya_config_file(path), source=str(path))
        else:
            path = comfy_services.lora_file_path(lora_metadata)
            imported = from_kohya_args(args_from_metadata(read_metadata(path)), source=f"{lora_metadata} (ss_*)")
        report = imported.report()
        train = imported.train
        return io.NodeOutput(
            NetworkSetup(config=imported.network, loraplus=imported.loraplus),
            ObjectiveSettings(loss=train.loss, noise=train.noise),
            TrainSettings(train, source=imported.source),
            imported.checkpointing,
            report,
            ValidationRequest(settings=imported.validation),
            ui={"text": [report]},
        )


class ExportKohyaRun(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SDXLLoraKohyaExport",
            display_name="SDXL LoRA: Export kohya Run",
            category=f"{CATEGORY}/kohya",
            description="Writes the graph's training as a kohya sd-scripts run for accelerate (multi-GPU): "
            "dataset.toml + the images and captions, config.toml, launch.sh and README.txt, into "
            "output/kohya_runs/<export_name>. Settings kohya has no argument for are listed, never dropped.",
            is_output_node=True,
            inputs=[
                DatasetSocket.Input("dataset", tooltip="The dataset the Train node trains on."),
                NetworkSocket.Input("network", tooltip="From 'Network' (or 'Import kohya Config')."),
                TrainSettingsSocket.Input(
                    "train_settings", tooltip="From 'Train Settings' (or 'Import kohya Config')."
                ),
                io.String.Input("export_name", default="my_sdxl_lora_run", tooltip="Folder name in output/kohya_runs."),
                io.Int.Input(
                    "num_processes",
                    default=1,
                    min=1,
                    max=64,
                    tooltip="GPUs for accelerate launch --num_processes (with --multi_gpu when > 1).",
                ),
                io.String.Input("output_name", default="my_sdxl_lora", tooltip="kohya --output_name of the LoRA."),
                io.Combo.Input(
                    "save_precision", options=["fp16", "bf16", "fp32"], default="fp16", tooltip="dtype of the LoRA."
                ),
                io.Model.Input(
                    "model",
                    optional=True,
                    tooltip="The MODEL the Train node gets: names the checkpoint file for kohya, LoRAs merged "
                    "upstream (kohya --base_weights) and v-prediction.",
                ),
                ObjectiveSocket.Input("objective", optional=True, tooltip="From 'Loss & Noise (advanced)'."),
                CheckpointingSocket.Input("checkpointing", optional=True, tooltip="From 'Save Every N & Resume'."),
                PreviewsSocket.Input("previews", optional=True, tooltip="From 'Sample Previews'."),
                LatentCacheSocket.Input(
                    "latents", optional=True, tooltip="From 'Cache Latents': its disk/batch/float32 VAE options."
                ),
                TextCacheSocket.Input(
                    "text",
                    optional=True,
                    tooltip="From 'Cache Text': fixed captions let kohya cache text too; its max_token_length is "
                    "exported.",
                ),
                ValidationSocket.Input(
                    "validation", optional=True, tooltip="From 'Validation': kohya's validate_every_n_* arguments."
                ),
            ],
            outputs=[
                io.String.Output(display_name="folder", tooltip="The exported run folder."),
                io.String.Output(display_name="report", tooltip="What was written, and what kohya does differently."),
            ],
            hidden=[io.Hidden.unique_id, io.Hidden.prompt],
        )

    @classmethod
    def execute(
        cls,
        dataset,
        network,
        train_settings,
        export_name: str,
        num_processes: int,
        output_name: str,
        save_precision: str,
        model=None,
        objective=None,
        checkpointing=None,
        previews=None,
        latents=None,
        text=None,
        validation=None,
    ) -> io.NodeOutput:
        source = comfy_graph.model_source(cls.hidden.prompt, cls.hidden.unique_id) if model is not None else None
        config = network.config
        caching = CacheChoices()
        if latents is not None:
            caching = CacheChoices(
                latents_to_disk=bool(latents.disk_dir),
                vae_batch_size=int(latents.batch_size),
                float32_vae=bool(latents.float32_vae),
            )
        fixed_text = text is not None and not text.live_indices and not (config.train_te1 or config.train_te2)
        if fixed_text:
            caching = CacheChoices(
                caching.latents_to_disk,
                caching.vae_batch_size,
                caching.float32_vae,
                text_encoder_outputs=True,
                text_encoder_outputs_to_disk=bool(text.disk_dir),
            )
        train = with_objective(train_settings.config, objective).with_loraplus(network.loraplus)
        run = KohyaRun(
            network=config,
            train=replace(
                train, token_length=train.resolve_token_length(text.token_length if text is not None else None)
            ),
            output_name=output_name,
            save_precision=save_precision,
            checkpointing=checkpointing or CheckpointSettings(),
            previews=previews.settings if previews is not None else None,
            caching=caching,
            network_weights=comfy_services.lora_file_path(network.start_from) if network.initial_weights else None,
            checkpoint_path=source.checkpoint_path if source else None,
            base_weights=tuple((path, strength) for _, path, strength in source.loras) if source else (),
            v_parameterization=model is not None and comfy_models.prediction_type(model) == "v_prediction",
            validation=validation,
        )
        export = export_kohya_run(run, dataset, comfy_services.output_directory(), export_name, num_processes)
        lines = export.report().split("\n")
        if source is not None:
            lines += [f"  note: {note}" for note in source.notes]
        if model is None:
            lines.append("  note: no MODEL connected: set pretrained_model_name_or_path in config.toml")
        report = "\n".join(lines)
        return io.NodeOutput(str(export.folder), report, ui={"text": [report]})


NODES = [ImportKohyaConfig, ExportKohyaRun]
