"""The LoRA network node: kohya's network settings as one value the train node takes."""

from __future__ import annotations

from comfy_api.latest import io

from ..trainer.comfyui import services as comfy_services
from ..trainer.network.config import (
    NETWORK_ALGOS,
    LoraPlusRatios,
    NetworkConfig,
    NetworkSetup,
    dropout_refusal,
    loraplus_refusal,
    rank_dropout_refusal,
)
from ..trainer.network.file_config import config_from_file, file_parts, start_from_refusal
from ..trainer.network.safetensors_file import read_keys
from .common import CATEGORY, range_problems, refuse_at_queue_time
from .sockets import NetworkSocket

NONE = "none"


class NetworkSettings(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SDXLLoraNetwork",
            display_name="SDXL LoRA: Network",
            category=CATEGORY,
            description="kohya networks.lora settings: rank/alpha, conv layers, per-block dims, dropouts, which "
            "parts to train, and an optional LoRA file to continue from.",
            inputs=[
                io.Int.Input(
                    "network_dim",
                    default=16,
                    min=1,
                    max=1024,
                    tooltip="LoRA rank of the attention/linear layers (kohya network_dim).",
                ),
                io.Float.Input(
                    "network_alpha",
                    default=8.0,
                    min=0.0,
                    max=1024.0,
                    step=0.5,
                    tooltip="Scale = alpha / rank. 0 means alpha = rank (kohya).",
                ),
                io.Int.Input(
                    "conv_dim",
                    default=0,
                    min=0,
                    max=1024,
                    tooltip="Rank of LoRA on the 3x3 convs of ResBlocks and Down/Upsample (kohya conv_dim); 0 = off.",
                ),
                io.Float.Input(
                    "conv_alpha", default=1.0, min=0.0, max=1024.0, step=0.5, tooltip="Alpha of the conv LoRA."
                ),
                io.Boolean.Input("train_unet", default=True, tooltip="Train LoRA on the U-Net."),
                io.Boolean.Input(
                    "train_clip_l",
                    default=False,
                    tooltip="Train LoRA on CLIP-L (text encoder 1, "
                    "keys lora_te1_). Needs the CLIP input of the train node; text is encoded live.",
                ),
                io.Boolean.Input(
                    "train_clip_g", default=False, tooltip="Train LoRA on CLIP-G (text encoder 2, keys lora_te2_)."
                ),
                io.Float.Input(
                    "dropout",
                    default=0.0,
                    min=0.0,
                    max=1.0,
                    step=0.01,
                    tooltip="Dropout on the LoRA down-projection output (kohya network_dropout).",
                ),
                io.Float.Input(
                    "rank_dropout",
                    default=0.0,
                    min=0.0,
                    max=1.0,
                    step=0.01,
                    tooltip="Drop whole ranks per sample (kohya rank_dropout).",
                ),
                io.Float.Input(
                    "module_dropout",
                    default=0.0,
                    min=0.0,
                    max=1.0,
                    step=0.01,
                    tooltip="Skip a whole LoRA module per step with this probability (kohya module_dropout).",
                ),
                io.String.Input(
                    "block_dims",
                    default="",
                    tooltip="23 comma-separated ranks for kohya's SDXL "
                    "blocks (0 disables a block); empty = network_dim everywhere.",
                ),
                io.String.Input("block_alphas", default="", tooltip="23 alphas matching block_dims."),
                io.String.Input("conv_block_dims", default="", tooltip="23 conv ranks per block."),
                io.String.Input("conv_block_alphas", default="", tooltip="23 conv alphas per block."),
                io.String.Input(
                    "block_lr_weight", default="", tooltip="23 learning-rate multipliers per block (0 freezes a block)."
                ),
                io.Combo.Input(
                    "start_from",
                    options=[NONE] + comfy_services.lora_file_names(),
                    default=NONE,
                    tooltip="Continue training this file (kohya LoRA, or a LoHa / LoKr / DoRA file of this pack; "
                    "algo must match it): its dims, alphas and LoKr factor replace the ones above, and it decides "
                    "which parts exist. The train toggles decide which of them train: a part in the file whose "
                    "toggle is off is applied frozen and saved back unchanged.",
                ),
                io.Combo.Input(
                    "algo",
                    options=list(NETWORK_ALGOS),
                    default="lora",
                    tooltip="lora: kohya networks.lora. loha / lokr / dora: LyCORIS's LoHa (Hadamard product) "
                    "and LoKr (Kronecker product) modules from the lycoris-lora package, on the "
                    "same layers, saved with LyCORIS's keys (ComfyUI's LoraLoader reads them). "
                    "network_dim/alpha and conv_dim/alpha are their lora_dim/alpha; LoRA+ is "
                    "lora and dora only. dora: DoRA, LyCORIS's LoCon with weight decomposition (dora_wd; the "
                    "magnitude per input channel, the axis ComfyUI's LoraLoader normalises correctly).",
                ),
                io.Int.Input(
                    "lokr_factor",
                    default=-1,
                    min=-1,
                    max=1024,
                    tooltip="LoKr only: LyCORIS's "
                    "Kronecker factor (lycoris-lora 'factor'); -1 = LyCORIS's automatic factorization.",
                ),
                io.Float.Input(
                    "loraplus_lr_ratio",
                    default=0.0,
                    min=0.0,
                    max=1000.0,
                    step=0.5,
                    optional=True,
                    tooltip="LoRA+: lora_up learns at learning rate x this ratio (kohya loraplus_lr_ratio; the "
                    "paper suggests 16). 0 = off, or the training settings' ratio. algo lora and dora.",
                ),
                io.Float.Input(
                    "loraplus_unet_lr_ratio",
                    default=0.0,
                    min=0.0,
                    max=1000.0,
                    step=0.5,
                    optional=True,
                    tooltip="LoRA+ ratio of the U-Net only (kohya loraplus_unet_lr_ratio); 0 = loraplus_lr_ratio.",
                ),
                io.Float.Input(
                    "loraplus_text_encoder_lr_ratio",
                    default=0.0,
                    min=0.0,
                    max=1000.0,
                    step=0.5,
                    optional=True,
                    tooltip="LoRA+ ratio of CLIP-L and CLIP-G (kohya loraplus_text_encoder_lr_ratio); "
                    "0 = loraplus_lr_ratio.",
                ),
            ],
            outputs=[NetworkSocket.Output(display_name="network", tooltip="Network settings for the train node.")],
        )

    @classmethod
    def validate_inputs(
        cls,
        start_from: str = NONE,
        algo: str = "lora",
        rank_dropout: float = 0.0,
        dropout: float = 0.0,
        train_unet: bool = True,
        train_clip_l: bool = False,
        train_clip_g: bool = False,
        loraplus_lr_ratio: float = 0.0,
        loraplus_unet_lr_ratio: float = 0.0,
        loraplus_text_encoder_lr_ratio: float = 0.0,
    ) -> bool | str:
        """Naming start_from here makes ComfyUI skip its stale-list check: a LoRA saved by an earlier run of
        this server is accepted before the browser reloads the list; execute resolves it or says why not.
        A start_from file is checked against algo and the train toggles here, from its header, so a mismatch is
        said when the prompt is queued, not after minutes of loading and caching.
        No **kwargs: with them ComfyUI would skip its min/max and option checks of every other input too; the
        min/max of the inputs named here are checked here (ComfyUI skips them), and all problems come in one message."""
        ratios = (loraplus_lr_ratio, loraplus_unet_lr_ratio, loraplus_text_encoder_lr_ratio)
        problems = range_problems(
            cls,
            {
                "rank_dropout": rank_dropout,
                "dropout": dropout,
                "loraplus_lr_ratio": loraplus_lr_ratio,
                "loraplus_unet_lr_ratio": loraplus_unet_lr_ratio,
                "loraplus_text_encoder_lr_ratio": loraplus_text_encoder_lr_ratio,
            },
        )
        if not isinstance(algo, str):
            return refuse_at_queue_time(problems)
        if isinstance(rank_dropout, (int, float)) and (refusal := rank_dropout_refusal(algo, rank_dropout)):
            problems.append(refusal)
        if isinstance(dropout, (int, float)) and (refusal := dropout_refusal(algo, dropout)):
            problems.append(refusal)
        if all(isinstance(r, (int, float)) for r in ratios) and (refusal := loraplus_refusal(algo, any(ratios))):
            problems.append(refusal)
        toggles = (train_unet, train_clip_l, train_clip_g)
        if isinstance(start_from, str) and start_from != NONE and all(isinstance(t, bool) for t in toggles):
            try:
                keys = read_keys(comfy_services.lora_file_path(start_from))
            except Exception:  # noqa: BLE001 - not (yet) listed or unreadable: execute says why
                keys = None
            if keys is not None and (refusal := start_from_refusal(start_from, keys, algo, *toggles)):
                problems.append(refusal)
        return refuse_at_queue_time(problems)

    @classmethod
    def execute(
        cls,
        network_dim: int,
        network_alpha: float,
        conv_dim: int,
        conv_alpha: float,
        train_unet: bool,
        train_clip_l: bool,
        train_clip_g: bool,
        dropout: float,
        rank_dropout: float,
        module_dropout: float,
        block_dims: str,
        block_alphas: str,
        conv_block_dims: str,
        conv_block_alphas: str,
        block_lr_weight: str,
        start_from: str,
        algo: str = "lora",
        lokr_factor: int = -1,
        loraplus_lr_ratio: float = 0.0,
        loraplus_unet_lr_ratio: float = 0.0,
        loraplus_text_encoder_lr_ratio: float = 0.0,
    ) -> io.NodeOutput:
        common = {
            "dropout": dropout,
            "rank_dropout": rank_dropout,
            "module_dropout": module_dropout,
            "train_unet": train_unet,
            "train_te1": train_clip_l,
            "train_te2": train_clip_g,
            "block_lr_weight": block_lr_weight,
        }
        initial = None
        if start_from != NONE:
            initial = comfy_services.load_safetensors(comfy_services.lora_file_path(start_from))
            refusal = start_from_refusal(start_from, initial, algo, train_unet, train_clip_l, train_clip_g)
            if refusal:
                raise ValueError(refusal)
            toggles = {"unet": train_unet, "te1": train_clip_l, "te2": train_clip_g}
            frozen = tuple(part for part in file_parts(initial) if not toggles[part])
            common = {k: v for k, v in common.items() if not k.startswith("train_")}
            config = config_from_file(initial, frozen_parts=frozen, **common)
        else:
            config = NetworkConfig(
                network_dim=network_dim,
                network_alpha=network_alpha,
                conv_dim=conv_dim,
                conv_alpha=conv_alpha,
                block_dims=block_dims,
                block_alphas=block_alphas,
                conv_block_dims=conv_block_dims,
                conv_block_alphas=conv_block_alphas,
                algo=algo,
                factor=lokr_factor,
                **common,
            )
        if not any(config.trains(part) for part in ("unet", "te1", "te2")):
            raise ValueError("Nothing to train: enable train_unet, train_clip_l or train_clip_g.")
        loraplus = LoraPlusRatios(loraplus_lr_ratio, loraplus_unet_lr_ratio, loraplus_text_encoder_lr_ratio)
        refusal = loraplus_refusal(config.algo, loraplus.any)
        if refusal:
            raise ValueError(refusal)
        return io.NodeOutput(
            NetworkSetup(config=config, start_from=start_from, initial_weights=initial, loraplus=loraplus)
        )


NODES = [NetworkSettings]
