"""`minignext chat`, `minignext run` and `minignext download`: the any-to-any loop from a
terminal. The model is minignext.systems.nextgpt.NextGPT; this file only parses, saves and prints.

Options are checked as they are parsed, and the output folder is claimed before the model
loads, so a mistake costs a second, not a generation. Files are written atomically and never
replace an earlier run's without --overwrite. A chat survives its turns: an error or Ctrl-C
ends the turn, not the session, and the transcript is saved after every answer.
"""

import argparse
import math
import sys
import traceback
from pathlib import Path

from minignext import media
from minignext.presets import PRESETS, TOY_DIR, default_preset
from minignext.systems.nextgpt import Conversation, NextGPT
from minignext.utils import atomic_write, claim_file, fresh_folder


def number(kind, low, high=None, above=False):
    """An argparse type: an int or a finite float >= low (> low if `above`) and <= high."""
    want = f"{'an integer' if kind is int else 'a number'} {'>' if above else '>='} {low}" + \
        (f" and <= {high}" if high is not None else "")

    def parse(text):
        try:
            x = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {want}") from None
        if not math.isfinite(x) or x < low or (above and x == low) or (high is not None and x > high):
            raise argparse.ArgumentTypeError(f"{text!r} is not {want}")
        return x
    return parse


def message_text(text):
    if not text.strip():
        raise argparse.ArgumentTypeError("the prompt is empty; write what you want to ask")
    return text


def add_generation_args(p):
    p.add_argument("--preset", default=None, help=f"one of {', '.join(PRESETS)} (default: {default_preset()})")
    p.add_argument("--max-new-tokens", type=number(int, 1), default=64)
    p.add_argument("--temperature", type=number(float, 0), default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=number(float, 0, 1, above=True), default=1.0)
    p.add_argument("--seed", type=number(int, 0, 2 ** 63 - 1), default=0)
    p.add_argument("--steps", type=number(int, 1), default=None, help="diffusion steps (default: the preset's)")
    p.add_argument("--guidance", type=number(float, 0), default=None,
                   help="classifier-free guidance scale, 0 or 1 for none (default: the preset's, 7.5 for nextgpt-7b)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--system", default=None, help="a system message that opens every prompt "
                   "(default: the preset's own, none for most; '' for none)")


def generation_kwargs(args):
    kw = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
              seed=args.seed, guidance_scale=args.guidance, progress=not args.no_progress)
    if args.steps is not None:
        kw["num_inference_steps"] = args.steps
    return kw


def load_model(name, system=None) -> NextGPT:
    """The preset `name` (default: default_preset()), with `system` as its system message unless None."""
    chosen, name = name, name or default_preset()
    print(f"loading preset {name!r} ...", file=sys.stderr)
    model = NextGPT.from_preset(name)
    if system is not None:
        model.system = system
    if name == "tiny-random":
        why = "" if chosen else f"the default, as the toy weights ({TOY_DIR / 'nextgpt'}) are not there: "
        print(f"note: {why}the tiny-random preset has random weights; its text, images, sounds and videos "
              "are noise, and it will hardly ever ask for media by itself (`minignext run --force-response` "
              "and `minignext demo` show those routes). It shows the data flow, not a trained model.",
              file=sys.stderr)
    return model


def save_reply(reply, folder: Path, stem: str, overwrite=False) -> list[Path]:
    """Write a reply's images (PNG), audio (WAV) and videos (GIF) as folder/stem_<kind><i>.*, each
    atomically; if one fails, none of them stays."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    try:
        for i, img in enumerate(reply.images):
            paths.append(media.write_image(folder / f"{stem}_image{i}.png", img, overwrite=overwrite))
        for i, (wave, sr) in enumerate(reply.audios):
            paths.append(media.write_wav(folder / f"{stem}_audio{i}.wav", wave, sr, overwrite=overwrite))
        for i, frames in enumerate(reply.videos):
            paths.append(media.write_gif(folder / f"{stem}_video{i}.gif", frames, overwrite=overwrite))
    except BaseException:
        for path in paths:
            path.unlink(missing_ok=True)
        raise
    return paths


def claim_output(folder: Path, overwrite: bool, stem: str) -> Path:
    """Make --out ours before the model loads: created, holding no transcript.md or stem* file of an
    earlier run (unless overwrite), and its transcript.md claimed, so a second run into the same
    folder stops here instead of replacing the first one's files."""
    folder.mkdir(parents=True, exist_ok=True)
    if overwrite:
        return folder
    earlier = sorted(p.name for p in folder.iterdir() if p.name.startswith(stem))
    if not earlier:
        try:
            claim_file(folder / "transcript.md")
            return folder
        except FileExistsError:
            earlier = ["transcript.md"]
    shown = ", ".join(earlier[:3]) + (", ..." if len(earlier) > 3 else "")
    raise FileExistsError(f"{folder} already holds an earlier run's files ({shown}); choose another --out or "
                          f"pass --overwrite")


def release(folder: Path):
    """Give back a claimed transcript.md that was never written."""
    path = folder / "transcript.md"
    if path.is_file() and path.stat().st_size == 0:
        path.unlink()


def check_inputs(attachments):
    """Each input exists and is a file or a pipe (a video may also be a folder of frames); nothing is read."""
    for kind, src in attachments:
        if not (kind == "video" and Path(src).expanduser().is_dir()):
            media.check_media_path(src)


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
    p.add_argument("--prompt", required=True, type=message_text)
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
    attachments = [(k, s) for k in ("image", "audio", "video") for s in getattr(args, k)]
    check_inputs(attachments)
    out = claim_output(args.out, args.overwrite, "reply")
    try:
        model = load_model(args.preset, args.system)
        conv = Conversation().user(args.prompt, image=args.image, audio=args.audio, video=args.video)
        reply = model.chat(conv, force_response=args.force_response, **generation_kwargs(args))
        saved = save_reply(reply, out, "reply", overwrite=args.overwrite)
    except BaseException:
        release(out)
        raise
    transcript = out / "transcript.md"
    with atomic_write(transcript, overwrite=True) as tmp:
        tmp.write_text(f"# minignext run ({args.preset or default_preset()})\n\n"
                       + transcript_entry(1, args.prompt, attachments, reply, saved, out))
    print(reply.text)
    for n in reply.notices:
        print(f"note: {n}", file=sys.stderr)
    for path in saved + [transcript]:
        print(f"wrote {path}")


# ---------------------------------------------------------------- minignext chat

HELP = """commands: /image PATH, /audio PATH, /video PATH attach a file to your next message;
/reset starts over; /quit (or Ctrl-D) ends. Ctrl-C stops an answer. Anything else is your message."""


def chat_main(argv=None):
    p = argparse.ArgumentParser(prog="minignext chat", description="interactive multi-turn any-to-any chat")
    p.add_argument("--out", type=Path, default=None,
                   help="where the transcript and generated media go (default: a fresh out/chat-N)")
    p.add_argument("--overwrite", action="store_true", help="write into --out even if it holds an earlier chat")
    add_generation_args(p)
    args = p.parse_args(argv)
    out = fresh_folder(Path("out") / "chat") if args.out is None else claim_output(args.out, args.overwrite, "turn")
    try:
        model = load_model(args.preset, args.system)
    except BaseException:
        release(out)
        raise
    session = ChatSession(model, out, args)
    print(f"{HELP}\n(the transcript goes to {out / 'transcript.md'})")
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            break
        except KeyboardInterrupt:
            print("\n(/quit or Ctrl-D ends the chat)")
            continue
        if line in ("/quit", "/exit"):
            break
        if line:
            session.handle(line)
    release(out)


class ChatSession:
    """The conversation of `minignext chat`: attachments, turns, the transcript."""

    def __init__(self, model, out: Path, args):
        self.model, self.out, self.args = model, out, args
        self.conv, self.pending, self.turn = Conversation(), {"image": [], "audio": [], "video": []}, 0
        self.transcript = f"# minignext chat ({args.preset or default_preset()})\n\n"

    def handle(self, line):
        if line == "/reset":
            self.conv, self.pending = Conversation(), {k: [] for k in self.pending}
            self.transcript += "*(conversation cleared)*\n\n"
            print("(conversation cleared)")
        elif line.startswith("/"):
            self.attach(*line[1:].partition(" ")[::2])
        else:
            self.answer(line)

    def attach(self, kind, arg):
        path = arg.strip()
        if kind not in self.pending or not path:
            print(HELP)
            return
        try:
            check_inputs([(kind, path)])
        except (OSError, ValueError) as e:
            print(f"error: {e}")
            return
        self.pending[kind].append(str(Path(path).expanduser()))
        print(f"(attached {kind} {path})")

    def answer(self, line):
        """One turn: an error or Ctrl-C drops it (and its attachments) and the chat goes on."""
        from minignext.cli import user_error

        attachments = [(k, src) for k, srcs in self.pending.items() for src in srcs]
        message = self.conv.user(line, **self.pending).turns[-1]
        self.pending = {k: [] for k in self.pending}
        try:
            reply = self.model.chat(self.conv, **generation_kwargs(self.args))
            saved = save_reply(reply, self.out, f"turn{self.turn + 1}", overwrite=self.args.overwrite)
        except KeyboardInterrupt:
            self.forget(message)
            print("\n(answer cancelled; the chat goes on as before that message)")
            return
        except Exception as e:
            self.forget(message)
            reason = user_error(e)
            if reason is None:
                traceback.print_exc()
                reason = f"unexpected {type(e).__name__}: {e} (a bug; the chat goes on)"
            print(f"error: {reason}")
            return
        self.turn += 1
        print(f"assistant> {reply.text}")
        for n in reply.notices:
            print(f"note: {n}")
        for path in saved:
            print(f"(saved {path})")
        self.transcript += transcript_entry(self.turn, line, attachments, reply, saved, self.out)
        with atomic_write(self.out / "transcript.md", overwrite=True) as tmp:
            tmp.write_text(self.transcript)

    def forget(self, message):
        """Drop `message` and whatever the failed turn added after it."""
        turns = self.conv.turns
        del turns[next(i for i, t in enumerate(turns) if t is message):]


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
