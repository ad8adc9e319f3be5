"""`minignext serve`: the any-to-any chat as a live page in the browser, to show NExT-GPT to a class.

One model per server, loaded once. Each browser tab holds its own conversation, with its own
folder for what it uploads and what the model makes. One worker thread runs the requests in the
order they came; the others wait in a queue and are told their place. The page follows its
request as Server-Sent Events: its place in the queue, then each phase and step of the work
(NextGPT.chat's on_progress), then the answer.

The standard library is enough for this (http.server, threading, json), so serving adds no
dependency; the page (minignext/web/) is plain HTML, CSS and JavaScript that loads nothing from
the internet.

    GET  /                                  the page; /web/app.js and /web/style.css beside it
    GET  /api/config                        the preset and the upload limit
    POST /api/conversations                 a new conversation -> {"id"}
    POST /api/conversations/ID/uploads?kind=image|audio|video|auto&name=FILE, the file as the body
                                            -> {"upload", "kind", "name", "url"}; 400 or 413 with the reason
    POST /api/conversations/ID/messages     {"text", "uploads": [...]} -> {"job", "position"}
    GET  /api/jobs/JOB/events               text/event-stream: queued, started, progress, reply or failed
    GET  /files/ID/PATH                     a file from that conversation's folder
"""

import argparse
import json
import re
import secrets
import sys
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

from PIL import Image

from minignext.chat import add_generation_args, generation_kwargs, load_model, save_reply
from minignext.presets import default_preset
from minignext.systems.nextgpt import MODALITIES, PROJECTION_NAMES, Conversation, encoder_input, signal_token_names
from minignext.weights import WeightsError

WEB = Path(__file__).parent / "web"
CONTENT_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                 ".css": "text/css; charset=utf-8", ".png": "image/png", ".gif": "image/gif", ".jpg": "image/jpeg",
                 ".jpeg": "image/jpeg", ".webp": "image/webp", ".bmp": "image/bmp", ".wav": "audio/wav"}
LOOPBACK = ("127.0.0.1", "localhost")
MAX_MESSAGE_BYTES = 64 * 1024
USER_ERRORS = (ValueError, FileNotFoundError, WeightsError)     # said to the page as they are


class HTTPError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass
class Session:
    """One browser tab's conversation and the folder its uploads and outputs go to."""
    id: str
    folder: Path
    conversation: Conversation = field(default_factory=Conversation)
    uploads: dict = field(default_factory=dict)        # upload id -> (kind, path)
    turns: int = 0
    busy: bool = False                                  # a message of this tab is queued or running


class Job:
    """One message on its way to an answer. Its events are kept, so a stream that reconnects
    resumes where it broke off."""

    def __init__(self, session: Session, text: str, media: list):
        self.id = secrets.token_hex(8)
        self.session, self.text, self.media = session, text, media
        self.events, self.done = [], False
        self.position = None                       # place in the queue last told; 0 means next
        self.changed = threading.Condition()

    def emit(self, name, **data):
        with self.changed:
            self.events.append((name, {"time": time.time(), **data}))
            self.done = name in ("reply", "failed")
            self.changed.notify_all()

    def queued(self, position: int):
        """Tell the page its place in the queue, only when that place changed."""
        if position != self.position:
            self.position = position
            self.emit("queued", position=position)

    def follow(self, start=0, heartbeat=15.0):
        """(index, name, data) of each event from `start` on as it comes, until the last one;
        None after `heartbeat` seconds without news."""
        i = start
        while True:
            with self.changed:
                if not self.changed.wait_for(lambda: len(self.events) > i or self.done, timeout=heartbeat):
                    yield None
                    continue
                new, finished = self.events[i:], self.done
            for name, data in new:
                yield i, name, data
                i += 1
            if finished:
                return


class App:
    """The model, the conversations, and the queue in front of the model."""

    def __init__(self, model, out: Path, preset: str, max_upload_bytes: int, chat_kwargs: dict):
        self.model, self.out, self.preset = model, Path(out), preset
        self.max_upload_bytes, self.chat_kwargs = max_upload_bytes, chat_kwargs
        self.sessions, self.jobs = {}, {}
        self.lock = threading.Lock()
        self.wake = threading.Condition(self.lock)
        self.pending, self.running = deque(), None
        threading.Thread(target=self._work, name="model", daemon=True).start()

    def config(self) -> dict:
        return {"preset": self.preset, "max_upload_bytes": self.max_upload_bytes,
                "decoders": sorted(self.model.decoder_loaders), "reads_media": self.model.visual_encoder is not None}

    def new_session(self) -> Session:
        """A conversation whose folder is new: made with exist_ok=False, so two never share one."""
        while True:
            sid = secrets.token_hex(8)
            folder = self.out / f"{time.strftime('%Y%m%d-%H%M%S')}-{sid}"
            try:
                folder.mkdir(parents=True, exist_ok=False)
            except FileExistsError:
                continue
            with self.lock:
                self.sessions[sid] = session = Session(sid, folder)
            return session

    def session(self, sid) -> Session:
        with self.lock:
            if sid not in self.sessions:
                raise HTTPError(404, "no such conversation (the server may have restarted); start a new one")
            return self.sessions[sid]

    # ------------------------------------------------------------ uploads

    def add_upload(self, session: Session, kind: str, name: str, body: bytes) -> dict:
        """Keep an uploaded file in the conversation's folder if the model can read it: the file is
        loaded and preprocessed exactly as a path given to `minignext chat` or `run` is."""
        if kind not in (*MODALITIES, "auto"):
            raise HTTPError(400, f"unknown kind {kind!r}; expected image, audio, video or auto")
        if self.model.visual_encoder is None:
            raise HTTPError(400, "this model has no encoder; it reads text only")
        with self.lock:
            number = len(session.uploads) + 1
            upload = f"u{number}"
            path = session.folder / "uploads" / f"{number:02d}-{safe_name(name)}"
            path.parent.mkdir(exist_ok=True)
            path.write_bytes(body)
            session.uploads[upload] = None          # the number is taken, the file not accepted yet
        try:
            kind = sniff_kind(path) if kind == "auto" else kind
            encoder_input(self.model.visual_encoder, kind, path)
        except USER_ERRORS as e:
            path.unlink()
            raise HTTPError(400, str(e).replace(str(path), name)) from None
        session.uploads[upload] = (kind, path)
        return {"upload": upload, "kind": kind, "name": name, "url": file_url(session, path)}

    # ------------------------------------------------------------ the queue and the worker

    def submit(self, session: Session, text: str, uploads: list) -> tuple:
        text = text.strip() if isinstance(text, str) else ""
        if not text:
            raise HTTPError(400, "the message is empty; write something to send")
        unknown = [u for u in uploads if not session.uploads.get(u)]
        if unknown:
            raise HTTPError(400, f"no such upload in this conversation: {', '.join(map(str, unknown))}")
        with self.lock:
            if session.busy:
                raise HTTPError(409, "this conversation is still waiting for its last answer")
            job = Job(session, text, [session.uploads[u] for u in uploads])
            position = len(self.pending) + (self.running is not None)
            session.busy = True
            self.jobs[job.id] = job
            self.pending.append(job)
            job.queued(position)
            self.wake.notify()
        return job, position

    def job(self, jid) -> Job:
        with self.lock:
            if jid not in self.jobs:
                raise HTTPError(404, "no such request")
            return self.jobs[jid]

    def _work(self):
        while True:
            with self.wake:
                self.wake.wait_for(lambda: self.pending)
                job = self.running = self.pending.popleft()
                for position, waiting in enumerate(self.pending, 1):
                    waiting.queued(position)
            name, data = self._answer(job)
            with self.lock:
                self.running, job.session.busy = None, False
            job.emit(name, **data)

    def _answer(self, job: Job) -> tuple:
        """Run the model on one message; ("reply", the turn for the page) or ("failed", a message)."""
        s, conv = job.session, job.session.conversation
        job.emit("started")
        start = time.perf_counter()
        s.turns += 1

        def progress(phase, done, total):
            job.emit("progress", phase=phase, done=done, total=total)

        try:
            message = conv.user(job.text, **{m: [p for k, p in job.media if k == m] for m in MODALITIES}).turns[-1]
            reply = self.model.chat(conv, on_progress=progress, **self.chat_kwargs)
            saved = save_reply(reply, s.folder, f"turn{s.turns}")
            turn = self.turn_record(s, job, reply, saved, time.perf_counter() - start)
        except Exception as e:                     # the server lives on; the conversation forgets the turn
            del conv.turns[next(i for i, t in enumerate(conv.turns) if t is message):]   # older turns may be trimmed
            if not isinstance(e, USER_ERRORS):
                traceback.print_exc()
            return "failed", {"message": str(e) if isinstance(e, USER_ERRORS) else f"{type(e).__name__}: {e}"}
        print(f"conversation {s.id} turn {s.turns}: {turn['seconds']:.1f} s", file=sys.stderr, flush=True)
        return "reply", turn

    def turn_record(self, s: Session, job: Job, reply, saved: list, seconds: float) -> dict:
        """What the page shows of one answer: text, media, notices, and how the answer was routed."""
        counts = [len(reply.images), len(reply.audios), len(reply.videos)]
        outputs = dict(zip(("image", "audio", "video"),
                           (saved[sum(counts[:i]):sum(counts[:i + 1])] for i in range(3))))
        signals, used = [], {m: 0 for m in MODALITIES}
        for (modality, position), (_, cond) in zip(reply.signals, reply.conditioning):
            k, used[modality] = used[modality], used[modality] + 1
            out = outputs[modality][k] if k < len(outputs[modality]) else None
            signals.append({"modality": modality, "position": position, "projection": PROJECTION_NAMES[modality],
                            "tokens": signal_token_names(modality, len(self.model.signal_ids[modality])),
                            "conditioning": list(cond.shape), "output": out and file_url(s, out),
                            **self.sampling(modality)})
        prompt = reply.prompt
        first_new = len(prompt.soft_positions) - len(job.media)         # this turn's inputs come last
        return {"turn": s.turns, "user": job.text, "text": reply.text, "raw_text": reply.raw_text,
                "media": [{"kind": m, "url": file_url(s, p)} for m, paths in outputs.items() for p in paths],
                "notices": reply.notices, "seconds": round(seconds, 2), "signals": signals,
                "prompt_tokens": len(prompt.ids), "answer_tokens": len(reply.token_ids),
                "inputs": [{"modality": m, "position": p, "new": i >= first_new}
                           for i, (m, p) in enumerate(zip(prompt.soft_modalities, prompt.soft_positions))]}

    def sampling(self, modality) -> dict:
        """The diffusion steps and guidance an output was made with."""
        if modality not in self.model.loaded_decoders:
            return {}
        decoder = self.model.decoder(modality)
        steps, guidance = self.chat_kwargs.get("num_inference_steps"), self.chat_kwargs.get("guidance_scale")
        return {"steps": decoder.num_inference_steps if steps is None else steps,
                "guidance": decoder.guidance_scale if guidance is None else guidance}

    def file(self, sid, relative) -> Path:
        folder = self.session(sid).folder.resolve()
        path = (folder / relative).resolve()
        if not path.is_relative_to(folder) or not path.is_file():
            raise HTTPError(404, "no such file in this conversation")
        return path


def file_url(session: Session, path: Path) -> str:
    return f"/files/{session.id}/{path.relative_to(session.folder).as_posix()}"


def safe_name(name: str) -> str:
    """A file name from the browser, reduced to letters, digits, '.', '-' and '_' (the suffix kept)."""
    path = Path(re.sub(r"[^A-Za-z0-9._-]", "_", name))
    return (path.stem.strip("._")[:60] or "upload") + path.suffix[:10]


def sniff_kind(path: Path) -> str:
    """What a dropped file holds: a WAV is audio, a GIF of several frames is a video, anything else an image."""
    head = path.read_bytes()[:12]
    if head[:4] == b"RIFF" and head[8:12] == b"WAVE":
        return "audio"
    if head[:4] == b"GIF8":
        try:
            with Image.open(path) as gif:
                return "video" if getattr(gif, "n_frames", 1) > 1 else "image"
        except OSError:
            return "image"                       # the image loader says what is wrong with it
    return "image"


# ---------------------------------------------------------------- HTTP

ROUTES = [
    ("GET", r"/", "page"),
    ("GET", r"/web/(app\.js|style\.css)", "asset"),
    ("GET", r"/api/config", "config"),
    ("POST", r"/api/conversations", "new_conversation"),
    ("POST", r"/api/conversations/(\w+)/uploads", "upload"),
    ("POST", r"/api/conversations/(\w+)/messages", "message"),
    ("GET", r"/api/jobs/(\w+)/events", "events"),
    ("GET", r"/files/(\w+)/(.+)", "file"),
]


class Handler(BaseHTTPRequestHandler):
    """Routes a request to one of the on_* methods; an HTTPError becomes {"error": ...} with its status."""
    app: App
    server_version = "minignext"

    def do_GET(self):
        self.route("GET")

    def do_POST(self):
        self.route("POST")

    def route(self, method):
        url = urlsplit(self.path)
        self.query = parse_qs(url.query)
        try:
            for verb, pattern, name in ROUTES:
                match = re.fullmatch(pattern, url.path)
                if match and verb == method:
                    return getattr(self, f"on_{name}")(*map(unquote, match.groups()))
            raise HTTPError(404, f"no such page: {method} {url.path}")
        except HTTPError as e:
            self.send_json({"error": str(e)}, e.status)
        except (BrokenPipeError, ConnectionResetError):
            pass                                  # the tab went away
        except Exception as e:
            traceback.print_exc()
            self.send_json({"error": f"{type(e).__name__}: {e}"}, 500)

    def log_message(self, format, *args):         # quiet: the console shows the turns instead
        pass

    # ------------------------------------------------------------ responses

    def send_bytes(self, data: bytes, content_type: str, status=200):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(data)

    def send_json(self, data, status=200):
        self.send_bytes(json.dumps(data).encode(), "application/json", status)

    def send_file(self, path: Path):
        self.send_bytes(path.read_bytes(), CONTENT_TYPES.get(path.suffix.lower(), "application/octet-stream"))

    def read_body(self, limit: int, what: str) -> bytes:
        """The request body, at most `limit` bytes; a longer one is read and dropped (so the browser
        sees the answer rather than a broken connection) and refused with 413."""
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            raise HTTPError(411, "the request needs a Content-Length") from None
        if length > limit:
            left = min(length, 4 * limit + (1 << 20))      # past that, the connection is just closed
            while left > 0 and (chunk := self.rfile.read(min(left, 1 << 16))):
                left -= len(chunk)
            self.close_connection = True
            raise HTTPError(413, f"the {what} is {mb(length)}; the limit is {mb(limit)}")
        return self.rfile.read(length)

    # ------------------------------------------------------------ routes

    def on_page(self):
        self.send_file(WEB / "index.html")

    def on_asset(self, name):
        self.send_file(WEB / name)

    def on_config(self):
        self.send_json(self.app.config())

    def on_new_conversation(self):
        self.send_json({"id": self.app.new_session().id})

    def on_upload(self, sid):
        session = self.app.session(sid)
        kind, name = self.query.get("kind", ["auto"])[0], self.query.get("name", ["upload"])[0]
        body = self.read_body(self.app.max_upload_bytes, "upload")
        if not body:
            raise HTTPError(400, f"{name}: the file is empty (0 bytes)")
        self.send_json(self.app.add_upload(session, kind, name, body))

    def on_message(self, sid):
        session = self.app.session(sid)
        try:
            data = json.loads(self.read_body(MAX_MESSAGE_BYTES, "message"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            data = None
        if not isinstance(data, dict) or not all(isinstance(u, str) for u in data.get("uploads") or []):
            raise HTTPError(400, 'a message is JSON: {"text": "...", "uploads": ["u1", ...]}')
        job, position = self.app.submit(session, data.get("text"), list(data.get("uploads") or []))
        self.send_json({"job": job.id, "position": position})

    def on_events(self, jid):
        job = self.app.job(jid)
        resume = self.headers.get("Last-Event-ID", "")
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        for event in job.follow(int(resume) + 1 if resume.isdigit() else 0):
            chunk = ": still working\n\n" if event is None else (
                f"id: {event[0]}\nevent: {event[1]}\ndata: {json.dumps(event[2])}\n\n")
            self.wfile.write(chunk.encode())
            self.wfile.flush()

    def on_file(self, sid, relative):
        self.send_file(self.app.file(sid, relative))


def mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def make_server(host="127.0.0.1", port=8000) -> ThreadingHTTPServer:
    """A server bound to host:port; give it its App as server.RequestHandlerClass.app before serving."""
    handler = type("BoundHandler", (Handler,), {})
    try:
        server = ThreadingHTTPServer((host, port), handler)
    except OSError as e:
        reason = e.strerror or e
        raise ValueError(f"cannot listen on {host}:{port} ({reason}); choose another --port or --host") from None
    return server


def main(argv=None):
    p = argparse.ArgumentParser(prog="minignext serve", description="a live any-to-any chat page in the browser")
    p.add_argument("--host", default="127.0.0.1", help="the address to listen on (default: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    p.add_argument("--out", type=Path, default=Path("out") / "serve",
                   help="each conversation gets a new folder in here for its uploads and outputs")
    p.add_argument("--max-upload-mb", type=float, default=20.0, help="the largest file a page may upload")
    add_generation_args(p)
    args = p.parse_args(argv)
    if args.max_upload_mb <= 0:
        raise ValueError(f"--max-upload-mb must be positive; got {args.max_upload_mb}")
    preset = args.preset or default_preset()
    server = make_server(args.host, args.port)          # first, so a taken port is said before the model loads
    server.RequestHandlerClass.app = App(load_model(preset, args.system), args.out, preset,
                                         int(args.max_upload_mb * 1e6), generation_kwargs(args))
    host, port = server.server_address[:2]
    print(f"minignext serve: http://{host}:{port}/ (preset {preset}; conversations in {args.out}; Ctrl-C stops)",
          flush=True)
    if args.host not in LOOPBACK:
        print(f"note: listening on {args.host}, so other machines that reach it can use this model and read "
              f"what it makes", file=sys.stderr)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
