"""Fixtures of the pipeline tests: a real S3-compatible server on loopback (tests/lf_s3.py), and the tiny BLIP and
Whisper captioners saved once for the captioning modules (tests/tiny_captioners.py)."""
import pytest
from lf_s3 import s3_bucket, s3_server  # noqa: F401
from tiny_captioners import save_tiny_blip, save_tiny_whisper


@pytest.fixture(scope="session")
def captioners(tmp_path_factory) -> dict[str, str]:
    """Paths of a tiny random-weight BLIP and Whisper, loaded by the stages through from_pretrained."""
    root = tmp_path_factory.mktemp("captioners")
    return {"blip": save_tiny_blip(root / "blip"), "whisper": save_tiny_whisper(root / "whisper")}
