"""`minignext demo`: a scripted any-to-any conversation, written to a folder with every
generated image (PNG), sound (WAV) and video (GIF), transcript.md and a self-contained
index.html (media inlined as base64) to open in a browser.

It runs on the default preset: "smol" (NExT-GPT's recipe on SmolLM2, a pretrained LLM) when its
delta and base are at hand, else "toy" (everything trained from scratch on the toy world), both with
a seven-turn conversation in the words each understands; otherwise "tiny-random", whose weights are
random, so its words and media are noise and its answers are scripted (teacher-forced) to show every
route through the loop.
"""

import argparse
import base64
import html
import math
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from minignext import media
from minignext.chat import number, save_reply, transcript_entry
from minignext.presets import default_preset
from minignext.systems.nextgpt import Conversation, NextGPT, signal_token_names
from minignext.utils import atomic_write, fresh_folder


def script(inputs):
    """(user text, attachments, forced answer for random weights, no expectation) per turn."""
    img, aud, vid = ("".join(signal_token_names(m)) for m in ("image", "audio", "video"))
    return [
        ("What is in this picture? Draw me another one.", {"image": inputs["image"]},
         f"A red circle on a blue background. Here is another: {img}", None),
        ("What do you hear? Play something similar.", {"audio": inputs["audio"]},
         f"A tone that rises. Listen: {aud}", None),
        ("What happens in this video? Make one like it.", {"video": inputs["video"]},
         f"A square moves to the right. Here is a new clip: {vid}", None),
        ("Now show the first picture as a sound.", {},
         f"The circle as a tone: {aud}", None),
    ]


# The conversation on a trained preset: every input and output modality, one image -> audio turn and
# two follow-ups. Each turn: (user text, what it attaches, what a right answer names and makes), in the
# form of minignext/toy/data/user_heldout.json; tests/test_demo.py judges every turn with the checkers.
RED_CIRCLE = {"text": {"colour": "red", "shape": "circle"}, "make": []}
EXPECT = (
    RED_CIRCLE, {"text": {}, "make": [{"modality": "audio", "pitch": "deep", "contour": "wobbly"}]},
    {"text": {"pitch": "bright", "contour": "steady"}, "make": []},
    {"text": {"colour": "green", "shape": "triangle", "direction": "right"}, "make": []},
    {"text": {}, "make": [{"modality": "image", "colour": "yellow", "shape": "square"}]},
    {"text": {}, "make": [{"modality": "video", "colour": "yellow", "shape": "square", "direction": "left"}]},
    {"text": {"colour": "red"}, "make": []},
)
WORDS = {    # the toy preset knows only its world's grammar; smol, a pretrained LLM, a user's own words
    "toy": [("what is in this picture?", "image"), ("what does this picture sound like?", "image"),
            ("what do you hear?", "audio"), ("what happens in this video?", "video"), ("draw a yellow square.", None),
            ("now make it move left.", None), ("what colour was the first one?", None)],
    "smol": [("Hi! What's in this picture?", "image"), ("What would it sound like? Play it for me.", None),
             ("And what do you hear in this clip?", "audio"), ("Describe what happens in this video.", "video"),
             ("Please draw a yellow square.", None), ("Now make it move left.", None),
             ("What colour was the first picture I showed you?", None)],
}


def world_script(preset, inputs):
    """(user text, attachments, None, expectation) per turn of a trained preset's conversation."""
    return [(text, {kind: inputs[kind]} if kind else {}, None, expect)
            for (text, kind), expect in zip(WORDS[preset], EXPECT)]


def toy_inputs(folder: Path, overwrite=False) -> dict:
    """A picture, a tone and a clip rendered by the toy world, which the toy preset was trained on."""
    from minignext.toy import world

    folder.mkdir(parents=True, exist_ok=True)
    rng = world.make_rng(0)
    media.write_image(folder / "input_image.png", world.render_image(world.Obj("red", "circle"), rng), overwrite)
    media.write_wav(folder / "input_audio.wav", world.render_audio(world.Obj("blue", "square"), rng),
                    world.SAMPLE_RATE, overwrite=overwrite)
    media.write_gif(folder / "input_video.gif", world.render_video(world.Obj("green", "triangle"), "right", rng),
                    fps=8, overwrite=overwrite)
    return {"image": folder / "input_image.png", "audio": folder / "input_audio.wav",
            "video": folder / "input_video.gif"}


def make_inputs(folder: Path, overwrite=False) -> dict:
    """A picture, a tone and a short clip drawn procedurally, saved as the demo's inputs."""
    folder.mkdir(parents=True, exist_ok=True)
    img = Image.new("RGB", (64, 64), (30, 60, 200))
    ImageDraw.Draw(img).ellipse((16, 16, 48, 48), fill=(220, 30, 30))
    media.write_image(folder / "input_image.png", img, overwrite)
    sr, seconds = 16000, 2.0
    t = np.arange(int(sr * seconds)) / sr
    tone = 0.3 * np.sin(2 * math.pi * (300 * t + 150 * t ** 2)).astype(np.float32)
    media.write_wav(folder / "input_audio.wav", tone, sr, overwrite=overwrite)
    frames = []
    for k in range(16):
        frame = Image.new("RGB", (64, 64), (240, 240, 240))
        ImageDraw.Draw(frame).rectangle((4 + 3 * k, 24, 20 + 3 * k, 40), fill=(30, 150, 30))
        frames.append(np.asarray(frame))
    media.write_gif(folder / "input_video.gif", np.stack(frames), fps=8, overwrite=overwrite)
    return {"image": folder / "input_image.png", "audio": folder / "input_audio.wav",
            "video": folder / "input_video.gif"}


def inline(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    if path.suffix == ".wav":
        return f'<audio controls src="data:audio/wav;base64,{data}"></audio>'
    mime = "image/gif" if path.suffix == ".gif" else "image/png"
    return f'<img src="data:{mime};base64,{data}" style="height:128px;image-rendering:pixelated">'


def html_page(title, note, turns) -> str:
    body = [f"<h1>{html.escape(title)}</h1>", f"<p><em>{html.escape(note)}</em></p>"]
    for i, (user, attached, reply, saved) in enumerate(turns, 1):
        body.append(f"<h2>Turn {i}</h2><p><b>User:</b> {html.escape(user)}</p>")
        body += [inline(p) for p in attached]
        body.append(f"<p><b>Assistant:</b> {html.escape(reply.text or '(no text)')}</p>")
        body += [inline(p) for p in saved]
        body += [f"<p><small>note: {html.escape(n)}</small></p>" for n in reply.notices]
    return ("<!doctype html><html><head><meta charset='utf-8'><title>minignext demo</title></head>"
            "<body style='font-family:sans-serif;max-width:800px;margin:auto'>" + "\n".join(body) + "</body></html>")


def run_demo(preset, out: Path, steps=None, overwrite=False, progress=True) -> list:
    """The demo's conversation on `preset`, written into `out`; returns per turn (user text, attached
    files, the Reply, the files written, what a right answer names and makes, or None)."""
    scripted = preset == "tiny-random"
    note = ("tiny-random: every weight is random, so the text, pictures, sounds and videos are noise, and the "
            "answers are scripted (teacher-forced) to show each route through the loop."
            if scripted else f"preset {preset}: answers generated by the model.")
    print(f"minignext demo on preset {preset!r}. {note}", file=sys.stderr)
    model = NextGPT.from_preset(preset)
    world_preset = preset in WORDS
    inputs = (toy_inputs if world_preset else make_inputs)(out, overwrite=overwrite)
    conv, turns, transcript = Conversation(), [], f"# minignext demo ({preset})\n\n{note}\n\n"
    for i, (text, attach, forced, expect) in enumerate(world_script(preset, inputs) if world_preset
                                                      else script(inputs), 1):
        print(f"\nyou> {text} {' '.join(f'[{k}: {v.name}]' for k, v in attach.items())}")
        conv.user(text, **attach)
        reply = model.chat(conv, force_response=forced if scripted else None, num_inference_steps=steps,
                           progress=progress)
        saved = save_reply(reply, out, f"turn{i}", overwrite=overwrite)
        print(f"assistant> {reply.text}")
        for n in reply.notices:
            print(f"note: {n}")
        for path in saved:
            print(f"  wrote {path}")
        turns.append((text, list(attach.values()), reply, saved, expect))
        transcript += transcript_entry(i, text, [(k, v.name) for k, v in attach.items()], reply, saved, out)
    page = html_page(f"minignext demo ({preset})", note, [t[:4] for t in turns])
    for name, text in (("transcript.md", transcript), ("index.html", page)):
        with atomic_write(out / name, overwrite=True) as tmp:
            tmp.write_text(text)
    print(f"\nwrote {out / 'transcript.md'} and {out / 'index.html'} (open it in a browser)")
    return turns


def main(argv=None):
    p = argparse.ArgumentParser(prog="minignext demo", description=__doc__.splitlines()[0])
    p.add_argument("--preset", default=None, help=f"default: {default_preset()}")
    p.add_argument("--out", type=Path, default=Path("out") / "demo",
                   help="output folder; if it holds an earlier run, a fresh numbered one is used")
    p.add_argument("--overwrite", action="store_true", help="write into --out even if it holds files")
    p.add_argument("--steps", type=number(int, 1), default=None, help="diffusion steps (default: the preset's)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    preset = args.preset or default_preset()
    out = args.out if args.overwrite else fresh_folder(args.out)      # claimed: parallel demos never share one
    out.mkdir(parents=True, exist_ok=True)
    run_demo(preset, out, args.steps, args.overwrite, not args.no_progress)
    return out
