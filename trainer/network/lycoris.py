"""LoHa and LoKr networks: LyCORIS's modules (pip ``lycoris-lora``) on kohya's SDXL module set, attached with hooks.

Why LyCORIS's own classes: the math (Hadamard / Kronecker products, init, alpha/scale, max-norm, state-dict layout)
is LyCORIS's ``LohaModule`` / ``LokrModule``; nothing here re-derives it, so files are exactly what LyCORIS saves
(``<lora_name>.hada_w1_a`` ... / ``<lora_name>.lokr_w1`` ... plus ``.alpha``) and ComfyUI's LoraLoader
(comfy/weight_adapter/loha.py, lokr.py) maps every key.

What differs from ``lycoris.kohya.LycorisNetwork`` and why:
* Targets and names come from trainer/network/targets.py (kohya's discovery on ComfyUI's modules, ``lora_unet_`` /
  ``lora_te1_`` / ``lora_te2_`` names, network_dim/alpha for Linear and 1x1 convs, conv_dim/alpha for the others,
  block dims), so one NetworkConfig means the same module set for every algo.
* ComfyUI's modules are shared with the rest of the graph, so LyCORIS's ``apply_to`` (which replaces ``forward``)
  is never called. ``attach()`` registers forward hooks that add ``module.bypass_forward_diff(x, scale=multiplier)``
  (LyCORIS's bypass path: W x + dW x) to the original output; on exit the hooks are removed.
* Init: LyCORIS draws from torch's GLOBAL RNG in its constructors. ``build`` therefore runs them inside
  ``torch.random.fork_rng(devices=[])`` after ``torch.manual_seed(generator.initial_seed())``: the init is a pure
  function of the generator's seed, and the caller's global RNG state is restored afterwards.
* Dropouts: LyCORIS's ``dropout`` (nn.Dropout on dW x) draws from the global RNG of the activations' device;
  module dropout is done in the hook as LyCORIS's ``forward`` does it (``torch.rand(1) < p``, the CPU's global
  RNG, a host draw). The training loop owns, seeds, saves and restores both (trainer/run/loop.py), as for LoRA.
  ``rank_dropout`` is refused: LyCORIS 4.1.3 draws its mask on the CPU per module and LoKr then multiplies it
  with the weight on the device (a device mismatch on a GPU); LoHa copies it over (a sync per module).
* Max-norm: LyCORIS's per-module ``apply_max_norm`` formula, evaluated on the device without the ``.cpu()`` and
  ``if scaled`` it does per module (see ``apply_max_norm``).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
from lycoris.modules.loha import LohaModule
from lycoris.modules.lokr import LokrModule

from .base import MaxNormStats, cpu_state_dict, output_hooks
from .config import NetworkConfig, parse_block_list
from .targets import PREFIX_TE1, PREFIX_TE2, PREFIX_UNET, iter_target_modules

#: algo -> LyCORIS module class
LYCORIS_MODULES = {"loha": LohaModule, "lokr": LokrModule}

#: the tensor names (after ``<lora_name>.``) LyCORIS saves for these algos; how a LoHa/LoKr file is recognised
LYCORIS_WEIGHT_NAMES = frozenset(LohaModule.weight_list) | frozenset(LokrModule.weight_list)


def is_lycoris_state_dict(sd: Mapping[str, torch.Tensor]) -> bool:
    """True when the dict holds LoHa/LoKr tensors (``hada_*`` / ``lokr_*``), i.e. it is not a kohya LoRA."""
    return any(k.rsplit(".", 1)[-1].startswith(("hada_", "lokr_")) for k in sd)


class LycorisNetwork(torch.nn.Module):
    """LyCORIS LoHa/LoKr modules registered under their kohya names, with LoRANetwork's interface."""

    def __init__(self, modules: Sequence[torch.nn.Module], config: NetworkConfig) -> None:
        super().__init__()
        self.config = config
        self.algo = config.algo
        for m in modules:
            if m.lora_name in self._modules:
                raise ValueError(f"duplicated lora name: {m.lora_name}")
            self.add_module(m.lora_name, m)
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    # ------------------------------------------------------------------ construction
    @classmethod
    def build(
        cls,
        unet: torch.nn.Module | None,
        te1: torch.nn.Module | None,
        te2: torch.nn.Module | None,
        config: NetworkConfig,
        generator: torch.Generator,
    ) -> LycorisNetwork:
        """LyCORIS modules of ``config.algo`` on kohya's targets; the init is seeded by ``generator.initial_seed()``
        (LyCORIS uses the global RNG, which is forked so the caller's state is untouched)."""
        if config.algo not in LYCORIS_MODULES:
            raise ValueError(f"LycorisNetwork builds loha or lokr, not {config.algo!r} (use LoRANetwork)")
        if config.module_dims is not None:
            raise ValueError("per-module dims from a file (module_dims) are only supported for algo 'lora'")

        module_cls = LYCORIS_MODULES[config.algo]
        extra = {"factor": config.factor} if config.algo == "lokr" else {}
        targets = iter_target_modules(unet, te1, te2, config)
        modules = []
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(generator.initial_seed())
            for t in targets:
                alpha = float(t.alpha.item()) if isinstance(t.alpha, torch.Tensor) else t.alpha
                m = module_cls(
                    t.name,
                    t.module,
                    multiplier=config.multiplier,
                    lora_dim=t.dim,
                    alpha=alpha,
                    dropout=config.dropout or 0.0,
                    rank_dropout=config.rank_dropout or 0.0,
                    module_dropout=config.module_dropout or 0.0,
                    bypass_mode=True,
                    **extra,
                )
                m.block_index = t.block_index
                m.dim_source = t.dim_source
                modules.append(m)
        return cls(modules, config)

    # ------------------------------------------------------------------ views
    @property
    def loras(self) -> list[torch.nn.Module]:
        return [m for m in self.children() if isinstance(m, tuple(LYCORIS_MODULES.values()))]

    def _with_prefix(self, prefix: str) -> list[torch.nn.Module]:
        return [m for m in self.loras if m.lora_name.startswith(prefix + "_")]

    @property
    def unet_loras(self) -> list[torch.nn.Module]:
        return self._with_prefix(PREFIX_UNET)

    @property
    def te1_loras(self) -> list[torch.nn.Module]:
        return self._with_prefix(PREFIX_TE1)

    @property
    def te2_loras(self) -> list[torch.nn.Module]:
        return self._with_prefix(PREFIX_TE2)

    def set_multiplier(self, multiplier: float) -> None:
        for m in self.loras:
            m.multiplier = float(multiplier)

    # ------------------------------------------------------------------ hooks
    @contextmanager
    def attach(self) -> Iterator[LycorisNetwork]:
        """Add LyCORIS's bypass diff to the original modules' outputs with forward hooks; removed on exit."""
        if self._handles:
            raise RuntimeError("this LycorisNetwork is already attached")

        def hook_for(m: torch.nn.Module):
            def hook(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
                if not args:
                    raise RuntimeError(f"{m.lora_name}: the module was called without a positional input")
                # LyCORIS's forward: module dropout skips the whole module (global RNG)
                if m.training and m.module_dropout and torch.rand(1) < m.module_dropout:
                    return output
                return output + m.bypass_forward_diff(args[0], scale=m.multiplier).to(output.dtype)

            return hook

        with output_hooks(self._handles, [(m.org_module[0], hook_for(m)) for m in self.loras]):
            yield self

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    # ------------------------------------------------------------------ files
    def state_dict_kohya(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """LyCORIS's saved dict (its ``custom_state_dict`` per module, under ``<lora_name>.``): detached CPU copies,
        cast to ``dtype`` when given (alpha too, as kohya/LyCORIS save_weights)."""
        return cpu_state_dict(self, dtype)

    def _tensor(self, key: str) -> torch.Tensor:
        name, attr = key.rsplit(".", 1)
        return getattr(self.get_submodule(name), attr)

    def load_kohya(self, sd: Mapping[str, torch.Tensor]) -> None:
        """Copy a LyCORIS state dict (as saved by ``state_dict_kohya``) into this network: strict on keys, shapes
        and alphas. Resets LyCORIS's max-norm ``scalar`` to 1, as LyCORIS's load hook does (the file has it
        folded into hada_w1_a / lokr_w1)."""
        own = self.state_dict()
        unknown = [k for k in sd if k not in own]
        missing = [k for k in own if k not in sd]
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
            for m in self.loras:
                m.scalar.fill_(1.0)
            for k, v in sd.items():
                if not k.endswith(".alpha"):
                    self._tensor(k).copy_(v)

    # ------------------------------------------------------------------ optimizer
    def param_groups(
        self,
        unet_lr: float,
        te1_lr: float,
        te2_lr: float,
        loraplus_lr_ratio: float | None = None,
        loraplus_unet_lr_ratio: float | None = None,
        loraplus_text_encoder_lr_ratio: float | None = None,
        block_lr_weight: Sequence[float] | None = None,
    ) -> tuple[list[dict], list[str]]:
        """(param groups, descriptions) with LoRANetwork.param_groups' grouping: "textencoder" (or "textencoder 1"
        / "textencoder 2" when the TE lrs differ), then "unet" or "unet_block{idx}" with block lr weights; groups
        with lr 0 are dropped. LoRA+ raises: it scales lora_up, which LoHa/LoKr do not have (LyCORIS's kohya
        wrapper would silently apply no ratio)."""
        if loraplus_lr_ratio or loraplus_unet_lr_ratio or loraplus_text_encoder_lr_ratio:
            raise ValueError("LoRA+ (loraplus_*_lr_ratio) only applies to algo 'lora': LoHa/LoKr have no lora_up")
        self.requires_grad_(True)
        groups: list[dict] = []
        descs: list[str] = []

        def assemble(mods: Sequence[torch.nn.Module], lr: float, label: str) -> None:
            params = [p for m in mods for p in m.parameters()]
            if params and lr != 0:
                groups.append({"params": params, "lr": lr})
                descs.append(label)

        te1, te2 = self.te1_loras, self.te2_loras
        if te1 and te2 and te1_lr != te2_lr:
            assemble(te1, te1_lr, "textencoder 1")
            assemble(te2, te2_lr, "textencoder 2")
        elif te1 or te2:
            assemble(te1 + te2, te1_lr if te1 else te2_lr, "textencoder")
        unet = self.unet_loras
        weights = block_lr_weight if block_lr_weight is not None else self.config.block_lr_weight
        if unet and weights is not None:
            weights = parse_block_list(weights, "block_lr_weight", as_int=False)
            by_block: dict[int, list[torch.nn.Module]] = {}
            for m in unet:
                by_block.setdefault(m.block_index, []).append(m)
            for idx, mods in by_block.items():
                assemble(mods, unet_lr * weights[idx], f"unet_block{idx}")
        elif unet:
            assemble(unet, unet_lr, "unet")
        return groups, descs

    # ------------------------------------------------------------------ max-norm
    @torch.no_grad()
    def apply_max_norm(self, max_norm: float) -> LycorisMaxNormStats:
        """LyCORIS's apply_max_norm_regularization, in place, on the device.

        Per module, LyCORIS's formula: n = max(||dW||, max_norm/2) with dW = get_weight() (times ``scalar`` for
        LoHa); ratio = min(n, max_norm)/n; LoHa multiplies its ``scalar`` by ratio, LoKr each of its factors by
        ratio**(1/factors). LyCORIS reads the ratio back to the host and branches on it per module; here every
        module is multiplied (by exactly 1.0 when it is within the norm), so the step does not wait for the device.
        """
        norms: list[torch.Tensor] = []
        ratios: list[torch.Tensor] = []
        for m in self.loras:
            weight = m.get_weight(m.shape)
            orig_norm = (weight * m.scalar).norm() if isinstance(m, LohaModule) else weight.norm()
            norm = torch.clamp(orig_norm, max_norm / 2)
            desired = torch.clamp(norm, max=max_norm)
            ratio = desired / norm
            if isinstance(m, LohaModule):
                m.scalar *= ratio
            else:
                for factor in _lokr_factors(m):
                    factor *= ratio ** (1 / len(_lokr_factors(m)))
            norms.append(orig_norm * ratio)
            ratios.append(ratio)
        return LycorisMaxNormStats.of(norms, ratios)


def _lokr_factors(m: LokrModule) -> list[torch.Tensor]:
    """The tensors LyCORIS's LokrModule.apply_max_norm scales (``4 - use_w1 - use_w2 + (not use_w2 and tucker)``)."""
    out = [m.lokr_w1] if m.use_w1 else [m.lokr_w1_a, m.lokr_w1_b]
    if m.use_w2:
        out.append(m.lokr_w2)
    else:
        out += ([m.lokr_t2] if m.tucker else []) + [m.lokr_w2_a, m.lokr_w2_b]
    return out


class LycorisMaxNormStats(MaxNormStats):
    """LyCORIS's network-level summary: (0, 0.0, 0.0) when no module was scaled."""

    def read(self) -> tuple[int, float, float]:
        keys, mean, biggest = super().read()
        return (keys, mean, biggest) if keys else (0, 0.0, 0.0)
