"""ComfyUI UI workflows (the frontend's litegraph JSON) <-> API prompts, and the CI substitutions.

Why: the example workflows are committed in the format the frontend loads, but the server only runs API
prompts. The frontend turns one into the other (``graphToPrompt``); tests and the demo do the same here, so the
committed files themselves are what CI runs.

Widget rules (what the frontend does, checked against a template the frontend saved in
tests/server/test_example_workflows.py):

* a node's widgets are its inputs whose type is a widget type (INT, FLOAT, STRING, BOOLEAN, COMBO or a legacy
  list of options) and that are not ``forceInput``, in ``input_order`` (required, then optional);
* a widget keeps its slot in ``widgets_values`` even when a link feeds it (the link wins);
* an INT widget gets an extra "control after generate" value after its own when its spec says
  ``control_after_generate`` (True or a mode), or, when the spec does not say, when it is named ``seed`` or
  ``noise_seed``; FLOAT and COMBO widgets get one only when the spec says so;
* a COMBO with ``image_upload`` (Load Image) is followed by the upload button's widget, saved as "image" (as in
  the templates the frontend saved).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from typing import Any

WIDGET_TYPES = frozenset({"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"})
SEED_NAMES = frozenset({"seed", "noise_seed"})
# Frontend-only nodes: they never reach the server.
VIRTUAL_NODES = frozenset({"Note", "MarkdownNote", "PrimitiveNode", "Reroute"})
MODE_NEVER, MODE_BYPASS = 2, 4  # LiteGraph node modes (0, the default, runs the node)


class ConversionError(ValueError):
    pass


# ---------------------------------------------------------------------------------------------------------------
# the widget rules
# ---------------------------------------------------------------------------------------------------------------


def input_specs(node_info: Mapping[str, Any]) -> list[tuple[str, list]]:
    """``[(name, spec)]`` of a node's inputs in the order the frontend creates them (required, then optional)."""
    inputs = node_info.get("input", {})
    order = node_info.get("input_order") or {s: list(inputs.get(s, {})) for s in ("required", "optional")}
    specs = []
    for section in ("required", "optional"):
        for name in order.get(section, []):
            specs.append((name, inputs[section][name]))
    return specs


def spec_type(spec: list) -> Any:
    return spec[0]


def spec_options(spec: list) -> dict:
    return spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}


def is_widget(spec: list) -> bool:
    """A widget input (has a value on the node) rather than a socket that only a link can feed."""
    t = spec_type(spec)
    if spec_options(spec).get("forceInput"):
        return False
    return isinstance(t, list) or t in WIDGET_TYPES


def has_control_widget(name: str, spec: list) -> bool:
    """Whether the frontend adds a "control after generate" widget (one more ``widgets_values`` entry)."""
    control = spec_options(spec).get("control_after_generate")
    if spec_type(spec) == "INT" and control is None:
        return name in SEED_NAMES
    return bool(control)


#: upload flags of a COMBO spec -> the value the frontend saves for the upload widget it adds after the combo
UPLOAD_WIDGETS = {"image_upload": "image"}


def upload_widget_value(spec: list) -> str | None:
    """The ``widgets_values`` entry of the upload button the frontend adds after this widget, or None."""
    options = spec_options(spec)
    return next((value for flag, value in UPLOAD_WIDGETS.items() if options.get(flag)), None)


def _uploads(node_info: Mapping[str, Any]) -> dict[str, str]:
    return {
        name: value
        for name, spec in input_specs(node_info)
        if is_widget(spec) and (value := upload_widget_value(spec)) is not None
    }


def widget_slots(node_info: Mapping[str, Any]) -> list[tuple[str, bool]]:
    """``[(widget name, has control widget)]`` in ``widgets_values`` order."""
    return [(name, has_control_widget(name, spec)) for name, spec in input_specs(node_info) if is_widget(spec)]


def socket_inputs(node_info: Mapping[str, Any]) -> list[tuple[str, str]]:
    """``[(name, type)]`` of the inputs that are sockets only (MODEL, CLIP, ... and forceInput widgets)."""
    out = []
    for name, spec in input_specs(node_info):
        if not is_widget(spec):
            t = spec_type(spec)
            out.append((name, ",".join(t) if isinstance(t, list) else t))
    return out


def widget_type_name(spec: list) -> str:
    t = spec_type(spec)
    return "COMBO" if isinstance(t, list) else t


def widgets_to_inputs(node_info: Mapping[str, Any], values: list | dict | None, node_label: str = "") -> dict:
    """Map a node's ``widgets_values`` to named inputs with the widget rules above."""
    if values is None:
        return {}
    if isinstance(values, dict):  # some frontends/extensions save widgets by name
        names = {n for n, _ in widget_slots(node_info)}
        return {k: v for k, v in values.items() if k in names}
    out: dict[str, Any] = {}
    uploads = _uploads(node_info)
    i = 0
    slots = widget_slots(node_info)
    optional = set(node_info.get("input", {}).get("optional", {}))
    for k, (name, control) in enumerate(slots):
        if i >= len(values) and all(n in optional for n, _ in slots[k:]):
            break  # a workflow saved before these optional inputs existed: they take their defaults
        if i >= len(values):
            raise ConversionError(
                f"{node_label}: widgets_values has {len(values)} entries, too few for the widget "
                f"{name!r} (widgets: {[n for n, _ in widget_slots(node_info)]})"
            )
        out[name] = values[i]
        i += 1 + (1 if control else 0)
        if name in uploads and i < len(values) and values[i] == uploads[name]:
            i += 1  # the upload button's entry
    return out


def inputs_to_widgets(
    node_info: Mapping[str, Any], inputs: Mapping[str, Any], control_value: str = "fixed", linked_placeholder: Any = ""
) -> list:
    """The inverse: ``widgets_values`` for named inputs (a linked widget keeps a placeholder value)."""
    values: list = []
    uploads = _uploads(node_info)
    for name, control in widget_slots(node_info):
        if name not in inputs:
            raise ConversionError(f"no value for widget {name!r}")
        v = inputs[name]
        values.append(linked_placeholder if is_link(v) else v)
        if control:
            values.append(control_value)
        if name in uploads:
            values.append(uploads[name])
    return values


def is_link(value: Any) -> bool:
    """An API-prompt link: ``[node_id, output_slot]``."""
    return (
        isinstance(value, (list, tuple)) and len(value) == 2 and isinstance(value[0], str) and isinstance(value[1], int)
    )


# ---------------------------------------------------------------------------------------------------------------
# UI workflow -> API prompt
# ---------------------------------------------------------------------------------------------------------------


def _links_by_id(workflow: Mapping[str, Any]) -> dict[int, tuple[int, int, int, int]]:
    """link id -> (origin node, origin slot, target node, target slot); both the list and the dict form."""
    out = {}
    for link in workflow.get("links", []):
        if isinstance(link, dict):
            out[link["id"]] = (link["origin_id"], link["origin_slot"], link["target_id"], link["target_slot"])
        else:
            out[link[0]] = (link[1], link[2], link[3], link[4])
    return out


def workflow_to_prompt(workflow: Mapping[str, Any], object_info: Mapping[str, Any]) -> dict[str, dict]:
    """An API prompt (``{id: {class_type, inputs}}``) for a UI workflow, the way the frontend queues it.

    Virtual nodes (notes, PrimitiveNode, Reroute) are dropped: a Reroute is followed to its source, and a widget fed
    by a PrimitiveNode keeps the value the frontend stored on the widget. Muted nodes (mode 2) are dropped with the
    inputs they fed; bypassed nodes (mode 4) pass their first input of the same type through, as in the frontend.
    Subgraphs are not supported (the example workflows have none).
    """
    if workflow.get("definitions", {}).get("subgraphs"):
        raise ConversionError("subgraphs are not supported")
    nodes = {n["id"]: n for n in workflow["nodes"]}
    links = _links_by_id(workflow)

    def node_label(n: Mapping[str, Any]) -> str:
        return f"node {n['id']} ({n['type']})"

    def resolve(link_id: int) -> tuple[str, int] | None:
        """Follow a link back to a real node's output; None if it comes from nothing that runs."""
        seen = set()
        while True:
            if link_id in seen:
                raise ConversionError(f"link cycle through link {link_id}")
            seen.add(link_id)
            origin_id, origin_slot, _, _ = links[link_id]
            origin = nodes[origin_id]
            if origin["type"] == "Reroute":
                link_id = (origin.get("inputs") or [{}])[0].get("link")
                if link_id is None:
                    return None
                continue
            if origin["type"] in VIRTUAL_NODES or origin.get("mode", 0) == MODE_NEVER:
                return None
            if origin.get("mode", 0) == MODE_BYPASS:
                out_type = origin["outputs"][origin_slot]["type"]
                passthrough = [
                    i for i in origin.get("inputs", []) if i.get("type") == out_type and i.get("link") is not None
                ]
                if not passthrough:
                    return None
                link_id = passthrough[0]["link"]
                continue
            return str(origin_id), origin_slot

    prompt: dict[str, dict] = {}
    for node in workflow["nodes"]:
        t = node["type"]
        if t in VIRTUAL_NODES or node.get("mode", 0) in (MODE_NEVER, MODE_BYPASS):
            continue
        if t not in object_info:
            raise ConversionError(f"{node_label(node)}: the server has no node {t!r} (missing custom node pack?)")
        info = object_info[t]
        inputs = widgets_to_inputs(info, node.get("widgets_values"), node_label(node))
        for slot in node.get("inputs", []):
            if slot.get("link") is None:
                continue
            src = resolve(slot["link"])
            if src is None:
                continue  # a PrimitiveNode's value is already on the widget
            inputs[slot["name"]] = [src[0], src[1]]
        prompt[str(node["id"])] = {
            "class_type": t,
            "inputs": inputs,
            "_meta": {"title": node.get("title") or info.get("display_name") or t},
        }
    return prompt


# ---------------------------------------------------------------------------------------------------------------
# CI substitutions
# ---------------------------------------------------------------------------------------------------------------


def nodes_of(prompt: Mapping[str, dict], class_type: str) -> list[str]:
    return [k for k, v in prompt.items() if v["class_type"] == class_type]


def only_node(prompt: Mapping[str, dict], class_type: str) -> str:
    ids = nodes_of(prompt, class_type)
    if len(ids) != 1:
        raise ConversionError(f"expected one {class_type} node, found {len(ids)}: {ids}")
    return ids[0]


def for_ci(
    prompt: Mapping[str, dict],
    *,
    folder: str | None = None,
    toml_path: str | None = None,
    steps: int = 8,
    resolution: int = 64,
    sample_steps: int = 3,
    learning_rate: float = 1e-3,
    tiny_model: bool = True,
    checkpoint: str | None = None,
    **train_overrides: Any,
) -> dict[str, dict]:
    """A copy of an example prompt that runs in CI (or in the demo): the tiny model (or ``checkpoint``), the
    given dataset, few steps at a small resolution, fp32 compute (CPU), a learning rate that moves in few steps.

    ``train_overrides`` set further inputs of the train node (seed, output_name, overwrite, ...).
    """
    p = copy.deepcopy(dict(prompt))
    for nid in nodes_of(p, "CheckpointLoaderSimple"):
        if checkpoint is not None:
            p[nid]["inputs"]["ckpt_name"] = checkpoint
        elif tiny_model:
            # same three outputs (MODEL, CLIP, VAE), so every link stays valid
            p[nid] = {
                "class_type": "TinySDXLCheckpointLoader",
                "inputs": {"seed": 0, "v_prediction": False},
                "_meta": {"title": "Tiny SDXL (CI)"},
            }
    if folder is not None:
        for nid in nodes_of(p, "SDXLLoraImagesFromFolder"):
            p[nid]["inputs"]["folder"] = folder
    if toml_path is not None:
        for nid in nodes_of(p, "SDXLLoraDatasetFromToml"):
            p[nid]["inputs"]["toml_path"] = toml_path
    for nid in nodes_of(p, "SDXLLoraBuckets"):
        p[nid]["inputs"].update(
            resolution_width=resolution,
            resolution_height=resolution,
            min_bucket_reso=32,
            max_bucket_reso=2 * resolution,
            bucket_reso_steps=32,
        )
    for nid in nodes_of(p, "EmptyLatentImage"):
        p[nid]["inputs"].update(width=resolution, height=resolution, batch_size=1)
    for nid in nodes_of(p, "KSampler"):
        p[nid]["inputs"]["steps"] = sample_steps
    for nid in nodes_of(p, "SDXLLoraTrain") + nodes_of(p, "SDXLLoraTrainSettings"):
        p[nid]["inputs"].update(
            max_train_steps=steps, max_train_epochs=0, learning_rate=learning_rate, train_dtype="fp32", full_bf16=False
        )
    for nid in nodes_of(p, "SDXLLoraTrain"):
        p[nid]["inputs"].update(train_overrides)
    for nid in nodes_of(p, "SDXLLoraTrainSettings"):  # the training widgets live here when the graph shares them
        p[nid]["inputs"].update({k: v for k, v in train_overrides.items() if k in p[nid]["inputs"]})
    return p


def set_inputs(prompt: Mapping[str, dict], class_type: str, **values: Any) -> dict[str, dict]:
    """A copy with ``values`` set on every node of ``class_type``."""
    p = copy.deepcopy(dict(prompt))
    ids = nodes_of(p, class_type)
    if not ids:
        raise ConversionError(f"no {class_type} node in the prompt")
    for nid in ids:
        p[nid]["inputs"].update(values)
    return p


def upstream(prompt: Mapping[str, dict], targets: Iterable[str]) -> dict[str, dict]:
    """Only ``targets`` and what they depend on (e.g. the training part without the sampling part)."""
    keep: set[str] = set()
    todo = list(targets)
    while todo:
        nid = todo.pop()
        if nid in keep:
            continue
        keep.add(nid)
        todo += [v[0] for v in prompt[nid]["inputs"].values() if is_link(v)]
    return {k: copy.deepcopy(v) for k, v in prompt.items() if k in keep}
