"""Still images on disk, and the one place that converts between image arrays and tensors.

Arrays at I/O are ``uint8`` ``(H, W, 3)`` RGB; tensors are ``float32`` ``(B, 3, H, W)`` in ``[0, 1]``
(see docs/contracts.md). Every layout or range conversion in the package goes through this module.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from metaportrait.errors import InputError
from metaportrait.io.atomic import atomic_path

if TYPE_CHECKING:
    import torch

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
VIDEO_SUFFIXES = (".mp4", ".mov", ".avi", ".webm", ".mpg", ".mpeg", ".mkv")

# PIL format names for the suffixes we write (the temporary file name has no meaningful suffix).
_WRITE_FORMATS = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".webp": "WEBP", ".bmp": "BMP"}
# Float values this far outside [0, 1] are treated as rounding noise by to_uint8; anything beyond is a bug upstream.
_RANGE_TOLERANCE = 1e-3
# Largest image read_image decodes (width x height). A 50-megapixel phone photo fits; beyond that decoding costs
# gigabytes for a face the model sees at 256 px, and a small file can claim huge sides (a decompression bomb).
MAX_IMAGE_PIXELS = 50_000_000


def is_image_path(path: str | Path) -> bool:
    """True if the file name ends with a still-image suffix we read (jpg, jpeg, png, webp, bmp; any case)."""
    return Path(path).suffix.lower() in IMAGE_SUFFIXES


def is_video_path(path: str | Path) -> bool:
    """True if the file name ends with a video suffix we read (mp4, mov, avi, webm, mpg, mpeg, mkv; any case)."""
    return Path(path).suffix.lower() in VIDEO_SUFFIXES


def read_image(path: str | Path) -> np.ndarray:
    """Decode an image file into ``uint8`` ``(H, W, 3)`` RGB, upright.

    The EXIF orientation tag is applied (phone photos are stored sideways with a tag). Grayscale, palette
    and RGBA images are converted to RGB; an alpha channel is dropped; 16-bit images keep their top 8 bits.

    Raises:
        InputError: the file is missing, is not an image, is truncated/corrupt, or has more than
            `MAX_IMAGE_PIXELS` pixels (checked from the header, before decoding).
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "file not found")
    try:
        with Image.open(path) as image:
            width, height = image.size
            if width * height > MAX_IMAGE_PIXELS:
                raise InputError(path, f"image is {width}x{height} ({width * height / 1e6:.1f} megapixels), more "
                                       f"than the limit of {MAX_IMAGE_PIXELS / 1e6:g} megapixels; downscale it first")
            # load() decodes every byte now, so a truncated file fails here rather than later in a model.
            image.load()
            image = ImageOps.exif_transpose(image)
            rgb = np.asarray(_to_8_bit(image).convert("RGB"), dtype=np.uint8)
    except UnidentifiedImageError:
        raise InputError(path, "not an image file (unknown format)") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise InputError(path, f"cannot decode image ({error})") from None
    return np.ascontiguousarray(rgb)


def _to_8_bit(image: Image.Image) -> Image.Image:
    """16-bit grayscale (PIL modes ``I;16*``, or ``I`` as older Pillows open such PNGs) -> 8-bit ``L``.

    PIL's own ``convert("RGB")`` clips these at 255 instead of scaling, which turns a 16-bit photo white.
    16-bit colour PNGs already open as 8-bit ``RGB``/``RGBA``.
    """
    if not (image.mode.startswith("I;16") or image.mode == "I"):
        return image
    values = np.asarray(image, dtype=np.int64)
    if image.mode == "I" and values.max(initial=0) <= 255:  # an 8-bit image stored as 32-bit integers
        return Image.fromarray(values.astype(np.uint8))
    return Image.fromarray((np.clip(values, 0, 65535) >> 8).astype(np.uint8))


def write_image(path: str | Path, image: np.ndarray, quality: int = 95) -> None:
    """Write a ``uint8`` ``(H, W, 3)`` RGB image; the format follows the suffix (jpg, png, webp, bmp).

    The file is written under a temporary name in the same folder and renamed, so a crash never leaves
    a half-written image. ``quality`` applies to JPEG and WebP.
    """
    path = Path(path)
    image_format = _WRITE_FORMATS.get(path.suffix.lower())
    if image_format is None:
        allowed = sorted(_WRITE_FORMATS)
        raise ValueError(f"{path}: cannot write images with suffix {path.suffix!r}; use one of {allowed}")
    _check_image(image)
    options = {"quality": quality} if image_format in ("JPEG", "WEBP") else {}
    with atomic_path(path) as tmp:
        Image.fromarray(image).save(tmp, format=image_format, **options)


def to_tensor(image: np.ndarray, device: str | torch.device = "cpu") -> torch.Tensor:
    """``uint8`` ``(H, W, 3)`` RGB image -> ``float32`` ``(1, 3, H, W)`` tensor in ``[0, 1]``."""
    _check_image(image)
    return frames_to_tensor(image[None], device)


def frames_to_tensor(frames: np.ndarray, device: str | torch.device = "cpu") -> torch.Tensor:
    """``uint8`` ``(T, H, W, 3)`` RGB frames -> ``float32`` ``(T, 3, H, W)`` tensor in ``[0, 1]``."""
    import torch  # imported here so file-only users (dataset preparation, video tools) do not load torch

    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected uint8 frames of shape (T, H, W, 3), got {frames.dtype} {frames.shape}")
    # torch.tensor copies, so read-only arrays (memory maps, PIL buffers) are accepted without a warning.
    tensor = torch.tensor(frames, device=device)
    return tensor.permute(0, 3, 1, 2).float().div_(255.0).contiguous()  # (T, 3, H, W)


def to_uint8(tensor: torch.Tensor) -> np.ndarray:
    """``(1, 3, H, W)`` or ``(3, H, W)`` tensor in ``[0, 1]`` -> ``uint8`` ``(H, W, 3)`` RGB image (rounded).

    Values outside ``[0, 1]`` (beyond float rounding noise) raise ``ValueError``: clamp explicitly upstream
    if an operation can overshoot (bicubic resize, unbounded network outputs).
    """
    if tensor.ndim == 4:
        if tensor.shape[0] != 1:
            raise ValueError(f"to_uint8 takes one image; got a batch of {tensor.shape[0]} (use to_uint8_frames)")
        tensor = tensor[0]
    if tensor.ndim != 3:
        raise ValueError(f"expected a tensor of shape (1, 3, H, W) or (3, H, W), got {tuple(tensor.shape)}")
    return to_uint8_frames(tensor[None])[0]


def to_uint8_frames(tensor: torch.Tensor) -> np.ndarray:
    """``(T, 3, H, W)`` tensor in ``[0, 1]`` -> ``uint8`` ``(T, H, W, 3)`` RGB frames (rounded). See `to_uint8`."""
    import torch

    if tensor.ndim != 4 or tensor.shape[1] != 3:
        raise ValueError(f"expected a tensor of shape (T, 3, H, W), got {tuple(tensor.shape)}")
    if not tensor.is_floating_point():
        raise ValueError(f"expected a floating-point tensor in [0, 1], got {tensor.dtype}")
    values = tensor.detach().to("cpu", torch.float32)
    if values.numel():
        low, high = values.min().item(), values.max().item()
        if not (low >= -_RANGE_TOLERANCE and high <= 1 + _RANGE_TOLERANCE):  # also catches NaN
            raise ValueError(f"image tensor values must be in [0, 1], got range [{low:.4f}, {high:.4f}]")
    frames = (values.clamp(0, 1) * 255.0).round().to(torch.uint8)  # clamp only removes the rounding noise
    return frames.permute(0, 2, 3, 1).contiguous().numpy()  # (T, H, W, 3)


def _check_image(image: np.ndarray) -> None:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        description = f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
        raise ValueError(f"expected a uint8 RGB image of shape (H, W, 3), got {description}")
