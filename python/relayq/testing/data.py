"""Real images that install offline: 20 labelled ImageNet samples and 100 calibration photos.

* :func:`imagenet_labelled` -- the 20 ImageNet validation-style samples shipped in ``foolbox==3.3.4``
  (``foolbox/data/imagenet_<i>_<label>.jpg``), preprocessed, with their class indices;
* :func:`calibration_photos` -- the 100 unlabelled 512x512 photos of ``ai-benchmark==0.1.2``
  (``ai_benchmark/data/classification/<i>.jpg``), preprocessed; use them to calibrate and to measure
  the top-1 agreement of a quantized model with its float original.

The packages are located with ``importlib.util.find_spec`` and read by path; they are never imported
(importing foolbox needs eagerpy). Each loader raises :class:`relayq.errors.DatasetError` with the
pip command when its package is absent; :func:`has_imagenet_samples` / :func:`has_calibration_photos`
let tests skip instead.

Example::

    >>> from relayq.testing import data
    >>> if data.has_imagenet_samples():
    ...     images, labels = data.imagenet_labelled()
    ...     images.shape
    (20, 3, 224, 224)
"""
from __future__ import annotations

import importlib.util
import os
import re

import numpy as np

from ..errors import DatasetError

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MissingDataError",
    "calibration_photo_dir",
    "preprocess",
    "load_image",
    "imagenet_labelled",
    "calibration_photos",
    "has_imagenet_samples",
    "has_calibration_photos",
    "available",
]

#: ImageNet channel mean and std (RGB, on the [0, 1] scale), as used by torchvision's models.
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)

_FOOLBOX_PIP = "pip install --no-deps foolbox==3.3.4"
_AIB_PIP = "pip install --no-deps ai-benchmark==0.1.2"
_IMAGENET_RE = re.compile(r"^imagenet_(\d+)_(\d+)\.jpg$")


class MissingDataError(DatasetError):
    """An optional package carrying real images is not installed; the message says how to install it."""


def _package_dir(name: str) -> str | None:
    """The folder of an installed top-level package, located without importing (executing) it."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        if os.path.isdir(loc):
            return loc
    return None


def _imagenet_files() -> list[tuple[str, int]]:
    d = _package_dir("foolbox")
    folder = os.path.join(d, "data") if d else None
    found = []
    if folder and os.path.isdir(folder):
        for name in os.listdir(folder):
            m = _IMAGENET_RE.match(name)
            if m:
                found.append((int(m.group(1)), os.path.join(folder, name), int(m.group(2))))
    if not found:
        raise MissingDataError(
            f"the 20 labelled ImageNet samples (foolbox/data/imagenet_*.jpg) are not installed: {_FOOLBOX_PIP}"
        )
    return [(path, label) for _, path, label in sorted(found)]


def _calibration_files() -> list[str]:
    d = _package_dir("ai_benchmark")
    folder = os.path.join(d, "data", "classification") if d else None
    found = []
    if folder and os.path.isdir(folder):
        for name in os.listdir(folder):
            stem, ext = os.path.splitext(name)
            if ext.lower() in (".jpg", ".jpeg", ".png"):
                key = (0, int(stem), "") if stem.isdigit() else (1, 0, stem)
                found.append((key, os.path.join(folder, name)))
    if not found:
        raise MissingDataError(
            f"the calibration photos (ai_benchmark/data/classification/*.jpg) are not installed: {_AIB_PIP}"
        )
    return [path for _, path in sorted(found)]


def calibration_photo_dir() -> str:
    """The folder holding the 100 calibration photos (JPEG files), e.g. for ``relayq quantize --calib DIR``.

    Example::

        >>> calibration_photo_dir()                        # doctest: +SKIP
        '.../site-packages/ai_benchmark/data/classification'
    """
    return os.path.dirname(_calibration_files()[0])


def has_imagenet_samples() -> bool:
    """Whether :func:`imagenet_labelled` can load its images (``foolbox==3.3.4`` files are installed).

    Example::

        >>> import pytest
        >>> if not has_imagenet_samples():                               # doctest: +SKIP
        ...     pytest.skip("pip install --no-deps foolbox==3.3.4")
    """
    try:
        _imagenet_files()
    except MissingDataError:
        return False
    return True


def has_calibration_photos() -> bool:
    """Whether :func:`calibration_photos` can load its images (``ai-benchmark==0.1.2`` is installed).

    Example::

        >>> if has_calibration_photos():                                 # doctest: +SKIP
        ...     calib = calibration_photos(16)
    """
    try:
        _calibration_files()
    except MissingDataError:
        return False
    return True


def available() -> dict[str, bool]:
    """Which offline real-data/weights packages are installed, by name.

    Example::

        >>> sorted(available())
        ['calibration_photos', 'imagenet_samples', 'mobilenet_weights']
    """
    from .zoo import has_mobilenet_weights

    return {
        "imagenet_samples": has_imagenet_samples(),
        "calibration_photos": has_calibration_photos(),
        "mobilenet_weights": has_mobilenet_weights(),
    }


def preprocess(pil_image, size: int = 224, resize: int = 256) -> np.ndarray:
    """torchvision's ImageNet evaluation transform, in numpy: a float32 CHW array.

    Converts to RGB, resizes so that the short side is ``resize`` (bilinear, keeping the aspect ratio,
    the long side truncated like torchvision's ``Resize``), centre-crops ``size`` x ``size``, scales to
    [0, 1] and normalizes with :data:`IMAGENET_MEAN` / :data:`IMAGENET_STD`.

    Example::

        >>> from PIL import Image
        >>> x = preprocess(Image.new("RGB", (640, 480), (124, 116, 104)))
        >>> x.shape, x.dtype
        ((3, 224, 224), dtype('float32'))
    """
    from PIL import Image

    img = pil_image.convert("RGB")
    w, h = img.size
    if w <= h:
        nw, nh = resize, int(resize * h / w)
    else:
        nw, nh = int(resize * w / h), resize
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.BILINEAR)
    if nw < size or nh < size:
        raise DatasetError(f"preprocess: resized image {nw}x{nh} is smaller than the {size}x{size} crop")
    top = int(round((nh - size) / 2.0))
    left = int(round((nw - size) / 2.0))
    img = img.crop((left, top, left + size, top + size))
    x = np.asarray(img, dtype=np.float32) / 255.0
    x = (x - IMAGENET_MEAN) / IMAGENET_STD
    return np.ascontiguousarray(x.transpose(2, 0, 1), dtype=np.float32)


def load_image(path) -> np.ndarray:
    """Open an image file and :func:`preprocess` it: float32 ``(3, 224, 224)``.

    Example::

        >>> x = load_image("cat.jpg")                                     # doctest: +SKIP
    """
    from PIL import Image

    try:
        with Image.open(path) as img:
            return preprocess(img)
    except (OSError, ValueError) as e:
        if isinstance(e, DatasetError):
            raise
        raise DatasetError(f"cannot read image {path}: {e}") from e


def imagenet_labelled() -> tuple[np.ndarray, np.ndarray]:
    """The 20 labelled ImageNet samples of ``foolbox==3.3.4``: images ``(20, 3, 224, 224)`` float32
    (preprocessed with :func:`preprocess`) and their class indices ``(20,)`` int64, in file order.

    Raises :class:`MissingDataError` (a :class:`relayq.errors.DatasetError`) naming
    ``pip install --no-deps foolbox==3.3.4`` when the files are absent.

    Example::

        >>> images, labels = imagenet_labelled()                          # doctest: +SKIP
        >>> int(labels[0])                                                # doctest: +SKIP
        243
    """
    files = _imagenet_files()
    images = np.stack([load_image(p) for p, _ in files])
    labels = np.array([label for _, label in files], dtype=np.int64)
    return images, labels


def calibration_photos(n: int = 100) -> np.ndarray:
    """The first ``n`` (1..100) unlabelled photos of ``ai-benchmark==0.1.2``, preprocessed:
    float32 ``(n, 3, 224, 224)``, in numeric file order (0.jpg, 1.jpg, ...).

    Raises :class:`MissingDataError` (a :class:`relayq.errors.DatasetError`) naming
    ``pip install --no-deps ai-benchmark==0.1.2`` when absent, and :class:`relayq.errors.DatasetError`
    when ``n`` is out of range.

    Example::

        >>> calib = calibration_photos(32)                                # doctest: +SKIP
        >>> dataset = [{"input": calib[i:i + 8]} for i in range(0, 32, 8)] # doctest: +SKIP
    """
    files = _calibration_files()
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 1 <= n <= len(files):
        raise DatasetError(f"calibration_photos: n must be an integer in [1, {len(files)}], got {n!r}")
    return np.stack([load_image(p) for p in files[: int(n)]])
