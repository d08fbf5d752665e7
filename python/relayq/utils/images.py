"""Calibration inputs from a folder of images or a ``.npy`` file, shaped for a model's input (used by ``relayq quantize``).

Images get the usual ImageNet evaluation transform (resize the short side, centre crop, scale to
[0, 1], subtract the mean, divide by the standard deviation), in NCHW or NHWC as the input is laid
out. Pillow reads them (``pip install pillow``; it is in the ``test`` and ``bench`` extras).

Example::

    batches = image_batches("calib_images/", (1, 3, 224, 224))        # a sized iterable of (1, 3, 224, 224) arrays
    x = np.stack([b[0] for b in batches])
    batches = npy_batches("calib.npy", (8, 3, 224, 224))               # 8 samples per batch
"""
from __future__ import annotations

import os

import numpy as np

from ..errors import DatasetError

#: torchvision's ImageNet statistics (RGB, on [0, 1] pixels).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: File name endings read as images.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".ppm", ".pgm", ".webp", ".tif", ".tiff")


def image_layout(shape) -> str:
    """``"NCHW"`` or ``"NHWC"`` for a 4-D image input shape (the axis holding 1 or 3 channels).

    >>> image_layout((1, 3, 224, 224)), image_layout((1, 224, 224, 3))
    ('NCHW', 'NHWC')
    """
    shape = tuple(shape)
    if len(shape) != 4:
        raise DatasetError(f"images need a 4-D model input (N, C, H, W or N, H, W, C), the input is {shape}")
    if shape[1] in (1, 3) and shape[3] not in (1, 3):
        return "NCHW"
    if shape[3] in (1, 3) and shape[1] not in (1, 3):
        return "NHWC"
    if shape[1] in (1, 3):
        return "NCHW"
    raise DatasetError(f"cannot tell the channel axis of the input shape {shape}: neither axis 1 nor 3 has 1 or "
                       "3 channels")


def list_images(folder: str) -> list:
    """The image files directly in ``folder``, sorted by name; a DatasetError names a folder without any.

    Example::

        list_images("calib_images/")            # ['calib_images/0.jpg', 'calib_images/1.jpg', ...]
    """
    if not os.path.isdir(folder):
        raise DatasetError(f"calibration folder not found: {folder}")
    files = sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTENSIONS))
    if not files:
        raise DatasetError(f"no images in {folder} (looked for {', '.join(IMAGE_EXTENSIONS)})")
    return files


def load_image(path: str, height: int, width: int, channels: int = 3, resize: int | None = None,
               mean=IMAGENET_MEAN, std=IMAGENET_STD) -> np.ndarray:
    """One image as a float32 ``(height, width, channels)`` array, ImageNet-style.

    The short side is resized (bilinear) to ``resize`` (default ``max(height, width) / 0.875``, i.e.
    256 for 224), then the centre ``height x width`` is cropped, pixels scaled to [0, 1] and
    normalized per channel: torchvision's ``Resize(256), CenterCrop(224), ToTensor(), Normalize``.

    Example::

        x = load_image("cat.jpg", 224, 224)     # (224, 224, 3) float32
    """
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError:
        raise DatasetError("reading calibration images needs Pillow: pip install pillow "
                           "(or pass the calibration data as a .npy file)") from None
    resize = resize or int(round(max(height, width) / 0.875))
    try:
        with Image.open(path) as img:
            img = img.convert("RGB" if channels == 3 else "L")
            w, h = img.size
            # torchvision's Resize(int) and CenterCrop: the long side truncated, the offsets rounded.
            nw, nh = (resize, int(resize * h / w)) if w <= h else (int(resize * w / h), resize)
            if (nw, nh) != (w, h):
                img = img.resize((nw, nh), Image.BILINEAR)
            if nw < width or nh < height:
                raise DatasetError(f"{path}: resized to {nw}x{nh}, smaller than the {width}x{height} crop "
                                   "(raise --resize)")
            top, left = int(round((nh - height) / 2.0)), int(round((nw - width) / 2.0))
            img = img.crop((left, top, left + width, top + height))
            x = np.asarray(img, dtype=np.float32) / 255.0
    except (OSError, UnidentifiedImageError) as e:
        raise DatasetError(f"cannot read image {path}: {e}") from None
    if x.ndim == 2:
        x = x[:, :, None]
    mean = np.asarray(mean, np.float32)[:channels]
    std = np.asarray(std, np.float32)[:channels]
    return (x - mean) / std


class _Batches:
    """A sized, re-iterable dataset that loads each batch when it is reached (memory: one batch)."""

    def __init__(self, n: int, make):
        self.n, self.make = n, make

    def __len__(self):
        return self.n

    def __iter__(self):
        for i in range(self.n):
            yield self.make(i)


def image_batches(folder: str, shape, limit: int | None = None, resize: int | None = None,
                  mean=IMAGENET_MEAN, std=IMAGENET_STD, layout: str | None = None):
    """Batches of ``shape`` (batch size ``shape[0]``) from the images in ``folder``, loaded lazily.

    ``limit`` caps the number of images; images that do not fill a last batch are left out.

    Example::

        data = image_batches("calib_images/", (1, 3, 224, 224), limit=100)
        qmodel = relayq.quantize_model("model.onnx", dataset=data, calibration="kl")
    """
    shape = tuple(int(d) for d in shape)
    layout = layout or image_layout(shape)
    n, (c, h, w) = shape[0], (shape[1:] if layout == "NCHW" else (shape[3], shape[1], shape[2]))
    files = list_images(folder)[:limit] if limit else list_images(folder)
    if len(files) < n:
        raise DatasetError(f"{folder} has {len(files)} image(s), fewer than one batch of {n}")

    def make(i):
        imgs = [load_image(f, h, w, c, resize, mean, std) for f in files[i * n:(i + 1) * n]]
        x = np.stack(imgs)
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2) if layout == "NCHW" else x)

    return _Batches(len(files) // n, make)


def npy_batches(path: str, shape, dtype: str = "float32", limit: int | None = None):
    """Batches of ``shape`` from a ``.npy`` array of samples (first axis), or of one whole batch.

    The array may be exactly one batch (``shape``), samples (``(k,) + shape[1:]``, cut into batches of
    ``shape[0]``) or stacked batches (``(k,) + shape``). ``limit`` caps the number of samples.

    Example::

        data = npy_batches("calib.npy", (8, 3, 224, 224))        # calib.npy: (256, 3, 224, 224) -> 32 batches
    """
    shape = tuple(int(d) for d in shape)
    if not os.path.isfile(path):
        raise DatasetError(f"calibration file not found: {path}")
    try:
        x = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as e:
        raise DatasetError(f"{path} is not a .npy array file: {e}") from None
    if not isinstance(x, np.ndarray):
        raise DatasetError(f"{path} holds several arrays (.npz): pass one .npy array")
    if x.dtype.kind not in "fiub":
        raise DatasetError(f"{path} holds {x.dtype} data, not numbers")
    if x.shape == shape:
        samples = x
    elif x.shape[1:] == shape[1:]:
        samples = x
    elif x.ndim == len(shape) + 1 and x.shape[1:] == shape:
        samples = x.reshape((-1,) + shape[1:])
    else:
        raise DatasetError(f"{path} has shape {x.shape}, which fits neither the model input {shape} nor samples "
                           f"(k,) + {shape[1:]}")
    if limit:
        samples = samples[:limit]
    n = shape[0]
    if len(samples) < n:
        raise DatasetError(f"{path} has {len(samples)} sample(s), fewer than one batch of {n}")
    return _Batches(len(samples) // n, lambda i: np.ascontiguousarray(samples[i * n:(i + 1) * n], dtype=dtype))


__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "IMAGE_EXTENSIONS", "image_layout", "list_images", "load_image",
           "image_batches", "npy_batches"]
