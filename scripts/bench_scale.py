"""Measure `syncpro serve` on a deploy host's scale: 1,000 apps of 100 files each.

Builds the tree under a temporary dir (`--apps` apps, `--files` files each in `--folders`
folders, `--size` bytes per file: 100,000 files in 6,000 folders, about 200 MB by default),
then runs the real daemon on it (through the harness, syncpro.testing) and reports, from one
run:

  ready (first start)   seconds from launch to READY=1 (sd_notify), with no state yet; median
                        of the `--rounds` first starts
  catch-up              seconds from launch until every app is published, against
                        `cp -a` of the same sources followed by `sync -f` (the same durability
                        as publish.fsync): `--rounds` rounds, each the baseline then a first
                        start from nothing (targets and state removed, untimed; on an ext4
                        without a journal moved aside until the end instead), so that both
                        meet the same load; dirty data is flushed (untimed `sync`) before
                        every contender; medians, their ratio and the median of the
                        per-round ratios
  idle CPU              the daemon's CPU over `--idle` seconds with nothing arriving, once its
                        catch-up and grace sweeps are done, in % of one core
  RSS                   the daemon's resident memory then, and that of its child processes
                        then and right after the catch-up (the processes that build first
                        trees, stopped after 10 s without one; multiprocessing's tracker)
  upload latency        one app's upload (`rsync -a` of its tree with one file changed) until
                        the new content is readable in the published tree, minus settle;
                        median of `--uploads`
  200 apps changed      one file rewritten in each of `--changed` apps at once: how many app
                        syncs follow (an app in a sync that took several counts once), and
                        in how many syncs
                        follow (one per app is the goal)
  ready (restart)       seconds from launch to READY=1 with the state of the first run, median
                        of `--rounds` restarts
  restart syncs         syncs run by the restarts with nothing changed (0 is the goal)

A table by default; `--json` prints one JSON document. Run it with the project's venv python:
`.venv/bin/python scripts/bench_scale.py [--json] [--apps N] [--rounds N]`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import bench_fs
from syncpro.testing import Daemon, DaemonWaitError, app, trash_empty, wait_until, write_config

ROOT = Path(__file__).resolve().parent.parent


class BenchError(Exception):
    """The daemon misbehaved or a wait ran out: the figures would mean nothing."""


def key(i: int) -> str:
    return f"app{i:04d}"


def build(base: Path, args: argparse.Namespace) -> Path:
    """Write the sources and the config; return the config's path."""
    payload = os.urandom(args.size)
    for i in range(args.apps):
        # Every app has its config too, as on a deploy host: a missing one fails its sync.
        settings = base / "r/configuredir" / key(i)
        settings.mkdir(parents=True)
        (settings / "app.properties").write_text(f"app={key(i)}\n", encoding="utf-8")
        source = base / "r/softdir" / key(i)
        for f in range(args.files):
            folder = source / f"d{f % args.folders}"
            if f < args.folders:
                folder.mkdir(parents=True)
            (folder / f"f{f:03d}.dat").write_bytes(payload[: args.size - 8] + f"{i:08d}".encode())
    return write_config(
        base,
        [app(key(i), key(i)) for i in range(args.apps)],
        under=base,
        defaults={},
        publish={"grace": args.grace, "fsync": args.fsync, "parallel": args.parallel},
        watch={"settle": args.settle, "workers": args.workers},
        control={"socket": str(base / "run/control.sock")},
    )


def flush() -> None:
    subprocess.run(["sync"], check=True)


def baseline(base: Path) -> float:
    """Seconds of `cp -a` of all sources (programs and configs) and `sync -f` of the copy."""
    copy = base / "cp-copy"
    flush()
    started = time.monotonic()
    subprocess.run(["cp", "-a", str(base / "r"), str(copy)], check=True)
    subprocess.run(["sync", "-f", str(copy)], check=True)
    seconds = time.monotonic() - started
    set_aside(base, copy)
    return seconds


def set_aside(base: Path, path: Path) -> None:
    """Remove path, or on an ext4 without a journal move it out of the way, to be removed
    with the bench dir: there, 100,000 inodes freed between rounds would slow whoever creates
    files next (it skips inodes freed in the last minutes), the contender after the removal
    paying for the bench's own clean-up. Elsewhere a removal costs the next one nothing, and
    copies kept would only fill the filesystem."""
    if not path.exists():
        return
    if bench_fs.describe(base) != "ext4 without a journal":
        shutil.rmtree(path)
        return
    aside = base / "aside"
    aside.mkdir(exist_ok=True)
    path.rename(aside / f"{path.name}.{len(list(aside.iterdir()))}")


def quiet(daemon: Daemon, seconds: float) -> None:
    """Wait until the daemon has logged nothing for `seconds`."""
    while True:
        left = daemon.last_arrival() + seconds - time.monotonic()
        if left <= 0:
            return
        time.sleep(left)  # the quiet window itself: nothing to wait on but time


def reset(base: Path) -> None:
    """Move what a first start made (targets, state, control socket) aside, untimed."""
    for name in ("soft", "conf", "state", "run"):
        set_aside(base, base / name)


def first_start(config: Path, args: argparse.Namespace) -> tuple[Daemon, dict[str, float]]:
    """Launch the daemon on no targets and no state; wait until every app is published and
    return it still running, with its figures."""
    flush()
    daemon = Daemon(config, python=args.python)
    try:
        ready = daemon.wait_ready(60)
        done = daemon.wait_synced(*(key(i) for i in range(args.apps)), timeout=1800)
        syncs = daemon.syncs()
        catch_up = syncs[: syncs.index(done) + 1]
        return daemon, {
            "ready_seconds": round(ready, 3),
            "catch_up_seconds": round(daemon.arrival(done) - daemon.launched, 3),
            # How much of it the engine's runs account for (summed over parallel workers).
            "engine_seconds_sum": round(sum(e["seconds"] for e in catch_up), 3),
        }
    except BaseException:
        daemon.close()
        raise


def helpers_rss_mib(pid: int) -> float:
    """The resident memory of pid's child processes (the daemon's build processes and
    multiprocessing's resource tracker), from /proc."""
    total = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            status = Path(f"/proc/{entry}/status").read_text(encoding="ascii", errors="replace")
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        if fields.get("PPid", "").strip() == str(pid) and "VmRSS" in fields:
            total += int(fields["VmRSS"].split()[0])
    return round(total / 1024, 1)


def app_syncs(syncs: list[Any]) -> int:
    """How many apps the syncs took: a catch-up or a storm runs many apps per sync."""
    return sum(len(event["k"].split()) for event in syncs)


def median(rounds: list[dict[str, float]], name: str) -> float:
    return round(statistics.median(r[name] for r in rounds), 3)


def published(target: Path, content: bytes) -> bool:
    try:
        return target.read_bytes() == content
    except OSError:
        return False


def run(base: Path, args: argparse.Namespace, say: Callable[[str], None]) -> dict[str, Any]:
    say(f"building {args.apps} apps x {args.files} files under {base}")
    config = build(base, args)
    doc: dict[str, Any] = {
        "apps": args.apps,
        "files_per_app": args.files,
        "settle": args.settle,
        "fsync": args.fsync,
        "workers": args.workers,
        "parallel": args.parallel,
        "rounds": args.rounds,
    }
    # Each round: the baseline and a first start from nothing, in turns first: on a machine
    # where memory freed by one contender's clean-up is slow to use again, going first or
    # second is not the same. The last round's daemon stays up for the figures below.
    rounds: list[dict[str, float]] = []
    daemon: Daemon | None = None
    try:
        for n in range(1, args.rounds + 1):
            baseline_first = n % 2 == 1
            if baseline_first:
                say(f"round {n}/{args.rounds}: cp -a + sync -f of the same sources")
                cp_seconds = baseline(base)
            say(f"round {n}/{args.rounds}: first start")
            reset(base)
            daemon, figures = first_start(config, args)
            if not baseline_first:
                say(f"round {n}/{args.rounds}: cp -a + sync -f of the same sources")
                cp_seconds = baseline(base)
            figures["cp_a_sync_f_seconds"] = round(cp_seconds, 3)
            figures["ratio"] = round(figures["catch_up_seconds"] / cp_seconds, 3)
            rounds.append(figures)
            if n < args.rounds:
                if daemon.stop(60) != 0:
                    raise BenchError(f"the daemon did not stop cleanly:\n{daemon.tail()}")
                daemon = None
        assert daemon is not None
        # Its build processes, right after the last round's catch-up (they stop when idle).
        doc["helpers_rss_mib_after_catch_up"] = helpers_rss_mib(daemon.pid)
        doc["ready_first_start_seconds"] = median(rounds, "ready_seconds")
        doc["catch_up_seconds"] = median(rounds, "catch_up_seconds")
        doc["cp_a_sync_f_seconds"] = median(rounds, "cp_a_sync_f_seconds")
        doc["catch_up_vs_cp_a_sync_f"] = round(
            doc["catch_up_seconds"] / doc["cp_a_sync_f_seconds"], 2
        )
        # Both contenders of a round met the same load: the median of the rounds' own ratios
        # resists a machine whose speed drifts between rounds.
        doc["catch_up_vs_cp_a_sync_f_paired_median"] = round(median(rounds, "ratio"), 2)
        doc["catch_up_engine_seconds_sum"] = median(rounds, "engine_seconds_sum")
        doc["first_start_rounds"] = rounds
        daemon.wait(
            lambda: trash_empty(base / "soft", base / "conf"), 120, "the replaced trees swept"
        )
        quiet(daemon, max(2.0, args.settle * 2))
        doc["syncs_first_start"] = app_syncs(daemon.syncs())
        doc["sync_runs_first_start"] = len(daemon.syncs())
        say(f"idle for {args.idle} s")
        before, t0 = daemon.cpu_seconds(), time.monotonic()
        time.sleep(args.idle)  # the measured window itself, not a synchronisation
        used = daemon.cpu_seconds() - before
        doc["idle_cpu_percent"] = round(100 * used / (time.monotonic() - t0), 2)
        doc["rss_mib"] = round(daemon.status_kib("VmRSS") / 1024, 1)
        doc["helpers_rss_mib"] = helpers_rss_mib(daemon.pid)

        say(f"{args.uploads} uploads to one app")
        staging = base / "staging"
        shutil.copytree(base / "r/softdir" / key(0), staging)
        lags: list[float] = []
        from_rename: list[float] = []
        for n in range(args.uploads):
            content = f"upload {n} {os.urandom(8).hex()} {'.' * n}\n".encode()
            (staging / "version.txt").write_bytes(content)
            syncs = len(daemon.syncs())
            subprocess.run(
                ["rsync", "-a", f"{staging}/", str(base / "r/softdir" / key(0))], check=True
            )
            written = time.monotonic()
            # The rename that completes the upload, on the monotonic clock: settle runs from it.
            ctime = (base / "r/softdir" / key(0) / "version.txt").stat().st_ctime
            renamed = ctime - (time.time() - time.monotonic())
            target = base / "soft" / key(0) / "version.txt"
            wait_until(
                lambda t=target, c=content: published(t, c), 60, 0.002, "the upload published"
            )
            seen = time.monotonic()
            lags.append(seen - written - args.settle)
            from_rename.append(seen - renamed - args.settle)
            daemon.wait(lambda s=syncs: len(daemon.syncs()) > s, 30, "its sync")
        doc["upload_past_settle_seconds_median"] = round(statistics.median(lags), 3)
        doc["upload_past_settle_seconds_all"] = [round(x, 3) for x in lags]
        doc["upload_past_settle_from_rename_seconds_median"] = round(
            statistics.median(from_rename), 3
        )

        say(f"one file changed in each of {args.changed} apps")
        quiet(daemon, max(2.0, args.settle * 2))
        syncs = len(daemon.syncs())
        changed = [key(i) for i in range(1, args.changed + 1)]
        for name in changed:
            (base / "r/softdir" / name / "d0/f000.dat").write_bytes(os.urandom(args.size))
        daemon.wait_synced(*changed, since=syncs, timeout=600)
        quiet(daemon, max(3.0, args.settle * 3))
        doc["changed_apps"] = args.changed
        doc["syncs_for_changed_apps"] = app_syncs(daemon.syncs()[syncs:])
        doc["sync_runs_for_changed_apps"] = len(daemon.syncs()) - syncs
        doc["overflows"] = len(daemon.find("watch.queue_overflow"))
        doc["rescans"] = len(daemon.find("service.rescanned"))
    finally:
        if daemon is not None:
            daemon.stop(60)

    restarts: list[dict[str, float]] = []
    for n in range(1, args.rounds + 1):
        say(f"restart {n}/{args.rounds} with nothing changed")
        flush()
        with Daemon(config, python=args.python) as daemon:
            ready = daemon.wait_ready(60)
            rescan = daemon.wait_event("service.rescanned", timeout=600)
            quiet(daemon, max(2.0, args.settle * 2))
            restarts.append(
                {
                    "ready_seconds": round(ready, 3),
                    "check_seconds": round(daemon.arrival(rescan) - daemon.launched, 3),
                    "syncs": app_syncs(daemon.syncs()),
                }
            )
            daemon.stop(60)
    doc["ready_restart_seconds"] = median(restarts, "ready_seconds")
    doc["restart_check_seconds"] = median(restarts, "check_seconds")
    doc["syncs_on_restart"] = max(int(r["syncs"]) for r in restarts)
    doc["restart_rounds"] = restarts
    return doc


ROWS = [
    ("ready_first_start_seconds", "READY, first start (s)", "<= 5"),
    ("ready_restart_seconds", "READY, restart (s)", "<= 5"),
    ("syncs_on_restart", "syncs on a restart, nothing changed (most)", "0"),
    ("catch_up_seconds", "first-start catch-up (s)", ""),
    ("cp_a_sync_f_seconds", "cp -a + sync -f, same sources (s)", ""),
    ("catch_up_vs_cp_a_sync_f", "catch-up / (cp -a + sync -f), of the medians", "<= 1.5"),
    ("catch_up_vs_cp_a_sync_f_paired_median", "  the same, median of the rounds' ratios", ""),
    ("syncs_first_start", "app syncs at first start", "= apps"),
    ("sync_runs_first_start", "  in so many syncs", ""),
    ("catch_up_engine_seconds_sum", "  engine seconds in them, summed (s)", ""),
    ("idle_cpu_percent", "idle CPU (% of a core)", "<= 1"),
    ("rss_mib", "RSS (MiB)", "<= 80"),
    ("helpers_rss_mib", "  its child processes then (MiB)", ""),
    ("helpers_rss_mib_after_catch_up", "  its child processes after the catch-up (MiB)", ""),
    ("upload_past_settle_seconds_median", "upload published past settle, median (s)", "<= 0.2"),
    ("upload_past_settle_from_rename_seconds_median", "  the same, from rsync's rename (s)", ""),
    ("syncs_for_changed_apps", "app syncs for the apps changed at once", "= changed"),
    ("sync_runs_for_changed_apps", "  in so many syncs", ""),
    ("overflows", "inotify queue overflows", "0"),
]


def render(doc: dict[str, Any]) -> str:
    lines = [
        f"syncpro serve, {doc['apps']} apps x {doc['files_per_app']} files,"
        f" settle {doc['settle']} s, fsync {'on' if doc['fsync'] else 'off'};"
        f" timings are medians of {doc['rounds']} rounds",
        f"on {doc['filesystem']}" + (f"; {doc['warning']}" if doc["warning"] else ""),
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
    parser.add_argument(
        "--rounds", type=int, default=3, help="rounds of first start vs baseline, and restarts"
    )
    parser.add_argument("--files", type=int, default=100, help="files per app")
    parser.add_argument("--folders", type=int, default=5, help="folders per app")
    parser.add_argument("--size", type=int, default=2000, help="bytes per file")
    parser.add_argument("--settle", type=float, default=1.0, help="watch.settle, seconds")
    parser.add_argument("--workers", type=int, default=4, help="watch.workers (default 4)")
    parser.add_argument("--parallel", type=int, default=2, help="publish.parallel (default 2)")
    parser.add_argument("--grace", type=float, default=2.0, help="publish.grace, seconds")
    parser.add_argument("--fsync", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--idle", type=float, default=20.0, help="idle window, seconds")
    parser.add_argument("--uploads", type=int, default=5, help="timed uploads to one app")
    parser.add_argument("--changed", type=int, default=200, help="apps changed at once")
    parser.add_argument("--dir", type=Path, default=None, help="parent of the bench dir")
    parser.add_argument(
        "--loop-ext4",
        type=int,
        metavar="GIB",
        default=None,
        help="run on a fresh journaled ext4 of GIB GiB, loop-mounted (root; 8 fits 1,000 apps)",
    )
    parser.add_argument("--python", default=default_python(), help="python running the daemon")
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    parser.add_argument("--keep", action="store_true", help="keep the bench dir afterwards")
    args = parser.parse_args(argv)
    args.changed = min(args.changed, args.apps - 1)  # --apps alone makes a smaller run
    if args.apps < 2 or args.files < args.folders or args.changed < 1 or args.rounds < 1:
        parser.error("need --apps >= 2, --files >= --folders, --changed >= 1 and --rounds >= 1")

    def say(message: str) -> None:
        print(f"bench_scale: {message}", file=sys.stderr, flush=True)

    try:
        with contextlib.ExitStack() as stack:
            parent = args.dir
            if args.loop_ext4:
                parent = stack.enter_context(bench_fs.loop_ext4(args.loop_ext4, args.dir))
            base = Path(tempfile.mkdtemp(prefix="syncpro-bench-scale.", dir=parent))
            if not args.keep or args.loop_ext4:
                stack.callback(shutil.rmtree, base, ignore_errors=True)
            warning = bench_fs.warning(base)
            if warning:
                say(warning)
            doc = run(base, args, say)
            doc["filesystem"] = bench_fs.describe(base)
            doc["warning"] = warning
            if args.keep and not args.loop_ext4:
                say(f"kept {base}")
        print(json.dumps(doc, indent=2) if args.json else render(doc))
        return 0
    except (BenchError, DaemonWaitError, OSError, subprocess.CalledProcessError) as exc:
        say(str(exc))
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
