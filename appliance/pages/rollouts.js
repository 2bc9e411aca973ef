// The hub dashboard's rollouts: each rollout's state, waves and devices (with the reason a
// device failed or was cancelled), and buttons that call the REST API. Halt, resume and
// roll back need an admin key; with a read key the hub's refusal is shown beside them.
const ACTIONS = {
  halt: (r) => r.state === "running",
  resume: (r) => r.state === "halted" && !r.devices.some((d) => d.state === "rolling_back"),
  rollback: (r) => r.state !== "rolled_back" && !r.devices.some((d) => d.state === "rolling_back"),
};
const ACTION_LABELS = {halt: "Halt", resume: "Resume", rollback: "Roll back"};
const rolloutErrors = {};  // rollout id -> the last refusal, shown until the next action

async function postJSON(url) {
  const key = sessionStorage.getItem(KEY);
  const headers = key ? {"Authorization": `Bearer ${key}`} : {};
  const resp = await fetch(url, {method: "POST", cache: "no-store", headers});
  let body = {};
  try { body = await resp.json(); } catch (err) { body = {}; }
  if (!resp.ok) throw new Error(body.error || `${resp.status} ${resp.statusText}`);
  return body;
}

async function rolloutAction(id, action) {
  delete rolloutErrors[id];
  try {
    await postJSON(`/api/v1/rollouts/${encodeURIComponent(id)}/${action}`);
  } catch (err) {
    rolloutErrors[id] = `${ACTION_LABELS[action]}: ${err.message}`;
  }
  await refresh();
}

function renderRollout(r) {
  const art = r.artifact || {};
  const buttons = Object.keys(ACTIONS).filter((a) => ACTIONS[a](r)).map((a) =>
    el("button", {type: "button", "data-action": a, onclick: () => rolloutAction(r.id, a)},
       ACTION_LABELS[a]));
  const counts = Object.entries(r.counts || {}).filter(([, n]) => n)
    .map(([s, n]) => `${n} ${s.replace("_", " ")}`).join(", ");
  const waves = el("ol", {class: "waves"}, r.waves.map((w) =>
    el("li", {"data-wave": w.index, "data-state": w.state},
       el("b", {}, `wave ${w.index + 1}`), ` (${w.wave}) ${w.state}, ${w.healthy}/${w.devices.length} healthy`)));
  const devices = el("table", {class: "rollout-devices"},
    el("thead", {}, el("tr", {}, ["Wave", "Device", "State", "Before", "Reason", "Updated"]
      .map((h) => el("th", {}, h)))),
    el("tbody", {}, r.devices.map((d) => el("tr", {"data-device": d.device_id, "data-state": d.state},
      el("td", {class: "num"}, d.wave + 1),
      el("td", {}, el("a", {href: `#/devices/${encodeURIComponent(d.device_id)}`}, d.device_id)),
      el("td", {}, el("span", {class: `badge rollout-${d.state}`}, d.state.replace("_", " "))),
      el("td", {class: "sub"}, d.previous || "–"),
      el("td", {class: "reason"}, d.reason || ""),
      el("td", {title: clock(d.updated)}, ago(d.updated))))));
  return el("div", {class: "rollout", "data-rollout": r.id, "data-state": r.state},
    el("div", {class: "rollout-head"},
      el("span", {class: `badge rollout-${r.state}`}, r.state.replace("_", " ")), " ",
      el("b", {}, `${art.name || "?"} ${art.version || ""}`),
      el("span", {class: "sub"}, ` ${r.id} · wave ${Math.min(r.wave + 1, r.wave_count)} of ${r.wave_count}` +
         ` · soak ${r.soak} s · started ${ago(r.created)}${counts ? " · " + counts : ""}`),
      el("span", {class: "actions"}, buttons)),
    r.reason ? el("div", {class: "rollout-reason"}, r.reason) : null,
    rolloutErrors[r.id] ? el("div", {class: "error rollout-error"}, rolloutErrors[r.id]) : null,
    waves, devices);
}

async function renderRollouts() {
  const box = document.getElementById("rollouts"), body = document.getElementById("rollouts-body");
  let found;
  try { found = await getJSON("/api/v1/rollouts"); } catch (err) {
    if (err instanceof SignInNeeded) throw err;
    box.hidden = String(err.message).endsWith(": 404");  // a hub without rollouts
    body.replaceChildren(el("div", {class: "error"}, String(err.message)));
    return;
  }
  box.hidden = false;
  const id = selected();
  // On a device's page, only the rollouts it is part of.
  const shown = found.rollouts.filter((r) => !id || r.devices.some((d) => d.device_id === id));
  if (!shown.length) {
    body.replaceChildren(el("div", {class: "empty-note"}, "No rollouts. Publish a model with ",
      el("code", {}, "appliance hub publish"), " and start one with ",
      el("code", {}, "appliance hub rollout start"), "."));
    return;
  }
  body.replaceChildren(...shown.map(renderRollout));
}

// The model versions a device runs, as the hub's rollouts know them: for each model, the
// newest rollout's word: the new version once healthy, the one before when it failed or was
// rolled back or cancelled, both while it is on its way.
function modelVersions(rows) {
  const out = {};
  for (const r of rows) {  // newest first
    if (!r.name || out[r.name]) continue;
    const before = r.previous || "?";
    if (r.state === "healthy") out[r.name] = r.version;
    else if (["failed", "rolled_back", "cancelled", "skipped"].includes(r.state)) out[r.name] = before;
    else out[r.name] = `${before} → ${r.version} (${r.state.replace("_", " ")})`;
  }
  return Object.entries(out).map(([name, v]) => `${name} ${v}`).join(", ");
}
