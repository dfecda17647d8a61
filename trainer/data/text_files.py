"""Reading the user's text files (captions, dataset configs, metadata) as kohya does: UTF-8, a BOM allowed.

One reader, so every file that is not UTF-8 gets the same message: the file, the line and byte, and how to fix it.
"""

from __future__ import annotations

from pathlib import Path

from .images import DatasetError


def read_utf8(path: Path, what: str = "") -> str:
    """The text of ``path``; ``what`` (e.g. "caption ") names the file's role in the message."""
    raw = path.read_bytes()
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise DatasetError(
            f"{path}: {what}is saved as UTF-16 (Notepad's 'Unicode'), not UTF-8; re-save it with encoding UTF-8."
        )
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line_no = raw[: e.start].count(b"\n") + 1
        raise DatasetError(
            f"{path}:{line_no}: {what}is not valid UTF-8 (byte 0x{raw[e.start]:02x} at position {e.start}); re-save "
            "it with encoding UTF-8 (e.g. in a text editor: Save As, Encoding: UTF-8)."
        ) from None
