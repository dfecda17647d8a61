// Drives the real ComfyUI frontend in headless Chromium (playwright-core, system Chromium) for
// tests/browser/test_loss_chart_browser.py. Usage: node loss_chart_driver.cjs SPEC.json
//
// SPEC: {url, out_dir, playwright_core, chromium, prompt (API format), example (UI workflow or null),
//        overrides {class_type: {widget: value}}, train_class, steps, timeout_ms}
// Writes out_dir/report.json (everything the test asserts on) and PNGs: node.png (the train node),
// chart.png (its chart canvas), chart_reset.png / chart_degenerate.png (after synthetic events), and
// page.png (the whole page, also on failure). Exits 0 whenever report.json was written.
"use strict";
const fs = require("fs");
const path = require("path");

const spec = JSON.parse(fs.readFileSync(process.argv[2], "utf8"));
const { chromium } = require(spec.playwright_core);
const out = (name) => path.join(spec.out_dir, name);
const report = { stage: "start", console: [], pageerrors: [], requests_failed: [] };
const stage = (s) => {
  report.stage = s;
  console.log(`[driver] ${s}`);
};

// ---- in-page helpers (serialised into the page with page.evaluate) ------------------------------

// Build the UI graph from an API prompt with the frontend's own createNode/connect (so the frontend
// decides which links are valid), or load a saved UI workflow; then swap CheckpointLoaderSimple for the
// tiny test loader and apply widget overrides.
async function pageBuild(spec) {
  const app = window.app;
  const LG = window.LiteGraph;
  const res = { created: [], missing_create: [], widget_unset: [], connects: [], swapped: [], applied: [] };
  const linkList = (g) => (g.links instanceof Map ? [...g.links.values()] : Object.values(g.links || {})).filter(Boolean);
  if (spec.example) {
    await app.loadGraphData(spec.example, true, false, null, { skipAssetScans: true, silentAssetErrors: true });
    res.source = "example";
  } else {
    await app.loadGraphData({ last_node_id: 0, last_link_id: 0, nodes: [], links: [], groups: [], version: 0.4 }, true, false);
    res.source = "prompt";
    const graph = app.graph;
    const byId = {};
    // Columns by depth so nothing overlaps (DOM widgets of overlapping nodes would cover the chart).
    const depth = {};
    const depthOf = (id) => {
      if (depth[id] !== undefined) return depth[id];
      depth[id] = 0;
      let d = 0;
      for (const v of Object.values(spec.prompt[id].inputs)) if (Array.isArray(v) && spec.prompt[v[0]]) d = Math.max(d, depthOf(v[0]) + 1);
      return (depth[id] = d);
    };
    const colY = {};
    for (const [id, n] of Object.entries(spec.prompt)) {
      const node = LG.createNode(n.class_type);
      if (!node) {
        res.missing_create.push(n.class_type);
        continue;
      }
      graph.add(node);
      const col = depthOf(id);
      node.pos = [40 + col * 520, colY[col] ?? 40];
      byId[id] = node;
      res.created.push([id, n.class_type, node.id]);
      for (const [name, v] of Object.entries(n.inputs)) {
        if (Array.isArray(v)) continue;
        const w = node.widgets?.find((w) => w.name === name);
        if (w) w.value = v;
        else res.widget_unset.push(`${n.class_type}.${name}`);
      }
      colY[col] = node.pos[1] + node.size[1] + 160;
    }
    for (const [id, n] of Object.entries(spec.prompt)) {
      for (const [name, v] of Object.entries(n.inputs)) {
        if (!Array.isArray(v) || !byId[id] || !byId[v[0]]) continue;
        const link = byId[v[0]].connect(v[1], byId[id], name);
        res.connects.push({ from: v[0], slot: v[1], to: id, input: name, ok: !!link });
      }
    }
  }
  const graph = app.graph;
  // Swap the real checkpoint loader for the tiny test one, output by output type, through the frontend.
  for (const old of graph.nodes.filter((n) => n.type === "CheckpointLoaderSimple")) {
    const tiny = LG.createNode("TinySDXLCheckpointLoader");
    if (!tiny) {
      res.missing_create.push("TinySDXLCheckpointLoader");
      break;
    }
    graph.add(tiny);
    tiny.pos = [old.pos[0], old.pos[1]];
    const links = linkList(graph).filter((l) => l.origin_id === old.id);
    for (const l of links) {
      const type = old.outputs[l.origin_slot]?.type;
      const slot = tiny.outputs.findIndex((o) => o.type === type);
      const target = graph.getNodeById(l.target_id);
      const ok = slot >= 0 && target ? !!tiny.connect(slot, target, l.target_slot) : false;
      res.swapped.push({ type, target: target?.type, ok });
    }
    graph.remove(old);
  }
  for (const node of graph.nodes) {
    const values = spec.overrides[node.type];
    if (!values) continue;
    for (const [name, v] of Object.entries(values)) {
      const w = node.widgets?.find((w) => w.name === name);
      if (w) {
        w.value = v;
        res.applied.push(`${node.type}.${name}`);
      }
    }
  }
  app.canvas.setDirty(true, true);
  return res;
}

// Every node type resolves and every link is consistent and type-valid in the frontend's own terms.
function pageValidate(spec) {
  const app = window.app;
  const LG = window.LiteGraph;
  const graph = app.graph;
  const links = (graph.links instanceof Map ? [...graph.links.values()] : Object.values(graph.links || {})).filter(Boolean);
  const res = { nodes: [], unknown_types: [], bad_links: [], link_count: links.length };
  for (const n of graph.nodes) {
    res.nodes.push(n.type);
    if (!LG.registered_node_types[n.type] || n.has_errors) res.unknown_types.push(n.type);
  }
  for (const l of links) {
    const o = graph.getNodeById(l.origin_id);
    const t = graph.getNodeById(l.target_id);
    const out = o?.outputs?.[l.origin_slot];
    const inp = t?.inputs?.[l.target_slot];
    const problems = [];
    if (!o || !t) problems.push("missing node");
    if (!out) problems.push("missing output slot");
    if (!inp) problems.push("missing input slot");
    if (inp && inp.link !== l.id) problems.push("input does not point back");
    if (out && !(out.links || []).includes(l.id)) problems.push("output does not list it");
    if (out && inp && !LG.isValidConnection(out.type, inp.type)) problems.push(`type ${out.type} -> ${inp.type}`);
    if (problems.length) res.bad_links.push({ id: l.id, from: o?.type, out: out?.name, to: t?.type, in: inp?.name, problems });
  }
  // The trained file name into LoraLoader: a "*" output into a COMBO input, linked and re-linkable.
  const train = graph.nodes.filter((n) => n.type === spec.train_class);
  res.train_nodes = train.map((n) => n.id);
  const loader = graph.nodes.find((n) => n.type === "LoraLoader");
  const inp = loader?.inputs?.find((i) => i.name === "lora_name");
  res.lora_input = inp ? { type: inp.type, widget: !!inp.widget, linked: inp.link != null } : null;
  const link = inp?.link != null ? links.find((l) => l.id === inp.link) : null;
  const src = link ? graph.getNodeById(link.origin_id) : null;
  res.lora_link = link ? { from: src?.type, output: src?.outputs?.[link.origin_slot]?.name, out_type: src?.outputs?.[link.origin_slot]?.type } : null;
  if (src && loader) {
    const slot = link.origin_slot;
    loader.disconnectInput(loader.inputs.indexOf(inp));
    res.lora_relink_ok = !!src.connect(slot, loader, "lora_name");
  }
  const charts = train.map((n) => n.widgets?.find((w) => w.name === "loss_chart"));
  res.chart_widgets = charts.map((w) => (w ? { type: w.type, has_chart: !!w.chart, serialize: w.serialize } : null));
  res.extension_registrations = (app.extensions || []).filter((e) => e.name === "sdxl_lora_trainer.loss_chart").length;
  return res;
}

function pageListen() {
  const api = window.comfyAPI.api.api;
  window.__t = { progress: [], status: [] };
  api.addEventListener("sdxl_lora_trainer.progress", (e) => window.__t.progress.push(e.detail));
  for (const type of ["execution_start", "execution_success", "execution_error", "execution_interrupted"]) {
    api.addEventListener(type, (e) => window.__t.status.push({ type, detail: e.detail }));
  }
  return api.clientId;
}

async function pageSerialize() {
  const p = await window.app.graphToPrompt();
  return p.output;
}

// Pixel statistics of the chart canvas' plot area, read back from the canvas itself.
async function pageChartStats(nodeId) {
  const app = window.app;
  const node = app.graph.getNodeById(nodeId);
  const w = node?.widgets?.find((w) => w.name === "loss_chart");
  const chart = w?.chart;
  if (!chart) return { error: "no chart widget" };
  await new Promise((r) => requestAnimationFrame(() => requestAnimationFrame(r)));
  chart.draw();
  const hex = (h) => [1, 3, 5].map((i) => parseInt(h.slice(i, i + 2), 16));
  const cols = Object.fromEntries(Object.entries(chart.colors).map(([k, v]) => [k, hex(v)]));
  const { x, y, w: pw, h: ph } = chart.plot;
  // Inset past the frame line, so only what is drawn inside the plot counts.
  const ix = Math.ceil(x) + 2, iy = Math.ceil(y) + 2, iw = Math.floor(pw) - 4, ih = Math.floor(ph) - 4;
  const data = chart.canvas.getContext("2d").getImageData(ix, iy, iw, ih).data;
  // A pixel "is" a series colour when it lies on the line from the background to that colour (anti-aliased
  // edges included) at >= 35% coverage; the background is within 6 of bg on every channel.
  const on = (i, c) => {
    const b = cols.bg;
    const d = [c[0] - b[0], c[1] - b[1], c[2] - b[2]];
    const p = [data[i] - b[0], data[i + 1] - b[1], data[i + 2] - b[2]];
    const a = (p[0] * d[0] + p[1] * d[1] + p[2] * d[2]) / (d[0] * d[0] + d[1] * d[1] + d[2] * d[2]);
    const res = Math.hypot(p[0] - a * d[0], p[1] - a * d[1], p[2] - a * d[2]);
    return a >= 0.35 && a <= 1.15 && res <= 40;
  };
  const counts = { total: iw * ih, non_bg: 0, loss: 0, smooth: 0, lr: 0, val: 0 };
  for (let i = 0; i < data.length; i += 4) {
    if (Math.max(Math.abs(data[i] - cols.bg[0]), Math.abs(data[i + 1] - cols.bg[1]), Math.abs(data[i + 2] - cols.bg[2])) > 6) counts.non_bg++;
    if (on(i, cols.loss)) counts.loss++;
    if (on(i, cols.smooth)) counts.smooth++;
    if (on(i, cols.lr)) counts.lr++;
    if (on(i, cols.val)) counts.val++;
  }
  return {
    counts, points: chart.steps.length, steps: [...chart.steps], losses: [...chart.losses], status: chart.status(),
    val_steps: [...chart.valSteps], val_losses: [...chart.valLosses],
    plot: chart.plot, canvas: [chart.canvas.width, chart.canvas.height], colors: chart.colors,
    css: [chart.element.clientWidth, chart.element.clientHeight], dpr: window.devicePixelRatio,
  };
}

// Show the node at 100% near the top-left of the canvas; returns its box in page pixels.
async function pageFocus(nodeId) {
  const app = window.app;
  const LG = window.LiteGraph;
  const node = app.graph.getNodeById(nodeId);
  app.graph.bringToFront?.(node);
  const ds = app.canvas.ds;
  ds.scale = 1;
  ds.offset[0] = -node.pos[0] + 140;
  ds.offset[1] = -node.pos[1] + 160;
  app.canvas.setDirty(true, true);
  app.canvas.draw(true, true);
  await new Promise((r) => requestAnimationFrame(() => requestAnimationFrame(() => setTimeout(r, 300))));
  const title = LG.NODE_TITLE_HEIGHT || 30;
  const a = app.canvasPosToClientPos([node.pos[0], node.pos[1] - title]);
  const b = app.canvasPosToClientPos([node.pos[0] + node.size[0], node.pos[1] + node.size[1]]);
  const el = node.widgets.find((w) => w.name === "loss_chart")?.element;
  const r = el?.getBoundingClientRect();
  const style = el ? getComputedStyle(el.parentElement ?? el) : null;
  // Other nodes whose box intersects the train node's (they would be hidden under it, or cover the chart).
  const box = (n) => [n.pos[0], n.pos[1] - title, n.pos[0] + n.size[0], n.pos[1] + n.size[1]];
  const [x0, y0, x1, y1] = box(node);
  const overlapping = app.graph.nodes.filter((o) => o !== node).filter((o) => {
    const [p0, q0, p1, q1] = box(o);
    return p0 < x1 && x0 < p1 && q0 < y1 && y0 < q1;
  }).map((o) => ({ id: o.id, type: o.type, pos: [...o.pos], size: [...o.size] }));
  return {
    overlapping,
    size: [node.size[0], node.size[1]],
    node: { x: a[0], y: a[1], width: b[0] - a[0], height: b[1] - a[1] },
    chart: r ? { x: r.x, y: r.y, width: r.width, height: r.height } : null,
    chart_visible: !!el && el.isConnected && r.width > 0 && r.height > 0 && style.display !== "none" && style.visibility !== "hidden",
  };
}

function pageDispatch(events) {
  const api = window.comfyAPI.api.api;
  for (const d of events) api.dispatchCustomEvent("sdxl_lora_trainer.progress", d);
}

// ---- the scenario ---------------------------------------------------------------------------------

async function main() {
  fs.mkdirSync(spec.out_dir, { recursive: true });
  stage("launch");
  const browser = await chromium.launch({
    executablePath: spec.chromium,
    headless: true,
    args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
      "--disable-sync", "--no-first-run", "--disable-quic", "--disable-dev-shm-usage"],
  });
  let page;
  try {
    page = await browser.newPage({ viewport: { width: 1700, height: 1500 }, deviceScaleFactor: 1 });
    page.on("console", (m) => report.console.push(`[${m.type()}] ${m.text()}`));
    page.on("pageerror", (e) => report.pageerrors.push(String(e?.stack || e)));
    page.on("requestfailed", (r) => {
      if (r.url().startsWith(spec.url)) report.requests_failed.push(`${r.url()} ${r.failure()?.errorText}`);
    });
    const extResponses = [];
    page.on("response", (r) => {
      if (r.url().includes("loss_chart.js")) extResponses.push([r.url().slice(spec.url.length), r.status()]);
    });

    stage("open frontend");
    await page.goto(spec.url, { waitUntil: "load", timeout: 120000 });
    await page.waitForFunction(() => window.app?.graph && window.app?.canvas && window.comfyAPI?.api?.api && window.LiteGraph?.registered_node_types?.SDXLLoraTrain,
      null, { timeout: 120000 });
    await page.waitForFunction(() => (window.app.extensions || []).some((e) => e.name === "sdxl_lora_trainer.loss_chart"), null, { timeout: 60000 });
    report.extension_responses = extResponses;

    stage("build workflow");
    report.build = await page.evaluate(pageBuild, spec);
    stage("validate workflow");
    report.validate = await page.evaluate(pageValidate, spec);
    report.prompt = await page.evaluate(pageSerialize);
    report.client_id = await page.evaluate(pageListen);
    const trainId = report.validate.train_nodes[0];
    if (trainId === undefined) throw new Error("no train node in the graph");
    report.train_node_id = String(trainId);
    report.chart_before = await page.evaluate(pageChartStats, trainId);

    stage("queue");
    const posted = page.waitForResponse((r) => ["/prompt", "/api/prompt"].includes(new URL(r.url()).pathname) && r.request().method() === "POST", { timeout: 60000 });
    await page.evaluate(() => window.app.queuePrompt(0, 1));
    const resp = await posted;
    report.queue = { status: resp.status(), body: await resp.json().catch(async () => resp.text()) };
    const promptId = report.queue.body?.prompt_id;
    if (resp.status() !== 200 || !promptId) throw new Error(`POST /prompt failed: ${JSON.stringify(report.queue)}`);

    stage("wait for the run");
    await page.waitForFunction((pid) => window.__t.status.some((s) => s.detail?.prompt_id === pid &&
      ["execution_success", "execution_error", "execution_interrupted"].includes(s.type)), promptId,
      { timeout: spec.timeout_ms, polling: 250 });
    report.events = await page.evaluate(() => window.__t);

    report.workflow_after = await page.evaluate((t) => {
      const n = window.app.graph.nodes.find((n) => n.type === t);
      return { widgets_values: n.serialize().widgets_values, widget_names: n.widgets.map((w) => w.name) };
    }, spec.train_class);

    // The chart part has its own error slot, so a chart failure does not hide the workflow/run results.
    try {
      stage("chart after the run");
      report.focus = await page.evaluate(pageFocus, trainId);
      report.chart = await page.evaluate(pageChartStats, trainId);
      await page.screenshot({ path: out("node.png"), clip: report.focus.node });
      const chartCanvas = await page.evaluateHandle((id) => window.app.graph.getNodeById(id).widgets.find((w) => w.name === "loss_chart").chart.canvas, trainId);
      await chartCanvas.asElement().screenshot({ path: out("chart.png") });

      stage("synthetic events");
      const ev = (step, loss, extra = {}) => ({ node: report.train_node_id, step, total: 4, loss, lr: 1e-4, it_s: 2, eta_s: 4 - step, epoch: 1, ...extra });
      // Another node's id: ignored.
      await page.evaluate(pageDispatch, [ev(9, 0.5, { node: "99999" })]);
      report.after_other_node = await page.evaluate(pageChartStats, trainId);
      // A new run: step 1 clears the chart; one point is still drawn.
      await page.evaluate(pageDispatch, [ev(1, 0.25)]);
      report.after_reset = await page.evaluate(pageChartStats, trainId);
      await chartCanvas.asElement().screenshot({ path: out("chart_reset.png") });
      // Constant loss, constant lr, then a null (NaN on the wire) loss and a missing lr: no error, still drawn.
      await page.evaluate(pageDispatch, [ev(2, 0.25), ev(3, 0.25), ev(4, null, { lr: null, it_s: 0, eta_s: null })]);
      report.after_degenerate = await page.evaluate(pageChartStats, trainId);
      await chartCanvas.asElement().screenshot({ path: out("chart_degenerate.png") });
      // Validation losses of steps already drawn: a second series, on the loss axis, without a reset.
      const val = (step, val_loss) => ({ node: report.train_node_id, validation: true, step, epoch: 1, val_loss, kind: "step" });
      await page.evaluate(pageDispatch, [val(2, 0.4), val(4, 0.1)]);
      report.after_validation = await page.evaluate(pageChartStats, trainId);
      await chartCanvas.asElement().screenshot({ path: out("chart_validation.png") });
      // The train node's cancel notice: the curve stays, the header says so.
      await page.evaluate(pageDispatch, [{ node: report.train_node_id, cancelled: true, step: 4, message: "LoRA saved as x" }]);
      report.after_cancel = await page.evaluate(pageChartStats, trainId);
    } catch (e) {
      report.chart_error = String(e?.stack || e);
    }
    stage("done");
  } catch (e) {
    report.error = String(e?.stack || e);
    if (page) report.events = report.events ?? (await page.evaluate(() => window.__t).catch(() => null));
  } finally {
    if (page) await page.screenshot({ path: out("page.png") }).catch(() => {});
    await browser.close().catch(() => {});
    fs.writeFileSync(out("report.json"), JSON.stringify(report, null, 1));
  }
}

main().catch((e) => {
  report.error = String(e?.stack || e);
  fs.writeFileSync(out("report.json"), JSON.stringify(report, null, 1));
  process.exit(0);
});
