"""``python -m appliance``: the same as the ``appliance`` command."""

from __future__ import annotations

import sys

from appliance.cli import main

if __name__ == "__main__":
    sys.exit(main())
