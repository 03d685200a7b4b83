"""Example workflows: built from a compact description into ComfyUI's UI format
(what the frontend's Load and template browser read), and converted back to the API
format (what ``/prompt`` runs). Node signatures come from the node classes
themselves (``INPUT_TYPES``), so widget order always matches ComfyUI's.

    python scripts/workflows.py        # rewrites example_workflows/*.json

Needs ComfyUI importable (run after ``bash scripts/test.sh`` built .venv/ and .comfyui/).
"""
from __future__ import annotations

import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKFLOW_DIR = os.path.join(ROOT, "example_workflows")
FRONTEND_ONLY = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


def input_specs(node_class) -> list[tuple[str, str, dict]]:
    """(name, type, options) of every input in ComfyUI's order (required, optional)."""
    types = node_class.INPUT_TYPES()
    specs = []
    for group in ("required", "optional"):
        for name, spec in types.get(group, {}).items():
            kind = spec[0]
            options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            specs.append((name, "COMBO" if isinstance(kind, (list, tuple)) else kind, options))
    return specs


def is_widget(kind: str, options: dict) -> bool:
    return kind in WIDGET_TYPES and not options.get("forceInput", False)


def has_control_widget(name: str, kind: str, options: dict) -> bool:
    """The frontend adds a 'control after generate' value after seed widgets."""
    flag = options.get("control_after_generate")
    return kind == "INT" and (flag if flag is not None else name in ("seed", "noise_seed"))


def output_types(node_class) -> list[str]:
    return [t if isinstance(t, str) else "COMBO" for t in node_class.RETURN_TYPES]


def build_ui(nodes: list[dict], node_classes: dict, extra: dict | None = None) -> dict:
    """nodes: [{"id", "type", "pos", "widgets": {name: value}, "links": {input: (src_id, slot)},
    "title"?, "text" (notes)}] -> a UI-format workflow."""
    links, by_id = [], {n["id"]: n for n in nodes}
    ui_nodes = []
    out_links: dict[tuple[int, int], list[int]] = {}
    for node in nodes:
        for name, (src, slot) in node.get("links", {}).items():
            link_id = len(links) + 1
            src_type = output_types(node_classes[by_id[src]["type"]])[slot]
            links.append([link_id, src, slot, node["id"], name, src_type])
            out_links.setdefault((src, slot), []).append(link_id)
    for order, node in enumerate(nodes):
        entry = {"id": node["id"], "type": node["type"], "pos": list(node["pos"]),
                 "size": list(node.get("size", (320, 160))), "flags": {}, "order": order, "mode": 0,
                 "inputs": [], "outputs": [], "properties": {"Node name for S&R": node["type"]}}
        if node.get("title"):
            entry["title"] = node["title"]
        if node["type"] in FRONTEND_ONLY:
            entry["widgets_values"] = [node["text"]]
            entry["properties"] = {}
            ui_nodes.append(entry)
            continue
        node_class = node_classes[node["type"]]
        widgets = dict(node.get("widgets", {}))
        values, slot_of = [], {}
        for name, kind, options in input_specs(node_class):
            if name in node.get("links", {}):
                slot_of[name] = len(entry["inputs"])
                entry["inputs"].append({"name": name, "type": kind, "link": None})
                continue
            if not is_widget(kind, options):
                continue
            value = widgets.pop(name, options.get("default"))
            if value is None and kind == "COMBO":
                value = node_class.INPUT_TYPES()[_group_of(node_class, name)][name][0][0]
            values.append(value)
            if has_control_widget(name, kind, options):
                values.append("fixed")
        if widgets:
            raise ValueError(f"{node['type']}: unknown widgets {sorted(widgets)}")
        entry["widgets_values"] = values
        for slot, kind in enumerate(output_types(node_class)):
            entry["outputs"].append({"name": kind, "type": kind, "slot_index": slot,
                                     "links": out_links.get((node["id"], slot), [])})
        ui_nodes.append(entry)
    for link in links:  # input names -> input slots
        target = next(n for n in ui_nodes if n["id"] == link[3])
        slot = next(i for i, inp in enumerate(target["inputs"]) if inp["name"] == link[4])
        target["inputs"][slot]["link"] = link[0]
        link[4] = slot
    return {"last_node_id": max(n["id"] for n in nodes), "last_link_id": len(links),
            "nodes": ui_nodes, "links": links, "groups": [], "config": {},
            "extra": dict(extra or {}), "version": 0.4}


def _group_of(node_class, name: str) -> str:
    types = node_class.INPUT_TYPES()
    return "required" if name in types.get("required", {}) else "optional"


def ui_to_api(workflow: dict, node_classes: dict) -> dict:
    """The API-format prompt of a UI-format workflow (frontend-only nodes dropped)."""
    links = {link[0]: link for link in workflow["links"]}
    prompt = {}
    for node in workflow["nodes"]:
        if node["type"] in FRONTEND_ONLY or node.get("mode", 0) != 0:
            continue
        node_class = node_classes[node["type"]]
        inputs, values = {}, list(node.get("widgets_values", []))
        linked = {inp["name"]: links[inp["link"]] for inp in node["inputs"] if inp.get("link") is not None}
        for name, kind, options in input_specs(node_class):
            if name in linked:
                link = linked[name]
                inputs[name] = [str(link[1]), link[2]]
            elif is_widget(kind, options):
                inputs[name] = values.pop(0)
                if has_control_widget(name, kind, options):
                    values.pop(0)
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt


def load_node_classes() -> dict:
    if ROOT not in sys.path:
        sys.path.append(ROOT)  # for gnri_testing; comfy_env puts ComfyUI ahead of it
    import asyncio

    from gnri_testing import comfy_env
    comfy_env.setup()
    import nodes
    asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
    asyncio.run(nodes.load_custom_node(ROOT))
    return nodes.NODE_CLASS_MAPPINGS


def main():
    from example_workflow_specs import WORKFLOWS
    node_classes = load_node_classes()
    os.makedirs(WORKFLOW_DIR, exist_ok=True)
    for name, (spec_nodes, extra) in WORKFLOWS.items():
        workflow = build_ui(spec_nodes, node_classes, extra)
        ui_to_api(workflow, node_classes)  # round-trips
        with open(os.path.join(WORKFLOW_DIR, name), "w") as f:
            json.dump(workflow, f, indent=1)
        print("wrote", name)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    main()
