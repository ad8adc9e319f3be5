"""`minignext serve` end to end: the real server on the toy preset in a subprocess (one for the whole
module), its HTTP API, and its page in a real headless Chromium driven through chromedriver."""

import json
import os
import subprocess
import sys
import threading
import urllib.error
import urllib.parse
import urllib.request
import wave
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from minignext import media
from minignext.toy import checkers, world
from webdriver import Browser, find_chromium

ROOT = Path(__file__).resolve().parent.parent
STEPS = 6                                          # diffusion steps: enough to see the progress, and fast
pytestmark = pytest.mark.skipif(not (ROOT / "weights" / "toy" / "nextgpt" / "nextgpt.json").is_file(),
                                reason="the toy weights are not in weights/toy/nextgpt")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """(base url, output folder) of a server on the toy preset with a 1 MB upload limit."""
    out = tmp_path_factory.mktemp("serve-out")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "minignext", "serve", "--preset", "toy", "--port", "0",
                             "--out", str(out), "--steps", str(STEPS), "--max-upload-mb", "1", "--no-progress"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
    lines = []
    for line in proc.stdout:                       # the model loads, then the server prints its address
        lines.append(line)
        if "http://" in line:
            break
    else:
        proc.wait(10)
        pytest.fail("the server did not start:\n" + "".join(lines))
    url = line.split("http://")[1].split("/")[0]
    assert url.startswith("127.0.0.1:")                       # this machine only, unless --host says otherwise
    drain = threading.Thread(target=lambda: [lines.append(x) for x in proc.stdout], daemon=True)
    drain.start()
    yield f"http://{url}", out
    proc.terminate()
    proc.wait(10)
    assert not any("Traceback" in x for x in lines), "".join(lines)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A red circle, a tone and a clip from the toy world the preset was trained on, and bad files."""
    folder = tmp_path_factory.mktemp("serve-inputs")
    rng = world.make_rng(0)
    Image.fromarray(world.render_image(world.Obj("red", "circle"), rng)).save(folder / "red circle.png")
    media.write_wav(folder / "tone.wav", world.render_audio(world.Obj("blue", "square"), rng), world.SAMPLE_RATE)
    media.write_gif(folder / "clip.gif", world.render_video(world.Obj("green", "triangle"), "right", rng), fps=8)
    (folder / "notes.txt").write_text("this is not a picture\n")
    (folder / "huge.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(1_200_000))
    return folder


def call(base, method, path, body=None, content_type="application/json"):
    """(status, JSON answer) of one API request."""
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    request = urllib.request.Request(base + path, data=data, method=method,
                                     headers={"Content-Type": content_type} if data is not None else {})
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def conversation(base) -> str:
    status, answer = call(base, "POST", "/api/conversations")
    assert status == 200
    return answer["id"]


def upload(base, cid, path: Path, kind="image", name=None):
    query = urllib.parse.urlencode({"kind": kind, "name": name or path.name})
    return call(base, "POST", f"/api/conversations/{cid}/uploads?{query}",
                path.read_bytes(), "application/octet-stream")


def send(base, cid, text, uploads=()):
    status, answer = call(base, "POST", f"/api/conversations/{cid}/messages", {"text": text, "uploads": list(uploads)})
    assert status == 200, answer
    return answer


def events(base, job) -> list:
    """The (name, data) events of a request, read from its stream until the answer or the failure."""
    out, name = [], None
    with urllib.request.urlopen(f"{base}/api/jobs/{job}/events", timeout=120) as stream:
        for raw in stream:
            line = raw.decode().rstrip("\n")
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                out.append((name, json.loads(line[6:])))
    assert out and out[-1][0] in ("reply", "failed")
    return out


def names(text, **want) -> bool:
    """Whether an answer names exactly these attribute values (the checkers' reading, not one wording)."""
    return checkers.check_text(text, want=want).ok


def ask(base, cid, text, uploads=()) -> dict:
    name, data = events(base, send(base, cid, text, uploads)["job"])[-1]
    assert name == "reply", data
    return data


# ---------------------------------------------------------------- the API

def test_bad_uploads_are_refused_with_the_loaders_reason(server, inputs):
    base, out = server
    cid = conversation(base)
    status, answer = upload(base, cid, inputs / "notes.txt", "image")
    assert status == 400 and "notes.txt: not an image file" in answer["error"]
    status, answer = upload(base, cid, inputs / "tone.wav", "image")            # a sound is not a picture
    assert status == 400 and "not an image file" in answer["error"]
    status, answer = upload(base, cid, inputs / "red circle.png", "audio")      # nor the other way round
    assert status == 400 and "only WAV" in answer["error"]
    status, answer = upload(base, cid, inputs / "notes.txt", "picture")
    assert status == 400 and "unknown kind 'picture'" in answer["error"]
    status, answer = upload(base, cid, inputs / "huge.png", "image")
    assert status == 413 and answer["error"] == "the upload is 1.2 MB; the limit is 1.0 MB"
    folder = next(p for p in out.iterdir() if p.name.endswith(cid))
    assert list((folder / "uploads").iterdir()) == []                          # nothing refused is kept
    status, answer = upload(base, cid, inputs / "red circle.png", "image")    # and the next one goes through
    assert status == 200 and answer["kind"] == "image" and answer["url"].endswith("uploads/04-red_circle.png")
    status, answer = call(base, "POST", f"/api/conversations/{cid}/messages", {"text": "hi", "uploads": ["u9"]})
    assert status == 400 and "no such upload" in answer["error"]
    status, answer = call(base, "POST", f"/api/conversations/{cid}/messages", {"text": "  "})
    assert status == 400 and "empty" in answer["error"]
    status, answer = call(base, "POST", "/api/conversations/0123abcd/uploads?kind=image", b"x", "image/png")
    assert status == 404 and "no such conversation" in answer["error"]


def test_dropped_files_are_sorted_by_what_they_hold(server, inputs):
    base, _ = server
    cid = conversation(base)
    kinds = [upload(base, cid, inputs / name, "auto")[1]["kind"] for name in ("red circle.png", "tone.wav", "clip.gif")]
    assert kinds == ["image", "audio", "video"]


def test_a_request_while_another_runs_is_queued_and_both_are_answered(server):
    base, _ = server
    first, second = conversation(base), conversation(base)
    running = send(base, first, "make a video of a green triangle moving right.")
    waiting = send(base, second, "draw a yellow square.")
    assert (running["position"], waiting["position"]) == (0, 1)
    status, answer = call(base, "POST", f"/api/conversations/{first}/messages", {"text": "and another"})
    assert status == 409 and "still waiting" in answer["error"]            # one request per conversation at a time
    a, b = events(base, running["job"]), events(base, waiting["job"])
    assert a[-1][0] == b[-1][0] == "reply"
    assert a[-1][1]["media"][0]["kind"] == "video" and b[-1][1]["media"][0]["kind"] == "image"
    started = {name: data["time"] for name, data in b}["started"]
    assert started >= a[-1][1]["time"]                                       # the model ran one after the other
    assert [(d["done"], d["total"]) for n, d in a if n == "progress" and d["phase"] == "decode video"] == \
        [(i, STEPS) for i in range(1, STEPS + 1)]                            # streamed step by step
    assert [n for n, _ in b][:2] == ["queued", "started"] and b[0][1]["position"] == 1


def test_a_place_in_the_queue_is_told_once_and_again_only_when_it_moves():
    from minignext.serve import Job
    job = Job(session=None, text="draw a red circle.", media=[])
    for position in (2, 2, 1, 1, 1):                # the worker re-tells places each time it takes a job
        job.queued(position)
    assert [(n, d["position"]) for n, d in job.events] == [("queued", 2), ("queued", 1)]


def test_conversations_stay_apart(server, inputs):
    base, out = server
    red, yellow = conversation(base), conversation(base)
    u = upload(base, red, inputs / "red circle.png")[1]["upload"]
    assert names(ask(base, red, "what is in this picture?", [u])["text"], colour="red", shape="circle")
    drawn = ask(base, yellow, "draw a yellow square.")
    # each follow-up sees its own history only
    assert names(ask(base, red, "what colour was the first one?")["text"], colour="red")
    assert names(ask(base, yellow, "what colour was the first one?")["text"], colour="yellow")
    folders = {p.name for p in out.iterdir()}
    assert len([f for f in folders if f.endswith(red) or f.endswith(yellow)]) == 2
    image = drawn["media"][0]["url"]
    assert image.startswith(f"/files/{yellow}/")
    with urllib.request.urlopen(base + image) as r:
        assert r.headers["Content-Type"] == "image/png" and Image.open(BytesIO(r.read())).size[0] > 0
    for stranger in (image.replace(yellow, red), f"/files/{red}/../../etc/passwd", f"/files/{red}/%2e%2e/x"):
        status, _ = call(base, "GET", stranger)
        assert status == 404, stranger


def test_a_failed_request_is_said_and_the_conversation_goes_on(server):
    base, _ = server
    cid = conversation(base)
    name, data = events(base, send(base, cid, "tell me " * 2000)["job"])[-1]
    assert name == "failed" and "exceed the LLM's" in data["message"] and "shorten the conversation" in data["message"]
    drawn = ask(base, cid, "draw a yellow square.")
    assert names(drawn["text"], colour="yellow", shape="square") and len(drawn["media"]) == 1
    assert names(ask(base, cid, "what colour was the first one?")["text"], colour="yellow")


def test_a_taken_port_is_said_before_the_model_loads(server, tmp_path):
    port = server[0].rsplit(":", 1)[1]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-m", "minignext", "serve", "--port", port, "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=120, cwd=ROOT, env=env)
    assert r.returncode == 2 and "loading preset" not in r.stderr
    assert f"minignext serve: error: cannot listen on 127.0.0.1:{port} (Address already in use)" in r.stderr


# ---------------------------------------------------------------- the page in a browser

@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    chromium, driver = find_chromium()
    if chromium is None:
        if os.environ.get("CI"):
            pytest.fail(f"the browser tests must run in CI: {driver}; `make install-test` installs it as root")
        pytest.skip(f"no browser here: {driver}")
    folder = tmp_path_factory.mktemp("chromium")
    b = Browser(chromium, driver, folder / "profile", folder / "chromedriver.log")
    yield b
    b.close()


def load_page(browser, base):
    browser.open(base + "/")
    browser.wait(lambda: browser.js("return document.body.dataset.ready === '1'"), what="the page to start")
    return browser.js("return document.body.dataset.conversation")


def say(browser, text):
    before = len(browser.find_all(".turn.assistant"))
    prompt = browser.find("#prompt")
    browser.wait(lambda: browser.js("return !document.querySelector('#send').disabled"), what="Send to be ready")
    browser.type(prompt, text)
    browser.click(browser.find("#send"))
    return browser.wait(lambda: browser.find_all(".turn.assistant.done, .turn.assistant.failed")[before:],
                        what=f"the answer to {text!r}")[0]


def attach(browser, kind, path):
    chips = len(browser.find_all(".chip.ready"))
    browser.type(browser.find(f"#file-{kind}"), path)
    browser.wait(lambda: len(browser.find_all(".chip.ready")) > chips or browser.text(browser.find("#notice")),
                 what=f"{path.name} to upload")


def test_page_reads_a_picture_and_plays_a_sound(server, browser, inputs, tmp_path_factory):
    base, _ = server
    load_page(browser, base)
    attach(browser, "image", inputs / "red circle.png")
    assert browser.text(browser.find(".chip.ready")).startswith("image: red circle.png")
    answer = say(browser, "what is in this picture?")
    assert names(browser.text(browser.find_all(".answer-text", within=answer)[0]), colour="red", shape="circle")
    assert browser.find_all(".turn.user .media img")                    # the picture shows in the question

    answer = say(browser, "play the sound of a red circle.")
    assert names(browser.text(browser.find_all(".answer-text", within=answer)[0]), pitch="deep", contour="wobbly")
    (audio,) = browser.find_all("audio", within=answer)
    state = browser.wait(lambda: browser.js(
        "const a = arguments[0]; return a.readyState >= 1 && !a.error && [a.duration, a.currentSrc]", audio),
        what="the audio to load")
    duration, src = state
    assert duration > 0.5 and src.startswith(base + "/files/")
    with urllib.request.urlopen(src) as r, wave.open(BytesIO(r.read())) as w:
        assert r.headers["Content-Type"] == "audio/wav"
        assert w.getframerate() == world.SAMPLE_RATE and w.getnframes() / w.getframerate() == pytest.approx(duration)
    assert browser.js("return document.querySelector('audio').canPlayType('audio/wav')") != ""

    say(browser, "draw a yellow square.")
    browser.click(browser.find("#show-routing"))
    routing = browser.text(browser.find_all(".turn.assistant .routing")[1])
    assert "[AUD0]" in routing and "gen_text_hidden_fcs_audio" in routing and "conditioning (1, 32)" in routing
    assert f"decode audio: {STEPS}/{STEPS}" in routing                          # the streamed progress reached the page
    assert "an earlier turn's image → ImageBind (vision) → llama_proj → one soft token at prompt position" in routing
    # everything the page loaded came from the server
    sources = browser.js("return performance.getEntriesByType('resource').map(e => e.name)")
    assert sources and all(s.startswith(base) for s in sources), sources
    browser.cmd("POST", "/window/rect", {"width": 1100, "height": 1650})
    browser.js("document.querySelector('#messages').scrollTo(0, 1e6)")
    shot = browser.screenshot(tmp_path_factory.mktemp("screenshots") / "serve.png")
    with Image.open(shot) as img:
        assert img.size[0] >= 800 and len(set(np.asarray(img.convert("L")).ravel().tolist())) > 16
    print(f"screenshot: {shot}")


def test_bad_uploads_show_their_reason_in_the_page(server, browser, inputs):
    base, _ = server
    load_page(browser, base)
    attach(browser, "image", inputs / "notes.txt")
    assert "notes.txt: not an image file" in browser.text(browser.find("#notice"))
    attach(browser, "image", inputs / "huge.png")
    assert browser.text(browser.find("#notice")) == "huge.png is 1.2 MB; files up to 1.0 MB can be attached"
    assert browser.find_all(".chip") == []


def test_two_tabs_hold_two_conversations(server, browser, inputs):
    base, _ = server
    (tab_a,) = browser.cmd("GET", "/window/handles")
    first = load_page(browser, base)
    attach(browser, "image", inputs / "red circle.png")
    browser.type(browser.find("#prompt"), "what is in this picture?\ue007")         # Enter sends
    tab_b = browser.new_tab()
    second = load_page(browser, base)
    assert second != first
    browser.type(browser.find("#prompt"), "draw a yellow square.\ue007")           # while tab a may still run
    for tab, colour in ((tab_a, "red"), (tab_b, "yellow")):
        browser.switch(tab)
        browser.wait(lambda: len(browser.find_all(".turn.assistant.done")) == 1, what="the first answer")
        answer = say(browser, "what colour was the first one?")
        assert names(browser.text(browser.find_all(".answer-text", within=answer)[0]), colour=colour)
    for tab, own in ((tab_a, "what is in this picture?"), (tab_b, "draw a yellow square.")):
        browser.switch(tab)
        questions = [browser.text(q) for q in browser.find_all(".turn.user .text")]
        assert questions == [own, "what colour was the first one?"]
    browser.click(browser.find("#new-conversation"))
    browser.wait(lambda: browser.js("return document.body.dataset.conversation") not in (second, None),
                 what="a new conversation")
    assert browser.find_all(".turn") == []
