"""What the user sees of a node: its schema (`schema`, with search aliases where ComfyUI has them) and the
`ui` record every inversion node returns, which web/ draws as a convergence curve.

ui["inversion_convergence"] is a list with one curve record:
  {"title": str, "x_label": str, "y_label": str, "log": bool,
   "series": [[float, ...] per sample], "final": [float per sample], "summary": str}
ComfyUI sends it to the frontend with the node's `executed` message and keeps it in /history.
"""
import dataclasses
import math

from comfy_api.latest import io

# Schema fields that newer ComfyUI has and 0.3.75 refuses (an unknown keyword breaks the node).
SCHEMA_FIELDS = {f.name for f in dataclasses.fields(io.Schema)}


def schema(search_aliases=(), **fields):
    """io.Schema with the node search's aliases where this ComfyUI supports them."""
    if "search_aliases" in SCHEMA_FIELDS:
        fields["search_aliases"] = list(search_aliases)
    return io.Schema(**fields)


def _clean(v):
    v = float(v)
    return v if math.isfinite(v) else None


def convergence_ui(title, per_step, x_label, y_label, log=True, summary="", **extra):
    """per_step: a list over iterations or steps of per-sample values (StepLog.residuals)."""
    samples = len(per_step[0]) if per_step else 0
    series = [[_clean(step[b]) for step in per_step] for b in range(samples)]
    final = [s[-1] if s else None for s in series]
    record = {"title": title, "x_label": x_label, "y_label": y_label, "log": log,
              "series": series, "final": final, "summary": summary}
    ui = {"inversion_convergence": [record]}
    for key, value in extra.items():
        ui[key] = value if isinstance(value, list) else [value]
    return ui
