"""The embedded invertible codecs: exact round trips, latent layout, and orthonormality (energy preserved)."""

from __future__ import annotations

import numpy as np
import pytest

from latentforge.datasets.codec import DctAudioCodec, HaarPixelCodec


def random_frames(rng: np.random.Generator, t: int, h: int, w: int) -> np.ndarray:
    return rng.integers(0, 256, size=(t, h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize("t, h, w", [(1, 2, 2), (1, 32, 32), (4, 16, 24), (3, 10, 6), (2, 64, 8)])
def test_haar_round_trip_is_exact_for_uint8_frames(t: int, h: int, w: int) -> None:
    codec = HaarPixelCodec()
    frames = random_frames(np.random.default_rng([t, h, w]), t, h, w)
    latent = codec.encode(frames)
    assert latent.dtype == np.float32
    assert latent.shape == (12, t, h // 2, w // 2)
    decoded = codec.decode(latent)
    assert decoded.dtype == np.uint8
    np.testing.assert_array_equal(decoded, frames)


def test_haar_extreme_values_survive_the_round_trip() -> None:
    # Saturated black/white checkerboards put the largest values into the detail bands.
    frames = np.zeros((2, 8, 8, 3), dtype=np.uint8)
    frames[0, ::2, ::2] = 255
    frames[0, 1::2, 1::2] = 255
    frames[1] = 255
    codec = HaarPixelCodec()
    np.testing.assert_array_equal(codec.decode(codec.encode(frames)), frames)


def test_haar_decode_float_inverts_encode_to_float_precision() -> None:
    codec = HaarPixelCodec()
    frames = random_frames(np.random.default_rng(1), 3, 12, 20)
    expected = frames.astype(np.float32) / 127.5 - 1.0
    decoded = codec.decode_float(codec.encode(frames))
    assert decoded.shape == frames.shape
    np.testing.assert_allclose(decoded, expected, atol=1e-6)


def test_haar_encode_inverts_decode_float_on_arbitrary_latents() -> None:
    # The transform is a bijection on the whole latent space, not only on latents of real images:
    # decode_float then encode (fed the same float pixel values) gives the latent back.
    codec = HaarPixelCodec()
    latent = np.random.default_rng(2).standard_normal((12, 2, 5, 7)).astype(np.float32)
    pixels = codec.decode_float(latent)
    assert pixels.shape == (2, 10, 14, 3)
    np.testing.assert_allclose(codec.encode((pixels + 1.0) * 127.5), latent, atol=1e-5)


def test_haar_low_pass_band_is_scaled_block_mean() -> None:
    """Channels 0..2 are the low-pass RGB: 2 * the mean of each 2x2 block (orthonormal Haar in 2D)."""
    codec = HaarPixelCodec()
    frames = random_frames(np.random.default_rng(3), 1, 8, 8)
    x = frames.astype(np.float64) / 127.5 - 1.0  # (1, 8, 8, 3)
    block_mean = x.reshape(1, 4, 2, 4, 2, 3).mean(axis=(2, 4))  # (1, 4, 4, 3)
    latent = codec.encode(frames)
    np.testing.assert_allclose(latent[:3], 2.0 * np.moveaxis(block_mean, -1, 0), atol=1e-5)
    # A flat image has no detail: the nine high-pass channels are zero.
    flat = np.full((1, 8, 8, 3), 77, dtype=np.uint8)
    np.testing.assert_allclose(codec.encode(flat)[3:], 0.0, atol=1e-6)


def test_haar_preserves_energy() -> None:
    codec = HaarPixelCodec()
    frames = random_frames(np.random.default_rng(4), 2, 16, 12)
    x = frames.astype(np.float64) / 127.5 - 1.0
    latent = codec.encode(frames).astype(np.float64)
    np.testing.assert_allclose(np.sum(latent**2), np.sum(x**2), rtol=1e-5)


@pytest.mark.parametrize("shape", [(1, 3, 4, 3), (1, 4, 5, 3), (2, 7, 7, 3)])
def test_haar_refuses_odd_sizes(shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match="must be even"):
        HaarPixelCodec().encode(np.zeros(shape, dtype=np.uint8))


@pytest.mark.parametrize("shape", [(4, 4, 3), (1, 4, 4, 4), (1, 4, 4, 1)])
def test_haar_refuses_wrong_layout(shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match=r"\(T, H, W, 3\)"):
        HaarPixelCodec().encode(np.zeros(shape, dtype=np.uint8))


@pytest.mark.parametrize("frame, n", [(64, 64), (64, 8000), (8, 24), (32, 4096)])
def test_dct_round_trip(frame: int, n: int) -> None:
    codec = DctAudioCodec(frame=frame)
    assert codec.channels == frame
    wave = np.random.default_rng([frame, n]).uniform(-1, 1, n).astype(np.float32)
    latent = codec.encode(wave)
    assert latent.dtype == np.float32
    assert latent.shape == (frame, n // frame, 1, 1)
    decoded = codec.decode(latent)
    assert decoded.dtype == np.float32
    assert decoded.shape == (n,)
    np.testing.assert_allclose(decoded, wave, atol=1e-5)


def test_dct_latent_time_step_is_one_frame_spectrum() -> None:
    """Each latent time step depends on its own frame only; a constant frame is pure DC."""
    frame = 16
    codec = DctAudioCodec(frame=frame)
    wave = np.zeros(frame * 3, dtype=np.float32)
    wave[frame : 2 * frame] = 0.25  # only the middle frame is non-zero, and flat
    latent = codec.encode(wave)[:, :, 0, 0]  # (frame, T)
    np.testing.assert_allclose(latent[:, 0], 0.0, atol=1e-7)
    np.testing.assert_allclose(latent[:, 2], 0.0, atol=1e-7)
    np.testing.assert_allclose(latent[0, 1], 0.25 * np.sqrt(frame), rtol=1e-6)  # orthonormal DC = sum / sqrt(n)
    np.testing.assert_allclose(latent[1:, 1], 0.0, atol=1e-6)


def test_dct_preserves_energy() -> None:
    codec = DctAudioCodec(frame=64)
    wave = np.random.default_rng(5).standard_normal(64 * 50)
    latent = codec.encode(wave).astype(np.float64)
    np.testing.assert_allclose(np.sum(latent**2), np.sum(wave**2), rtol=1e-5)
    # Per frame too: each frame's spectrum carries exactly that frame's energy.
    per_frame = np.sum(wave.reshape(-1, 64) ** 2, axis=1)
    np.testing.assert_allclose(np.sum(latent[:, :, 0, 0] ** 2, axis=0), per_frame, rtol=1e-5)


@pytest.mark.parametrize("wave", [np.zeros(100), np.zeros(63), np.zeros((2, 64)), np.zeros(65)])
def test_dct_refuses_wrong_length_or_rank(wave: np.ndarray) -> None:
    with pytest.raises(ValueError, match="multiple of 64"):
        DctAudioCodec(frame=64).encode(wave)
