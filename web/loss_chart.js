// Live loss chart for the SDXL LoRA Trainer: a <canvas> DOM widget inside every "SDXLLoraTrain" node.
//
// The train node sends "sdxl_lora_trainer.progress" over ComfyUI's websocket after every optimizer step:
//   {node, step, total, loss, lr, it_s, eta_s, epoch}
// and after a step that was validated: {node, validation: true, step, epoch, val_loss, kind}, drawn as a second
// series (magenta line with a dot per validation) on the loss axis.
// Only the node whose (execution) id equals `node` is updated. A run starting over (step 1, or any step not
// after the last one seen) clears the chart; a resumed run (next step) continues it; {cancelled: true} marks it. Drawn: raw loss (thin blue), its trailing moving average (orange,
// the same 25-step window as the pack's loss_graph image) and the learning rate (green, own right axis), with
// "step N/total, X it/s, ETA" above. Non-finite or missing values are skipped, never drawn.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const EXTENSION = "sdxl_lora_trainer.loss_chart";
const NODE_TYPE = "SDXLLoraTrain";
const EVENT = "sdxl_lora_trainer.progress";
const WIDGET = "loss_chart";
const SMOOTH_WINDOW = 25;
const CHART_HEIGHT = 200;
const COLORS = {
  bg: "#1c1c1c",
  frame: "#555555",
  text: "#dddddd",
  dim: "#999999",
  loss: "#5aa9ff",
  smooth: "#ffa23a",
  lr: "#4cd07d",
  val: "#ff5ad2",
};

const num = (v) => (v === null || v === undefined || v === "" ? NaN : Number(v));
const finite = (v) => Number.isFinite(v);

function fmtDuration(s) {
  if (!finite(s) || s < 0) return "–";
  s = Math.round(s);
  if (s < 60) return `${s}s`;
  const m = Math.floor(s / 60);
  if (m < 60) return `${m}m ${String(s % 60).padStart(2, "0")}s`;
  return `${Math.floor(m / 60)}h ${String(m % 60).padStart(2, "0")}m`;
}

function fmtRate(r) {
  if (!finite(r) || r <= 0) return "– it/s";
  return r >= 1 ? `${r.toFixed(2)} it/s` : `${r.toFixed(3)} it/s (${(1 / r).toFixed(1)} s/it)`;
}

const fmtLoss = (v) => (finite(v) ? (Math.abs(v) >= 1e4 || (v !== 0 && Math.abs(v) < 1e-3) ? v.toExponential(2) : v.toPrecision(4)) : "–");
const fmtLr = (v) => (finite(v) ? v.toExponential(1) : "–");

// [lo, hi] of the finite values, widened when flat (constant series, one point) and padded 5%.
function range(values) {
  let lo = Infinity;
  let hi = -Infinity;
  for (const v of values) {
    if (finite(v)) {
      if (v < lo) lo = v;
      if (v > hi) hi = v;
    }
  }
  if (!(lo <= hi)) return null;
  if (hi - lo <= Math.abs(hi) * 1e-9 || !finite(hi - lo)) {
    const pad = Math.abs(lo) * 0.1 || 1;
    lo -= pad;
    hi += pad;
  }
  const m = (hi - lo) * 0.05;
  return finite(m) ? [lo - m, hi + m] : [lo, hi];
}

export class LossChart {
  constructor() {
    this.element = document.createElement("div");
    this.element.className = "sdxl-lora-loss-chart";
    // View only: let pointer and wheel events reach the graph canvas underneath (pan/zoom keep working).
    Object.assign(this.element.style, { pointerEvents: "none", width: "100%", height: "100%", minHeight: "0" });
    this.canvas = document.createElement("canvas");
    Object.assign(this.canvas.style, { display: "block", width: "100%", height: "100%", pointerEvents: "none" });
    this.element.appendChild(this.canvas);
    this.colors = COLORS;
    this.plot = null; // the plot area in canvas pixels, set by draw()
    this._frame = 0;
    this.reset();
    if (typeof ResizeObserver !== "undefined") {
      this._observer = new ResizeObserver(() => this.requestDraw());
      this._observer.observe(this.element);
    }
  }

  reset() {
    this.steps = [];
    this.losses = [];
    this.smoothed = [];
    this.lrs = [];
    this.valSteps = [];
    this.valLosses = [];
    this.last = null;
    this.cancelled = false;
    this.requestDraw();
  }

  // One progress event. Returns false for an event this chart cannot use (no step).
  push(detail) {
    const step = num(detail?.step);
    if (!finite(step)) return false;
    if (detail.cancelled) {
      // The train node's cancel notice ({cancelled: true, step, message}): keep the curve, say so.
      if (this.last) this.cancelled = true;
      this.requestDraw();
      return true;
    }
    if (detail.validation) {
      // The validation loss of a step already drawn (or, for a resumed chart, of a step before it).
      if (this.last && step > this.last.step) return false;
      this.valSteps.push(step);
      this.valLosses.push(num(detail.val_loss));
      this.requestDraw();
      return true;
    }
    if (!this.last || !(step > this.last.step)) this.reset();
    this.cancelled = false;
    const loss = num(detail.loss);
    this.steps.push(step);
    this.losses.push(loss);
    let sum = 0;
    let n = 0;
    for (let i = Math.max(0, this.losses.length - SMOOTH_WINDOW); i < this.losses.length; i++) {
      if (finite(this.losses[i])) {
        sum += this.losses[i];
        n += 1;
      }
    }
    this.smoothed.push(n ? sum / n : NaN);
    this.lrs.push(num(detail.lr));
    this.last = {
      step,
      total: num(detail.total),
      loss,
      lr: num(detail.lr),
      it_s: num(detail.it_s),
      eta_s: num(detail.eta_s),
      epoch: num(detail.epoch),
    };
    this.requestDraw();
    return true;
  }

  status() {
    const l = this.last;
    if (!l) return "waiting for training…";
    const total = finite(l.total) ? `/${l.total}` : "";
    if (this.cancelled) return `step ${l.step}${total}, cancelled`;
    const epoch = finite(l.epoch) ? `  epoch ${l.epoch}` : "";
    return `step ${l.step}${total}, ${fmtRate(l.it_s)}, ETA ${fmtDuration(l.eta_s)}${epoch}`;
  }

  requestDraw() {
    if (this._frame) return;
    const raf = globalThis.requestAnimationFrame;
    if (!raf) return this.draw();
    this._frame = raf(() => {
      this._frame = 0;
      this.draw();
    });
  }

  draw() {
    const canvas = this.canvas;
    const dpr = globalThis.devicePixelRatio || 1;
    const cssW = Math.max(1, Math.round(this.element.clientWidth || canvas.clientWidth || 300));
    const cssH = Math.max(1, Math.round(this.element.clientHeight || canvas.clientHeight || CHART_HEIGHT));
    const W = Math.round(cssW * dpr);
    const H = Math.round(cssH * dpr);
    if (canvas.width !== W || canvas.height !== H) {
      canvas.width = W;
      canvas.height = H;
    }
    const ctx = canvas.getContext("2d");
    if (!ctx) return;
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    const c = this.colors;
    ctx.fillStyle = c.bg;
    ctx.fillRect(0, 0, cssW, cssH);
    ctx.font = "11px sans-serif";
    ctx.textBaseline = "top";

    // Header: progress text on the left, the latest loss on the right.
    ctx.fillStyle = c.text;
    ctx.textAlign = "left";
    ctx.fillText(this.status(), 6, 4);
    if (this.last) {
      ctx.textAlign = "right";
      ctx.fillStyle = c.smooth;
      const val = this.valLosses.length ? `  val ${fmtLoss(this.valLosses[this.valLosses.length - 1])}` : "";
      ctx.fillText(`loss ${fmtLoss(this.last.loss)}  avg ${fmtLoss(this.smoothed[this.smoothed.length - 1])}${val}`, cssW - 6, 4);
    }

    const left = 46;
    const right = 50;
    const top = 22;
    const bottom = 16;
    const pw = cssW - left - right;
    const ph = cssH - top - bottom;
    this.plot = { x: left * dpr, y: top * dpr, w: Math.max(0, pw) * dpr, h: Math.max(0, ph) * dpr };
    if (pw < 10 || ph < 10) return;
    ctx.strokeStyle = c.frame;
    ctx.lineWidth = 1;
    ctx.strokeRect(left + 0.5, top + 0.5, pw - 1, ph - 1);

    const n = this.steps.length;
    const lossRange = range(this.losses.concat(this.valLosses));
    if (!n) return; // the header says "waiting for training…"
    if (!lossRange) {
      ctx.fillStyle = c.dim;
      ctx.textAlign = "center";
      ctx.fillText("no finite loss yet", left + pw / 2, top + ph / 2 - 6);
      return;
    }
    let x0 = this.steps[0];
    let x1 = this.steps[n - 1];
    if (!(x1 > x0)) {
      x0 -= 1;
      x1 += 1;
    }
    const X = (s) => left + (pw * (s - x0)) / (x1 - x0);
    const yOf = (r) => (v) => top + ph * (1 - (v - r[0]) / (r[1] - r[0]));

    // Long runs: at most ~2 drawn points per pixel column (raw loss keeps each bucket's min and max).
    const stride = Math.max(1, Math.ceil(n / Math.max(1, pw * 2)));
    const series = (values, r, color, width, envelope) => {
      const Y = yOf(r);
      ctx.save();
      ctx.beginPath();
      ctx.rect(left, top, pw, ph);
      ctx.clip();
      ctx.strokeStyle = color;
      ctx.fillStyle = color;
      ctx.lineWidth = width;
      ctx.lineJoin = "round";
      ctx.beginPath();
      let open = false;
      let drawn = 0;
      let lone = null;
      for (let i = 0; i < n; i += stride) {
        const end = Math.min(n, i + stride);
        let lo = Infinity;
        let hi = -Infinity;
        let sum = 0;
        let cnt = 0;
        for (let j = i; j < end; j++) {
          const v = values[j];
          if (finite(v)) {
            lo = Math.min(lo, v);
            hi = Math.max(hi, v);
            sum += v;
            cnt += 1;
          }
        }
        if (!cnt) {
          open = false; // a gap (NaN / missing): break the line
          continue;
        }
        const x = X(this.steps[Math.min(end - 1, i + (stride >> 1))]);
        const pts = envelope && hi > lo ? [lo, hi] : [sum / cnt];
        for (const v of pts) {
          const y = Y(v);
          if (open) ctx.lineTo(x, y);
          else ctx.moveTo(x, y);
          open = true;
        }
        drawn += 1;
        lone = [x, Y(pts[0])];
      }
      ctx.stroke();
      if (drawn === 1 && lone) {
        // A single point would be an invisible zero-length line: draw a dot.
        ctx.beginPath();
        ctx.arc(lone[0], lone[1], Math.max(2.5, width + 1), 0, Math.PI * 2);
        ctx.fill();
      }
      ctx.restore();
    };

    const lrRange = range(this.lrs);
    if (lrRange) series(this.lrs, lrRange, c.lr, 1.5, false);
    series(this.losses, lossRange, c.loss, 1, true);
    series(this.smoothed, lossRange, c.smooth, 2, false);
    this.drawValidation(ctx, X, yOf(lossRange), { left, top, pw, ph });

    // Axis labels: loss on the left, lr on the right, steps below.
    ctx.textBaseline = "middle";
    ctx.textAlign = "right";
    ctx.fillStyle = c.loss;
    ctx.fillText(fmtLoss(lossRange[1]), left - 4, top + 5);
    ctx.fillText(fmtLoss(lossRange[0]), left - 4, top + ph - 5);
    if (lrRange) {
      ctx.textAlign = "left";
      ctx.fillStyle = c.lr;
      ctx.fillText(fmtLr(lrRange[1]), left + pw + 4, top + 5);
      ctx.fillText(fmtLr(lrRange[0]), left + pw + 4, top + ph - 5);
      ctx.fillText("lr", left + pw + 4, top + ph / 2);
    }
    ctx.textBaseline = "top";
    ctx.fillStyle = c.dim;
    ctx.textAlign = "left";
    ctx.fillText(`${this.steps[0]}`, left, top + ph + 3);
    ctx.textAlign = "right";
    ctx.fillText(`step ${this.steps[n - 1]}`, left + pw, top + ph + 3);
  }

  // The validation series: a line through the finite validation losses and a dot on each.
  drawValidation(ctx, X, Y, box) {
    const points = [];
    for (let i = 0; i < this.valSteps.length; i++) {
      if (finite(this.valLosses[i])) points.push([X(this.valSteps[i]), Y(this.valLosses[i])]);
    }
    if (!points.length) return;
    ctx.save();
    ctx.beginPath();
    ctx.rect(box.left, box.top, box.pw, box.ph);
    ctx.clip();
    ctx.strokeStyle = this.colors.val;
    ctx.fillStyle = this.colors.val;
    ctx.lineWidth = 2;
    ctx.beginPath();
    points.forEach(([x, y], i) => (i ? ctx.lineTo(x, y) : ctx.moveTo(x, y)));
    ctx.stroke();
    for (const [x, y] of points) {
      ctx.beginPath();
      ctx.arc(x, y, 3, 0, Math.PI * 2);
      ctx.fill();
    }
    ctx.restore();
  }

  destroy() {
    this._observer?.disconnect();
    if (this._frame) globalThis.cancelAnimationFrame?.(this._frame);
  }
}

const charts = new WeakMap(); // node -> LossChart

function addChart(node) {
  if (charts.has(node) || typeof node.addDOMWidget !== "function") return charts.get(node);
  const chart = new LossChart();
  const widget = node.addDOMWidget(WIDGET, "sdxl_lora_loss_chart", chart.element, {
    serialize: false,
    hideInPanel: true,
    getMinHeight: () => CHART_HEIGHT,
    getValue: () => "",
    setValue: () => {},
  });
  widget.serialize = false; // neither in the saved workflow's widgets_values nor in the prompt
  widget.chart = chart;
  charts.set(node, chart);
  const onRemoved = node.onRemoved;
  node.onRemoved = function () {
    chart.destroy();
    charts.delete(node);
    return onRemoved?.apply(this, arguments);
  };
  fitChart(node);
  return chart;
}

// Make room for the chart below the inputs (new nodes, and saved workflows whose node was smaller).
function fitChart(node) {
  const size = node.computeSize?.();
  if (size && node.size) node.setSize?.([Math.max(node.size[0], size[0], 420), Math.max(node.size[1], size[1])]);
}

// The node an execution id names: "7" at the top level, "12:7" inside the subgraph of node 12.
function nodeForExecutionId(id) {
  let graph = app.rootGraph ?? app.graph;
  let node = null;
  const parts = String(id).split(":");
  for (let i = 0; i < parts.length; i++) {
    node = graph?.getNodeById?.(parts[i]) ?? null;
    if (!node) return null;
    graph = node.subgraph;
  }
  return node;
}

function onProgress(event) {
  const detail = event?.detail;
  if (!detail || detail.node === undefined || detail.node === null) return;
  try {
    const node = nodeForExecutionId(detail.node);
    const chart = node && charts.get(node);
    if (chart) {
      chart.push(detail);
      node.setDirtyCanvas?.(true, false);
    }
  } catch (error) {
    console.warn(`[${EXTENSION}] progress event not shown:`, error); // a chart must never break the run's UI
  }
}

// ComfyUI 0.30 serves this folder twice (pyproject [tool.comfy] web and WEB_DIRECTORY give two URLs), so the
// frontend may evaluate this module twice: register once per page.
const LOADED = Symbol.for(EXTENSION);
if (!globalThis[LOADED]) {
  globalThis[LOADED] = true;
  app.registerExtension({
    name: EXTENSION,
    async setup() {
      api.addEventListener(EVENT, onProgress);
    },
    nodeCreated(node) {
      if (node?.comfyClass === NODE_TYPE || node?.constructor?.comfyClass === NODE_TYPE) addChart(node);
    },
    loadedGraphNode(node) {
      if (charts.has(node)) fitChart(node);
    },
  });
}
