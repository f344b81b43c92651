"""Benchmark syncpro's sync against `cp -a` and `rsync -a --delete`, as ratios from one run.

The machine may be shared and noisy, so every figure is relative to a baseline measured in the
same run, in the same rounds: each round runs every contender once, in a rotating order, after
an untimed `sync` so that nobody pays for the previous contender's dirty pages. Each contender
runs once before timing (warm page cache) and the median of the timed runs is reported.

Cases:
  full copy    `cp -a src dst` into a fresh dst vs a first syncpro sync into an empty target
  incremental  one file of all rewritten: `rsync -a --delete src/ copy/` into an up-to-date
               copy vs a syncpro sync into the already published target
  no change    the same with nothing changed

Between syncpro runs the replaced tree is retired as it is once its grace period is over (the
daemon's sweep, the CLI's sweeper): it becomes the target's spare, which the next incremental
run brings up to date in place. That is the steady state of a deploy host, where one app's
syncs are further apart than `publish.grace`. The CLI and in-process runs take turns at one
target; each daemon publishes to targets of its own, which it alone sweeps, as on a host.

syncpro runs three ways, each with publish.fsync off and on: as the CLI in a subprocess
(start-up included); in-process (run_sync); and as a running daemon (`syncpro serve`, one per
fsync setting, its settle time too long to sync by itself) asked over its control socket, timed
from the request to the answer: what an HTTP or `ctl` client of a deploy host waits for. A
daemon builds a first tree on its build processes, which are started by the warm-up round and
stop after 10 s without a build; with nothing else building, the tree is shared out to all of
them. fsync costs one syncfs, so the table also shows the baselines
followed by `sync -f` (the same syncfs), the fair comparison for fsync=on.

Run it with the project's venv python: `.venv/bin/python scripts/bench_sync.py [--quick]`.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import json
import math
import os
import pstats
import random
import resource
import shutil
import stat
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

import bench_fs
from syncpro.testing import Daemon, DaemonWaitError, app, trash_empty, write_config

ROOT = Path(__file__).resolve().parent.parent

APP_KEY = "bench1"
LOCAL_NAME = "bench"
MIN_SIZE = 100
MAX_SIZE = 1 << 20
FILES_PER_DIR = 20
CHANGED_FILE_SIZE = 64 * 1024  # the incremental case rewrites the file closest to this size

CASES = ("full", "incremental", "nochange")
CASE_TITLES = {"full": "full copy", "incremental": "incremental (1 file)", "nochange": "no change"}
BASELINES = {"full": "cp -a", "incremental": "rsync -a --delete", "nochange": "rsync -a --delete"}
SYNCPRO_VARIANTS = (
    "cli-nofsync",
    "cli-fsync",
    "inproc-nofsync",
    "inproc-fsync",
    "daemon-nofsync",
    "daemon-fsync",
)
VARIANT_TITLES = {
    "cli-nofsync": "syncpro CLI      fsync=off",
    "cli-fsync": "syncpro CLI      fsync=on",
    "inproc-nofsync": "syncpro in-proc  fsync=off",
    "inproc-fsync": "syncpro in-proc  fsync=on",
    "daemon-nofsync": "syncpro daemon   fsync=off",
    "daemon-fsync": "syncpro daemon   fsync=on",
}
SYNC_ACTION = "Deploy:Core:syncpro"


class BenchError(Exception):
    """A contender failed or produced a wrong tree: the figures would mean nothing."""


@dataclass(frozen=True)
class TreeSpec:
    """The source tree to generate."""

    files: int
    total_bytes: int
    seed: int
    same_size: bool = False  # every file total_bytes / files (the --big case)


@dataclass
class TreeInfo:
    """What was generated."""

    files: int = 0
    dirs: int = 0
    symlinks: int = 0
    bytes: int = 0
    changed_file: str = ""
    changed_size: int = 0


@dataclass
class Run:
    """One timed run: wall and CPU seconds, peak RSS of a subprocess (KiB), engine stats."""

    wall: float
    cpu: float
    maxrss_kib: int | None = None
    copied: int | None = None
    linked: int | None = None
    cleanup: float | None = None  # in-process: retiring the replaced tree afterwards, untimed
    spare: bool | None = None  # incremental: whether the target had a spare to bring up to date


@dataclass
class Series:
    """The timed runs of one contender in one case."""

    runs: list[Run] = field(default_factory=list)

    def median(self, key: Callable[[Run], float | None]) -> float | None:
        values = [v for v in (key(r) for r in self.runs) if v is not None]
        return statistics.median(values) if values else None


# --- the source tree ---


def _sizes(rng: random.Random, count: int, total: int) -> list[int]:
    """Log-uniform sizes between MIN_SIZE and MAX_SIZE, scaled toward the wanted total."""
    sizes = [math.exp(rng.uniform(math.log(MIN_SIZE), math.log(MAX_SIZE))) for _ in range(count)]
    for _ in range(30):  # clipping moves the sum; a few rounds converge
        scale = total / sum(sizes)
        sizes = [min(MAX_SIZE, max(MIN_SIZE, s * scale)) for s in sizes]
    return [int(s) for s in sizes]


def make_tree(root: Path, spec: TreeSpec) -> TreeInfo:
    """Given an absent root and a spec, create nested dirs of random files (a few executable,
    about 1% symlinks to siblings) and return what was made."""
    rng = random.Random(spec.seed)  # noqa: S311 - reproducible test data, not secrets
    info = TreeInfo()
    dirs = [""]
    depth = {"": 0}
    for i in range(max(1, spec.files // FILES_PER_DIR)):
        parent = rng.choice([d for d in dirs if depth[d] < 4] or [""])
        rel = f"{parent}/d{i:04d}" if parent else f"d{i:04d}"
        dirs.append(rel)
        depth[rel] = depth[parent] + 1
    for rel in dirs:
        (root / rel).mkdir(parents=True, exist_ok=True)
    info.dirs = len(dirs)
    best = -1
    sizes = (
        [spec.total_bytes // spec.files] * spec.files
        if spec.same_size
        else _sizes(rng, spec.files, spec.total_bytes)
    )
    for i, size in enumerate(sizes):
        executable = rng.random() < 0.05
        name = f"f{i:05d}.{'sh' if executable else 'dat'}"
        rel = f"{rng.choice(dirs)}/{name}".lstrip("/")
        path = root / rel
        path.write_bytes(os.urandom(size))
        path.chmod(0o755 if executable else 0o644)
        info.files += 1
        info.bytes += size
        if best < 0 or abs(size - CHANGED_FILE_SIZE) < abs(best - CHANGED_FILE_SIZE):
            best, info.changed_file = size, rel
        if rng.random() < 0.01:
            os.symlink(name, path.with_name(f"l{i:05d}"))
            info.symlinks += 1
    info.changed_size = best
    return info


def rewrite(path: Path) -> None:
    """Give a file new content of the same size and a newer mtime, in place (the directory's
    mtime stays, as when an upload overwrites one file)."""
    before = path.stat()
    with path.open("r+b") as f:
        f.write(os.urandom(before.st_size))
    after = path.stat()
    if after.st_mtime_ns <= before.st_mtime_ns:  # a coarse clock must still show the change
        os.utime(path, ns=(after.st_atime_ns, before.st_mtime_ns + 1_000_000))


def tree_differences(expected: Path, actual: Path) -> list[str]:
    """Given two trees, return how actual differs from expected: names, types, modes, sizes,
    mtimes, file contents and symlink targets."""

    def index(root: Path) -> dict[str, os.stat_result]:
        found: dict[str, os.stat_result] = {".": os.lstat(root)}
        for dirpath, dirnames, filenames in os.walk(root):
            for name in dirnames + filenames:
                full = os.path.join(dirpath, name)
                found[os.path.relpath(full, root)] = os.lstat(full)
        return found

    want, got = index(expected), index(actual)
    problems = [f"missing: {rel}" for rel in sorted(want.keys() - got.keys())]
    problems += [f"unexpected: {rel}" for rel in sorted(got.keys() - want.keys())]
    for rel in sorted(want.keys() & got.keys()):
        a, b = want[rel], got[rel]
        if a.st_mode != b.st_mode:
            problems.append(f"mode differs: {rel} {a.st_mode:o} != {b.st_mode:o}")
        elif stat.S_ISLNK(a.st_mode):
            if os.readlink(expected / rel) != os.readlink(actual / rel):
                problems.append(f"symlink target differs: {rel}")
        elif a.st_mtime_ns != b.st_mtime_ns:
            problems.append(f"mtime differs: {rel}")
        elif stat.S_ISREG(a.st_mode) and not _same_content(expected / rel, actual / rel):
            problems.append(f"content differs: {rel}")
    return problems


def _same_content(a: Path, b: Path) -> bool:
    with a.open("rb") as fa, b.open("rb") as fb:
        while True:
            chunk = fa.read(1 << 20)
            if chunk != fb.read(1 << 20):
                return False
            if not chunk:
                return True


# --- running contenders ---


GNU_TIME = "/usr/bin/time"


def timed_subprocess(
    argv: list[str], *, stdout: TextIO | int = subprocess.DEVNULL, rss_file: Path | None = None
) -> Run:
    """Run argv to completion; return its wall time, CPU time and, given rss_file, its peak
    RSS. CPU and RSS cover the children it reaped (rsync's receiver) but not syncpro's
    detached sweeper. Raise BenchError if it fails.

    A forked child starts with its parent's high-water mark, so wait4's ru_maxrss would never
    go below this Python process's RSS; GNU time forks the command from a small process and
    gives the real figure. Without it, wait4's figure is kept (see the floor in the notes)."""
    wrapped = argv
    if rss_file is not None and os.access(GNU_TIME, os.X_OK):
        wrapped = [GNU_TIME, "-f", "%M", "-o", str(rss_file), *argv]
    started = time.perf_counter()
    proc = subprocess.Popen(wrapped, stdout=stdout, stderr=subprocess.PIPE)
    assert proc.stderr is not None
    errors = proc.stderr.read()  # small: log lines and error messages
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, Popen must not wait
    proc.stderr.close()
    if proc.returncode != 0:
        tail = errors.decode(errors="replace").strip()[-2000:]
        raise BenchError(f"{' '.join(argv)} exited {proc.returncode}: {tail}")
    maxrss: int | None = usage.ru_maxrss if rss_file is not None else None
    if wrapped is not argv:
        assert rss_file is not None
        maxrss = int(rss_file.read_text(encoding="utf-8").split()[-1])
    return Run(wall=wall, cpu=usage.ru_utime + usage.ru_stime, maxrss_kib=maxrss)


def syncpro_command(explicit: str | None) -> list[str]:
    if explicit:
        return [explicit]
    beside = Path(sys.executable).parent / "syncpro"  # the console script of this venv
    if beside.exists():
        return [str(beside)]
    found = shutil.which("syncpro")
    return [found] if found else [sys.executable, "-m", "syncpro"]


def sync_filesystem() -> None:
    # Untimed, before each timed run: dirty pages left by the previous contender would
    # otherwise be flushed during (and charged to) the next one.
    os.sync()


@contextlib.contextmanager
def rusage_self() -> Iterator[list[float]]:
    box: list[float] = []
    before = resource.getrusage(resource.RUSAGE_SELF)
    yield box
    after = resource.getrusage(resource.RUSAGE_SELF)
    box.append(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)


class Bench:
    """The bench directory: sources, targets, configs, and how each contender runs."""

    def __init__(self, base: Path, syncpro: list[str]) -> None:
        self.base = base
        self.syncpro = syncpro
        self.src = base / "r" / "softdir" / APP_KEY
        self.conf_src = base / "r" / "configuredir" / APP_KEY
        # Target roots: one pair for the one-shot contenders (CLI, in-process), which take
        # turns at one target as successive runs on a host do, and a pair of its own for
        # each daemon, which owns its targets (and sweeps them) as on a host.
        self.roots = {
            owner: (base / f"soft{owner}", base / f"conf{owner}") for owner in ("", "-on", "-off")
        }
        self.cp_dst = base / "cp-copy"
        self.rsync_dst = base / "rsync-copy"
        self.configs = {fsync: base / f"config-fsync-{fsync}.yml" for fsync in ("on", "off")}
        self.daemon_configs = {fsync: base / f"daemon-fsync-{fsync}.yml" for fsync in ("on", "off")}
        self.daemons: dict[str, Daemon] = {}
        self.rss_file = base / "peak-rss"
        self.changed = ""  # the file the incremental case rewrites, relative to src
        self._engine: dict[str, Any] = {}

    def setup(self, spec: TreeSpec) -> TreeInfo:
        info = make_tree(self.src, spec)
        self.changed = info.changed_file
        self.conf_src.mkdir(parents=True)
        (self.conf_src / "app.properties").write_text("port=8080\n", encoding="utf-8")
        for name in ("u", "state"):
            (self.base / name).mkdir()
        for root in self.all_roots():
            root.mkdir()
        for fsync, path in self.configs.items():
            write_config(
                self.base,
                [app(APP_KEY, LOCAL_NAME)],
                name=path.name,
                defaults={},
                publish={"grace": 0, "fsync": fsync == "on"},
            )
        for fsync, path in self.daemon_configs.items():
            # A state and a control socket of its own; never a sync of its own accord.
            write_config(
                self.base,
                [app(APP_KEY, LOCAL_NAME)],
                name=path.name,
                defaults={},
                dirs={
                    "state": f"state-{fsync}",
                    "softdir": self.roots[f"-{fsync}"][0].name,
                    "configuredir": self.roots[f"-{fsync}"][1].name,
                },
                publish={"grace": 0, "fsync": fsync == "on"},
                watch={"settle": 3600, "max_wait": 7200, "rescan_interval": 3600},
                control={"socket": f"run-{fsync}/control.sock"},
            )
        return info

    def start_daemons(self, stack: contextlib.ExitStack) -> None:
        """Start a daemon per fsync setting; return once each has published the app."""
        for fsync, path in self.daemon_configs.items():
            daemon = stack.enter_context(Daemon(path))
            try:
                daemon.wait_ready(120)
                daemon.wait_event("sync.finished", timeout=300)
            except DaemonWaitError as exc:
                raise BenchError(f"the fsync={fsync} daemon did not start: {exc}") from exc
            self.daemons[fsync] = daemon

    def load_engine(self) -> None:
        """Import the engine in this process, its log events going where the CLI's go when
        not on a terminal (JSON lines), here to /dev/null."""
        try:
            from syncpro import log
            from syncpro.config.load import load_config
            from syncpro.engine.publish import sweep
            from syncpro.engine.request import SyncRequest
            from syncpro.engine.sync import run_sync
        except ImportError as exc:
            raise BenchError(
                f"cannot import syncpro ({exc}); run with the project's .venv/bin/python"
            ) from exc
        sink = open(os.devnull, "w", encoding="utf-8")  # noqa: SIM115 - lives as long as we do
        log.configure(sink)
        self._engine = {
            "run_sync": run_sync,
            "request": SyncRequest(k=APP_KEY, update=False),
            "sweep": sweep,
        }
        for fsync, path in self.configs.items():
            config = load_config(path)
            self._engine[fsync] = (config, config.config_inventory)

    # --- resetting between runs (untimed) ---

    def all_roots(self) -> list[Path]:
        return [root for pair in self.roots.values() for root in pair]

    def owner(self, variant: str) -> str:
        """Whose target roots a contender publishes to (see self.roots)."""
        if variant.startswith("daemon"):
            return "-on" if variant.endswith("-fsync") else "-off"
        return ""

    def targets(self, owner: str) -> tuple[Path, Path]:
        """The program and the config target of the owner's roots."""
        soft, conf = self.roots[owner]
        return soft / LOCAL_NAME, conf / LOCAL_NAME / APP_KEY

    def trash_dirs(self) -> list[Path]:
        return [root / ".syncpro" / "trash" for root in self.all_roots()]

    def trash_empty(self) -> bool:
        return trash_empty(*self.all_roots())

    def wait_for_sweeper(self, timeout: float = 300.0) -> None:
        """The CLI leaves a detached sweeper that removes the replaced tree once its grace
        (0 here) is over; let it finish so it never runs during a timed run."""
        deadline = time.monotonic() + timeout
        while not self.trash_empty():
            if time.monotonic() > deadline:
                raise BenchError(f"replaced trees still in {self.trash_dirs()} after {timeout}s")
            time.sleep(0.02)

    def retire_replaced(self) -> float:
        """Sweep both roots as the daemon (or the CLI's sweeper) does once the grace period is
        over: the replaced tree becomes the target's spare, used by the next run. Return the
        seconds it took."""
        started = time.perf_counter()
        for root in self.roots[""]:
            self._engine["sweep"](root)
        return time.perf_counter() - started

    def reset_syncpro_targets(self, owner: str) -> None:
        """Remove the owner's targets and their spares: its next run is a first publish."""
        self.wait_for_sweeper()
        program, config = self.targets(owner)
        spares = [root / ".syncpro" / "spare" for root in self.roots[owner]]
        for path in (program, config.parent, *spares):
            if path.exists():
                shutil.rmtree(path)

    # --- contenders ---

    def baseline(self, case: str) -> tuple[Run, Run]:
        """Run the case's baseline; return its run and that of the `sync -f` after it."""
        if case == "full":
            if self.cp_dst.exists():
                shutil.rmtree(self.cp_dst)
            sync_filesystem()
            run = timed_subprocess(
                ["cp", "-a", str(self.src), str(self.cp_dst)], rss_file=self.rss_file
            )
            dst = self.cp_dst
        else:
            if case == "incremental":
                rewrite(self.src / self.changed)
            sync_filesystem()
            run = timed_subprocess(
                ["rsync", "-a", "--delete", f"{self.src}/", f"{self.rsync_dst}/"],
                rss_file=self.rss_file,
            )
            dst = self.rsync_dst
        return run, timed_subprocess(["sync", "-f", str(dst)])

    def syncpro_run(self, case: str, variant: str) -> Run:
        """Run syncpro once for a case; an incremental run says whether it found a spare."""
        # A CLI run's detached sweeper (idle priority, so it may take a while) must never
        # overlap a timed run, full copies included.
        self.wait_for_sweeper()
        spare = self.roots[self.owner(variant)][0] / ".syncpro" / "spare" / LOCAL_NAME
        had_spare = spare.is_dir() if case == "incremental" else None
        run = self._syncpro_run(case, variant)
        run.spare = had_spare
        return run

    def _syncpro_run(self, case: str, variant: str) -> Run:
        if case == "full":
            self.reset_syncpro_targets(self.owner(variant))
        elif case == "incremental":
            rewrite(self.src / self.changed)
        fsync = "on" if variant.endswith("-fsync") else "off"
        sync_filesystem()
        if variant.startswith("cli"):
            with tempfile.TemporaryFile("w+", encoding="utf-8", dir=self.base) as out:
                argv = ["sync", "-k", APP_KEY, "--config", str(self.configs[fsync])]
                run = timed_subprocess([*self.syncpro, *argv], stdout=out, rss_file=self.rss_file)
                out.seek(0)
                _check_document(out.read())
            return run
        if variant.startswith("daemon"):
            return self._daemon_run(self.daemons[fsync])
        config, inventory = self._engine[fsync]
        with rusage_self() as cpu:
            started = time.perf_counter()
            result = self._engine["run_sync"](self._engine["request"], config, inventory)
            wall = time.perf_counter() - started
        if not result.ok:
            raise BenchError(f"in-process sync failed: {result.errors}")
        stats = result.apps[0].program.stats
        return Run(
            wall=wall,
            cpu=cpu[0],
            copied=stats.copied if stats else None,
            linked=stats.linked if stats else None,
            cleanup=self.retire_replaced(),  # sweep_once runs once per process: sweep here
        )

    def _daemon_run(self, daemon: Daemon) -> Run:
        """Ask a daemon for a sync of the app over its control socket, as a client does."""
        cpu = daemon.cpu_seconds()
        started = time.perf_counter()
        doc = daemon.request(timeout=600, action=SYNC_ACTION, k=APP_KEY)
        wall = time.perf_counter() - started
        if doc.get("code") != "0":
            raise BenchError(f"the daemon's sync failed: {json.dumps(doc)[:1000]}")
        # The daemon's CPU (all its threads), read in clock ticks: coarse for one run.
        return Run(wall=wall, cpu=daemon.cpu_seconds() - cpu)

    def verify(self, owner: str) -> list[str]:
        """How the owner's targets differ from the sources."""
        program, config = self.targets(owner)
        return tree_differences(self.src, program) + tree_differences(self.conf_src, config)

    def profile(self, case: str, top: int) -> str:
        """Profile one in-process fsync=off run of a case; return the top functions."""
        if case == "incremental":
            rewrite(self.src / self.changed)
        elif case == "full":
            self.reset_syncpro_targets("")
        self.retire_replaced()
        sync_filesystem()
        config, inventory = self._engine["off"]
        profiler = cProfile.Profile()
        profiler.runcall(self._engine["run_sync"], self._engine["request"], config, inventory)
        self.retire_replaced()
        text = io.StringIO()
        stats = pstats.Stats(profiler, stream=text)
        stats.sort_stats("cumulative").print_stats(top)
        stats.sort_stats("tottime").print_stats(top)
        return text.getvalue()


def _check_document(text: str) -> None:
    try:
        doc = json.loads(text)
    except ValueError as exc:
        raise BenchError(f"syncpro printed no response document: {text[:500]!r}") from exc
    if not isinstance(doc, dict):
        raise BenchError(f"unexpected response document: {text[:500]!r}")


# --- the benchmark ---


def benchmark(bench: Bench, runs: int, progress: Callable[[str], None]) -> dict[str, Any]:
    """Given a set-up bench, run every case (one warm-up round, then `runs` timed rounds) and
    return the series per case and contender. Raise BenchError if a run fails or a syncpro
    target differs from its source."""
    results: dict[str, dict[str, Series]] = {}
    # The rsync baseline starts from an up-to-date copy, as syncpro starts from its target.
    subprocess.run(["cp", "-a", str(bench.src), str(bench.rsync_dst)], check=True)
    for case in CASES:
        contenders = ["baseline", *SYNCPRO_VARIANTS]
        series = {name: Series() for name in [*contenders, "baseline+syncfs"]}
        for round_no in range(runs + 1):
            shift = round_no % len(contenders)
            order = contenders[shift:] + contenders[:shift]
            for name in order:
                if name == "baseline":
                    run, syncfs = bench.baseline(case)
                    both = Run(
                        wall=run.wall + syncfs.wall, cpu=run.cpu + syncfs.cpu, maxrss_kib=None
                    )
                    if round_no:
                        series["baseline"].runs.append(run)
                        series["baseline+syncfs"].runs.append(both)
                else:
                    run = bench.syncpro_run(case, name)
                    if round_no:
                        series[name].runs.append(run)
                    if round_no == runs:
                        # Now, before the next run of this round rewrites the source again.
                        _verify(bench, case, name)
            progress(f"{case}: round {round_no or 'warm-up'} done")
        results[case] = series
    return results


def _verify(bench: Bench, case: str, variant: str) -> None:
    bench.wait_for_sweeper()
    problems = bench.verify(bench.owner(variant))
    if problems:
        shown = "; ".join(problems[:10])
        raise BenchError(
            f"after the {case} run of {variant} its target differs from its source: {shown}"
        )


def summarise(results: dict[str, dict[str, Series]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for case, series in results.items():
        base = series["baseline"].median(lambda r: r.wall)
        base_sync = series["baseline+syncfs"].median(lambda r: r.wall)
        rows: dict[str, Any] = {}
        for name, s in series.items():
            wall = s.median(lambda r: r.wall)
            rows[name] = {
                "wall_median": wall,
                "wall_runs": [r.wall for r in s.runs],
                "cpu_median": s.median(lambda r: r.cpu),
                "maxrss_kib_max": max(
                    (r.maxrss_kib for r in s.runs if r.maxrss_kib is not None), default=None
                ),
                "copied_median": s.median(lambda r: r.copied),
                "linked_median": s.median(lambda r: r.linked),
                "cleanup_median": s.median(lambda r: r.cleanup),
                "no_spare_runs": sum(1 for r in s.runs if r.spare is False),
                "ratio_vs_baseline": wall / base if wall and base else None,
                "ratio_vs_baseline_syncfs": wall / base_sync if wall and base_sync else None,
                # Contenders of one round ran back to back, under the same load: the median
                # of per-round ratios resists a machine whose speed drifts between rounds.
                "ratio_paired_median": _paired(s, series["baseline"]),
                "ratio_syncfs_paired_median": _paired(s, series["baseline+syncfs"]),
            }
        out[case] = {"baseline": BASELINES[case], "rows": rows}
    return out


def _paired(contender: Series, baseline: Series) -> float | None:
    ratios = [c.wall / b.wall for c, b in zip(contender.runs, baseline.runs, strict=True) if b.wall]
    return statistics.median(ratios) if ratios else None


def default_parent() -> Path:
    """The system temp dir if it is on the project's filesystem, else the project's var/ (git
    ignores it): syncpro publishes on the filesystem it runs from, so measure there."""
    temp = Path(tempfile.gettempdir())
    if temp.stat().st_dev == ROOT.stat().st_dev:
        return temp
    var = ROOT / "var"
    var.mkdir(exist_ok=True)
    return var


def render(
    summary: dict[str, Any], info: TreeInfo, runs: int, base: Path, rss_floor: int | None
) -> str:
    lines = [
        f"source: {info.files} files, {info.bytes / 1e6:.1f} MB, {info.dirs} dirs, "
        f"{info.symlinks} symlinks; incremental rewrites {info.changed_file} "
        f"({info.changed_size} B)",
        f"bench dir: {base}; {runs} timed runs after 1 warm-up; medians; "
        "ratio = syncpro / baseline (< 1.0 = faster)",
        "",
        f"{'case':<21} {'contender':<27} {'wall s':>8} {'cpu s':>7} "
        f"{'x base':>7} {'x base+syncfs':>13} {'peak RSS':>9}",
    ]
    for case, data in summary.items():
        base_name = data["baseline"]
        titles = {
            "baseline": base_name,
            "baseline+syncfs": f"{base_name} + sync -f",
            **VARIANT_TITLES,
        }
        order = ["baseline", "baseline+syncfs", *SYNCPRO_VARIANTS]
        for i, name in enumerate(order):
            row = data["rows"][name]
            rss = row["maxrss_kib_max"]
            lines.append(
                f"{CASE_TITLES[case] if i == 0 else '':<21} {titles[name]:<27} "
                f"{row['wall_median']:>8.3f} {row['cpu_median']:>7.3f} "
                f"{_ratio(row['ratio_vs_baseline'], name):>7} "
                f"{_ratio(row['ratio_vs_baseline_syncfs'], name):>13} "
                f"{f'{rss / 1024:.1f} MB' if rss else '':>9}"
            )
        lines.append("")
    notes = []
    for case, data in summary.items():
        missing = sum(row["no_spare_runs"] for row in data["rows"].values())
        if missing:
            # Not the steady state the case stands for: such a run links a whole new tree.
            notes.append(
                f"{CASE_TITLES[case]}: {missing} timed syncpro runs found no spare to bring "
                "up to date"
            )
        row = data["rows"]["inproc-nofsync"]
        if row["copied_median"] is None:
            # Nothing differed: the engine left the published tree in place, no build ran.
            notes.append(f"{CASE_TITLES[case]}: published tree left in place, nothing built")
            continue
        notes.append(
            f"{CASE_TITLES[case]}: in-process build copied {row['copied_median']:.0f} and "
            f"linked or kept {row['linked_median']:.0f} files; retiring the replaced tree "
            f"afterwards (deferred, untimed) took {row['cleanup_median']:.3f} s"
        )
    lines += ["notes:", *(f"  {n}" for n in notes)]
    method = "GNU time" if os.access(GNU_TIME, os.X_OK) else "wait4"
    floor = f"{rss_floor / 1024:.1f} MB" if rss_floor else "unknown"
    lines.append(
        f"  peak RSS: max over the timed runs, by {method}, command and its children; "
        f"`true` measured the same way: {floor}"
    )
    return "\n".join(lines)


def _ratio(value: float | None, name: str) -> str:
    return f"{value:.2f}" if value is not None and name in SYNCPRO_VARIANTS else ""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--files", type=int, default=5000, help="files in the source tree")
    parser.add_argument("--size-mb", type=float, default=200.0, help="total size of the tree")
    parser.add_argument(
        "--quick", action="store_true", help="a small tree: 1,000 files, 20 MB (overrides both)"
    )
    parser.add_argument("--runs", type=int, default=3, help="timed runs per contender")
    parser.add_argument("--seed", type=int, default=1, help="seed of the generated tree")
    parser.add_argument(
        "--dir",
        type=Path,
        default=None,
        help="parent of the temporary bench dir (default: the system temp dir if it is on the "
        "project's filesystem, else the project's var/)",
    )
    parser.add_argument(
        "--loop-ext4",
        type=int,
        metavar="GIB",
        default=None,
        help="run on a fresh journaled ext4 of GIB GiB, loop-mounted (root; 4 is enough)",
    )
    parser.add_argument("--syncpro", default=None, help="the syncpro command (default: the venv's)")
    parser.add_argument("--json", action="store_true", help="print a JSON document instead")
    parser.add_argument("--keep", action="store_true", help="keep the bench dir afterwards")
    parser.add_argument(
        "--profile",
        choices=CASES,
        default=None,
        help="afterwards, cProfile one in-process fsync=off run of this case",
    )
    parser.add_argument(
        "--big", action="store_true", help="8 files of 12 MB (overrides --files and --size-mb)"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.files, args.size_mb = 1000, 20.0
    if args.big:
        args.files, args.size_mb = 8, 96.0
    if args.files < 1 or args.runs < 1 or args.size_mb * 1e6 < args.files * MIN_SIZE:
        parser.error("need --files >= 1, --runs >= 1 and --size-mb >= files x 100 B")
    if not args.big and args.size_mb * 1e6 > args.files * MAX_SIZE:
        parser.error("--size-mb too large for --files files of at most 1 MiB")
    if args.dir is not None and not args.dir.is_dir():
        parser.error(f"--dir {args.dir} is not a directory")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    missing = [tool for tool in ("cp", "rsync", "sync") if shutil.which(tool) is None]
    if missing:
        print(f"bench_sync: please install {', '.join(missing)}", file=sys.stderr)
        return 2

    def progress(message: str) -> None:
        print(f"bench_sync: {message}", file=sys.stderr, flush=True)

    with contextlib.ExitStack() as stack:
        parent = args.dir or default_parent()
        if args.loop_ext4:
            try:
                parent = stack.enter_context(bench_fs.loop_ext4(args.loop_ext4, args.dir))
            except (OSError, subprocess.CalledProcessError) as exc:
                progress(f"cannot make the loop-mounted ext4: {exc}")
                return 1
        base = Path(tempfile.mkdtemp(prefix="syncpro-bench.", dir=parent))
        return run(args, base, progress)


def run(args: argparse.Namespace, base: Path, progress: Callable[[str], None]) -> int:
    """Run the benchmark in base, print its report; remove base unless --keep says not to
    (or it lies on a loop filesystem that goes anyway)."""
    filesystem, warning = bench_fs.describe(base), bench_fs.warning(base)
    if warning:
        progress(warning)
    daemons = contextlib.ExitStack()
    try:
        bench = Bench(base, syncpro_command(args.syncpro))
        spec = TreeSpec(args.files, int(args.size_mb * 1e6), args.seed, same_size=args.big)
        progress(f"creating {spec.files} files, {spec.total_bytes / 1e6:.0f} MB under {base}")
        info = bench.setup(spec)
        bench.load_engine()
        progress("starting a daemon per fsync setting")
        bench.start_daemons(daemons)
        rss_floor = timed_subprocess(["true"], rss_file=bench.rss_file).maxrss_kib
        results = benchmark(bench, args.runs, progress)
        summary = summarise(results)
        profile = bench.profile(args.profile, 25) if args.profile else None
        if args.json:
            doc = {
                "tree": asdict(info),
                "runs": args.runs,
                "dir": str(base),
                "filesystem": filesystem,
                "warning": warning,
                "syncpro": bench.syncpro,
                "verified": True,
                "peak_rss_method": "GNU time" if os.access(GNU_TIME, os.X_OK) else "wait4",
                "peak_rss_floor_kib": rss_floor,
                "cases": summary,
            }
            print(json.dumps(doc, indent=2))
        else:
            print(render(summary, info, args.runs, base, rss_floor))
            print(f"  filesystem: {filesystem}" + (f"; {warning}" if warning else ""))
        if profile:
            print(profile, file=sys.stderr if args.json else sys.stdout)
        return 0
    except (BenchError, OSError, subprocess.CalledProcessError) as exc:
        print(f"bench_sync: {exc}", file=sys.stderr)
        return 1
    finally:
        daemons.close()
        if args.keep and not args.loop_ext4:
            print(f"bench_sync: kept {base}", file=sys.stderr)
        else:
            with contextlib.suppress(BenchError):
                Bench(base, []).wait_for_sweeper(timeout=10)
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
