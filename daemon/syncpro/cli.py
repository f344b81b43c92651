"""The `syncpro` command line: a thin shell over the engine, the daemon and the client."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from syncpro import __version__
from syncpro.config.load import load_config
from syncpro.config.model import Config
from syncpro.errors import ConfigError, RequestError, SyncproError

EXIT_OK, EXIT_UNSUCCESSFUL, EXIT_USAGE = 0, 1, 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="syncpro",
        description="Publish builds and downloaded programs atomically into pending-release"
        " directories (the Deploy:Core:syncpro action).",
    )
    parser.add_argument("--version", action="version", version=f"syncpro {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def with_config(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument(
            "--config",
            metavar="PATH",
            help="config file (default: $SYNCPRO_CONFIG, ./config.yml, /etc/syncpro/config.yml)",
        )
        p.add_argument("-v", "--verbose", action="store_true", help="log debug events too")
        return p

    sync = with_config(sub.add_parser("sync", help="sync apps once, print the response JSON"))
    sync.add_argument("-k", required=True, help="app keys, group names (local_name) or all")
    sync.add_argument(
        "--update", action="store_true", help="sync from updatedir (default: remotecomdir)"
    )
    sync.add_argument("--pretty", action="store_true", help="indent the response JSON")
    sync.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        help="log only warnings and errors on stderr (stdout has the document anyway)",
    )

    with_config(sub.add_parser("check-config", help="validate the config and summarise it"))
    with_config(sub.add_parser("serve", help="run the daemon: watch, debounce, sync, serve"))

    from syncpro.control.client import add_ctl_parser

    add_ctl_parser(sub)

    imp = sub.add_parser(
        "import-config", help="print a syncpro config.yml made from the original platform's"
    )
    imp.add_argument("path", help="the original platform's config/config.yml")
    imp.add_argument("--base", help="the original install dir (default: the file's grandparent)")
    imp.add_argument("--env", help="the environment section (default: the file's env.key)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit code (0 ok, 1 unsuccessful, 2 usage or config)."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "sync":
            return _sync(args)
        if args.command == "check-config":
            return _check_config(args)
        if args.command == "serve":
            return _serve(args)
        if args.command == "ctl":
            from syncpro.control.client import run_ctl

            return run_ctl(args)
        if args.command == "import-config":
            return _import_config(args)
    except ConfigError as exc:
        print(f"syncpro: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except SyncproError as exc:  # inventory, request, control socket, startup
        print(f"syncpro: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    raise AssertionError(f"unhandled command {args.command}")


def _sync(args: argparse.Namespace) -> int:
    from syncpro import log
    from syncpro.control.client import print_document
    from syncpro.engine.publish import sweep_later
    from syncpro.engine.request import SYNC_ACTION, SyncRequest, split_k, validate_k
    from syncpro.engine.response import refusal_document, response_document
    from syncpro.engine.sync import run_sync
    from syncpro.inventory.source import load_inventory

    config = load_config(args.config)
    # stdout carries the response document alone; log events go to stderr.
    log.configure(sys.stderr, verbose=args.verbose, quiet=args.quiet)
    try:
        k = validate_k(args.k)
    except RequestError as exc:
        # Refused as the socket and HTTP refuse it: a document saying why, and nothing runs.
        normalised = " ".join(split_k(args.k))
        param = {"action": SYNC_ACTION, "k": normalised, "update": "1" if args.update else "0"}
        print_document(refusal_document(param, str(exc)), args.pretty)
        raise
    inventory = load_inventory(config.inventory, config.config_inventory)
    result = run_sync(SyncRequest(k=k, update=args.update, origin="cli"), config, inventory)
    print_document(response_document(result), args.pretty)
    sweep_later([config.dirs.softdir, config.dirs.configuredir])
    return EXIT_OK if result.ok else EXIT_UNSUCCESSFUL


def _serve(args: argparse.Namespace) -> int:
    from syncpro import log
    from syncpro.daemon.service import serve

    load_config(args.config)  # a broken config is one message and exit 2, before logging
    log.configure(sys.stdout, verbose=args.verbose)
    log.capture_warnings()
    return serve(args.config)


def _import_config(args: argparse.Namespace) -> int:
    from syncpro import log
    from syncpro.config.import_original import import_original_config

    log.configure(sys.stderr)  # stdout carries the generated config alone
    base = Path(args.base) if args.base else None
    print(import_original_config(Path(args.path), base, args.env), end="")
    return EXIT_OK


def _check_config(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    print(summary(config))
    return EXIT_OK


def _missing(path: Path, then: str) -> str:
    # A typo in a dir is valid config; seen here, it is not silently created and published to.
    return "" if path.is_dir() else f"   (missing: {then}; a typo?)"


def summary(config: Config) -> str:
    dirs = config.dirs
    lines = [
        f"config {config.path}: valid",
        f"  remotecomdir  {dirs.remotecomdir}{_missing(dirs.remotecomdir, 'nothing to sync')}",
        f"  updatedir     {dirs.updatedir}{_missing(dirs.updatedir, 'nothing to sync')}",
        f"  softdir       {dirs.softdir}{_missing(dirs.softdir, 'made at the first sync')}",
        f"  configuredir  {dirs.configuredir}"
        f"{_missing(dirs.configuredir, 'made at the first sync')}",
        f"  state         {dirs.state}",
        f"  inventory     {config.inventory.source}",
    ]
    if config.inventory.source == "config":
        groups = sorted({app.local_name for app in config.apps})
        auto = sum(app.auto_deploy for app in config.apps)
        lines.append(
            f"  apps          {len(config.apps)} ({auto} auto-deploy) in {len(groups)} groups:"
            f" {', '.join(groups)}"
        )
    lines.append(f"  control       {config.control.socket}")
    lines.append(f"  http          {'on ' + config.http.listen if config.http.enabled else 'off'}")
    return "\n".join(lines)
