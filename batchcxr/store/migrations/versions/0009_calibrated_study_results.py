"""the calibrated probability in each study's stored results, so worklists show what study pages
show (P(pneumonia), calibrated) instead of the raw model score, and sort by it

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-07 09:00:00
"""
from alembic import op


revision = '0009'
down_revision = '0008'
branch_labels = None
depends_on = None

CHUNK = 2000


def upgrade() -> None:
    """Each study's results {model: [probability, label]} get the calibrated probability of the
    prediction they came from: the newest prediction of that model on an image of the study with
    that probability (None where it has none), and max_score becomes the highest of what readers
    see (calibrated, else raw). Studies in chunks, so memory stays flat on an archive of any size;
    updated_at is left alone (nothing new to send to a PACS)."""
    import json

    from sqlalchemy import bindparam, text

    bind = op.get_bind()
    after = 0
    while True:
        studies = bind.execute(text("SELECT id, results FROM studies WHERE results IS NOT NULL AND id > :after "
                                    "ORDER BY id LIMIT :n"), dict(after=after, n=CHUNK)).all()
        if not studies:
            return
        after = studies[-1][0]
        calibrated = {}
        for study_id, name, probability, value in bind.execute(text(
                "SELECT i.study_id, p.model_name, p.probability, p.calibrated FROM predictions p "
                "JOIN images i ON i.id = p.image_id WHERE i.study_id IN :ids ORDER BY p.created_at, p.id")
                .bindparams(bindparam("ids", expanding=True)), dict(ids=[s[0] for s in studies])):
            calibrated[study_id, name, probability] = value
        rows = []
        for study_id, results in studies:
            results = json.loads(results) if isinstance(results, str) else results
            filled = {name: [r[0], r[1], calibrated.get((study_id, name, r[0]))] for name, r in results.items()}
            top = max((r[2] if r[2] is not None else r[0] for r in filled.values()), default=-1.0)
            rows.append(dict(r=json.dumps(filled), m=top, id=study_id))
        bind.execute(text("UPDATE studies SET results = :r, max_score = :m WHERE id = :id"), rows)


def downgrade() -> None:
    """Nothing to undo: earlier code reads the first two values of each result and ignores the third."""
