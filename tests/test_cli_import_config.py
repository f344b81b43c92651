"""`syncpro import-config` as a real subprocess: stdout is a loadable config, nothing else."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from syncpro.config.load import parse_config

pytestmark = pytest.mark.daemon  # every test here starts syncpro as a subprocess

ORIGINAL = """\
env:
 key: prod
prod:
 softdir: /data/release/softdir
 configuredir: /data/release/configuredir
 local_prodir: /data/download/softdir
 local_confdir: /data/download/configuredir
 update_local_prodir: /data/update/softdir
 update_local_confdir: /data/update/configuredir
 dbhost: 127.0.0.1
 dbport: 3306
 dbuser: deploy
 dbpassword: s3cret-never-printed
 dbname: autotask
 deploy_config_table: pre_server_detail
"""


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "syncpro", "import-config", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_import_config_prints_a_config_that_loads_and_keeps_the_password_out(
    tmp_path: Path,
) -> None:
    original = tmp_path / "rex/config/config.yml"
    original.parent.mkdir(parents=True)
    original.write_text(ORIGINAL, encoding="utf-8")

    done = run(str(original))

    assert done.returncode == 0, done.stderr
    config = parse_config(yaml.safe_load(done.stdout), tmp_path / "config.yml")
    assert config.dirs.remotecomdir == Path("/data/download")
    assert config.dirs.updatedir == Path("/data/update")
    assert config.inventory.source == "mysql"
    assert "s3cret-never-printed" not in done.stdout + done.stderr


def test_import_config_of_a_missing_file_is_one_message_and_exit_2(tmp_path: Path) -> None:
    done = run(str(tmp_path / "nope.yml"))

    assert done.returncode == 2
    assert "nope.yml" in done.stderr
    assert "Traceback" not in done.stderr


def test_import_config_names_on_stderr_every_key_it_left_out_secrets_first(
    tmp_path: Path,
) -> None:
    original = tmp_path / "rex/config/config.yml"
    original.parent.mkdir(parents=True)
    text = ORIGINAL.replace("dbpassword:", "dbpass:")
    original.write_text(text + " token: tok-never-printed\n listen: 0.0.0.0:3000\n")

    done = run(str(original))

    assert done.returncode == 0, done.stderr
    notes = done.stderr.splitlines()
    assert notes[0].startswith("syncpro import-config: read section prod (chosen by env.key)")
    assert notes[1] == ("syncpro import-config: not used, password-like (never copied): prod.token")
    assert "the /rex endpoint's token: put it in a file and set http.token_file" in notes[2]
    assert any("prod.listen, the /rex endpoint's address: set http.listen" in n for n in notes)
    # dbpass was read as the database password: a password_file is set up for it.
    config = parse_config(yaml.safe_load(done.stdout), tmp_path / "config.yml")
    assert config.inventory.password_file is not None
    assert "the original's prod.dbpass into" in done.stdout
    assert "never-printed" not in done.stdout + done.stderr
