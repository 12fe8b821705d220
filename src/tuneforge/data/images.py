"""Images in chat rows, as OpenAI's vision fine-tuning data gives them: a user message's content part
`{"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}`.

Each is decoded here, when the row is read, and checked: the URL is a base64 data URL (an http URL
would need the network; a file path is read from a row's `images` field instead, below), the base64
decodes, the bytes are an image PIL reads, within `MAX_IMAGE_BYTES` and Pillow's pixel limit
(`PIL.Image.MAX_IMAGE_PIXELS`: a small file of a huge image takes GBs to decode).
A row's `images` field (TRL's and LLaMA-Factory's layouts) names its images by file path too
(`column_image`): the data cache's key hashes the files it names.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
from pathlib import Path

from .schema import Image

MAX_IMAGE_BYTES = 10 * 1024 * 1024
"""The largest image file a row may hold (OpenAI's limit for vision fine-tuning: 10 MB)."""

FORMATS = ("PNG", "JPEG", "GIF", "WEBP")
"""The image formats read (OpenAI's: PNG, JPEG, non-animated GIF, WEBP)."""
FORMATS_NAMED = f"{', '.join(FORMATS[:-1])} or {FORMATS[-1]}"
"""`FORMATS` as the messages about an image name them: "PNG, JPEG, GIF or WEBP"."""

_EMBED = "embed the image as a data URL: data:image/png;base64,<the file's bytes in base64>"


def read_image(url: object) -> Image | str:
    """The image an image part's URL holds, or what is wrong with it (a message saying what to do)."""
    if not isinstance(url, str) or not url.strip():
        return f"the image's url must be a data URL; {_EMBED}."
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme in ("http", "https"):
        return f"images are not downloaded (tuneforge reads no network); download {url[:80]} and {_EMBED}."
    if scheme != "data":
        return f"{url[:80]!r} is not a data URL (a file path or other URL is not read); {_EMBED}."
    header, sep, payload = url.partition(",")
    if not sep or not header.lower().endswith(";base64"):
        return f"the data URL must be base64 ('data:image/png;base64,...'), got {header[:60]!r}."
    if len(payload) * 3 // 4 > MAX_IMAGE_BYTES:
        return f"the image is over {MAX_IMAGE_BYTES // 2**20} MB; resize or recompress it."
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        return f"the data URL's base64 does not decode ({e}); encode the image file's bytes in base64."
    kind = _image_format(data, "the data URL's bytes")
    return Image(data, url) if kind in FORMATS else kind


def read_shown_image(url: object, side) -> bytes | str:
    """The bytes of the image a request's (or `tuneforge.load`'s) image part shows, for the model whose image side
    (`models.images.ImageInputs`) is `side`; or what is wrong with it: the URL (`read_image`), or an image the
    model's processor does not take."""
    image = read_image(url)
    if isinstance(image, str):
        return image
    if refused := side.refusal(image.data):
        return f"the model's image processor does not take this image ({refused}); crop or pad it."
    return image.data


def read_image_file(path: str | Path) -> Image | str:
    """The image in a local file (`tuneforge chat`'s /image), checked as a row's image is, or what is wrong
    with it; its URL is the data URL a row or a request would hold it as."""
    path = Path(path).expanduser()
    try:
        size = path.stat().st_size
        if not path.is_file():
            return f"{path} is not a file; give an image file ({FORMATS_NAMED})."
        if size > MAX_IMAGE_BYTES:
            return f"{path} is over {MAX_IMAGE_BYTES // 2**20} MB; resize or recompress it."
        data = path.read_bytes()
    except OSError as e:
        return f"{path} cannot be read ({e.strerror or e})."
    return _image_bytes(data, f"the bytes of {path}")


def column_image(value: object, folder: Path) -> Image | str:
    """One image of a row's `images` field (TRL's and LLaMA-Factory's layout), or what is wrong with it: a
    file path, relative to the data file's `folder` (LLaMA-Factory's), a data URL, or Hugging Face's image
    value `{"bytes", "path"}` (a data set's Parquet files hold it)."""
    if isinstance(value, dict) and isinstance(value.get("bytes"), bytes):
        if len(value["bytes"]) > MAX_IMAGE_BYTES:
            return f"the image is over {MAX_IMAGE_BYTES // 2**20} MB; resize or recompress it."
        return _image_bytes(value["bytes"], "the image's bytes")
    path = column_image_path(value, folder)
    if path is not None:
        if not path.exists():
            return (
                f"{path} does not exist (an image's path is read from the data file's folder, {folder.absolute()}); "
                "fix the path or add the file."
            )
        return read_image_file(path)
    if isinstance(value, str) and value.split(":", 1)[0].lower() == "data":
        return read_image(value)
    if isinstance(value, str) and value.split(":", 1)[0].lower() in ("http", "https"):
        return (
            f"images are not downloaded (tuneforge reads no network); download {value[:80]} and give the "
            "file's path, from the data file's folder."
        )
    return (
        'an image is given as a file path (from the data file\'s folder), a data URL or {"bytes": ..., "path": ...}; '
        "give it as one of them."
    )


def column_image_path(value: object, folder: Path) -> Path | None:
    """The file an `images` field's entry names (a path, or a `{"path"}` without bytes), relative to the data
    file's `folder`; None for an entry that names no file (a URL, a data URL, bytes)."""
    if isinstance(value, dict) and value.get("bytes") is None:
        value = value.get("path")
    if not isinstance(value, str) or not value.strip() or re.match(r"[A-Za-z][A-Za-z0-9+.-]+:", value):
        return None
    return folder / Path(value).expanduser()


def _image_bytes(data: bytes, what: str) -> Image | str:
    """The image in a file's bytes (`what` names them), checked, with the data URL it is held as; or what is
    wrong with them."""
    kind = _image_format(data, what)
    if kind not in FORMATS:
        return kind
    return Image(data, f"data:image/{kind.lower()};base64,{base64.b64encode(data).decode()}")


def _image_format(data: bytes, what: str) -> str:
    """The format of an image file's bytes (`what` names them), one of `FORMATS`, or else what is wrong with them."""
    from PIL import Image as PILImage
    from PIL import UnidentifiedImageError

    # Pillow opens an image up to twice its pixel limit with a warning only; one that size takes GBs to decode.
    too_large = f"{what} are an image of over {PILImage.MAX_IMAGE_PIXELS} pixels (Pillow's limit); resize it."
    try:
        with PILImage.open(io.BytesIO(data)) as picture:
            kind, pixels = picture.format, picture.width * picture.height
            animated = getattr(picture, "is_animated", False)
            picture.verify()
    except PILImage.DecompressionBombError:
        return too_large
    except UnidentifiedImageError:  # its message names the in-memory file object, nothing the user gave
        return f"{what} are not an image PIL reads (no image format recognized); give a {FORMATS_NAMED} image."
    except (OSError, SyntaxError, ValueError) as e:
        return f"{what} are not an image PIL reads ({type(e).__name__}: {str(e)[:80]}); give a {FORMATS_NAMED} image."
    if PILImage.MAX_IMAGE_PIXELS and pixels > PILImage.MAX_IMAGE_PIXELS:
        return too_large
    if kind not in FORMATS:
        return f"the image is {kind}; give a {FORMATS_NAMED} image."
    if animated:  # the model would see its first frame alone; OpenAI takes no animated GIF either
        return f"{what} are an animated {kind} (the model reads one frame); give a still {FORMATS_NAMED} image."
    return kind
