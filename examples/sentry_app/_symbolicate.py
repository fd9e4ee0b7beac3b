"""Decide whether an event needs symbolication, and do the part we can do.

Native crash reports arrive with raw instruction addresses, and JavaScript
errors from minified bundles arrive with positions in the minified file. Real
Sentry sends both to a symbol server. This example has no debug files and no
source maps, so `symbolicate` does what the event itself allows: it places each
native address inside the loaded image that contains it (from
`debug_meta.images`), which names the library and the offset into it, and it
marks what it could not resolve, frame by frame, so that nobody mistakes an
unresolved frame for a resolved one.

Both functions are pure, and `symbolicate` is idempotent: running it on its own
output changes nothing, so a retried or replayed step is harmless.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ._payload import (
    JSON,
    event_platform,
    frames_of,
    interface,
    is_minified_js_frame,
    is_native_address_frame,
    iter_frames,
    iter_stacktraces,
    parse_address,
    to_json,
)

__all__ = ["needs_symbolication", "symbolicate"]

# Values of a frame's `symbolicator_status`.
SYMBOLICATED = "symbolicated"
MISSING_IMAGE = "missing_image"
INVALID_ADDRESS = "invalid_address"
MISSING_SOURCEMAP = "missing_sourcemap"


def needs_symbolication(
    event: Mapping[str, Any], default_platform: str | None = None
) -> bool:
    """True if a native frame holds a raw address or a JS frame a minified position.

    Works on raw payloads (legacy keys, no platform) and on normalized events.
    An event that `symbolicate` has already processed needs nothing more.
    """
    if event.get("symbolicated") is True:
        return False
    platform = event_platform(event, default_platform)
    return any(
        is_native_address_frame(frame, platform)
        or is_minified_js_frame(frame, platform)
        for frame in iter_frames(event)
    )


def symbolicate(event: Mapping[str, Any]) -> dict[str, JSON]:
    """Return a copy of `event` with its native and minified frames processed.

    A native frame whose `instruction_addr` falls inside an image of
    `debug_meta.images` gets `package` (the image's `code_file`),
    `image_offset` (hex), `symbolicated: true`, and, if it had no function
    name, a placeholder such as `"<libart.so+0x1a2b>"`. Other native frames get
    `symbolicator_status: "missing_image"` (or `"invalid_address"`). Frames in
    minified JavaScript keep their positions and get
    `symbolicator_status: "missing_sourcemap"`. The event gets
    `symbolicated: true` and `symbolicated_frames`, the number of frames
    resolved against an image.

    Meant for normalized events; a raw event is read the same way, legacy keys
    included, but is not otherwise canonicalised.
    """
    result: dict[str, JSON] = to_json(dict(event))
    platform = event_platform(result, None)
    images = _images(result)

    resolved = 0
    for stacktrace in iter_stacktraces(result):
        for frame in frames_of(stacktrace):
            if is_native_address_frame(frame, platform):
                resolved += _resolve_native(frame, images)
            elif is_minified_js_frame(frame, platform):
                frame["symbolicator_status"] = MISSING_SOURCEMAP

    result["symbolicated"] = True
    result["symbolicated_frames"] = resolved
    return result


def _images(event: Mapping[str, Any]) -> list[tuple[int, int, Mapping[str, Any]]]:
    """`(start, end, image)` for each image with a usable address and size."""
    debug_meta = interface(event, "debug_meta")
    raw_images = debug_meta.get("images") if isinstance(debug_meta, dict) else None
    images: list[tuple[int, int, Mapping[str, Any]]] = []
    for image in raw_images if isinstance(raw_images, list) else []:
        if not isinstance(image, dict):
            continue
        start = parse_address(image.get("image_addr"))
        size = parse_address(image.get("image_size"))
        if start is not None and size:
            images.append((start, start + size, image))
    return images


def _resolve_native(
    frame: dict[str, JSON], images: list[tuple[int, int, Mapping[str, Any]]]
) -> int:
    """Resolve one native frame in place; return 1 if it was resolved, else 0."""
    address = parse_address(frame.get("instruction_addr"))
    if address is None:
        frame["symbolicator_status"] = INVALID_ADDRESS
        return 0
    # Images do not overlap in a real process; if a payload says they do, the
    # first listed wins, which keeps the answer deterministic.
    match = next(
        ((start, img) for start, end, img in images if start <= address < end), None
    )
    if match is None:
        frame["symbolicator_status"] = MISSING_IMAGE
        return 0

    start, image = match
    offset = address - start
    code_file = image.get("code_file")
    library = _basename(code_file) if isinstance(code_file, str) and code_file else "?"
    if isinstance(code_file, str) and code_file:
        frame["package"] = code_file
    frame["image_offset"] = hex(offset)
    if not frame.get("function"):
        frame["function"] = f"<{library}+{hex(offset)}>"
    frame["symbolicated"] = True
    frame["symbolicator_status"] = SYMBOLICATED
    return 1


def _basename(path: str) -> str:
    """The file name of a POSIX or Windows path."""
    return path.replace("\\", "/").rsplit("/", 1)[-1]
