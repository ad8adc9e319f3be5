"""`minignext chat`, `minignext run` and `minignext download`: the any-to-any loop from a
terminal. The model is minignext.systems.nextgpt.NextGPT; this file only parses, saves and prints."""

import argparse
import sys
from pathlib import Path

from minignext import media
from minignext.presets import PRESETS, default_preset
from minignext.systems.nextgpt import Conversation, NextGPT


def add_generation_args(p):
    p.add_argument("--preset", default=None, help=f"one of {', '.join(PRESETS)} (default: {default_preset()})")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=None, help="diffusion steps (default: the preset's)")
    p.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance scale (default: the preset's, 7.5 for nextgpt-7b)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def generation_kwargs(args):
    kw = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
              seed=args.seed, guidance_scale=args.guidance, progress=not args.no_progress)
    if args.steps is not None:
        kw["num_inference_steps"] = args.steps
    return kw


def load_model(name) -> NextGPT:
    name = name or default_preset()
    print(f"loading preset {name!r} ...", file=sys.stderr)
    model = NextGPT.from_preset(name)
    if name == "tiny-random":
        print("note: the tiny-random preset has random weights; its text, images, sounds and videos "
              "are noise, and it will hardly ever ask for media by itself (`minignext run --force-response` "
              "and `minignext demo` show those routes). It shows the data flow, not a trained model.",
              file=sys.stderr)
    return model


def save_reply(reply, folder: Path, stem: str, overwrite=False) -> list[Path]:
    """Write a reply's images (PNG), audio (WAV) and videos (GIF) as folder/stem_<kind><i>.*"""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, img in enumerate(reply.images):
        path = folder / f"{stem}_image{i}.png"
        if path.exists() and not overwrite:
            raise FileExistsError(f"{path} exists; pass --overwrite to replace it")
        img.save(path)
        paths.append(path)
    for i, (wave, sr) in enumerate(reply.audios):
        paths.append(media.write_wav(folder / f"{stem}_audio{i}.wav", wave, sr, overwrite=overwrite))
    for i, frames in enumerate(reply.videos):
        paths.append(media.write_gif(folder / f"{stem}_video{i}.gif", frames, overwrite=overwrite))
    return paths


def transcript_entry(turn_no, user_text, attachments, reply, saved, folder: Path) -> str:
    lines = [f"## Turn {turn_no}", "", f"**User:** {user_text}"]
    lines += [f"- attached {kind}: `{src}`" for kind, src in attachments]
    lines += ["", f"**Assistant:** {reply.text or '(no text)'}", ""]
    for path in saved:
        rel = path.relative_to(folder) if path.is_relative_to(folder) else path
        lines.append(f"![{path.stem}]({rel})" if path.suffix in (".png", ".gif") else f"- audio: [{rel}]({rel})")
    lines += [f"> note: {n}" for n in reply.notices]
    return "\n".join(lines) + "\n\n"


# ---------------------------------------------------------------- minignext run

def run_main(argv=None):
    p = argparse.ArgumentParser(prog="minignext run", description="one exchange, written to a folder: "
                                "generated media plus transcript.md")
    p.add_argument("--prompt", required=True)
    p.add_argument("--image", action="append", default=[], help="an input image (repeatable)")
    p.add_argument("--audio", action="append", default=[], help="an input WAV file (repeatable)")
    p.add_argument("--video", action="append", default=[], help="an input GIF or frame folder (repeatable)")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--overwrite", action="store_true", help="replace files from an earlier run")
    p.add_argument("--force-response", default=None,
                   help="teacher-force this answer instead of sampling one (for lessons and tests: random "
                        "weights never emit signal tokens by themselves), e.g. 'Here: [IMG0][IMG1][IMG2][IMG3]'")
    add_generation_args(p)
    args = p.parse_args(argv)
    transcript = args.out / "transcript.md"
    if transcript.exists() and not args.overwrite:
        raise FileExistsError(f"{transcript} exists; choose another --out or pass --overwrite")
    attachments = [(k, s) for k in ("image", "audio", "video") for s in getattr(args, k)]
    for _, src in attachments:
        if not Path(src).exists():
            raise FileNotFoundError(f"{src}: no such file")
    model = load_model(args.preset)
    conv = Conversation().user(args.prompt, image=args.image, audio=args.audio, video=args.video)
    reply = model.chat(conv, force_response=args.force_response, **generation_kwargs(args))
    saved = save_reply(reply, args.out, "reply", overwrite=args.overwrite)
    text = f"# minignext run ({args.preset or default_preset()})\n\n"
    text += transcript_entry(1, args.prompt, attachments, reply, saved, args.out)
    transcript.write_text(text)
    print(reply.text)
    for n in reply.notices:
        print(f"note: {n}", file=sys.stderr)
    for path in saved + [transcript]:
        print(f"wrote {path}")


# ---------------------------------------------------------------- minignext chat

HELP = """commands: /image PATH, /audio PATH, /video PATH attach a file to your next message;
/reset starts over; /quit ends. Anything else is your message."""


def chat_main(argv=None):
    p = argparse.ArgumentParser(prog="minignext chat", description="interactive multi-turn any-to-any chat")
    p.add_argument("--out", type=Path, default=None, help="where generated media go (default: a fresh out/chat-N)")
    add_generation_args(p)
    args = p.parse_args(argv)
    out = args.out or fresh_folder(Path("out") / "chat")
    model = load_model(args.preset)
    conv, pending, turn = Conversation(), {"image": [], "audio": [], "video": []}, 0
    print(HELP)
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            break
        if not line:
            continue
        if line in ("/quit", "/exit"):
            break
        if line == "/reset":
            conv, pending = Conversation(), {k: [] for k in pending}
            print("(conversation cleared)")
            continue
        if line.startswith("/"):
            cmd, _, arg = line.partition(" ")
            kind = cmd[1:]
            if kind not in pending or not arg.strip():
                print(HELP)
            elif not Path(arg.strip()).expanduser().exists():
                print(f"error: {arg.strip()}: no such file")
            else:
                pending[kind].append(str(Path(arg.strip()).expanduser()))
                print(f"(attached {kind} {arg.strip()})")
            continue
        turn += 1
        conv.user(line, **pending)
        pending = {k: [] for k in pending}
        try:
            reply = model.chat(conv, **generation_kwargs(args))
        except (ValueError, FileNotFoundError) as e:
            conv.turns.pop()
            print(f"error: {e}")
            continue
        print(f"assistant> {reply.text}")
        for n in reply.notices:
            print(f"note: {n}")
        for path in save_reply(reply, out, f"turn{turn}"):
            print(f"(saved {path})")


def fresh_folder(base: Path) -> Path:
    """base if it does not exist or is empty, else base-2, base-3, ..."""
    candidate, n = base, 1
    while candidate.exists() and any(candidate.iterdir()):
        n += 1
        candidate = base.with_name(f"{base.name}-{n}")
    return candidate


# ---------------------------------------------------------------- minignext download

def download_main(argv=None):
    p = argparse.ArgumentParser(prog="minignext download", description="fetch the weights of a preset")
    p.add_argument("preset", choices=list(PRESETS))
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--dry-run", action="store_true",
                   help="only list the repositories, files and sizes, and the memory each stage needs")
    args = p.parse_args(argv)
    from minignext.presets import download_preset, dry_run
    for line in dry_run(args.preset) if args.dry_run else download_preset(args.preset, overwrite=args.overwrite):
        print(line)
