"""kohya's SDXL module set on ComfyUI's modules: which layers get an adapter, their names, blocks, dims.

Target containers are found by CLASS NAME, so this file needs no ComfyUI import. The mapping (kohya -> ComfyUI):

===========================  ==============================================================  =====================
kohya class                  ComfyUI class                                                   what gets LoRA
===========================  ==============================================================  =====================
Transformer2DModel           ``SpatialTransformer`` (comfy/ldm/modules/attention.py)          every Linear inside
ResnetBlock2D                ``ResBlock`` (comfy/ldm/modules/diffusionmodules/openaimodel.py)  with conv_dim only
Downsample2D / Upsample2D    ``Downsample`` / ``Upsample`` (openaimodel.py)                   with conv_dim only
CLIPAttention, CLIPMLP       ``CLIPAttention``, ``CLIPMLP`` (comfy/clip_model.py)             every Linear inside
===========================  ==============================================================  =====================

kohya's own class names are accepted too. Inside a container every ``torch.nn.Linear`` / ``torch.nn.Conv2d``
(ComfyUI's ``comfy.ops`` classes subclass them) gets a module; Linear and 1x1 convs use network_dim/alpha, other
convs conv_dim/alpha (kohya quirk K10). Names: ``lora_unet_`` / ``lora_te1_`` / ``lora_te2_`` + the module path with '.'
replaced by '_' (ComfyUI's SDXL U-Net keeps SGM paths, the same ones kohya's sdxl_original_unet uses, and ComfyUI's
CLIPTextModel keeps ``text_model.encoder.layers.N...``), which is what ComfyUI's comfy/lora.py maps back.

Shared by every network algorithm (LoRA, LoHa, LoKr): one NetworkConfig means the same module set for each.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .config import NetworkConfig

# ----------------------------------------------------------------------------------------------------------------
# kohya constants

SDXL_NUM_BLOCKS = 23  # 1 (time/label emb) + 9 input + 3 middle + 9 output + 1 (out); LoRA only in 1..21
SDXL_NUM_IN_OUT_BLOCKS = 9
SDXL_NUM_MID_BLOCKS = 3

PREFIX_UNET = "lora_unet"
PREFIX_TE1 = "lora_te1"
PREFIX_TE2 = "lora_te2"

#: containers whose Linear layers always get LoRA (ComfyUI name and kohya name)
UNET_LINEAR_CONTAINERS = frozenset({"SpatialTransformer", "Transformer2DModel"})
#: containers added when conv LoRA is on (conv_dim / conv_block_dims / loading from weights)
UNET_CONV_CONTAINERS = frozenset({"ResBlock", "Downsample", "Upsample", "ResnetBlock2D", "Downsample2D", "Upsample2D"})
#: kohya's TEXT_ENCODER_TARGET_REPLACE_MODULE; ComfyUI's classes carry the same names
TE_CONTAINERS = frozenset({"CLIPAttention", "CLIPSdpaAttention", "CLIPMLP"})
#: kohya's creation order inside a container follows transformers' attribute order (k, v, q, out); ComfyUI
#: defines q, k, v, out. Only the ORDER (init draws, state-dict order) depends on this, never the set.
_CHILD_ORDER = {
    "CLIPAttention": ("k_proj", "v_proj", "q_proj", "out_proj"),
    "CLIPSdpaAttention": ("k_proj", "v_proj", "q_proj", "out_proj"),
}

AlphaLike = float | int | torch.Tensor | None


def sdxl_block_index(lora_name: str) -> int:
    """kohya's ``get_block_index(name, is_sdxl=True)``: 0 emb, 1-9 input, 10-12 middle, 13-21 output, 22 out, -1 TE."""
    if not lora_name.startswith(PREFIX_UNET + "_"):
        return -1
    name = lora_name[len(PREFIX_UNET) + 1 :]
    parts = name.split("_")
    if name.startswith(("time_embed_", "label_emb_")):
        return 0
    if name.startswith("input_blocks_"):
        return 1 + int(parts[2])
    if name.startswith("middle_block_"):
        return 10 + int(parts[2])
    if name.startswith("output_blocks_"):
        return 13 + int(parts[2])
    if name.startswith("out_"):
        return 22
    return -1


# ----------------------------------------------------------------------------------------------------------------
# the network


def _iter_targets(root: torch.nn.Module, containers: frozenset) -> Iterator[tuple[str, torch.nn.Module]]:
    """(path, Linear/Conv2d) inside every container, in kohya's order (named_modules; _CHILD_ORDER inside)."""
    for name, module in root.named_modules():
        cls = type(module).__name__
        if cls not in containers:
            continue
        children = list(module.named_modules())
        order = _CHILD_ORDER.get(cls)
        if order:
            rank = {n: i for i, n in enumerate(order)}
            children.sort(key=lambda c: rank.get(c[0], len(order)))  # stable: others keep their order
        for child_name, child in children:
            if isinstance(child, (torch.nn.Linear, torch.nn.Conv2d)):
                path = ".".join(p for p in (name, child_name) if p)
                yield path, child


@dataclass(frozen=True)
class TargetModule:
    """One module kohya's network would adapt: its kohya name, ComfyUI's module, and the dim/alpha it gets."""

    name: str
    module: torch.nn.Module
    dim: int
    alpha: AlphaLike
    dim_source: str
    is_conv3x3: bool  # a conv whose kernel is not 1x1 (gets conv_dim / conv_alpha)
    block_index: int
    trained: bool  # False only for TE modules of an untrained TE (made for kohya's init stream, then dropped)


def iter_target_modules(
    unet: torch.nn.Module | None,
    te1: torch.nn.Module | None,
    te2: torch.nn.Module | None,
    config: NetworkConfig,
    include_untrained: bool = False,
) -> list[TargetModule]:
    """kohya's module discovery and dim/alpha choice, shared by every network algorithm (LoRA, LoHa, LoKr).

    Order is kohya's creation order: TE1, TE2, U-Net. Modules whose dim resolves to 0 are skipped. With
    ``include_untrained`` the TE modules of a given but untrained TE are listed too (``trained=False``), which
    LoRANetwork needs to reproduce kohya's init draws. Raises when a trained part has no model, or when
    ``config.module_dims`` names modules that are not found among the trained targets.
    """
    if config.train_unet and unet is None:
        raise ValueError("config.train_unet is set but no U-Net was given")
    if config.train_te1 and te1 is None:
        raise ValueError("config.train_te1 is set but no text encoder 1 (CLIP-L) was given")
    if config.train_te2 and te2 is None:
        raise ValueError("config.train_te2 is set but no text encoder 2 (CLIP-G) was given")

    wanted = {n: (d, a) for n, d, a in config.module_dims} if config.module_dims is not None else None
    block = config.resolved_block_dims() if config.block_mode else None
    conv_alpha = 1.0 if config.conv_alpha is None else config.conv_alpha

    def make(
        prefix: str, root: torch.nn.Module, containers: frozenset, is_unet: bool, trained: bool
    ) -> list[TargetModule]:
        out = []
        for path, child in _iter_targets(root, containers):
            name = (prefix + "." + path).replace(".", "_")
            small = isinstance(child, torch.nn.Linear) or tuple(child.kernel_size) == (1, 1)
            dim, alpha, source = None, None, None
            if wanted is not None:
                if name in wanted:
                    (dim, alpha), source = wanted[name], "weights"
            elif is_unet and block is not None:
                dims, alphas, conv_dims, conv_alphas = block
                idx = sdxl_block_index(name)
                if small:
                    dim, alpha, source = dims[idx], alphas[idx], "block_dims"
                elif conv_dims is not None:
                    dim, alpha, source = conv_dims[idx], conv_alphas[idx], "conv_block_dims"
            elif small:
                dim, alpha, source = config.network_dim, config.network_alpha, "network_dim"
            elif config.conv_dim is not None:
                dim, alpha, source = config.conv_dim, conv_alpha, "conv_dim"
            if not dim:
                continue
            out.append(TargetModule(name, child, dim, alpha, source, not small, sdxl_block_index(name), trained))
        return out

    targets: list[TargetModule] = []
    for prefix, root, train in ((PREFIX_TE1, te1, config.train_te1), (PREFIX_TE2, te2, config.train_te2)):
        if root is not None and (train or include_untrained):
            targets += make(prefix, root, TE_CONTAINERS, False, train)
    if unet is not None and config.train_unet:
        containers = UNET_LINEAR_CONTAINERS | (UNET_CONV_CONTAINERS if config.conv_enabled else frozenset())
        targets += make(PREFIX_UNET, unet, containers, True, True)

    if wanted is not None:
        found = {t.name for t in targets if t.trained}
        missing = [n for n in wanted if n not in found]
        if missing:
            raise ValueError(
                f"{len(missing)} LoRA modules of the state dict match no module of the given models "
                f"(or belong to a model that was not given), e.g. {missing[:5]}"
            )
    return targets
