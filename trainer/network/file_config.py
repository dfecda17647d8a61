"""The network a saved adapter file holds: its algorithm (from its keys), the parts it adapts, and each module's dim
and alpha (and LoKr's factor), read back so that continuing it builds exactly that network.

kohya LoRA files go through ``NetworkConfig.from_kohya_state_dict`` (kohya's create_network_from_weights); LyCORIS
LoHa / LoKr / DoRA files the pack writes (LyCORIS's keys, the modules loha.py / lokr.py / dora.py build) are read
here the same way. Loading the weights afterwards (``AdapterNetwork.load_kohya``) is strict, so a file this reads
wrong fails there by key and shape, never silently.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping

import torch

from .config import NetworkConfig
from .targets import PREFIX_TE1, PREFIX_TE2, PREFIX_UNET

#: the tensors each algorithm's modules save (their key suffixes after ``<lora_name>.``)
ALGO_SUFFIXES: dict[str, frozenset[str]] = {
    "lora": frozenset({"alpha", "lora_down.weight", "lora_up.weight"}),
    "dora": frozenset({"alpha", "lora_down.weight", "lora_up.weight", "dora_scale"}),
    "loha": frozenset({"alpha", "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"}),
    "lokr": frozenset({"alpha", "lokr_w1", "lokr_w2", "lokr_w2_a", "lokr_w2_b"}),
}

#: kohya's 3x3 conv targets of the SDXL U-Net (ResBlock in/out convs, Downsample op, Upsample conv)
_CONV3X3_NAME = re.compile(r"_(in_layers_2|out_layers_3|op|conv)$")
_PARTS = {PREFIX_UNET: "unet", PREFIX_TE1: "te1", PREFIX_TE2: "te2"}


def file_algo(keys: Iterable[str]) -> str:
    """The algorithm whose keys a file holds: dora (``dora_scale`` with lora_up/down), loha (``hada_*``), lokr
    (``lokr_*``) or lora. A mix the pack does not train (e.g. LoHa with dora_scale) raises."""
    suffixes = {k.split(".", 1)[1] for k in keys if "." in k}
    kinds = {
        "dora": "dora_scale" in suffixes,
        "loha": any(s.startswith("hada_") for s in suffixes),
        "lokr": any(s.startswith("lokr_") for s in suffixes),
    }
    found = [algo for algo, present in kinds.items() if present]
    if found == ["dora"] or not found:
        return found[0] if found else "lora"
    if len(found) == 1:
        return found[0]
    raise ValueError(
        f"the file mixes {' and '.join(found)} tensors (e.g. LyCORIS's DoHa/DoKr); the pack continues lora, dora, "
        "loha and lokr files"
    )


def file_parts(keys: Iterable[str]) -> set[str]:
    """The model parts a file adapts: "unet" (lora_unet_), "te1" (lora_te1_, CLIP-L), "te2" (lora_te2_, CLIP-G)."""
    return {_PARTS[p] for k in keys for p in _PARTS if k.startswith(p + "_")}


def _modules(sd: Mapping[str, torch.Tensor], algo: str) -> dict[str, dict[str, torch.Tensor]]:
    allowed = ALGO_SUFFIXES[algo]
    parts: dict[str, dict[str, torch.Tensor]] = {}
    unknown = []
    for key, value in sd.items():
        name, _, suffix = key.partition(".")
        if suffix not in allowed or not name.startswith(tuple(p + "_" for p in _PARTS)):
            unknown.append(key)
        else:
            parts.setdefault(name, {})[suffix] = value
    if unknown:
        raise ValueError(
            f"{len(unknown)} keys are not {algo} keys of an SDXL adapter the pack makes (lora_unet_/lora_te1_/"
            f"lora_te2_<module>.{'|'.join(sorted(allowed))}), e.g. {unknown[:5]}"
        )
    if not parts:
        raise ValueError("the file holds no adapter modules")
    return parts


def _alpha(p: Mapping[str, torch.Tensor], dim: int) -> float:
    return float(p["alpha"].detach().float().item()) if "alpha" in p else float(dim)


def _dim(name: str, p: Mapping[str, torch.Tensor], algo: str) -> int:
    """The module's LyCORIS lora_dim, from its tensors' shapes."""
    w2 = ("lokr_w2",) if "lokr_w2" in p else ("lokr_w2_a", "lokr_w2_b")
    required = {
        "dora": ("lora_down.weight", "lora_up.weight", "dora_scale"),
        "loha": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"),
        "lokr": ("lokr_w1", *w2),
    }[algo]
    missing = [s for s in required if s not in p]
    if missing:
        raise ValueError(f"{name}: missing {', '.join(name + '.' + s for s in missing)}")
    if algo == "dora":
        return int(p["lora_down.weight"].shape[0])
    if algo == "loha":
        return int(p["hada_w1_b"].shape[0])
    if "lokr_w2_a" in p:
        return int(p["lokr_w2_a"].shape[1])
    # a full lokr_w2: LyCORIS then saves alpha = lora_dim (scale 1), and any dim at least that large builds it
    return int(round(_alpha(p, 1)))


def _lokr_factor(parts: Mapping[str, Mapping[str, torch.Tensor]]) -> int:
    """LyCORIS's ``factor`` that splits every Linear module's (out, in) into the file's lokr_w1 / lokr_w2 shapes."""
    splits = []
    for name, p in parts.items():
        if _CONV3X3_NAME.search(name):
            continue  # a 3x3 conv's w2 folds the kernel in; the Linear modules decide
        a, c = p["lokr_w1"].shape
        b, d = (
            (p["lokr_w2"].shape[0], p["lokr_w2"].shape[1])
            if "lokr_w2" in p
            else (
                p["lokr_w2_a"].shape[0],
                p["lokr_w2_b"].shape[1],
            )
        )
        splits.append(((int(a), int(b)), (int(c), int(d))))
    from lycoris.functional.general import factorization

    candidates = [-1] + sorted({x for pair in splits for dims in pair for x in dims})
    for factor in candidates:
        if all(factorization(o[0] * o[1], factor) == o and factorization(i[0] * i[1], factor) == i for o, i in splits):
            return factor
    raise ValueError("no LyCORIS factor splits the file's LoKr modules as they are; the pack cannot continue it")


def config_from_file(sd: Mapping[str, torch.Tensor], **overrides) -> NetworkConfig:
    """The NetworkConfig that builds the network ``sd`` holds (algo, parts, per-module dims/alphas, LoKr factor);
    ``overrides`` sets the other fields (dropouts, multiplier, frozen_parts...)."""
    algo = file_algo(sd)
    if algo == "lora":
        return NetworkConfig.from_kohya_state_dict(sd, **overrides)
    parts = _modules(sd, algo)
    modules = []
    for name, p in parts.items():
        dim = _dim(name, p, algo)
        if algo == "dora":
            conv = p["lora_down.weight"].ndim == 4 and tuple(p["lora_down.weight"].shape[2:]) != (1, 1)
        else:
            conv = bool(_CONV3X3_NAME.search(name))
        modules.append((name, dim, _alpha(p, dim), conv))
    lin = Counter((d, a) for _, d, a, conv in modules if not conv)
    conv = Counter((d, a) for _, d, a, is_conv in modules if is_conv)
    (net_dim, net_alpha), _ = (lin or conv).most_common(1)[0]
    present = file_parts(sd)
    kw = {
        "algo": algo,
        "network_dim": net_dim,
        "network_alpha": net_alpha,
        "conv_dim": conv.most_common(1)[0][0][0] if conv else None,
        "conv_alpha": conv.most_common(1)[0][0][1] if conv else None,
        "train_unet": "unet" in present,
        "train_te1": "te1" in present,
        "train_te2": "te2" in present,
        "module_dims": tuple((n, d, a) for n, d, a, _ in modules),
    }
    if algo == "lokr":
        kw["factor"] = _lokr_factor(parts)
    kw.update(overrides)
    return NetworkConfig(**kw)


#: part -> (the Network node's toggle, what users call it, the key prefix)
PART_TOGGLES = {
    "unet": ("train_unet", "U-Net", PREFIX_UNET),
    "te1": ("train_clip_l", "CLIP-L", PREFIX_TE1),
    "te2": ("train_clip_g", "CLIP-G", PREFIX_TE2),
}


def start_from_refusal(
    name: str, keys: Iterable[str], algo: str, train_unet: bool, train_clip_l: bool, train_clip_g: bool
) -> str | None:
    """Why the Network node cannot continue file ``name`` (its tensor ``keys``) as set, or None.

    The file decides the algorithm and which parts exist; the toggles decide which of them train (a part in the file
    whose toggle is off is applied frozen). So: another algorithm than ``algo``, a toggle on for a part the file does
    not have, or every part of the file switched off, are refused, with the fix."""
    keys = list(keys)
    try:
        found = file_algo(keys)
    except ValueError as e:
        return f"start_from {name}: {e}."
    if found != algo:
        return (
            f"start_from {name} is a {found} file, but algo is {algo!r}: set algo to {found!r} to continue it, or "
            "choose another start_from."
        )
    present = file_parts(keys)
    toggles = {"unet": train_unet, "te1": train_clip_l, "te2": train_clip_g}
    for part, on in toggles.items():
        widget, label, prefix = PART_TOGGLES[part]
        if on and part not in present:
            return (
                f"start_from {name} has no {label} modules ({prefix}_ keys), so {widget} has nothing to continue: "
                f"switch {widget} off, or start from none to train new {label} modules."
            )
    if not any(toggles[p] for p in present):
        switches = " or ".join(PART_TOGGLES[p][0] for p in PART_TOGGLES if p in present)
        return f"start_from {name}: every part it holds is switched off, so nothing would train: switch on {switches}."
    return None
