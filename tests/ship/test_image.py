"""Build the device image (the amd64 variant of the recipe) and boot it in QEMU.

The Raspberry Pi (arm64) image is the product; CI builds the amd64 variant of the same
recipe (firmware_images/build --arch amd64) because it fits the CI budget, and boots it with
qemu-system-x86_64 (TCG, no KVM) with the HTTP and MQTT ports forwarded to the host. From
the host it checks: the unit started under systemd (``Started`` only follows READY=1),
/health, an inference on the default model, an MQTT request/response through the image's
Mosquitto, and that appliance.toml and hub-token dropped on the FAT boot partition took
effect.

Slow (minutes) and root-only, so it runs only with ``APPLIANCE_TEST_IMAGE=1`` (.ci/run sets
it). ``APPLIANCE_TEST_IMAGE_OUT=DIR`` reuses an image built there instead of building.
Downloaded packages are cached in /var/cache/appliance-ci.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from appliance.security.keys import hash_key
from tests.conftest import ROOT

pytestmark = [
    pytest.mark.image,
    pytest.mark.timeout(1800),
    pytest.mark.skipif(os.environ.get("APPLIANCE_TEST_IMAGE") != "1",
                       reason="image build and boot: set APPLIANCE_TEST_IMAGE=1 (.ci/run does)"),
]

CACHE = Path(os.environ.get("APPLIANCE_TEST_IMAGE_CACHE", "/var/cache/appliance-ci"))
DEVICE_ID = "ci-image-test"
API_KEY = "apk_ci-image-test-" + uuid.uuid4().hex
BOOT_TIMEOUT = 600  # TCG boot plus the daemon's first start; typically well under that
WINDOW = {"name": "window", "datatype": "FP32", "shape": [1, 32, 3],
          "data": [21.5, 45.0, 0.6] * 32}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    prebuilt = os.environ.get("APPLIANCE_TEST_IMAGE_OUT")
    if prebuilt:
        return Path(prebuilt)
    assert os.geteuid() == 0, "building the image needs root (mmdebstrap, device-owned files)"
    out = tmp_path_factory.mktemp("image")
    log = out / "build.log"
    with log.open("w") as sink:
        result = subprocess.run(
            [str(ROOT / "firmware_images" / "build"), "--arch", "amd64", "--out", str(out),
             "--cache", str(CACHE)], stdout=sink, stderr=subprocess.STDOUT, check=False,
            timeout=1500)
    text = log.read_text()
    print(text[-3000:])  # the progress lines, in the test report on failure
    assert result.returncode == 0, text[-5000:]
    return out


@pytest.fixture(scope="module")
def vm(image_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    work = tmp_path_factory.mktemp("vm")
    disk = work / "disk.img"
    shutil.copyfile(image_dir / "appliance-amd64.img", disk)
    subprocess.run(["qemu-img", "resize", "-q", "-f", "raw", str(disk), "+1G"], check=True)
    # What a user drops on the FAT boot partition (it starts 1 MiB into the disk).
    config = work / "appliance.toml"
    config.write_text(f'[device]\nid = "{DEVICE_ID}"\nname = "CI image test"\n')
    token = work / "hub-token"
    token.write_text("aph_not-a-real-token\n")
    keys = work / "api-keys"  # the API key the test calls with, as a systemd credential
    keys.write_text(f"ci infer,read {hash_key(API_KEY)}\n")
    for item in (config, token, keys):
        subprocess.run(["mcopy", "-o", "-i", f"{disk}@@1M", str(item), f"::{item.name}"],
                       check=True)
    http, mqtt = free_port(), free_port()
    console = work / "console.log"
    proc = subprocess.Popen(
        ["qemu-system-x86_64", "-machine", "q35", "-accel", "tcg", "-cpu", "max", "-smp", "2",
         "-m", "2048", "-display", "none", "-no-reboot", "-serial", f"file:{console}",
         "-kernel", str(image_dir / "appliance-amd64.vmlinuz"),
         "-initrd", str(image_dir / "appliance-amd64.initrd"),
         # The journal on the console too: the test reads systemd's and the daemon's lines.
         "-append", "root=LABEL=appliance-root rw console=ttyS0 "
                    "systemd.journald.forward_to_console=1",
         "-drive", f"file={disk},if=virtio,format=raw",
         "-netdev", f"user,id=n0,hostfwd=tcp:127.0.0.1:{http}-:8080,"
                    f"hostfwd=tcp:127.0.0.1:{mqtt}-:1883",
         "-device", "virtio-net-pci,netdev=n0"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    started = time.monotonic()
    url = f"http://127.0.0.1:{http}"
    try:
        health = wait_healthy(url, proc, console)
        print(f"image served /health 200 after {time.monotonic() - started:.0f}s of boot")
        yield {"url": url, "mqtt": mqtt, "health": health, "console": console, "disk": disk}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def wait_healthy(url: str, proc: subprocess.Popen[bytes], console: Path) -> dict[str, Any]:
    deadline = time.monotonic() + BOOT_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError("QEMU exited:\n" + console.read_text(errors="replace")[-5000:])
        try:
            with urllib.request.urlopen(url + "/health", timeout=5) as resp:
                if resp.status == 200:
                    return dict(json.loads(resp.read()))
        except urllib.error.HTTPError as exc:
            exc.close()
        except OSError:
            pass
        time.sleep(2)
    raise AssertionError("no /health 200 from the image:\n"
                         + console.read_text(errors="replace")[-8000:])


def test_boots_serving_with_the_boot_partition_config(vm: dict[str, Any]) -> None:
    health = vm["health"]
    assert health["device"] == {"id": DEVICE_ID, "name": "CI image test"}
    assert health["models"]["sensor-anomaly"]["state"] == "ready"
    # The image's llama.cpp (built for any x86-64, with its OpenMP runtime installed) runs
    # the default language model on QEMU's CPU, not only on the build host's.
    assert health["models"]["home-intent"] == {"state": "ready", "runtime": "gguf",
                                               "version": "1"}, health["models"]
    console = read_console(vm["console"], until="systemd[1]: Started appliance.service")
    # Type=notify: systemd logs "Started" only after the daemon sent READY=1, here with the
    # hardened unit running (LoadCredential, sandboxing, the service user).
    lines = console.splitlines()
    started = next(i for i, line in enumerate(lines)
                   if "systemd[1]: Started appliance.service" in line)
    ready = next(i for i, line in enumerate(lines) if "model sensor-anomaly (onnx" in line)
    assert ready < started  # READY=1 waited for the model
    assert "systemd[1]: Started mosquitto.service" in console
    # Clean journald lines: journald took the <N> priority prefix, and no second timestamp.
    daemon_lines = [line for line in lines if re.search(r"\bappliance\[\d+\]: ", line)]
    assert daemon_lines
    for line in daemon_lines:
        message = line.split("]: ", 2)[-1]
        assert re.match(r"(DEBUG|INFO|WARNING|ERROR|CRITICAL) ", message), line
        assert not re.search(r"\d{4}-\d\d-\d\d \d\d:\d\d", message), line
    assert "appliance-firstboot: installed /boot/firmware/appliance.toml" in console
    assert "appliance-firstboot: moved hub-token into /etc/credstore" in console
    assert "appliance-firstboot: moved api-keys into /etc/credstore" in console
    assert "appliance-firstboot: root file system" in console  # grown to the larger disk
    assert "Failed to start" not in console, console[-5000:]


def read_console(path: Path, *, until: str, timeout: float = 60) -> str:
    """The serial console without colour codes, once ``until`` appeared (or the timeout)."""
    deadline = time.monotonic() + timeout
    while True:
        text = re.sub(r"\x1b\[[0-9;]*m", "", path.read_text(errors="replace"))
        if until in text or time.monotonic() > deadline:
            return text
        time.sleep(1)


def test_inference_over_http(vm: dict[str, Any]) -> None:
    body = json.dumps({"inputs": [WINDOW]}).encode()
    request = urllib.request.Request(vm["url"] + "/v2/models/sensor-anomaly/infer", data=body,
                                     headers={"Content-Type": "application/json"})
    # Secure by default: on a LAN address the daemon wants a key ...
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=60)
    refused.value.close()
    assert refused.value.code == 401
    # ... and the one from the api-keys credential (boot partition → /etc/credstore) works.
    request.add_header("Authorization", f"Bearer {API_KEY}")
    with urllib.request.urlopen(request, timeout=60) as resp:
        reply = json.loads(resp.read())
    outputs = {o["name"]: o["data"] for o in reply["outputs"]}
    assert outputs["is_anomaly"] == [True]  # 32 identical readings: a stuck sensor


def test_mqtt_request_response_through_the_image_broker(vm: dict[str, Any]) -> None:
    from paho.mqtt import client as mqtt
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    replies: list[dict[str, Any]] = []
    got = threading.Event()
    reply_topic = f"ci/replies/{uuid.uuid4().hex}"
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)

    def on_message(_c: Any, _u: Any, message: Any) -> None:
        correlation = getattr(message.properties, "CorrelationData", None)
        replies.append({"payload": json.loads(message.payload), "correlation": correlation})
        got.set()

    client.on_message = on_message
    client.connect("127.0.0.1", vm["mqtt"])
    client.loop_start()
    try:
        client.subscribe(reply_topic, qos=1)  # requests below repeat until a reply
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = reply_topic
        props.CorrelationData = b"ci-1"
        payload = json.dumps({"data": [[21.5, 45.0, 0.6]] * 32})
        deadline = time.monotonic() + 120
        while not got.is_set() and time.monotonic() < deadline:
            # The appliance may still be subscribing right after boot: ask again until heard.
            client.publish(f"appliance/{DEVICE_ID}/infer/sensor-anomaly", payload, qos=1,
                           properties=props)
            got.wait(5)
    finally:
        client.loop_stop()
        client.disconnect()
    assert replies, "no MQTT reply from the image"
    reply = replies[0]
    assert reply["correlation"] == b"ci-1"
    assert reply["payload"]["status"] == "ok"
    assert reply["payload"]["device"] == DEVICE_ID
    assert reply["payload"]["data"]["outputs"]["is_anomaly"] is True


def test_secrets_left_the_boot_partition(vm: dict[str, Any]) -> None:
    listing = subprocess.run(["mdir", "-b", "-i", f"{vm['disk']}@@1M", "::/"],
                             capture_output=True, text=True, check=True).stdout
    assert "appliance.toml" in listing.lower()
    assert "hub-token" not in listing.lower()
    assert "api-keys" not in listing.lower()
