// Exact Inversion: draws the convergence record a node returned in `ui.inversion_convergence`
// (see nodes/ui.py) on the node itself: one curve per sample, log scale, final value as text.
// Served by ComfyUI from pyproject's [tool.comfy] web = "web"; it adds no server route.
import { app } from "../../scripts/app.js";

const PLOT_HEIGHT = 150;
const MARGIN = 8;
const COLORS = ["#4fc3f7", "#ffb74d", "#81c784", "#e57373", "#ba68c8", "#fff176", "#4db6ac", "#f06292"];

function formatValue(v) {
  if (v === null || v === undefined || !Number.isFinite(v)) return "n/a";
  const a = Math.abs(v);
  return a !== 0 && (a < 1e-3 || a >= 1e4) ? v.toExponential(2) : v.toPrecision(3);
}

// The y value to plot, or null when it cannot be drawn (log of <= 0, missing, infinite).
function plotValue(v, log) {
  if (v === null || v === undefined || !Number.isFinite(v)) return null;
  if (log) return v > 0 ? Math.log10(v) : null;
  return v;
}

function valueRange(record) {
  let lo = Infinity, hi = -Infinity, steps = 0;
  for (const series of record.series || []) {
    steps = Math.max(steps, series.length);
    for (const v of series) {
      const y = plotValue(v, record.log);
      if (y === null) continue;
      lo = Math.min(lo, y);
      hi = Math.max(hi, y);
    }
  }
  if (!Number.isFinite(lo)) return null;
  if (hi - lo < 1e-9) { lo -= 0.5; hi += 0.5; }
  return { lo, hi, steps };
}

function finalText(record) {
  const finals = (record.final || []).map(formatValue);
  if (finals.length === 0) return "final: n/a";
  if (finals.length <= 3) return `final: ${finals.join(" | ")}`;
  const numeric = (record.final || []).filter((v) => Number.isFinite(v));
  return `final (${finals.length} samples): max ${formatValue(Math.max(...numeric))}`;
}

export function drawConvergence(ctx, record, x0, y0, width, height) {
  ctx.save();
  ctx.fillStyle = "rgba(0,0,0,0.45)";
  ctx.fillRect(x0, y0, width, height);
  ctx.font = "11px sans-serif";
  ctx.textBaseline = "top";
  ctx.fillStyle = "#ddd";
  ctx.fillText(record.title || "convergence", x0 + 4, y0 + 3, width - 8);
  ctx.textBaseline = "bottom";
  ctx.fillText(finalText(record), x0 + 4, y0 + height - 3, width - 8);

  const range = valueRange(record);
  const left = x0 + 44, right = x0 + width - 6, top = y0 + 20, bottom = y0 + height - 44;
  ctx.strokeStyle = "#777";
  ctx.lineWidth = 1;
  ctx.beginPath();
  ctx.moveTo(left, top); ctx.lineTo(left, bottom); ctx.lineTo(right, bottom);
  ctx.stroke();
  ctx.fillStyle = "#aaa";
  ctx.font = "10px sans-serif";
  ctx.textBaseline = "top";
  ctx.textAlign = "right";
  ctx.fillText(`${record.x_label || "step"} →`, right, bottom + 2, width - 50);
  ctx.textAlign = "left";
  if (!range || range.steps === 0) {
    ctx.textBaseline = "middle";
    ctx.fillText("no finite values", left + 8, (top + bottom) / 2);
    ctx.restore();
    return;
  }
  const label = (y) => formatValue(record.log ? 10 ** y : y);
  ctx.textBaseline = "top";
  ctx.fillText(label(range.hi), x0 + 2, top - 2, 40);
  ctx.textBaseline = "bottom";
  ctx.fillText(label(range.lo), x0 + 2, bottom + 2, 40);
  ctx.textAlign = "right";
  ctx.textBaseline = "top";
  ctx.fillText(`${record.y_label || "value"}${record.log ? ", log scale" : ""}`, right, top, width - 100);
  ctx.textAlign = "left";

  const xAt = (i) => left + (range.steps <= 1 ? 0 : (i / (range.steps - 1)) * (right - left));
  const yAt = (y) => bottom - ((y - range.lo) / (range.hi - range.lo)) * (bottom - top);
  (record.series || []).forEach((series, b) => {
    ctx.strokeStyle = COLORS[b % COLORS.length];
    ctx.fillStyle = ctx.strokeStyle;
    ctx.lineWidth = 1.5;
    ctx.beginPath();
    let pen = false;
    series.forEach((v, i) => {
      const y = plotValue(v, record.log);
      if (y === null) { pen = false; return; }
      if (pen) ctx.lineTo(xAt(i), yAt(y)); else ctx.moveTo(xAt(i), yAt(y));
      pen = true;
    });
    ctx.stroke();
    if (series.length === 1) {   // a single point has no line to stroke
      const y = plotValue(series[0], record.log);
      if (y !== null) ctx.fillRect(xAt(0) - 2, yAt(y) - 2, 4, 4);
    }
  });
  if (record.summary) {
    ctx.fillStyle = "#bbb";
    ctx.textBaseline = "bottom";
    ctx.fillText(record.summary, x0 + 4, y0 + height - 15, width - 8);
  }
  ctx.restore();
}

function isPackNode(nodeData) {
  return typeof nodeData?.category === "string" && nodeData.category.split("/")[0] === "inversion";
}

app.registerExtension({
  name: "exact_inversion.convergence",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!isPackNode(nodeData)) return;

    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      const result = onExecuted?.apply(this, arguments);
      const records = message?.inversion_convergence;
      if (Array.isArray(records) && records.length > 0) {
        this.inversionConvergence = records;
        const base = this.computeSize ? this.computeSize() : this.size;
        const height = base[1] + records.length * (PLOT_HEIGHT + MARGIN);
        if (this.size[1] < height || this.size[0] < 280) {
          this.setSize([Math.max(this.size[0], 280), Math.max(this.size[1], height)]);
        }
        this.setDirtyCanvas?.(true, true);
      }
      return result;
    };

    const onDrawForeground = nodeType.prototype.onDrawForeground;
    nodeType.prototype.onDrawForeground = function (ctx) {
      const result = onDrawForeground?.apply(this, arguments);
      const records = this.inversionConvergence;
      if (!records || this.flags?.collapsed) return result;
      const width = this.size[0] - 2 * MARGIN;
      let y = this.size[1] - records.length * (PLOT_HEIGHT + MARGIN);
      for (const record of records) {
        drawConvergence(ctx, record, MARGIN, y, width, PLOT_HEIGHT);
        y += PLOT_HEIGHT + MARGIN;
      }
      return result;
    };
  },
});
