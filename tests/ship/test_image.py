"""Build the device images and boot them in QEMU: the Raspberry Pi (arm64) image and the
amd64 variant of the same recipe.

Each image is built by firmware_images/build on this amd64 host (arm64: llama.cpp
cross-compiled, the root file system under qemu-user) and booted with its own kernel and
initrd: arm64 in ``qemu-system-aarch64 -M virt -cpu cortex-a72`` (a Pi 4's CPU), amd64 in
``qemu-system-x86_64``, both TCG (no KVM here), with the HTTP, MQTT and SSH ports forwarded
to 127.0.0.1 only. From the host it checks: the unit started under systemd (``Started``
only follows READY=1), /health with both default models ready, an inference and a chat
completion from ``home-intent`` with the API key set in the boot partition's
appliance.toml, an MQTT request/response through the image's Mosquitto, ``systemctl
is-active appliance`` over SSH with the key put on the boot partition, and that what was
dropped on the FAT boot partition took effect (and the secrets left it). It prints the
boot time and the throughput it saw (figures, never asserted).

Slow (minutes; arm64 the most) and root-only, so it runs only with
``APPLIANCE_TEST_IMAGE=1`` (.ci/run sets it). ``APPLIANCE_TEST_IMAGE_ARCHS`` picks the
images (default ``arm64 amd64``). ``APPLIANCE_TEST_IMAGE_OUT=DIR`` reuses images built
there instead of building. Downloads and built wheels are cached in
/var/cache/appliance-ci.
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
    pytest.mark.timeout(3600),
    pytest.mark.skipif(
        os.environ.get("APPLIANCE_TEST_IMAGE") != "1",
        reason="image build and boot: set APPLIANCE_TEST_IMAGE=1 (.ci/run does)",
    ),
]

CACHE = Path(os.environ.get("APPLIANCE_TEST_IMAGE_CACHE", "/var/cache/appliance-ci"))
ARCHS = os.environ.get("APPLIANCE_TEST_IMAGE_ARCHS", "arm64 amd64").split()
DEVICE_ID = "ci-image-test"
API_KEY = "apk_ci-image-test-" + uuid.uuid4().hex  # set in appliance.toml
CREDENTIAL_KEY = "apk_ci-credential-" + uuid.uuid4().hex  # the api-keys credential file
# TCG boot plus the daemon's first start (both models loaded): amd64 about 2 minutes,
# arm64 (every instruction translated) several; bounded, generously.
BOOT_TIMEOUT = {"amd64": 600, "arm64": 1500}
WINDOW = {"name": "window", "datatype": "FP32", "shape": [1, 32, 3], "data": [21.5, 45.0, 0.6] * 32}
CHAT = {
    "model": "home-intent",
    "max_tokens": 32,
    "temperature": 0,
    "messages": [{"role": "user", "content": "turn on the kitchen light"}],
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module", params=ARCHS)
def arch(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def image_dir(arch: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    prebuilt = os.environ.get("APPLIANCE_TEST_IMAGE_OUT")
    if prebuilt:
        return Path(prebuilt)
    assert os.geteuid() == 0, "building the image needs root (mmdebstrap, device-owned files)"
    out = tmp_path_factory.mktemp(f"image-{arch}")
    log = out / "build.log"
    started = time.monotonic()
    with log.open("w") as sink:
        result = subprocess.run(
            [
                str(ROOT / "firmware_images" / "build"),
                "--arch",
                arch,
                "--out",
                str(out),
                "--cache",
                str(CACHE),
            ],
            stdout=sink,
            stderr=subprocess.STDOUT,
            check=False,
            timeout=3000,
        )
    text = log.read_text()
    print(text[-3000:])  # the progress lines, in the test report on failure
    print(f"{arch} image built in {time.monotonic() - started:.0f}s")
    assert result.returncode == 0, text[-5000:]
    return out


def qemu_command(arch: str, image_dir: Path, disk: Path, console: Path, forwards: str) -> list[str]:
    """The QEMU command firmware_images/README.md documents, for one image."""
    name = f"appliance-{arch}"
    common = [
        "-accel",
        "tcg",
        "-smp",
        "2",
        "-m",
        "2048",
        "-display",
        "none",
        "-no-reboot",
        "-serial",
        f"file:{console}",
        "-kernel",
        str(image_dir / f"{name}.vmlinuz"),
        "-initrd",
        str(image_dir / f"{name}.initrd"),
        "-drive",
        f"file={disk},if=none,format=raw,id=disk0",
        "-device",
        "virtio-blk-pci,drive=disk0",
        "-netdev",
        f"user,id=n0,{forwards}",
        "-device",
        "virtio-net-pci,netdev=n0",
    ]
    # The journal on the console too: the test reads systemd's and the daemon's lines.
    append = "root=LABEL=appliance-root rw systemd.journald.forward_to_console=1 console="
    if arch == "arm64":
        return [
            "qemu-system-aarch64",
            "-machine",
            "virt",
            "-cpu",
            "cortex-a72",
            *common,
            "-append",
            append + "ttyAMA0",
        ]
    return [
        "qemu-system-x86_64",
        "-machine",
        "q35",
        "-cpu",
        "max",
        *common,
        "-append",
        append + "ttyS0",
    ]


@pytest.fixture(scope="module")
def vm(
    arch: str, image_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Any]]:
    work = tmp_path_factory.mktemp(f"vm-{arch}")
    disk = work / "disk.img"
    shutil.copyfile(image_dir / f"appliance-{arch}.img", disk)
    subprocess.run(["qemu-img", "resize", "-q", "-f", "raw", str(disk), "+1G"], check=True)
    # What a user drops on the FAT boot partition (it starts 1 MiB into the disk).
    config = work / "appliance.toml"
    config.write_text(
        f'[device]\nid = "{DEVICE_ID}"\nname = "CI image test"\n\n'
        f'[[security.keys]]\nname = "ci-toml"\nscopes = ["infer", "read"]\n'
        f'hash = "{hash_key(API_KEY)}"\n'
    )
    token = work / "hub-token"
    token.write_text("aph_not-a-real-token\n")
    keys = work / "api-keys"  # one more key, as a systemd credential
    keys.write_text(f"ci infer,read {hash_key(CREDENTIAL_KEY)}\n")
    ssh_key = work / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(ssh_key)], check=True)
    authorized = work / "authorized_keys"
    shutil.copyfile(ssh_key.with_suffix(".pub"), authorized)
    for item in (config, token, keys, authorized):
        subprocess.run(
            ["mcopy", "-o", "-i", f"{disk}@@1M", str(item), f"::{item.name}"], check=True
        )
    http, mqtt, ssh = free_port(), free_port(), free_port()
    console = work / "console.log"
    forwards = (
        f"hostfwd=tcp:127.0.0.1:{http}-:8080,hostfwd=tcp:127.0.0.1:{mqtt}-:1883,"
        f"hostfwd=tcp:127.0.0.1:{ssh}-:22"
    )
    proc = subprocess.Popen(
        qemu_command(arch, image_dir, disk, console, forwards),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    started = time.monotonic()
    url = f"http://127.0.0.1:{http}"
    try:
        health = wait_healthy(url, proc, console, BOOT_TIMEOUT[arch])
        print(f"{arch}: power-on to /health 200 (models loaded) {time.monotonic() - started:.0f}s")
        yield {
            "url": url,
            "mqtt": mqtt,
            "ssh": ssh,
            "ssh_key": ssh_key,
            "health": health,
            "console": console,
            "disk": disk,
            "arch": arch,
        }
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def wait_healthy(
    url: str, proc: subprocess.Popen[bytes], console: Path, timeout: float
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
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
    raise AssertionError(
        "no /health 200 from the image:\n" + console.read_text(errors="replace")[-8000:]
    )


def test_boots_serving_with_the_boot_partition_config(vm: dict[str, Any]) -> None:
    health = vm["health"]
    assert health["device"] == {"id": DEVICE_ID, "name": "CI image test"}
    assert health["models"]["sensor-anomaly"]["state"] == "ready"
    # The image's llama.cpp (amd64: built for any x86-64; arm64: cross-compiled, its
    # ARMv8.0 variant on the emulated Cortex-A72) runs the default language model on
    # QEMU's CPU, not only on the build host's.
    assert health["models"]["home-intent"] == {
        "state": "ready",
        "runtime": "gguf",
        "version": "2",
    }, health["models"]
    console = read_console(vm["console"], until="systemd[1]: Started appliance.service")
    # Type=notify: systemd logs "Started" only after the daemon sent READY=1, here with the
    # hardened unit running (LoadCredential, sandboxing, the service user).
    lines = console.splitlines()
    started = next(
        i for i, line in enumerate(lines) if "systemd[1]: Started appliance.service" in line
    )
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
    assert "appliance-firstboot: installed root's SSH authorized_keys" in console
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
    request = urllib.request.Request(
        vm["url"] + "/v2/models/sensor-anomaly/infer",
        data=body,
        headers={"Content-Type": "application/json"},
    )
    # Secure by default: on a LAN address the daemon wants a key ...
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=60)
    refused.value.close()
    assert refused.value.code == 401
    # ... and the one from the api-keys credential (boot partition → /etc/credstore) works.
    request.add_header("Authorization", f"Bearer {CREDENTIAL_KEY}")
    with urllib.request.urlopen(request, timeout=60) as resp:
        reply = json.loads(resp.read())
    outputs = {o["name"]: o["data"] for o in reply["outputs"]}
    assert outputs["is_anomaly"] == [True]  # 32 identical readings: a stuck sensor
    # Throughput as seen from the host through QEMU's user network (a figure, not a check).
    count, started = 20, time.monotonic()
    for _ in range(count):
        with urllib.request.urlopen(request, timeout=60) as resp:
            resp.read()
    print(
        f"{vm['arch']}: sensor-anomaly {count / (time.monotonic() - started):.1f} "
        "requests/s (sequential, one client)"
    )


def post_json(url: str, body: dict[str, Any], key: str | None) -> dict[str, Any]:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    if key is not None:
        request.add_header("Authorization", f"Bearer {key}")
    with urllib.request.urlopen(request, timeout=300) as resp:
        return dict(json.loads(resp.read()))


def test_chat_completion_with_the_key_from_the_boot_partition_toml(vm: dict[str, Any]) -> None:
    url = vm["url"] + "/v1/chat/completions"
    with pytest.raises(urllib.error.HTTPError) as refused:
        post_json(url, CHAT, key="apk_wrong-" + uuid.uuid4().hex)
    refused.value.close()
    assert refused.value.code == 401
    reply = post_json(url, CHAT, key=API_KEY)  # [[security.keys]] in appliance.toml
    assert reply["model"] == "home-intent"
    assert reply["choices"][0]["message"]["content"].strip(), reply
    assert reply["usage"]["completion_tokens"] > 0
    # Generation speed inside the image (a figure, not a check): a few greedy completions.
    tokens, started = 0, time.monotonic()
    for _ in range(3):
        tokens += int(post_json(url, CHAT, key=API_KEY)["usage"]["completion_tokens"])
    print(
        f"{vm['arch']}: home-intent {tokens / (time.monotonic() - started):.1f} tokens/s "
        f"({tokens} tokens, 3 sequential chat completions)"
    )


def test_systemctl_says_the_appliance_is_active_over_ssh(vm: dict[str, Any]) -> None:
    result = subprocess.run(
        [
            "ssh",
            "-i",
            str(vm["ssh_key"]),
            "-p",
            str(vm["ssh"]),
            "-o",
            "BatchMode=yes",
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "ConnectTimeout=60",
            "root@127.0.0.1",
            "systemctl is-active appliance mosquitto; cat /etc/appliance/appliance.toml",
        ],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.splitlines()[:2] == ["active", "active"]
    assert f'id = "{DEVICE_ID}"' in result.stdout  # the boot partition's file, installed


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
            client.publish(
                f"appliance/{DEVICE_ID}/infer/sensor-anomaly", payload, qos=1, properties=props
            )
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
    listing = subprocess.run(
        ["mdir", "-b", "-i", f"{vm['disk']}@@1M", "::/"], capture_output=True, text=True, check=True
    ).stdout
    assert "appliance.toml" in listing.lower()
    assert "hub-token" not in listing.lower()
    assert "api-keys" not in listing.lower()
    assert "authorized_keys" not in listing.lower()
