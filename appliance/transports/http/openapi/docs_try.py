""" "Try it" on the docs page: a form per operation that sends the request from the browser.

The page itself stays server-rendered and readable without JavaScript; this adds one small
inline script (allowed by its hash in the page's Content-Security-Policy, nothing else
may run) that sends each form with ``fetch`` to the same origin, carrying the API key the
reader typed into the page's header. The key is kept in the tab's ``sessionStorage`` only.
"""

from __future__ import annotations

import html
import json
from collections.abc import Mapping
from typing import Any

CSS = """
.key { display:flex; gap:0.5em; align-items:center; flex-wrap:wrap; margin:0.6em 0 0; }
.key input { font:inherit; padding:0.25em 0.5em; border:1px solid var(--line);
  border-radius:4px; min-width:22em; background:var(--bg); color:var(--fg); }
form.try { display:grid; gap:0.4em; margin:0.4em 0 0.8em; }
form.try label { font-size:0.85em; color:var(--muted); }
form.try input, form.try textarea { font:0.9em ui-monospace,"DejaVu Sans Mono",monospace;
  padding:0.3em 0.5em; border:1px solid var(--line); border-radius:4px;
  background:var(--bg); color:var(--fg); width:100%; }
form.try button, .key button { justify-self:start; font:inherit; font-weight:600;
  padding:0.25em 1em; border-radius:4px; border:1px solid var(--post); cursor:pointer;
  background:var(--post); color:#fff; }
pre.try-out:empty { display:none; }
"""

SCRIPT = """
"use strict";
const KEY = "appliance-api-key";
const keyBox = document.getElementById("api-key");
document.getElementById("key-form").addEventListener("submit", (e) => e.preventDefault());
keyBox.value = sessionStorage.getItem(KEY) || "";
keyBox.addEventListener("input", () => sessionStorage.setItem(KEY, keyBox.value.trim()));
document.getElementById("key-forget").addEventListener("click", () => {
  sessionStorage.removeItem(KEY); keyBox.value = "";
});
for (const form of document.querySelectorAll("form.try")) {
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const out = form.querySelector("pre.try-out");
    let path = form.dataset.path;
    const query = new URLSearchParams();
    for (const input of form.querySelectorAll("input[data-in]")) {
      if (input.dataset.in === "path") {
        path = path.replace(`{${input.name}}`, encodeURIComponent(input.value));
      } else if (input.value !== "") {
        query.append(input.name, input.value);
      }
    }
    const headers = {};
    const key = keyBox.value.trim();
    if (key) headers["Authorization"] = `Bearer ${key}`;
    const body = form.querySelector("textarea");
    if (body) headers["Content-Type"] = "application/json";
    const url = path + (query.toString() ? `?${query}` : "");
    out.textContent = `${form.dataset.method.toUpperCase()} ${url} …`;
    try {
      const resp = await fetch(url, {method: form.dataset.method.toUpperCase(), headers,
                                     body: body ? body.value : undefined});
      let text = await resp.text();
      try { text = JSON.stringify(JSON.parse(text), null, 2); } catch (err) { /* not JSON */ }
      out.textContent = `${resp.status} ${resp.statusText}\\n\\n${text}`;
      out.dataset.status = String(resp.status);
    } catch (err) {
      out.textContent = `request failed: ${err}`;
      out.dataset.status = "error";
    }
  });
}
"""

KEY_BOX = (
    '<form class="key" id="key-form"><label for="api-key">API key for "Try it"</label>'
    '<input id="api-key" type="password" autocomplete="off" '
    'placeholder="from appliance keys create, or the generated api-key file">'
    '<button type="button" id="key-forget">Forget</button>'
    '<span class="muted">kept in this tab only</span></form>'
)


def form(method: str, path: str, op: Mapping[str, Any]) -> str:
    """The "Try it" form of one operation ("" for a WebSocket, which fetch cannot open)."""
    if "101" in op.get("responses", {}):
        return ""
    fields = []
    for parameter in op.get("parameters", []):
        where = parameter.get("in")
        if where not in ("path", "query"):
            continue
        value = parameter.get("example", "")
        fields.append(
            f"<label>{_e(parameter['name'])} ({_e(where)})"
            f'<input name="{_e(parameter["name"])}" data-in="{_e(where)}" '
            f'value="{_e(value)}"{" required" if where == "path" else ""}></label>'
        )
    content = op.get("requestBody", {}).get("content", {})
    if "application/json" in content:
        example = content["application/json"].get("example", {})
        text = json.dumps(example, indent=2, ensure_ascii=False)
        rows = min(16, text.count("\n") + 2)
        fields.append(
            f'<label>body (JSON)<textarea name="body" rows="{rows}">{_e(text)}</textarea></label>'
        )
    return (
        f'<details class="try"><summary>Try it</summary>'
        f'<form class="try" data-method="{_e(method.lower())}" data-path="{_e(path)}">'
        f'{"".join(fields)}<button type="submit">Send</button>'
        '<pre class="try-out" aria-live="polite"></pre></form></details>'
    )


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


__all__ = ["CSS", "KEY_BOX", "SCRIPT", "form"]
