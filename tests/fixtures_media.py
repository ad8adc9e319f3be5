"""Media files for the reliability tests, written byte by byte where a library would refuse to:
decompression bombs, a GIF whose frames claim a huge screen, WAV headers with a 1 Hz rate or
WAVE_FORMAT_EXTENSIBLE, 16-bit PNGs, GIFs with their own timing; and a deterministic fuzzer
that corrupts PNG, GIF, WAV and safetensors files and judges each result.

Run as a script (`python tests/fixtures_media.py FOLDER`) it fuzzes in a fresh process, so a
test can hold it to a memory cap (RLIMIT_AS) and a time limit, and prints its counts as JSON.
"""

import json
import struct
import sys
import time
import zlib
from pathlib import Path

import numpy as np


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png(path, side=20000) -> Path:
    """A 1-bit grey PNG of side x side zero pixels: about 50 KB on disk, 400 M pixels decoded."""
    z, row, body = zlib.compressobj(9), bytes(1 + (side + 7) // 8), []
    for _ in range(side // 500):
        body.append(z.compress(row * 500))
    body.append(z.flush())
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    Path(path).write_bytes(b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", b"".join(body))
                           + png_chunk(b"IEND", b""))
    return Path(path)


ONE_PIXEL_LZW = bytes([2, 2, 0x44, 0x01, 0])     # min code size 2; clear, colour 0, end; terminator


def gif_bytes(screen, frames, delay_cs=10) -> bytes:
    """A GIF89a of `frames` one-pixel frames (colour 0) on a screen x screen canvas."""
    out = [b"GIF89a", struct.pack("<HHBBB", screen, screen, 0x80, 0, 0), bytes([0, 0, 0, 255, 255, 255])]
    for _ in range(frames):
        out.append(b"\x21\xf9\x04\x00" + struct.pack("<H", delay_cs) + b"\x00\x00")    # graphic control
        out.append(b"\x2c" + struct.pack("<HHHHB", 0, 0, 1, 1, 0) + ONE_PIXEL_LZW)       # image descriptor
    return b"".join(out) + b";"


def wav_bytes(samples, rate, extensible=False, float32=False, channels=1) -> bytes:
    """A WAV of int16 (or float32) samples; extensible=True writes WAVE_FORMAT_EXTENSIBLE with the PCM GUID."""
    data = np.asarray(samples, "<f4" if float32 else "<i2").tobytes()
    width = 4 if float32 else 2
    tag = 3 if float32 else 1
    fmt = struct.pack("<HHIIHH", 0xFFFE if extensible else tag, channels, rate, rate * channels * width,
                      channels * width, 8 * width)
    if extensible:
        guid = struct.pack("<H", tag) + bytes.fromhex("000000001000800000aa00389b71")
        fmt += struct.pack("<HHI", 22, 8 * width, 4) + guid
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", len(data)) + data
    return b"RIFF" + struct.pack("<I", len(body)) + body


def tone(seconds, rate, freq=440.0) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (8000 * np.sin(2 * np.pi * freq * t)).astype(np.int16)


# ---------------------------------------------------------------- fuzzing

def mutants(data: bytes, n: int, seed: int):
    """n corrupted copies of `data`: truncated, bit-flipped, header bytes overwritten, a span
    deleted or repeated, a length field set huge; deterministic for a seed."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        b = bytearray(data)
        kind = i % 6
        if kind == 0:
            b = b[: int(rng.integers(0, len(b)))]
        elif kind == 1:
            for _ in range(int(rng.integers(1, 9))):
                pos = int(rng.integers(0, len(b)))
                b[pos] ^= 1 << int(rng.integers(0, 8))
        elif kind == 2:
            pos = int(rng.integers(0, min(64, len(b))))
            b[pos: pos + 4] = rng.integers(0, 256, 4, dtype=np.uint8).tobytes()
        elif kind == 3:
            a = int(rng.integers(0, len(b)))
            del b[a: a + int(rng.integers(1, 64))]
        elif kind == 4:
            a = int(rng.integers(0, len(b)))
            b[a:a] = b[a: a + int(rng.integers(1, 64))] * int(rng.integers(2, 50))
        else:
            pos = int(rng.integers(0, max(1, min(len(b) - 4, 200))))
            b[pos: pos + 4] = struct.pack("<I", int(rng.choice([0, 1, 2 ** 31 - 1, 2 ** 32 - 1, 0xFFFF])))
        yield bytes(b)


def base_files(folder: Path) -> dict:
    """One small valid file per format, and the function that reads it as the CLI does."""
    import torch
    from PIL import Image

    from minignext import media, weights

    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (24, 20, 3), dtype=np.uint8)).save(folder / "base.png")
    frames = rng.integers(0, 256, (6, 12, 10, 3), dtype=np.uint8)
    media.write_gif(folder / "base.gif", frames, fps=4)
    (folder / "base.wav").write_bytes(wav_bytes(tone(0.5, 8000), 8000))
    module = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    weights.save_safetensors(module.state_dict(), folder / "base.safetensors")

    def image(path):
        return media.preprocess_image(media.load_image(path), size=16)

    def video(path):
        return media.video_to_imagebind_clips(path, size=8, crops=1)

    def audio(path):
        return media.audio_to_imagebind(path, num_mel_bins=32, target_length=50)

    def safetensors(path):
        fresh = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
        weights.load_into(fresh, weights.load_safetensors(path))
        return torch.cat([p.flatten() for p in fresh.state_dict().values()])

    return {"png": image, "gif": video, "wav": audio, "safetensors": safetensors}


def fuzz(folder, per_format=210) -> dict:
    """Every mutant through the reader of its format: {format: {outcome: count}}. An outcome is
    'error' (a ValueError or WeightsError that names the file), 'ok' (a finite tensor), or
    anything else, which is a failure: 'unnamed' errors, 'nonfinite' results, 'raised <type>'."""
    from minignext.weights import WeightsError

    folder = Path(folder)
    readers = base_files(folder)
    counts, slowest = {}, 0.0
    for fmt, read in readers.items():
        tally = counts.setdefault(fmt, {})
        data = (folder / f"base.{fmt}").read_bytes()
        for i, blob in enumerate(mutants(data, per_format, seed=len(fmt))):
            path = folder / f"m{i}.{fmt}"
            path.write_bytes(blob)
            start = time.perf_counter()
            try:
                out = read(path)
                outcome = "ok" if bool(out.isfinite().all()) else "nonfinite"
            except (ValueError, WeightsError) as e:
                outcome = "error" if str(path) in str(e) or isinstance(e, WeightsError) else "unnamed"
                if outcome == "unnamed":
                    print(f"{path}: {e}", file=sys.stderr)
            except Exception as e:      # noqa: BLE001  (what the test is looking for)
                outcome = f"raised {type(e).__name__}"
                print(f"{path}: {type(e).__name__}: {e}", file=sys.stderr)
            slowest = max(slowest, time.perf_counter() - start)
            tally[outcome] = tally.get(outcome, 0) + 1
            path.unlink()
    return {"counts": counts, "slowest_s": round(slowest, 3)}


if __name__ == "__main__":
    print(json.dumps(fuzz(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 210)))
