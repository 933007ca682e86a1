"""``multipart/related`` (RFC 2387) both ways, streaming: a request body is cut into parts as its
chunks arrive, each part's bytes written straight to a file, so a STOW-RS of gigabytes holds one
network chunk in memory at a time; a response is produced part by part from files on disk.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

#: Headers of one part larger than this are not a DICOMweb client's.
MAX_PART_HEADER_BYTES = 16 * 1024
_FILE_CHUNK = 1024 * 1024


class MultipartError(ValueError):
    """The body is not well-formed multipart/related; the message says where it went wrong."""


def content_type_parameters(content_type: str) -> tuple[str, dict[str, str]]:
    """``("multipart/related", {"type": "application/dicom", "boundary": ...})`` from a header value."""
    media, *params = content_type.split(";")
    values: dict[str, str] = {}
    for param in params:
        key, sep, value = param.strip().partition("=")
        if sep:
            values[key.strip().lower()] = value.strip().strip('"')
    return media.strip().lower(), values


@dataclass
class Part:
    """One received part: its headers (lower-case names) and the file its body went to (``None`` when
    the caller chose not to keep it)."""

    headers: dict[str, str]
    file: BinaryIO | None
    size: int = 0

    @property
    def content_type(self) -> str:
        return content_type_parameters(self.headers.get("content-type", ""))[0]


@dataclass
class MultipartReader:
    """An incremental parser: ``feed`` chunks, collect the parts it completed. ``open_part(headers)``
    gives the file a part's body is written to (or ``None`` to skip the body)."""

    boundary: str
    open_part: Callable[[dict[str, str]], BinaryIO | None]
    _buffer: bytearray = field(default_factory=bytearray)
    _state: str = "preamble"
    _part: Part | None = None
    _done: list[Part] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.boundary or len(self.boundary) > 200:
            raise MultipartError("the multipart boundary is missing or too long")
        self._delimiter = b"--" + self.boundary.encode("latin-1")
        self._body_delimiter = b"\r\n" + self._delimiter

    @property
    def open(self) -> Part | None:
        """The part being received, if any (so a caller can discard its file on error)."""
        return self._part

    def feed(self, data: bytes) -> list[Part]:
        self._buffer += data
        while self._step():
            pass
        done, self._done = self._done, []
        return done

    def close(self) -> None:
        if self._state != "end":
            raise MultipartError("the body ended before the closing boundary")

    def _step(self) -> bool:
        """Advance through the buffer once; False when more data is needed."""
        buf = self._buffer
        if self._state == "preamble":
            at = buf.find(self._delimiter)
            if at < 0:
                keep = len(self._delimiter)
                del buf[:max(len(buf) - keep, 0)]
                return False
            del buf[:at + len(self._delimiter)]
            self._state = "after_delimiter"
            return True
        if self._state == "after_delimiter":
            if len(buf) < 2:
                return False
            if buf[:2] == b"--":
                self._state = "end"
                buf.clear()
                return False
            eol = buf.find(b"\r\n")
            if eol < 0:
                if len(buf) > 1024:
                    raise MultipartError("garbage after a boundary")
                return False
            del buf[:eol + 2]
            self._state = "headers"
            return True
        if self._state == "headers":
            end = buf.find(b"\r\n\r\n")
            if buf.startswith(b"\r\n"):
                end, header_block = 0, b""
            elif end < 0:
                if len(buf) > MAX_PART_HEADER_BYTES:
                    raise MultipartError("a part's headers are too long")
                return False
            else:
                header_block = bytes(buf[:end])
            headers: dict[str, str] = {}
            for line in header_block.decode("latin-1").split("\r\n"):
                name, sep, value = line.partition(":")
                if sep:
                    headers[name.strip().lower()] = value.strip()
            del buf[:end + (2 if end == 0 else 4)]
            self._part = Part(headers, self.open_part(headers))
            self._state = "body"
            return True
        if self._state == "body":
            assert self._part is not None
            at = buf.find(self._body_delimiter)
            if at < 0:
                writable = len(buf) - len(self._body_delimiter) + 1
                if writable > 0:
                    self._write(memoryview(buf)[:writable])
                    del buf[:writable]
                return False
            self._write(memoryview(buf)[:at])
            del buf[:at + len(self._body_delimiter)]
            self._done.append(self._part)
            self._part = None
            self._state = "after_delimiter"
            return True
        if self._state == "end":
            buf.clear()
        return False

    def _write(self, data: memoryview) -> None:
        assert self._part is not None
        if self._part.file is not None and len(data):
            self._part.file.write(data)
        self._part.size += len(data)


def new_boundary() -> str:
    return f"pacsnode-{secrets.token_hex(12)}"


def multipart_body(parts: Iterable[tuple[str, Path]], boundary: str) -> Iterator[bytes]:
    """The bytes of a multipart/related body whose parts are ``(content type, file)``, read a
    megabyte at a time (a series of radiographs is streamed, never assembled in memory)."""
    for content_type, path in parts:
        yield f"--{boundary}\r\nContent-Type: {content_type}\r\n\r\n".encode()
        with open(path, "rb") as f:
            while chunk := f.read(_FILE_CHUNK):
                yield chunk
        yield b"\r\n"
    yield f"--{boundary}--\r\n".encode()


_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")


def quoted(value: str) -> str:
    """A parameter value, quoted when it is not an RFC 7230 token."""
    return value if _TOKEN.match(value) else '"' + value.replace('"', '\\"') + '"'
