"""The real `minignext` console script in a subprocess: run, demo, download and friendly errors."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from minignext import media
from minignext.systems.nextgpt import signal_token_names

SCRIPT = Path(sys.executable).parent / "minignext"
ALL = "".join(signal_token_names("image") + signal_token_names("audio") + signal_token_names("video"))


def minignext(*args, weights_dir, cwd=None, stdin=None):
    env = {**os.environ, "MINIGNEXT_WEIGHTS": str(weights_dir), "MINIGNEXT_PROGRESS": "0",
           "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([str(SCRIPT), *map(str, args)], capture_output=True, text=True, env=env, cwd=cwd,
                          timeout=300, input=stdin)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    from PIL import Image
    folder = tmp_path_factory.mktemp("inputs")
    Image.new("RGB", (40, 40), (20, 200, 20)).save(folder / "green.png")
    t = np.arange(8000) / 16000
    media.write_wav(folder / "tone.wav", (0.2 * np.sin(2 * np.pi * 300 * t)).astype(np.float32), 16000)
    media.write_gif(folder / "clip.gif", np.random.default_rng(0).integers(0, 255, (12, 24, 24, 3), np.uint8))
    (folder / "broken.png").write_bytes(b"\x89PNG but not really")
    return folder


def test_run_writes_media_and_transcript(tmp_path, inputs):
    out = tmp_path / "out"
    r = minignext("run", "--preset", "tiny-random", "--prompt", "Describe these and answer in kind.",
                  "--image", inputs / "green.png", "--audio", inputs / "tone.wav", "--video", inputs / "clip.gif",
                  "--force-response", f"Three things. {ALL}", "--steps", "2", "--out", out, weights_dir=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "random weights" in r.stderr and "Three things." in r.stdout
    from PIL import Image
    assert Image.open(out / "reply_image0.png").size == (32, 32)
    wave, sr = media.read_wav(out / "reply_audio0.wav")
    assert sr == 16000 and wave.shape[-1] == 8000
    assert media.load_video(out / "reply_video0.gif").shape[1:] == (16, 16, 3)
    transcript = (out / "transcript.md").read_text()
    assert "green.png" in transcript and "reply_image0.png" in transcript and "Three things." in transcript

    again = minignext("run", "--preset", "tiny-random", "--prompt", "hi", "--out", out, weights_dir=tmp_path)
    assert again.returncode == 2 and "earlier run" in again.stderr and "Traceback" not in again.stderr


def test_bad_input_and_missing_weights_are_friendly(tmp_path, inputs):
    r = minignext("run", "--preset", "tiny-random", "--prompt", "What is this?", "--image", inputs / "broken.png",
                  "--out", tmp_path / "o1", weights_dir=tmp_path)
    assert r.returncode == 2 and "broken.png" in r.stderr and "Traceback" not in r.stderr
    r = minignext("run", "--preset", "nextgpt-7b", "--prompt", "hi", "--out", tmp_path / "o2", weights_dir=tmp_path)
    assert r.returncode == 2 and "minignext download nextgpt-7b" in r.stderr and "Traceback" not in r.stderr
    r = minignext("download", "nextgpt-7b", weights_dir=tmp_path)          # HF_HUB_OFFLINE=1
    assert r.returncode == 2 and "download failed" in r.stderr and "Traceback" not in r.stderr


def test_interactive_chat_attaches_media_and_keeps_going(tmp_path, inputs):
    session = f"/image {inputs / 'green.png'}\nWhat is this?\n/audio {tmp_path / 'nope.wav'}\nAnd now?\n/quit\n"
    r = minignext("chat", "--preset", "tiny-random", "--max-new-tokens", "4", "--out", tmp_path / "chat",
                  weights_dir=tmp_path, stdin=session)
    assert r.returncode == 0, r.stderr
    assert "(attached image" in r.stdout and "nope.wav: no such file" in r.stdout
    assert r.stdout.count("assistant>") == 2


def test_demo_writes_a_fresh_folder_and_keeps_earlier_runs(tmp_path):
    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / "transcript.md").write_text("an earlier run")
    r = minignext("demo", "--out", tmp_path / "demo", "--steps", "2", weights_dir=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "random" in r.stderr
    assert (tmp_path / "demo" / "transcript.md").read_text() == "an earlier run"
    out = tmp_path / "demo-2"
    files = {p.name for p in out.iterdir()}
    assert {"transcript.md", "index.html", "turn1_image0.png", "turn2_audio0.wav", "turn3_video0.gif"} <= files
    page = (out / "index.html").read_text()
    assert page.count("data:image/png;base64,") >= 2 and "data:audio/wav;base64," in page \
        and "data:image/gif;base64," in page
    assert str(out / "index.html") in r.stdout


def test_system_option_becomes_the_models_system_message(monkeypatch, tmp_path):
    """run, chat and serve share --system: the loaded model's system message, the preset's own without it."""
    import argparse

    from minignext.chat import add_generation_args, load_model

    monkeypatch.setenv("MINIGNEXT_WEIGHTS", str(tmp_path))
    p = argparse.ArgumentParser()
    add_generation_args(p)
    args = p.parse_args(["--preset", "tiny-random", "--system", "Answer in one word."])
    assert load_model(args.preset, args.system).system == "Answer in one word."
    assert load_model("tiny-random").system == ""
