"""`syncpro ctl`: send one request to the daemon's control socket and print its answer."""

from __future__ import annotations

import argparse
import json
import socket
import struct
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from syncpro.config.load import control_socket_of, find_config, load_config
from syncpro.config.model import ControlSettings
from syncpro.control.dispatch import exit_code, render
from syncpro.control.protocol import (
    DIFF_ACTION,
    HEALTH_ACTION,
    MAX_REQUEST,
    NEEDS_K,
    RELOAD_ACTION,
    STATUS_ACTION,
)
from syncpro.engine.request import SYNC_ACTION
from syncpro.errors import ConfigError, ControlError, ExitCode

ACTIONS = {
    "sync": SYNC_ACTION,
    "diff": DIFF_ACTION,
    "status": STATUS_ACTION,
    "reload": RELOAD_ACTION,
    "health": HEALTH_ACTION,
}
DEFAULT_TIMEOUT = 600.0
_TIMEVAL = struct.Struct("@ll")  # struct timeval: time_t tv_sec; suseconds_t tv_usec
_MIN_WAIT = 0.001
_MAX_WAIT = float(2**31 - 1)


def add_ctl_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Given the `syncpro` command's subparsers, add `ctl` to them."""
    ctl = subparsers.add_parser(
        "ctl",
        help="drive the running daemon through its control socket",
        description="Send one request to the daemon's control socket and print the response"
        " JSON. Exit 0 when it succeeded; 1 when the sync ran unsuccessfully, an app's last"
        " sync failed (status), the daemon is unhealthy (health) or the reload failed; 2 when"
        " the request was refused or the daemon cannot be reached.",
        usage="syncpro ctl [sync|diff] -k K [--update]"
        " | syncpro ctl {status,reload,health} [options]",
    )
    ctl.add_argument(
        "ctl_action",
        nargs="?",
        choices=tuple(ACTIONS),
        default="sync",
        metavar="ACTION",
        help="sync (the default), diff (what a sync would change), status, reload (waits for"
        " its outcome) or health (exit 1 when unhealthy)",
    )
    ctl.add_argument("-k", help="app keys, group names (local_name) or all")
    ctl.add_argument(
        "--update", action="store_true", help="sync from updatedir (default: remotecomdir)"
    )
    ctl.add_argument(
        "--config",
        metavar="PATH",
        help="config file naming control.socket (default: $SYNCPRO_CONFIG, ./config.yml,"
        " /etc/syncpro/config.yml)",
    )
    ctl.add_argument("--socket", metavar="PATH", help="the control socket (overrides --config)")
    ctl.add_argument("--pretty", action="store_true", help="indent the response JSON")
    ctl.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        metavar="SECONDS",
        help=f"how long to wait for the answer (default {DEFAULT_TIMEOUT:g})",
    )


def run_ctl(args: argparse.Namespace) -> ExitCode:
    """Given the parsed `ctl` arguments, send the request, print the response document and
    return the exit code: 0 success, 1 sync unsuccessful, 2 refused or daemon unreachable."""
    action = ACTIONS[args.ctl_action]
    if action in NEEDS_K and not (args.k or "").strip():
        return _fail(f"ctl {args.ctl_action} needs -k: an app_key, a local_name or all")
    if action not in NEEDS_K and (args.k is not None or args.update):
        return _fail(f"ctl {args.ctl_action} takes no -k or --update")
    try:
        path = socket_path(args.socket, args.config)
    except ConfigError as exc:
        return _fail(str(exc))
    fields = {"action": action}
    if action in NEEDS_K:
        fields.update(k=args.k, update="1" if args.update else "0")
    try:
        doc = send_request(path, fields, args.timeout)
    except ControlError as exc:
        return _fail(str(exc))
    print_document(doc, args.pretty)
    code = exit_code(doc, action)
    if code is not ExitCode.OK and action in (RELOAD_ACTION, HEALTH_ACTION) and doc.get("msg"):
        print(f"syncpro ctl: {doc['msg']}", file=sys.stderr)
    return code


def socket_path(explicit: str | None, config: str | None) -> Path:
    """Given --socket and --config, return the control socket's path: --socket, else the
    config's control.socket, else (no config file anywhere) the default. Raise ConfigError if
    the config is invalid."""
    if explicit:
        return Path(explicit)
    try:
        found = find_config(config)
    except ConfigError:
        return ControlSettings().socket
    try:
        return load_config(found).control.socket
    except ConfigError as exc:
        fallback = control_socket_of(found)
        if fallback is None:
            raise
        print(f"syncpro ctl: {exc}; trying its control.socket {fallback}", file=sys.stderr)
        return fallback


def send_request(path: Path, fields: dict[str, str], timeout: float) -> dict[str, Any]:
    """Given the socket path and the request's fields, send them as one JSON line and return
    the response document. Raise ControlError, naming the path, when the daemon cannot be
    reached, does not answer within `timeout` s, or answers something else."""
    line = json.dumps(fields, ensure_ascii=False).encode("utf-8") + b"\n"
    if len(line) > MAX_REQUEST:
        raise ControlError(f"request over {MAX_REQUEST // 1024} KiB: shorten -k")
    deadline = time.monotonic() + timeout
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        try:
            _connect(sock, path, timeout)
            sock.settimeout(max(deadline - time.monotonic(), _MIN_WAIT))
            sock.sendall(line)
            reply = _read_line(sock, deadline)
        except FileNotFoundError:
            raise ControlError(
                f"no control socket at {path}: the daemon is not running"
                " (start it with syncpro serve) or control.socket names another path"
            ) from None
        except ConnectionRefusedError:
            raise ControlError(
                f"the daemon is not running: nothing listens on the control socket {path}"
            ) from None
        except PermissionError:
            raise ControlError(
                f"permission denied on the control socket {path}: run as a user that"
                " control.mode and control.group let in"
            ) from None
        except TimeoutError:
            raise ControlError(
                f"no answer from the daemon on the control socket {path} within {timeout:g} s"
            ) from None
        except OSError as exc:
            raise ControlError(
                f"cannot talk to the daemon on the control socket {path}: {exc.strerror or exc}"
            ) from None
    if not reply:
        raise ControlError(f"the daemon closed the control socket {path} without answering")
    try:
        doc = json.loads(reply)
    except ValueError:
        doc = None
    if not isinstance(doc, dict):
        raise ControlError(
            f"the daemon on the control socket {path} answered something that is not a"
            " response document"
        )
    return doc


def _connect(sock: socket.socket, path: Path, timeout: float) -> None:
    """Connect to the control socket, waiting up to `timeout` s for room in its queue.
    Raise ControlError if the queue stayed full that long, OSError if connect() fails."""
    # settimeout() would make the socket non-blocking, and a non-blocking AF_UNIX connect()
    # fails with EAGAIN at once while the daemon's listen queue is full (a burst of clients).
    # A blocking connect() waits for room, bounded by the socket's send timeout.
    wait = min(max(timeout, _MIN_WAIT), _MAX_WAIT)  # a timeval of 0 would mean for ever
    seconds = int(wait)
    micro = int((wait - seconds) * 1_000_000)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _TIMEVAL.pack(seconds, micro))
    try:
        sock.connect(str(path))
    except BlockingIOError:
        raise ControlError(
            f"the daemon is busy: no room in the queue of the control socket {path} within"
            f" {timeout:g} s; retry later"
        ) from None


def _read_line(sock: socket.socket, deadline: float) -> bytes:
    buffer = bytearray()
    while b"\n" not in buffer:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError
        sock.settimeout(remaining)
        chunk = sock.recv(1 << 16)
        if not chunk:
            break
        buffer += chunk
    return bytes(buffer.partition(b"\n")[0])


def print_document(doc: Mapping[str, Any], pretty: bool) -> None:
    """Print an answer on stdout: indented when asked or on a terminal, else one line."""
    print(render(doc, pretty=pretty or sys.stdout.isatty()), flush=True)


def _fail(message: str) -> ExitCode:
    print(f"syncpro ctl: {message}", file=sys.stderr)
    return ExitCode.USAGE
