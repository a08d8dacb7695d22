"""Credentials inside URLs never show: not in a judge backend's repr, its retry logs, its
errors or its stored judgments; not in the messages of `harness study` about a storage URL;
and the judge server gets the key as a Bearer token, never the URL's user info."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from evaluators.judging import PairItem
from evaluators.mllm_backends import (
    BackendConfigError,
    BackendError,
    LoopbackChatServer,
    OpenAIBackend,
    Reply,
)
from evaluators.mllm_judge import build_judge, list_judgments
from evaluators.redact import drop_password, redact_text, redact_url, strip_userinfo
from harness.store import Store

SECRET = "s3cr3t-9d1b7e"  # distinctive: searched for everywhere
KEY = "sk-key-4c2e8a"


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql://ana:s3cret@db:5432/optuna", "postgresql://ana:***@db:5432/optuna"),
        ("postgresql+psycopg2://ana:p@ss@db/o", "postgresql+psycopg2://ana:***@db/o"),
        ("postgresql://ana@db/optuna", "postgresql://ana@db/optuna"),  # a user is no secret
        ("https://user:secret@host/v1", "https://user:***@host/v1"),
        ("https://tok3n@host/v1", "https://***@host/v1"),  # a bare http user info is a token
        ("sqlite:///x.db", "sqlite:///x.db"),
        ("http://host/v1?next=a@b", "http://host/v1?next=a@b"),
    ],
)
def test_redact_url(url: str, shown: str) -> None:
    assert redact_url(url) == shown
    assert redact_text(f"cannot reach {url}: refused") == f"cannot reach {shown}: refused"


def test_drop_password_and_strip_userinfo() -> None:
    assert drop_password("postgresql://ana:s3cret@db/optuna") == "postgresql://ana@db/optuna"
    assert drop_password("sqlite:///x.db") == "sqlite:///x.db"
    assert strip_userinfo("https://u:p@host:8080/v1") == ("https://host:8080/v1", "u", "p")
    assert strip_userinfo("https://host/v1") == ("https://host/v1", None, None)


def _with_credentials(url: str) -> str:
    return url.replace("http://", f"http://user:{SECRET}@")


def test_judge_url_credentials_are_never_shown_stored_or_sent(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    images = []
    for i, rgb in enumerate([(200, 0, 0), (0, 0, 200)]):
        images.append(tmp_path / f"{i}.png")
        Image.new("RGB", (8, 8), rgb).save(images[-1])
    script = [Reply(status=500, error="upstream hiccup"), Reply('{"winner": "A", "reason": "ok"}')]
    store = Store(tmp_path / "r.duckdb")
    with LoopbackChatServer(lambda r, n: script[min(n, 1)]) as server:
        env = {
            "HARNESS_JUDGE_BASE_URL": _with_credentials(server.url),
            "HARNESS_JUDGE_MODEL": "tiny-vlm",
            "HARNESS_JUDGE_API_KEY": KEY,
        }
        judge = build_judge(
            "openai", store, env=env, concurrency=1, backoff_s=0.001, backoff_cap_s=0.01
        )
        judge.judge_pairs([PairItem("a red circle", 0, "c-a", "c-b", images[0], images[1])])
        backend = judge.backend
        sent = [r.headers for r in server.requests]
    assert "retrying" in caplog.text  # the retry was logged ...
    assert SECRET not in caplog.text  # ... without the URL's password
    assert SECRET not in repr(backend) and SECRET not in backend.base_url
    rows = json.dumps(list_judgments(store), default=str)
    rows += json.dumps(store.query("SELECT * FROM raters"), default=str)
    assert SECRET not in rows
    auth = [h.get("Authorization") or h.get("authorization") for h in sent]
    assert auth and all(a == f"Bearer {KEY}" for a in auth), auth


def test_judge_url_credentials_without_a_key_are_refused_clearly() -> None:
    with pytest.raises(BackendConfigError) as info:
        OpenAIBackend(base_url=f"https://user:{SECRET}@judge.lab/v1", model="m")
    message = str(info.value)
    assert "HARNESS_JUDGE_API_KEY" in message and "credentials" in message
    assert SECRET not in message


def test_a_failed_request_names_the_server_without_credentials(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    backend = OpenAIBackend(
        base_url=f"http://user:{SECRET}@127.0.0.1:9/v1",  # the discard port: refused
        model="m",
        api_key=KEY,
        max_attempts=2,
        backoff_s=0.0,
        timeout_s=2.0,
    )
    with pytest.raises(BackendError) as info:
        backend.ask(["hello"], {})
    assert SECRET not in str(info.value) and SECRET not in caplog.text
    assert "127.0.0.1:9" in caplog.text


def test_storage_url_password_is_in_no_cli_message(tmp_path: Path) -> None:
    from harness.cli import app

    url = f"postgresql://ana:{SECRET}@127.0.0.1:9/optuna"
    result = CliRunner().invoke(
        app, ["study", "status", "nope", "--storage", url, "--workdir", str(tmp_path)]
    )
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert "postgresql://ana:***@127.0.0.1:9/optuna" in result.output
    assert SECRET not in result.output
    result = CliRunner().invoke(app, ["study", "list", "--storage", url])
    assert SECRET not in result.output and "ana:***@" in result.output


def test_study_check_shows_the_storage_url_without_its_password(tmp_path: Path) -> None:
    import yaml

    from harness.cli import app

    repo = Path(__file__).resolve().parents[2]
    doc = yaml.safe_load((repo / "studies" / "timestep.yaml").read_text())
    doc.setdefault("optuna", {})["storage"] = f"postgresql://ana:{SECRET}@db.lab/optuna"
    study = tmp_path / "timestep.yaml"
    study.write_text(yaml.safe_dump(doc))
    result = CliRunner().invoke(app, ["study", "check", str(study)])
    assert result.exit_code == 0, result.output
    assert "postgresql://ana:***@db.lab/optuna" in result.output
    assert SECRET not in result.output
