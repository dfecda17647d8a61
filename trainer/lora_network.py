"""kohya sd-scripts' LoRA network (networks/lora.py) for SDXL, built on the modules ComfyUI has already loaded.

Why a re-implementation instead of kohya's classes: kohya replaces ``org_module.forward`` for good and keeps the
target set in a mutable CLASS attribute. In ComfyUI the U-Net / CLIP objects are shared with the rest of the graph,
so the network here never changes them: it only keeps references and adds forward hooks inside ``attach()``.
The math, the module set, the key names, dims/alphas, the init draws, the state dict and max-norm are kohya's.

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
convs conv_dim/alpha (quirk 10). Names: ``lora_unet_`` / ``lora_te1_`` / ``lora_te2_`` + the module path with '.'
replaced by '_' (ComfyUI's SDXL U-Net keeps SGM paths, the same ones kohya's sdxl_original_unet uses, and ComfyUI's
CLIPTextModel keeps ``text_model.encoder.layers.N...``), which is what ComfyUI's comfy/lora.py maps back.

Randomness never touches torch's global RNG (ComfyUI reseeds it whenever a sampler runs):
* init: ``build(..., generator)`` takes a CPU ``torch.Generator``. Modules are created in kohya's order (TE1, TE2,
  U-Net; inside a CLIP attention k, v, q, out as in transformers) and each draws exactly what kohya's LoRAModule
  draws from the global RNG: nn.Linear/Conv2d default init of lora_down, then of lora_up (both discarded), then
  kaiming_uniform_(a=sqrt(5)) of lora_down; lora_up = 0. So a generator seeded S should give kohya's weights
  after ``torch.manual_seed(S); create_network(...)`` on CPU when nothing else draws in between (the per-module
  draw pattern is checked in tests/unit; no golden file holds kohya's init values). TE modules are created (and drawn) even when that TE is
  not trained, as kohya does, so the U-Net init does not depend on the train_te flags.
* dropout / rank_dropout / module_dropout draw exactly as kohya's LoRAModule does: the module-dropout decision
  ``torch.rand(1) < p`` from the CPU's global RNG (a host draw, so the step never waits for the device), the
  dropout mask (``F.dropout``) and the rank mask from the global RNG of the device the activations are on. The
  training loop (trainer/loop.py) owns those global RNGs while it runs: it forks them, seeds them from the run's
  seed, saves them in the resumable state and restores them after previews; gradient checkpointing replays them
  in the recompute. So a run is reproducible and resumable, and nothing is copied to the device per module.
"""
from __future__ import annotations

import math
import re
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping, Optional, Sequence, Union

import torch

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

#: the networks.lora network_args NetworkConfig.from_kohya_kwargs understands (loraplus_* go to param_groups)
KOHYA_NETWORK_ARGS = ("conv_dim", "conv_alpha", "block_dims", "block_alphas", "conv_block_dims", "conv_block_alphas",
                      "rank_dropout", "module_dropout", "down_lr_weight", "mid_lr_weight", "up_lr_weight",
                      "block_lr_zero_threshold")

_KEY_RE = re.compile(r"^(lora_(?:unet|te1|te2)_[A-Za-z0-9_]+)\.(alpha|lora_down\.weight|lora_up\.weight)$")

AlphaLike = Union[float, int, torch.Tensor, None]

#: network algorithms: kohya's LoRA, and LyCORIS's LoHa / LoKr (trainer/lycoris_network.py)
NETWORK_ALGOS = ("lora", "loha", "lokr")


def sdxl_block_index(lora_name: str) -> int:
    """kohya's ``get_block_index(name, is_sdxl=True)``: 0 emb, 1-9 input, 10-12 middle, 13-21 output, 22 out, -1 TE."""
    if not lora_name.startswith(PREFIX_UNET + "_"):
        return -1
    name = lora_name[len(PREFIX_UNET) + 1:]
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
# parsing kohya's comma-separated network_args


def parse_block_list(value: Union[str, Sequence[float], None], name: str, as_int: bool,
                     length: int = SDXL_NUM_BLOCKS) -> Optional[tuple]:
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


def block_lr_weight_from_kohya(down_lr_weight: Union[str, Sequence[float], None] = None,
                               mid_lr_weight: Union[str, Sequence[float], None] = None,
                               up_lr_weight: Union[str, Sequence[float], None] = None,
                               zero_threshold: float = 0.0) -> Optional[tuple[float, ...]]:
    """kohya's down/mid/up_lr_weight network_args -> the 23 per-block lr weights (None when none is given).

    As kohya: too-long lists are cut, too-short ones padded with 1.0, weights <= zero_threshold become 0, and
    emb/out blocks get 1.0. Unlike kohya an unknown preset raises instead of being logged and ignored.
    """
    if down_lr_weight is None and mid_lr_weight is None and up_lr_weight is None:
        return None
    n, n_mid = SDXL_NUM_IN_OUT_BLOCKS, SDXL_NUM_MID_BLOCKS

    def side(v: Union[str, Sequence[float], None]) -> list[float]:
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


def _opt_float(v, name: str) -> Optional[float]:
    if v is None:
        return None
    try:
        return float(v)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {v!r}") from None


# ----------------------------------------------------------------------------------------------------------------
# configuration


@dataclass(frozen=True)
class NetworkConfig:
    """kohya's create_network arguments for SDXL (network_dim/alpha, neuron_dropout and network_args).

    Semantics are kohya's except where noted:
    * alpha 0 (network_alpha, conv_alpha, a block_alphas entry) means alpha = that module's dim (quirk 12);
      network_alpha None means 1.0 (create_network's default); conv_alpha None means 1.0.
    * ``conv_dim`` None or 0 = no conv LoRA. (kohya treats conv_dim=0 as "on": it then adds the ResBlock's
      emb_layers Linear and 1x1 skip convs with network_dim, but no 3x3 conv. Not reproduced: 0 means off here.)
    * block mode (per-block dims) is on when ``block_dims`` or ``block_lr_weight`` is given; it applies to the
      U-Net only, 0 disables a block, and blocks whose lr weight is 0 get no modules (kohya's
      remove_block_dims_and_alphas). block_alphas / conv_block_dims / conv_block_alphas without block mode raise
      here (kohya silently ignores them).
    * ``module_dims`` (from ``from_kohya_state_dict``): exact per-module (name, dim, alpha), like kohya's
      create_network_from_weights; then every other dim field is informational.
    * dropout values of 0 mean off (kohya would still draw a rank mask for rank_dropout=0.0; it has no effect).
    """

    network_dim: int = 4
    network_alpha: Optional[float] = 1.0
    conv_dim: Optional[int] = None
    conv_alpha: Optional[float] = None
    block_dims: Optional[tuple[int, ...]] = None
    block_alphas: Optional[tuple[float, ...]] = None
    conv_block_dims: Optional[tuple[int, ...]] = None
    conv_block_alphas: Optional[tuple[float, ...]] = None
    block_lr_weight: Optional[tuple[float, ...]] = None
    dropout: Optional[float] = None
    rank_dropout: Optional[float] = None
    module_dropout: Optional[float] = None
    train_unet: bool = True
    train_te1: bool = True
    train_te2: bool = True
    multiplier: float = 1.0
    module_dims: Optional[tuple[tuple[str, int, float], ...]] = None
    algo: str = "lora"  # "lora" (this file) | "loha" | "lokr" (LyCORIS modules, trainer/lycoris_network.py)
    factor: int = -1  # LoKr's Kronecker factor (LyCORIS ``factor``); -1 = LyCORIS's automatic factorization

    def __post_init__(self) -> None:
        def put(name: str, value) -> None:
            object.__setattr__(self, name, value)

        if self.algo not in NETWORK_ALGOS:
            raise ValueError(f"algo must be one of {list(NETWORK_ALGOS)}, got {self.algo!r}")
        if self.algo != "lora" and self.rank_dropout:
            raise ValueError(f"rank_dropout is not supported with algo {self.algo!r}: LyCORIS draws the mask on the "
                             "CPU for every layer (LoKr then mixes devices on a GPU). Set rank_dropout to 0, or use "
                             "algo lora.")
        if not isinstance(self.factor, int) or (self.factor != -1 and self.factor < 1):
            raise ValueError(f"factor must be -1 (auto) or an integer >= 1, got {self.factor!r}")

        if self.network_alpha is None:
            put("network_alpha", 1.0)
        if not isinstance(self.network_dim, int) or self.network_dim < 1:
            raise ValueError(f"network_dim must be an integer >= 1, got {self.network_dim!r}")
        if self.conv_dim is not None:
            if not isinstance(self.conv_dim, int) or self.conv_dim < 0:
                raise ValueError(f"conv_dim must be an integer >= 0, got {self.conv_dim!r}")
            if self.conv_dim == 0:
                put("conv_dim", None)
        for name, as_int in (("block_dims", True), ("block_alphas", False), ("conv_block_dims", True),
                             ("conv_block_alphas", False), ("block_lr_weight", False)):
            put(name, parse_block_list(getattr(self, name), name, as_int))
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
        for name in ("dropout", "rank_dropout", "module_dropout"):
            v = getattr(self, name)
            if v is not None and not 0.0 <= v < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {v}")
            if v == 0:
                put(name, None)
        if self.module_dims is not None:
            put("module_dims", tuple((str(n), int(d), float(a)) for n, d, a in self.module_dims))

    @property
    def block_mode(self) -> bool:
        return self.module_dims is None and (self.block_dims is not None or self.block_lr_weight is not None)

    def resolved_block_dims(self) -> tuple[list[int], list[float], Optional[list[int]], Optional[list[float]]]:
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
    def from_kohya_kwargs(cls, network_dim: Optional[int] = None, network_alpha: Optional[float] = None,
                          neuron_dropout: Optional[float] = None, *, train_unet: bool = True,
                          train_te1: bool = True, train_te2: bool = True,
                          **network_args: Union[str, float, int, None]) -> "NetworkConfig":
        """From kohya's command line: --network_dim, --network_alpha, --network_dropout and --network_args k=v."""
        args = dict(network_args)
        for k in ("loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio"):
            if k in args:
                raise ValueError(f"{k} is an optimizer setting here: pass it to LoRANetwork.param_groups")
        conv_dim = args.pop("conv_dim", None)
        block_lr = block_lr_weight_from_kohya(
            args.pop("down_lr_weight", None), args.pop("mid_lr_weight", None), args.pop("up_lr_weight", None),
            float(args.pop("block_lr_zero_threshold", 0.0) or 0.0),
        )
        block = {k: args.pop(k, None) for k in ("block_dims", "block_alphas", "conv_block_dims", "conv_block_alphas")}
        conv_alpha = _opt_float(args.pop("conv_alpha", None), "conv_alpha")
        rank_dropout = _opt_float(args.pop("rank_dropout", None), "rank_dropout")
        module_dropout = _opt_float(args.pop("module_dropout", None), "module_dropout")
        if args:
            raise ValueError(f"unknown network_args for networks.lora: {sorted(args)} (known: {', '.join(KOHYA_NETWORK_ARGS)})")
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
    def from_kohya_state_dict(cls, sd: Mapping[str, torch.Tensor], **overrides) -> "NetworkConfig":
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
        kw = dict(
            network_dim=net_dim,
            network_alpha=net_alpha,
            conv_dim=conv.most_common(1)[0][0][0] if conv else None,
            conv_alpha=conv.most_common(1)[0][0][1] if conv else None,
            train_unet=any(n.startswith(PREFIX_UNET + "_") for n, *_ in modules),
            train_te1=any(n.startswith(PREFIX_TE1 + "_") for n, *_ in modules),
            train_te2=any(n.startswith(PREFIX_TE2 + "_") for n, *_ in modules),
            module_dims=tuple((n, d, a) for n, d, a, _ in modules),
        )
        kw.update(overrides)
        return cls(**kw)


# ----------------------------------------------------------------------------------------------------------------
# one LoRA module


class LoRAModule(torch.nn.Module):
    """kohya's LoRAModule: out = org(x) + up(down(x)) * multiplier * alpha/rank, with kohya's three dropouts.

    The original module is only referenced (never registered as a submodule, never patched), so this module's
    state_dict is exactly kohya's: ``alpha``, ``lora_down.weight``, ``lora_up.weight``. Weights are created on CPU in
    float32; move the network with ``.to()``.

    The ``alpha`` buffer is float32, except when alpha is 0/None: then alpha = rank and the buffer is int64 as in
    kohya (quirk 12); it is saved with that dtype unless a save dtype is given. ComfyUI's loader reads it with
    ``.item()``, so both load the same.
    """

    def __init__(self, lora_name: str, org_module: torch.nn.Module, lora_dim: int, alpha: AlphaLike, *,
                 generator: torch.Generator, multiplier: float = 1.0, dropout: Optional[float] = None,
                 rank_dropout: Optional[float] = None, module_dropout: Optional[float] = None,
                 dim_source: str = "network_dim") -> None:
        super().__init__()
        if generator is None or generator.device.type != "cpu":
            raise ValueError("LoRAModule needs a private CPU torch.Generator for its init")
        if lora_dim < 1:
            raise ValueError(f"{lora_name}: rank must be >= 1, got {lora_dim}")
        self.lora_name = lora_name
        object.__setattr__(self, "_org_module", org_module)  # a reference, not a submodule
        self.lora_dim = int(lora_dim)
        self.block_index = sdxl_block_index(lora_name)
        self.dim_source = dim_source

        if isinstance(org_module, torch.nn.Conv2d):
            self.in_dim, self.out_dim = org_module.in_channels, org_module.out_channels
            self.kernel_size = tuple(org_module.kernel_size)
            self.stride = tuple(org_module.stride)
            self.padding = tuple(org_module.padding)
            self.kind = "conv{}x{}".format(*self.kernel_size)
            mk = dict(device="cpu", dtype=torch.float32, bias=False)
            self.lora_down = torch.nn.utils.skip_init(torch.nn.Conv2d, self.in_dim, self.lora_dim, self.kernel_size,
                                                      self.stride, self.padding, **mk)
            self.lora_up = torch.nn.utils.skip_init(torch.nn.Conv2d, self.lora_dim, self.out_dim, (1, 1), (1, 1), **mk)
        elif isinstance(org_module, torch.nn.Linear):
            self.in_dim, self.out_dim = org_module.in_features, org_module.out_features
            self.kernel_size = self.stride = self.padding = None
            self.kind = "linear"
            mk = dict(device="cpu", dtype=torch.float32, bias=False)
            self.lora_down = torch.nn.utils.skip_init(torch.nn.Linear, self.in_dim, self.lora_dim, **mk)
            self.lora_up = torch.nn.utils.skip_init(torch.nn.Linear, self.lora_dim, self.out_dim, **mk)
        else:
            raise TypeError(f"{lora_name}: LoRA needs a torch.nn.Linear or Conv2d, got {type(org_module).__name__}")

        if isinstance(alpha, torch.Tensor):
            alpha = alpha.detach().float().item()
        if alpha is None or alpha == 0:
            alpha_buf = torch.tensor(self.lora_dim, dtype=torch.int64)  # kohya: alpha = rank, stored as int64
            alpha_val: float = float(self.lora_dim)
        else:
            alpha_val = float(alpha)
            alpha_buf = torch.tensor(alpha_val, dtype=torch.float32)
        self.register_buffer("alpha", alpha_buf)
        self.scale = alpha_val / self.lora_dim

        # The draws kohya's constructor makes from the global RNG, here from the private generator: default init of
        # lora_down and lora_up (nn.Linear/Conv2d reset_parameters, discarded by kohya), then lora_down's init.
        with torch.no_grad():
            for w in (self.lora_down.weight, self.lora_up.weight, self.lora_down.weight):
                torch.nn.init.kaiming_uniform_(w, a=math.sqrt(5), generator=generator)
            torch.nn.init.zeros_(self.lora_up.weight)

        self.multiplier = float(multiplier)
        self.dropout = dropout or None
        self.rank_dropout = rank_dropout or None
        self.module_dropout = module_dropout or None

    @property
    def org_module(self) -> torch.nn.Module:
        """The module this LoRA adds to (ComfyUI's own Linear/Conv2d)."""
        return self._org_module

    @property
    def alpha_value(self) -> float:
        return float(self.alpha.item())

    def delta(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """kohya's LoRA branch on the module input: up(down(x)) * multiplier * scale, or None when module dropout
        skips this module. In training mode the dropouts draw from the global RNGs (see the module docstring)."""
        train = self.training
        if train and self.module_dropout is not None and torch.rand(1) < self.module_dropout:
            return None  # kohya: a host draw; the module is skipped for this forward

        w = self.lora_down.weight
        if x.dtype != w.dtype:  # the LoRA computes in its own dtype (training never runs under autocast)
            x = x.to(w.dtype)
        lx = self.lora_down(x)

        if train and self.dropout is not None:
            lx = torch.nn.functional.dropout(lx, p=self.dropout)

        scale = self.scale
        if train and self.rank_dropout is not None:
            mask = torch.rand((lx.size(0), self.lora_dim), device=lx.device) > self.rank_dropout
            if lx.dim() == 3:  # [B, tokens, rank]
                mask = mask.unsqueeze(1)
            elif lx.dim() == 4:  # [B, rank, H, W]
                mask = mask.unsqueeze(-1).unsqueeze(-1)
            lx = lx * mask
            scale = self.scale * (1.0 / (1.0 - self.rank_dropout))  # kohya: as if the rank had shrunk

        lx = self.lora_up(lx)
        return lx * self.multiplier * scale

    def apply(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """org output + delta, in the org output's dtype (what kohya's patched forward returns)."""
        d = self.delta(x)
        return out if d is None else out + d.to(out.dtype)

    def _product(self) -> torch.Tensor:
        up = self.lora_up.weight.to(torch.float)
        down = self.lora_down.weight.to(torch.float)
        if self.kind == "linear":
            return up @ down
        if self.kernel_size == (1, 1):
            return (up.squeeze(3).squeeze(2) @ down.squeeze(3).squeeze(2)).unsqueeze(2).unsqueeze(3)
        # the two convs composed: delta[o, i, kh, kw] = sum_r up[o, r] * down[r, i, kh, kw]
        return torch.nn.functional.conv2d(down.permute(1, 0, 2, 3), up).permute(1, 0, 2, 3)

    def delta_weight(self, multiplier: Optional[float] = None) -> torch.Tensor:
        """float32 weight delta = multiplier * (up . down) * scale (kohya's LoRAInfModule.get_weight)."""
        m = self.multiplier if multiplier is None else multiplier
        return m * self._product() * self.scale

    def merged_weight(self, multiplier: Optional[float] = None) -> torch.Tensor:
        """float32 W + delta, as kohya's merge_to computes it (the org module is not changed)."""
        w = self.org_module.weight.detach().to(torch.float)
        return w + self.delta_weight(multiplier).to(w.device)

    def extra_repr(self) -> str:
        return f"{self.lora_name}: {self.kind} {self.in_dim}->{self.out_dim}, rank {self.lora_dim}, alpha {self.alpha_value}"


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


def iter_target_modules(unet: Optional[torch.nn.Module], te1: Optional[torch.nn.Module],
                        te2: Optional[torch.nn.Module], config: NetworkConfig,
                        include_untrained: bool = False) -> list[TargetModule]:
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

    wanted = dict((n, (d, a)) for n, d, a in config.module_dims) if config.module_dims is not None else None
    block = config.resolved_block_dims() if config.block_mode else None
    conv_alpha = 1.0 if config.conv_alpha is None else config.conv_alpha

    def make(prefix: str, root: torch.nn.Module, containers: frozenset, is_unet: bool,
             trained: bool) -> list[TargetModule]:
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



@contextmanager
def output_hooks(handles: list, targets: Sequence[tuple[torch.nn.Module, Callable]]) -> Iterator[None]:
    """Register forward hooks on the shared modules for this block and always remove them (``handles`` is the
    network's list, so ``attached`` can tell); the modules themselves are never changed."""
    try:
        for module, hook in targets:
            handles.append(module.register_forward_hook(hook))
        yield
    finally:
        for h in handles:
            h.remove()
        handles.clear()


def cpu_state_dict(module: torch.nn.Module, dtype: Optional[torch.dtype] = None) -> dict[str, torch.Tensor]:
    """Detached CPU copies of a network's state dict, cast to ``dtype`` when given (alpha too, as kohya saves)."""
    out = {}
    for k, v in module.state_dict().items():
        v = v.detach().to("cpu", copy=True)
        out[k] = (v.to(dtype) if dtype is not None else v).contiguous()
    return out

class LoRANetwork(torch.nn.Module):
    """The set of LoRA modules, registered under their kohya names so ``state_dict()`` is kohya's file layout."""

    def __init__(self, loras: Sequence[LoRAModule], config: Optional[NetworkConfig] = None) -> None:
        super().__init__()
        self.config = config
        names = set()
        for lora in loras:
            if lora.lora_name in names:
                raise ValueError(f"duplicated lora name: {lora.lora_name}")
            names.add(lora.lora_name)
            self.add_module(lora.lora_name, lora)
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    # ------------------------------------------------------------------ construction
    @classmethod
    def build(cls, unet: Optional[torch.nn.Module], te1: Optional[torch.nn.Module], te2: Optional[torch.nn.Module],
              config: NetworkConfig, generator: torch.Generator) -> "LoRANetwork":
        """Find kohya's targets in ComfyUI's U-Net (``diffusion_model``) and CLIP-L/CLIP-G ``.transformer``.

        Always returns the module set for THIS config: kohya's create_network appends the conv containers to a
        class attribute, so a later default network in the same process also wraps ResBlock Linear/1x1 convs
        (quirk 11); that process-global mutation is deliberately not reproduced.
        """
        common = dict(generator=generator, multiplier=config.multiplier, dropout=config.dropout,
                      rank_dropout=config.rank_dropout, module_dropout=config.module_dropout)
        loras: list[LoRAModule] = []
        # TE modules are made (drawing from the generator) even when not trained, as kohya does: same init stream.
        for t in iter_target_modules(unet, te1, te2, config, include_untrained=True):
            lora = LoRAModule(t.name, t.module, t.dim, t.alpha, dim_source=t.dim_source, **common)
            if t.trained:
                loras.append(lora)
        return cls(loras, config)

    @classmethod
    def from_modules(cls, loras: Sequence[LoRAModule]) -> "LoRANetwork":
        """A network over hand-made modules (tests, tools)."""
        return cls(loras, None)

    # ------------------------------------------------------------------ views
    @property
    def loras(self) -> list[LoRAModule]:
        return [m for m in self.children() if isinstance(m, LoRAModule)]

    def _with_prefix(self, prefix: str) -> list[LoRAModule]:
        return [l for l in self.loras if l.lora_name.startswith(prefix + "_")]

    @property
    def unet_loras(self) -> list[LoRAModule]:
        return self._with_prefix(PREFIX_UNET)

    @property
    def te1_loras(self) -> list[LoRAModule]:
        return self._with_prefix(PREFIX_TE1)

    @property
    def te2_loras(self) -> list[LoRAModule]:
        return self._with_prefix(PREFIX_TE2)

    def set_multiplier(self, multiplier: float) -> None:
        for lora in self.loras:
            lora.multiplier = float(multiplier)

    # ------------------------------------------------------------------ hooks
    @contextmanager
    def attach(self) -> Iterator["LoRANetwork"]:
        """Add the LoRA to the original modules' outputs with forward hooks; on exit the hooks are removed and the
        modules are exactly as before (no attribute, forward or weight is changed at any time)."""
        if self._handles:
            raise RuntimeError("this LoRANetwork is already attached")

        def hook_for(lora: LoRAModule):
            def hook(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
                if not args:
                    raise RuntimeError(f"{lora.lora_name}: the module was called without a positional input")
                return lora.apply(args[0], output)
            return hook

        with output_hooks(self._handles, [(lora.org_module, hook_for(lora)) for lora in self.loras]):
            yield self

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    # ------------------------------------------------------------------ kohya files
    def state_dict_kohya(self, dtype: Optional[torch.dtype] = None) -> dict[str, torch.Tensor]:
        """kohya's saved dict: ``<name>.alpha`` (0-d), ``<name>.lora_down.weight``, ``<name>.lora_up.weight`` in
        kohya's order, detached CPU copies, cast to ``dtype`` when given (alpha too, as kohya's save_weights)."""
        return cpu_state_dict(self, dtype)

    def load_kohya(self, sd: Mapping[str, torch.Tensor]) -> None:
        """Copy a kohya state dict into this network's weights (strict: key sets, shapes and alphas must match).

        kohya's load_weights is non-strict and copies alpha without updating the scale its forward uses; here an
        unknown or missing key, a shape or an alpha mismatch raises instead (build the network with
        ``NetworkConfig.from_kohya_state_dict(sd)`` to get the file's dims/alphas). A missing ``.alpha`` is accepted
        when this module's alpha equals its rank (kohya's files without alpha).
        """
        own = self.state_dict()
        unknown = [k for k in sd if k not in own]
        missing = [k for k in own if k not in sd and not (
            k.endswith(".alpha") and self.get_submodule(k[:-len(".alpha")]).scale == 1.0)]
        if unknown or missing:
            raise ValueError(
                f"state dict does not match the network: {len(unknown)} unknown keys {unknown[:5]}, "
                f"{len(missing)} missing keys {missing[:5]}"
            )
        for k, v in sd.items():
            if tuple(v.shape) != tuple(own[k].shape):
                raise ValueError(f"{k}: shape {tuple(v.shape)} in the file, {tuple(own[k].shape)} in the network")
            if k.endswith(".alpha") and float(v.float().item()) != float(own[k].float().item()):
                raise ValueError(f"{k}: alpha {v.item()} in the file, {own[k].item()} in the network")
        with torch.no_grad():
            for k, v in sd.items():
                if not k.endswith(".alpha"):
                    own[k].copy_(v)

    # ------------------------------------------------------------------ optimizer
    def param_groups(self, unet_lr: float, te1_lr: float, te2_lr: float,
                     loraplus_lr_ratio: Optional[float] = None, loraplus_unet_lr_ratio: Optional[float] = None,
                     loraplus_text_encoder_lr_ratio: Optional[float] = None,
                     block_lr_weight: Optional[Sequence[float]] = None) -> tuple[list[dict], list[str]]:
        """kohya's LoRANetwork.prepare_optimizer_params: (param groups, lr descriptions).

        TE groups come first, then U-Net. Per part a "lora" group and, with a LoRA+ ratio, a "plus" group holding
        every lora_up at lr * ratio (the part's own ratio, else loraplus_lr_ratio, with kohya's ``or``: 0 falls
        back). A group whose lr is 0 is dropped. kohya's SDXL LoRA has ONE text_encoder_lr: when te1_lr == te2_lr
        the two TEs share one group ("textencoder") exactly as kohya; otherwise they get "textencoder 1" and
        "textencoder 2" groups (as kohya's multi-TE networks do). With block lr weights (argument, else the
        config's) the U-Net is grouped per block index in order of appearance, lr = unet_lr * weight[block],
        described "unet_block{idx}".
        """
        self.requires_grad_(True)
        groups: list[dict] = []
        descs: list[str] = []

        def assemble(loras: Sequence[LoRAModule], lr: float, ratio: Optional[float], label: str) -> None:
            plain, plus = [], []
            for lora in loras:
                for name, p in lora.named_parameters():
                    (plus if ratio is not None and "lora_up" in name else plain).append(p)
            for kind, params in (("lora", plain), ("plus", plus)):
                if not params:
                    continue
                group_lr = lr * ratio if kind == "plus" else lr
                if group_lr == 0:
                    continue
                groups.append({"params": params, "lr": group_lr})
                descs.append(label + (" plus" if kind == "plus" else ""))

        te_ratio = loraplus_text_encoder_lr_ratio or loraplus_lr_ratio
        te1, te2 = self.te1_loras, self.te2_loras
        if te1 and te2 and te1_lr != te2_lr:
            assemble(te1, te1_lr, te_ratio, "textencoder 1")
            assemble(te2, te2_lr, te_ratio, "textencoder 2")
        elif te1 or te2:
            assemble(te1 + te2, te1_lr if te1 else te2_lr, te_ratio, "textencoder")

        unet = self.unet_loras
        unet_ratio = loraplus_unet_lr_ratio or loraplus_lr_ratio
        weights = block_lr_weight if block_lr_weight is not None else (self.config.block_lr_weight if self.config else None)
        if unet and weights is not None:
            weights = parse_block_list(weights, "block_lr_weight", as_int=False)
            by_block: dict[int, list[LoRAModule]] = {}
            for lora in unet:
                by_block.setdefault(lora.block_index, []).append(lora)
            for idx, block_loras in by_block.items():
                assemble(block_loras, unet_lr * weights[idx], unet_ratio, f"unet_block{idx}")
        elif unet:
            assemble(unet, unet_lr, unet_ratio, "unet")
        return groups, descs

    # ------------------------------------------------------------------ max-norm
    @torch.no_grad()
    def apply_max_norm(self, max_norm: float) -> "MaxNormStats":
        """kohya's apply_max_norm_regularization (--scale_weight_norms), IN PLACE (quirk 21).

        Per module: delta = (up . down) * alpha/rank (no multiplier); n = max(||delta||_F, max_norm/2);
        ratio = min(n, max_norm)/n; up and down are multiplied by sqrt(ratio) (kohya only when ratio != 1; times
        exactly 1.0 changes nothing, and not asking saves a device sync per module). The statistics stay on the
        device until ``read()``.
        """
        norms: list[torch.Tensor] = []
        ratios: list[torch.Tensor] = []
        for lora in self.loras:
            down, up = lora.lora_down.weight, lora.lora_up.weight
            scale = lora.alpha / down.shape[0]
            if lora.kind == "linear":
                updown = up @ down
            elif tuple(up.shape[2:]) == (1, 1) and tuple(down.shape[2:]) == (1, 1):
                updown = (up.squeeze(2).squeeze(2) @ down.squeeze(2).squeeze(2)).unsqueeze(2).unsqueeze(3)
            else:
                updown = torch.nn.functional.conv2d(down.permute(1, 0, 2, 3), up).permute(1, 0, 2, 3)
            updown = updown * scale
            norm = updown.norm().clamp(min=max_norm / 2)
            desired = torch.clamp(norm, max=max_norm)
            ratio = desired / norm
            sqrt_ratio = ratio ** 0.5
            up.mul_(sqrt_ratio)
            down.mul_(sqrt_ratio)
            ratios.append(ratio)
            norms.append(updown.norm() * ratio)
        return MaxNormStats.of(norms, ratios)


@dataclass(frozen=True)
class MaxNormStats:
    """What max-norm did, as device tensors (reading them is a sync; the training loop never does)."""

    norms: Optional[torch.Tensor]  # [modules] norm after scaling
    scaled: Optional[torch.Tensor]  # [modules] bool: was this module scaled

    @classmethod
    def of(cls, norms: Sequence[torch.Tensor], ratios: Sequence[torch.Tensor]) -> "MaxNormStats":
        if not norms:
            return cls(None, None)
        return cls(torch.stack(list(norms)), torch.stack(list(ratios)) != 1)

    def read(self) -> tuple[int, float, float]:
        """(keys_scaled, mean norm, max norm), reduced in Python as kohya does; (0, 0.0, 0.0) for no modules."""
        if self.norms is None:
            return 0, 0.0, 0.0
        values = self.norms.float().cpu().tolist()
        return int(self.scaled.sum().cpu()), sum(values) / len(values), max(values)
