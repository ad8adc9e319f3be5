"""Opening media inputs safely, and reading their containers at a bounded cost.

Everything here runs before a pixel or a sample is decoded, so a small file that claims a huge
picture, thousands of frames or a 1 Hz sample rate is refused before it costs memory or time:

    LIMITS              what minignext.media accepts (a MediaLimits; change its fields to tighten)
    check_media_path()  exists, is a regular file or a pipe, is not empty: checked without reading
    open_media()        a readable binary file; a pipe is read into memory, never blocking for long
    WavFile             a RIFF/WAVE header (integer PCM, IEEE float, WAVE_FORMAT_EXTENSIBLE) and
                        reads of any window of its frames
    gif_info()          a GIF's size and per-frame delays, from its blocks alone

The layouts are Microsoft's RIFF/WAVE (`fmt ` and `data` chunks, the extensible format's
sub-format GUID) and the GIF89a specification (image descriptors, graphic control extensions).
"""

import io
import os
import select
import stat
import struct
from contextlib import contextmanager
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
from PIL import Image, ImageSequence, UnidentifiedImageError


class MediaError(ValueError):
    """A media input that cannot be read, or that is over one of the limits."""


@dataclass
class MediaLimits:
    max_image_pixels: int = 40_000_000      # one picture or video frame (an 8K x 5K photo)
    max_video_pixels: int = 100_000_000     # frames x pixels of a whole video: the decoding work
    max_video_frames: int = 10_000
    min_sample_rate: int = 4_000
    max_sample_rate: int = 384_000
    max_channels: int = 32
    max_audio_seconds: float = 3600.0
    max_audio_samples: int = 64_000_000     # samples x channels of a waveform read whole (read_wav)
    max_pipe_bytes: int = 256 * 2 ** 20     # a pipe is read into memory
    # seconds to wait for each piece of a pipe (the environment's MINIGNEXT_PIPE_TIMEOUT, if set)
    pipe_timeout: float = float(os.environ.get("MINIGNEXT_PIPE_TIMEOUT", 5.0))


LIMITS = MediaLimits()


# ---------------------------------------------------------------- sources

def check_media_path(source) -> Path:
    """The path of a media input, checked without reading from it."""
    path = Path(source).expanduser()
    try:
        st = path.stat()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file") from None
    if stat.S_ISDIR(st.st_mode):
        raise MediaError(f"{path} is a folder; expected a file")
    if stat.S_ISREG(st.st_mode):
        if st.st_size == 0:
            raise MediaError(f"{path}: the file is empty (0 bytes)")
    elif not stat.S_ISFIFO(st.st_mode):
        raise MediaError(f"{path} is a device or socket; expected a file or a pipe")
    return path


def open_media(source):
    """A readable, seekable binary file for a path (or an already open binary file, returned as
    is). A pipe, such as `<(cat x.wav)` or a named FIFO, is read into memory up to
    LIMITS.max_pipe_bytes, waiting at most LIMITS.pipe_timeout seconds for each piece: a FIFO
    that nothing writes to fails instead of blocking. The file's `name` is the path."""
    if hasattr(source, "read"):
        return source
    path = check_media_path(source)
    if not stat.S_ISFIFO(path.stat().st_mode):
        return open(path, "rb")
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)      # does not wait for a writer
    chunks, size = [], 0
    try:
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        while True:
            if not poller.poll(LIMITS.pipe_timeout * 1000):
                raise MediaError(f"{path}: the pipe gave no data for {LIMITS.pipe_timeout:g} s; "
                                 f"is anything writing to it?")
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                break
            size += len(chunk)
            if size > LIMITS.max_pipe_bytes:
                raise MediaError(f"{path}: the pipe holds more than {LIMITS.max_pipe_bytes} bytes; save it to a file")
            chunks.append(chunk)
    finally:
        os.close(fd)
    if not size:
        raise MediaError(f"{path}: the pipe gave no data (0 bytes)")
    f = io.BytesIO(b"".join(chunks))
    f.name = str(path)
    return f


def source_name(f) -> str:
    return str(getattr(f, "name", "media input"))


@contextmanager
def opened(source):
    """open_media(source), closed afterwards if it opened a file."""
    f = open_media(source)
    try:
        yield f
    finally:
        if f is not source and not isinstance(f, io.BytesIO):
            f.close()


@contextmanager
def decoding(name, what):
    """Whatever a decoder raises on a corrupt file becomes one MediaError naming the file."""
    try:
        yield
    except (MediaError, FileNotFoundError, PermissionError):
        raise
    except UnidentifiedImageError:
        raise MediaError(f"{name}: not an image file Pillow can read (expected PNG, JPEG, GIF, ...)") from None
    except Image.DecompressionBombError as e:
        raise MediaError(f"{name}: too many pixels ({e}); the limit here is {LIMITS.max_image_pixels} pixels "
                         f"(a decompression bomb, or scale it down first)") from None
    except MemoryError:
        raise MediaError(f"{name}: ran out of memory decoding this {what}") from None
    except Exception as e:          # a corrupt file can make a decoder raise almost anything
        raise MediaError(f"{name}: broken or truncated {what} file ({type(e).__name__}: {e})") from None


# ---------------------------------------------------------------- WAV

PCM, IEEE_FLOAT, EXTENSIBLE = 1, 3, 0xFFFE
GUID_TAIL = bytes.fromhex("000000001000800000aa00389b71")   # KSDATAFORMAT_SUBTYPE_*, after the tag


@dataclass
class WavFile:
    file: object
    name: str
    channels: int
    sample_rate: int
    width: int              # bytes per sample
    is_float: bool
    data_start: int
    num_frames: int

    @classmethod
    def open(cls, f) -> "WavFile":
        """Parse the header of an open WAV file; checks the format and the limits."""
        name = source_name(f)
        f.seek(0, io.SEEK_END)
        file_size = f.tell()
        f.seek(0)
        head = f.read(12)
        if len(head) < 12 or head[:4] != b"RIFF" or head[8:] != b"WAVE":
            raise _not_wav(name, f"it starts with {head[:4]!r}, not RIFF....WAVE")
        fmt = None
        while True:
            chunk = f.read(8)
            if len(chunk) < 8:
                raise _not_wav(name, "no data chunk" if fmt else "no fmt chunk")
            kind, size = chunk[:4], struct.unpack("<I", chunk[4:])[0]
            if kind == b"fmt ":
                fmt = f.read(min(size, 40))
                f.seek(size - len(fmt) + (size & 1), io.SEEK_CUR)
            elif kind == b"data":
                if fmt is None:
                    raise _not_wav(name, "the data chunk comes before the fmt chunk")
                start = f.tell()
                size = min(size, file_size - start)     # streamed or truncated files overstate it
                break
            else:
                f.seek(size + (size & 1), io.SEEK_CUR)
        if len(fmt) < 16:
            raise _not_wav(name, f"a fmt chunk of {len(fmt)} bytes")
        tag, channels, rate, _, align, bits = struct.unpack("<HHIIHH", fmt[:16])
        if tag == EXTENSIBLE:
            if len(fmt) < 40 or fmt[26:] != GUID_TAIL:
                raise _not_wav(name, "an extensible header with an unknown sub-format")
            tag = struct.unpack("<H", fmt[24:26])[0]
        width = (bits + 7) // 8
        if tag not in (PCM, IEEE_FLOAT) or (tag == PCM and width not in (1, 2, 3, 4)) \
                or (tag == IEEE_FLOAT and width not in (4, 8)):
            raise _not_wav(name, f"format tag {tag} with {bits}-bit samples")
        if not 1 <= channels <= LIMITS.max_channels:
            raise MediaError(f"{name}: {channels} channels; expected 1 to {LIMITS.max_channels}")
        if align != channels * width:
            raise _not_wav(name, f"block align {align} for {channels} channels of {bits} bits")
        if not LIMITS.min_sample_rate <= rate <= LIMITS.max_sample_rate:
            raise MediaError(f"{name}: a sample rate of {rate} Hz; expected {LIMITS.min_sample_rate} to "
                             f"{LIMITS.max_sample_rate} Hz")
        wav = cls(f, name, channels, rate, width, tag == IEEE_FLOAT, start, size // align)
        if wav.num_frames / rate > LIMITS.max_audio_seconds:
            raise MediaError(f"{name}: {wav.num_frames / rate:.0f} s of audio; the limit is "
                             f"{LIMITS.max_audio_seconds:g} s")
        return wav

    def read(self, start=0, stop=None) -> np.ndarray:
        """Frames start..stop as float32 (channels, n), scaled as torchaudio.load does:
        int16 / 2**15, int24 / 2**23, int32 / 2**31, unsigned 8-bit (x - 128) / 128."""
        stop = self.num_frames if stop is None else min(stop, self.num_frames)
        start = max(0, min(start, stop))
        frame = self.channels * self.width
        self.file.seek(self.data_start + start * frame)
        raw = self.file.read((stop - start) * frame)
        raw = raw[: len(raw) // frame * frame]
        if self.is_float:
            x = np.frombuffer(raw, {4: "<f4", 8: "<f8"}[self.width]).astype(np.float32)
        elif self.width == 1:
            x = (np.frombuffer(raw, np.uint8).astype(np.float32) - 128.0) / 128.0
        elif self.width == 3:           # little-endian 24-bit: the 3 bytes in the top of an int32
            b = np.frombuffer(raw, np.uint8).reshape(-1, 3).astype(np.int32)
            x = ((b[:, 0] << 8) | (b[:, 1] << 16) | (b[:, 2] << 24)).astype(np.float32) / 2.0 ** 31
        else:
            x = np.frombuffer(raw, {2: "<i2", 4: "<i4"}[self.width]).astype(np.float32) / 2.0 ** (8 * self.width - 1)
        return x.reshape(-1, self.channels).T.copy()


def _not_wav(name, why):
    return MediaError(f"{name}: not a readable WAV file ({why}); only WAV (uncompressed PCM or float) is "
                      f"read, convert other formats first (e.g. with ffmpeg)")


# ---------------------------------------------------------------- GIF

@dataclass
class GifInfo:
    width: int              # the largest extent of the screen and of every frame
    height: int
    delays_ms: list         # per frame, as stored (0 where the file gives none)


def gif_info(f) -> GifInfo:
    """Walk a GIF's blocks without decoding any pixel: its size, frame count and delays,
    checked against LIMITS (pixels per frame, frames, frames x pixels)."""
    name = source_name(f)
    f.seek(0)
    head = f.read(13)
    if len(head) < 13 or head[:6] not in (b"GIF87a", b"GIF89a"):
        raise MediaError(f"{name}: not a GIF file (it starts with {head[:6]!r})")
    width, height, packed = struct.unpack("<HHB", head[6:11])
    if packed & 0x80:
        f.seek(3 << ((packed & 7) + 1), io.SEEK_CUR)        # the global colour table
    delays, delay = [], 0
    while True:
        tag = f.read(1)
        if not tag or tag == b";":
            break
        if tag == b"!":
            label, first = f.read(1), _skip_sub_blocks(f)
            if label == b"\xf9" and len(first) >= 3:        # graphic control extension
                delay = 10 * struct.unpack("<H", first[1:3])[0]
        elif tag == b",":
            desc = f.read(9)
            if len(desc) < 9:
                break
            left, top, w, h, packed = struct.unpack("<HHHHB", desc)
            width, height = max(width, left + w), max(height, top + h)
            if packed & 0x80:
                f.seek(3 << ((packed & 7) + 1), io.SEEK_CUR)
            f.read(1)                                       # LZW minimum code size
            _skip_sub_blocks(f)
            delays.append(delay)
            delay = 0
            if len(delays) > LIMITS.max_video_frames:
                raise MediaError(f"{name}: more than {LIMITS.max_video_frames} frames; the limit is "
                                 f"{LIMITS.max_video_frames}")
        # any other byte is junk between blocks; Pillow skips it too
    if not delays:
        raise MediaError(f"{name}: the GIF holds no frames")
    check_pixels(width, height, name, frames=len(delays))
    return GifInfo(width, height, delays)


def _skip_sub_blocks(f) -> bytes:
    """Skip a chain of data sub-blocks; returns the first one."""
    first = None
    while True:
        n = f.read(1)
        if not n or n[0] == 0:
            return first or b""
        if first is None:
            first = f.read(n[0])
        else:
            f.seek(n[0], io.SEEK_CUR)


def check_pixels(width, height, name, frames=1):
    if width * height > LIMITS.max_image_pixels:
        raise MediaError(f"{name}: {width}x{height} pixels per {'frame' if frames > 1 else 'image'}; the limit "
                         f"is {LIMITS.max_image_pixels} pixels (a decompression bomb, or scale it down first)")
    if frames * width * height > LIMITS.max_video_pixels:
        raise MediaError(f"{name}: {frames} frames of {width}x{height} pixels; the limit is "
                         f"{LIMITS.max_video_pixels} pixels in all (shorten it or scale it down first)")


# ---------------------------------------------------------------- video timing and GIF frames

GIF_SLOW_DELAY_MS = 100     # browsers show a GIF delay under 20 ms (often 0) as 100 ms; so do we


@dataclass
class VideoSource:
    """A video's frame times, with its frames decoded only when asked for."""
    name: str
    times: list             # when each frame starts, in seconds (Fractions)
    duration: float
    read: object            # [frame indices] -> {index: uint8 frame (H, W, 3)}

    @property
    def num_frames(self) -> int:
        return len(self.times)


def timed_video(name, n, fps, read, delays_ms=None) -> VideoSource:
    """A VideoSource of n frames, `fps` apart, or as long as the GIF delays say when fps is None."""
    if fps is not None or delays_ms is None:
        step = Fraction(fps or 8.0).limit_denominator(1000)
        return VideoSource(name, [k / step for k in range(n)], n / (fps or 8.0), read)
    delays_ms = [d if d >= 20 else GIF_SLOW_DELAY_MS for d in delays_ms]
    starts = np.concatenate([[0], np.cumsum(delays_ms)[:-1]])
    return VideoSource(name, [Fraction(int(t), 1000) for t in starts], sum(delays_ms) / 1000, read)


def gif_frames(data, name, picks) -> dict:
    """Decode a GIF frame by frame up to the last one picked, keeping only those."""
    want, out, k = set(picks), {}, -1
    if hasattr(data, "seek"):
        data.seek(0)
    with decoding(name, "GIF"), Image.open(data) as gif:
        for k, frame in enumerate(ImageSequence.Iterator(gif)):
            if k in want:
                out[k] = np.asarray(frame.convert("RGB"))
                if len(out) == len(want):
                    break
    if len(out) < len(want):
        raise MediaError(f"{name}: broken GIF: Pillow decodes {k + 1} frames, its blocks hold {max(want) + 1} or more")
    return out
