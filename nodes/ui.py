"""What the user sees of a node: its schema (`schema`, with search aliases where ComfyUI has them) and the
`ui` record every inversion node returns, which web/ draws as a convergence curve; one builder per node
family below `convergence_ui`.

ui["inversion_convergence"] is a list with one curve record:
  {"title": str, "x_label": str, "y_label": str, "log": bool,
   "series": [[float, ...] per sample], "final": [float per sample], "summary": str}
ComfyUI sends it to the frontend with the node's `executed` message and keeps it in /history.
"""
import dataclasses
import math

from comfy_api.latest import io

from .inverses import SHOT_SAMPLERS

CATEGORY = "inversion"   # the pack's node menu

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


def exact_inversion_ui(log, method, sampler):
    """Invert Latent's view: per-step residuals of the final pass (backward Euler), or the regeneration
    error per iteration (shooting), and the model calls."""
    if method == "reversible":
        summary = f"reversible inversion: {log.model_calls} model calls, algebraic (no solve)"
        return convergence_ui("Reversible inversion", [], "step", "residual RMS", summary=summary,
                              model_calls=log.model_calls)
    if method == "naive":
        summary = f"naive inversion: {log.model_calls} model calls, no residual (explicit steps)"
        return convergence_ui("Naive inversion", [], "step", "residual RMS", summary=summary,
                              model_calls=log.model_calls)
    if sampler in SHOT_SAMPLERS:
        errors = log.series("residual")
        best = max(min(per_sample) for per_sample in zip(*errors))   # the worst sample's returned iterate
        summary = (f"{sampler}: {log.model_calls} model calls, {len(errors)} shooting iterations, "
                   f"regeneration error {best:.2e}")
        if any(log.series("hit_cap")[-1]):
            summary += " (above tolerance: it levelled off or ran out of budget; the best iterate is returned)"
        return convergence_ui("Shooting: regeneration error per iteration", errors, "iteration", "RMS",
                              summary=summary, model_calls=log.model_calls)
    final_pass = log.series("residual", last_pass=True)
    worst = max(max(step) for step in final_pass)
    capped = sum(any(step) for step in log.series("hit_cap", last_pass=True))
    summary = f"{sampler}: {log.model_calls} model calls, worst step residual {worst:.2e}"
    if capped:
        summary += f", {capped} step(s) hit the iteration cap"
    passes = log.records[-1].get("pass", 0) + 1
    if passes > 1:
        summary += f", {passes} passes"
    return convergence_ui("Backward Euler residual per step", final_pass, "step", "residual RMS",
                          summary=summary, model_calls=log.model_calls)


def preciseinv_ui(log, tolerance):
    """The per-step residual curve, the steps that stopped at the iteration cap, and the model calls."""
    hit_cap, residuals = log.hit_cap, log.residuals
    samples = len(hit_cap[0]) if hit_cap else 0
    capped = [[k for k, step in enumerate(hit_cap) if step[b]] for b in range(samples)]
    worst = max((max(step) for step in residuals), default=0.0)
    summary = (f"tolerance {tolerance:.3g}: worst step residual {worst:.2e}, {log.model_calls} forward + "
               f"{log.model_calls_backward} backward model calls")
    n_capped = sum(any(step) for step in hit_cap)
    if n_capped:
        summary += f"; {n_capped} of {len(hit_cap)} step(s) stopped at max_iterations above the tolerance"
    return convergence_ui("PreciseInv residual per step", residuals, "step (least noisy first)",
                          "residual RMS per element", summary=summary, steps_at_iteration_cap=capped,
                          iterations=[max(step) for step in log.iterations], model_calls_forward=log.model_calls,
                          model_calls_backward=log.model_calls_backward)


def decoder_inversion_ui(method, log):
    """The residual curve per image, and each image's iterations and best residual."""
    final = log.records[-1]
    best, iterations = final["best_residual"], final["iterations"]
    converged = sum(not h for h in final["hit_cap"])
    units = "pixel RMS" if method == "gradient" else "latent RMS"
    summary = (f"{method}: {max(iterations)} iterations, residual {max(best):.3g} {units}, "
               f"converged {converged}/{len(best)}")
    return convergence_ui(f"Decoder inversion ({method})", log.residuals, "evaluation", f"residual ({units})",
                          summary=summary, final_residual=[float(r) for r in best],
                          iterations=[int(i) for i in iterations])


def tree_ring_ui(log, method, sampler, result, detected, false_positive_rate):
    """The inversion's residual view with the verdict as its summary, and per-sample values."""
    ui = exact_inversion_ui(log, method, sampler)
    p, distance = result["p_value"], result["distance"]
    found = int(sum(detected))
    if len(p) == 1:
        verdict = "watermark DETECTED" if detected[0] else "no watermark"
        summary = f"{verdict}: p = {float(p[0]):.3g} (rate {false_positive_rate:g}), distance {float(distance[0]):.3f}"
    else:
        summary = (f"watermark in {found} of {len(p)} images; lowest p = {float(p.min()):.3g} "
                   f"(rate {false_positive_rate:g})")
    record = ui["inversion_convergence"][0]
    record["title"], record["summary"] = "Tree-Ring detection (inversion residual per step)", summary
    ui["tree_ring"] = [{"p_value": float(pv), "distance": float(dv), "detected": bool(dt)}
                       for pv, dv, dt in zip(p, distance, detected)]
    return ui


def rf_edit_ui(forward_log, reverse_log):
    """The pull toward the source per edit step, and the model calls of both passes."""
    pulled = [sum(step) / len(step) for step in reverse_log.residuals if any(step)]
    return convergence_ui("RF-Inversion edit: pull toward the source", reverse_log.residuals, "edit step",
                          "RMS of D' - D", log=False,
                          summary=f"{forward_log.model_calls + reverse_log.model_calls} model calls; controlled steps "
                                  f"{len(pulled)} of {len(reverse_log.residuals)}")
