"""The documentation: links that resolve, a repository that stands on its own, and pages that
keep up with the code they describe (config keys, control actions, the package layout)."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from syncpro.config.schema import describe_keys
from syncpro.control.protocol import ACTIONS, FIELDS
from syncpro.testing import running

from helpers import wait_until

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "daemon" / "syncpro"
PAGES = sorted([REPO / "README.md", REPO / "systemd" / "README.md", *(REPO / "docs").glob("*.md")])
# Built from pieces so that this file does not name what it forbids.
FORBIDDEN = ("SPEC" + ".md", "../" + "shared", "/work/" + "shared")
_SKIPPED_DIRS = {".git", ".venv", "var", "build", "__pycache__"}

_FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)
_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
_HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.MULTILINE)


def _prose(page: Path) -> str:
    """The page without its fenced code blocks, where brackets are code, not links."""
    return _FENCE.sub("", page.read_text(encoding="utf-8"))


def _anchors(page: Path) -> set[str]:
    """The fragment each heading of page gets on GitHub: lower case, punctuation dropped,
    spaces as hyphens, a repeated one numbered."""
    seen: dict[str, int] = {}
    anchors: set[str] = set()
    for heading in _HEADING.findall(_prose(page)):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


def _links(page: Path) -> list[str]:
    return [
        target
        for target in _LINK.findall(_prose(page))
        if not re.match(r"[a-z][a-z0-9+.-]*:", target)  # http:, https:, mailto:
    ]


def test_the_docs_folder_holds_the_pages_the_readme_promises() -> None:
    names = {page.name for page in (REPO / "docs").glob("*.md")}
    assert {"contract.md", "protocol.md", "operations.md", "design.md"} <= names
    assert (REPO / "LICENSE").read_text().startswith("MIT License")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_points_to_a_file_and_heading_that_exist(page: Path) -> None:
    links = _links(page)
    broken: list[str] = []
    for link in links:
        path, _, fragment = link.partition("#")
        target = (page.parent / path).resolve() if path else page
        if not target.exists():
            broken.append(f"{link}: no such file {target}")
        elif REPO not in target.parents:
            broken.append(f"{link}: outside the repository")
        elif fragment and fragment not in _anchors(target):
            broken.append(f"{link}: no heading #{fragment} in {target.name}")
    assert broken == []


def test_the_readme_links_to_every_page_of_docs() -> None:
    linked = {(REPO / link.partition("#")[0]).resolve() for link in _links(REPO / "README.md")}
    assert set((REPO / "docs").glob("*.md")) <= linked


def test_nothing_in_the_repository_refers_to_files_outside_it() -> None:
    found: list[str] = []
    for folder, dirs, files in os.walk(REPO):
        # Pruned in place: the virtualenv, git's objects, demo data and tool caches are not ours.
        dirs[:] = [
            d
            for d in dirs
            if d not in _SKIPPED_DIRS and not d.endswith(("_cache", ".egg-info", ".hypothesis"))
        ]
        for name in files:
            path = Path(folder, name)
            try:
                text = path.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue  # not text
            found += [f"{path.relative_to(REPO)}: {word}" for word in FORBIDDEN if word in text]
    assert found == []


def test_the_operations_page_lists_every_config_key() -> None:
    text = (REPO / "docs" / "operations.md").read_text(encoding="utf-8")
    missing = [key for key, _, _ in describe_keys() if f"`{key}`" not in text]
    assert missing == [], "add these keys to the table in docs/operations.md"


def test_the_protocol_page_names_every_action_and_field() -> None:
    text = (REPO / "docs" / "protocol.md").read_text(encoding="utf-8")
    missing = [name for name in (*ACTIONS, *FIELDS) if f"`{name}`" not in text]
    assert missing == [], "describe these in docs/protocol.md"


def test_the_readme_and_design_name_every_subpackage_and_module() -> None:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    design = (REPO / "docs" / "design.md").read_text(encoding="utf-8")
    subpackages = sorted(p.parent for p in PACKAGE.glob("*/__init__.py"))
    assert subpackages, "no subpackages found"
    missing = [f"{p.name}/" for p in subpackages if f"{p.name}/" not in readme]
    for package in subpackages:
        modules = sorted(m.stem for m in package.glob("*.py") if m.stem != "__init__")
        # The design page's table names each subpackage's modules in its last column.
        missing += [f"{package.name}.{m}" for m in modules if f"`{m}`" not in design]
    missing += [
        m.name for m in PACKAGE.glob("*.py") if not m.stem.startswith("_") and m.name not in readme
    ]
    assert missing == [], "describe these in the README's layout and docs/design.md"


def _text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None  # not published yet


@pytest.mark.daemon
def test_the_readme_try_it_step_works_as_written(tmp_path: Path) -> None:
    # The demo exactly as the README's first command sets it up, in a scratch folder.
    shutil.copy(REPO / "config.yml", tmp_path / "config.yml")
    subprocess.run(
        [sys.executable, str(REPO / "scripts" / "demo_data.py"), "--var", str(tmp_path / "var")],
        check=True,
        capture_output=True,
        timeout=60,
    )
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    steps = readme.partition("**Try it**")[2].partition("**Stop it**")[0]
    # The commands are inline code, so that the README's first two code blocks stay the two
    # commands it starts with.
    spans = re.findall(r"`([^`]+)`", steps)
    (upload,) = [re.fullmatch(r"echo '([^']*)' > (\S+)", s) for s in spans if s.startswith("echo ")]
    (look,) = [re.fullmatch(r"cat (\S+)", s) for s in spans if s.startswith("cat ")]
    commands = [s for s in spans if s.startswith(".venv/bin/syncpro ")]
    assert upload is not None and look is not None and len(commands) == 2, spans
    content, source = upload.groups()
    assert f"`{content}`" in steps  # what the README says the target will show
    target = tmp_path / look.group(1)

    with running(tmp_path / "config.yml") as daemon:
        daemon.wait_event("service.rescanned")  # the start's catch-up has been scheduled
        (tmp_path / source).write_text(content + "\n", encoding="utf-8")
        # Where the README sleeps, wait for the published file with a deadline.
        wait_until(lambda: _text(target) == content + "\n", timeout=30)
        for line in commands:
            words = shlex.split(line)
            assert words[0] == ".venv/bin/syncpro", line
            result = subprocess.run(
                [sys.executable, "-m", "syncpro", *words[1:]],
                capture_output=True,
                text=True,
                cwd=tmp_path,  # ctl finds ./config.yml and its control socket there
                timeout=120,
                check=False,
            )
            assert result.returncode == 0, (line, result.stdout, result.stderr)
            doc = json.loads(result.stdout)
            assert doc["code"] == "0", line
            if "-k" in words:
                assert doc["data"]["data"]["0"] == "1", line
        # "Stop it with Ctrl-C": running syncs finish and it exits 0.
        daemon.signal(signal.SIGINT)
        assert daemon.wait_exit(timeout=60) == 0
        assert daemon.find("service.stopped")
