"""What the hub's dashboard and the device's own page share: their look (``base.css``), the
DOM and number helpers (``dom.js``), the sign-in form's script (``signin.js``) and the time
charts (``chart.js``).

Each page stays one self-contained document (no CDN, no extra requests: the box or the hub
may be offline); a line ``/* include: NAME */`` in a page's ``<style>`` or ``<script>`` is
replaced by the shared file of that name when the page is read.
"""

from __future__ import annotations

import re
from importlib import resources

_INCLUDE = re.compile(r"^/\* include: ([a-z]+\.(?:css|js)) \*/$", re.MULTILINE)


def read_page(package: str, path: str) -> str:
    """The page ``path`` of ``package`` with its shared parts filled in. Blocking (reads
    files): call it at import or start-up, not on the event loop."""
    text = resources.files(package).joinpath(path).read_text("utf-8")
    shared = resources.files(__name__)
    return _INCLUDE.sub(lambda m: shared.joinpath(m.group(1)).read_text("utf-8").rstrip("\n"), text)
