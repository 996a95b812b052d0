// Looks at the dashboard in the system's headless Chromium the way a person
// would: device rows, charts, and whether each chart was drawn.
//
//   node tests/browser/dashboard.mjs URL SCREENSHOT.png
//
// Each line on stdin is what to wait for, as JSON:
//   {"rows": 3, "charts": 5, "points": [["node-7", "temperature", 4], ...],
//    "stats": {"backlog": "40 of 40"}, "states": {"node-7": "offline"},
//    "top": "node-7", "units": [["node-7", "temperature", "°C"]],
//    "fetch": ["/api/readings?..."]}
// ("top": the first row's device; "units": a chart's unit; "fetch": URLs the
// page itself fetches, their text reported as "fetched").
// When the page shows it (without being reloaded), one JSON report goes to
// stdout and the screenshot is saved. The browser closes at end of input.
import { createInterface } from "node:readline";
import { chromium } from "playwright-core";

const [url, screenshot] = process.argv.slice(2);
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
const seen = {console: [], requests: new Set(), failedRequests: [], loads: 0};
const page = await browser.newPage({viewport: {width: 1280, height: 900}});
page.on("console", (message) => {
  // Warnings are left out: reading the canvases back below causes some.
  if (message.type() === "error") {
    seen.console.push(`${message.type()}: ${message.text()}`);
  }
});
page.on("pageerror", (error) => seen.console.push(`pageerror: ${error.message}`));
page.on("request", (request) => seen.requests.add(new URL(request.url()).origin));
page.on("requestfailed", (request) => seen.failedRequests.push(request.url()));
page.on("load", () => { seen.loads += 1; });

async function look(want) {
  const report = {};
  try {
    await page.waitForFunction((want) => {
      const charts = [...document.querySelectorAll('figure.chart[data-drawn="true"]')];
      const points = (device, field) => Number((charts.find(
        (f) => f.dataset.device === device && f.dataset.field === field) || {dataset: {}}).dataset.points || 0);
      const stat = (name) => (document.querySelector(`#summary dd[data-stat="${name}"]`) || {}).textContent;
      const row = (device) => [...document.querySelectorAll("#devices tbody tr")].find(
        (r) => r.dataset.device === device);
      const first = document.querySelector("#devices tbody tr");
      const unit = (device, field) => (charts.find(
        (f) => f.dataset.device === device && f.dataset.field === field) || {dataset: {}}).dataset.unit;
      return document.querySelectorAll("#devices tbody tr").length >= (want.rows || 0) &&
        Object.entries(want.states || {}).every(([device, state]) =>
          (row(device) || {dataset: {}}).dataset.state === state) &&
        (!want.top || (first && first.dataset.device === want.top)) &&
        (want.units || []).every(([device, field, text]) => unit(device, field) === text) &&
        charts.length >= (want.charts || 0) &&
        (want.points || []).every(([device, field, n]) => points(device, field) >= n) &&
        Object.entries(want.stats || {}).every(([name, text]) => stat(name) === text);
    }, want, {timeout: 20000, polling: 100});
  } catch (error) {
    report.error = String(error);
  }
  report.rows = await page.$$eval("#devices tbody tr", (rows) => rows.map((row) => ({
    device: row.dataset.device,
    state: row.dataset.state,
    className: row.className,
    cells: [...row.cells].map((c) => c.textContent),
  })));
  report.downloads = await page.$$eval("a.csv", (links) => links.map((a) => ({
    device: (a.closest("[data-device]") || {dataset: {}}).dataset.device,
    field: (a.closest("figure") || {dataset: {}}).dataset.field || null,
    href: a.getAttribute("href"),
  })));
  report.fetched = [];
  for (const url of want.fetch || []) {
    report.fetched.push(await page.evaluate(async (url) => (await fetch(url)).text(), url));
  }
  report.charts = await page.$$eval("figure.chart", (figures) => figures.map((figure) => {
    // How many pixels the chart painted on its canvas: drawn, not just placed.
    const canvas = figure.querySelector("canvas");
    let painted = 0;
    if (canvas) {
      const pixels = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
      for (let i = 3; i < pixels.length; i += 4) if (pixels[i] > 0) painted++;
    }
    return {device: figure.dataset.device, field: figure.dataset.field, unit: figure.dataset.unit,
            caption: figure.querySelector("figcaption").textContent,
            points: Number(figure.dataset.points), drawn: figure.dataset.drawn === "true", painted};
  }));
  report.stats = await page.$$eval("#summary dd", (dds) =>
    Object.fromEntries(dds.map((dd) => [dd.dataset.stat, dd.textContent])));
  report.highlighted = await page.$$eval("#summary dd.full, #summary dd.alarm", (dds) => dds.map((dd) => dd.dataset.stat));
  report.notice = await page.$eval("#notice", (n) => (n.hidden ? null : n.textContent));
  report.console = seen.console;
  report.origins = [...seen.requests];
  report.failedRequests = seen.failedRequests;
  report.loads = seen.loads;
  await page.screenshot({path: screenshot, fullPage: true});
  return report;
}

try {
  await page.goto(url, {waitUntil: "load"});
  for await (const line of createInterface({input: process.stdin})) {
    if (line.trim()) process.stdout.write(JSON.stringify(await look(JSON.parse(line))) + "\n");
  }
} finally {
  await browser.close();
}
