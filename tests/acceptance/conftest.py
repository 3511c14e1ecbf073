"""The acceptance tier's fixtures: test databases and an S3 endpoint (shared with the integration tier)."""

from tests.fixtures_db import db_url, empty_db_url, engine, pg_server_url, store, template_db  # noqa: F401
from tests.fixtures_s3 import s3_bucket, s3_endpoint  # noqa: F401
