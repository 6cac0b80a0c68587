"""Fixtures of the pipeline tests: a real S3-compatible server on loopback (tests/lf_s3.py)."""
from lf_s3 import s3_bucket, s3_server  # noqa: F401
