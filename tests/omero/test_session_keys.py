"""Session-key mode: Run Analysis opens a session per job, workers join it by a private key.

The facility here gives no account Sudo and the workers have no service account: the script's
own connection (ana's) opens the sessions, and the real :func:`omero_connection` joins them
through :func:`fake_gateway.joining_gateway` in place of ``omero.gateway.BlitzGateway``.
"""

from __future__ import annotations

import json
import logging
import stat
import threading
import time
from pathlib import Path

import pytest
from fake_gateway import (
    ConnectionLostException,
    FakeGateway,
    FakeImage,
    FakeSessionService,
    joining_gateway,
)
from sqlalchemy import create_engine, text

pytest.importorskip("omero.model", reason="the omero extra (make setup-omero)")

from omero_hwsi.errors import ConfigError, InputError, OmeroConnectionError  # noqa: E402
from omero_hwsi.jobs.client import events, list_jobs  # noqa: E402
from omero_hwsi.jobs.ledger import Job  # noqa: E402
from omero_hwsi.omero import connect  # noqa: E402
from omero_hwsi.omero.script_actions import run_analysis  # noqa: E402
from omero_hwsi.omero.session_keys import (  # noqa: E402
    SECRETS,
    forget_session_key,
    read_session_key,
    write_session_key,
)
from omero_hwsi.omero.stages import pull_for_job, write_back_for_job  # noqa: E402
from omero_hwsi.settings import Settings, load_settings  # noqa: E402

CMU = "CMU-1-Small-Region.svs"
TTL = 7200
JOB = "0f1e2d3c-4b5a-5968-8778-695a4b3c2d1e"
FORM = {"Data_Type": "Image", "Task": "report", "Evidence_Depth": "region"}


@pytest.fixture
def key_settings(omero_settings: Settings) -> Settings:
    """Session-key mode, and no service account at all (the workers do not need one)."""
    return omero_settings.replace(omero_session_ttl_seconds=TTL, omero_user="",
                                  omero_password_file=None)


@pytest.fixture
def server(fixture_slide, monkeypatch) -> tuple[FakeGateway, FakeImage]:
    """ana's connection (as a script has it) to a server holding her slide; ``BlitzGateway``
    replaced by one that joins that server's sessions."""
    gateway = pytest.importorskip("omero.gateway")
    gw = FakeGateway("ana")
    image, _ = gw.add_slide(fixture_slide(CMU), CMU, size=(2220, 2967))
    monkeypatch.setattr(gateway, "BlitzGateway", joining_gateway(gw))
    monkeypatch.setattr(connect, "KEY_WAIT_SECONDS", 0.0)
    return gw, image


def _submit(gw: FakeGateway, settings: Settings, *images: FakeImage) -> list[Job]:
    ids = run_analysis(gw, {**FORM, "IDs": [i.id for i in images]}, settings=settings).job_ids
    jobs = {job.id: job for job in list_jobs(settings=settings)}
    return [jobs[i] for i in ids]


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _broker_payloads(settings: Settings) -> str:
    engine = create_engine(f"sqlite:///{settings.data_dir / 'broker.sqlite'}")
    with engine.connect() as connection:
        rows = connection.execute(text("SELECT payload FROM kombu_message")).scalars().all()
    engine.dispose()
    return "".join(str(row) for row in rows)


def test_the_ttl_setting_is_bounded_by_four_stages(isolated_env, monkeypatch):
    assert load_settings().omero_session_ttl_seconds == 0  # Sudo mode by default
    monkeypatch.setenv("HWSI_OMERO_SESSION_TTL_SECONDS", "7200")
    monkeypatch.setenv("HWSI_MAX_TASK_SECONDS", "1800")
    assert load_settings().omero_session_ttl_seconds == 7200  # four stages of 1800 s
    with pytest.raises(ConfigError, match=r"omero_session_ttl_seconds must be in \[0, 4 x "
                                          r"max_task_seconds = 7200\], got 7201"):
        load_settings(omero_session_ttl_seconds=7201)
    with pytest.raises(ConfigError, match="got -1"):
        load_settings(omero_session_ttl_seconds=-1)


def test_key_files_are_private_replaced_when_left_over_and_forgotten(key_settings):
    folder = key_settings.data_dir / SECRETS
    folder.mkdir(parents=True, mode=0o755)
    folder.chmod(0o755)
    (folder / JOB).write_text("a-key-left-by-a-pruned-job\n")
    write_session_key(key_settings, JOB, "k3y-0f-ana")
    assert _mode(folder) == 0o700 and _mode(folder / JOB) == 0o600
    assert read_session_key(key_settings, JOB) == "k3y-0f-ana"
    forget_session_key(key_settings, JOB)
    assert read_session_key(key_settings, JOB) is None
    forget_session_key(key_settings, JOB)  # nothing to forget: no error
    with pytest.raises(InputError, match="is not a job id"):
        write_session_key(key_settings, "../../etc/passwd", "k")


def test_a_job_joins_its_own_session_and_ends_it_after_the_write_back(
        server, key_settings, analysis_result, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    gw, image = server
    (job,) = _submit(gw, key_settings, image)

    (session,) = gw.user_sessions.values()  # one new session of ana, in the image's group
    key = session.uuid
    assert (session.user, session.group, session.ttl_ms, session.idle_ms) == (
        "ana", "lab", TTL * 1000, TTL * 1000)
    path = key_settings.data_dir / SECRETS / job.id
    assert path.read_text() == key + "\n"
    assert _mode(path) == 0o600 and _mode(path.parent) == 0o700

    # A duplicate submission keeps the job's key and leaves no second session open.
    assert [j.id for j in _submit(gw, key_settings, image)] == [job.id]
    assert path.read_text() == key + "\n" and list(gw.user_sessions) == [key]

    slide, _ = pull_for_job(key_settings, job_id=job.id, user=job.user, params=job.params,
                            staging=tmp_path)
    assert slide.is_file()
    pulled = gw.sessions[-1]
    assert (pulled.user, pulled.group, pulled.key, pulled.address) == (
        "ana", "lab", key, ("omero.lab", 4064, True))
    assert pulled.c.keepalive_s == connect.KEEPALIVE_SECONDS
    assert pulled.closed and pulled.hard_closed is False  # detached: the session lives on
    assert key in gw.user_sessions and path.exists()

    uris = write_back_for_job(key_settings, job_id=job.id, user=job.user, params=job.params,
                              model=job.model, input_sha256=job.params["omero"]["files_sha256"],
                              out_dir=analysis_result)
    assert uris and all(owner == "ana" for owner in gw.owners.values())
    assert gw.sessions[-1].hard_closed is True  # killed: it does not outlive the job
    assert key not in gw.user_sessions and not path.exists()

    # The key travelled in no message, no ledger row and no log line.
    recorded = (json.dumps(job.params) + job.key + _broker_payloads(key_settings)
                + "".join(event.message for event in events(job.id, settings=key_settings)))
    assert key not in recorded
    assert key not in caplog.text
    assert "<session key>" in caplog.text  # omero-py's own lines, redacted


def test_a_failed_write_back_keeps_the_key_for_the_rerun(server, key_settings,
                                                         analysis_result):
    gw, image = server
    (job,) = _submit(gw, key_settings, image)
    gw.fail_after_saves = 0
    with pytest.raises(ConnectionLostException):
        write_back_for_job(key_settings, job_id=job.id, user=job.user, params=job.params,
                           model=job.model, input_sha256=job.params["omero"]["files_sha256"],
                           out_dir=analysis_result)
    assert gw.sessions[-1].hard_closed is False
    assert read_session_key(key_settings, job.id) in gw.user_sessions


def test_a_job_whose_key_is_gone_fails_in_one_line(server, key_settings, tmp_path):
    gw, image = server
    (job,) = _submit(gw, key_settings, image)
    key = read_session_key(key_settings, job.id)
    forget_session_key(key_settings, job.id)
    with pytest.raises(OmeroConnectionError) as gone:
        pull_for_job(key_settings, job_id=job.id, user=job.user, params=job.params,
                     staging=tmp_path)
    assert str(gone.value) == (f"job {job.id}: its OMERO session is gone (session-key mode); "
                               "run the analysis again")
    assert not gw.sessions

    # A key the server no longer knows (expired): refused in one line, the key not shown.
    write_session_key(key_settings, job.id, key)
    del gw.user_sessions[key]
    with pytest.raises(OmeroConnectionError, match="did not let it join its session") as dead:
        pull_for_job(key_settings, job_id=job.id, user=job.user, params=job.params,
                     staging=tmp_path)
    assert key not in str(dead.value) and "\n" not in str(dead.value)


def test_a_worker_waits_for_a_key_stored_just_after_submission(server, key_settings,
                                                               monkeypatch):
    gw, _ = server
    session = gw.getSessionService().createUserSession(60_000, 60_000, "lab")
    monkeypatch.setattr(connect, "KEY_WAIT_SECONDS", 10.0)
    monkeypatch.setattr(connect, "_KEY_POLL_SECONDS", 0.02)
    late = threading.Timer(0.2, write_session_key, (key_settings, JOB, session.uuid))
    started = time.monotonic()
    late.start()
    with connect.omero_connection(key_settings, user="ana", job_id=JOB) as conn:
        assert conn.key == session.uuid
    assert 0.2 <= time.monotonic() - started < 5


def test_a_refused_session_queues_nothing(server, fixture_slide, key_settings, monkeypatch):
    gw, image = server
    other, _ = gw.add_slide(fixture_slide(CMU), "other.svs", size=(2220, 2967), group="derm")
    create = FakeSessionService.createUserSession

    def refuse_derm(self, ttl_ms, idle_ms, group):
        if group == "derm":
            raise RuntimeError("SecurityViolation")
        return create(self, ttl_ms, idle_ms, group)

    monkeypatch.setattr(FakeSessionService, "createUserSession", refuse_derm)
    with pytest.raises(OmeroConnectionError, match="cannot open a session for the analysis in "
                                                   "group 'derm' \\(RuntimeError\\)"):
        _submit(gw, key_settings, image, other)
    assert list_jobs(settings=key_settings) == [] and gw.user_sessions == {}


def test_running_the_analysis_again_restarts_a_failed_job_with_a_new_session(
        server, key_settings, tmp_path):
    from omero_hwsi.jobs.ledger import Ledger

    gw, image = server
    (job,) = _submit(gw, key_settings, image)
    ledger = Ledger(key_settings.ledger_url)
    claim = ledger.claim(job.id, "prepare", runner="t1", worker="w", retries=2, stale_seconds=60)
    assert claim.outcome == "run"
    ledger.fail(job.id, runner="t1", worker="w", error="its OMERO session is gone")
    forget_session_key(key_settings, job.id)  # what a lost session looks like to a worker
    (again,) = _submit(gw, key_settings, image)
    assert (again.id, again.state, again.stage) == (job.id, "queued", "prepare")
    key = read_session_key(key_settings, job.id)
    assert key is not None and key in gw.user_sessions  # a live session of ana's, for the rerun
    with connect.omero_connection(key_settings, user="ana", job_id=job.id) as conn:
        assert conn.getUser().getName() == "ana"
    # A job that is queued keeps its key: a third run changes nothing.
    (third,) = _submit(gw, key_settings, image)
    assert third.state == "queued" and read_session_key(key_settings, job.id) == key


def test_hwsi_jobs_submit_refuses_omero_sources_in_session_key_mode(key_settings, monkeypatch):
    from typer.testing import CliRunner

    from omero_hwsi.cli import app

    monkeypatch.setenv("HWSI_OMERO_SESSION_TTL_SECONDS", str(TTL))
    result = CliRunner().invoke(app, ["jobs", "submit", "omero:image/1", "--task", "report"])
    assert result.exit_code == 2 and "session-key mode" in result.stderr
