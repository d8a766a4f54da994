"""The service-account connection: settings, Sudo, acting as a user, secrets kept out of errors."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from omero_hwsi.errors import ConfigError, OmeroConnectionError, OmeroPermissionError
from omero_hwsi.omero import connect
from omero_hwsi.settings import load_settings

SECRET = "s3cret-Pa55"


@dataclass
class _Client:
    keepalive: list[int] = field(default_factory=list)

    def enableKeepAlive(self, seconds: int) -> None:
        self.keepalive.append(seconds)


@dataclass
class _Privilege:
    name: str

    def getValue(self) -> Any:
        return type("V", (), {"getValue": lambda _: self.name})()


class FakeBlitz:
    """The connection calls connect.py makes, recorded; behaviour set per test."""

    made: list[FakeBlitz] = []
    accept = True
    privileges = ("Sudo", "ReadSession")
    users = {"ana": ["pathology", "user"]}

    def __init__(self, user: str, password: str, *, host: str, port: int, secure: bool,
                 as_user: str | None = None, group: str | None = None) -> None:
        self.user, self.password, self.host, self.port, self.secure = user, password, host, port, secure
        self.as_user, self.group, self.closed, self.c = as_user, group, False, _Client()
        self.su_ttl: int | None = None
        FakeBlitz.made.append(self)

    def connect(self) -> bool:
        return self.accept

    def getAdminService(self) -> Any:
        return type("A", (), {"getCurrentAdminPrivileges": lambda _: [
            _Privilege(p) for p in self.privileges]})()

    def suConn(self, username: str, group: str | None = None, ttl: int = 60000) -> Any:
        if username not in self.users:
            return None
        self.su_ttl = ttl
        return FakeBlitz(self.user, "", host=self.host, port=self.port, secure=True,
                         as_user=username, group=group)

    def getConfigService(self) -> Any:
        return type("C", (), {"getVersion": lambda _: "5.6.14"})()

    def getGroupsMemberOf(self) -> list[Any]:
        return [type("G", (), {"getName": lambda _, n=n: n})()
                for n in self.users.get(self.as_user or "", [])]

    def close(self) -> None:
        self.closed = True


@pytest.fixture
def fake_blitz(monkeypatch):
    gateway = pytest.importorskip("omero.gateway", reason="the omero extra")
    monkeypatch.setattr(gateway, "BlitzGateway", FakeBlitz)
    FakeBlitz.made = []
    monkeypatch.setattr(FakeBlitz, "accept", True)
    monkeypatch.setattr(FakeBlitz, "privileges", ("Sudo", "ReadSession"))
    return FakeBlitz


@pytest.fixture
def settings(tmp_path: Path, isolated_env: Path):
    password = tmp_path / "pw"
    password.write_text(SECRET + "\n")
    return load_settings(omero_host="omero.lab", omero_user="hwsi-service",
                         omero_password_file=password, max_task_seconds=600)


def test_password_comes_from_its_file_and_missing_settings_are_named(tmp_path, isolated_env):
    base = {"omero_host": "omero.lab", "omero_user": "svc"}
    with pytest.raises(ConfigError, match="HWSI_OMERO_HOST"):
        connect.read_password(load_settings(omero_user="svc"))
    with pytest.raises(ConfigError, match="HWSI_OMERO_PASSWORD_FILE"):
        connect.read_password(load_settings(**base))
    with pytest.raises(ConfigError, match="cannot read"):
        connect.read_password(load_settings(**base, omero_password_file=tmp_path / "none"))
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ConfigError, match="empty"):
        connect.read_password(load_settings(**base, omero_password_file=tmp_path / "empty"))


def test_a_job_connection_acts_as_the_user_in_the_group_and_closes_both(fake_blitz, settings):
    with connect.omero_connection(settings, user="ana", group="pathology") as conn:
        assert (conn.as_user, conn.group) == ("ana", "pathology")
        service = fake_blitz.made[0]
        assert (service.user, service.password, service.host, service.port, service.secure) == \
            ("hwsi-service", SECRET, "omero.lab", 4064, True)
        assert service.su_ttl == 600 * 1000  # a session no longer than a job's time limit
        assert conn.c.keepalive == [connect.KEEPALIVE_SECONDS]
    assert all(made.closed for made in fake_blitz.made)


def test_refusals_are_one_line_and_never_show_the_password(fake_blitz, settings):
    fake_blitz.accept = False
    with pytest.raises(OmeroConnectionError) as refused:
        with connect.omero_connection(settings):
            pass
    fake_blitz.accept = True
    fake_blitz.privileges = ("ReadSession",)
    with pytest.raises(OmeroPermissionError, match="Sudo") as no_sudo:
        with connect.omero_connection(settings, user="ana"):
            pass
    fake_blitz.privileges = ("Sudo",)
    with pytest.raises(OmeroPermissionError, match="no user 'bob'") as unknown:
        with connect.omero_connection(settings, user="bob"):
            pass
    for err in (refused, no_sudo, unknown):
        assert SECRET not in str(err.value) and "\n" not in str(err.value)
    assert all(made.closed for made in fake_blitz.made)


def test_check_reports_each_fact_and_fails_without_sudo(fake_blitz, settings):
    report = connect.check_connection(settings, user="ana")
    assert report.ok
    assert [ok for ok, _ in report.lines] == [True, True, True, True]
    assert report.lines[0][1].startswith("Sudo mode")
    assert "OMERO 5.6.14" in report.lines[1][1] and "pathology" in report.lines[3][1]
    fake_blitz.privileges = ()
    report = connect.check_connection(settings, user="ana")
    assert not report.ok and "lacks the Sudo privilege" in report.lines[2][1]


def test_sudo_mode_acts_as_the_user_even_for_a_job_with_a_key_file(fake_blitz, settings):
    from omero_hwsi.omero.session_keys import read_session_key, write_session_key

    job_id = "0f1e2d3c-4b5a-5968-8778-695a4b3c2d1e"
    write_session_key(settings, job_id, "k3y")
    with connect.omero_connection(settings, user="ana", group="pathology", job_id=job_id,
                                  end_session=True) as conn:
        assert (conn.as_user, conn.group) == ("ana", "pathology")
    assert read_session_key(settings, job_id) == "k3y"  # not this mode's business
    assert all(made.closed for made in fake_blitz.made)


def test_check_reports_session_key_mode_and_needs_no_service_account(fake_blitz, settings):
    keys = settings.replace(omero_session_ttl_seconds=1800)
    fake_blitz.privileges = ()
    report = connect.check_connection(keys)
    assert report.ok and report.lines[0][1].startswith("session-key mode "
                                                       "(HWSI_OMERO_SESSION_TTL_SECONDS=1800)")
    assert "not needed in session-key mode" in report.lines[2][1]
    alone = keys.replace(omero_user="", omero_password_file=None)
    made = len(fake_blitz.made)
    assert [ok for ok, _ in connect.check_connection(alone).lines] == [True, True]
    assert len(fake_blitz.made) == made  # nothing to connect to without a service account
    with_user = connect.check_connection(alone, user="ana")
    assert not with_user.ok and "HWSI_OMERO_USER" in with_user.lines[1][1]
