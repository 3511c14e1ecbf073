"""Fixtures every tier needs belong here; today there are none. Each tier brings its own in its
conftest: tests/integration and tests/acceptance the test databases (tests/fixtures_db.py) and the
S3 endpoint (tests/fixtures_s3.py), tests/pipeline the tiny checkpoints and LM. Keep heavy imports
out of this file: every tier, the unit tier included, loads it."""
