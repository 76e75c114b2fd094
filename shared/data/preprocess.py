"""Raw images to model input, exactly as the factory and the edge agent both see them.

numpy and Pillow only: the edge agent imports this module and must not need torch. Pillow is
imported by the functions that decode or resize images (an agent fed only tensor frames never loads
it, ~2 MiB resident). Training,
calibration and edge inference all go through ``resize_images`` (Pillow bilinear on uint8) and
``to_model_input``, so a 300×300 cell image at the edge becomes the same tensor that the model was
trained and calibrated on.
"""

from __future__ import annotations

import io
import warnings

import numpy as np

from shared.bundle.manifest import InputSpec

__all__ = ["MAX_IMAGE_PIXELS", "ImageDecodeError", "resize_images", "to_model_input", "decode_image"]

# A 40-megapixel limit refuses decompression bombs long before they exhaust an edge box's memory.
MAX_IMAGE_PIXELS = 40_000_000


class ImageDecodeError(ValueError):
    """Image bytes are not a readable PNG/JPEG, or the image is too large to accept."""


def _as_batch(images: np.ndarray, channels: int) -> np.ndarray:
    """Return images as N×H×W (1 channel) or N×H×W×C, rejecting shapes that cannot be images."""
    arr = np.asarray(images)
    single_ndim = 2 if channels == 1 else 3
    if arr.ndim == single_ndim:
        arr = arr[None]
    if arr.ndim != single_ndim + 1:
        raise ValueError(
            f"expected images of shape {'N×H×W' if channels == 1 else 'N×H×W×C'} (or one image), "
            f"got {arr.shape}"
        )
    if channels != 1 and arr.shape[-1] != channels:
        raise ValueError(f"expected {channels} channels in the last axis, got shape {arr.shape}")
    if arr.shape[1] == 0 or arr.shape[2] == 0:
        raise ValueError(f"images have an empty spatial size: {arr.shape}")
    return arr


def resize_images(images: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize uint8 images (N×H×W or N×H×W×C) with Pillow's antialiasing bilinear filter."""
    arr = np.asarray(images)
    if arr.dtype != np.uint8:
        raise ValueError(f"resize_images expects uint8 images, got {arr.dtype}")
    if arr.shape[1:3] == (height, width):
        return arr
    from PIL import Image

    out = np.empty((arr.shape[0], height, width, *arr.shape[3:]), dtype=np.uint8)
    for i, img in enumerate(arr):
        out[i] = np.asarray(Image.fromarray(img).resize((width, height), Image.Resampling.BILINEAR))
    return out


def to_model_input(images: np.ndarray, spec: InputSpec) -> np.ndarray:
    """Turn uint8 images (N×H×W, H×W, or with a trailing channel axis) into float32 N×C×H×W.

    Images are resized to the spec's size if needed, scaled to [0, 1] and normalised with the
    spec's per-channel mean and std.
    """
    channels = spec.channels
    arr = _as_batch(images, channels)
    if arr.dtype != np.uint8:
        raise ValueError(f"to_model_input expects uint8 images, got {arr.dtype}")
    arr = resize_images(arr, spec.height, spec.width)
    x = arr.astype(np.float32) * np.float32(1.0 / 255.0)
    x = x[:, None] if channels == 1 else np.ascontiguousarray(x.transpose(0, 3, 1, 2))
    mean = _per_channel(spec.mean, channels, "mean")
    std = _per_channel(spec.std, channels, "std")
    if np.any(std <= 0):
        raise ValueError(f"input spec std must be positive, got {spec.std}")
    return np.ascontiguousarray((x - mean) / std, dtype=np.float32)


def _per_channel(values: list[float], channels: int, what: str) -> np.ndarray:
    v = np.asarray(values, dtype=np.float32)
    if v.size == 1:
        v = np.repeat(v, channels)
    if v.size != channels:
        raise ValueError(f"input spec {what} has {v.size} values for {channels} channels")
    return v.reshape(1, channels, 1, 1)


def decode_image(data: bytes, spec: InputSpec) -> np.ndarray:
    """Decode PNG/JPEG bytes into a uint8 array (H×W for 1 channel, H×W×3 for 3) at its own size.

    Raises ``ImageDecodeError`` (a ``ValueError``) for empty, corrupt or oversized images; feed the
    result to ``to_model_input``.
    """
    if not data:
        raise ImageDecodeError("image is empty (0 bytes)")
    mode = {1: "L", 3: "RGB"}.get(spec.channels)
    if mode is None:
        raise ValueError(f"input spec with {spec.channels} channels is not supported for image decoding")
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            # Pillow warns (not raises) between its own limit and twice it; we decide ourselves below.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                if img.format not in ("PNG", "JPEG"):
                    raise ImageDecodeError(f"image format {img.format} is not accepted; send PNG or JPEG")
                w, h = img.size
                if w * h > MAX_IMAGE_PIXELS:
                    raise ImageDecodeError(
                        f"image is {w}×{h} = {w * h / 1e6:.1f} megapixels; the limit is "
                        f"{MAX_IMAGE_PIXELS / 1e6:.0f} megapixels"
                    )
                img.load()
                return np.asarray(img.convert(mode), dtype=np.uint8)
    except ImageDecodeError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, Image.DecompressionBombError) as exc:
        raise ImageDecodeError(f"image bytes are not a readable PNG or JPEG: {exc}") from None
