"""What a hospital security review checks, with real requests to the app under waitress (and cheroot
with TLS) on a free loopback port."""

from __future__ import annotations

import csv
import datetime as dt
import io
import os
import re
import shutil
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests
from sqlalchemy import update
from werkzeug.security import generate_password_hash

from batchcxr.errors import ConfigError
from batchcxr.infer.runtime import load_scoring_model
from batchcxr.paths import DEMO_DIR, MODELS_DIR
from batchcxr.pipeline import Scorer
from batchcxr.settings import Settings, WebSettings
from batchcxr.store.repo import Store
from batchcxr.store.schema import WebSession
from batchcxr.web.app import create_app
from batchcxr.web.security import check_web_settings, safe_next

from tests.conftest import free_port
from tests.dicoms import chest_like, dicom_file
from tests.helpers import cli, wait_until

KEY = "k" * 40
PASSWORD = "correct horse battery"


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    """A database with the demo and two studies scored; shared by the servers below."""
    tmp = tmp_path_factory.mktemp("sec")
    shutil.copytree(DEMO_DIR / "jpeg", tmp / "inputs" / "jpeg")
    settings = Settings(db_url=str(tmp / "r.sqlite"), reports_dir=tmp / "reports")
    store = Store.open(settings.sqlalchemy_url)
    Scorer(settings, store, [load_scoring_model(MODELS_DIR / m) for m in ("cnn", "mobilenetv2")]).score_tree(
        tmp / "inputs")
    store.close()
    return tmp, settings


class Server:
    """The app under waitress in a thread, on a free port."""

    def __init__(self, settings: Settings, forget_failed_logins: bool = True) -> None:
        from waitress.server import create_server

        from batchcxr.store.schema import LoginThrottle

        self.store = Store.open(settings.sqlalchemy_url)
        if forget_failed_logins:  # tests share one database: another test's back-off must not leak in
            with self.store.session() as db, db.begin():
                db.query(LoginThrottle).delete()
        self.server = create_server(create_app(settings, self.store), host="127.0.0.1", port=free_port(), threads=4)
        self.url = f"http://127.0.0.1:{self.server.effective_port}"
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()

    def close(self) -> None:
        channels = dict(self.server._map)
        self.server._map.clear()  # waitress's loop ends after its current poll (at most a second)
        self.thread.join(timeout=10)
        for channel in channels.values():
            channel.close()
        self.server.task_dispatcher.shutdown()
        self.store.close()


def _web(tmp: Path, password: str = PASSWORD, **web) -> Settings:
    users = {"alice": generate_password_hash(password), "bob": generate_password_hash("bobs password 123")}
    return Settings(db_url=str(tmp / "r.sqlite"), reports_dir=tmp / "reports",
                    web=WebSettings(**{"users": users, "secret_key": KEY, **web}))


@pytest.fixture
def server(scored):
    tmp, _ = scored
    s = Server(_web(tmp))
    yield s
    s.close()


def _login(url: str, user: str = "alice", password: str = PASSWORD, **data) -> requests.Session:
    http = requests.Session()
    token = re.search(r'name="csrf_token" value="([^"]+)"', http.get(f"{url}/login").text).group(1)
    r = http.post(f"{url}/login", data={"username": user, "password": password, "csrf_token": token, **data},
                  allow_redirects=False)
    http.last = r
    return http


def _csrf(http: requests.Session, url: str) -> str:
    return re.search(r'name="csrf_token" value="([^"]+)"', http.get(f"{url}/").text).group(1)


def test_logout_ends_the_session_for_a_copied_cookie_too(server):
    http = _login(server.url)
    assert http.last.status_code == 302
    stolen = http.cookies.get_dict()
    token = _csrf(http, server.url)
    assert http.post(f"{server.url}/logout", data={"csrf_token": token}, allow_redirects=False).status_code == 302
    replay = requests.Session()
    replay.cookies.update(stolen)
    assert replay.get(f"{server.url}/", allow_redirects=False).status_code == 302  # to /login
    assert replay.get(f"{server.url}/verdicts.csv", allow_redirects=False).status_code == 302
    assert replay.post(f"{server.url}/study/1/verdict", data={"verdict": "yes", "csrf_token": token},
                       allow_redirects=False).status_code in (400, 401)


def test_a_new_password_and_sessions_revoke_end_sessions(scored):
    tmp, settings = scored
    first = Server(_web(tmp))
    try:
        http = _login(first.url)
        assert http.get(f"{first.url}/", allow_redirects=False).status_code == 200
        revoked = _login(first.url, "bob", "bobs password 123")
        out = cli("sessions", "revoke", "bob", "--db", settings.db_url)
        assert out.returncode == 0 and "sessions of bob ended" in out.stdout
        assert revoked.get(f"{first.url}/", allow_redirects=False).status_code == 302
    finally:
        first.close()
    second = Server(_web(tmp, password="a brand new password"))  # the admin changed alice's hash
    try:
        assert http.get(f"{second.url}/", allow_redirects=False).status_code == 302
        assert _login(second.url, password="a brand new password").last.status_code == 302
    finally:
        second.close()


def test_idle_and_absolute_timeouts_end_sessions(scored):
    tmp, _ = scored
    s = Server(_web(tmp, session_minutes=30, session_max_hours=12))
    try:
        idle, old = _login(s.url), _login(s.url)
        with s.store.session() as db, db.begin():  # as if 31 minutes idle / 13 hours since login passed
            sessions = db.query(WebSession).filter(WebSession.ended_at.is_(None)).order_by(WebSession.created_at).all()
            sessions[-2].last_seen_at -= dt.timedelta(minutes=31)
            sessions[-1].created_at -= dt.timedelta(hours=13)
        assert idle.get(f"{s.url}/", allow_redirects=False).status_code == 302
        assert old.get(f"{s.url}/", allow_redirects=False).status_code == 302
        with s.store.read_session() as db:
            whys = {w for (w,) in db.query(WebSession.ended_why).all()}
        assert {"idle timeout", "absolute timeout"} <= whys
    finally:
        s.close()


def test_logins_back_off_per_user_and_per_address_and_keep_it_across_restarts(scored):
    tmp, _ = scored
    s = Server(_web(tmp, login_attempts=3, lockout_max_seconds=60))
    try:
        for _ in range(9):  # 3 free failures, then each try (even a waiting one) doubles the wait: 1 ... 32 s
            assert _login(s.url, "carol", "nope").last.status_code == 401
        assert s.store.login_wait(["user:carol"]) > 10
    finally:
        s.close()
    again = Server(_web(tmp, login_attempts=3, lockout_max_seconds=60), forget_failed_logins=False)  # a restart
    try:
        r = _login(again.url, "alice", PASSWORD).last  # the address is waiting too: even a right password
        assert r.status_code == 401 and "too many attempts" in r.text
        with again.store.session() as db, db.begin():
            from batchcxr.store.schema import LoginThrottle

            db.execute(update(LoginThrottle).values(wait_until=None))  # the wait is over
        assert _login(again.url, "alice", PASSWORD).last.status_code == 302
    finally:
        again.close()


def test_unknown_users_cost_the_same_time_and_get_the_same_answer(scored):
    tmp, _ = scored
    s = Server(_web(tmp, login_attempts=1000))
    try:
        def timed(user):
            times, texts = [], set()
            for _ in range(4):
                start = time.perf_counter()
                r = _login(s.url, user, "wrong password").last
                times.append(time.perf_counter() - start)
                texts.add(re.sub(r'name="csrf_token" value="[^"]+"', "", r.text))
            return sorted(times)[1], texts
        known, known_text = timed("alice")
        unknown, unknown_text = timed("nobody-here")
        assert 0.5 < unknown / known < 2.0, (known, unknown)  # scrypt runs for both
        assert known_text == unknown_text
    finally:
        s.close()


def test_every_page_image_verdict_and_export_is_audited(server, scored):
    tmp, settings = scored
    _login(server.url, "alice", "wrong one")
    http = _login(server.url)
    page = http.get(f"{server.url}/").text
    study = re.search(r'href="/study/(\d+)', page).group(1)
    text = http.get(f"{server.url}/study/{study}").text
    for src in sorted(set(re.findall(r'src="(/(?:image|overlay|lungs)/\d+)"', text))):
        assert http.get(f"{server.url}{src}").status_code == 200
    token = _csrf(http, server.url)
    http.post(f"{server.url}/study/{study}/verdict", data={"verdict": "no", "csrf_token": token})
    http.get(f"{server.url}/verdicts.csv")
    assert cli("export", "--db", settings.db_url, "--out", str(tmp / "x.csv")).returncode == 0
    out = cli("audit", "--since", "1h", "--db", settings.db_url)
    assert out.returncode == 0
    actions = {line.split()[4] for line in out.stdout.splitlines() if len(line.split()) > 4}
    assert {"login_failed", "login_ok", "worklist", "study", "image", "overlay", "lungs", "verdict", "csv_export",
            "cli_export"} <= actions, actions
    assert re.search(r"login_ok\s+$|login_ok", out.stdout) and "127.0.0.1" in out.stdout
    store = Store.open(settings.sqlalchemy_url)
    with pytest.raises(Exception, match="append-only"):
        with store.engine.begin() as conn:
            conn.exec_driver_sql("DELETE FROM audit_log")
    store.close()


def test_csv_exports_neutralise_formulas_whatever_the_delimiter(server, scored):
    tmp, settings = scored
    http = _login(server.url)
    study = re.search(r'href="/study/(\d+)', http.get(f"{server.url}/").text).group(1)
    payloads = ['=HYPERLINK("http://evil.example","click")', "a;=1+1", "x,@SUM(A1)", "+cmd", "\t=2", " -1+2"]
    for note in payloads:
        token = _csrf(http, server.url)
        http.post(f"{server.url}/study/{study}/verdict", data={"verdict": "yes", "note": note, "csrf_token": token})
    dicom_file(tmp / "evil-in" / "e.dcm", chest_like(seed=3), PatientName='=HYPERLINK("http://x")',
               PatientID="@SUM(1;2)")
    assert cli("score", str(tmp / "evil-in"), "--db", settings.db_url, "--reports", str(tmp / "reports")).returncode == 0
    assert cli("export", "--db", settings.db_url, "--out", str(tmp / "all.csv")).returncode == 0
    for text in (http.get(f"{server.url}/verdicts.csv").text, (tmp / "all.csv").read_text()):
        for delimiter in (",", ";", "\t", "|"):
            for row in csv.reader(io.StringIO(text), delimiter=delimiter):
                for cell in row:
                    assert cell.strip(' "')[:1] not in ("=", "+", "-", "@") or not cell.strip(' "'), (delimiter, cell)


def test_unsafe_settings_are_refused_with_the_reason():
    good = generate_password_hash("x" * 12)
    with pytest.raises(ConfigError, match="documented example"):
        check_web_settings(WebSettings(users={"a": good}, secret_key="<a long random string>"))
    with pytest.raises(ConfigError, match="at least 32"):
        check_web_settings(WebSettings(users={"a": good}, secret_key="short"))
    with pytest.raises(ConfigError, match="iterations too low"):
        check_web_settings(WebSettings(users={"a": generate_password_hash("x", "pbkdf2:sha256:1")}))
    with pytest.raises(ConfigError, match="empty password hash"):
        check_web_settings(WebSettings(users={"a": ""}))
    with pytest.raises(ConfigError, match="scrypt work factor too low"):
        check_web_settings(WebSettings(users={"a": generate_password_hash("x", "scrypt:1024:8:1")}))
    with pytest.raises(ConfigError, match="no TLS"):
        check_web_settings(WebSettings(users={"a": good}, host="0.0.0.0"))
    check_web_settings(WebSettings(users={"a": good}, host="0.0.0.0", behind_tls_proxy=True))


def test_serve_refuses_unsafe_settings_at_start(tmp_path):
    cfg = tmp_path / "review.toml"
    cfg.write_text(f'[batchcxr]\ndb_url = "{tmp_path / "r.sqlite"}"\n[batchcxr.web]\nhost = "0.0.0.0"\n'
                   f'secret_key = "{KEY}"\n[batchcxr.web.users]\nalice = "{generate_password_hash("x" * 12)}"\n')
    out = cli("serve", "--config", str(cfg), timeout=60)
    assert out.returncode == 2 and "no TLS" in out.stderr


def test_behind_a_tls_proxy_cookies_are_secure_and_hsts_is_sent(scored):
    tmp, _ = scored
    settings = _web(tmp, behind_tls_proxy=True)
    store = Store.open(settings.sqlalchemy_url)
    client = create_app(settings, store).test_client()
    page = client.get("/login", base_url="https://review.example")
    assert "max-age=31536000" in page.headers["Strict-Transport-Security"]
    token = re.search(r'name="csrf_token" value="([^"]+)"', page.text).group(1)
    r = client.post("/login", data={"username": "alice", "password": PASSWORD, "csrf_token": token},
                    base_url="https://review.example", headers={"Referer": "https://review.example/login"})
    assert r.status_code == 302 and "Secure" in r.headers["Set-Cookie"] and "HttpOnly" in r.headers["Set-Cookie"]
    store.close()


def test_tls_served_directly_with_a_self_signed_pair(scored, tmp_path):
    tmp, _ = scored
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)
    port = free_port()
    cfg = tmp_path / "review.toml"
    cfg.write_text(f'[batchcxr]\ndb_url = "{tmp / "r.sqlite"}"\nreports_dir = "{tmp / "reports"}"\n[batchcxr.web]\n'
                   f'port = {port}\nsecret_key = "{KEY}"\ntls_cert = "{cert}"\ntls_key = "{key}"\n'
                   f'[batchcxr.web.users]\nalice = "{generate_password_hash(PASSWORD)}"\n')
    proc = subprocess.Popen([sys.executable, "-m", "batchcxr.cli", "serve", "--config", str(cfg)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        def up():
            try:
                return requests.get(f"https://127.0.0.1:{port}/login", verify=str(cert), timeout=5)
            except requests.ConnectionError:
                return None
        page = wait_until(up, 60, what="the HTTPS server")
        assert page.status_code == 200 and "Strict-Transport-Security" in page.headers
        http = requests.Session()
        http.verify, http.trust_env = str(cert), False  # REQUESTS_CA_BUNDLE would override a session's verify
        token = re.search(r'name="csrf_token" value="([^"]+)"', http.get(f"https://127.0.0.1:{port}/login").text).group(1)
        r = http.post(f"https://127.0.0.1:{port}/login", data={"username": "alice", "password": PASSWORD,
                                                              "csrf_token": token},
                      headers={"Referer": f"https://127.0.0.1:{port}/login"}, allow_redirects=False)
        assert r.status_code == 302 and "Secure" in r.headers["Set-Cookie"]
        with pytest.raises(requests.ConnectionError):
            requests.get(f"http://127.0.0.1:{port}/login", timeout=5)  # no plain HTTP on that port
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.parametrize("target, expected", [
    ("/study/3?review=unreviewed", "/study/3?review=unreviewed"), ("/\t/evil.example/", ""), ("//evil.example", ""),
    ("https://evil.example/", ""), ("/\\evil.example", ""), ("javascript:alert(1)", ""), ("/ok\r\nSet-Cookie: x", ""),
])
def test_next_accepts_only_a_path_on_this_site(target, expected):
    assert safe_next(target) == expected


def test_login_redirect_never_leaves_the_site(server):
    http = _login(server.url, next="/\t/evil.example/")
    assert http.last.status_code == 302 and http.last.headers["Location"] in ("/", f"{server.url}/")


def test_files_holding_patient_data_are_private(tmp_path):
    shutil.copytree(DEMO_DIR / "jpeg", tmp_path / "in")
    out = cli("score", str(tmp_path / "in"), "--db", str(tmp_path / "db" / "r.sqlite"), "--reports",
              str(tmp_path / "rep"))
    assert out.returncode == 0, out.stderr
    assert stat.S_IMODE(os.stat(tmp_path / "db" / "r.sqlite").st_mode) == 0o600
    for p in (tmp_path / "rep").rglob("*"):
        mode = stat.S_IMODE(p.stat().st_mode)
        assert mode == (0o700 if p.is_dir() else 0o600), (p, oct(mode))
    assert stat.S_IMODE((tmp_path / "rep").stat().st_mode) == 0o700


def test_log_lines_never_carry_raw_control_characters(tmp_path):
    folder = tmp_path / "in" / "x\nINFO batchcxr: forged line"
    folder.mkdir(parents=True)
    (folder / "empty.dcm").write_bytes(b"")
    out = cli("-v", "score", str(tmp_path / "in"), "--db", str(tmp_path / "r.sqlite"), "--reports", str(tmp_path / "r"))
    assert out.returncode == 1
    assert not [line for line in out.stderr.splitlines() if line.startswith("INFO batchcxr: forged")]
    assert "x\\nINFO batchcxr: forged line" in out.stderr


def test_a_second_patient_in_one_study_is_kept_and_flagged(tmp_path):
    folder = tmp_path / "in"
    uid = "1.2.826.0.1.3680043.8.498.77"
    dicom_file(folder / "a.dcm", chest_like(seed=1), StudyInstanceUID=uid, PatientID="P-1", PatientName="Doe^Jane")
    dicom_file(folder / "b.dcm", chest_like(seed=2), StudyInstanceUID=uid, PatientID="P-2", PatientName="Roe^Rick")
    out = cli("score", str(folder), "--db", str(tmp_path / "r.sqlite"), "--reports", str(tmp_path / "rep"))
    assert out.returncode == 0, out.stderr
    store = Store.open(f"sqlite:///{tmp_path / 'r.sqlite'}")
    (study,) = store.studies()
    assert study.patient_id == "P-1" and study.conflict  # the first patient stays; the second is a conflict
    assert {i.patient_id for i in study.images} == {"P-1", "P-2"}  # both kept as data
    rows = store.prediction_rows()
    assert {r["conflict"] for r in rows} == {study.conflict} and {r["image_patient_id"] for r in rows} == {"P-1", "P-2"}
    store.close()
    page = next((tmp_path / "rep" / "studies").glob("*.html")).read_text()
    assert "Patient conflict" in page and "P-2" in page
    assert "patient conflict" in (tmp_path / "rep" / "index.html").read_text()


def test_hash_password_takes_no_password_argument_and_reads_stdin():
    assert cli("hash-password", "--password", "secret").returncode == 2
    out = subprocess.run([sys.executable, "-m", "batchcxr.cli", "hash-password"], input="a good long password\n",
                         capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("scrypt:32768:8:1$")
