// The built-in dashboard: polls the gateway's read-only JSON API and
// redraws in place, one uPlot chart per device and field. Offline and late
// devices come first; each chart shows its field's unit; every device and
// chart has a CSV download of what it shows.
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
  // offline and late first (silent longest first), then the others
  const STATE_ORDER = {offline: 0, late: 1, new: 2, online: 3};
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

  function showStats(stats, devices) {
    const queue = stats.queue || {};
    const offline = devices.filter((d) => d.state === "offline").length;
    const offlineCell = document.querySelector('[data-stat="offline"]');
    offlineCell.textContent = offline.toLocaleString();
    offlineCell.classList.toggle("alarm", offline > 0);
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
    const cell = document.querySelector('[data-stat="backlog"]');
    if (stats.queue === undefined) {
      // The queue could not be read (its server down, a damaged shard).
      cell.textContent = "–";
      cell.classList.remove("full");
      cell.title = `The queue could not be read: ${(stats.unavailable || {}).queue || ""}`;
      return;
    }
    const waiting = backlog.waiting === undefined
      ? (queue.visible || 0) + (queue.in_flight || 0) : backlog.waiting;
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
      row.dataset.state = d.state;
      row.className = `state-${d.state}`;
      cell(row, d.id, "id");
      const silent = d.state === "offline" || d.state === "late";
      cell(row, silent ? `${d.state}, silent ${ago(d.silent).replace(" ago", "")}` : d.state,
           "state").title = d.interval
        ? `expected every ${d.interval.toPrecision(3)} s (${d.interval_source})`
        : "no interval known yet";
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

  function withUnit(value, unit) {
    const text = value.toLocaleString();
    return unit ? `${text} ${unit}` : text;
  }

  function newChart(figure, field, color, data, unit) {
    const options = {
      width: chartWidth(figure),
      height: 160,
      legend: {show: false},
      scales: {x: {time: true, range: () => [view.from, view.to]}},
      axes: [{}, {
        label: unit || undefined,
        size: 60,
        values: (plot, ticks) => ticks.map((v) => withUnit(v, unit)),
      }],
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
      const download = document.createElement("a");
      download.className = "csv";
      download.textContent = "CSV";
      download.dataset.device = device;
      title.append(download);
      const grid = document.createElement("div");
      grid.className = "grid";
      card.append(title, grid);
      entry = {card, grid, download, charts: new Map()};
      cards.set(device, entry);
    }
    return entry;
  }

  function csvLink(path, params) {
    return `${path}?${new URLSearchParams({...params, since: $("range").value, format: "csv"})}`;
  }

  function showSeries(entry, series) {
    const fields = Object.keys(series.fields);
    const symbols = series.symbols || {};
    entry.download.href = csvLink("/api/series", {device: series.device});
    entry.download.download = `${series.device}.csv`;
    fields.forEach((field, index) => {
      const points = series.fields[field];
      const data = [points.map((p) => p[0] / 1000), points.map((p) => p[1])];
      const unit = symbols[field] || "";
      let chart = entry.charts.get(field);
      if (chart && chart.unit !== unit) {
        // A new unit: the axis is drawn anew.
        chart.plot.destroy();
        chart.figure.remove();
        entry.charts.delete(field);
        chart = undefined;
      }
      if (!chart) {
        const figure = document.createElement("figure");
        figure.className = "chart";
        figure.dataset.device = series.device;
        figure.dataset.field = field;
        const caption = document.createElement("figcaption");
        const name = document.createElement("span");
        name.className = "name";
        name.textContent = unit ? `${field} (${unit})` : field;
        const download = document.createElement("a");
        download.className = "csv";
        download.textContent = "CSV";
        download.href = csvLink("/api/readings", {device: series.device, field: field.split("{")[0]});
        download.download = `${series.device}-${field.split("{")[0]}.csv`;
        name.append(download);
        const latest = document.createElement("span");
        latest.className = "latest";
        caption.append(name, latest);
        const plot = document.createElement("div");
        plot.className = "plot";
        figure.append(caption, plot);
        entry.grid.append(figure);
        figure.dataset.unit = unit;
        chart = {figure, unit, download,
                 plot: newChart(figure, field, COLORS[index % COLORS.length], data, unit)};
        entry.charts.set(field, chart);
      } else {
        chart.plot.setData(data);
        chart.download.href = csvLink("/api/readings",
                                      {device: series.device, field: field.split("{")[0]});
      }
      chart.figure.dataset.points = String(points.length);
      chart.figure.querySelector(".latest").textContent =
        points.length ? `${withUnit(points[points.length - 1][1], unit)} latest` : "";
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
        .sort((a, b) => (STATE_ORDER[a.state] ?? 9) - (STATE_ORDER[b.state] ?? 9) ||
          (STATE_ORDER[a.state] < 2 ? b.silent - a.silent : b.last_seen - a.last_seen) ||
          a.id.localeCompare(b.id));
      setView();
      showStats(stats, devices);
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
