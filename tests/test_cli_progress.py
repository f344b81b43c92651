"""`syncpro sync`'s progress line: on a terminal, files, bytes and rate that disappear when
done; nothing of it when stderr is piped."""

from __future__ import annotations

import io
import os
import pty
import subprocess
import sys
from pathlib import Path

import pytest

from syncpro.testing import put, write_config

from helpers import read_terminal

pytestmark = pytest.mark.daemon  # nearly every test here runs the syncpro command

SYNCPRO = str(Path(sys.executable).parent / "syncpro")
ERASE = "\r\x1b[K"


def config(tmp_path: Path) -> Path:
    put(tmp_path / "r/softdir/server1", {f"lib/{n}.jar": "x" * 1000 for n in range(20)})
    put(tmp_path / "r/configuredir/server1", {"app.properties": "node=1\n"})
    return write_config(tmp_path, [{"app_key": "server1", "local_name": "server"}])


def environ() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "SYNCPRO_CONFIG"}


def sync_with_stderr_on_a_terminal(config: Path) -> tuple[int, str, str]:
    """Run `syncpro sync` with stderr on a pseudo-terminal and stdout piped; return the exit
    code, what the terminal got and stdout."""
    main, side = pty.openpty()
    with subprocess.Popen(
        [SYNCPRO, "sync", "-k", "server1", "--config", str(config)],
        env=environ(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=side,
    ) as proc:
        os.close(side)
        written = read_terminal(main)
        assert proc.stdout is not None
        stdout = proc.stdout.read().decode()
        code = proc.wait(timeout=60)
    os.close(main)
    return code, written.decode(), stdout


def test_a_terminal_sees_files_bytes_and_rate_and_the_line_is_erased_at_the_end(
    tmp_path: Path,
) -> None:
    code, shown, stdout = sync_with_stderr_on_a_terminal(config(tmp_path))

    assert code == 0
    assert "syncing: " in shown
    # The program tree's 20 files of 1000 bytes, planned whole before the first is made.
    assert "/20 files" in shown
    assert " B/s" in shown or "iB/s" in shown
    # Erased after its last drawing: no half line stays on the terminal.
    assert shown.rindex(ERASE) > shown.rindex("syncing: ")
    assert '"code"' in stdout  # the result document, piped, as ever


def test_a_piped_stderr_gets_no_progress(tmp_path: Path) -> None:
    proc = subprocess.run(
        [SYNCPRO, "sync", "-k", "server1", "--config", str(config(tmp_path))],
        env=environ(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0
    assert "syncing" not in proc.stderr
    assert "\x1b[K" not in proc.stderr


def test_a_log_line_erases_the_progress_line_first() -> None:
    from syncpro.cli import ProgressLine

    out = io.StringIO()
    line = ProgressLine(out, interval=0.0)
    line("planned", 1, 100)
    line("copied", 1, 100)
    line.write("an event\n")
    line.clear()

    text = out.getvalue()
    assert text.startswith(ERASE + "syncing: 1/1 files, 100")
    assert text.endswith(ERASE + "an event\n")
