"""Importing the original platform's config/config.yml as a syncpro config.yml."""

from __future__ import annotations

import re
import subprocess
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml

from syncpro.config.import_original import import_original, import_original_config
from syncpro.config.load import load_config, parse_config
from syncpro.config.model import Config
from syncpro.errors import ConfigError
from syncpro.inventory.mysql import parse_mysql_url

# Fresh per run, so a match can only mean the importer copied one.
DB_SECRET = f"db-{uuid.uuid4().hex}"
SSH_SECRET = f"ssh-{uuid.uuid4().hex}"
SUDO_SECRET = f"sudo-{uuid.uuid4().hex}"
RSYNC_SECRET = f"rsync-{uuid.uuid4().hex}"
SECRETS = (DB_SECRET, SSH_SECRET, SUDO_SECRET, RSYNC_SECRET)

# The shape of the original file: top-level keys indented by one space, everything quoted,
# the database in a `db:` section, many keys syncpro has no use for.
ORIGINAL = f"""\
#主配置文件
#环境变量设置,dev/uat/com等不同的环境变量设置
 db:
   dbname: "autotask"
   dbhost: "10.0.0.5"
   dbuser: "public"
   dbpassword: "{DB_SECRET}"
   dbport: "3306"
   apitable: "pre_host_zzb"
 env:
   key: "dev"
#开发环境配置
 dev:
   key_auth: "false"
   pass_auth: "true"
   user: "autotask"
   password: "{SSH_SECRET}"
   private_key: "keys/autotask"
   global_sudo: "off"
   sudo_password: "{SUDO_SECRET}"
   logfile: "logs/rex.log"
   groups_file: "true,config/ip_lists.ini"
   timeout: "10"
   parallelism: "4"
   table_string: "id,app_key,server_name,network_ip,pro_type,config_dir,pro_dir,local_name"
   softdir: "softdir/"
   configuredir: "configuredir/"
   local_prodir: "remotecomdir/softdir/"
   local_confdir: "remotecomdir/configuredir/"
   update_local_prodir: "updatedir/softdir/"
   update_local_confdir: "updatedir/configuredir/"
   temp: "temp/"
   log_rsync_pass: "{RSYNC_SECRET}"
   max_grep_row: 500
   backup_dir: "/data/backup"
   download_all : "false"
   deploy_config_table: "pre_server_detail"
   deploy_record_table: "pre_deploy_manage"
   external_status: "false"
   external_deploy_config_table: "pre_external_server_detail"
#生产环境配置
 prod:
   key_auth: "true"
   user: "autotask"
   password: ""
   softdir: "/data/RexDeploy/softdir/"
   configuredir: "/data/RexDeploy/configuredir/"
   local_prodir: "/data/RexDeploy/remotecomdir/softdir/"
   local_confdir: "/data/RexDeploy/remotecomdir/configuredir/"
   update_local_prodir: "/data/builds/softdir"
   update_local_confdir: "/data/builds/configuredir"
   dbhost: "db.prod.example"
   dbuser: "deploy"
   dbpassword: "{DB_SECRET}"
   dbport: 3307
   dbname: "autotask_prod"
   deploy_config_table: "pre_server_detail_prod"
"""


def write_original(tmp_path: Path, text: str = ORIGINAL) -> Path:
    """Write the original config where the original kept it: <install dir>/config/config.yml."""
    path = tmp_path / "RexDeploy" / "config" / "config.yml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def edit(text: str, section: str, **values: Any) -> str:
    """Return the original text with keys of one section replaced, added, or (None) removed."""
    raw = yaml.safe_load(text)
    for key, value in values.items():
        if value is None:
            raw[section].pop(key, None)
        else:
            raw[section][key] = value
    return yaml.safe_dump(raw, allow_unicode=True)


def imported(path: Path, **kwargs: Any) -> tuple[str, Config]:
    text = import_original_config(path, **kwargs)
    return text, parse_config(yaml.safe_load(text), path.with_name("imported.yml"))


def problems_of(path: Path, **kwargs: Any) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        import_original_config(path, **kwargs)
    assert caught.value.path == str(path)
    return caught.value.problems


# --- paths ---


def test_relative_paths_are_made_absolute_against_the_install_directory(tmp_path: Path) -> None:
    path = write_original(tmp_path)
    install = tmp_path / "RexDeploy"

    text, config = imported(path)

    assert config.dirs.remotecomdir == install / "remotecomdir"
    assert config.dirs.updatedir == install / "updatedir"
    assert config.dirs.softdir == install / "softdir"
    assert config.dirs.configuredir == install / "configuredir"
    assert config.dirs.state == Path("/var/lib/syncpro")
    assert config.apps == ()
    assert "ACTION NEEDED" not in text


def test_an_explicit_base_replaces_the_install_directory(tmp_path: Path) -> None:
    path = write_original(tmp_path)

    _, config = imported(path, base=tmp_path / "elsewhere")

    assert config.dirs.remotecomdir == tmp_path / "elsewhere" / "remotecomdir"
    assert config.dirs.softdir == tmp_path / "elsewhere" / "softdir"


def test_a_relative_config_path_resolves_against_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_original(tmp_path)
    monkeypatch.chdir(tmp_path / "RexDeploy")

    _, config = imported(Path("config/config.yml"))

    assert config.dirs.updatedir == tmp_path / "RexDeploy" / "updatedir"


def test_absolute_paths_are_kept_and_trailing_slashes_dropped(tmp_path: Path) -> None:
    path = write_original(tmp_path)

    text, config = imported(path, env_key="prod")

    assert config.dirs.remotecomdir == Path("/data/RexDeploy/remotecomdir")
    assert config.dirs.updatedir == Path("/data/builds")
    assert config.dirs.softdir == Path("/data/RexDeploy/softdir")
    assert config.dirs.configuredir == Path("/data/RexDeploy/configuredir")
    assert '"/data/RexDeploy/softdir"' in text


def test_downloads_kept_apart_get_a_remotecomdir_and_the_moves_to_make(tmp_path: Path) -> None:
    root = tmp_path / "srv"
    path = write_original(
        tmp_path,
        edit(
            ORIGINAL,
            "dev",
            softdir=f"{root}/softdir/",
            configuredir=f"{root}/configuredir/",
            local_prodir=f"{root}/remote_pro/",
            local_confdir=f"{root}/remote conf/",
        ),
    )

    text, config = imported(path)

    # The common parent also holds the pending-release dirs: a watched source cannot.
    assert config.dirs.remotecomdir == root / "remotecomdir"
    assert "ACTION NEEDED" in text
    assert "local_prodir and local_confdir" in text
    commands = [
        line.split("#   ", 1)[1] for line in text.splitlines() if line.startswith("  #   mkdir")
    ]
    assert len(commands) == 2

    (root / "remote_pro" / "server1").mkdir(parents=True)
    (root / "remote_pro" / "server1" / "app.jar").write_text("jar")
    (root / "remote conf" / "server1").mkdir(parents=True)
    (root / "remote conf" / "server1" / "app.yml").write_text("conf")
    for command in commands:
        subprocess.run(["bash", "-ec", command], check=True)

    remotecomdir = config.dirs.remotecomdir
    assert (remotecomdir / "softdir" / "server1" / "app.jar").read_text() == "jar"
    assert not (remotecomdir / "softdir").is_symlink()
    assert (remotecomdir / "configuredir" / "server1" / "app.yml").read_text() == "conf"
    # the original keeps downloading through its old paths
    assert (root / "remote_pro").resolve() == remotecomdir / "softdir"
    assert (root / "remote conf" / "server1" / "app.yml").read_text() == "conf"


def test_sibling_download_dirs_with_other_names_stay_under_their_parent(tmp_path: Path) -> None:
    path = write_original(
        tmp_path,
        edit(
            ORIGINAL, "dev", update_local_prodir="builds/prog", update_local_confdir="builds/conf"
        ),
    )

    text, config = imported(path)

    builds = tmp_path / "RexDeploy" / "builds"
    assert config.dirs.updatedir == builds
    assert f"mv -T {builds}/prog {builds}/softdir" in text
    assert f"mv -T {builds}/conf {builds}/configuredir" in text
    assert "update_local_prodir and update_local_confdir" in text


def test_overlapping_program_and_config_downloads_are_refused(tmp_path: Path) -> None:
    path = write_original(tmp_path, edit(ORIGINAL, "dev", local_confdir="remotecomdir/softdir/x"))

    problems = problems_of(path)

    assert len(problems) == 1
    assert problems[0].startswith("dev.local_confdir: ")
    assert "overlaps dev.local_prodir" in problems[0]


def test_a_config_syncpro_would_reject_is_not_handed_out(tmp_path: Path) -> None:
    # Pending-release programs inside the download area would make every publish a new event.
    path = write_original(tmp_path, edit(ORIGINAL, "dev", softdir="remotecomdir/softdir/x"))

    problems = problems_of(path)

    assert any(
        p.startswith("the imported config would be invalid: dirs.softdir:") for p in problems
    )


# --- the environment ---


def test_the_environment_named_by_env_key_is_imported(tmp_path: Path) -> None:
    path = write_original(tmp_path, ORIGINAL.replace('key: "dev"', 'key: "prod"'))

    text, config = imported(path)

    assert config.dirs.softdir == Path("/data/RexDeploy/softdir")
    assert config.inventory.url == "mysql://deploy@db.prod.example:3307/autotask_prod"
    assert 'environment "prod"' in text


def test_an_explicit_environment_overrides_env_key(tmp_path: Path) -> None:
    path = write_original(tmp_path)

    _, config = imported(path, env_key="prod")

    assert config.inventory.table == "pre_server_detail_prod"


def test_a_missing_environment_section_is_named_with_the_ones_found(tmp_path: Path) -> None:
    path = write_original(tmp_path, ORIGINAL.replace('key: "dev"', 'key: "uat"'))

    problems = problems_of(path)

    assert problems == [
        "uat: missing (the environment section env.key selects);"
        " pass --env NAME to import one of them (dev, prod)"
    ]


def test_a_missing_environment_chosen_by_env_says_so_not_env_key(tmp_path: Path) -> None:
    problems = problems_of(write_original(tmp_path), env_key="staging")

    assert problems == [
        "staging: missing (the environment section --env selects;"
        " environment sections found: dev, prod)"
    ]


def test_a_missing_env_key_is_named(tmp_path: Path) -> None:
    path = write_original(tmp_path, ORIGINAL.replace(' env:\n   key: "dev"\n', ""))

    assert problems_of(path) == [
        "env.key: missing (it names the environment section to import);"
        " pass --env NAME to import one of them (dev, prod)"
    ]


def test_a_scalar_env_is_explained_and_env_suggested(tmp_path: Path) -> None:
    path = write_original(tmp_path, ORIGINAL.replace(' env:\n   key: "dev"\n', ' env: "dev"\n'))

    assert problems_of(path) == [
        "env.key: missing (env is the plain value 'dev', not a section with a key);"
        " pass --env NAME to import one of them (dev, prod)"
    ]


def test_a_flat_file_is_told_where_the_original_keeps_its_paths(tmp_path: Path) -> None:
    flat = "softdir: /s\nconfiguredir: /c\nlocal_prodir: /r/softdir\n"

    (problem,) = problems_of(write_original(tmp_path, flat))

    assert problem.startswith("env.key: missing (softdir, configuredir, local_prodir sit at the")
    assert "env: {key: NAME}" in problem


# --- what was read and what was left out ---


def test_every_key_not_used_is_named_with_password_like_keys_apart(tmp_path: Path) -> None:
    result = import_original(write_original(tmp_path))

    assert set(result.unused_secrets) == {
        "dev.password",
        "dev.private_key",
        "dev.sudo_password",
        "dev.log_rsync_pass",
    }
    assert "dev.pass_auth" in result.unused  # a switch, no secret in it
    assert {"dev.key_auth", "dev.logfile", "db.apitable"} <= set(result.unused)
    assert "dev.softdir" not in result.unused + result.unused_secrets
    assert "db.dbpassword" not in result.unused + result.unused_secrets  # read, as a password
    assert result.unused_sections == ("prod",)
    notes = result.notes()
    assert notes[1].startswith("not used, password-like (never copied): dev.password")
    assert notes[-1] == "not read: section prod (another environment: --env prod imports it)"
    assert "# not used, password-like (never copied): dev.password" in result.text
    for secret in SECRETS:
        assert secret not in "\n".join(notes) + result.text


def test_the_notes_say_which_section_was_read_and_what_chose_it(tmp_path: Path) -> None:
    path = write_original(tmp_path)

    by_env_key = import_original(path).notes()[0]
    by_option = import_original(path, env_key="prod").notes()[0]

    assert by_env_key.startswith("read section dev (chosen by env.key)")
    assert by_option.startswith("read section prod (chosen by --env)")
    assert "else from section db" in by_option


def test_a_database_password_of_the_environment_shadows_the_db_one_which_is_named(
    tmp_path: Path,
) -> None:
    result = import_original(write_original(tmp_path), env_key="prod")

    assert "db.dbpassword" in result.unused_secrets
    assert "prod.dbpassword" not in result.unused_secrets
    assert "the original's prod.dbpassword into" in result.text


def test_dbpass_is_taken_for_the_database_password(tmp_path: Path) -> None:
    path = write_original(tmp_path, ORIGINAL.replace("dbpassword:", "dbpass:"))

    text, config = imported(path)

    assert config.inventory.password_file == Path("/etc/syncpro/db.password")
    assert "the original's db.dbpass into" in text
    assert "no database password" not in text
    assert DB_SECRET not in text


# --- the inventory and its password ---


def test_the_inventory_points_at_the_original_table_with_a_password_file(tmp_path: Path) -> None:
    path = write_original(tmp_path)

    text, config = imported(path)

    assert config.inventory.source == "mysql"
    assert config.inventory.url == "mysql://public@10.0.0.5:3306/autotask"
    assert config.inventory.table == "pre_server_detail"
    assert config.inventory.password_file == Path("/etc/syncpro/db.password")
    assert re.search(r"#.*dbpassword into\n.*\n.*install -m 0600", text)


def test_no_password_of_the_original_appears_in_the_output(tmp_path: Path) -> None:
    path = write_original(tmp_path)

    texts = [import_original_config(path), import_original_config(path, env_key="prod")]

    for text in texts:
        for secret in SECRETS:
            assert secret not in text


def test_without_a_database_password_no_password_file_is_configured(tmp_path: Path) -> None:
    text = ORIGINAL.replace(f'dbpassword: "{DB_SECRET}"', 'dbpassword: ""')
    path = write_original(tmp_path, text)

    text, config = imported(path)

    assert config.inventory.password_file is None
    assert "no database password" in text


def test_database_keys_of_the_environment_win_over_the_db_section(tmp_path: Path) -> None:
    path = write_original(tmp_path, edit(ORIGINAL, "dev", dbhost="db.dev", dbname="dev_db"))

    _, config = imported(path)

    assert config.inventory.url == "mysql://public@db.dev:3306/dev_db"


def test_odd_user_and_database_names_survive_the_url(tmp_path: Path) -> None:
    path = write_original(tmp_path, edit(ORIGINAL, "dev", dbuser="deploy@ops", dbname="auto task"))

    _, config = imported(path)

    assert config.inventory.url is not None
    target = parse_mysql_url(config.inventory.url)
    assert (target.user, target.database, target.host) == ("deploy@ops", "auto task", "10.0.0.5")


def test_external_status_true_imports_the_external_table(tmp_path: Path) -> None:
    path = write_original(tmp_path, edit(ORIGINAL, "dev", external_status="true"))

    _, config = imported(path)

    assert config.inventory.table == "pre_external_server_detail"


def test_a_missing_table_name_defaults_to_pre_server_detail(tmp_path: Path) -> None:
    path = write_original(tmp_path, edit(ORIGINAL, "prod", deploy_config_table=None))

    _, config = imported(path, env_key="prod")

    assert config.inventory.table == "pre_server_detail"


def test_a_table_name_that_is_not_an_identifier_is_refused(tmp_path: Path) -> None:
    path = write_original(tmp_path, edit(ORIGINAL, "dev", deploy_config_table="t; DROP TABLE x"))

    assert problems_of(path) == [
        "dev.deploy_config_table: 't; DROP TABLE x' is not a plain table name"
    ]


# --- errors ---


def test_every_missing_key_is_named(tmp_path: Path) -> None:
    text = edit(ORIGINAL, "dev", update_local_prodir=None, local_confdir="")
    raw = yaml.safe_load(text)
    del raw["db"]["dbhost"]
    path = write_original(tmp_path, yaml.safe_dump(raw))

    problems = problems_of(path)

    assert problems == [
        "dev.local_confdir: missing (config downloaded from the servers)",
        "dev.update_local_prodir: missing (programs of new builds)",
        "dev.dbhost (or db.dbhost): missing (the inventory database's host)",
    ]


def test_a_bad_port_is_named(tmp_path: Path) -> None:
    path = write_original(tmp_path, edit(ORIGINAL, "dev", dbport="33o6"))

    assert problems_of(path) == ["dev.dbport: must be a port number, not '33o6'"]


def test_broken_yaml_is_a_config_error_that_does_not_quote_the_password(tmp_path: Path) -> None:
    broken = ORIGINAL.replace(f'dbpassword: "{DB_SECRET}"', f'dbpassword: "{DB_SECRET}" [', 1)
    path = write_original(tmp_path, broken)

    problems = problems_of(path)

    assert len(problems) == 1
    assert problems[0].startswith("not valid YAML: ")
    assert "line 7" in problems[0]
    assert DB_SECRET not in problems[0]


def test_a_missing_file_is_a_config_error(tmp_path: Path) -> None:
    assert problems_of(tmp_path / "config.yml") == ["cannot read: No such file or directory"]


def test_a_document_that_is_not_a_mapping_is_a_config_error(tmp_path: Path) -> None:
    path = write_original(tmp_path, "- just\n- a list\n")

    assert problems_of(path) == ["the document must be a mapping of sections (env, dev, ...)"]


# --- the result as a file ---


def test_the_output_written_to_a_file_loads_with_the_config_loader(tmp_path: Path) -> None:
    path = write_original(tmp_path)
    target = tmp_path / "syncpro" / "config.yml"
    target.parent.mkdir()
    target.write_text(import_original_config(path), encoding="utf-8")

    config = load_config(target)

    assert config.inventory.source == "mysql"
    assert config.dirs.remotecomdir == tmp_path / "RexDeploy" / "remotecomdir"
