"""indexes for the worklist filtered by label or agreement, in score order

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-02 22:00:00
"""
from alembic import op


revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None

INDEXES = {
    "ix_studies_positive_score": ["positive", "max_score", "id"],
    "ix_studies_negative_score": ["negative", "max_score", "id"],
    "ix_studies_disagree_score": ["disagree", "max_score", "id"],
    "ix_studies_positive_disagree_score": ["positive", "disagree", "max_score", "id"],
    "ix_studies_negative_disagree_score": ["negative", "disagree", "max_score", "id"],
}


def upgrade() -> None:
    for name, columns in INDEXES.items():
        op.create_index(name, "studies", columns)


def downgrade() -> None:
    for name in INDEXES:
        op.drop_index(name, table_name="studies")
