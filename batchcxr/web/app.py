"""The review app: worklist, study viewer, verdicts. Thin views over the Store.

Security: every page needs a login (users from settings, hashed passwords); sessions
expire; every POST carries a CSRF token (Flask-WTF) and cookies are SameSite=Strict;
images are served by database id only (no request path reaches the file system);
Content-Security-Policy allows no inline script; PHI pages are never cached. The app
only reads the input folders' results and writes verdicts to the database.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import secrets
from dataclasses import dataclass
from functools import wraps
from pathlib import Path

from flask import Flask, Response, abort, redirect, request, send_file, session, url_for
from flask_wtf.csrf import CSRFError, CSRFProtect, generate_csrf
from werkzeug.security import check_password_hash

from batchcxr.paths import TEMPLATES_DIR
from batchcxr.report.render import NOTICE, StudyView, make_environment, study_view
from batchcxr.settings import Settings
from batchcxr.store.repo import VERDICTS, Store

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; form-action 'self'; "
       "frame-ancestors 'none'; base-uri 'none'; connect-src 'self'")
FILTERS = {
    "review": ("all", "unreviewed", "reviewed"),
    "agreement": ("all", "agree", "disagree"),
    "label": ("all", "PNEUMONIA", "NORMAL"),
}


@dataclass
class Row:
    view: StudyView
    verdict: str
    reviewer: str


def create_app(settings: Settings, store: Store) -> Flask:
    web = settings.web
    app = Flask(__name__, static_folder=str(TEMPLATES_DIR / "static"), static_url_path="/static")
    app.config.update(
        SECRET_KEY=web.secret_key or secrets.token_hex(32),
        PERMANENT_SESSION_LIFETIME=dt.timedelta(minutes=web.session_minutes),
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Strict",
        SESSION_REFRESH_EACH_REQUEST=True,
        WTF_CSRF_TIME_LIMIT=None,
        MAX_CONTENT_LENGTH=64 * 1024,
    )
    CSRFProtect(app)
    env = make_environment()
    reports_dir = Path(settings.reports_dir).resolve()
    lateral = settings.quality.lateral_views

    def render(template: str, **context) -> str:
        return env.get_template(template).render(notice=NOTICE, root="/", csrf_token=generate_csrf(),
                                                 user=session.get("user"), url_for=url_for, **context)

    def login_required(view):
        @wraps(view)
        def wrapped(*args, **kwargs):
            if not session.get("user") or session.get("user") not in web.users:
                if request.method != "GET":
                    abort(401)
                return redirect(url_for("login", next=request.full_path if request.args else request.path))
            return view(*args, **kwargs)

        return wrapped

    @app.after_request
    def security_headers(response: Response) -> Response:
        response.headers["Content-Security-Policy"] = CSP
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["X-Frame-Options"] = "DENY"
        response.headers["Referrer-Policy"] = "no-referrer"
        response.headers["Cross-Origin-Opener-Policy"] = "same-origin"
        response.headers["Cache-Control"] = "no-store"
        response.headers["Pragma"] = "no-cache"
        return response

    @app.errorhandler(CSRFError)
    def csrf_error(exc: CSRFError):
        return Response(f"Refused: {exc.description}", status=400, mimetype="text/plain")

    # --- auth -----------------------------------------------------------------
    @app.get("/login")
    def login():
        return render("web/login.html", error="", next=_safe_next(request.args.get("next")))

    @app.post("/login")
    def login_post():
        name = request.form.get("username", "")
        password = request.form.get("password", "")
        stored = web.users.get(name)
        if not stored or not check_password_hash(stored, password):
            return render("web/login.html", error="Unknown user or wrong password.",
                          next=_safe_next(request.form.get("next"))), 401
        session.clear()
        session.permanent = True
        session["user"] = name
        return redirect(_safe_next(request.form.get("next")) or url_for("worklist"))

    @app.post("/logout")
    @login_required
    def logout():
        session.clear()
        return redirect(url_for("login"))

    # --- worklist and study -----------------------------------------------------
    def rows(args) -> list[Row]:
        latest = store.latest_verdicts()
        out = []
        for study in store.studies():
            view = study_view(study, lateral)
            v = latest.get(study.id)
            out.append(Row(view, v.verdict if v else "", v.reviewer if v else ""))
        out.sort(key=lambda r: (-r.view.max_score, r.view.id))
        chosen = {k: (args.get(k) if args.get(k) in allowed else "all") for k, allowed in FILTERS.items()}
        date_from, date_to = _date(args.get("from")), _date(args.get("to"))
        keep = []
        for r in out:
            if chosen["review"] == "unreviewed" and r.verdict or chosen["review"] == "reviewed" and not r.verdict:
                continue
            if chosen["agreement"] == "agree" and r.view.disagree or chosen["agreement"] == "disagree" and not r.view.disagree:
                continue
            if chosen["label"] != "all" and chosen["label"] not in r.view.labels.values():
                continue
            if date_from and (not r.view.study_date or r.view.study_date < date_from):
                continue
            if date_to and (not r.view.study_date or r.view.study_date > date_to):
                continue
            keep.append(r)
        return keep

    def filter_args(args) -> dict[str, str]:
        return {k: v for k, v in args.items() if k in (*FILTERS, "from", "to") and v and v != "all"}

    @app.get("/")
    @login_required
    def worklist():
        selected = rows(request.args)
        page = max(1, request.args.get("page", 1, type=int))
        size = web.page_size
        pages = max(1, (len(selected) + size - 1) // size)
        page = min(page, pages)
        shown = selected[(page - 1) * size : page * size]
        all_rows = store.studies()
        reviewed = len(store.latest_verdicts())
        return render("web/worklist.html", rows=shown, page=page, pages=pages, total=len(selected),
                      studies_total=len(all_rows), reviewed=reviewed, filters=filter_args(request.args),
                      choices=FILTERS, model_names=sorted({n for r in selected for n in r.view.scores}))

    @app.get("/study/<int:study_id>")
    @login_required
    def study(study_id: int):
        found = store.study(study_id)
        if found is None:
            abort(404)
        view = study_view(found, lateral)
        order = [r.view.id for r in rows(request.args)]
        pos = order.index(study_id) if study_id in order else -1
        prev_id = order[pos - 1] if pos > 0 else None
        next_id = order[pos + 1] if 0 <= pos < len(order) - 1 else None
        latest = store.latest_verdicts().get(study_id)
        return render("web/study.html", study=view, latest=latest, prev_id=prev_id, next_id=next_id,
                      filters=filter_args(request.args), verdicts=VERDICTS,
                      image_src=lambda img: url_for("image", image_id=img.id),
                      overlay_src=lambda r: url_for("overlay", prediction_id=r.id))

    @app.post("/study/<int:study_id>/verdict")
    @login_required
    def verdict(study_id: int):
        choice = request.form.get("verdict", "")
        if choice not in VERDICTS:
            abort(400)
        if store.study(study_id) is None:
            abort(404)
        store.add_verdict(study_id, session["user"], choice, request.form.get("note", "").strip())
        target = request.form.get("next_id", type=int)
        filters = {k: v for k, v in request.form.items() if k in (*FILTERS, "from", "to") and v}
        if target:
            return redirect(url_for("study", study_id=target, **filters))
        return redirect(url_for("study", study_id=study_id, saved=1, **filters))

    @app.get("/verdicts.csv")
    @login_required
    def verdicts_csv():
        buf = io.StringIO()
        rows_ = store.verdict_rows()
        fields = ["id", "study_key", "patient_id", "accession_number", "reviewer", "verdict", "note", "created_at"]
        writer = csv.DictWriter(buf, fieldnames=fields)
        writer.writeheader()
        for r in rows_:
            writer.writerow({k: _csv_safe(r[k]) for k in fields})
        return Response(buf.getvalue(), mimetype="text/csv",
                        headers={"Content-Disposition": "attachment; filename=verdicts.csv"})

    # --- images: by database id only ------------------------------------------------
    def _send(rel: str | None):
        if not rel:
            abort(404)
        path = (reports_dir / rel).resolve()
        if reports_dir not in path.parents or not path.is_file():
            abort(404)
        return send_file(path, max_age=0)  # image/jpeg or image/png, from the suffix

    @app.get("/image/<int:image_id>")
    @login_required
    def image(image_id: int):
        return _send(store.image_file(image_id))

    @app.get("/overlay/<int:prediction_id>")
    @login_required
    def overlay(prediction_id: int):
        return _send(store.overlay_file(prediction_id))

    @app.get("/style.css")
    def style():
        return send_file(TEMPLATES_DIR / "style.css", mimetype="text/css", max_age=0)

    return app


def _safe_next(target: str | None) -> str:
    """Only same-site relative paths are followed after login."""
    if target and target.startswith("/") and not target.startswith("//") and "\\" not in target:
        return target
    return ""


def _date(text: str | None) -> str:
    """'2026-11-24' or '20261124' -> '20261124' (DICOM DA); anything else -> ''."""
    if not text:
        return ""
    digits = text.replace("-", "")
    return digits if len(digits) == 8 and digits.isdigit() else ""


def _csv_safe(value):
    """Neutralise spreadsheet formulas in text cells (CSV injection)."""
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value


def serve(settings: Settings, store: Store) -> None:
    """Run the app with waitress (a production WSGI server) on settings.web.host:port."""
    from waitress import serve as waitress_serve

    waitress_serve(create_app(settings, store), host=settings.web.host, port=settings.web.port, threads=4)
