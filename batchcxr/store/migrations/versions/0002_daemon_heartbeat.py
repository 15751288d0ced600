"""daemon heartbeat

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25 21:05:57.594395
"""
from alembic import op
import sqlalchemy as sa


revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('daemon_status',
    sa.Column('name', sa.String(length=255), nullable=False),
    sa.Column('pid', sa.Integer(), nullable=False),
    sa.Column('host', sa.String(length=255), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('started_at', sa.DateTime(), nullable=False),
    sa.Column('heartbeat_at', sa.DateTime(), nullable=False),
    sa.Column('files_waiting', sa.Integer(), nullable=False),
    sa.Column('studies_pending', sa.Integer(), nullable=False),
    sa.Column('last_scored_at', sa.DateTime(), nullable=True),
    sa.PrimaryKeyConstraint('name')
    )


def downgrade() -> None:
    op.drop_table('daemon_status')
