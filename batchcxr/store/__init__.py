"""Results database: SQLAlchemy 2 models, Alembic migrations, and the Store that reads and writes."""
