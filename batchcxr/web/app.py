"""The review app: worklist, study viewer, verdicts. Thin views over the Store.

Security: every page needs a login (users from settings, hashed with scrypt or pbkdf2 at a sane
work factor); sessions live in the database (the cookie holds only a random token) and end at
logout, on a password change, after the idle and absolute timeouts and by `batchcxr sessions
revoke`; failed logins back off per user name and per client address, and unknown users cost
the same work as known ones; every POST carries a CSRF token (Flask-WTF) and cookies are
SameSite=Strict (and Secure behind TLS); images are served by database id only (no request
path reaches the file system); Content-Security-Policy allows no inline script; PHI pages are
never cached; who saw or did what is written to the append-only audit log.
"""

from __future__ import annotations

import datetime as dt
import io
import logging
import secrets
import threading
import time
from dataclasses import dataclass
from functools import wraps
from pathlib import Path

from flask import Flask, Response, abort, g, redirect, request, send_file, session, url_for
from flask_wtf.csrf import CSRFError, CSRFProtect, generate_csrf
from werkzeug.security import check_password_hash

from batchcxr import metrics
from batchcxr.export import csv_row, write_csv
from batchcxr.paths import TEMPLATES_DIR
from batchcxr.report.render import NOTICE, StudyRow, make_environment, study_row, study_view
from batchcxr.settings import Settings
from batchcxr.store.lists import COUNT_CAP, FILTERS, WorklistFilter
from batchcxr.store.repo import VERDICTS, Store
from batchcxr.web.security import DUMMY_HASH, check_web_settings, fingerprint, safe_next

log = logging.getLogger(__name__)

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; form-action 'self'; "
       "frame-ancestors 'none'; base-uri 'none'; connect-src 'self'")
LOGIN_FAILED = "Unknown user or wrong password, or too many attempts: wait a moment and try again."
HASHING = threading.BoundedSemaphore(1)
"""One password check at a time: a flood of logins cannot take every CPU from the other pages."""


@dataclass
class Row:
    view: StudyRow
    verdict: str
    reviewer: str


def create_app(settings: Settings, store: Store) -> Flask:
    """The Flask app. Raises ConfigError (batchcxr.errors) for unsafe web settings."""
    web = settings.web
    check_web_settings(web)
    secure = bool(web.tls_cert) or web.behind_tls_proxy
    app = Flask(__name__, static_folder=str(TEMPLATES_DIR / "static"), static_url_path="/static")
    app.config.update(
        SECRET_KEY=web.secret_key or secrets.token_hex(32),
        PERMANENT_SESSION_LIFETIME=dt.timedelta(hours=web.session_max_hours),
        SESSION_COOKIE_NAME="batchcxr_session",
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Strict",
        SESSION_COOKIE_SECURE=secure,
        SESSION_REFRESH_EACH_REQUEST=False,
        WTF_CSRF_TIME_LIMIT=None,
        WTF_CSRF_SSL_STRICT=secure,
        MAX_CONTENT_LENGTH=64 * 1024,
    )
    CSRFProtect(app)
    env = make_environment()
    reports_dir = Path(settings.reports_dir).resolve()
    lateral = settings.quality.lateral_views
    fingerprints = {user: fingerprint(h) for user, h in web.users.items()}
    idle = dt.timedelta(minutes=web.session_minutes)
    absolute = dt.timedelta(hours=web.session_max_hours)

    def address() -> str:
        return request.remote_addr or ""

    def audit(action: str, target: str = "", detail: str = "") -> None:
        store.audit(action, user=g.get("user", "") or "", address=address(), target=target, detail=detail)

    def render(template: str, **context) -> str:
        return env.get_template(template).render(notice=NOTICE, root="/", csrf_token=generate_csrf(),
                                                 user=g.get("user"), url_for=url_for, **context)

    @app.before_request
    def start_timer() -> None:
        g.started = time.perf_counter()

    @app.teardown_request
    def count_request(_exc) -> None:
        endpoint = request.endpoint or "unknown"
        metrics.WEB_SECONDS.labels(endpoint).observe(time.perf_counter() - g.get("started", time.perf_counter()))

    @app.get("/metrics")
    def metrics_page():
        """Prometheus metrics, for a scraper that sends ``Authorization: Bearer <metrics_token>``."""
        import hmac

        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        given = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
        if not web.metrics_token or not hmac.compare_digest(given, web.metrics_token):
            abort(404)
        metrics.SESSIONS.set(len(store.live_web_sessions()))
        return Response(generate_latest(), mimetype=CONTENT_TYPE_LATEST)

    @app.before_request
    def load_user() -> None:
        g.user = store.web_session_user(session.get("sid", ""), fingerprints, idle, absolute)
        if g.user is None and "sid" in session:
            session.clear()

    def login_required(view):
        @wraps(view)
        def wrapped(*args, **kwargs):
            if not g.user:
                if request.method != "GET":
                    abort(401)
                return redirect(url_for("login", next=request.full_path if request.args else request.path))
            return view(*args, **kwargs)

        return wrapped

    @app.after_request
    def security_headers(response: Response) -> Response:
        metrics.WEB_REQUESTS.labels(request.endpoint or "unknown", str(response.status_code)).inc()
        response.headers["Content-Security-Policy"] = CSP
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["X-Frame-Options"] = "DENY"
        response.headers["Referrer-Policy"] = "no-referrer"
        response.headers["Cross-Origin-Opener-Policy"] = "same-origin"
        response.headers["Cache-Control"] = "no-store"
        response.headers["Pragma"] = "no-cache"
        if secure:
            response.headers["Strict-Transport-Security"] = "max-age=31536000; includeSubDomains"
        return response

    @app.errorhandler(CSRFError)
    def csrf_error(exc: CSRFError):
        return Response(f"Refused: {exc.description}", status=400, mimetype="text/plain")

    # --- auth -----------------------------------------------------------------
    @app.get("/login")
    def login():
        return render("web/login.html", error="", next=safe_next(request.args.get("next")))

    @app.post("/login")
    def login_post():
        name = request.form.get("username", "")[:128]
        password = request.form.get("password", "")
        keys = [f"user:{name}", f"addr:{address()}"]
        if store.login_wait(keys) > 0:  # backing off: no password is checked, and the wait grows
            store.login_failed(keys, web.login_attempts, web.lockout_max_seconds)
            store.audit("login_throttled", user=name, address=address())
            return render("web/login.html", error=LOGIN_FAILED, next=safe_next(request.form.get("next"))), 401
        stored = web.users.get(name)
        with HASHING:
            ok = check_password_hash(stored or DUMMY_HASH, password) and stored is not None
        if not ok:
            metrics.LOGIN_FAILURES.inc()
            store.login_failed(keys, web.login_attempts, web.lockout_max_seconds)
            store.audit("login_failed", user=name, address=address())
            return render("web/login.html", error=LOGIN_FAILED, next=safe_next(request.form.get("next"))), 401
        store.login_succeeded(keys)
        session.clear()
        session.permanent = True
        session["sid"] = store.open_web_session(name, fingerprints[name], address())
        g.user = name
        audit("login_ok")
        return redirect(safe_next(request.form.get("next")) or url_for("worklist"))

    @app.post("/logout")
    @login_required
    def logout():
        store.end_web_session(session.get("sid", ""))
        audit("logout")
        session.clear()
        return redirect(url_for("login"))

    # --- worklist and study -----------------------------------------------------
    def page_rows(f: WorklistFilter, page: int) -> tuple[list[Row], int, int, bool]:
        """One worklist page from SQL: (rows, page, matching studies, whether there are more than
        that); a filtered list counts up to COUNT_CAP. A study page loads only its study."""
        filtered = bool(f.as_args())
        total = store.count_studies(f, cap=COUNT_CAP) if filtered else store.count_studies()
        more = filtered and total > COUNT_CAP
        total = min(total, COUNT_CAP) if more else total
        page = max(1, page) if more else min(max(1, page), max(1, -(-total // web.page_size)))
        studies = store.worklist(f, (page - 1) * web.page_size, web.page_size)
        latest = store.latest_verdicts([st.id for st in studies])
        rows = []
        for st in studies:
            v = latest.get(st.id)
            rows.append(Row(study_row(st), v.verdict if v else "", v.reviewer if v else ""))
        return rows, page, total, more

    @app.get("/")
    @login_required
    def worklist():
        f = WorklistFilter.from_args(request.args)
        shown, page, total, more = page_rows(f, request.args.get("page", 1, type=int))
        audit("worklist", f"page {page}", " ".join(f"{k}={v}" for k, v in f.as_args().items()))
        # counted up to the cap: "more than", and a next page while pages are full
        pages = page + (len(shown) == web.page_size) if more else max(1, -(-total // web.page_size))
        studies_total = store.count_studies() if f.as_args() else total  # unfiltered: counted once (O(N))
        return render("web/worklist.html", rows=shown, page=page, pages=pages, total=total, more=more,
                      studies_total=studies_total, reviewed=store.count_reviewed(), filters=f.as_args(),
                      choices=FILTERS, model_names=sorted({n for r in shown for n in r.view.scores}))

    @app.get("/study/<int:study_id>")
    @login_required
    def study(study_id: int):
        found = store.study(study_id)
        if found is None:
            abort(404)
        audit("study", f"study {study_id}", found.study_key)
        f = WorklistFilter.from_args(request.args)
        view = study_view(found, lateral)
        prev_id, next_id = store.neighbours(found, f)
        latest = store.latest_verdicts([study_id]).get(study_id)
        return render("web/study.html", study=view, latest=latest, prev_id=prev_id, next_id=next_id,
                      filters=f.as_args(), verdicts=VERDICTS,
                      image_src=lambda img: url_for("image", image_id=img.id),
                      overlay_src=lambda r: url_for("overlay", prediction_id=r.id),
                      lungs_src=lambda img: url_for("lungs", image_id=img.id))

    @app.post("/study/<int:study_id>/verdict")
    @login_required
    def verdict(study_id: int):
        choice = request.form.get("verdict", "")
        if choice not in VERDICTS:
            abort(400)
        if store.study(study_id) is None:
            abort(404)
        store.add_verdict(study_id, g.user, choice, request.form.get("note", "").strip())
        audit("verdict", f"study {study_id}", choice)
        target = request.form.get("next_id", type=int)
        filters = WorklistFilter.from_args(request.form).as_args()
        if target:
            return redirect(url_for("study", study_id=target, **filters))
        return redirect(url_for("study", study_id=study_id, saved=1, **filters))

    @app.get("/verdicts.csv")
    @login_required
    def verdicts_csv():
        fields = ["id", "study_key", "patient_id", "accession_number", "reviewer", "verdict", "note", "created_at"]
        audit("csv_export", "verdicts.csv")

        def generate():
            buf = io.StringIO()
            rows = store.iter_verdict_rows()
            write_csv([], fields, buf)
            yield buf.getvalue()
            for row in rows:
                buf.seek(0)
                buf.truncate()
                csv_row(row, fields, buf)
                yield buf.getvalue()

        return Response(generate(), mimetype="text/csv",
                        headers={"Content-Disposition": "attachment; filename=verdicts.csv"})

    # --- images: by database id only ------------------------------------------------
    def _send(rel: str | None):
        if not rel:
            abort(404)
        path = (reports_dir / rel).resolve()
        if reports_dir not in path.parents or not path.is_file():
            abort(404)
        return send_file(path, max_age=0)  # image/jpeg, image/png or image/svg+xml, from the suffix

    @app.get("/image/<int:image_id>")
    @login_required
    def image(image_id: int):
        audit("image", f"image {image_id}")
        return _send(store.image_file(image_id))

    @app.get("/overlay/<int:prediction_id>")
    @login_required
    def overlay(prediction_id: int):
        audit("overlay", f"prediction {prediction_id}")
        return _send(store.overlay_file(prediction_id))

    @app.get("/lungs/<int:image_id>")
    @login_required
    def lungs(image_id: int):
        audit("lungs", f"image {image_id}")
        return _send(store.lungs_file(image_id))

    @app.get("/style.css")
    def style():
        return send_file(TEMPLATES_DIR / "style.css", mimetype="text/css", max_age=0)

    @app.get("/favicon.svg")
    @app.get("/favicon.ico")
    def favicon():
        return send_file(TEMPLATES_DIR / "favicon.svg", mimetype="image/svg+xml", max_age=86400)

    return app


def serve(settings: Settings, store: Store) -> None:
    """Run the app on settings.web.host:port: waitress for plain HTTP (loopback, or behind a TLS
    proxy), cheroot with its TLS adapter when tls_cert/tls_key are set."""
    app = create_app(settings, store)
    web = settings.web
    if web.tls_cert:
        from cheroot import wsgi
        from cheroot.ssl.builtin import BuiltinSSLAdapter

        server = wsgi.Server((web.host, web.port), app, numthreads=web.threads)
        server.ssl_adapter = BuiltinSSLAdapter(web.tls_cert, web.tls_key)
        try:
            server.start()
        finally:
            server.stop()
        return
    from waitress import serve as waitress_serve

    waitress_serve(app, host=web.host, port=web.port, threads=web.threads)
