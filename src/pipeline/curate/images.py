"""Image-text pairs: the caption becomes the text, the image a reference in `meta.image`.

Two layouts: LAION-style records (jsonl/json/parquet with a caption and a `url` or local `path`, read as
pairs when `data.image_text.records` is set) and a folder of images with sidecar captions (`photo.jpg`
beside `photo.txt`, or `photo.json` holding {"caption": ...}). A local image is opened and verified by
Pillow, and its size, format and sha256 go to `meta.image`; a missing or unreadable image, or a pair with
no caption, is a reject with its reason. A remote URL stays a reference: fetching images is a download job
(img2dataset's), not curation.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from pipeline.config import ImageTextConfig
from pipeline.curate.records import read_reject, record
from pipeline.multitask import format_instruction

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")
CAPTION_SUFFIXES = (".txt", ".json")
ANY_CASE_IMAGE_SUFFIXES = IMAGE_SUFFIXES + tuple(s.upper() for s in IMAGE_SUFFIXES)


def is_sidecar(path: str, files: set[str]) -> bool:
    """A .txt/.json beside an image of the same name is that image's caption, not a document of its own."""
    p = Path(path)
    return p.suffix in CAPTION_SUFFIXES and any(str(p.with_suffix(s)) in files for s in ANY_CASE_IMAGE_SUFFIXES)


def image_facts(data: bytes) -> dict:
    """Size, format and sha256 of an image; raises if Pillow cannot read it."""
    with Image.open(io.BytesIO(data)) as image:
        image.verify()
        return {
            "width": image.width,
            "height": image.height,
            "format": image.format,
            "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
        }


def pair(rid: str, source: str, caption, image: dict, settings: ImageTextConfig, raw: str = "") -> dict:
    """The pair as a record, or a reject when the caption is missing."""
    meta = json.dumps({"image": image})
    if not isinstance(caption, str) or not caption.strip():
        return read_reject(rid, source, "image without a caption", raw=raw, meta=meta)
    if settings.template == "instruction":
        reference = image.get("path") or image.get("url")
        caption = format_instruction("image captioning", f"<image:{reference}>", caption)
    return record(rid, text=caption, source=source, meta=meta)


def local_image(path: Path) -> tuple[dict, str]:
    """(facts, reason): the image's facts, or why it cannot be used."""
    try:
        data = path.read_bytes()
    except OSError as e:
        return {"path": str(path)}, f"missing image file ({e.strerror})"
    try:
        return {"path": str(path), **image_facts(data)}, ""
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError) as e:
        # what Pillow raises on broken, truncated or oversized images
        return {"path": str(path)}, f"unreadable image: {e}"


def sidecar_caption(image: Path) -> str | None:
    for suffix in CAPTION_SUFFIXES:
        side = image.with_suffix(suffix)
        if side.is_file():
            text = side.read_text(encoding="utf-8", errors="replace")
            if suffix == ".txt":
                return text.strip()
            value = json.loads(text) if text.strip() else {}
            return value.get("caption") if isinstance(value, dict) else None
    return None


def image_file(path: str, settings: ImageTextConfig) -> dict:
    """An image of a folder, captioned by its sidecar."""
    facts, reason = local_image(Path(path))
    if reason:
        return read_reject(path, path, reason, meta=json.dumps({"image": facts}))
    try:
        caption = sidecar_caption(Path(path))
    except json.JSONDecodeError as e:
        caption, facts["caption_error"] = None, f"malformed caption json: {e.msg}"
    return pair(path, path, caption, facts, settings)


def pair_from_record(value: dict, rid: str, source: str, settings: ImageTextConfig, raw: str) -> dict:
    """A LAION-style record: its caption and its image's url or path (a relative path is from the file's folder)."""
    caption, url, local = (value.get(f) for f in (settings.caption_field, settings.url_field, settings.path_field))
    if local:
        image_path = Path(source).parent / local
        facts, reason = local_image(image_path)
        if reason:
            return read_reject(rid, source, reason, raw=raw, meta=json.dumps({"image": facts}))
    elif url:
        facts = {"url": str(url)}
    else:
        reason = f"no image: neither {settings.url_field!r} nor {settings.path_field!r} is set"
        return read_reject(rid, source, reason, raw=raw)
    return pair(rid, source, caption, facts, settings, raw)
