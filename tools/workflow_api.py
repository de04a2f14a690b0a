"""Convert a UI-format workflow (what users share, what example_workflows/ holds) to the API
format that POST /prompt takes, using the server's /object_info for input names and order.

Handles what the frontend itself resolves before queueing: widget values in schema order
(with the extra control_after_generate and image-upload values), inputs converted to links,
Reroute nodes, muted (mode 2) and bypassed (mode 4) nodes, and frontend-only nodes (notes).
"""
FRONTEND_ONLY = {"Note", "MarkdownNote", "PrimitiveNode", "Reroute"}
LINK_FREE_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


class WorkflowError(ValueError):
    pass


def is_widget(spec):
    kind = spec[0]
    return isinstance(kind, list) or kind in LINK_FREE_TYPES


def ordered_inputs(schema):
    """(name, spec, required) of every input, in the order the frontend lays them out."""
    out = []
    for section in ("required", "optional"):
        for name, spec in schema.get("input", {}).get(section, {}).items():
            out.append((name, spec, section == "required"))
    order = schema.get("input_order")
    if order:
        rank = {n: i for i, n in enumerate(order.get("required", []) + order.get("optional", []))}
        out.sort(key=lambda item: rank.get(item[0], len(rank)))
    return out


def _widget_inputs(schema):
    """(name, options) of every widget input, in the order of the node's widget values."""
    return [(name, spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {})
            for name, spec, _ in ordered_inputs(schema) if is_widget(spec)]


def _widget_values(node, schema):
    values = node.get("widgets_values") or []
    if isinstance(values, dict):   # some frontends save a name -> value mapping
        return dict(values)
    result, i = {}, 0
    for name, options in _widget_inputs(schema):
        if i >= len(values):
            break
        result[name] = values[i]
        i += 1
        if options.get("control_after_generate") or (name in ("seed", "noise_seed") and i < len(values)
                                                     and values[i] in ("fixed", "increment", "decrement", "randomize")):
            i += 1   # the "control after generate" value that follows a seed widget
        if options.get("image_upload") or options.get("video_upload"):
            i += 1 if i < len(values) and values[i] in ("image", "video", None) else 0
    return result


def ui_to_api(workflow, object_info):
    """The API-format prompt for a UI-format workflow dict."""
    if "nodes" not in workflow or "links" not in workflow:
        raise WorkflowError("not a UI-format workflow: expected 'nodes' and 'links'")
    nodes = {n["id"]: n for n in workflow["nodes"]}
    links = {}
    for link in workflow["links"]:
        if isinstance(link, dict):
            link = [link["id"], link["origin_id"], link["origin_slot"], link["target_id"], link["target_slot"], link["type"]]
        links[link[0]] = link

    def source(link_id):
        """Follow Reroutes and bypassed nodes back to the real (node, slot) feeding a link."""
        _, node_id, slot, _, _, link_type = links[link_id]
        node = nodes[node_id]
        if node["type"] == "Reroute" or node.get("mode") == 4:
            for inp in node.get("inputs", []):
                if inp.get("link") is not None and (node["type"] == "Reroute" or inp.get("type") == link_type):
                    return source(inp["link"])
            raise WorkflowError(f"node {node_id} ({node['type']}) passes nothing through for {link_type}")
        if node["type"] == "PrimitiveNode":
            return ("value", (node.get("widgets_values") or [None])[0])
        return (str(node_id), slot)

    prompt = {}
    for node_id, node in nodes.items():
        kind = node["type"]
        if kind in FRONTEND_ONLY or node.get("mode") in (2, 4):
            continue
        if kind not in object_info:
            raise WorkflowError(f"node {node_id}: node type {kind!r} is not installed")
        inputs = _widget_values(node, object_info[kind])
        for inp in node.get("inputs", []):
            if inp.get("link") is None:
                continue
            src = source(inp["link"])
            inputs[inp["name"]] = src[1] if src[0] == "value" else [src[0], src[1]]
        prompt[str(node_id)] = {"class_type": kind, "inputs": inputs,
                                "_meta": {"title": node.get("title", kind)}}
    return prompt


def tiny_overrides(image_size):
    """Widget values that fit the example workflows to the tiny test models and a small input image:
    empty latents at the input's size (512 px costs the tiny UNet minutes on a CPU) and Tree-Ring rings
    that fit its latent (radius 1: any latent of 4x4 or more). {class_type: {input: value}}."""
    return {"EmptyLatentImage": {"width": image_size, "height": image_size},
            "TreeRingNoise": {"radius": 1}, "TreeRingDetect": {"radius": 1}}


def apply_overrides(prompt, overrides):
    """A copy of an API prompt with `overrides` (from tiny_overrides) set on the matching nodes."""
    out = {}
    for key, node in prompt.items():
        inputs = {**node["inputs"], **overrides.get(node["class_type"], {})}
        out[key] = {**node, "inputs": inputs}
    return out
