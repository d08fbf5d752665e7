"""relayq.training.augment: the training views that fine-tuning on a few unlabelled photos uses."""
import numpy as np
import pytest
from PIL import Image

import relayq
from relayq.testing import data
from relayq.training.augment import mixup, random_resized_crops


def _gradient_image(w=64, h=48):
    """Red grows left to right, green top to bottom: a crop's position and a flip show in the pixels."""
    x = np.zeros((h, w, 3), np.uint8)
    x[..., 0] = np.linspace(0, 255, w)[None, :]
    x[..., 1] = np.linspace(0, 255, h)[:, None]
    x[..., 2] = 77
    return Image.fromarray(x)


def test_crops_are_normalized_like_preprocess():
    """A one-colour photo: every view is that colour, normalized exactly as relayq.testing.data.preprocess."""
    img = Image.new("RGB", (90, 60), (200, 100, 50))
    views = random_resized_crops([img] * 3, np.random.default_rng(0), size=20)
    want = data.preprocess(img, size=20, resize=20)
    assert views.shape == (3, 3, 20, 20) and views.dtype == np.float32
    for v in views:
        np.testing.assert_allclose(v, want, atol=1e-5)


def test_views_differ_cover_flips_and_repeat_with_the_seed():
    img = _gradient_image()
    views = random_resized_crops([img] * 16, np.random.default_rng(1), size=24, jitter=0.3)
    again = random_resized_crops([img] * 16, np.random.default_rng(1), size=24, jitter=0.3)
    np.testing.assert_array_equal(views, again)
    # Distinct crops: the mean red (the crop's horizontal position) and green (vertical) vary.
    assert len({round(float(v[0].mean()), 3) for v in views}) == 16
    # Flipped views have red falling left to right.
    slope = views[:, 0, :, -1].mean(1) - views[:, 0, :, 0].mean(1)
    assert (slope > 0).any() and (slope < 0).any()
    no_flip = random_resized_crops([img] * 16, np.random.default_rng(1), size=24, flip=False)
    assert (no_flip[:, 0, :, -1].mean(1) > no_flip[:, 0, :, 0].mean(1)).all()


def test_crop_area_follows_scale():
    """scale=(1, 1), ratio 1 on a square image: the whole image every time (no crop, no flip)."""
    img = _gradient_image(32, 32)
    v = random_resized_crops([img] * 4, np.random.default_rng(2), size=32, scale=(1.0, 1.0), ratio=(1.0, 1.0),
                             flip=False)
    for x in v:
        np.testing.assert_allclose(x, data.preprocess(img, size=32, resize=32), atol=1e-5)


def test_mixup_blends_two_samples_of_the_batch():
    rng = np.random.default_rng(3)
    batch = np.stack([np.full((2, 3, 3), i, np.float32) for i in range(8)])
    out = mixup(batch, rng, alpha=1.0)
    assert out.shape == batch.shape and out.dtype == np.float32
    for i, x in enumerate(out):
        v = float(x[0, 0, 0])
        assert np.all(x == v)                         # one blend weight per sample
        # The sample's own image dominates (lam >= 0.5): the blend is at most half-way to another one.
        assert any(abs(v - i) <= 0.5 * abs(j - i) + 1e-5 for j in range(8))


def test_errors_are_clear():
    rng = np.random.default_rng(0)
    with pytest.raises(relayq.DatasetError, match="image 0 is a ndarray, not a PIL image"):
        random_resized_crops([np.zeros((3, 8, 8))], rng)
    with pytest.raises(relayq.ConfigError, match="size must be a positive int"):
        random_resized_crops([_gradient_image()], rng, size=0)
    with pytest.raises(relayq.ConfigError, match="scale"):
        random_resized_crops([_gradient_image()], rng, scale=(0.5, 0.2))
    with pytest.raises(relayq.ConfigError, match="alpha"):
        mixup(np.zeros((2, 3)), rng, alpha=0)
    with pytest.raises(relayq.DatasetError, match="at least 2"):
        mixup(np.zeros((1, 3)), rng)
