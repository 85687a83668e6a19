// The dashboard's only script: draws the curves (uPlot), the lineage graph (dagre layout, SVG) and the
// evaluation plot from the JSON the server rendered into the page. No inline scripts (the CSP forbids them).
(function () {
  "use strict";
  const COLORS = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2"];

  function readJson(id) {
    const el = document.getElementById(id);
    return el ? JSON.parse(el.textContent) : null;
  }

  function drawCurves() {
    const data = readJson("curves-data");
    if (!data) return;
    document.querySelectorAll("figure.chart[data-chart]").forEach(function (fig) {
      const chart = data.charts[Number(fig.dataset.chart)];
      const columns = [data.steps].concat(chart.series.map(function (name) { return data.series[name]; }));
      const points = chart.series.reduce(function (n, name) {
        return n + data.series[name].filter(function (v) { return v !== null; }).length;
      }, 0);
      const width = Math.max(320, fig.clientWidth - 16);
      new uPlot({
        width: width, height: 220,
        scales: { x: { time: false } },
        axes: [{ label: "step" }, { size: 60 }],
        series: [{ label: "step" }].concat(chart.series.map(function (name, i) {
          return { label: name, stroke: COLORS[i % COLORS.length], width: 1.5, spanGaps: false,
                   points: { show: data.steps.length < 60 } };
        })),
      }, columns, fig);
      fig.dataset.points = String(points);  // what the browser test checks: the curve has points
    });
  }

  // What a person recognises a node by: a checkpoint by its run and step, not its whole URI.
  function shortLabel(n) {
    let text = n.label;
    if ((n.type === "checkpoint" || n.type === "model") && text.indexOf("/") >= 0) {
      text = text.replace(/\/+$/, "").split("/").slice(-2).join("/");
    }
    return text.length > 44 ? text.slice(0, 42) + "…" : text;
  }

  function drawGraph() {
    const data = readJson("graph-data");
    const host = document.getElementById("graph");
    if (!data || !host) return;
    const walk = data.walk;
    const nodes = [walk.root].concat(walk.nodes);
    const g = new dagre.graphlib.Graph();
    // top to bottom: where things came from above, what derives from them below (a long chain stays narrow)
    g.setGraph({ rankdir: "TB", nodesep: 24, ranksep: 42, marginx: 16, marginy: 16 });
    g.setDefaultEdgeLabel(function () { return {}; });
    nodes.forEach(function (n) {
      const text = shortLabel(n);
      g.setNode(String(n.id), { width: Math.max(150, 7 * text.length + 24), height: 44, node: n, text: text });
    });
    walk.edges.forEach(function (e) { g.setEdge(String(e.src), String(e.dst), { type: e.type }); });
    dagre.layout(g);
    const NS = "http://www.w3.org/2000/svg";
    const size = g.graph();
    const svg = document.createElementNS(NS, "svg");
    svg.setAttribute("width", size.width);
    svg.setAttribute("height", size.height);
    const marker = document.createElementNS(NS, "defs");
    marker.innerHTML = '<marker id="arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" markerHeight="7" orient="auto">' +
      '<path d="M0,0 L10,5 L0,10 z" fill="#9ca3af"/></marker>';
    svg.appendChild(marker);
    g.edges().forEach(function (ref) {
      const e = g.edge(ref);
      const grp = document.createElementNS(NS, "g");
      grp.setAttribute("class", "edge");
      const path = document.createElementNS(NS, "path");
      path.setAttribute("d", e.points.map(function (p, i) { return (i ? "L" : "M") + p.x + "," + p.y; }).join(" "));
      path.setAttribute("marker-end", "url(#arrow)");
      grp.appendChild(path);
      const mid = e.points[Math.floor(e.points.length / 2)];
      const label = document.createElementNS(NS, "text");
      label.setAttribute("x", mid.x); label.setAttribute("y", mid.y - 4); label.setAttribute("text-anchor", "middle");
      label.textContent = e.type;
      grp.appendChild(label);
      svg.appendChild(grp);
    });
    g.nodes().forEach(function (id) {
      const v = g.node(id);
      const n = v.node;
      const link = document.createElementNS(NS, "a");
      const target = n.type === "run" && n.id === walk.root.id ? "/ui/runs/" + n.id
        : "/ui/nodes/" + n.id + "?direction=" + data.direction + "&depth=" + data.depth;
      link.setAttribute("href", target);
      const grp = document.createElementNS(NS, "g");
      grp.setAttribute("class", "node t-" + n.type + (n.id === walk.root.id ? " root" : ""));
      grp.setAttribute("data-id", n.id);
      grp.setAttribute("data-type", n.type);
      grp.setAttribute("transform", "translate(" + (v.x - v.width / 2) + "," + (v.y - v.height / 2) + ")");
      const rect = document.createElementNS(NS, "rect");
      rect.setAttribute("width", v.width); rect.setAttribute("height", v.height);
      grp.appendChild(rect);
      const kind = document.createElementNS(NS, "text");
      kind.setAttribute("class", "kind"); kind.setAttribute("x", 10); kind.setAttribute("y", 16);
      kind.textContent = n.type + (n.status ? " · " + n.status : "") + (n.step != null ? " · step " + n.step : "");
      const title = document.createElementNS(NS, "text");
      title.setAttribute("x", 10); title.setAttribute("y", 33);
      title.textContent = v.text;
      const tip = document.createElementNS(NS, "title");
      tip.textContent = n.type + " " + n.label + " [lineage:" + n.id + "]";
      grp.appendChild(tip); grp.appendChild(kind); grp.appendChild(title);
      link.appendChild(grp);
      svg.appendChild(link);
    });
    host.appendChild(svg);
    host.dataset.drawn = String(g.nodeCount());
  }

  function drawEfficiency() {
    const points = readJson("eval-data");
    const fig = document.getElementById("efficiency");
    if (!points || !fig || !points.length) return;
    const modes = Array.from(new Set(points.map(function (p) { return p.mode; })));
    const xs = Array.from(new Set(points.map(function (p) { return p.x; }))).sort(function (a, b) { return a - b; });
    const columns = [xs].concat(modes.map(function (m) {
      return xs.map(function (x) {
        const hit = points.find(function (p) { return p.mode === m && p.x === x; });
        return hit ? hit.y : null;
      });
    }));
    new uPlot({
      width: Math.max(320, fig.clientWidth - 16), height: 280,
      scales: { x: { time: false } },
      axes: [{ label: "mean generated tokens" }, { label: "accuracy" }],
      series: [{ label: "tokens" }].concat(modes.map(function (m, i) {
        return { label: m, stroke: COLORS[i % COLORS.length], width: 0, points: { show: true, size: 8 } };
      })),
    }, columns, fig);
    fig.dataset.points = String(points.length);
  }

  document.addEventListener("DOMContentLoaded", function () {
    drawCurves();
    drawGraph();
    drawEfficiency();
  });
})();
