"""The network's settings: kohya's network_dim/alpha, neuron dropout and network_args, parsed and checked once.

A NetworkConfig is frozen and fully resolved (block lists parsed, 0 = off applied), so every algorithm and the
file metadata read the same values.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from . import NETWORK_CLASSES
from .targets import PREFIX_TE1, PREFIX_TE2, PREFIX_UNET, SDXL_NUM_BLOCKS, SDXL_NUM_IN_OUT_BLOCKS, SDXL_NUM_MID_BLOCKS

#: the networks.lora network_args NetworkConfig.from_kohya_kwargs understands (loraplus_* go to param_groups)
KOHYA_NETWORK_ARGS = (
    "conv_dim",
    "conv_alpha",
    "block_dims",
    "block_alphas",
    "conv_block_dims",
    "conv_block_alphas",
    "rank_dropout",
    "module_dropout",
    "down_lr_weight",
    "mid_lr_weight",
    "up_lr_weight",
    "block_lr_zero_threshold",
)

_KEY_RE = re.compile(r"^(lora_(?:unet|te1|te2)_[A-Za-z0-9_]+)\.(alpha|lora_down\.weight|lora_up\.weight)$")

#: network algorithms: kohya's LoRA, and LyCORIS's LoHa / LoKr (registered in trainer/network/__init__.py)
NETWORK_ALGOS = tuple(NETWORK_CLASSES)


# ----------------------------------------------------------------------------------------------------------------
# parsing kohya's comma-separated network_args


def parse_block_list(
    value: str | Sequence[float] | None, name: str, as_int: bool, length: int = SDXL_NUM_BLOCKS
) -> tuple | None:
    """Parse kohya's "4,4,8,..." (or a sequence) into a tuple of ``length`` ints/floats; None stays None."""
    if value is None:
        return None
    items = [s.strip() for s in value.split(",")] if isinstance(value, str) else list(value)
    conv = int if as_int else float
    out = []
    for i, item in enumerate(items):
        try:
            if as_int and isinstance(item, float) and not item.is_integer():
                raise ValueError(item)
            out.append(conv(item))
        except (TypeError, ValueError):
            kind = "an integer" if as_int else "a number"
            raise ValueError(f"{name}: element {i} ({item!r}) is not {kind}") from None
    if len(out) != length:
        raise ValueError(
            f"{name} must have {length} comma-separated values (SDXL blocks: 1 emb + 9 input + 3 middle + 9 output"
            f" + 1 out), got {len(out)}"
        )
    return tuple(out)


def _lr_preset(spec: str, n: int) -> list[float]:
    """kohya's get_block_lr_weight presets: cosine, sine, linear, reverse_linear, zeros, each with optional '+base'."""
    tokens = spec.split("+")
    name = tokens[0].strip()
    base = float(tokens[1]) if len(tokens) > 1 else 0.0
    if name == "cosine":
        return [math.sin(math.pi * (i / (n - 1)) / 2) + base for i in reversed(range(n))]
    if name == "sine":
        return [math.sin(math.pi * (i / (n - 1)) / 2) + base for i in range(n)]
    if name == "linear":
        return [i / (n - 1) + base for i in range(n)]
    if name == "reverse_linear":
        return [i / (n - 1) + base for i in reversed(range(n))]
    if name == "zeros":
        return [0.0 + base] * n
    raise ValueError(
        f"unknown block lr weight {spec!r}: give comma-separated numbers or one of cosine, sine, linear,"
        " reverse_linear, zeros (optionally '+base')"
    )


def block_lr_weight_from_kohya(
    down_lr_weight: str | Sequence[float] | None = None,
    mid_lr_weight: str | Sequence[float] | None = None,
    up_lr_weight: str | Sequence[float] | None = None,
    zero_threshold: float = 0.0,
) -> tuple[float, ...] | None:
    """kohya's down/mid/up_lr_weight network_args -> the 23 per-block lr weights (None when none is given).

    As kohya: too-long lists are cut, too-short ones padded with 1.0, weights <= zero_threshold become 0, and
    emb/out blocks get 1.0. Unlike kohya an unknown preset raises instead of being logged and ignored.
    """
    if down_lr_weight is None and mid_lr_weight is None and up_lr_weight is None:
        return None
    n, n_mid = SDXL_NUM_IN_OUT_BLOCKS, SDXL_NUM_MID_BLOCKS

    def side(v: str | Sequence[float] | None) -> list[float]:
        if v is None:
            return [1.0] * n
        if isinstance(v, str):
            vals = [float(s) if s.strip() else 0.0 for s in v.split(",")] if "," in v else _lr_preset(v, n)
        else:
            vals = [float(x) for x in v]
        vals = vals[:n] + [1.0] * max(0, n - len(vals))
        return [w if w > zero_threshold else 0.0 for w in vals]

    if mid_lr_weight is None:
        mid = [1.0] * n_mid
    else:
        raw = mid_lr_weight.split(",") if isinstance(mid_lr_weight, str) else list(mid_lr_weight)
        mid = [float(s) if not isinstance(s, str) or s.strip() else 0.0 for s in raw]
        mid = mid[:n_mid] + [1.0] * max(0, n_mid - len(mid))
        mid = [w if w > zero_threshold else 0.0 for w in mid]
    return tuple([1.0] + side(down_lr_weight) + mid + side(up_lr_weight) + [1.0])


def _opt_float(v, name: str) -> float | None:
    if v is None:
        return None
    try:
        return float(v)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {v!r}") from None


# ----------------------------------------------------------------------------------------------------------------
# configuration


def rank_dropout_refusal(algo: str, rank_dropout: float | None) -> str | None:
    """Why ``rank_dropout`` cannot be used with ``algo``, or None. (The Network node asks at queue time too.)"""
    if algo != "lora" and rank_dropout:
        return (
            f"rank_dropout is not supported with algo {algo!r}: LyCORIS draws the mask on the CPU for every layer "
            "(LoKr then mixes devices on a GPU). Set rank_dropout to 0, or use algo lora."
        )
    return None


def dropout_refusal(algo: str, dropout: float | None) -> str | None:
    """Why the neuron ``dropout`` cannot be used with ``algo``, or None. (The Network node asks at queue time too.)"""
    if algo == "dora" and dropout:
        return (
            "dropout is not supported with algo 'dora': LyCORIS's DoRA ignores the neuron dropout (it adapts the "
            "weight, not the activations). Set dropout to 0 (module_dropout works), or use algo lora."
        )
    return None


#: the algorithms whose modules have a ``lora_up`` for LoRA+ to scale
LORAPLUS_ALGOS = ("lora", "dora")


def loraplus_refusal(algo: str, any_ratio: bool) -> str | None:
    """Why LoRA+ ratios cannot be used with ``algo``, or None. (The Network node asks at queue time too.)"""
    if any_ratio and algo not in LORAPLUS_ALGOS:
        return (
            f"LoRA+ (loraplus_*_lr_ratio) is not supported with algo {algo!r}: it scales lora_up, which "
            f"{algo} modules do not have. Set the loraplus ratios to 0, or use algo {' or '.join(LORAPLUS_ALGOS)}."
        )
    return None


@dataclass(frozen=True)
class NetworkConfig:
    """kohya's create_network arguments for SDXL (network_dim/alpha, neuron_dropout and network_args).

    Semantics are kohya's except where noted:
    * alpha 0 (network_alpha, conv_alpha, a block_alphas entry) means alpha = that module's dim (kohya quirk K12);
      network_alpha None means 1.0 (create_network's default); conv_alpha None means 1.0.
    * ``conv_dim`` None or 0 = no conv LoRA. (kohya treats conv_dim=0 as "on": it then adds the ResBlock's
      emb_layers Linear and 1x1 skip convs with network_dim, but no 3x3 conv. Not reproduced: 0 means off here.)
    * block mode (per-block dims) is on when ``block_dims`` or ``block_lr_weight`` is given; it applies to the
      U-Net only, 0 disables a block, and blocks whose lr weight is 0 get no modules (kohya's
      remove_block_dims_and_alphas). block_alphas / conv_block_dims / conv_block_alphas without block mode raise
      here (kohya silently ignores them).
    * ``module_dims`` (from ``from_kohya_state_dict``): exact per-module (name, dim, alpha), like kohya's
      create_network_from_weights; then every other dim field is informational.
    * block lists may be given as kohya's comma-separated strings; an empty string is None (the node's widgets).
    * ``conv_alpha`` without a conv LoRA is dropped (None).
    * dropout values of 0 mean off (kohya would still draw a rank mask for rank_dropout=0.0; it has no effect).
    """

    network_dim: int = 4
    network_alpha: float | None = 1.0
    conv_dim: int | None = None
    conv_alpha: float | None = None
    block_dims: tuple[int, ...] | None = None
    block_alphas: tuple[float, ...] | None = None
    conv_block_dims: tuple[int, ...] | None = None
    conv_block_alphas: tuple[float, ...] | None = None
    block_lr_weight: tuple[float, ...] | None = None
    dropout: float | None = None
    rank_dropout: float | None = None
    module_dropout: float | None = None
    train_unet: bool = True
    train_te1: bool = True
    train_te2: bool = True
    multiplier: float = 1.0
    module_dims: tuple[tuple[str, int, float], ...] | None = None
    algo: str = "lora"  # "lora" (kohya's LoRA, lora.py) | "loha" | "lokr" | "dora" (LyCORIS modules, loha.py ...)
    factor: int = -1  # LoKr's Kronecker factor (LyCORIS ``factor``); -1 = LyCORIS's automatic factorization
    #: parts ("unet", "te1", "te2") whose modules the network has (train_* on) but does not train: a continued
    #: file's part the node's toggle leaves off is applied as it is and saved back unchanged
    frozen_parts: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        def put(name: str, value) -> None:
            object.__setattr__(self, name, value)

        if self.algo not in NETWORK_ALGOS:
            raise ValueError(f"algo must be one of {list(NETWORK_ALGOS)}, got {self.algo!r}")
        refusal = rank_dropout_refusal(self.algo, self.rank_dropout) or dropout_refusal(self.algo, self.dropout)
        if refusal:
            raise ValueError(refusal)
        if not isinstance(self.factor, int) or (self.factor != -1 and self.factor < 1):
            raise ValueError(
                f"factor (the Network node's lokr_factor) must be -1 (auto) or an integer >= 1, got {self.factor!r}"
            )

        if self.network_alpha is None:
            put("network_alpha", 1.0)
        if not isinstance(self.network_dim, int) or self.network_dim < 1:
            raise ValueError(f"network_dim must be an integer >= 1, got {self.network_dim!r}")
        if self.conv_dim is not None:
            if not isinstance(self.conv_dim, int) or self.conv_dim < 0:
                raise ValueError(f"conv_dim must be an integer >= 0, got {self.conv_dim!r}")
            if self.conv_dim == 0:
                put("conv_dim", None)
        for name, as_int in (
            ("block_dims", True),
            ("block_alphas", False),
            ("conv_block_dims", True),
            ("conv_block_alphas", False),
            ("block_lr_weight", False),
        ):
            value = getattr(self, name)
            if isinstance(value, str) and not value.strip():
                value = None  # an empty widget: no per-block values
            put(name, parse_block_list(value, name, as_int))
        for name in ("block_dims", "conv_block_dims"):
            v = getattr(self, name)
            if v is not None and any(d < 0 for d in v):
                raise ValueError(f"{name} must be >= 0 (0 disables a block), got {v}")
        block_mode = self.block_dims is not None or self.block_lr_weight is not None
        for name in ("block_alphas", "conv_block_dims", "conv_block_alphas"):
            if getattr(self, name) is not None and not block_mode:
                raise ValueError(f"{name} needs block_dims (or block lr weights); kohya would silently ignore it")
        if self.conv_block_alphas is not None and self.conv_block_dims is None:
            raise ValueError("conv_block_alphas needs conv_block_dims; kohya would silently ignore it")
        if not self.conv_enabled:
            put("conv_alpha", None)  # no conv LoRA: its alpha means nothing (the node's widget always has a value)
        for name in ("dropout", "rank_dropout", "module_dropout"):
            v = getattr(self, name)
            if v is not None and not 0.0 <= v < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {v}")
            if v == 0:
                put(name, None)
        if self.module_dims is not None:
            put("module_dims", tuple((str(n), int(d), float(a)) for n, d, a in self.module_dims))
        put("frozen_parts", tuple(sorted(set(self.frozen_parts))))
        has = {"unet": self.train_unet, "te1": self.train_te1, "te2": self.train_te2}
        bad = [p for p in self.frozen_parts if not has.get(p)]
        if bad:
            raise ValueError(f"frozen_parts {bad}: only parts the network has (train_unet/te1/te2 on) can be frozen")

    def trains(self, part: str) -> bool:
        """Whether the network trains ``part`` ("unet", "te1", "te2"): it has modules there and they are not frozen."""
        has = {"unet": self.train_unet, "te1": self.train_te1, "te2": self.train_te2}[part]
        return has and part not in self.frozen_parts

    @property
    def trains_text_encoders(self) -> bool:
        return self.trains("te1") or self.trains("te2")

    @property
    def block_mode(self) -> bool:
        return self.module_dims is None and (self.block_dims is not None or self.block_lr_weight is not None)

    def resolved_block_dims(self) -> tuple[list[int], list[float], list[int] | None, list[float] | None]:
        """kohya's get_block_dims_and_alphas + remove_block_dims_and_alphas for block mode."""
        n = SDXL_NUM_BLOCKS
        dims = list(self.block_dims) if self.block_dims is not None else [self.network_dim] * n
        alphas = list(self.block_alphas) if self.block_alphas is not None else [self.network_alpha] * n
        conv_alpha = 1.0 if self.conv_alpha is None else self.conv_alpha
        if self.conv_block_dims is not None:
            conv_dims = list(self.conv_block_dims)
            conv_alphas = list(self.conv_block_alphas) if self.conv_block_alphas is not None else [conv_alpha] * n
        elif self.conv_dim is not None:
            conv_dims, conv_alphas = [self.conv_dim] * n, [conv_alpha] * n
        else:
            conv_dims = conv_alphas = None
        if self.block_lr_weight is not None:
            for i, w in enumerate(self.block_lr_weight):
                if w == 0:
                    dims[i] = 0
                    if conv_dims is not None:
                        conv_dims[i] = 0
        return dims, alphas, conv_dims, conv_alphas

    @property
    def conv_enabled(self) -> bool:
        """Whether ResBlock/Downsample/Upsample are searched (kohya: conv_dim, conv_block_dims or from weights)."""
        return self.module_dims is not None or self.conv_dim is not None or self.conv_block_dims is not None

    @classmethod
    def from_kohya_kwargs(
        cls,
        network_dim: int | None = None,
        network_alpha: float | None = None,
        neuron_dropout: float | None = None,
        *,
        train_unet: bool = True,
        train_te1: bool = True,
        train_te2: bool = True,
        **network_args: str | float | int | None,
    ) -> NetworkConfig:
        """From kohya's command line: --network_dim, --network_alpha, --network_dropout and --network_args k=v."""
        args = dict(network_args)
        for k in ("loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio"):
            if k in args:
                raise ValueError(f"{k} is an optimizer setting here: pass it to LoRANetwork.param_groups")
        conv_dim = args.pop("conv_dim", None)
        block_lr = block_lr_weight_from_kohya(
            args.pop("down_lr_weight", None),
            args.pop("mid_lr_weight", None),
            args.pop("up_lr_weight", None),
            float(args.pop("block_lr_zero_threshold", 0.0) or 0.0),
        )
        block = {k: args.pop(k, None) for k in ("block_dims", "block_alphas", "conv_block_dims", "conv_block_alphas")}
        conv_alpha = _opt_float(args.pop("conv_alpha", None), "conv_alpha")
        rank_dropout = _opt_float(args.pop("rank_dropout", None), "rank_dropout")
        module_dropout = _opt_float(args.pop("module_dropout", None), "module_dropout")
        if args:
            raise ValueError(
                f"unknown network_args for networks.lora: {sorted(args)} (known: {', '.join(KOHYA_NETWORK_ARGS)})"
            )
        return cls(
            network_dim=4 if network_dim is None else int(network_dim),
            network_alpha=1.0 if network_alpha is None else float(network_alpha),
            conv_dim=None if conv_dim is None else int(conv_dim),
            conv_alpha=conv_alpha,
            block_lr_weight=block_lr,
            dropout=neuron_dropout,
            rank_dropout=rank_dropout,
            module_dropout=module_dropout,
            train_unet=train_unet,
            train_te1=train_te1,
            train_te2=train_te2,
            **block,
        )

    @classmethod
    def from_kohya_state_dict(cls, sd: Mapping[str, torch.Tensor], **overrides) -> NetworkConfig:
        """Per-module dims/alphas read from a kohya LoRA file (kohya's create_network_from_weights).

        dim = lora_down.shape[0]; alpha = the ``.alpha`` value (missing = dim, kohya's "old LoRA"). Keys that are
        not kohya LoRA keys of SDXL (lora_unet_/lora_te1_/lora_te2_ + alpha/lora_down/lora_up) raise, and so does a
        module without both lora_down and lora_up. ``overrides`` sets other fields (dropouts, multiplier...).
        """
        unknown = [k for k in sd if not _KEY_RE.match(k)]
        if unknown:
            raise ValueError(
                f"{len(unknown)} keys are not kohya SDXL LoRA keys (lora_unet_/lora_te1_/lora_te2_<module>."
                f"alpha|lora_down.weight|lora_up.weight), e.g. {unknown[:5]}"
            )
        parts: dict[str, dict[str, torch.Tensor]] = {}
        for k, v in sd.items():
            m = _KEY_RE.match(k)
            parts.setdefault(m.group(1), {})[m.group(2)] = v
        modules = []
        for name, p in parts.items():
            missing = [s for s in ("lora_down.weight", "lora_up.weight") if s not in p]
            if missing:
                raise ValueError(f"{name}: missing {', '.join(name + '.' + s for s in missing)}")
            down, up = p["lora_down.weight"], p["lora_up.weight"]
            dim = int(down.shape[0])
            if up.shape[1] != dim:
                raise ValueError(f"{name}: lora_up {tuple(up.shape)} does not match lora_down {tuple(down.shape)}")
            alpha = float(p["alpha"].detach().float().item()) if "alpha" in p else float(dim)
            modules.append((name, dim, alpha, down.ndim == 4 and tuple(down.shape[2:]) != (1, 1)))
        if not modules:
            raise ValueError("the state dict holds no LoRA modules")
        lin = Counter((d, a) for _, d, a, conv in modules if not conv)
        conv = Counter((d, a) for _, d, a, is_conv in modules if is_conv)
        (net_dim, net_alpha), _ = (lin or conv).most_common(1)[0]
        kw = {
            "network_dim": net_dim,
            "network_alpha": net_alpha,
            "conv_dim": conv.most_common(1)[0][0][0] if conv else None,
            "conv_alpha": conv.most_common(1)[0][0][1] if conv else None,
            "train_unet": any(n.startswith(PREFIX_UNET + "_") for n, *_ in modules),
            "train_te1": any(n.startswith(PREFIX_TE1 + "_") for n, *_ in modules),
            "train_te2": any(n.startswith(PREFIX_TE2 + "_") for n, *_ in modules),
            "module_dims": tuple((n, d, a) for n, d, a, _ in modules),
        }
        kw.update(overrides)
        return cls(**kw)


@dataclass(frozen=True)
class LoraPlusRatios:
    """LoRA+ as the Network node sets it, with kohya's network_args names: lora_up learns at lr * ratio.

    ``lr_ratio`` (kohya loraplus_lr_ratio) for every part, ``unet_lr_ratio`` / ``text_encoder_lr_ratio`` (kohya
    loraplus_unet_lr_ratio / loraplus_text_encoder_lr_ratio; the text-encoder ratio is CLIP-L's and CLIP-G's) for one
    part. None or 0 (the node's widgets): not set here, the training settings' ratio (if any) applies. The run's
    PartSettings receive them (``TrainConfig.with_loraplus``).
    """

    lr_ratio: float | None = None
    unet_lr_ratio: float | None = None
    text_encoder_lr_ratio: float | None = None

    def __post_init__(self) -> None:
        for name in ("lr_ratio", "unet_lr_ratio", "text_encoder_lr_ratio"):
            value = getattr(self, name)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0
            ):
                raise ValueError(f"loraplus_{name} must be a finite number >= 0 (0 = not set), got {value!r}")
            if value == 0:
                object.__setattr__(self, name, None)

    @property
    def any(self) -> bool:
        return any(v is not None for v in (self.lr_ratio, self.unet_lr_ratio, self.text_encoder_lr_ratio))


@dataclass(frozen=True)
class NetworkSetup:
    """The Network node's value: the network to train, its LoRA+ ratios, and the LoRA file it continues from (read
    once), if any."""

    config: NetworkConfig
    start_from: str = "none"
    initial_weights: Mapping[str, torch.Tensor] | None = None
    loraplus: LoraPlusRatios = LoraPlusRatios()


# ----------------------------------------------------------------------------------------------------------------
# the optimizer settings of one model part


#: the model parts a network trains, in the order kohya builds their parameter groups' learning rates from
MODEL_PARTS = ("unet", "clip_l", "clip_g")


@dataclass(frozen=True)
class PartSettings:
    """How one model part (U-Net, CLIP-L = lora_te1, CLIP-G = lora_te2) is optimized: one object per part, so a
    part's learning rate and LoRA+ ratio are never stored twice.

    ``learning_rate``: the part's lr (kohya's unet_lr / text_encoder_lr). None: the run's learning_rate. 0: the
    part's parameter groups are dropped (kohya), so nothing of it trains.
    ``loraplus_lr_ratio``: lora_up of this part learns at lr * ratio (kohya's loraplus_unet_lr_ratio /
    loraplus_text_encoder_lr_ratio). None (or 0, kohya's ``or``): the run's loraplus_lr_ratio.
    """

    learning_rate: float | None = None
    loraplus_lr_ratio: float | None = None

    def __post_init__(self) -> None:
        for name in ("learning_rate", "loraplus_lr_ratio"):
            value = getattr(self, name)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0
            ):
                raise ValueError(f"{name} must be a finite number >= 0 or None, got {value!r}")
        if self.loraplus_lr_ratio == 0:
            object.__setattr__(self, "loraplus_lr_ratio", None)

    @classmethod
    def from_widgets(cls, learning_rate: float = 0.0, loraplus_lr_ratio: float = 0.0) -> PartSettings:
        """From the train node's widgets, where 0 means "the run's value" (a widget cannot be empty)."""
        return cls(learning_rate or None, loraplus_lr_ratio or None)

    def with_run_defaults(self, learning_rate: float, loraplus_lr_ratio: float | None) -> PartSettings:
        """This part with the run's learning_rate / loraplus_lr_ratio filled in where it has none."""
        return PartSettings(
            self.learning_rate if self.learning_rate is not None else learning_rate,
            self.loraplus_lr_ratio if self.loraplus_lr_ratio is not None else loraplus_lr_ratio,
        )
