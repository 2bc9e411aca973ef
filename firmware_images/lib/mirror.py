"""Print the Debian bookworm APT sources this machine uses, one ``deb URI SUITE`` per line.

The image is built from the same mirror the build host's APT is configured with (a local
mirror or proxy in CI), never a hard-coded public host. With an argument (a mirror URL),
that mirror serves bookworm and bookworm-updates instead.
"""

from __future__ import annotations

import sys
from pathlib import Path

SUITES = ("bookworm", "bookworm-updates", "bookworm-security")


def deb822(text: str) -> list[tuple[str, str]]:
    out = []
    for stanza in text.split("\n\n"):
        fields: dict[str, str] = {}
        for line in stanza.splitlines():
            if line.startswith("#") or ":" not in line or line[0].isspace():
                continue
            key, _, value = line.partition(":")
            fields[key.strip().lower()] = value.strip()
        if "deb" not in fields.get("types", "").split() or fields.get("enabled") == "no":
            continue
        for uri in fields.get("uris", "").split():
            out += [(uri, suite) for suite in fields.get("suites", "").split()]
    return out


def one_line(text: str) -> list[tuple[str, str]]:
    out = []
    for line in text.splitlines():
        words = line.split("#", 1)[0].split()
        if len(words) >= 3 and words[0] == "deb":
            if words[1].startswith("["):  # options: deb [arch=... signed-by=...] URI
                while not words[1].endswith("]"):
                    words.pop(1)
                words.pop(1)
            out.append((words[1], words[2]))
    return out


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1]:
        base = sys.argv[1].rstrip("/")
        print(f"deb {base} bookworm\ndeb {base} bookworm-updates")
        return 0
    entries: list[tuple[str, str]] = []
    etc = Path("/etc/apt")
    if (etc / "sources.list").is_file():
        entries += one_line((etc / "sources.list").read_text())
    for path in sorted((etc / "sources.list.d").glob("*")):
        if path.suffix == ".sources":
            entries += deb822(path.read_text())
        elif path.suffix == ".list":
            entries += one_line(path.read_text())
    seen = []
    for uri, suite in entries:
        if suite in SUITES and (uri, suite) not in seen:
            seen.append((uri, suite))
    seen.sort(key=lambda e: SUITES.index(e[1]))
    if not seen or seen[0][1] != "bookworm":
        print("mirror.py: no Debian bookworm source in /etc/apt; set APPLIANCE_IMAGE_MIRROR",
              file=sys.stderr)
        return 1
    for uri, suite in seen:
        print(f"deb {uri.rstrip('/')} {suite}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
