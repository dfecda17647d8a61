"""What every network algorithm shares: ``AdapterNetwork``, adapter modules on the shared model under kohya's names.

ComfyUI's U-Net / CLIP modules are shared with the rest of the graph, so a network never changes them: it keeps
references and adds forward hooks inside ``attach()`` only. The registration, views, hooks, multiplier, optimizer
groups, strict loading, state-dict export and max-norm bookkeeping live here; an algorithm (lora.py, loha.py,
lokr.py) supplies its module class and per-module math through the small methods marked "per algorithm".
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import ClassVar, Generic, TypeVar

import torch

from .config import NetworkConfig, PartSettings, parse_block_list
from .targets import PREFIX_TE1, PREFIX_TE2, PREFIX_UNET, TargetModule, iter_target_modules

ModuleT = TypeVar("ModuleT", bound=torch.nn.Module)
NetworkT = TypeVar("NetworkT", bound="AdapterNetwork")


@dataclass(frozen=True)
class MaxNormStats:
    """What max-norm did, as device tensors (reading them is a sync; the training loop never does)."""

    norms: torch.Tensor | None  # [modules] norm after scaling
    scaled: torch.Tensor | None  # [modules] bool: was this module scaled

    @classmethod
    def of(cls, norms: Sequence[torch.Tensor], ratios: Sequence[torch.Tensor]) -> MaxNormStats:
        if not norms:
            return cls(None, None)
        return cls(torch.stack(list(norms)), torch.stack(list(ratios)) != 1)

    def read(self) -> tuple[int, float, float]:
        """(keys_scaled, mean norm, max norm), reduced in Python as kohya does; (0, 0.0, 0.0) for no modules."""
        if self.norms is None:
            return 0, 0.0, 0.0
        values = self.norms.float().cpu().tolist()
        return int(self.scaled.sum().cpu()), sum(values) / len(values), max(values)


def max_norm_ratio(norm: torch.Tensor, max_norm: float) -> torch.Tensor:
    """kohya's and LyCORIS's max-norm factor for one module: n = max(norm, max_norm/2); min(n, max_norm) / n."""
    clamped = norm.clamp(min=max_norm / 2)
    return torch.clamp(clamped, max=max_norm) / clamped


class AdapterNetwork(torch.nn.Module, Generic[ModuleT]):
    """Adapter modules registered under their kohya names (``lora_name``), so ``state_dict()`` is the file layout.

    Every module has ``lora_name``, ``multiplier`` and ``block_index`` (SDXL block, -1 for the text encoders).
    """

    #: the ``NetworkConfig.algo`` this class builds
    algo: ClassVar[str]
    #: what ``apply_max_norm`` returns (its ``read()`` summary differs between kohya and LyCORIS)
    max_norm_stats: ClassVar[type[MaxNormStats]] = MaxNormStats
    #: whether ``build`` also makes (then drops) the modules of a given but untrained text encoder: kohya's LoRA
    #: draws their init, so the U-Net init does not depend on the train_te flags
    builds_untrained: ClassVar[bool] = False

    def __init__(self, modules: Sequence[ModuleT], config: NetworkConfig | None = None) -> None:
        super().__init__()
        self.config = config
        for m in modules:
            if m.lora_name in self._modules:
                raise ValueError(f"duplicated lora name: {m.lora_name}")
            self.add_module(m.lora_name, m)
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    # ------------------------------------------------------------------ per algorithm
    @classmethod
    def build_module(cls, target: TargetModule, config: NetworkConfig, generator: torch.Generator) -> ModuleT:
        """The module for one kohya target, its init drawn from ``generator``."""
        raise NotImplementedError

    def original_module(self, module: ModuleT) -> torch.nn.Module:
        """The model's own Linear/Conv2d that ``module`` adapts (referenced, never a submodule)."""
        raise NotImplementedError

    def adapted_output(self, module: ModuleT, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        """The original module's ``output`` for input ``x`` with ``module``'s change added (the forward hook)."""
        raise NotImplementedError

    def scaled_by_loraplus(self, param_name: str) -> bool:
        """Whether LoRA+ trains this parameter (its name inside its module) at lr * ratio; none by default."""
        return False

    def excused_missing(self, key: str) -> bool:
        """Whether ``load_kohya`` accepts a file without this key of the network; none by default."""
        return False

    def copy_loaded(self, sd: Mapping[str, torch.Tensor]) -> None:
        """Copy a checked state dict's weights into the network (under no_grad; alphas are checked, not copied)."""
        for key, value in sd.items():
            if not key.endswith(".alpha"):
                name, attr = key.rsplit(".", 1)
                getattr(self.get_submodule(name), attr).copy_(value)

    def scale_to_max_norm(self, module: ModuleT, max_norm: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Apply max-norm to one module in place; (its norm after scaling, the ratio it was scaled by)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ construction
    @classmethod
    def build(
        cls: type[NetworkT],
        unet: torch.nn.Module | None,
        te1: torch.nn.Module | None,
        te2: torch.nn.Module | None,
        config: NetworkConfig,
        generator: torch.Generator,
    ) -> NetworkT:
        """One module per kohya target in ComfyUI's U-Net (``diffusion_model``) and CLIP-L/CLIP-G ``.transformer``,
        in kohya's creation order (trainer/network/targets.py); one NetworkConfig means the same module set for
        every algo."""
        if config.algo != cls.algo:
            raise ValueError(f"{cls.__name__} builds algo {cls.algo!r}, not {config.algo!r}")
        modules = []
        for target in iter_target_modules(unet, te1, te2, config, include_untrained=cls.builds_untrained):
            module = cls.build_module(target, config, generator)
            if target.trained:
                modules.append(module)
        return cls(modules, config)

    # ------------------------------------------------------------------ views
    @property
    def loras(self) -> list[ModuleT]:
        return list(self.children())

    def _with_prefix(self, prefix: str) -> list[ModuleT]:
        return [m for m in self.loras if m.lora_name.startswith(prefix + "_")]

    @property
    def unet_loras(self) -> list[ModuleT]:
        return self._with_prefix(PREFIX_UNET)

    @property
    def te1_loras(self) -> list[ModuleT]:
        return self._with_prefix(PREFIX_TE1)

    @property
    def te2_loras(self) -> list[ModuleT]:
        return self._with_prefix(PREFIX_TE2)

    @property
    def trained_loras(self) -> list[ModuleT]:
        """The modules that train: all but those of the config's ``frozen_parts``."""
        frozen = set(self.config.frozen_parts) if self.config is not None else set()
        parts = {"unet": self.unet_loras, "te1": self.te1_loras, "te2": self.te2_loras}
        skipped = {id(m) for part in frozen for m in parts[part]}
        return [m for m in self.loras if id(m) not in skipped]

    def set_multiplier(self, multiplier: float) -> None:
        for m in self.loras:
            m.multiplier = float(multiplier)

    # ------------------------------------------------------------------ hooks
    @contextmanager
    def attach(self: NetworkT) -> Iterator[NetworkT]:
        """Add every module's change to its original module's output with forward hooks; on exit (also on error)
        the hooks are removed and the model is exactly as before (no attribute, forward or weight is changed)."""
        if self._handles:
            raise RuntimeError(f"this {type(self).__name__} is already attached")

        def hook_for(adapter: torch.nn.Module):
            def hook(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
                if not args:
                    raise RuntimeError(f"{adapter.lora_name}: the module was called without a positional input")
                return self.adapted_output(adapter, args[0], output)

            return hook

        targets = [(self.original_module(m), hook_for(m)) for m in self.loras]
        try:
            for module, hook in targets:
                self._handles.append(module.register_forward_hook(hook))
            yield self
        finally:
            for handle in self._handles:
                handle.remove()
            self._handles.clear()

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    # ------------------------------------------------------------------ files
    def state_dict_kohya(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """The saved dict (kohya's / LyCORIS's layout and order): detached CPU copies, cast to ``dtype`` when given
        (alpha too, as kohya's save_weights)."""
        out = {}
        for k, v in self.state_dict().items():
            v = v.detach().to("cpu", copy=True)
            out[k] = (v.to(dtype) if dtype is not None else v).contiguous()
        return out

    def load_kohya(self, sd: Mapping[str, torch.Tensor]) -> None:
        """Copy a saved state dict into this network's weights, strictly: an unknown or missing key (unless
        ``excused_missing``), a shape or an alpha mismatch raises (kohya's load_weights is non-strict and copies
        alpha without updating the scale its forward uses). Build the network with the file's dims/alphas (for a
        kohya LoRA: ``NetworkConfig.from_kohya_state_dict(sd)``)."""
        own = self.state_dict()
        unknown = [k for k in sd if k not in own]
        missing = [k for k in own if k not in sd and not self.excused_missing(k)]
        if unknown or missing:
            raise ValueError(
                f"state dict does not match the {self.algo} network: {len(unknown)} unknown keys {unknown[:5]}, "
                f"{len(missing)} missing keys {missing[:5]}"
            )
        for k, v in sd.items():
            if tuple(v.shape) != tuple(own[k].shape):
                raise ValueError(f"{k}: shape {tuple(v.shape)} in the file, {tuple(own[k].shape)} in the network")
            if k.endswith(".alpha") and float(v.float().item()) != float(own[k].float().item()):
                raise ValueError(f"{k}: alpha {v.item()} in the file, {own[k].item()} in the network")
        with torch.no_grad():
            self.copy_loaded(sd)

    # ------------------------------------------------------------------ optimizer
    def param_groups(
        self,
        unet: PartSettings,
        clip_l: PartSettings,
        clip_g: PartSettings,
        block_lr_weight: Sequence[float] | None = None,
    ) -> tuple[list[dict], list[str]]:
        """kohya's LoRANetwork.prepare_optimizer_params: (param groups, lr descriptions).

        Each part's settings come with the run's defaults filled in (``PartSettings.with_run_defaults``). TE groups
        come first, then U-Net. Per part a "lora" group and, with a LoRA+ ratio, a "plus" group holding the
        parameters ``scaled_by_loraplus`` at lr * ratio. A group whose lr is 0 is dropped. kohya's SDXL LoRA has ONE
        text_encoder_lr: when CLIP-L and CLIP-G have the same settings the two TEs share one group ("textencoder")
        exactly as kohya; otherwise they get "textencoder 1" and "textencoder 2" groups (as kohya's multi-TE
        networks do). With block lr weights (argument, else the config's) the U-Net is grouped per block index in
        order of appearance, lr = unet lr * weight[block], described "unet_block{idx}". The modules of the config's
        ``frozen_parts`` get no group and no gradient.
        """
        for name, part in (("unet", unet), ("clip_l", clip_l), ("clip_g", clip_g)):
            if part.learning_rate is None:
                raise ValueError(f"param_groups: {name} has no learning_rate (fill in the run's: with_run_defaults)")
        self.requires_grad_(True)
        frozen = set(self.config.frozen_parts) if self.config is not None else set()
        for part, modules in (("unet", self.unet_loras), ("te1", self.te1_loras), ("te2", self.te2_loras)):
            if part in frozen:  # applied as loaded, never given to the optimizer
                for m in modules:
                    m.requires_grad_(False)
        groups: list[dict] = []
        descs: list[str] = []

        def assemble(modules: Sequence[ModuleT], lr: float, ratio: float | None, label: str) -> None:
            plain, plus = [], []
            for m in modules:
                for name, p in m.named_parameters():
                    (plus if ratio is not None and self.scaled_by_loraplus(name) else plain).append(p)
            for kind, params in (("lora", plain), ("plus", plus)):
                if not params:
                    continue
                group_lr = lr * ratio if kind == "plus" else lr
                if group_lr == 0:
                    continue
                groups.append({"params": params, "lr": group_lr})
                descs.append(label + (" plus" if kind == "plus" else ""))

        te1 = [] if "te1" in frozen else self.te1_loras
        te2 = [] if "te2" in frozen else self.te2_loras
        if te1 and te2 and clip_l != clip_g:
            assemble(te1, clip_l.learning_rate, clip_l.loraplus_lr_ratio, "textencoder 1")
            assemble(te2, clip_g.learning_rate, clip_g.loraplus_lr_ratio, "textencoder 2")
        elif te1 or te2:
            te = clip_l if te1 else clip_g
            assemble(te1 + te2, te.learning_rate, te.loraplus_lr_ratio, "textencoder")

        unet_loras = [] if "unet" in frozen else self.unet_loras
        weights = (
            block_lr_weight if block_lr_weight is not None else (self.config.block_lr_weight if self.config else None)
        )
        if unet_loras and weights is not None:
            weights = parse_block_list(weights, "block_lr_weight", as_int=False)
            by_block: dict[int, list[ModuleT]] = {}
            for m in unet_loras:
                by_block.setdefault(m.block_index, []).append(m)
            for idx, block_modules in by_block.items():
                assemble(block_modules, unet.learning_rate * weights[idx], unet.loraplus_lr_ratio, f"unet_block{idx}")
        elif unet_loras:
            assemble(unet_loras, unet.learning_rate, unet.loraplus_lr_ratio, "unet")
        return groups, descs

    # ------------------------------------------------------------------ max-norm
    @torch.no_grad()
    def apply_max_norm(self, max_norm: float) -> MaxNormStats:
        """Max-norm regularisation (kohya's --scale_weight_norms), IN PLACE (kohya quirk K21), module by module with
        ``scale_to_max_norm``. Every module is scaled, by exactly 1.0 when within the norm, so the step never waits
        for the device; the statistics stay on the device until ``read()``."""
        norms: list[torch.Tensor] = []
        ratios: list[torch.Tensor] = []
        for m in self.trained_loras:  # frozen modules stay as loaded
            norm, ratio = self.scale_to_max_norm(m, max_norm)
            norms.append(norm)
            ratios.append(ratio)
        return self.max_norm_stats.of(norms, ratios)
