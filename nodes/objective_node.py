"""Advanced objective settings: kohya's loss and noise options, as one optional input of the train node."""

from __future__ import annotations

from comfy_api.latest import io

from ..trainer.objective.batch_loss import ObjectiveSettings
from ..trainer.objective.loss_weighting import HUBER_SCHEDULES, LOSS_TYPES, LossSettings
from ..trainer.objective.noise import NoiseSettings
from .common import CATEGORY
from .sockets import ObjectiveSocket


class LossAndNoise(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SDXLLoraObjective",
            display_name="SDXL LoRA: Loss & Noise (advanced)",
            category=CATEGORY,
            description="kohya's loss and noise options. Without this node the train node uses kohya's defaults "
            "(plain MSE on epsilon, or v for v-prediction models, timesteps 0..999).",
            inputs=[
                io.Combo.Input(
                    "loss_type",
                    options=list(LOSS_TYPES),
                    default="l2",
                    tooltip="l2 (MSE), l1, huber or smooth_l1 (kohya loss_type).",
                ),
                io.Combo.Input(
                    "huber_schedule",
                    options=list(HUBER_SCHEDULES),
                    default="snr",
                    tooltip="How the huber c parameter varies with the timestep.",
                ),
                io.Float.Input("huber_c", default=0.1, min=0.0, max=10.0, step=0.01, tooltip="Huber c."),
                io.Float.Input(
                    "huber_scale",
                    default=1.0,
                    min=0.0,
                    max=10.0,
                    step=0.01,
                    tooltip="Huber scale (ignored by the snr schedule, as in kohya).",
                ),
                io.Float.Input(
                    "min_snr_gamma",
                    default=0.0,
                    min=0.0,
                    max=100.0,
                    step=0.5,
                    tooltip="Min-SNR weighting gamma (5 is common); 0 = off.",
                ),
                io.Boolean.Input("debiased_estimation", default=False, tooltip="Debiased estimation loss weight."),
                io.Boolean.Input(
                    "scale_v_pred_loss_like_noise_pred",
                    default=False,
                    tooltip="v-prediction models only: weight the loss like noise prediction.",
                ),
                io.Float.Input(
                    "v_pred_like_loss",
                    default=0.0,
                    min=0.0,
                    max=10.0,
                    step=0.01,
                    tooltip="epsilon models only: add a v-prediction-like loss with this weight; 0 = off.",
                ),
                io.Float.Input(
                    "noise_offset",
                    default=0.0,
                    min=0.0,
                    max=1.0,
                    step=0.001,
                    tooltip="Noise offset (0.0357 is common); 0 = off.",
                ),
                io.Boolean.Input(
                    "noise_offset_random_strength",
                    default=False,
                    tooltip="Random offset strength in [0, noise_offset].",
                ),
                io.Float.Input(
                    "adaptive_noise_scale",
                    default=0.0,
                    min=0.0,
                    max=1.0,
                    step=0.001,
                    tooltip="Adds |latent mean| x this to the offset (needs noise_offset); 0 = off.",
                ),
                io.Int.Input(
                    "multires_noise_iterations",
                    default=0,
                    min=0,
                    max=20,
                    tooltip="Pyramid (multires) noise levels; 0 = off.",
                ),
                io.Float.Input(
                    "multires_noise_discount",
                    default=0.3,
                    min=0.0,
                    max=1.0,
                    step=0.01,
                    tooltip="Per-level discount of multires noise.",
                ),
                io.Float.Input(
                    "ip_noise_gamma",
                    default=0.0,
                    min=0.0,
                    max=1.0,
                    step=0.01,
                    tooltip="Input perturbation noise (0.1 is common); 0 = off.",
                ),
                io.Boolean.Input(
                    "ip_noise_gamma_random_strength",
                    default=False,
                    tooltip="Random ip noise strength in [0, ip_noise_gamma].",
                ),
                io.Int.Input("min_timestep", default=0, min=0, max=1000, tooltip="Smallest training timestep."),
                io.Int.Input(
                    "max_timestep",
                    default=1000,
                    min=1,
                    max=1000,
                    tooltip="Timesteps are drawn from [min_timestep, max_timestep).",
                ),
                io.Float.Input(
                    "prior_loss_weight",
                    default=1.0,
                    min=0.0,
                    max=10.0,
                    step=0.05,
                    optional=True,
                    tooltip="Loss weight of regularization (class) images, kohya prior_loss_weight; other images "
                    "weigh 1.",
                ),
            ],
            outputs=[
                ObjectiveSocket.Output(display_name="objective", tooltip="Connect to the train node's objective input.")
            ],
        )

    @classmethod
    def execute(
        cls,
        loss_type: str,
        huber_schedule: str,
        huber_c: float,
        huber_scale: float,
        min_snr_gamma: float,
        debiased_estimation: bool,
        scale_v_pred_loss_like_noise_pred: bool,
        v_pred_like_loss: float,
        noise_offset: float,
        noise_offset_random_strength: bool,
        adaptive_noise_scale: float,
        multires_noise_iterations: int,
        multires_noise_discount: float,
        ip_noise_gamma: float,
        ip_noise_gamma_random_strength: bool,
        min_timestep: int,
        max_timestep: int,
        prior_loss_weight: float = 1.0,
    ) -> io.NodeOutput:
        loss = LossSettings(
            loss_type=loss_type,
            huber_schedule=huber_schedule,
            huber_c=huber_c,
            huber_scale=huber_scale,
            min_snr_gamma=min_snr_gamma,
            scale_v_pred_loss_like_noise_pred=scale_v_pred_loss_like_noise_pred,
            v_pred_like_loss=v_pred_like_loss,
            debiased_estimation_loss=debiased_estimation,
            prior_loss_weight=prior_loss_weight,
        )
        noise = NoiseSettings(
            noise_offset=noise_offset,
            noise_offset_random_strength=noise_offset_random_strength,
            adaptive_noise_scale=adaptive_noise_scale,
            multires_noise_iterations=multires_noise_iterations,
            multires_noise_discount=multires_noise_discount,
            min_timestep=min_timestep,
            max_timestep=max_timestep,
            ip_noise_gamma=ip_noise_gamma,
            ip_noise_gamma_random_strength=ip_noise_gamma_random_strength,
        )
        if min_timestep >= max_timestep:
            raise ValueError(f"min_timestep ({min_timestep}) must be below max_timestep ({max_timestep}).")
        return io.NodeOutput(ObjectiveSettings(loss=loss, noise=noise))


NODES = [LossAndNoise]
