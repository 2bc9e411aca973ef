"""A DNS-SD browser that uses nothing but python-zeroconf's own blocking API.

Usage: ``python zc_browse.py SERVICE_TYPE INTERFACE_ADDRESSES`` (comma-separated). Prints one
JSON line per event (added, updated, removed) with the resolved SRV, address and TXT
records, and exits when its stdin closes. The tests run it to show that what the appliance
announces is standard DNS-SD, readable without any of the appliance's code.
"""

from __future__ import annotations

import json
import sys
import threading

from zeroconf import DNSQuestionType, IPVersion, ServiceBrowser, ServiceStateChange, Zeroconf

_print_lock = threading.Lock()


def emit(event: dict[str, object]) -> None:
    with _print_lock:
        print(json.dumps(event), flush=True)


def main() -> int:
    service_type, interfaces = sys.argv[1], sys.argv[2].split(",")
    zc = Zeroconf(interfaces=interfaces, ip_version=IPVersion.V4Only)

    def on_change(
        zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange
    ) -> None:
        event: dict[str, object] = {"event": state_change.name.lower(), "name": name}
        if state_change is not ServiceStateChange.Removed:
            # Multicast questions: other mDNS stacks on this host share port 5353.
            info = zeroconf.get_service_info(
                service_type, name, timeout=3000, question_type=DNSQuestionType.QM
            )
            if info is None:
                event["unresolved"] = True
            else:
                event |= {
                    "port": info.port,
                    "server": info.server,
                    "addresses": info.parsed_addresses(),
                    "txt": {k.decode(): (v or b"").decode() for k, v in info.properties.items()},
                }
        emit(event)

    browser = ServiceBrowser(
        zc, service_type, handlers=[on_change], question_type=DNSQuestionType.QM
    )
    try:
        sys.stdin.read()  # until the test closes our stdin
    finally:
        browser.cancel()
        zc.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
