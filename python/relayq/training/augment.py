"""Distinct training views of a few unlabelled images, for fine-tuning by distillation.

Distillation needs no labels: the float model gives a target for any input, so each new view of a
photo is a new training example. With a hundred photos, fine-tuning on the fixed preprocessed crops
memorises them; these views multiply them:

* :func:`random_resized_crops` -- torchvision-style random resized crops of the *original* photos
  (area and aspect ratio drawn per view), horizontal flips and a colour jitter (brightness,
  contrast, saturation), normalized like :func:`relayq.testing.data.preprocess`;
* :func:`mixup` -- convex combinations of two views (Zhang et al. 2018): images that are in no
  training set, which the float teacher still labels (a "function matching" view of distillation).

Example::

    rng = np.random.default_rng(0)
    views = mixup(random_resized_crops(pil_images, rng, size=160), rng, alpha=0.4)
"""
from __future__ import annotations

import numpy as np

from ..errors import ConfigError, DatasetError

#: ImageNet channel mean and std (RGB, [0, 1] scale), as relayq.testing.data.preprocess.
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
#: ITU-R 601 luma weights, the grey level that saturation jitter blends towards.
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def _crop_box(w: int, h: int, rng, scale, ratio) -> tuple:
    """A crop (x0, y0, width, height) of area ``scale`` x the image and aspect ``ratio`` (log-uniform);
    after ten misses, the largest centred square (as torchvision's fallback)."""
    for _ in range(10):
        area = w * h * rng.uniform(*scale)
        aspect = np.exp(rng.uniform(np.log(ratio[0]), np.log(ratio[1])))
        cw, ch = int(round(np.sqrt(area * aspect))), int(round(np.sqrt(area / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            return int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1)), cw, ch
    side = min(w, h)
    return (w - side) // 2, (h - side) // 2, side, side


def random_resized_crops(images: list, rng, size: int = 224, scale: tuple = (0.2, 1.0),
                         ratio: tuple = (3 / 4, 4 / 3), flip: bool = True, jitter: float = 0.0) -> np.ndarray:
    """One random view of each PIL image: a crop of ``scale`` of its area and aspect ``ratio``,
    resized to ``size`` x ``size`` (bilinear), flipped half of the time, with brightness, contrast and
    saturation each multiplied by a factor in ``[1 - jitter, 1 + jitter]``; normalized with the ImageNet
    mean and std. Returns float32 ``(len(images), 3, size, size)``.

    >>> from PIL import Image
    >>> img = Image.new("RGB", (64, 48), (120, 30, 200))
    >>> random_resized_crops([img, img], np.random.default_rng(0), size=32).shape
    (2, 3, 32, 32)
    """
    from PIL import Image

    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
        raise ConfigError(f"random_resized_crops: size must be a positive int, got {size!r}")
    if not (0 < scale[0] <= scale[1] <= 1) or not (0 < ratio[0] <= ratio[1]):
        raise ConfigError(f"random_resized_crops: need 0 < scale[0] <= scale[1] <= 1 and 0 < ratio[0] <= ratio[1], "
                          f"got scale={scale}, ratio={ratio}")
    if not 0 <= jitter < 1:
        raise ConfigError(f"random_resized_crops: jitter must be in [0, 1), got {jitter!r}")
    out = np.empty((len(images), 3, size, size), np.float32)
    for i, img in enumerate(images):
        if not isinstance(img, Image.Image):
            raise DatasetError(f"random_resized_crops: image {i} is a {type(img).__name__}, not a PIL image "
                               "(open the original files: cropping the preprocessed arrays loses the context)")
        img = img.convert("RGB")
        x0, y0, cw, ch = _crop_box(*img.size, rng, scale, ratio)
        crop = img.crop((x0, y0, x0 + cw, y0 + ch)).resize((size, size), Image.BILINEAR)
        if flip and rng.random() < 0.5:
            crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
        x = np.asarray(crop, np.float32) / 255.0
        if jitter:
            x = x * rng.uniform(1 - jitter, 1 + jitter)                                  # brightness
            x = (x - x.mean()) * rng.uniform(1 - jitter, 1 + jitter) + x.mean()          # contrast
            grey = (x @ _LUMA)[..., None]
            x = np.clip((x - grey) * rng.uniform(1 - jitter, 1 + jitter) + grey, 0.0, 1.0)  # saturation
        out[i] = ((x - IMAGENET_MEAN) / IMAGENET_STD).transpose(2, 0, 1)
    return out


def mixup(batch: np.ndarray, rng, alpha: float = 0.4) -> np.ndarray:
    """Each sample blended with another of the batch: ``lam * x[i] + (1 - lam) * x[perm[i]]``, one
    ``lam ~ Beta(alpha, alpha)`` per sample (so most views stay close to one image). For
    distillation only: the targets come from the teacher on the blended image, not from labels.

    >>> x = np.stack([np.zeros((3, 2, 2), np.float32), np.ones((3, 2, 2), np.float32)])
    >>> y = mixup(x, np.random.default_rng(0), alpha=1.0)
    >>> bool(((y >= 0) & (y <= 1)).all()), y.shape
    (True, (2, 3, 2, 2))
    """
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
        raise ConfigError(f"mixup: alpha must be a positive number, got {alpha!r}")
    batch = np.asarray(batch)
    if batch.ndim < 1 or len(batch) < 2:
        raise DatasetError(f"mixup: needs a batch of at least 2 samples, got shape {batch.shape}")
    lam = rng.beta(alpha, alpha, size=len(batch)).astype(np.float32)
    lam = np.maximum(lam, 1 - lam).reshape((-1,) + (1,) * (batch.ndim - 1))   # the first image dominates
    partner = batch[rng.permutation(len(batch))]
    return (lam * batch + (1 - lam) * partner).astype(batch.dtype, copy=False)
