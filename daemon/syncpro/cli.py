"""The `syncpro` command line: a thin shell over the engine, the daemon and the client."""

from __future__ import annotations

import argparse
import difflib
import io
import json
import os
import shutil
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, TextIO, cast

from syncpro import __version__
from syncpro.config.load import load_config
from syncpro.config.model import Config
from syncpro.errors import ConfigError, ExitCode, RequestError, SyncproError
from syncpro.inventory.apps import Inventory
from syncpro.log import FORMATS, is_terminal, logger

if TYPE_CHECKING:
    from syncpro.engine.result import SyncResult


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="syncpro",
        description="Publish builds and downloaded programs atomically into pending-release"
        " directories (the Deploy:Core:syncpro action). Exit 0 when all went well, 1 when a"
        " sync was unsuccessful, 2 for a usage or config error.",
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
        p.add_argument(
            "--log-format",
            choices=FORMATS,
            help="how log events are written (default: console on a terminal, else JSON lines)",
        )
        return p

    sync = with_config(
        sub.add_parser(
            "sync",
            help="sync apps once; a line per target on a terminal, else the response JSON",
        )
    )
    sync.add_argument("-k", required=True, help="app keys, group names (local_name) or all")
    sync.add_argument(
        "--update", action="store_true", help="sync from updatedir (default: remotecomdir)"
    )
    sync.add_argument(
        "--json",
        action="store_true",
        help="print the response JSON even on a terminal (it is printed anyway when piped)",
    )
    sync.add_argument(
        "--pretty", action="store_true", help="indent the response JSON (implies --json)"
    )
    sync.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        help="log only warnings and errors on stderr (stdout has the result anyway)",
    )

    check = with_config(
        sub.add_parser(
            "check-config",
            help="validate the config, summarise it and check this host can run it",
            description="Validate the config and check what it needs on this host: source"
            " folders readable, target folders writable, the files it names readable. Exit 0"
            " when all checks pass or warn, 1 when one failed, 2 when the config is invalid.",
        )
    )
    check.add_argument(
        "--strict", action="store_true", help="a missing folder fails the check, not just warns"
    )
    check.add_argument(
        "--connect",
        action="store_true",
        help="also read the inventory: reach the database and read its table",
    )
    check.add_argument("--json", action="store_true", help="print the result as one JSON document")
    check.add_argument(
        "--keys",
        action="store_true",
        help="print every config key with its default and meaning, and the environment"
        " variables read; no config needed",
    )
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
    """Run the command line; return its ExitCode (0 ok, 1 unsuccessful, 2 usage or config)."""
    try:
        try:
            return _main(argv)
        finally:
            # A reader that went away (`| head`) shows here, not as a traceback at exit.
            sys.stdout.flush()
    except BrokenPipeError:
        _detach_stdout()
        return ExitCode.BROKEN_PIPE


def _main(argv: Sequence[str] | None) -> int:
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
    except SyncproError as exc:  # config, inventory, request, control socket, startup
        print(f"syncpro: {exc}", file=sys.stderr)
        return ExitCode.USAGE
    except KeyboardInterrupt:
        return ExitCode.INTERRUPTED
    raise AssertionError(f"unhandled command {args.command}")


def _detach_stdout() -> None:
    # What is still buffered for the closed pipe goes to /dev/null, so that the interpreter's
    # last flush does not print "Exception ignored ... BrokenPipeError" on the way out.
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, io.UnsupportedOperation):
        pass  # stdout is not a file (a test's capture): nothing will flush it at exit


def did_you_mean(token: str, inventory: Inventory) -> str:
    """Given a token of `k` that selected nothing, return a hint for the message: the closest
    app keys and groups, or why a known app is not selected; "" when there is none."""
    if token in inventory.by_key() or inventory.group(token):
        return " (not auto-deploy: only auto-deploy apps are synced)"
    names = sorted(
        {"all"} | {a.app_key for a in inventory.apps} | {a.local_name for a in inventory.apps}
    )
    close = difflib.get_close_matches(token, names, n=3, cutoff=0.6)
    return f" (did you mean {' or '.join(close)}?)" if close else ""


def _sync(args: argparse.Namespace) -> int:
    from syncpro import log
    from syncpro.control.client import print_document
    from syncpro.engine.publish import sweep_later
    from syncpro.engine.request import SYNC_ACTION, SyncRequest, split_k, validate_k
    from syncpro.engine.response import refusal_document, response_document
    from syncpro.engine.sync import run_sync
    from syncpro.inventory.source import load_inventory

    config = load_config(args.config)
    as_json = args.json or args.pretty or not is_terminal(sys.stdout)
    # A person watching: a progress line on stderr, which log lines erase before they print.
    progress = ProgressLine(sys.stderr) if is_terminal(sys.stderr) and not args.quiet else None
    # stdout carries the result alone; log events go to stderr.
    log.configure(
        cast(TextIO, progress) if progress is not None else sys.stderr,
        verbose=args.verbose,
        quiet=args.quiet,
        fmt=args.log_format,
    )
    try:
        k = validate_k(args.k)
    except RequestError as exc:
        # Refused as the socket and HTTP refuse it: a document saying why, and nothing runs.
        normalised = " ".join(split_k(args.k))
        param = {"action": SYNC_ACTION, "k": normalised, "update": "1" if args.update else "0"}
        if as_json:
            print_document(refusal_document(param, str(exc)), args.pretty)
        raise
    inventory = load_inventory(config.inventory, config.config_inventory)
    try:
        request = SyncRequest(k=k, update=args.update, origin="cli")
        result = run_sync(request, config, inventory, progress)
    finally:
        if progress is not None:
            progress.clear()
    # Before printing: a reader gone away (`| head`) must not leave replaced trees behind.
    try:
        sweep_later([config.dirs.softdir, config.dirs.configuredir])
    except OSError as exc:  # a target root that is not a folder: the result says so already
        logger().warning("cli.sweep_not_started", error=str(exc))
    if as_json:
        print_document(response_document(result), args.pretty)
    else:
        _print_summary(result, inventory)
    if result.unknown and not result.apps:
        hints = ", ".join(f"{t!r}{did_you_mean(t, inventory)}" for t in result.unknown)
        raise RequestError(f"-k selects no app: no app or group {hints}")
    if as_json:  # on a terminal the summary named them already
        for token in result.unknown:
            hint = did_you_mean(token, inventory).strip(" ()")
            logger().warning("cli.unknown_key", token=token, hint=hint)
    return ExitCode.OK if result.ok else ExitCode.UNSUCCESSFUL


class ProgressLine(io.TextIOBase):
    """`syncpro sync`'s line on a terminal: files and bytes built of the total and the rate,
    redrawn at most five times a second and erased when the sync ends. It is the log stream
    too: a log line erases it first, and it is drawn again below at the next file."""

    def __init__(self, stream: TextIO, interval: float = 0.2) -> None:
        super().__init__()
        self.stream = stream
        self.interval = interval
        from syncpro.engine.tree import Tally  # the engine is imported when a sync runs

        self.tally = Tally()
        self._started = time.monotonic()
        self._next = 0.0
        self._shown = False
        self._lock = threading.Lock()

    def __call__(self, event: str, files: int, size: int) -> None:
        """The engine's Progress: ("planned" | "copied" | "linked", files, bytes)."""
        with self._lock:
            if not self.tally.count(event, files, size):
                return
            now = time.monotonic()
            if now >= self._next:
                self._next = now + self.interval
                self._draw(now)

    def text(self, now: float) -> str:
        from syncpro.summary import human_bytes

        done = self.tally
        rate = done.bytes_done / max(now - self._started, 1e-3)
        return (
            f"syncing: {done.files_done}/{done.files_total} files,"
            f" {human_bytes(done.bytes_done)} of {human_bytes(done.bytes_total)},"
            f" {human_bytes(int(rate))}/s"
        )

    def _draw(self, now: float) -> None:
        width = max(20, shutil.get_terminal_size().columns - 1)
        self.stream.write("\r\x1b[K" + self.text(now)[:width])
        self.stream.flush()
        self._shown = True

    def clear(self) -> None:
        """Erase the line, if it is shown."""
        if self._shown:
            self._shown = False
            self.stream.write("\r\x1b[K")
            self.stream.flush()

    def write(self, text: str) -> int:
        with self._lock:
            self.clear()
            return self.stream.write(text)

    def flush(self) -> None:
        self.stream.flush()

    def isatty(self) -> bool:
        return self.stream.isatty()


def _print_summary(result: SyncResult, inventory: Inventory) -> None:
    from syncpro.summary import summary_lines

    for line in summary_lines(result, lambda token: did_you_mean(token, inventory)):
        print(line)


def _serve(args: argparse.Namespace) -> int:
    from syncpro import log
    from syncpro.daemon.service import serve

    load_config(args.config)  # a broken config is one message and exit 2, before logging
    log.configure(sys.stdout, verbose=args.verbose, fmt=args.log_format)
    log.capture_warnings()
    return serve(args.config)


def _import_config(args: argparse.Namespace) -> int:
    from syncpro import log
    from syncpro.config.import_original import import_original

    log.configure(sys.stderr)  # stdout carries the generated config alone
    base = Path(args.base) if args.base else None
    imported = import_original(Path(args.path), base, args.env)
    print(imported.text, end="")
    # What was read and left out, for the person at the terminal; the file carries it too.
    for note in imported.notes():
        print(f"syncpro import-config: {note}", file=sys.stderr)
    return ExitCode.OK


def _check_config(args: argparse.Namespace) -> int:
    from syncpro import log
    from syncpro.config.preflight import FAILED, OK, preflight

    if args.keys:
        print(describe_all())
        return ExitCode.OK
    log.configure(sys.stderr, verbose=args.verbose, quiet=True, fmt=args.log_format)
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        if not args.json:
            raise
        doc = {"config": exc.path, "valid": False, "ok": False, "problems": exc.problems}
        print(json.dumps(doc, ensure_ascii=False, indent=2))
        return ExitCode.USAGE
    checks = preflight(config, strict=args.strict, connect=args.connect)
    ok = all(check.status != FAILED for check in checks)
    if args.json:
        doc = {
            "config": str(config.path),
            "valid": True,
            "ok": ok,
            "checks": [check.as_dict() for check in checks],
        }
        print(json.dumps(doc, ensure_ascii=False, indent=2))
    else:
        print(summary(config))
        # A missing folder is marked in the summary above already; other news is listed here.
        notes = [
            check
            for check in checks
            if (check.status == FAILED or (check.status != OK and "missing" not in check.message))
            or (check.key == "inventory" and args.connect)
        ]
        width = max((len(check.key) for check in notes), default=0)
        for check in notes:
            print(f"  {check.status:<8} {check.key:<{width}}  {check.message}")
        failed = sum(check.status == FAILED for check in checks)
        warned = sum(check.status not in (OK, FAILED) for check in checks)
        verdict = f"{failed} failed" if failed else "ready to run"
        print(f"preflight: {verdict}" + (f" ({warned} warnings)" if warned else ""))
    return ExitCode.OK if ok else ExitCode.UNSUCCESSFUL


def _default_text(value: object) -> str:
    from syncpro.config.schema import REQUIRED

    if value is REQUIRED:
        return "(required)"
    if value is None:
        return "(none)"
    if value == "":
        return '""'
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple):
        return "[" + ", ".join(map(str, value)) + "]"
    return str(value)


def describe_all() -> str:
    """Return every config key with its default and meaning, then the environment variables."""
    from syncpro.config.environment import VARIABLES
    from syncpro.config.schema import describe_keys

    rows = [(key, _default_text(default), doc) for key, doc, default in describe_keys()]
    key_width = max(len(key) for key, _, _ in rows)
    lines = [
        f"{key:<{key_width}}  {default}\n{'':<{key_width}}  {doc}" for key, default, doc in rows
    ]
    lines.append("")
    lines += [f"${v.name:<{key_width - 1}}  {v.doc}" for v in VARIABLES]
    return "\n".join(lines)


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
    lines.append(f"  monitor       {config.monitor.listen or 'off'}")
    return "\n".join(lines)
