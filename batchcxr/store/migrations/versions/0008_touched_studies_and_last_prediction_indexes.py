"""indexes on studies.updated_at and predictions.created_at: the studies a run touched (results for
the PACS) and the time of the last prediction (batchcxr status) found without a scan of the archive

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-07 00:30:00
"""
from alembic import op


revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None

INDEXES = {"ix_studies_updated_at": ("studies", ["updated_at"]),
           "ix_predictions_created_at": ("predictions", ["created_at"])}


def upgrade() -> None:
    for name, (table, columns) in INDEXES.items():
        op.create_index(name, table, columns)


def downgrade() -> None:
    for name, (table, _columns) in INDEXES.items():
        op.drop_index(name, table_name=table)
