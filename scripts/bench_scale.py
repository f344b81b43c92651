"""Measure `syncpro serve` on a deploy host's scale: 1,000 apps of 100 files each.

Builds the tree under a temporary dir (`--apps` apps, `--files` files each in `--folders`
folders, `--size` bytes per file: 100,000 files in 6,000 folders, about 200 MB by default),
then runs the real daemon on it and reports, from one run:

  ready (first start)   seconds from launch to READY=1 (sd_notify), with no state yet
  catch-up              seconds from launch until every app is published, against
                        `cp -a` of the same sources followed by `sync -f` (the same durability
                        as publish.fsync), measured in the same run; dirty data is flushed
                        (untimed `sync`) before each contender
  idle CPU              the daemon's CPU over `--idle` seconds with nothing arriving, once its
                        catch-up and grace sweeps are done, in % of one core
  RSS                   the daemon's resident memory then
  upload latency        one app's upload (`rsync -a` of its tree with one file changed) until
                        the new content is readable in the published tree, minus settle;
                        median of `--uploads`
  200 apps changed      one file rewritten in each of `--changed` apps at once: how many syncs
                        follow (one per app is the goal)
  ready (restart)       seconds from launch to READY=1 with the state of the first run
  restart syncs         syncs run by a restart with nothing changed (0 is the goal)

A table by default; `--json` prints one JSON document. Run it with the project's venv python:
`.venv/bin/python scripts/bench_scale.py [--json] [--apps N]`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
Event = dict[str, Any]


class BenchError(Exception):
    """The daemon misbehaved or a wait ran out: the figures would mean nothing."""


class Daemon:
    """`syncpro serve` as a subprocess, with its JSON log and its sd_notify messages."""

    def __init__(self, python: str, config: Path) -> None:
        self.notify_path = config.parent / "notify.sock"
        with contextlib.suppress(FileNotFoundError):
            self.notify_path.unlink()
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(str(self.notify_path))
        self.notify.settimeout(0.2)
        self.events: list[Event] = []
        self.ready_at: float | None = None
        self._cond = threading.Condition()
        env = {**os.environ, "NOTIFY_SOCKET": str(self.notify_path)}
        self.launched = time.monotonic()
        self.proc = subprocess.Popen(
            [python, "-m", "syncpro", "serve", "--config", str(config)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=config.parent,
        )
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._read_log, daemon=True),
            threading.Thread(target=self._read_notify, daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    def _read_log(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with contextlib.suppress(ValueError), self._cond:
                event = json.loads(line)
                event["_at"] = time.monotonic()
                self.events.append(event)
                self._cond.notify_all()

    def _read_notify(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.notify.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            if b"READY=1" in data.split(b"\n") and self.ready_at is None:
                with self._cond:
                    self.ready_at = time.monotonic()
                    self._cond.notify_all()

    def find(self, name: str) -> list[Event]:
        with self._cond:
            return [e for e in self.events if e.get("event") == name]

    def wait(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate():
                if self.proc.poll() is not None:
                    raise BenchError(f"the daemon exited ({self.proc.returncode}) before {what}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise BenchError(f"timed out waiting for {what}")
                self._cond.wait(min(left, 0.2))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._stop.set()
        for thread in self._threads:
            thread.join(10)
        self.notify.close()
        with contextlib.suppress(FileNotFoundError):
            self.notify_path.unlink()


def cpu_seconds(pid: int) -> float:
    text = Path(f"/proc/{pid}/stat").read_text(encoding="ascii")
    fields = text[text.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text(encoding="ascii").splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise BenchError("no VmRSS")


def key(i: int) -> str:
    return f"app{i:04d}"


def build(base: Path, args: argparse.Namespace) -> Path:
    """Write the sources and the config; return the config's path."""
    payload = os.urandom(args.size)
    for i in range(args.apps):
        app = base / "r/softdir" / key(i)
        for f in range(args.files):
            folder = app / f"d{f % args.folders}"
            if f < args.folders:
                folder.mkdir(parents=True)
            (folder / f"f{f:03d}.dat").write_bytes(payload[: args.size - 8] + f"{i:08d}".encode())
    doc = {
        "dirs": {
            n: str(base / s)
            for n, s in (
                ("remotecomdir", "r"),
                ("updatedir", "u"),
                ("softdir", "soft"),
                ("configuredir", "conf"),
                ("state", "state"),
            )
        },
        "publish": {"grace": args.grace, "fsync": args.fsync},
        "watch": {"settle": args.settle},
        "control": {"socket": str(base / "run/control.sock")},
        "apps": [{"app_key": key(i), "local_name": key(i)} for i in range(args.apps)],
    }
    config = base / "config.yml"
    config.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    return config


def flush() -> None:
    subprocess.run(["sync"], check=True)


def baseline(base: Path) -> float:
    """Seconds of `cp -a` of all sources and `sync -f` of the copy."""
    copy = base / "cp-copy"
    flush()
    started = time.monotonic()
    subprocess.run(["cp", "-a", str(base / "r/softdir"), str(copy)], check=True)
    subprocess.run(["sync", "-f", str(copy)], check=True)
    seconds = time.monotonic() - started
    shutil.rmtree(copy)
    return seconds


def trash_empty(base: Path) -> bool:
    trash = base / "soft/.syncpro/trash"
    return not trash.is_dir() or not any(trash.iterdir())


def quiet(daemon: Daemon, seconds: float) -> None:
    """Wait until the daemon has logged nothing for `seconds`."""
    while True:
        last = daemon.events[-1]["_at"] if daemon.events else daemon.launched
        left = last + seconds - time.monotonic()
        if left <= 0:
            return
        time.sleep(left)


def published(target: Path, content: bytes) -> bool:
    try:
        return target.read_bytes() == content
    except OSError:
        return False


def run(base: Path, args: argparse.Namespace, say: Callable[[str], None]) -> dict[str, Any]:
    say(f"building {args.apps} apps x {args.files} files under {base}")
    config = build(base, args)
    say("timing cp -a + sync -f of the same sources")
    cp_seconds = baseline(base)
    doc: dict[str, Any] = {
        "apps": args.apps,
        "files_per_app": args.files,
        "settle": args.settle,
        "fsync": args.fsync,
        "cp_a_sync_f_seconds": round(cp_seconds, 3),
    }
    flush()
    say("first start")
    daemon = Daemon(args.python, config)
    try:
        daemon.wait(lambda: daemon.ready_at is not None, 60, "READY=1")
        assert daemon.ready_at is not None
        doc["ready_first_start_seconds"] = round(daemon.ready_at - daemon.launched, 3)
        daemon.wait(lambda: len(daemon.find("sync.finished")) >= args.apps, 1800, "the catch-up")
        caught_up = daemon.find("sync.finished")[args.apps - 1]["_at"]
        catch_up = caught_up - daemon.launched
        doc["catch_up_seconds"] = round(catch_up, 3)
        doc["catch_up_vs_cp_a_sync_f"] = round(catch_up / cp_seconds, 2)
        # How much of it the engine's runs account for (summed over parallel workers).
        doc["catch_up_engine_seconds_sum"] = round(
            sum(e["seconds"] for e in daemon.find("sync.finished")[: args.apps]), 3
        )
        daemon.wait(lambda: trash_empty(base), 120, "the replaced trees swept")
        quiet(daemon, max(2.0, args.settle * 2))
        doc["syncs_first_start"] = len(daemon.find("sync.finished"))
        say(f"idle for {args.idle} s")
        before, t0 = cpu_seconds(daemon.proc.pid), time.monotonic()
        time.sleep(args.idle)  # the measured window itself, not a synchronisation
        used = cpu_seconds(daemon.proc.pid) - before
        doc["idle_cpu_percent"] = round(100 * used / (time.monotonic() - t0), 2)
        doc["rss_mib"] = round(rss_mib(daemon.proc.pid), 1)

        say(f"{args.uploads} uploads to one app")
        staging = base / "staging"
        shutil.copytree(base / "r/softdir" / key(0), staging)
        lags: list[float] = []
        from_rename: list[float] = []
        for n in range(args.uploads):
            content = f"upload {n} {os.urandom(8).hex()} {'.' * n}\n".encode()
            (staging / "version.txt").write_bytes(content)
            syncs = len(daemon.find("sync.finished"))
            subprocess.run(
                ["rsync", "-a", f"{staging}/", str(base / "r/softdir" / key(0))], check=True
            )
            written = time.monotonic()
            # The rename that completes the upload, on the monotonic clock: settle runs from it.
            ctime = (base / "r/softdir" / key(0) / "version.txt").stat().st_ctime
            renamed = ctime - (time.time() - time.monotonic())
            target = base / "soft" / key(0) / "version.txt"
            deadline = written + 60
            while not published(target, content):
                if time.monotonic() > deadline:
                    raise BenchError("an upload was never published")
                time.sleep(0.002)
            seen = time.monotonic()
            lags.append(seen - written - args.settle)
            from_rename.append(seen - renamed - args.settle)
            daemon.wait(lambda s=syncs: len(daemon.find("sync.finished")) > s, 30, "its sync")
        doc["upload_past_settle_seconds_median"] = round(statistics.median(lags), 3)
        doc["upload_past_settle_seconds_all"] = [round(x, 3) for x in lags]
        doc["upload_past_settle_from_rename_seconds_median"] = round(
            statistics.median(from_rename), 3
        )

        say(f"one file changed in each of {args.changed} apps")
        quiet(daemon, max(2.0, args.settle * 2))
        syncs = len(daemon.find("sync.finished"))
        changed = [key(i) for i in range(1, args.changed + 1)]
        for app in changed:
            (base / "r/softdir" / app / "d0/f000.dat").write_bytes(os.urandom(args.size))
        daemon.wait(
            lambda: {e["k"] for e in daemon.find("sync.finished")[syncs:]} >= set(changed),
            600,
            "every changed app synced",
        )
        quiet(daemon, max(3.0, args.settle * 3))
        doc["changed_apps"] = args.changed
        doc["syncs_for_changed_apps"] = len(daemon.find("sync.finished")) - syncs
        doc["overflows"] = len(daemon.find("watch.queue_overflow"))
        doc["rescans"] = len(daemon.find("service.rescanned"))
    finally:
        daemon.stop()

    say("restart with nothing changed")
    flush()
    daemon = Daemon(args.python, config)
    try:
        daemon.wait(lambda: daemon.ready_at is not None, 60, "READY=1")
        assert daemon.ready_at is not None
        doc["ready_restart_seconds"] = round(daemon.ready_at - daemon.launched, 3)
        daemon.wait(lambda: bool(daemon.find("service.rescanned")), 600, "the catch-up check")
        doc["restart_check_seconds"] = round(
            daemon.find("service.rescanned")[0]["_at"] - daemon.launched, 3
        )
        quiet(daemon, max(2.0, args.settle * 2))
        doc["syncs_on_restart"] = len(daemon.find("sync.finished"))
    finally:
        daemon.stop()
    return doc


ROWS = [
    ("ready_first_start_seconds", "READY, first start (s)", "<= 5"),
    ("ready_restart_seconds", "READY, restart (s)", "<= 5"),
    ("syncs_on_restart", "syncs on a restart, nothing changed", "0"),
    ("catch_up_seconds", "first-start catch-up (s)", ""),
    ("cp_a_sync_f_seconds", "cp -a + sync -f, same sources (s)", ""),
    ("catch_up_vs_cp_a_sync_f", "catch-up / (cp -a + sync -f)", "<= 1.5"),
    ("syncs_first_start", "syncs at first start", "= apps"),
    ("catch_up_engine_seconds_sum", "  engine seconds in them, summed (s)", ""),
    ("idle_cpu_percent", "idle CPU (% of a core)", "<= 1"),
    ("rss_mib", "RSS (MiB)", "<= 80"),
    ("upload_past_settle_seconds_median", "upload published past settle, median (s)", "<= 0.2"),
    ("upload_past_settle_from_rename_seconds_median", "  the same, from rsync's rename (s)", ""),
    ("syncs_for_changed_apps", "syncs for the apps changed at once", "= changed"),
    ("overflows", "inotify queue overflows", "0"),
]


def render(doc: dict[str, Any]) -> str:
    lines = [
        f"syncpro serve, {doc['apps']} apps x {doc['files_per_app']} files,"
        f" settle {doc['settle']} s, fsync {'on' if doc['fsync'] else 'off'}",
        "",
        f"{'figure':<46} {'value':>10}  goal",
    ]
    for name, title, goal in ROWS:
        goal = goal.replace("= apps", f"= {doc['apps']}")
        goal = goal.replace("= changed", f"= {doc.get('changed_apps')}")
        lines.append(f"{title:<46} {doc.get(name)!s:>10}  {goal}")
    return "\n".join(lines)


def default_python() -> str:
    venv = ROOT / ".venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--apps", type=int, default=1000)
    parser.add_argument("--files", type=int, default=100, help="files per app")
    parser.add_argument("--folders", type=int, default=5, help="folders per app")
    parser.add_argument("--size", type=int, default=2000, help="bytes per file")
    parser.add_argument("--settle", type=float, default=1.0, help="watch.settle, seconds")
    parser.add_argument("--grace", type=float, default=2.0, help="publish.grace, seconds")
    parser.add_argument("--fsync", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--idle", type=float, default=20.0, help="idle window, seconds")
    parser.add_argument("--uploads", type=int, default=5, help="timed uploads to one app")
    parser.add_argument("--changed", type=int, default=200, help="apps changed at once")
    parser.add_argument("--dir", type=Path, default=None, help="parent of the bench dir")
    parser.add_argument("--python", default=default_python(), help="python running the daemon")
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    parser.add_argument("--keep", action="store_true", help="keep the bench dir afterwards")
    args = parser.parse_args(argv)
    if args.apps < 2 or args.files < args.folders or not 1 <= args.changed < args.apps:
        parser.error("need --apps >= 2, --files >= --folders and 1 <= --changed < --apps")
    base = Path(tempfile.mkdtemp(prefix="syncpro-bench-scale.", dir=args.dir))

    def say(message: str) -> None:
        print(f"bench_scale: {message}", file=sys.stderr, flush=True)

    try:
        doc = run(base, args, say)
        print(json.dumps(doc, indent=2) if args.json else render(doc))
        return 0
    except (BenchError, OSError, subprocess.CalledProcessError) as exc:
        say(str(exc))
        return 1
    finally:
        if args.keep:
            say(f"kept {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
