"""Pretrained VAE encoders on tiny random-weight diffusers models, saved and loaded back by local directory."""
from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from tiny_models import tiny_cogvideox, tiny_kl, tiny_ltx, tiny_oobleck, tiny_wan  # noqa: E402

from latentforge.datasets.encoders import build_audio_encoder, build_visual_encoder
from latentforge.datasets.encoders.config import (
    AutoencoderKLConfig,
    OobleckConfig,
    VideoVAEConfig,
)
from latentforge.datasets.encoders.pretrained import (
    AutoencoderKLEncoder,
    OobleckEncoder,
    VideoVAEEncoder,
    resolve_device,
    resolve_dtype,
)

pytestmark = pytest.mark.filterwarnings("ignore:.*weight_norm.*:FutureWarning")  # inside diffusers' Oobleck

CPU = {"device": "cpu", "dtype": "float32"}
DESCRIBE_KEYS = {"kind", "model", "revision", "config_hash", "channels", "scale", "shift", "dtype"}
VISUAL_KEYS = DESCRIBE_KEYS | {"spatial_factor", "temporal_factor", "frame_rule"}


def frames(b: int, t: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (b, t, h, w, 3), dtype=np.uint8)


def unit(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(x).float() / 127.5 - 1.0


def invert_card(z: np.ndarray, d: dict) -> np.ndarray:
    """Stored latents back to raw VAE latents from the card's fields alone."""
    raw = z / d["scale"] + d["shift"]
    if "latents_mean" in d:
        shape = (1, -1) + (1,) * (z.ndim - 2)
        raw = raw * np.reshape(d["latents_std"], shape) + np.reshape(d["latents_mean"], shape)
    return raw


def save(model, root, subfolder: str | None = None) -> str:
    model.save_pretrained(str(root / subfolder) if subfolder else str(root))
    return str(root)


# ---- AutoencoderKL ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def kl_dir(tmp_path_factory):
    torch.manual_seed(0)
    vae = tiny_kl()
    return save(vae, tmp_path_factory.mktemp("sd"), subfolder="vae")


@pytest.fixture(scope="module")
def kl(kl_dir):
    return build_visual_encoder(AutoencoderKLConfig(kind="autoencoder_kl", model=kl_dir, subfolder="vae", **CPU))


def test_kl_geometry_and_describe(kl):
    assert isinstance(kl, AutoencoderKLEncoder)
    d = kl.describe()
    assert VISUAL_KEYS <= d.keys()
    assert (d["kind"], d["channels"], d["spatial_factor"], d["temporal_factor"], d["frame_rule"]) == \
        ("autoencoder_kl", 4, 2, 1, "any")
    assert (d["scale"], d["shift"], d["dtype"]) == (0.5, 0.1, "float32")
    assert kl.spatial_multiple == 2 and kl.valid_frames(6) == 6
    json.dumps(d)
    assert kl.identity()["config_hash"] == d["config_hash"]


def test_kl_shapes_roundtrip_and_determinism(kl):
    for t in (1, 3):
        x = frames(2, t, 16, 16)
        z = kl.encode(x)
        assert z.shape == (2, *kl.latent_shape(t, 16, 16)) == (2, 4, t, 8, 8) and z.dtype == np.float32
        np.testing.assert_array_equal(z, kl.encode(x))
        y = kl.decode(z)
        assert y.shape == x.shape and y.dtype == np.uint8


def test_kl_scale_shift_applied(kl, kl_dir):
    vae = diffusers.AutoencoderKL.from_pretrained(kl_dir, subfolder="vae")
    x = frames(1, 2, 16, 16, seed=1)
    with torch.inference_mode():
        raw = vae.encode(unit(x[0]).permute(0, 3, 1, 2)).latent_dist.mode().numpy()  # (T, C, h, w)
    z = kl.encode(x)
    np.testing.assert_allclose(invert_card(z, kl.describe())[0].transpose(1, 0, 2, 3), raw, rtol=1e-5, atol=1e-5)


def test_kl_rejects_bad_input(kl):
    with pytest.raises(ValueError):
        kl.encode(frames(1, 1, 15, 16))
    with pytest.raises(ValueError):
        kl.encode(frames(1, 1, 16, 16).astype(np.float32))


def test_kl_options_and_chunking(kl_dir):
    enc = AutoencoderKLEncoder(AutoencoderKLConfig(kind="autoencoder_kl", model=kl_dir, subfolder="vae",
                                                   tiling=True, slicing=False, **CPU))
    assert enc.vae.model.use_tiling and not enc.vae.model.use_slicing
    x = frames(3, 7, 8, 8)  # 21 frames: more than one chunk of 16
    z = enc.encode(x)
    assert z.shape == (3, 4, 7, 4, 4)
    np.testing.assert_allclose(z[2], enc.encode(x[2:])[0], rtol=1e-5, atol=1e-5)
    assert enc.describe()["config_hash"] != AutoencoderKLEncoder(AutoencoderKLConfig(
        kind="autoencoder_kl", model=kl_dir, subfolder="vae", **CPU)).describe()["config_hash"]


def test_kl_sample_mode_is_stochastic(kl_dir):
    enc = AutoencoderKLEncoder(AutoencoderKLConfig(kind="autoencoder_kl", model=kl_dir, subfolder="vae",
                                                   sample="sample", **CPU))
    x = frames(1, 1, 16, 16)
    assert not np.array_equal(enc.encode(x), enc.encode(x))


def test_auto_device_and_dtype():
    device = resolve_device("auto")
    assert device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert resolve_dtype("float16", torch.device("cpu")) == torch.float16


# ---- video VAEs -----------------------------------------------------------------------------------------------

# kind, builder, (spatial_factor, temporal_factor, frame_rule), valid clip length, invalid clip length.
# CogVideoX's rule is 2*t*n+1: 3 frames encode to 2 latent frames, which its decoder turns into 4.
VIDEO_CASES = {
    "ltx_video": (tiny_ltx, (4, 2, "2n+1"), 3, 4),
    "wan": (tiny_wan, (4, 4, "4n+1"), 5, 3),
    "cogvideox": (tiny_cogvideox, (2, 2, "4n+1"), 5, 3),
}


@pytest.fixture(scope="module", params=sorted(VIDEO_CASES))
def video(request, tmp_path_factory):
    kind = request.param
    builder, geometry, good, bad = VIDEO_CASES[kind]
    torch.manual_seed(0)
    root = save(builder(), tmp_path_factory.mktemp(kind))
    enc = build_visual_encoder(VideoVAEConfig(kind=kind, model=root, **CPU))
    return enc, root, geometry, good, bad


def test_video_geometry_and_describe(video):
    enc, root, (s, t, rule), _, _ = video
    assert isinstance(enc, VideoVAEEncoder)
    d = enc.describe()
    assert VISUAL_KEYS <= d.keys()
    assert (d["spatial_factor"], d["temporal_factor"], d["frame_rule"], d["channels"]) == (s, t, rule, 4)
    assert (d["model"], d["revision"], d["dtype"]) == (root, None, "float32")
    assert enc.spatial_multiple == s
    json.dumps(d)


def test_video_frame_rule(video):
    enc, _, (s, _, _), good, bad = video
    assert enc.valid_frames(1) == 1 and enc.valid_frames(good) == good and enc.valid_frames(bad) < bad
    enc.check_size(16, 16, good)
    with pytest.raises(ValueError):
        enc.check_size(16, 16, bad)
    with pytest.raises(ValueError):
        enc.encode(frames(1, bad, 16, 16))
    with pytest.raises(ValueError):
        enc.encode(frames(1, 1, 16 + s // 2, 16))


def test_video_shapes_roundtrip_and_determinism(video):
    enc, *_, good, _ = video
    for b, t in ((2, 1), (4, good)):  # 4 clips of `good` frames take two VAE calls (16 frames per call)
        x = frames(b, t, 16, 16)
        z = enc.encode(x)
        assert z.shape == (b, *enc.latent_shape(t, 16, 16)) and z.dtype == np.float32
        np.testing.assert_array_equal(z, enc.encode(x))
        np.testing.assert_allclose(z[-1:], enc.encode(x[-1:]), rtol=1e-5, atol=1e-5)
        y = enc.decode(z)
        assert y.shape == x.shape and y.dtype == np.uint8  # the decoder gives back every frame


def test_video_normalisation_applied(video):
    enc, root, *_ = video
    vae = type(enc.vae.model).from_pretrained(root)
    x = frames(1, 5, 16, 16, seed=2)
    with torch.inference_mode():
        raw = vae.encode(unit(x).permute(0, 4, 1, 2, 3)).latent_dist.mode().numpy()
    z = enc.encode(x)
    d = enc.describe()
    assert not np.allclose(z, raw, atol=1e-3)  # the normalisation is not the identity for these configs
    np.testing.assert_allclose(invert_card(z, d), raw, rtol=1e-4, atol=1e-4)


def test_ltx_timestep_conditioned_decoder(tmp_path):
    torch.manual_seed(0)
    enc = VideoVAEEncoder(VideoVAEConfig(kind="ltx_video", model=save(tiny_ltx(True), tmp_path), **CPU))
    x = frames(2, 3, 16, 16)
    assert enc.decode(enc.encode(x)).shape == x.shape


# ---- Oobleck --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def oobleck_dir(tmp_path_factory):
    torch.manual_seed(0)
    vae = tiny_oobleck()
    return save(vae, tmp_path_factory.mktemp("oobleck"))


@pytest.fixture(scope="module")
def oobleck(oobleck_dir):
    return build_audio_encoder(OobleckConfig(kind="oobleck", model=oobleck_dir, **CPU), sample_rate=44100)


def test_oobleck_describe(oobleck):
    assert isinstance(oobleck, OobleckEncoder)
    d = oobleck.describe()
    assert DESCRIBE_KEYS | {"sample_rate", "hop"} <= d.keys()
    assert (d["sample_rate"], d["hop"], d["channels"], d["scale"], d["shift"]) == (16000, 8, 4, 1.0, 0.0)
    assert oobleck.sample_rate == 16000 and oobleck.valid_samples(803) == 800  # the model's rate wins
    json.dumps(d)


def test_oobleck_shapes_roundtrip_and_determinism(oobleck):
    waves = np.random.default_rng(0).standard_normal((3, 800)).astype(np.float32) * 0.1
    z = oobleck.encode(waves)
    assert z.shape == (3, 4, 100, 1, 1) and z.dtype == np.float32
    np.testing.assert_array_equal(z, oobleck.encode(waves))
    y = oobleck.decode(z)
    assert y.shape == waves.shape and y.dtype == np.float32
    with pytest.raises(ValueError):
        oobleck.encode(waves[:, :799])


def test_oobleck_mono_is_repeated_to_stereo(oobleck, oobleck_dir):
    vae = diffusers.AutoencoderOobleck.from_pretrained(oobleck_dir)
    wave = np.random.default_rng(1).standard_normal((1, 400)).astype(np.float32)
    with torch.inference_mode():
        stereo = torch.from_numpy(np.repeat(wave[:, None], 2, axis=1))
        raw = vae.encode(stereo).latent_dist.mode().numpy()
        decoded = vae.decode(torch.from_numpy(raw)).sample.mean(dim=1).numpy()
    z = oobleck.encode(wave)
    np.testing.assert_allclose(z[..., 0, 0], raw, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(oobleck.decode(z), decoded, rtol=1e-5, atol=1e-5)
