"""Measure `syncpro serve`: how soon an upload is published, and what the daemon costs idle.

One run, against a settle time this script sets (`--settle`):

  latency   the time from an upload's last write to the moment its content is readable in the
            published tree, minus the settle time: what the daemon adds to the quiet period it
            is told to wait. Each upload is `rsync -a staging/ source/` of the app's tree with
            one file given a new, unique content (rsync writes a temporary file and renames it,
            as real uploads do). The last write is taken two ways:
              - rsync's return (monotonic clock), as the issue asks. rsync returns some tens of
                milliseconds after its rename (it still sets directory times and waits for its
                own processes), so this figure is too small by that much;
              - the rename itself: the uploaded file's ctime, which the rename sets, moved onto
                the monotonic clock. The daemon's settle runs from this event.
            The published file is polled every `--poll` seconds, so a figure may be late by up
            to that much. Uploads are spaced out: the next starts once the previous is
            published and its sync logged, so each is a burst of its own.
  idle      the daemon's CPU time (utime + stime of all its threads, /proc/<pid>/stat) over
            `--idle` seconds with nothing arriving, once its syncs and sweeps are done; its
            RSS; and its context switches (all threads), i.e. how often it wakes up.

  big upload
            a tree of `--big-upload` small files (100 per folder) uploaded with one `rsync -a`
            into the app while the daemon runs, as a build's first upload is: how long after
            rsync's return the whole tree is published, and what of that is neither the
            settle time nor the daemon's own copy (its sync's `seconds`): the time its
            watcher took to take in the upload's events (some seven per file: the temporary
            made, written, closed, its mode and times set, renamed). With the daemon's CPU
            over the upload, the syncs it made and the inotify queue overflows (goal: one
            sync, none).

For context, in the same run: how long the upload itself takes, and the daemon's own figure
for copying and publishing the program tree (`seconds` of the program target in its
sync.finished line), the part of the latency that is not detection and scheduling.

Run it with the project's venv python: `.venv/bin/python scripts/bench_daemon.py [--json]`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from syncpro.testing import (
    Daemon,
    DaemonWaitError,
    app,
    trash_empty,
    wait_until,
    write_config,
)

ROOT = Path(__file__).resolve().parent.parent

APP_KEY = "app1"
LOCAL_NAME = "app"
VERSION_FILE = "version.txt"  # the file each upload gives a new content
TREE_DIRS = 10
TREE_FILE_SIZE = 2048

Event = dict[str, Any]


class BenchError(Exception):
    """The daemon misbehaved or a wait ran out: the figures would mean nothing."""


@dataclass(frozen=True)
class Upload:
    """One timed upload, in monotonic seconds."""

    started: float  # before rsync started
    written: float  # after rsync returned: the last write, as the issue defines it
    renamed: float  # the uploaded file's ctime (rsync's rename), moved to the monotonic clock
    seen: float = 0.0  # the new content first read from the published tree
    program_seconds: float | None = None  # the daemon's own figure for publishing the program

    @property
    def upload(self) -> float:
        return self.written - self.started

    @property
    def exit_lag(self) -> float:
        """How long rsync took to return after its last rename."""
        return self.written - self.renamed

    def latency(self, settle: float) -> float:
        return self.seen - self.written - settle

    def latency_from_rename(self, settle: float) -> float:
        return self.seen - self.renamed - settle


# --- /proc ---


def context_switches(pid: int) -> tuple[int, int]:
    """Given a pid, return its context switches summed over its threads, and its thread count.
    A thread that ends in between takes its count with it, so compare counts of a steady
    process only."""
    total = threads = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError):
            for line in (task / "status").read_text(encoding="ascii").splitlines():
                if line.startswith(("voluntary_ctxt_switches:", "nonvoluntary_ctxt_switches:")):
                    total += int(line.split()[1])
            threads += 1
    return total, threads


# --- the bench directory ---


SOCKET_PATH_MAX = 107  # bytes of a unix socket's path (sun_path less its NUL)


def control_socket(base: Path) -> Path:
    """The daemon's control socket: in the bench dir, or in a short folder of the system's
    /tmp when the bench dir is too deep for a unix socket's path (the caller removes it)."""
    socket = base / "run" / "control.sock"
    if len(os.fsencode(socket)) <= SOCKET_PATH_MAX:
        return socket
    return Path(tempfile.mkdtemp(prefix="sp-bd-", dir="/tmp")) / "control.sock"


def write_bench_config(base: Path, settle: float, grace: float, fsync: bool, socket: Path) -> Path:
    """Given the bench dir and the control socket's path, write its config; return its path."""
    return write_config(
        base,
        [app(APP_KEY, LOCAL_NAME)],
        under=base,
        defaults={},
        publish={"grace": grace, "fsync": fsync},
        # max_wait well above settle, so only the quiet period decides when a sync starts.
        watch={"settle": settle, "max_wait": max(10.0, 4 * settle), "rescan_interval": 3600},
        control={"socket": str(socket)},
    )


def ours(daemon: Daemon) -> list[Event]:
    """The finished syncs of the bench app from remotecomdir."""
    return daemon.syncs(APP_KEY, update=False)


def make_tree(root: Path, files: int) -> None:
    """Given an absent root, fill it with files of random bytes in a few dirs, and the
    version file."""
    for i in range(files):
        path = root / f"d{i % TREE_DIRS:02d}" / f"f{i:04d}.dat"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(os.urandom(TREE_FILE_SIZE))
    (root / VERSION_FILE).write_text("version 0\n", encoding="utf-8")


def version_content(n: int) -> bytes:
    # The size grows with n as well, so rsync's quick check (size, mtime) never skips it.
    return f"version {n} {os.urandom(8).hex()} {'.' * n}\n".encode()


def upload(staging: Path, source: Path, n: int, use_rsync: bool) -> tuple[Upload, bytes]:
    """Give the version file in staging a new content and upload staging into source; return
    the upload's times so far and the content."""
    content = version_content(n)
    (staging / VERSION_FILE).write_bytes(content)
    started = time.monotonic()
    if use_rsync:
        subprocess.run(["rsync", "-a", f"{staging}/", f"{source}/"], check=True)
    else:
        # As rsync does it: a temporary name matching the daemon's default ignore, then rename.
        temp = source / f".{VERSION_FILE}.{os.urandom(3).hex()}"
        temp.write_bytes(content)
        os.replace(temp, source / VERSION_FILE)
    written = time.monotonic()
    # rsync returns tens of milliseconds after its last rename (it still sets directory times
    # and shuts its processes down), while the daemon's settle runs from the rename's event.
    # The rename sets the file's ctime, fine-grained on current kernels: take it too.
    ctime_ns = (source / VERSION_FILE).stat().st_ctime_ns
    wall_minus_monotonic_ns = time.time_ns() - time.monotonic_ns()
    renamed = (ctime_ns - wall_minus_monotonic_ns) / 1e9
    return Upload(started, written, renamed), content


def wait_published(target: Path, content: bytes, poll: float, timeout: float) -> float:
    """Poll target until it holds content; return the monotonic time it was first seen."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(FileNotFoundError):
            if target.read_bytes() == content:
                return time.monotonic()
        if time.monotonic() > deadline:
            raise BenchError(f"{target} did not get the uploaded content within {timeout}s")
        time.sleep(poll)


# --- the benchmark ---


def percentile(values: list[float], q: float) -> float:
    """Given values and q in [0, 100], return the q-th percentile, interpolating linearly
    between the two nearest ranks (numpy's default)."""
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def summary(values: list[float]) -> dict[str, float]:
    return {
        "p50": percentile(values, 50),
        "p95": percentile(values, 95),
        "max": max(values),
        "min": min(values),
    }


def run_bench(
    base: Path, args: argparse.Namespace, progress: Callable[[str], None], socket: Path
) -> Event:
    """Given an empty bench dir, the options and the control socket's path, run the daemon
    through the uploads and the idle window and return the figures. Raise BenchError if
    anything goes wrong."""
    source = base / "r" / "softdir" / APP_KEY
    staging = base / "staging"
    target = base / "soft" / LOCAL_NAME / VERSION_FILE
    make_tree(staging, args.files)
    conf_source = base / "r" / "configuredir" / APP_KEY
    conf_source.mkdir(parents=True)
    (conf_source / "app.properties").write_text("port=8080\n", encoding="utf-8")
    for name in ("u", "soft", "conf", "state", "run"):
        (base / name).mkdir()
    use_rsync = shutil.which("rsync") is not None and not args.no_rsync
    source.parent.mkdir(parents=True)
    if use_rsync:
        subprocess.run(["rsync", "-a", f"{staging}/", f"{source}/"], check=True)
    else:
        shutil.copytree(staging, source)
    config = write_bench_config(base, args.settle, args.grace, args.fsync, socket)

    progress(f"starting the daemon on {base}")
    with Daemon(config, python=args.python) as daemon:
        daemon.wait(
            lambda: bool(daemon.find("service.rescanned", trigger="catch-up")), 30, "catch-up"
        )
        catch_up = len(daemon.find("service.rescanned", trigger="catch-up")[0]["changed"])
        daemon.wait(lambda: len(ours(daemon)) >= catch_up, 60, "the catch-up sync")
        wait_published(target, b"version 0\n", args.poll, 10)
        if not all(e.get("ok") for e in ours(daemon)):
            raise BenchError(f"catch-up sync failed; the daemon said:\n{daemon.tail()}")

        progress(f"{args.uploads} uploads, settle {args.settle}s")
        uploads: list[Upload] = []
        cpu_before_uploads = daemon.cpu_seconds()
        for n in range(1, args.uploads + 1):
            count = len(ours(daemon))
            up, content = upload(staging, source, n, use_rsync)
            seen = wait_published(target, content, args.poll, args.settle + 30)
            daemon.wait(
                lambda c=count: len(ours(daemon)) > c,
                30,
                f"the sync of upload {n}",
            )
            sync = ours(daemon)[count]
            if not sync.get("ok"):
                raise BenchError(f"the sync of upload {n} failed: {sync}")
            program = sync.get("response", {}).get("apps", [{}])[0].get("program", {})
            uploads.append(replace(up, seen=seen, program_seconds=program.get("seconds")))
        syncs_after_uploads = len(ours(daemon))
        cpu_uploads = daemon.cpu_seconds() - cpu_before_uploads

        # Idle: every sync logged (above) and every replaced tree swept after its grace.
        wait_until(
            lambda: trash_empty(base / "soft", base / "conf"),
            args.grace + 30,
            what="the replaced trees to be swept",
        )
        progress(f"idle for {args.idle}s")
        cpu0, (switches0, threads) = daemon.cpu_seconds(), context_switches(daemon.pid)
        wall0 = time.monotonic()
        time.sleep(args.idle)  # the measurement window itself, not a wait for anything
        cpu1, (switches1, _) = daemon.cpu_seconds(), context_switches(daemon.pid)
        wall1 = time.monotonic()
        rss, peak = daemon.status_kib("VmRSS"), daemon.status_kib("VmHWM")
        idle_syncs = len(ours(daemon)) - syncs_after_uploads

        big = big_upload(daemon, base, source, args, progress) if args.big_upload > 0 else None

        progress("stopping the daemon with SIGTERM")
        status = daemon.stop(30)
        if status != 0:
            raise BenchError(f"daemon exited {status} on SIGTERM; it said:\n{daemon.tail()}")

    latencies = [u.latency(args.settle) for u in uploads]
    program_seconds = [u.program_seconds for u in uploads if u.program_seconds is not None]
    upload_times = [u.upload for u in uploads]
    window = wall1 - wall0
    lat = summary(latencies)
    lat_rename = summary([u.latency_from_rename(args.settle) for u in uploads])
    up = summary(upload_times)
    return {
        "settings": {
            "settle": args.settle,
            "grace": args.grace,
            "fsync": args.fsync,
            "uploads": args.uploads,
            "files": args.files + 1,
            "poll": args.poll,
            "upload_method": "rsync -a" if use_rsync else "write + rename",
        },
        "machine": {
            "python": platform.python_version(),
            "kernel": platform.release(),
            "cpus": os.cpu_count(),
            "rsync": rsync_version() if use_rsync else None,
        },
        "latency": lat,
        "latency_from_rename": lat_rename,
        "program_publish_seconds": summary(program_seconds) if program_seconds else None,
        "upload_exit_lag": summary([u.exit_lag for u in uploads]),
        "upload": up,
        "ratios": {
            "latency_p50_over_settle": lat["p50"] / args.settle,
            "latency_p95_over_settle": lat["p95"] / args.settle,
            "latency_from_rename_p50_over_settle": lat_rename["p50"] / args.settle,
            "latency_from_rename_p95_over_settle": lat_rename["p95"] / args.settle,
            "latency_p50_over_upload_p50": lat["p50"] / up["p50"],
            "latency_from_rename_p50_over_upload_p50": lat_rename["p50"] / up["p50"],
            "publish_from_rename_p50_over_upload_p50": (lat_rename["p50"] + args.settle)
            / up["p50"],
        },
        "uploads_cpu_seconds": cpu_uploads,
        "syncs_per_upload": (syncs_after_uploads - catch_up) / args.uploads,
        "idle": {
            "seconds": window,
            "cpu_seconds": cpu1 - cpu0,
            "cpu_percent_of_one_core": 100 * (cpu1 - cpu0) / window,
            "context_switches_per_second": (switches1 - switches0) / window,
            "threads": threads,
            "syncs": idle_syncs,
            "rss_kib": rss,
            "peak_rss_kib": peak,
        },
        "big_upload": big,
        "exit_status_on_sigterm": status,
        "runs": [
            asdict(u)
            | {
                "latency": u.latency(args.settle),
                "latency_from_rename": u.latency_from_rename(args.settle),
            }
            for u in uploads
        ],
    }


def big_upload(
    daemon: Daemon, base: Path, source: Path, args: argparse.Namespace, say: Callable[[str], None]
) -> Event:
    """Upload a new tree of `args.big_upload` files into the app's source with one rsync;
    return when it was published whole, the daemon's CPU and syncs over it, and overflows."""
    files = args.big_upload
    staging = base / "staging-big"
    for i in range(files):
        folder = staging / f"lib{i // 2000:03d}" / f"pkg{i // 100:04d}"
        if i % 100 == 0:
            folder.mkdir(parents=True)
        (folder / f"C{i % 100:02d}.class").write_bytes(os.urandom(200))
    # rsync sends its file list in sorted order: this is the last file it renames into place.
    last = max(p.relative_to(staging) for p in staging.rglob("*.class"))
    published = base / "soft" / LOCAL_NAME / "big"
    overflows = len(daemon.find("watch.queue_overflow"))
    syncs_before = len(ours(daemon))
    say(f"a {files}-file upload with one rsync")
    cpu0, started = daemon.cpu_seconds(), time.monotonic()
    subprocess.run(["rsync", "-a", f"{staging}/", f"{source}/big/"], check=True)
    written = time.monotonic()
    deadline = written + args.settle + 300
    while not (published / last).exists():
        if time.monotonic() > deadline:
            raise BenchError(f"the {files}-file upload was not published within 300 s")
        time.sleep(args.poll * 4)
    seen = time.monotonic()
    cpu = daemon.cpu_seconds() - cpu0
    daemon.wait(lambda: len(ours(daemon)) > syncs_before, 30, "the big upload's sync")
    sync = ours(daemon)[-1]
    program = sync.get("response", {}).get("apps", [{}])[0].get("program", {})
    got = sum(1 for _ in published.rglob("*.class"))
    if got != files or not sync.get("ok"):
        raise BenchError(f"the big upload published {got} of {files} files: {sync}")
    publish = program.get("seconds") or 0.0
    return {
        "files": files,
        "upload_seconds": written - started,
        "published_after_return_seconds": seen - written,
        "sync_seconds": publish,
        "intake_seconds": seen - written - args.settle - publish,
        "published_after_return_over_upload": (seen - written) / (written - started),
        "cpu_seconds": cpu,
        "cpu_ms_per_1000_files": 1000 * cpu / files * 1000,
        "syncs": len(ours(daemon)) - syncs_before,
        "overflows": len(daemon.find("watch.queue_overflow")) - overflows,
    }


def rsync_version() -> str:
    out = subprocess.run(["rsync", "--version"], capture_output=True, text=True, check=True)
    words = out.stdout.split()
    return words[2] if len(words) > 2 else "?"


def render(doc: Event) -> str:
    s, m, idle, r = doc["settings"], doc["machine"], doc["idle"], doc["ratios"]
    per_upload = doc["uploads_cpu_seconds"] / s["uploads"]

    def row(title: str, stats: dict[str, float] | None) -> str:
        if stats is None:
            return f"  {title:<40} {'-':>8}"
        cells = "".join(f"{stats[k] * 1000:>9.1f}" for k in ("p50", "p95", "max", "min"))
        return f"  {title:<40}{cells}"

    lines = [
        f"syncpro serve: settle {s['settle']} s, {s['uploads']} uploads ({s['upload_method']}) "
        f"of one file in a {s['files']}-file tree, publish.fsync {'on' if s['fsync'] else 'off'},"
        f" grace {s['grace']} s",
        f"Python {m['python']}, Linux {m['kernel']}, {m['cpus']} CPUs"
        + (f", rsync {m['rsync']}" if m["rsync"] else ""),
        "",
        f"  {'milliseconds':<40}{'p50':>9}{'p95':>9}{'max':>9}{'min':>9}",
        row("upload's return -> published, - settle", doc["latency"]),
        row("upload's rename -> published, - settle", doc["latency_from_rename"]),
        row("  the daemon's copy + publish (own figure)", doc["program_publish_seconds"]),
        row(f"the upload itself ({s['upload_method']})", doc["upload"]),
        row("  its return after its rename", doc["upload_exit_lag"]),
        f"  (the published file polled every {s['poll'] * 1000:.0f} ms: figures may be late by"
        " that much)",
        "",
        "ratios                  from upload's return   from its rename",
        f"  latency / settle, p50   {r['latency_p50_over_settle']:>19.3f}"
        f"{r['latency_from_rename_p50_over_settle']:>18.3f}",
        f"  latency / settle, p95   {r['latency_p95_over_settle']:>19.3f}"
        f"{r['latency_from_rename_p95_over_settle']:>18.3f}",
        f"  latency / upload, p50   {r['latency_p50_over_upload_p50']:>19.2f}"
        f"{r['latency_from_rename_p50_over_upload_p50']:>18.2f}",
        f"(settle + latency from the rename) / upload, p50: "
        f"{r['publish_from_rename_p50_over_upload_p50']:.1f}",
        f"syncs per upload: {doc['syncs_per_upload']:.2f}; daemon CPU over the uploads: "
        f"{doc['uploads_cpu_seconds']:.2f} s ({per_upload * 1000:.0f} ms per upload)",
        "",
        f"idle {idle['seconds']:.1f} s: CPU {idle['cpu_seconds']:.3f} s, "
        f"{idle['cpu_percent_of_one_core']:.3f} % of one core "
        f"(counted in {1000 / os.sysconf('SC_CLK_TCK'):.0f} ms ticks); {idle['syncs']} syncs",
        f"  {idle['context_switches_per_second']:.1f} context switches/s over its "
        f"{idle['threads']} threads",
        f"RSS {idle['rss_kib'] / 1024:.1f} MiB (peak {idle['peak_rss_kib'] / 1024:.1f} MiB)",
        f"SIGTERM: exit status {doc['exit_status_on_sigterm']}",
    ]
    big = doc["big_upload"]
    if big is not None:
        lines += [
            "",
            f"big upload: {big['files']} files with one rsync -a, {big['upload_seconds']:.2f} s",
            f"  published whole {big['published_after_return_seconds']:.2f} s after rsync"
            f" returned ({big['published_after_return_over_upload']:.2f} x the upload):"
            f" settle {s['settle']} s + the daemon's sync {big['sync_seconds']:.2f} s"
            f" + taking in the upload's events {big['intake_seconds']:.2f} s",
            f"  daemon CPU {big['cpu_seconds']:.2f} s ({big['cpu_ms_per_1000_files']:.0f} ms per"
            f" 1,000 files); syncs {big['syncs']} (goal 1); inotify overflows"
            f" {big['overflows']} (goal 0)",
        ]
    return "\n".join(lines)


def default_parent() -> Path:
    """The system temp dir if it is on the project's filesystem, else the project's var/ (git
    ignores it), as bench_sync.py does: syncpro publishes on the filesystem it runs from."""
    temp = Path(tempfile.gettempdir())
    if temp.stat().st_dev == ROOT.stat().st_dev:
        return temp
    var = ROOT / "var"
    var.mkdir(exist_ok=True)
    return var


def default_python() -> str:
    venv = ROOT / ".venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--settle", type=float, default=0.5, help="watch.settle, seconds")
    parser.add_argument("--uploads", type=int, default=20, help="timed uploads")
    parser.add_argument("--idle", type=float, default=30.0, help="idle window, seconds")
    parser.add_argument("--files", type=int, default=200, help="other files in the app's tree")
    parser.add_argument("--grace", type=float, default=1.0, help="publish.grace, seconds")
    parser.add_argument(
        "--fsync",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="publish.fsync (default: on)",
    )
    parser.add_argument(
        "--poll", type=float, default=0.005, help="how often to read the published file, seconds"
    )
    parser.add_argument(
        "--no-rsync", action="store_true", help="upload by write + rename even if rsync exists"
    )
    parser.add_argument(
        "--dir",
        type=Path,
        default=None,
        help="parent of the temporary bench dir (default: the system temp dir if it is on the "
        "project's filesystem, else the project's var/)",
    )
    parser.add_argument(
        "--python", default=default_python(), help="python that runs the daemon (the venv's)"
    )
    parser.add_argument(
        "--big-upload",
        type=int,
        default=40_000,
        help="files of the big upload at the end (0: none)",
    )
    parser.add_argument("--json", action="store_true", help="print a JSON document instead")
    parser.add_argument("--keep", action="store_true", help="keep the bench dir afterwards")
    args = parser.parse_args(argv)
    if args.settle <= 0 or args.uploads < 1 or args.idle <= 0 or args.files < 0 or args.poll <= 0:
        parser.error(
            "--settle, --idle and --poll must be positive, --uploads at least 1, --files at least 0"
        )
    if args.big_upload < 0:
        parser.error("--big-upload must be 0 or more")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not Path("/proc/self/stat").exists():
        print("bench_daemon: needs Linux's /proc", file=sys.stderr)
        return 2
    parent = args.dir or default_parent()
    parent.mkdir(parents=True, exist_ok=True)
    base = Path(tempfile.mkdtemp(prefix="syncpro-bench-daemon.", dir=parent))
    socket = control_socket(base)

    def progress(message: str) -> None:
        print(f"bench_daemon: {message}", file=sys.stderr, flush=True)

    try:
        doc = run_bench(base, args, progress, socket)
        print(json.dumps(doc, indent=2) if args.json else render(doc))
        return 0
    except (
        BenchError,
        DaemonWaitError,
        OSError,
        subprocess.CalledProcessError,
        subprocess.TimeoutExpired,
    ) as exc:
        print(f"bench_daemon: {exc}", file=sys.stderr)
        return 1
    finally:
        if socket.parent != base / "run":
            shutil.rmtree(socket.parent, ignore_errors=True)
        if args.keep:
            print(f"bench_daemon: kept {base}", file=sys.stderr)
        else:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
