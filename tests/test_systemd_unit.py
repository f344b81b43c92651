"""The shipped systemd unit: what it promises, and that systemd itself accepts it."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from syncpro.daemon.service import STOP_TIMEOUT

SYSTEMD = Path(__file__).resolve().parent.parent / "systemd"
UNIT = SYSTEMD / "syncpro.service"
DROP_INS = SYSTEMD / "syncpro.service.d"
SYSUSERS = SYSTEMD / "syncpro.sysusers"
TMPFILES = SYSTEMD / "syncpro.tmpfiles"


def _settings(text: str) -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def _systemd_analyze() -> str:
    found = shutil.which("systemd-analyze")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("systemd-analyze is missing; CI must be able to verify the unit")
        pytest.skip("systemd-analyze is not installed")
    return found


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("Type", "notify"),
        ("NotifyAccess", "main"),
        ("Restart", "on-failure"),
        ("RestartPreventExitStatus", "2"),
        ("ExecReload", "/bin/kill -HUP $MAINPID"),
        ("RuntimeDirectory", "syncpro"),
        ("StateDirectory", "syncpro"),
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("PrivateTmp", "yes"),
        ("KillMode", "mixed"),
        # Optional: SYNCPRO_DB_PASSWORD and the like, read by systemd as root.
        ("EnvironmentFile", "-/etc/syncpro/env"),
    ],
)
def test_the_unit_sets(key: str, value: str) -> None:
    assert _settings(UNIT.read_text())[key] == [value]


def test_the_unit_has_a_watchdog_and_writable_data_dirs() -> None:
    settings = _settings(UNIT.read_text())
    assert int(settings["WatchdogSec"][0]) > 0
    assert settings["ReadWritePaths"][0]
    assert settings["ExecStart"][0].split()[1:] == [
        "serve",
        "--config",
        "/etc/syncpro/config.yml",
    ]


def test_the_stop_timeout_leaves_room_above_the_daemons_own_deadline() -> None:
    # systemd SIGKILLs whatever outlives TimeoutStopSec: a sync must never be cut off there,
    # so the daemon's one deadline for all of shutdown ends well before it.
    (timeout,) = _settings(UNIT.read_text())["TimeoutStopSec"]
    assert int(timeout) >= 2 * STOP_TIMEOUT


def _verify(analyze: str, unit: Path) -> tuple[int, str]:
    """Return the exit status and output of `systemd-analyze verify` for unit (and the
    drop-ins beside it)."""
    options = ["--man=no"]
    usage = subprocess.run([analyze, "--help"], capture_output=True, text=True, check=False)
    if "--recursive-errors" in usage.stdout:  # systemd >= 250
        # Only this unit: warnings about the host's own units it pulls in (network-online.target,
        # multi-user.target) are not ours to fix.
        options.append("--recursive-errors=no")
    result = subprocess.run(
        [analyze, "verify", *options, str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return result.returncode, result.stdout + result.stderr


def _installed_unit(folder: Path, *, drop_ins: bool) -> Path:
    """Copy the unit into folder, with its drop-ins beside it when asked, as systemd would find
    them in /etc/systemd/system; return the unit's path."""
    # verify insists that ExecStart's binary exists; the shipped path (/usr/local/bin) does not
    # here, so verify a copy that starts this checkout's console script instead.
    script = Path(sys.executable).with_name("syncpro")
    command = str(script) if script.is_file() else f"{sys.executable} -m syncpro"
    text, count = re.subn(
        r"^ExecStart=\S+", f"ExecStart={command}", UNIT.read_text(), flags=re.MULTILINE
    )
    assert count == 1
    unit = folder / UNIT.name
    unit.write_text(text)
    if drop_ins:
        shutil.copytree(DROP_INS, folder / DROP_INS.name)
    return unit


def test_systemd_analyze_verify_accepts_the_unit(tmp_path: Path) -> None:
    analyze = _systemd_analyze()
    # Some versions exit 0 even for unknown keys and unparsable values, which they only print;
    # with no systemd running verify prints nothing else (tried on systemd 252, root and
    # unprivileged), so any output at all is a finding.
    assert _verify(analyze, _installed_unit(tmp_path, drop_ins=False)) == (0, "")


def test_systemd_analyze_verify_accepts_the_unit_with_its_drop_ins(tmp_path: Path) -> None:
    analyze = _systemd_analyze()
    unit = _installed_unit(tmp_path, drop_ins=True)
    assert sorted(p.name for p in (tmp_path / DROP_INS.name).iterdir()) == ["non-root.conf"]
    assert _verify(analyze, unit) == (0, "")
    # The same check notices a mistake in a drop-in: the drop-ins really were read.
    broken = tmp_path / DROP_INS.name / "zz-broken.conf"
    broken.write_text("[Service]\nNoSuchSetting=yes\n")
    assert "NoSuchSetting" in _verify(analyze, unit)[1]


def test_the_non_root_drop_in_runs_as_the_user_sysusers_makes_without_capabilities() -> None:
    settings = _settings((DROP_INS / "non-root.conf").read_text())
    assert settings["User"] == ["syncpro"]
    assert settings["Group"] == ["syncpro"]
    assert settings["CapabilityBoundingSet"] == [""]
    (line,) = [
        line for line in SYSUSERS.read_text().splitlines() if line and not line.startswith("#")
    ]
    kind, name, *_ = line.split()
    assert (kind, name) == ("u", "syncpro")


def test_sysusers_and_tmpfiles_make_the_user_and_the_units_writable_folders(
    tmp_path: Path,
) -> None:
    sysusers, tmpfiles = shutil.which("systemd-sysusers"), shutil.which("systemd-tmpfiles")
    if sysusers is None or tmpfiles is None:
        if os.environ.get("CI"):
            pytest.fail("systemd-sysusers/systemd-tmpfiles are missing; CI must check the files")
        pytest.skip("systemd-sysusers or systemd-tmpfiles is not installed")
    if os.geteuid() != 0:
        pytest.skip("systemd-tmpfiles --root chowns the folders it makes: needs root")
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    for tool, config in ((sysusers, SYSUSERS), (tmpfiles, TMPFILES)):
        # Both read the files given as arguments and write under --root only; no PID 1 needed.
        extra = ["--create"] if tool == tmpfiles else []
        result = subprocess.run(
            [tool, f"--root={root}", *extra, str(config)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        # sysusers reports what it creates; any other line is a warning about the file.
        said = [line for line in result.stderr.splitlines() if not line.startswith("Creating ")]
        assert (result.returncode, said) == (0, []), result.stderr
    users = {
        fields[0]: fields
        for fields in (line.split(":") for line in (root / "etc/passwd").read_text().splitlines())
    }
    uid, gid = int(users["syncpro"][2]), int(users["syncpro"][3])
    assert users["syncpro"][5] == "/var/lib/syncpro"  # the unit's StateDirectory=
    assert uid != 0
    # Every folder of the unit's ReadWritePaths= exists, owned by the user, with the four data
    # folders inside; the config folder is readable by the daemon and writable by root only.
    (writable,) = _settings(UNIT.read_text())["ReadWritePaths"]
    for path in writable.split():
        data = root / path.lstrip("-/")
        for folder in (data, *(data / n for n in ("remotecomdir", "updatedir"))):
            st = folder.stat()
            assert (st.st_uid, st.st_gid) == (uid, gid), folder
        for name in ("softdir", "configuredir"):
            st = (data / name).stat()
            assert (st.st_uid, st.st_mode & 0o7777) == (uid, 0o755), name
    config = (root / "etc/syncpro").stat()
    assert (config.st_uid, config.st_gid, config.st_mode & 0o7777) == (0, gid, 0o750)
