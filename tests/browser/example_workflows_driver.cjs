// Loads each committed example workflow into the real ComfyUI frontend (headless Chromium, playwright-core) and
// reports what the frontend made of it, for tests/browser/test_example_workflows_browser.py.
// Usage: node example_workflows_driver.cjs SPEC.json
//
// SPEC: {url, out_dir, playwright_core, chromium, examples: {name: UI workflow}}
// Writes out_dir/report.json: per example the node types the frontend could not resolve, every node's widgets
// (name -> value) after loading, the graph as the frontend serialises it again, and its API prompt
// (graphToPrompt().output, what "Queue" would POST). Exits 0 whenever report.json was written.
"use strict";
const fs = require("fs");
const path = require("path");

const spec = JSON.parse(fs.readFileSync(process.argv[2], "utf8"));
const { chromium } = require(spec.playwright_core);
const report = { stage: "start", console: [], pageerrors: [], examples: {} };

async function pageLoad(args) {
  const [name, workflow] = args;
  const app = window.app;
  const LG = window.LiteGraph;
  await app.loadGraphData(workflow, true, false, name, { skipAssetScans: true, silentAssetErrors: true });
  const graph = app.graph;
  const res = { unresolved: [], widgets: {}, serialized: null, prompt: null };
  for (const node of graph.nodes) {
    if (!LG.registered_node_types[node.type]) res.unresolved.push(node.type);
    res.widgets[String(node.id)] = (node.widgets || []).map((w) => [w.name, w.value === undefined ? null : w.value]);
  }
  res.serialized = JSON.parse(JSON.stringify(graph.serialize()));
  res.prompt = (await app.graphToPrompt()).output;
  return res;
}

async function main() {
  fs.mkdirSync(spec.out_dir, { recursive: true });
  const browser = await chromium.launch({
    executablePath: spec.chromium,
    headless: true,
    args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
      "--disable-sync", "--no-first-run", "--disable-quic", "--disable-dev-shm-usage"],
  });
  try {
    const page = await browser.newPage({ viewport: { width: 1600, height: 1000 } });
    page.on("console", (m) => report.console.push(`[${m.type()}] ${m.text()}`));
    page.on("pageerror", (e) => report.pageerrors.push(String(e?.stack || e)));
    report.stage = "open frontend";
    await page.goto(spec.url, { waitUntil: "load", timeout: 120000 });
    await page.waitForFunction(() => window.app?.graph && window.app?.canvas && window.LiteGraph?.registered_node_types?.SDXLLoraTrain,
      null, { timeout: 120000 });
    for (const [name, workflow] of Object.entries(spec.examples)) {
      report.stage = `load ${name}`;
      report.examples[name] = await page.evaluate(pageLoad, [name, workflow]);
      await page.screenshot({ path: path.join(spec.out_dir, `${name}.png`) });
    }
    report.stage = "done";
  } catch (e) {
    report.error = String(e?.stack || e);
  } finally {
    fs.writeFileSync(path.join(spec.out_dir, "report.json"), JSON.stringify(report, null, 1));
    await browser.close();
  }
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
