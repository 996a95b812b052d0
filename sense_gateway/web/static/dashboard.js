// The built-in dashboard: polls the gateway's read-only JSON API and
// redraws in place, one uPlot chart per device and field.
"use strict";

(() => {
  const params = new URLSearchParams(location.search);
  const REFRESH_MS = Math.max(0.5, Number(params.get("refresh")) || 5) * 1000;
  // More charts than this make the page slow to draw and useless to read:
  // the filter narrows the list instead.
  const MAX_CHART_DEVICES = 24;
  const MAX_ROWS = 500;
  const COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"];

  const $ = (id) => document.getElementById(id);
  const UNITS = {s: 1, m: 60, h: 3600, d: 86400};
  const cards = new Map(); // device id -> {card, charts: Map(field -> {figure, plot})}
  // Every chart shows the same window, the chosen range up to now.
  const view = {from: 0, to: 0};
  let timer = null;

  function setView() {
    const [, n, unit] = /^-(\d+)([smhd])$/.exec($("range").value);
    view.to = Date.now() / 1000;
    view.from = view.to - Number(n) * UNITS[unit];
  }

  async function getJSON(path) {
    const response = await fetch(path, {cache: "no-store"});
    if (!response.ok) {
      throw new Error(`${path}: HTTP ${response.status}`);
    }
    return response.json();
  }

  function ago(seconds) {
    if (seconds < 1) return "just now";
    if (seconds < 90) return `${Math.round(seconds)} s ago`;
    if (seconds < 5400) return `${Math.round(seconds / 60)} min ago`;
    if (seconds < 129600) return `${Math.round(seconds / 3600)} h ago`;
    return `${Math.round(seconds / 86400)} days ago`;
  }

  // Device ids and field names come from the devices themselves: they are
  // only ever set as text, never parsed as markup.
  function cell(row, text, className) {
    const td = row.insertCell();
    td.textContent = String(text);
    if (className) td.className = className;
    return td;
  }

  function showStats(stats) {
    const queue = stats.queue || {};
    const values = {
      devices: stats.devices,
      acknowledged: ((stats.coap || {}).responses || {})["2.04"],
      written: (stats.processor || {}).written,
      dead: queue.dead,
    };
    for (const [name, value] of Object.entries(values)) {
      document.querySelector(`[data-stat="${name}"]`).textContent =
        value === undefined ? "–" : value.toLocaleString();
    }
    // The backlog against its bound (queue.max_depth): at the bound, new
    // readings are refused with 5.03 until the processor catches up.
    const backlog = stats.backlog || {};
    const waiting = backlog.waiting === undefined
      ? (queue.visible || 0) + (queue.in_flight || 0) : backlog.waiting;
    const cell = document.querySelector('[data-stat="backlog"]');
    const bound = backlog.max_depth;
    cell.textContent = bound ? `${waiting.toLocaleString()} of ${bound.toLocaleString()}`
      : waiting.toLocaleString();
    cell.classList.toggle("full", Boolean(bound) && waiting >= bound);
    cell.title = bound && waiting >= bound
      ? "The queue is full: new readings are refused until the processor catches up" : "";
  }

  function showDevices(devices) {
    const now = Date.now() / 1000;
    const body = $("devices").tBodies[0];
    body.replaceChildren();
    const rows = $("rows");
    rows.hidden = devices.length <= MAX_ROWS;
    rows.textContent = `The ${MAX_ROWS} devices seen last of ${devices.length.toLocaleString()}; ` +
      "the device filter finds the others.";
    for (const d of devices.slice(0, MAX_ROWS)) {
      const row = body.insertRow();
      row.dataset.device = d.id;
      cell(row, d.id, "id");
      cell(row, ago(now - d.last_seen)).title = new Date(d.last_seen * 1000).toISOString();
      cell(row, d.received.toLocaleString(), "num");
      cell(row, d.lost.toLocaleString(), "num");
      const expected = d.received + d.lost;
      cell(row, expected ? `${(100 * d.lost / expected).toFixed(1)} %` : "–", "num");
      cell(row, d.duplicates.toLocaleString(), "num");
      cell(row, d.resets.toLocaleString(), "num");
    }
    $("empty").hidden = devices.length > 0;
  }

  function chartWidth(figure) {
    return Math.max(240, figure.clientWidth || 320);
  }

  function newChart(figure, field, color, data) {
    const options = {
      width: chartWidth(figure),
      height: 160,
      legend: {show: false},
      scales: {x: {time: true, range: () => [view.from, view.to]}},
      series: [
        {},
        {label: field, stroke: color, width: 1.5, fill: color + "1a", points: {size: 4}},
      ],
      hooks: {
        // The browser test waits for this: the chart has been drawn with data.
        draw: [(plot) => { figure.dataset.drawn = String(plot.data[0].length > 0); }],
      },
    };
    return new uPlot(options, data, figure.querySelector(".plot"));
  }

  function deviceCard(device) {
    let entry = cards.get(device);
    if (!entry) {
      const card = document.createElement("article");
      card.className = "device";
      card.dataset.device = device;
      const title = document.createElement("h3");
      title.textContent = device;
      const grid = document.createElement("div");
      grid.className = "grid";
      card.append(title, grid);
      entry = {card, grid, charts: new Map()};
      cards.set(device, entry);
    }
    return entry;
  }

  function showSeries(entry, series) {
    const fields = Object.keys(series.fields);
    fields.forEach((field, index) => {
      const points = series.fields[field];
      const data = [points.map((p) => p[0] / 1000), points.map((p) => p[1])];
      let chart = entry.charts.get(field);
      if (!chart) {
        const figure = document.createElement("figure");
        figure.className = "chart";
        figure.dataset.device = series.device;
        figure.dataset.field = field;
        const caption = document.createElement("figcaption");
        const name = document.createElement("span");
        name.textContent = field;
        const latest = document.createElement("span");
        latest.className = "latest";
        caption.append(name, latest);
        const plot = document.createElement("div");
        plot.className = "plot";
        figure.append(caption, plot);
        entry.grid.append(figure);
        chart = {figure, plot: newChart(figure, field, COLORS[index % COLORS.length], data)};
        entry.charts.set(field, chart);
      } else {
        chart.plot.setData(data);
      }
      chart.figure.dataset.points = String(points.length);
      chart.figure.querySelector(".latest").textContent =
        points.length ? `${points[points.length - 1][1].toLocaleString()} latest` : "";
    });
    for (const [field, chart] of entry.charts) {
      if (!fields.includes(field)) {
        chart.plot.destroy();
        chart.figure.remove();
        entry.charts.delete(field);
      }
    }
    entry.card.classList.toggle("quiet", fields.length === 0);
  }

  async function showCharts(devices) {
    const container = $("charts");
    const wanted = devices.slice(0, MAX_CHART_DEVICES).map((d) => d.id);
    const more = $("more");
    more.hidden = devices.length <= MAX_CHART_DEVICES;
    more.textContent = `Charts for the ${MAX_CHART_DEVICES} devices seen last of ` +
      `${devices.length.toLocaleString()}; ` +
      "the device filter picks others.";
    if (typeof uPlot === "undefined") {
      throw new Error("the chart library (npm package uplot) is not installed: run `make run` in the checkout");
    }
    const since = encodeURIComponent($("range").value);
    const all = await Promise.all(wanted.map(
      (id) => getJSON(`/api/series?device=${encodeURIComponent(id)}&since=${since}`)));
    for (const [device, entry] of cards) {
      if (!wanted.includes(device)) {
        entry.charts.forEach((chart) => chart.plot.destroy());
        entry.card.remove();
        cards.delete(device);
      }
    }
    all.forEach((series) => {
      const entry = deviceCard(series.device);
      container.append(entry.card); // keeps the cards in last-seen order
      showSeries(entry, series);
    });
  }

  async function refresh() {
    clearTimeout(timer);
    const notice = $("notice");
    try {
      const [devices, stats] = await Promise.all([getJSON("/api/devices"), getJSON("/api/stats")]);
      const filter = $("filter").value.trim().toLowerCase();
      const shown = devices
        .filter((d) => !filter || d.id.toLowerCase().includes(filter))
        .sort((a, b) => b.last_seen - a.last_seen || a.id.localeCompare(b.id));
      setView();
      showStats(stats);
      showDevices(shown);
      notice.hidden = true;
      await showCharts(shown);
      $("updated").textContent = `updated ${new Date().toLocaleTimeString()}`;
    } catch (error) {
      notice.textContent = error.message;
      notice.hidden = false;
    } finally {
      timer = setTimeout(refresh, REFRESH_MS);
    }
  }

  $("range").addEventListener("change", refresh);
  $("filter").addEventListener("input", refresh);
  $("controls").addEventListener("submit", (event) => event.preventDefault());
  window.addEventListener("resize", () => {
    for (const entry of cards.values()) {
      for (const chart of entry.charts.values()) {
        chart.plot.setSize({width: chartWidth(chart.figure), height: 160});
      }
    }
  });
  refresh();
})();
