"""Fixtures of the dataset tests: a real S3-compatible server on loopback (tests/lf_s3.py), and a count of the
frames PyAV decodes."""
import pytest
from lf_s3 import s3_bucket, s3_server  # noqa: F401


@pytest.fixture
def decoded(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many frames PyAV decodes, counted as they leave the decoder (`video._frames_of`)."""
    from latentforge.datasets import video

    counts = []
    frames_of = video._frames_of

    def counted(container, stream):
        for frame in frames_of(container, stream):
            counts.append(1)
            yield frame

    monkeypatch.setattr(video, "_frames_of", counted)
    return counts
