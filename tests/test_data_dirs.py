"""The data dirs a config names are made when missing; a file in the way is named as such."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.daemon  # it starts the daemon as a subprocess


def test_a_data_dir_that_is_a_file_stops_the_start_naming_the_key(tmp_path: Path) -> None:
    (tmp_path / "soft").write_text("a stray file where the target root should be")
    config = tmp_path / "config.yml"
    config.write_text(
        yaml.safe_dump(
            {
                "dirs": {
                    "remotecomdir": str(tmp_path / "r"),
                    "updatedir": str(tmp_path / "u"),
                    "softdir": str(tmp_path / "soft"),
                    "configuredir": str(tmp_path / "conf"),
                    "state": str(tmp_path / "state"),
                },
                "control": {"socket": str(tmp_path / "control.sock")},
                "apps": [{"app_key": "a1", "local_name": "a"}],
            }
        )
    )

    proc = subprocess.run(
        [sys.executable, "-m", "syncpro", "serve", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert proc.returncode == 2
    assert "dirs.softdir is not a directory (a file is in the way)" in proc.stderr
    assert "File exists" not in proc.stderr + proc.stdout
