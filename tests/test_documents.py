"""The typed response documents describe the documents as built: every key a real sync or
diff answers is declared, with the declared requiredness."""

from __future__ import annotations

from pathlib import Path
from typing import Any, NotRequired, get_origin, get_type_hints

import pytest

from syncpro.control.dispatch import Code, HealthAnswer, ReloadAnswer
from syncpro.engine.diff import diff
from syncpro.engine.request import CONFIG, PROGRAM, Kind, Mode, SyncRequest
from syncpro.engine.response import (
    Data,
    Outcome,
    ParseParameters,
    Respon,
    ResponseDocument,
    RunDocument,
    refusal_document,
    response_document,
)
from syncpro.engine.result import AppDocument, TargetDocument

from helpers import (
    SERVER_GROUP,
    app,
    config_source,
    make_config,
    program_source,
    sync,
    write_tree,
)


def _fits(doc: dict[str, Any], kind: Any) -> None:
    """Assert that a document has every key its TypedDict requires and no key it does not
    declare. (Read from the hints: postponed annotations hide NotRequired from the class.)"""
    hints = get_type_hints(kind, include_extras=True)
    optional = {key for key, hint in hints.items() if get_origin(hint) is NotRequired}
    keys = set(doc)
    assert set(hints) - optional <= keys, f"{kind.__name__} misses {set(hints) - optional - keys}"
    assert keys <= set(hints), f"{kind.__name__} does not declare {sorted(keys - set(hints))}"


def _with_sources(tmp_path: Path) -> Any:
    config = make_config(tmp_path, [*SERVER_GROUP, app("web", "web")])
    write_tree(program_source(config, "server1"), {"bin/run.sh": "echo run\n"})
    write_tree(program_source(config, "server2"), {"bin/run.sh": "echo run\n"})
    write_tree(config_source(config, "server1"), {"app.conf": "a=1\n"})
    write_tree(config_source(config, "web"), {"web.conf": "w=1\n"})
    return config  # server2's config and web's program are missing; server1's is superseded


def test_a_sync_document_and_its_apps_and_targets_fit_their_types(tmp_path: Path) -> None:
    config = _with_sources(tmp_path)
    doc = response_document(sync(config, "server web nosuch"))
    _fits(dict(doc), RunDocument)
    _fits(dict(doc["data"]), Data)
    _fits(dict(doc["data"]["data"]), Outcome)
    _fits(dict(doc["parseparameters"]), ParseParameters)
    _fits(dict(doc["respon"]), Respon)
    targets = 0
    for app_doc in doc.get("apps", []):
        _fits(dict(app_doc), AppDocument)
        for kind in (PROGRAM, CONFIG):
            target = app_doc[kind]
            if target is not None:
                _fits(dict(target), TargetDocument)
                targets += 1
    assert targets == 6
    statuses = {t["status"] for a in doc.get("apps", []) for t in (a["program"], a["config"]) if t}
    assert statuses == {"published", "superseded", "missing"}


def test_a_document_with_a_key_too_many_or_too_few_does_not_fit() -> None:
    doc = dict(refusal_document({}, "bad"))
    with pytest.raises(AssertionError, match="does not declare"):
        _fits({**doc, "extra": 1}, ResponseDocument)
    del doc["take"]
    with pytest.raises(AssertionError, match="misses"):
        _fits(doc, ResponseDocument)


def test_a_diff_document_fits_the_run_document(tmp_path: Path) -> None:
    config = _with_sources(tmp_path)
    request = SyncRequest(k="server", action="Deploy:Core:diff", origin="control")
    _fits(dict(diff(request, config, config.config_inventory)), RunDocument)


def test_a_refusal_fits_the_response_document_and_its_code_is_a_plain_str() -> None:
    doc = refusal_document({"action": "status", "token": "x"}, "bad", Code.FORBIDDEN)
    _fits(dict(doc), ResponseDocument)
    assert type(doc["code"]) is str and doc["code"] == "403"


def test_the_daemons_reload_and_health_answers_fit_their_types() -> None:
    from syncpro.daemon.status import health_answer, reload_answer

    _fits(dict(reload_answer(None, 1.0)), ReloadAnswer)
    status = {"code": "0", "ready": True, "healthy": False, "problems": ["not ready"]}
    _fits(dict(health_answer(status)), HealthAnswer)


def test_kind_and_mode_are_the_plain_words_documents_carry() -> None:
    assert [str(k) for k in Kind] == ["program", "config"]
    assert (PROGRAM, CONFIG) == (Kind.PROGRAM, Kind.CONFIG) == ("program", "config")
    assert (Mode.of(False), Mode.of(True)) == ("remote", "update")
    assert SyncRequest(k="all", update=True).mode is Mode.UPDATE
