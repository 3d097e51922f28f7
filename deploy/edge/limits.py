"""What one request may cost the edge box: body bytes, pixels, decoded bytes, image formats, ids, feedback rate.

Every limit is a key of the rollout manifest's ``limits`` section (safe defaults below) and breaking one is a 4xx
with a one-line reason, before the expensive step it protects:

    limits:
      max_body_bytes: 16777216      # 16 MiB: 413 from Content-Length, else while the body streams in
      max_pixels: 25000000          # 25 MP: 413 after Image.open read the header, before any pixel is decoded
      max_decoded_bytes: 100000000  # width x height x the bytes a pixel of its mode takes decoded; 413 likewise
      decode_concurrency: 4         # frames held decoded at full size at once (decode to model input); 503 after 10 s
      large_frame_bytes: 24000000   # decoded bytes over which a frame is decoded in the large-frame lane (below)
      formats: [PNG, JPEG, TIFF]    # Pillow format names; anything else is 415
      max_id_length: 128            # camera_id / frame ids: 1..128 of [A-Za-z0-9._:-], else 422
      feedback_per_minute: 600      # per client (token name, else address); 429 with Retry-After beyond it
      served_frames: 100000         # frame ids remembered for feedback (oldest forgotten first)

A 140 KB PNG of 12000 x 12000 px decodes to 432 MB of RGB: the pixel check runs on the header Pillow has parsed
(``im.size``, ``im.mode``) and the decode is never attempted. ``Image.MAX_IMAGE_PIXELS`` alone would only warn below
2x its value. What one frame costs is its decoded bytes (Pillow keeps RGB in 4 bytes a pixel, 16-bit grey in 2)
plus ~1 byte a pixel to make it 8-bit (`spt_core.portable.preprocess.to_8bit`, strip by strip), so the box holds at
most ``decode_concurrency x (large_frame_bytes + max_pixels) + max_decoded_bytes + max_pixels`` bytes of frames:
4 x 49 MB + 125 MB by default.

The large-frame lane (`deploy.edge.lane`) takes a frame that decodes to more than ``large_frame_bytes``. The default,
24 MB, keeps a 5 MP camera's frames on the normal path whatever their mode (2448 x 2048 RGB is 20 MB as Pillow holds
it, 16-bit grey 10 MB) and sends the 25 MP and 4999 x 4999 16-bit probes (100 MB, 50 MB) to the lane. TIFF is
allowed because training reads the same files (a Mono12/16 camera's archive is often TIFF): its header gives the
size and mode before any strip is decoded, so the same bounds hold as for PNG, and only its first page is read.
Torch-free (Pillow only).
"""

from __future__ import annotations

import io
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

from PIL import Image

from spt_core.portable.errors import SensituneError, one_line

ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]*")
# Bytes a pixel of each mode takes once Pillow has decoded it (3-band modes are stored in 4); a mode not listed
# (a format plug-in's own) is refused before it is decoded.
DECODED_BYTES = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16B": 2, "I;16L": 2, "I;16N": 2, "LA": 4, "PA": 4, "La": 4,
                 "RGB": 4, "RGBA": 4, "RGBa": 4, "RGBX": 4, "CMYK": 4, "YCbCr": 4, "LAB": 4, "HSV": 4, "I": 4, "F": 4}
DECODE_WAIT_S = 10.0  # a frame waits this long for a decode slot (or the large-frame lane), then 503 with Retry-After


class LimitError(SensituneError):
    """A request over one of the limits; `status` is the HTTP answer (413, 415, 422, 429)."""

    def __init__(self, status: int, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status, self.retry_after = status, retry_after

    def __reduce__(self) -> tuple[Any, ...]:  # raised in the large-frame worker, unpickled in the service
        return type(self), (self.status, str(self), self.retry_after)


@dataclass(frozen=True)
class Limits:
    """The ``limits`` section of the rollout manifest (see the module docstring)."""

    max_body_bytes: int = 16 * 2**20  # a 5 MP 16-bit PNG frame is ~10 MB; an upload is never larger than this
    max_pixels: int = 25_000_000  # 25 MP covers common area-scan sensors (5120 x 5120 = 26.2 MP needs a raise)
    max_decoded_bytes: int = 100_000_000  # a 25 MP RGB frame as Pillow holds it (4 bytes a pixel)
    decode_concurrency: int = 4  # frames decoded at full size at once: 4 x ~49 MB at most
    large_frame_bytes: int = 24_000_000  # over this decoded, the large-frame lane: 5 MP RGB (20 MB) stays normal
    formats: tuple[str, ...] = ("PNG", "JPEG", "TIFF")  # cameras' frames and their archives' (16-bit TIFF)
    max_id_length: int = 128
    feedback_per_minute: int = 600  # 10/s sustained per client, burst of the same size
    served_frames: int = 100_000  # ~10 MB of index: a day of a 1 fps camera per camera slot

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"formats": list(self.formats)}


_INT_LIMITS = {
    "max_body_bytes": (1024, 2**31),
    "max_pixels": (1, 10**9),
    "max_decoded_bytes": (1024, 2**34),
    "decode_concurrency": (1, 256),
    "large_frame_bytes": (1024, 2**34),
    "max_id_length": (8, 1024),
    "feedback_per_minute": (1, 10**6),
    "served_frames": (1, 10**7),
}


def parse_limits(value: Any, errors: list[str]) -> Limits:
    """The manifest's ``limits`` mapping -> `Limits`; each bad key is appended to `errors`."""
    if value is None:
        return Limits()
    if not isinstance(value, dict):
        errors.append(f"limits={value!r}: give a mapping, e.g. {{max_pixels: 25000000}}")
        return Limits()
    allowed = list(Limits.__dataclass_fields__)
    if unknown := sorted(set(value) - set(allowed)):
        errors.append(f"limits: unknown key(s) {unknown}; allowed {allowed}")
    out: dict[str, Any] = {}
    for key, (lo, hi) in _INT_LIMITS.items():
        if key in value:
            v = value[key]
            if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
                errors.append(f"limits.{key}={v!r}: give an integer in [{lo}, {hi}]")
            else:
                out[key] = v
    if "formats" in value:
        fmts = value["formats"]
        known = set(Image.registered_extensions().values())
        if not isinstance(fmts, list) or not fmts or not all(isinstance(f, str) and f.upper() in known for f in fmts):
            errors.append(f"limits.formats={fmts!r}: give Pillow format names, e.g. [PNG, JPEG]")
        else:
            out["formats"] = tuple(f.upper() for f in fmts)
    return Limits(**out)


def check_id(value: str, key: str, limits: Limits) -> str:
    """`value` if it is a usable id (1..max_id_length of [A-Za-z0-9._:-], starting alphanumeric), else 422."""
    if len(value) > limits.max_id_length or not ID_PATTERN.fullmatch(value):
        shown = value[:40] + ("..." if len(value) > 40 else "")
        raise LimitError(
            422,
            f"{key}={shown!r} ({len(value)} chars): give 1..{limits.max_id_length} of letters, digits and . _ : - "
            "starting with a letter or digit",
        )
    return value


def open_image(data: bytes, limits: Limits) -> Image.Image:
    """Decode an uploaded frame in its own mode, refusing (before decoding a pixel) what the limits do not allow.

    The model's preprocess makes it 8-bit by its manifest's ``bit_depth`` (`preprocess.to_8bit`), never clipped to
    white. Call it inside `DecodeGate.hold`: the decoded frame is what the gate bounds.

    Raises:
        LimitError: 415 format or mode not allowed or unreadable, 413 more pixels than ``max_pixels`` or more decoded
            bytes than ``max_decoded_bytes``.
    """
    return decode(open_header(data, limits))


def open_header(data: bytes, limits: Limits) -> Image.Image:
    """An uploaded frame with only its header read, checked against the limits as `open_image` checks it: the caller
    learns what its decode will cost (`decoded_bytes`) and picks where to `decode` it (a slot or the large-frame lane).
    """
    try:
        im = Image.open(io.BytesIO(data), formats=list(limits.formats))  # reads the header only
    except Image.DecompressionBombError as e:  # Pillow's own guard, at 2x MAX_IMAGE_PIXELS
        raise LimitError(413, f"file: {one_line(e)}; at most {limits.max_pixels} pixels") from None
    except Exception as e:
        allowed = "/".join(limits.formats)
        raise LimitError(
            415, f"file: not a readable {allowed} image ({one_line(e, 120)}); send {allowed}, or add the format to "
            "limits.formats in rollout.yaml"
        ) from None  # fmt: skip
    w, h = im.size
    if w * h > limits.max_pixels:
        raise LimitError(
            413, f"file: {w}x{h} = {w * h} pixels, over limits.max_pixels={limits.max_pixels}; send smaller frames"
        )
    per_pixel = DECODED_BYTES.get(im.mode)
    if per_pixel is None:
        raise LimitError(415, f"file: pixel mode {im.mode!r} is not supported; send 8-bit grey/RGB or 16-bit grey")
    if w * h * per_pixel > limits.max_decoded_bytes:
        raise LimitError(
            413, f"file: {w}x{h} {im.mode} decodes to {w * h * per_pixel} bytes, over limits.max_decoded_bytes="
            f"{limits.max_decoded_bytes}; send smaller frames"
        )  # fmt: skip
    return im


def decoded_bytes(im: Image.Image) -> int:
    """What a frame `open_header` passed will take once decoded (width x height x the bytes a pixel of its mode)."""
    w, h = im.size
    return w * h * DECODED_BYTES[im.mode]


def decode(im: Image.Image) -> Image.Image:
    """Decode a frame `open_header` passed; 415 when its pixels do not decode."""
    try:  # the decode, bounded now; no copy: the image owns its pixels once loaded (the bytes it read stay small)
        im.load()
    except Exception as e:
        raise LimitError(415, f"file: the {im.format} image does not decode ({one_line(e, 120)})") from None
    return im


class DecodeGate:
    """At most `n` frames held decoded at full size at once, from the decode to the model's (small) input.

    A frame over that waits up to `wait_s` for a slot, then gets 503 with Retry-After: a burst of large frames costs
    bounded memory (12 parallel 25 MP 16-bit frames once peaked at 7.9 GB) and time, never the box. Thread-safe.
    """

    def __init__(self, n: int, wait_s: float = DECODE_WAIT_S) -> None:
        self.n, self.wait_s = n, wait_s
        self._slots = threading.BoundedSemaphore(n)

    @contextmanager
    def hold(self) -> Iterator[None]:
        """One slot for the body of the `with`; `LimitError` 503 when none frees up in time."""
        if not self._slots.acquire(timeout=self.wait_s):
            raise LimitError(
                503, f"busy: {self.n} frames are being decoded (limits.decode_concurrency={self.n}); retry shortly",
                retry_after=1.0,
            )  # fmt: skip
        try:
            yield
        finally:
            self._slots.release()


class RateLimiter:
    """A token bucket per key: `per_window` a `window_s` sustained, bursts up to the same number (feedback per client;
    the frame store's frames kept per camera).

    At most `max_clients` buckets are kept (least recently used dropped), so a flood of client names costs bounded
    memory. Thread-safe.
    """

    def __init__(self, max_clients: int = 10_000, clock: Callable[[], float] = time.monotonic) -> None:
        self._lock = threading.Lock()
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # client -> (tokens, last time)
        self._max, self._clock = max_clients, clock

    def spend(self, client: str, per_window: float, window_s: float = 60.0) -> float:
        """Spend one token of `client`'s bucket: 0.0 when spent, else the seconds until one is there (none spent)."""
        rate, now = per_window / window_s, self._clock()
        with self._lock:
            tokens, last = self._buckets.pop(client, (float(per_window), now))
            tokens = min(float(per_window), tokens + (now - last) * rate)
            spent = tokens >= 1.0
            self._buckets[client] = (tokens - 1.0 if spent else tokens, now)
            while len(self._buckets) > self._max:
                self._buckets.popitem(last=False)
        return 0.0 if spent else (1.0 - tokens) / rate

    def take(self, client: str, per_minute: int) -> None:
        """Spend one token of `client`'s bucket, or raise `LimitError` 429 with the seconds to wait."""
        wait = self.spend(client, per_minute)
        if wait > 0:
            why = f"feedback from {client!r}: over limits.feedback_per_minute={per_minute}"
            raise LimitError(429, why, retry_after=wait)
