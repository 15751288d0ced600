"""source file records, claims, incomplete-file timers, study results kept in SQL, run owners,
daemon faults, indexes for archive-sized lists

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02 19:00:00
"""
from alembic import op
import sqlalchemy as sa


revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('runs') as b:
        b.add_column(sa.Column('host', sa.String(length=255), nullable=False, server_default=''))
        b.add_column(sa.Column('pid', sa.Integer(), nullable=True))
    with op.batch_alter_table('studies') as b:
        b.add_column(sa.Column('max_score', sa.Float(), nullable=False, server_default='-1'))
        b.add_column(sa.Column('positive', sa.Boolean(), nullable=False, server_default=sa.false()))
        b.add_column(sa.Column('negative', sa.Boolean(), nullable=False, server_default=sa.false()))
        b.add_column(sa.Column('disagree', sa.Boolean(), nullable=False, server_default=sa.false()))
        b.add_column(sa.Column('n_images', sa.Integer(), nullable=False, server_default='0'))
        b.add_column(sa.Column('results', sa.JSON(), nullable=True))
        # pages written before this revision exist (every run rewrote them all): not stale; `batchcxr report
        # --rebuild` renders them anew
        b.add_column(sa.Column('report_stale', sa.Boolean(), nullable=False, server_default=sa.false()))
        b.create_index('ix_studies_max_score', ['max_score', 'id'])
        b.create_index('ix_studies_study_date', ['study_date'])
        b.create_index('ix_studies_report_stale', ['report_stale'])
    with op.batch_alter_table('images') as b:
        b.create_index('ix_images_study_id', ['study_id'])
        b.add_column(sa.Column('lungs_path', sa.Text(), nullable=False, server_default=''))
    with op.batch_alter_table('predictions') as b:
        b.add_column(sa.Column('calibrated', sa.Float(), nullable=True))
    with op.batch_alter_table('errors') as b:
        b.create_index('ix_errors_run_id', ['run_id'])
        b.create_index('ix_errors_content_sha256', ['content_sha256'])
        b.create_index('ix_errors_created_at', ['created_at'])
    with op.batch_alter_table('daemon_status') as b:
        b.add_column(sa.Column('fault', sa.Text(), nullable=False, server_default=''))
        b.add_column(sa.Column('fault_since', sa.DateTime(), nullable=True))
        b.add_column(sa.Column('oldest_waiting_s', sa.Float(), nullable=False, server_default='0'))
    op.create_table(
        'source_files',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('path_hash', sa.String(length=64), nullable=False),
        sa.Column('path', sa.Text(), nullable=False),
        sa.Column('device', sa.BigInteger(), nullable=False),
        sa.Column('inode', sa.BigInteger(), nullable=False),
        sa.Column('size', sa.BigInteger(), nullable=False),
        sa.Column('mtime_ns', sa.BigInteger(), nullable=False),
        sa.Column('content_sha256', sa.String(length=64), nullable=False),
        sa.Column('status', sa.String(length=16), nullable=False),
        sa.Column('stage', sa.String(length=16), nullable=False),
        sa.Column('reason', sa.Text(), nullable=False),
        sa.Column('run_id', sa.Integer(), nullable=True),
        sa.Column('moved_to', sa.Text(), nullable=False),
        sa.Column('updated_at', sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(['run_id'], ['runs.id']),
        sa.PrimaryKeyConstraint('id'),
        sa.UniqueConstraint('path_hash'),
    )
    op.create_index('ix_source_files_content_sha256', 'source_files', ['content_sha256'])
    op.create_index('ix_source_files_status_updated', 'source_files', ['status', 'updated_at'])
    op.create_table(
        'claims',
        sa.Column('path_hash', sa.String(length=64), nullable=False),
        sa.Column('path', sa.Text(), nullable=False),
        sa.Column('owner', sa.String(length=255), nullable=False),
        sa.Column('claimed_at', sa.DateTime(), nullable=False),
        sa.Column('expires_at', sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint('path_hash'),
    )
    op.create_index('ix_claims_expires_at', 'claims', ['expires_at'])
    op.create_table(
        'incomplete_files',
        sa.Column('path_hash', sa.String(length=64), nullable=False),
        sa.Column('path', sa.Text(), nullable=False),
        sa.Column('size', sa.BigInteger(), nullable=False),
        sa.Column('mtime_ns', sa.BigInteger(), nullable=False),
        sa.Column('unchanged_since', sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint('path_hash'),
    )
    _fill_study_results(op.get_bind())


LATERAL = ("LL", "RL", "LAT", "LATERAL", "LLD", "RLD")


def _fill_study_results(bind) -> None:
    """Study results of databases made before this revision (the newest prediction per model of
    each frontal scored image; the highest per model is the study's result)."""
    import json

    from sqlalchemy import text

    latest: dict = {}
    for image_id, study_id, status, view, name, probability, label in bind.execute(text(
            "SELECT i.id, i.study_id, i.status, i.view_position, p.model_name, p.probability, p.label "
            "FROM images i JOIN predictions p ON p.image_id = i.id ORDER BY p.created_at, p.id")):
        latest[image_id, name] = (study_id, status, view, probability, label)
    studies: dict = {}
    for (image_id, name), (study_id, status, view, probability, label) in latest.items():
        agg = studies.setdefault(study_id, {"results": {}, "labels_by_image": {}})
        agg["labels_by_image"].setdefault(image_id, set()).add(label)
        if status != "scored" or (view or "").upper() in LATERAL:
            continue
        if probability > agg["results"].get(name, [-1.0])[0]:
            agg["results"][name] = [probability, label]
    counts = dict(bind.execute(text("SELECT study_id, count(*) FROM images GROUP BY study_id")).all())
    for study_id, agg in studies.items():
        labels = {v[1] for v in agg["results"].values()}
        disagree = len(labels) > 1 or any(len(v) > 1 for v in agg["labels_by_image"].values())
        bind.execute(text("UPDATE studies SET results = :r, max_score = :m, positive = :p, negative = :n, "
                          "disagree = :d, n_images = :c WHERE id = :id"),
                     dict(r=json.dumps(agg["results"]), m=max((v[0] for v in agg["results"].values()), default=-1.0),
                          p="PNEUMONIA" in labels, n="NORMAL" in labels, d=disagree, c=counts.get(study_id, 0),
                          id=study_id))


def downgrade() -> None:
    op.drop_table('incomplete_files')
    op.drop_index('ix_claims_expires_at', 'claims')
    op.drop_table('claims')
    op.drop_index('ix_source_files_status_updated', 'source_files')
    op.drop_index('ix_source_files_content_sha256', 'source_files')
    op.drop_table('source_files')
    with op.batch_alter_table('daemon_status') as b:
        b.drop_column('oldest_waiting_s')
        b.drop_column('fault_since')
        b.drop_column('fault')
    with op.batch_alter_table('errors') as b:
        b.drop_index('ix_errors_created_at')
        b.drop_index('ix_errors_content_sha256')
        b.drop_index('ix_errors_run_id')
    with op.batch_alter_table('predictions') as b:
        b.drop_column('calibrated')
    with op.batch_alter_table('images') as b:
        b.drop_column('lungs_path')
        b.drop_index('ix_images_study_id')
    with op.batch_alter_table('studies') as b:
        b.drop_index('ix_studies_report_stale')
        b.drop_index('ix_studies_study_date')
        b.drop_index('ix_studies_max_score')
        for c in ('report_stale', 'results', 'n_images', 'disagree', 'negative', 'positive', 'max_score'):
            b.drop_column(c)
    with op.batch_alter_table('runs') as b:
        b.drop_column('pid')
        b.drop_column('host')
