"""The human docs page: the OpenAPI document rendered as one self-contained HTML page.

Server-rendered, so it works without JavaScript and on a box with no internet: no web
fonts, no CDN; the CSS (``docs.css`` beside this module) is inlined into the page, and the
one script is the "Try it" forms' (:mod:`.docs_try`). Every value from the document goes through
``html.escape``. The page is rendered once per application; only the base URL of the curl
examples is filled in per request, so they work when pasted on the reader's machine.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import re
from collections.abc import Iterable, Mapping
from importlib import resources
from typing import Any

from appliance.transports.http.openapi import docs_try
from appliance.transports.http.openapi.schemas import REF

# Placeholders for the base URLs; they survive html.escape and cannot come from data.
_BASE = "\x00base-url\x00"
_WS_BASE = "\x00ws-base-url\x00"
_HOST = re.compile(r"^[A-Za-z0-9.\-]+(:\d{1,5})?$|^\[[0-9A-Fa-f:.]+\](:\d{1,5})?$")
DEFAULT_BASE = "http://appliance.local:8080"

# The page's own style sheet, a file beside this module so it can be edited as CSS.
CSS = (resources.files("appliance.transports.http.openapi") / "docs.css").read_text("utf-8")


class Page:
    """The docs page for one OpenAPI document; :meth:`render` fills in the base URL."""

    def __init__(self, document: Mapping[str, Any]) -> None:
        self._template = _page(document)
        css_hash = _sha256(CSS + docs_try.CSS)
        script_hash = _sha256(docs_try.SCRIPT)
        # The page needs its own inline style and "Try it" script, which may only call this
        # origin: a browser that honours this policy runs nothing else and loads nothing,
        # even if something slipped past escaping.
        self.headers = {
            "Content-Security-Policy": f"default-src 'none'; style-src 'sha256-{css_hash}'; "
            f"script-src 'sha256-{script_hash}'; connect-src 'self'; "
            "base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
            "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer",
        }

    def render(self, scheme: str, host: str | None) -> str:
        """The page with curl examples pointing at ``scheme://host``.

        ``host`` comes from the request's Host header, which the client controls: anything
        that does not look like a host name or address falls back to a placeholder.
        """
        base = DEFAULT_BASE
        if host and _HOST.match(host) and scheme in ("http", "https"):
            base = f"{scheme}://{host}"
        ws_base = "ws" + base.removeprefix("http")
        return self._template.replace(_BASE, html.escape(base)).replace(
            _WS_BASE, html.escape(ws_base)
        )


# ----------------------------------------------------------------------- the page


def _page(doc: Mapping[str, Any]) -> str:
    info = doc["info"]
    schemas: Mapping[str, Any] = doc.get("components", {}).get("schemas", {})
    tags = [tag["name"] for tag in doc.get("tags", [])]
    by_tag: dict[str, list[tuple[str, str, Mapping[str, Any]]]] = {t: [] for t in tags}
    for path, operations in doc["paths"].items():
        for method, operation in operations.items():
            tag = (operation.get("tags") or ["Other"])[0]
            by_tag.setdefault(tag, []).append((method, path, operation))
    tag_info = {tag["name"]: tag for tag in doc.get("tags", [])}

    nav, sections = [], []
    for tag, operations in by_tag.items():
        if not operations:
            continue
        anchor = _anchor("tag", tag)
        nav.append(f'<h2><a href="#{anchor}">{_e(tag)}</a></h2><ul>')
        body = [f'<section id="{anchor}"><h2>{_e(tag)}</h2>']
        meta = tag_info.get(tag, {})
        body.append(_markdown(meta.get("description", "")))
        if "externalDocs" in meta:
            url = meta["externalDocs"]["url"]
            body.append(f'<p class="muted">Reference: <a href="{_e(url)}">{_e(url)}</a></p>')
        for method, path, operation in operations:
            op_anchor = _op_anchor(method, path, operation)
            wrappable = _e(path).replace("/", "/<wbr>")  # long paths break at a slash
            nav.append(
                f'<li><a href="#{op_anchor}">{_badge(method)} <code>{wrappable}</code></a></li>'
            )
            body.append(_operation(method, path, operation, op_anchor, schemas))
        nav.append("</ul>")
        body.append("</section>")
        sections.append("".join(body))
    nav.append('<h2><a href="#schemas">Schemas</a></h2><ul>')
    nav.extend(
        f'<li><a href="#{_anchor("schema", n)}"><code>{_e(n)}</code></a></li>' for n in schemas
    )
    nav.append("</ul>")
    sections.append(_schemas(schemas))

    title = f"{info['title']} API"
    return (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_e(title)} {_e(info['version'])}</title><style>{CSS}{docs_try.CSS}</style>"
        "</head><body>"
        f'<header><h1>{_e(title)}<span class="version">v{_e(info["version"])}</span></h1>'
        f"{_markdown(info.get('summary', ''))}{_markdown(info.get('description', ''))}"
        '<p class="muted">Machine-readable: <a href="/openapi.json">/openapi.json</a> '
        '(OpenAPI 3.1) · Health: <a href="/health">/health</a> · '
        'Metrics: <a href="/metrics">/metrics</a></p>'
        f"{docs_try.KEY_BOX}</header>"
        f'<div class="layout"><nav aria-label="Contents">{"".join(nav)}</nav>'
        f"<main>{''.join(sections)}</main></div>"
        f"<script>{docs_try.SCRIPT}</script></body></html>\n"
    )


def _operation(
    method: str, path: str, op: Mapping[str, Any], anchor: str, schemas: Mapping[str, Any]
) -> str:
    out = [f'<article class="op" id="{anchor}"><h3>{_badge(method)} <code>{_e(path)}</code></h3>']
    out.append(f'<p class="summary">{_e(op.get("summary", ""))}</p>')
    out.append(_markdown(op.get("description", "")))
    parameters = op.get("parameters", [])
    if parameters:
        rows = "".join(
            f'<tr><td class="name"><code>{_e(p["name"])}</code>'
            f"{_REQUIRED if p.get('required') else ''}</td><td>{_e(p['in'])}</td>"
            f"<td>{_type(p.get('schema', {}))}</td>"
            f"<td>{_inline(p.get('description', ''))}{_example(p)}</td></tr>"
            for p in parameters
        )
        out.append(
            "<h4>Parameters</h4><table><thead><tr><th>Name</th><th>In</th>"
            f"<th>Type</th><th>Description</th></tr></thead><tbody>{rows}</tbody>"
            "</table>"
        )
    body = op.get("requestBody")
    if body:
        out.append("<h4>Request body</h4>")
        for media, content in body.get("content", {}).items():
            schema = content.get("schema", {})
            out.append(f"<p><code>{_e(media)}</code> — {_type(schema)}{_desc(schema)}</p>")
            target = _resolve(schema, schemas)
            if target.get("properties"):
                out.append(_properties(target))
    out.append(
        "<h4>Responses</h4><table><thead><tr><th>Status</th><th>Description</th>"
        "<th>Body</th></tr></thead><tbody>"
    )
    for status, response in op.get("responses", {}).items():
        out.append(
            f'<tr><td class="status">{_e(status)}</td>'
            f"<td>{_inline(response.get('description', ''))}"
            f"{_headers(response.get('headers', {}))}</td><td>"
        )
        for media, content in response.get("content", {}).items():
            if "x-itemSchema" in content:  # a stream: what matters is what each item is
                shown = "stream of " + _type(content["x-itemSchema"])
            else:
                shown = _type(content.get("schema", {}))
            out.append(f"<div><code>{_e(media)}</code> — {shown}</div>")
        out.append("</td></tr>")
    out.append("</tbody></table>")
    out.append("<h4>Example</h4><pre><code>" + _e(_curl(method, path, op)) + "</code></pre>")
    out.append(docs_try.form(method, path, op))
    out.append("</article>")
    return "".join(out)


def _schemas(schemas: Mapping[str, Any]) -> str:
    out = ['<section id="schemas"><h2>Schemas</h2>']
    for name, schema in schemas.items():
        out.append(f'<section class="schema" id="{_anchor("schema", name)}"><h3>{_e(name)}</h3>')
        out.append(_markdown(schema.get("description", "")))
        if schema.get("properties"):
            out.append(_properties(schema))
        else:
            out.append(f"<p>{_type(schema)}{_limits(schema)}</p>")
        out.append("</section>")
    out.append("</section>")
    return "".join(out)


def _properties(schema: Mapping[str, Any]) -> str:
    return (
        "<table><thead><tr><th>Field</th><th>Type</th><th>Description</th></tr></thead>"
        f"<tbody>{''.join(_rows(schema, ''))}</tbody></table>"
    )


def _rows(schema: Mapping[str, Any], prefix: str) -> Iterable[str]:
    """One row per property; inline objects add rows for their fields (``device.id``)."""
    required = set(schema.get("required", []))
    for name, prop in schema.get("properties", {}).items():
        yield (
            f'<tr><td class="name"><code>{_e(prefix + name)}</code>'
            f"{_REQUIRED if name in required else ''}</td><td>{_type(prop)}</td>"
            f"<td>{_inline(_description(prop))}{_limits(prop)}</td></tr>"
        )
        if "$ref" not in prop and prop.get("properties"):
            yield from _rows(prop, f"{prefix}{name}.")


# -------------------------------------------------------------------------- pieces

_REQUIRED = '<span class="req">required</span>'
_METHODS = {"get", "post", "put", "patch", "delete", "head", "options"}


def _sha256(text: str) -> str:
    return base64.b64encode(hashlib.sha256(text.encode()).digest()).decode()


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _anchor(kind: str, name: str) -> str:
    return f"{kind}-" + re.sub(r"[^A-Za-z0-9_-]+", "-", name).strip("-")


def _op_anchor(method: str, path: str, op: Mapping[str, Any]) -> str:
    return _anchor("op", op.get("operationId") or f"{method}-{path}")


def _badge(method: str) -> str:
    css = method.lower() if method.lower() in _METHODS else "other"
    return f'<span class="method {css}">{_e(method.upper())}</span>'


def _inline(text: str) -> str:
    """Escaped text with Markdown's `code` spans (all the Markdown the docs use inline)."""
    # ``x`` (CommonMark allows it, and reST docstrings of the pydantic models use it) = `x`.
    parts = re.split(r"`([^`]+)`", text.replace("``", "`"))
    return "".join(f"<code>{_e(p)}</code>" if i % 2 else _e(p) for i, p in enumerate(parts))


def _markdown(text: str) -> str:
    """Paragraphs and ``- `` lists; enough for the descriptions in this document."""
    out = []
    for block in re.split(r"\n\s*\n", text.strip()):
        if not block:
            continue
        lines = block.splitlines()
        if all(line.lstrip().startswith("- ") for line in lines):
            items = "".join(f"<li>{_inline(line.lstrip()[2:])}</li>" for line in lines)
            out.append(f"<ul>{items}</ul>")
        else:
            out.append(f"<p>{_inline(' '.join(lines))}</p>")
    return "".join(out)


def _ref_name(schema: Mapping[str, Any]) -> str | None:
    target = schema.get("$ref")
    if isinstance(target, str) and target.startswith(REF):
        return target[len(REF) :]
    return None


def _resolve(schema: Mapping[str, Any], schemas: Mapping[str, Any]) -> Mapping[str, Any]:
    name = _ref_name(schema)
    return schemas.get(name, {}) if name else schema


def _type(schema: Mapping[str, Any]) -> str:
    """A short HTML rendering of a schema's type, linking referenced schemas."""
    name = _ref_name(schema)
    if name is not None:
        return f'<a href="#{_anchor("schema", name)}"><code>{_e(name)}</code></a>'
    for key in ("anyOf", "oneOf"):
        if key in schema:
            return " | ".join(_type(s) for s in schema[key])
    if "const" in schema:
        return f"<code>{_e(json.dumps(schema['const']))}</code>"
    if "enum" in schema:
        return " | ".join(f"<code>{_e(json.dumps(v))}</code>" for v in schema["enum"])
    kind = schema.get("type")
    if isinstance(kind, list):
        return " | ".join(_type({**schema, "type": k}) for k in kind)
    if kind == "array":
        items = schema.get("items")
        return "array of " + (_type(items) if isinstance(items, Mapping) else "any")
    if kind == "object" and isinstance(schema.get("additionalProperties"), Mapping):
        return "map of string → " + _type(schema["additionalProperties"])
    if kind is None:
        return "any"
    fmt = schema.get("format") or schema.get("contentMediaType")
    return _e(kind) + (f" <span class='muted'>({_e(fmt)})</span>" if fmt else "")


def _description(schema: Mapping[str, Any]) -> str:
    return str(schema.get("description", ""))


def _desc(schema: Mapping[str, Any]) -> str:
    text = _description(schema)
    return f". {_inline(text)}" if text else ""


_LIMITS = [
    ("minimum", "≥ {}"),
    ("exclusiveMinimum", "> {}"),
    ("maximum", "≤ {}"),
    ("exclusiveMaximum", "< {}"),
    ("minLength", "at least {} characters"),
    ("maxLength", "at most {} characters"),
    ("minItems", "at least {} items"),
    ("maxItems", "at most {} items"),
    ("pattern", "matches {}"),
]


def _limits(schema: Mapping[str, Any]) -> str:
    """Constraints and default, from the schema and its non-null alternatives."""
    found: list[str] = []
    for part in [schema, *schema.get("anyOf", [])]:
        for key, fmt in _LIMITS:
            if key not in part:
                continue
            if key in ("minLength", "minItems") and part[key] == 1:
                found.append("not empty")
            else:
                found.append(fmt.format(part[key]))
    if "default" in schema and schema["default"] is not None:
        found.append(f"default {json.dumps(schema['default'])}")
    if not found:
        return ""
    return f' <span class="muted">({_e("; ".join(found))})</span>'


def _example(parameter: Mapping[str, Any]) -> str:
    if "example" not in parameter:
        return ""
    return f' <span class="muted">e.g. <code>{_e(parameter["example"])}</code></span>'


def _headers(headers: Mapping[str, Any]) -> str:
    return "".join(
        f'<div class="muted">Header <code>{_e(name)}</code>: '
        f"{_inline(h.get('description', ''))}</div>"
        for name, h in headers.items()
    )


def _curl(method: str, path: str, op: Mapping[str, Any]) -> str:
    """A curl command line for the operation, with the documented examples filled in."""
    for parameter in _path_parameters(op.get("parameters", [])):
        path = path.replace("{" + parameter["name"] + "}", str(parameter.get("example", "…")))
    if "101" in op.get("responses", {}):  # a WebSocket: curl cannot talk to it
        return f"websocat {_WS_BASE}{path}\n" + '{"type": "ping", "id": 1}'
    command = "curl -sS" + ("" if method.lower() in ("get", "post") else f" -X {method.upper()}")
    url = f"{_BASE}{path}"
    example = (
        op.get("requestBody", {}).get("content", {}).get("application/json", {}).get("example")
    )
    if example is None:
        return f"{command} {url}"
    body = _compact_numbers(json.dumps(example, indent=2, ensure_ascii=False))
    body = body.replace("\n", "\n  ")  # line up with the -d above
    body = body.replace("'", "'\\''")  # it goes inside single quotes for the shell
    return f"{command} {url} \\\n  -H 'Content-Type: application/json' \\\n  -d '{body}'"


def _path_parameters(parameters: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    return [p for p in parameters if p.get("in") == "path"]


def _compact_numbers(text: str) -> str:
    """Put arrays of plain numbers on one line: tensors are unreadable one number a line."""
    return re.sub(
        r"\[\s*(-?[\d.eE+-]+(?:,\s*-?[\d.eE+-]+)*)\s*\]",
        lambda m: "[" + ", ".join(x.strip() for x in m.group(1).split(",")) + "]",
        text,
    )
