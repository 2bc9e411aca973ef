// The x axis spans the chosen range, or less when the device's history is shorter, so a
// device that started reporting a minute ago still gets readable charts.
function chart(key, title, unit, fixedMax, points, t0) {
  const W = 360, H = 150, L = 34, R = 8, T = 8, B = 20;
  const data = points.filter((p) => p[key] !== null && p[key] !== undefined)
                     .map((p) => [p.time, p[key]]);
  const box = el("div", {class: "chart", "data-chart": key});
  const now = data.length ? data[data.length - 1][1] : null;
  box.append(el("h3", {}, title, el("span", {class: "now"}, now === null ? "" : `${fmt(now)} ${unit}`)));
  const root = svg("svg", {viewBox: `0 0 ${W} ${H}`, preserveAspectRatio: "none",
                           role: "img", "aria-label": `${title} over time`});
  box.append(root);
  if (!data.length) {
    root.append(svg("text", {x: W / 2, y: H / 2, "text-anchor": "middle", class: "empty"},
                    "no data for this period"));
    return box;
  }
  const t1 = fleet.now, span = t1 - t0;
  let lo = 0, hi = fixedMax || Math.max(...data.map((d) => d[1]));
  if (key === "temperature") lo = Math.max(0, Math.floor(Math.min(...data.map((d) => d[1])) / 10) * 10);
  if (!fixedMax) hi = hi <= lo ? lo + 1 : lo + (hi - lo) * 1.15;
  const x = (t) => L + (W - L - R) * (t - t0) / span;
  const digits = (hi - lo) / 4 < 0.1 ? 2 : (hi - lo) / 4 < 1 ? 1 : 0;
  const y = (v) => T + (H - T - B) * (1 - (v - lo) / (hi - lo));
  for (let i = 0; i <= 4; i++) {
    const v = lo + (hi - lo) * i / 4;
    root.append(svg("line", {x1: L, x2: W - R, y1: y(v), y2: y(v), class: "grid"}));
    root.append(svg("text", {x: L - 4, y: y(v) + 3, "text-anchor": "end", class: "axis"}, fmt(v, digits)));
  }
  for (let i = 0; i <= 3; i++) {
    const t = t0 + span * i / 3;
    root.append(svg("text", {x: x(t), y: H - 5, "text-anchor": i === 0 ? "start" : i === 3 ? "end" : "middle",
                             class: "axis"}, hhmm(t, span)));
  }
  // A gap longer than five spacings (an outage) breaks the line instead of bridging it.
  const gaps = data.slice(1).map((d, i) => d[0] - data[i][0]).sort((a, b) => a - b);
  const step = gaps.length ? gaps[Math.floor(gaps.length / 2)] : span;
  let d = "", area = "", start = null, prev = null;
  for (const [t, v] of data) {
    const px = x(Math.max(t, t0)).toFixed(1), py = y(Math.min(v, hi)).toFixed(1);
    if (prev === null || t - prev > step * 5 + 1) {
      if (start !== null) area += `L${x(prev).toFixed(1)},${y(lo)}L${start},${y(lo)}Z`;
      d += `M${px},${py}`; area += `M${px},${py}`; start = px;
    } else { d += `L${px},${py}`; area += `L${px},${py}`; }
    prev = t;
  }
  area += `L${x(prev).toFixed(1)},${y(lo)}L${start},${y(lo)}Z`;
  root.append(svg("path", {d: area, class: "area"}), svg("path", {d, class: "line"}));
  if (data.length === 1) root.append(svg("circle", {cx: x(data[0][0]), cy: y(data[0][1]), r: 3, fill: "currentColor", class: "line"}));
  return box;
}
