"""The ``appliance`` command. It only parses arguments and calls into the package."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from appliance import __version__
from appliance.backup import cli as backup_cli
from appliance.errors import ConfigError
from appliance.hub import cli as hub_cli
from appliance.ops import discover_cli, service_cli
from appliance.security import cli as security_cli
from appliance.tools import cli as tools_cli

if TYPE_CHECKING:
    from appliance.config import Config


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="appliance", description="Edge AI appliance runtime: serve models on the LAN."
    )
    parser.add_argument("--version", action="version", version=f"appliance {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = sub.add_parser("run", help="serve models over HTTP (the daemon)")
    _config_flags(run)
    _listen_flags(run)
    run.add_argument(
        "--config-error",
        type=Path,
        metavar="FILE",
        help="a configuration problem found before this start, if the file "
        "exists (the device image's first boot writes one for a rejected "
        "boot-partition appliance.toml): logged and shown in /health",
    )

    check = sub.add_parser("config", help="validate the configuration and print it resolved")
    _config_flags(check)
    shown = check.add_mutually_exclusive_group()
    shown.add_argument(
        "--toml",
        action="store_true",
        help="print TOML that can be saved as appliance.toml (default: JSON)",
    )
    shown.add_argument(
        "--reference", action="store_true", help="print the Markdown reference of every key instead"
    )

    models = sub.add_parser("models", help="list the models the configuration would serve")
    _config_flags(models)
    models.add_argument("--json", action="store_true", help="print JSON")
    tools_cli.add_quantize(models.add_subparsers(dest="models_command", metavar="SUBCOMMAND"))
    backup_cli.add_parsers(sub, _config_flags)
    discover_cli.add_parser(sub)
    hub_cli.add_parser(sub)
    security_cli.add_parsers(sub)
    service_cli.add_parser(sub)
    return parser


def _config_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", type=Path, metavar="FILE", help="appliance.toml (default: $APPLIANCE_CONFIG)"
    )
    parser.add_argument(
        "--models-dir", type=Path, metavar="DIR", help="model repository (models.dir)"
    )
    parser.add_argument(
        "--model",
        type=Path,
        action="append",
        metavar="FILE",
        default=None,
        help="serve this .gguf or .onnx file directly; repeatable (models.files)",
    )
    parser.add_argument(
        "--log-level", choices=["debug", "info", "warning", "error"], help="logging.level"
    )


def _listen_flags(parser: argparse.ArgumentParser) -> None:
    """Where the daemon listens: only ``run`` binds anything."""
    parser.add_argument("--host", help="address to bind (http.host)")
    parser.add_argument("--port", type=int, help="HTTP port, 0 for any free one (http.port)")


def _overrides(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    pairs = {
        ("http", "host"): getattr(args, "host", None),
        ("http", "port"): getattr(args, "port", None),
        ("models", "dir"): args.models_dir,
        ("models", "files"): args.model,
        ("logging", "level"): args.log_level,
    }
    out: dict[str, dict[str, Any]] = {}
    for (section, key), value in pairs.items():
        if value is not None:
            out.setdefault(section, {})[key] = value
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    if args.command == "discover":
        return discover_cli.run(args)
    if args.command == "hub":
        return hub_cli.run(args)
    if args.command in ("certs", "keys"):
        return security_cli.run(args)
    if args.command == "service":
        return service_cli.run(args)
    if args.command in ("backup", "restore"):
        from appliance import config as config_mod

        return backup_cli.run(
            args,
            lambda: config_mod.load(path=args.config, env=os.environ, overrides=_overrides(args)),
        )
    if args.command == "models" and args.models_command == "quantize":
        return tools_cli.run_quantize(args)
    if args.command == "run":
        from appliance.ops import memory

        memory.limit_arenas()  # before any thread starts: see appliance/ops/memory.py
        _load_llama_first()
    # The configuration models (pydantic) load only now: ``--help`` stays quick.
    from appliance import config as config_mod

    if args.command == "config" and args.reference:
        print(config_mod.reference(), end="")
        return 0
    from appliance.config.remote import DROPIN_NAME
    from appliance.ops.instance import state_directory

    # The hub's configuration drop-in (docs/hub.md), read after appliance.toml.
    dropin = state_directory(os.environ) / DROPIN_NAME
    dropin_error = None
    try:
        try:
            cfg = config_mod.load(
                path=args.config, env=os.environ, overrides=_overrides(args), dropin=dropin
            )
        except ConfigError as exc:
            if not dropin.exists():
                raise
            # A drop-in this daemon cannot take never keeps it from starting: it runs on
            # the operator's own configuration and says why in /health.
            cfg = config_mod.load(path=args.config, env=os.environ, overrides=_overrides(args))
            dropin_error = f"the hub's configuration drop-in is ignored: {exc}"
            print(f"appliance: {dropin_error}", file=sys.stderr)
    except ConfigError as exc:
        print(f"appliance: {exc}", file=sys.stderr)
        return 2

    if args.command == "config":
        header = (
            "# appliance.toml: the resolved configuration (appliance config --toml);\n"
            "# keep the keys you want to pin, delete the rest to follow the defaults."
        )
        print(
            config_mod.to_toml(cfg, header=header)
            if args.toml
            else json.dumps(cfg.model_dump(mode="json"), indent=2)
        )
        return 0
    if args.command == "models":
        return _list_models(cfg, as_json=args.json)

    from appliance import server
    from appliance.ops import instance, logs

    logs.setup(cfg.logging.level)
    config_error = _config_error(args.config_error) or dropin_error
    try:
        # One daemon per state directory: it holds the outbox, the key and the MQTT session.
        with instance.StateLock(instance.state_directory(os.environ)):
            # SIGHUP reads the configuration again, from the same sources, for the API keys.
            return server.run(
                cfg,
                load_config=lambda: config_mod.load(
                    path=args.config, env=os.environ, overrides=_overrides(args), dropin=dropin
                ),
                config_error=config_error,
                config_path=args.config
                or (
                    Path(os.environ["APPLIANCE_CONFIG"])
                    if os.environ.get("APPLIANCE_CONFIG")
                    else None
                ),
            )
    except instance.AlreadyRunning as exc:
        print(f"appliance: {exc}", file=sys.stderr)
        return 1


def _env_path(name: str) -> Path | None:
    value = os.environ.get(name)
    return Path(value) if value else None


def _config_error(path: Path | None) -> str | None:
    """The text of ``--config-error FILE``, logged once; None when there is none."""
    if path is None:
        return None
    try:
        text = path.read_text(encoding="utf-8", errors="replace").strip()
    except FileNotFoundError:
        return None
    except OSError as exc:
        text = f"cannot read {path}: {exc}"
    if text:
        logging.getLogger("appliance").error("configuration problem: %s", text)
    return text or None


def _load_llama_first() -> None:
    """Load llama.cpp's libraries before anything imports numpy.

    A CUDA build of llama-cpp-python 0.3.36 crashed loading every model when numpy (2.5)
    had been imported first, and loaded them when imported in this order (seen on an
    NVIDIA H100 box). The default models include a GGUF one, so the daemon imports
    llama_cpp anyway. Without llama-cpp-python, or with one whose libraries cannot load
    (libgomp missing, say), this does nothing: the GGUF models then fail to load and say
    why, and the rest is served.
    """
    import importlib.util

    if "numpy" in sys.modules or importlib.util.find_spec("llama_cpp") is None:
        return
    try:
        import llama_cpp  # noqa: F401
    except Exception:  # reported, with its reason, by the first GGUF model that loads
        return


def _list_models(cfg: Config, *, as_json: bool) -> int:
    from appliance.core.repository import collect

    specs = collect(cfg.models.dir, cfg.models.files)
    rows: list[dict[str, Any]] = [
        {
            "name": s.name,
            "version": s.version,
            "runtime": s.runtime,
            "file": str(s.path),
            "size_bytes": _size(s.path),
            "description": s.description,
            "problem": s.problem,
        }
        for s in specs
    ]
    if as_json:
        print(json.dumps(rows, indent=2))
        return 1 if any(r["problem"] for r in rows) else 0
    if not rows:
        print(f"no models in {cfg.models.dir} and none given with --model")
        return 0
    width = max(len(r["name"]) for r in rows) + 2
    print(f"{'NAME':<{width}}{'RUNTIME':<9}{'VERSION':<9}{'SIZE':>9}  FILE")
    for row in rows:
        size = _human(row["size_bytes"]) if row["size_bytes"] is not None else "-"
        print(
            f"{row['name']:<{width}}{row['runtime']:<9}{row['version']:<9}{size:>9}  {row['file']}"
        )
        if row["problem"]:
            print(f"{'':<{width}}INVALID: {row['problem']}")
    return 1 if any(r["problem"] for r in rows) else 0


def _size(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except OSError:  # a missing file: its problem says so
        return None


def _human(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")
