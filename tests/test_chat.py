"""The `minignext` console script as a user trying to break it: `chat`, `run` and `convert` in
subprocesses, the media cases under a memory cap (RLIMIT_AS). Every expected failure must end
as one line `minignext <cmd>: error: ...` (or, in chat, `error: ...` and the chat goes on), never
a traceback, a hang, a silent wrong result or a lost file.

The independent runs start together and are judged one finding per test, to keep the time down.
"""

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from minignext import cli, media, weights
from minignext.systems.nextgpt import signal_token_names

sys.path.insert(0, str(Path(__file__).parent))
from fixtures_media import bomb_png, gif_bytes, tone, wav_bytes  # noqa: E402

SCRIPT = Path(sys.executable).parent / "minignext"
ROOT = Path(__file__).resolve().parent.parent
IMG = "".join(signal_token_names("image"))
CAP = 2 ** 30               # address space of a chat or run process (the old code needed 1.2 GB to 11 GB here)


# How long the chat session waits on a silent pipe: the FIFO turn must time out; the Ctrl-C turn must be
# ended by the Ctrl-C that comes 1.5 s after its prompt, with a margin for a busy machine.
PIPE_TIMEOUT = 10


def env(weights_dir=None):
    out = {**os.environ, "MINIGNEXT_PROGRESS": "0", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}
    if weights_dir is not None:
        out["MINIGNEXT_WEIGHTS"] = str(weights_dir)
    return out


def capped():
    resource.setrlimit(resource.RLIMIT_AS, (CAP, CAP))
    # as from a terminal: Ctrl-C on (a test worker, as pytest-xdist's, may ignore SIGINT, and an
    # ignored signal stays ignored across exec, so Python would install no KeyboardInterrupt)
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start(*args, weights_dir=None, cwd=None, pass_fds=(), stdin=subprocess.DEVNULL, **more_env):
    return subprocess.Popen([str(SCRIPT), *map(str, args)], stdin=stdin, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**env(weights_dir), **more_env}, cwd=cwd,
                            pass_fds=pass_fds, preexec_fn=capped)


def finish(proc, timeout=240):
    out, err = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def one_line_error(r, command):
    """Exit 2 with exactly one `minignext <command>: error: ...` line and no traceback."""
    errors = [line for line in r.stderr.splitlines() if line.startswith(f"minignext {command}: error: ")]
    assert r.returncode == 2 and len(errors) == 1 and "Traceback" not in r.stderr, r.stderr
    return errors[0]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from PIL import Image

    f = tmp_path_factory.mktemp("files")
    bomb_png(f / "bomb.png")
    (f / "frames.gif").write_bytes(gif_bytes(3000, 401))
    (f / "1hz.wav").write_bytes(wav_bytes(np.zeros(16000, np.int16), 1))
    (f / "ten_minutes.wav").write_bytes(wav_bytes(np.tile(tone(1, 44100), 600), 44100))
    (f / "extensible.wav").write_bytes(wav_bytes(tone(1, 16000), 16000, extensible=True))
    (f / "tone.wav").write_bytes(wav_bytes(tone(1, 16000), 16000))
    os.mkfifo(f / "fifo")
    Image.fromarray(np.linspace(0, 65535, 40 * 40).reshape(40, 40).astype(np.uint16)).save(f / "deep.png")
    media.write_gif(f / "still.gif", np.full((1, 32, 32, 3), 200, np.uint8))
    frames = np.random.default_rng(0).integers(0, 255, (6, 24, 24, 3), np.uint8)
    Image.fromarray(frames[0]).save(f / "slow.gif", save_all=True, duration=400,
                                    append_images=[Image.fromarray(x) for x in frames[1:]])
    return f


# ---------------------------------------------------------------- one chat session, many findings

def chat_script(f, pipe_fd):
    """(line, what the reply must hold) in order; None marks the turn that Ctrl-C cancels."""
    return [
        (f"/image {f / 'bomb.png'}", "(attached image"),
        ("what is in this picture?", "error: " + str(f / "bomb.png") + ": too many pixels"),
        (f"/video {f / 'frames.gif'}", "(attached video"),
        ("what happens in this video?", "error: " + str(f / "frames.gif") + ": 401 frames of 3000x3000 pixels"),
        (f"/audio {f / '1hz.wav'}", "(attached audio"),
        ("what do you hear?", "error: " + str(f / "1hz.wav") + ": a sample rate of 1 Hz"),
        (f"/audio {f / 'ten_minutes.wav'}", "(attached audio"),
        ("what do you hear?", "assistant> "),
        (f"/image {f / 'fifo'}", "(attached image"),
        ("what is in this picture?", "error: " + str(f / "fifo") + f": the pipe gave no data for {PIPE_TIMEOUT} s"),
        ("draw a red circle.", "_image0.png)"),
        ("<Img></Img> [IMG0] </s> what is in this picture?", "assistant> "),
        (f"/video {f / 'still.gif'}", "(attached video"),
        ("what happens in this video?", "holds a single frame, so it was read as an image"),
        (f"/audio /dev/fd/{pipe_fd}", "(attached audio"),
        ("what do you hear?", None),
    ] + [("what colour was it?" if i % 4 else "draw a blue square.", "assistant> ") for i in range(14)]


@pytest.fixture(scope="module")
def chat_session(files, tmp_path_factory):
    """The toy preset's chat, capped at CAP bytes, into a folder that already holds someone's files;
    Ctrl-C (SIGINT) arrives while a turn waits on a pipe that never delivers."""
    out = tmp_path_factory.mktemp("chat")
    (out / "notes.txt").write_text("not ours")
    (out / "holiday.png").write_bytes(b"not ours either")
    r, w = os.pipe()
    script = chat_script(files, r)
    cut = next(i for i, (_, want) in enumerate(script) if want is None) + 1
    proc = start("chat", "--preset", "toy", "--out", out, "--no-progress", "--max-new-tokens", "200", "--steps", "2", pass_fds=(r,),
                 stdin=subprocess.PIPE, weights_dir=ROOT / "weights",
                 MINIGNEXT_PIPE_TIMEOUT=str(PIPE_TIMEOUT))
    os.close(r)
    chunks = []
    reader = threading.Thread(target=lambda: chunks.extend(iter(lambda: proc.stdout.read(1), "")), daemon=True)
    reader.start()

    def prompts():
        return "".join(chunks).count("you> ")

    proc.stdin.write("".join(line + "\n" for line, _ in script[:cut]))
    proc.stdin.flush()
    deadline = time.time() + 180
    while prompts() < cut and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    time.sleep(1.5)                                  # the last turn now waits on the silent pipe
    transcript_during = (out / "transcript.md").read_text()
    proc.send_signal(signal.SIGINT)
    while "answer cancelled" not in "".join(chunks) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    os.close(w)
    peak = int(next(line.split()[1] for line in open(f"/proc/{proc.pid}/status") if line.startswith("VmPeak")))
    proc.stdin.write("".join(line + "\n" for line, _ in script[cut:]) + "/quit\n")
    proc.stdin.close()
    proc.wait(timeout=240)
    reader.join(timeout=10)
    stdout = "".join(chunks)
    replies = stdout.split("you> ")[1:len(script) + 1]
    return {"replies": dict(enumerate(replies)), "script": script, "stdout": stdout, "stderr": proc.stderr.read(),
            "code": proc.returncode, "out": out, "transcript_during": transcript_during, "peak_kb": peak}


def reply_to(session, line_start, nth=0):
    """The chat's output after the nth line of the script that starts with line_start."""
    hits = [i for i, (line, _) in enumerate(session["script"]) if line.startswith(line_start)]
    return session["replies"][hits[nth]]


def test_chat_survives_every_turn_and_exits_cleanly(chat_session):
    assert chat_session["code"] == 0 and "Traceback" not in chat_session["stderr"], chat_session["stderr"][-3000:]
    for i, (line, want) in enumerate(chat_session["script"]):
        if want is not None:
            assert want in chat_session["replies"][i], (line, chat_session["replies"][i])
    print(f"chat session peak address space: {chat_session['peak_kb'] / 2 ** 20:.2f} GB (cap {CAP / 2 ** 30:.0f} GB)")


def test_chat_decompression_bomb_png_is_one_error_line(chat_session, files):
    assert "too many pixels" in reply_to(chat_session, "what is in this picture?", 0)


def test_chat_gif_of_huge_frames_costs_nothing(chat_session):
    assert "the limit is 100000000 pixels" in reply_to(chat_session, "what happens in this video?", 0)


def test_chat_1hz_wav_is_refused_not_resampled(chat_session):
    assert "expected 4000 to 384000 Hz" in reply_to(chat_session, "what do you hear?", 0)


def test_chat_ten_minute_wav_is_answered_within_the_cap(chat_session):
    assert reply_to(chat_session, "what do you hear?", 1).lstrip().startswith("assistant> ")
    assert chat_session["peak_kb"] * 1024 < CAP


def test_chat_fifo_without_writer_does_not_hang(chat_session):
    assert "is anything writing to it?" in reply_to(chat_session, "what is in this picture?", 1)


def test_chat_folder_with_other_files_keeps_them_and_saves_pictures(chat_session):
    out = chat_session["out"]
    assert (out / "notes.txt").read_text() == "not ours" and (out / "holiday.png").read_bytes() == b"not ours either"
    assert sorted(out.glob("turn*_image0.png")), reply_to(chat_session, "draw a red circle.")


def test_chat_typed_special_tokens_are_text(chat_session):
    assert "<Img></Img> [IMG0] </s> what is in this picture?" in (chat_session["out"] / "transcript.md").read_text()
    assert "error" not in reply_to(chat_session, "<Img>")


def test_chat_one_frame_gif_is_an_image_with_a_notice(chat_session):
    assert "note: " in reply_to(chat_session, "what happens in this video?", 1)


def test_chat_ctrl_c_cancels_the_turn_not_the_session(chat_session):
    cancelled = reply_to(chat_session, "what do you hear?", 2)
    assert "answer cancelled" in cancelled and "assistant> " not in cancelled
    after = reply_to(chat_session, "draw a blue square.", 1)
    assert after.lstrip().startswith("assistant> ")


def test_chat_transcript_is_saved_as_the_conversation_goes(chat_session):
    during = chat_session["transcript_during"]            # read before the session ended
    assert "**User:** draw a red circle." in during and "turn" in during and "what colour" not in during
    final = (chat_session["out"] / "transcript.md").read_text()
    assert final.count("## Turn") == chat_session["stdout"].count("assistant> ")


def test_chat_long_history_is_trimmed_with_a_notice(chat_session):
    notes = [line for line in chat_session["stdout"].splitlines() if "oldest turns were dropped" in line]
    assert notes and "inputs were kept" in notes[0]
    later = [r for (line, _), r in zip(chat_session["script"], chat_session["replies"].values())
             if line.startswith(("what colour", "draw a blue"))]
    assert len(later) == 14 and all(r.lstrip().startswith("assistant> ") for r in later)


# ---------------------------------------------------------------- independent runs, started together

def tiny_folder(root: Path, lora=False) -> Path:
    """A tiny-random NExT-GPT saved in minignext's layout as weights/toy/nextgpt under `root`,
    optionally with LoRA factors on one layer in its delta."""
    from minignext.tiny import tiny_random

    folder = root / "toy" / "nextgpt"
    tiny_random().save_pretrained(folder)
    if lora:
        delta = dict(weights.load_safetensors(folder / "delta.safetensors"))
        g = torch.Generator().manual_seed(0)
        delta["llama_model.model.layers.0.self_attn.q_proj.lora_A.weight"] = torch.randn(2, 64, generator=g)
        delta["llama_model.model.layers.0.self_attn.q_proj.lora_B.weight"] = torch.randn(64, 2, generator=g)
        weights.save_safetensors(delta, folder / "delta.safetensors", overwrite=True)
        edit_json(folder / "nextgpt.json", lambda m: m.update(lora_r=2, lora_alpha=2))
    return folder


def edit_json(path, change):
    meta = json.loads(path.read_text())
    change(meta)
    path.write_text(json.dumps(meta))


def variant(base: Path, where: Path, change) -> Path:
    shutil.copytree(base, where)
    change(where / "toy" / "nextgpt")
    return where


def rename_lora(folder):
    delta = dict(weights.load_safetensors(folder / "delta.safetensors"))
    key = "llama_model.model.layers.0.self_attn.q_proj.lora_B.weight"
    delta[key.replace("lora_B", "lora_B_old")] = delta.pop(key)
    weights.save_safetensors(delta, folder / "delta.safetensors", overwrite=True)


def poison_llm(folder):
    llm = dict(weights.load_safetensors(folder / "llm" / "model.safetensors"))
    llm["model.norm.weight"] = torch.full_like(llm["model.norm.weight"], float("nan"))
    weights.save_safetensors(llm, folder / "llm" / "model.safetensors", overwrite=True)


@pytest.fixture(scope="module")
def runs(files, tmp_path_factory):
    """Every independent run at once; {name: CompletedProcess}."""
    tmp = tmp_path_factory.mktemp("runs")
    base = tmp / "base"
    tiny_folder(base, lora=True)
    checkpoints = {
        "missing_key": variant(base, tmp / "w1", lambda f: edit_json(f / "nextgpt.json", lambda m: m.pop("enc_dim"))),
        "renamed_lora": variant(base, tmp / "w3", rename_lora),
        "nan_weights": variant(base, tmp / "w4", poison_llm),
        "broken_decoder": variant(base, tmp / "w5", lambda f: edit_json(
            f / "nextgpt.json", lambda m: m.update(decoders={"image": str(tmp / "no_such_decoder")}))),
    }
    (tmp / "out_dir").mkdir()
    torch.save({"w": torch.ones(2)}, tmp / "legacy.pt", _use_new_zipfile_serialization=False)
    r, w = os.pipe()
    pipe = wav_bytes(tone(1, 22050), 22050)
    writer = threading.Thread(target=lambda: (os.write(w, pipe), os.close(w)))
    procs = {name: start("run", "--prompt", "hi", "--out", tmp / f"out_{name}", "--force-response", f"Here {IMG}",
                         "--max-new-tokens", "2", "--steps", "1", weights_dir=folder)
             for name, folder in checkpoints.items()}
    procs["unwritable"] = start("run", "--preset", "tiny-random", "--prompt", "hi", "--out", "/sys/minignext-out",
                                weights_dir=tmp)
    procs["temperature_nan"] = start("run", "--preset", "tiny-random", "--prompt", "hi", "--out", tmp / "o_nan",
                                     "--temperature", "nan", weights_dir=tmp)
    procs["convert_onto_folder"] = start("convert", "pickle", tmp / "legacy.pt", tmp / "out_dir", "--overwrite")
    procs["valid_inputs"] = start("run", "--preset", "tiny-random", "--prompt", "Describe them.", "--out",
                                  tmp / "valid", "--image", files / "deep.png", "--audio", f"/dev/fd/{r}",
                                  "--audio", files / "extensible.wav", "--video", files / "slow.gif",
                                  "--max-new-tokens", "2", weights_dir=tmp, pass_fds=(r,))
    os.close(r)
    writer.start()
    done = {name: finish(p) for name, p in procs.items()}
    writer.join()
    return done | {"tmp": tmp, "base": base}


def test_run_unwritable_out_fails_before_the_model_loads(runs, files, capsys):
    assert "/sys/minignext-out" in one_line_error(runs["unwritable"], "run")
    assert "loading preset" not in runs["unwritable"].stderr
    with pytest.raises(SystemExit) as e:            # the same boundary, in-process: --out under a file
        cli.main(["run", "--preset", "tiny-random", "--prompt", "hi", "--out", str(files / "tone.wav" / "out")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("minignext run: error: ") and "Not a directory" in err
    assert "loading preset" not in err


def test_run_temperature_nan_is_refused_by_the_parser(runs):
    assert "argument --temperature: 'nan' is not a number >= 0" in runs["temperature_nan"].stderr
    assert runs["temperature_nan"].returncode == 2 and "Traceback" not in runs["temperature_nan"].stderr


def test_run_nextgpt_json_missing_a_key_or_malformed_is_named(runs, tmp_path):
    assert "nextgpt.json lacks enc_dim" in one_line_error(runs["missing_key"], "run")
    from minignext.systems.nextgpt_checkpoint import load_folder

    folder = variant(runs["base"], tmp_path / "w", lambda f: edit_json(
        f / "nextgpt.json", lambda m: m["projections"].update(image="oops")))
    with pytest.raises(weights.WeightsError, match="nextgpt.json: projections has image; expected a dict"):
        load_folder(folder / "toy" / "nextgpt")
    edit_json(folder / "toy" / "nextgpt" / "nextgpt.json", lambda m: m.update(projections={}, decoders=["x"]))
    with pytest.raises(weights.WeightsError, match=r"decoders is \['x'\]; expected a dict"):
        load_folder(folder / "toy" / "nextgpt")


def test_run_renamed_lora_key_is_an_error_not_an_unmerged_layer(runs):
    assert "q_proj.lora_B_old.weight" in one_line_error(runs["renamed_lora"], "run")


def test_run_nan_weights_are_an_error_not_an_empty_answer(runs):
    assert "NaN or infinite" in one_line_error(runs["nan_weights"], "run")


def test_run_decoder_that_cannot_load_fails_the_run(runs):
    line = one_line_error(runs["broken_decoder"], "run")
    assert "image decoder could not be loaded" in line and "no_such_decoder" in line
    assert not (runs["tmp"] / "out_broken_decoder" / "transcript.md").exists()     # the claim is given back


def test_convert_overwrite_onto_a_folder_is_one_line_and_leaves_nothing(runs):
    assert "is a folder" in one_line_error(runs["convert_onto_folder"], "convert")
    assert list((runs["tmp"] / "out_dir").iterdir()) == [] and not list(runs["tmp"].glob("*.partial"))


def test_convert_legacy_pickle(runs, tmp_path, capsys):
    cli.main(["convert", "pickle", str(runs["tmp"] / "legacy.pt"), str(tmp_path / "legacy.safetensors")])
    assert "wrote" in capsys.readouterr().out
    torch.testing.assert_close(weights.load_safetensors(tmp_path / "legacy.safetensors")["w"], torch.ones(2))


def test_run_valid_inputs_are_accepted(runs):
    """A 16-bit PNG, a WAV from a pipe (<(cat x.wav)), a WAVE_FORMAT_EXTENSIBLE WAV and a GIF with its own timing."""
    r = runs["valid_inputs"]
    assert r.returncode == 0, r.stderr
    transcript = (runs["tmp"] / "valid" / "transcript.md").read_text()
    assert all(name in transcript for name in ("deep.png", "/dev/fd/", "extensible.wav", "slow.gif"))


# ---------------------------------------------------------------- options, parsed in-process

@pytest.mark.parametrize("option, value, message", [
    ("--temperature", "nan", "is not a number >= 0"), ("--guidance", "nan", "is not a number >= 0"),
    ("--guidance", "inf", "is not a number >= 0"), ("--steps", "0", "is not an integer >= 1"),
    ("--top-p", "0", "is not a number > 0 and <= 1"), ("--max-new-tokens", "0", "is not an integer >= 1"),
    ("--prompt", "  ", "the prompt is empty")])
def test_options_are_checked_at_the_parser(option, value, message, tmp_path, capsys):
    argv = ["run", "--prompt", "hi", "--out", str(tmp_path / "o"), option, value]
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_zero_is_a_value_not_the_default():
    from minignext.chat import add_generation_args, generation_kwargs

    p = __import__("argparse").ArgumentParser()
    add_generation_args(p)
    kw = generation_kwargs(p.parse_args(["--guidance", "0", "--temperature", "0", "--seed", "0"]))
    assert kw["guidance_scale"] == 0.0 and kw["temperature"] == 0.0 and kw["seed"] == 0
    assert generation_kwargs(p.parse_args([]))["guidance_scale"] is None


# ---------------------------------------------------------------- concurrency

def test_parallel_runs_match_sequential_ones_and_one_folder_never_loses_a_file(tmp_path):
    """4 runs into distinct folders at once give the files 4 runs one after the other give;
    2 runs into one folder at once: one wins, the other stops before writing anything."""
    prompts = ["a red one", "a blue one", "a green one", "a grey one"]

    def argv(prompt, out):
        return ["run", "--preset", "tiny-random", "--prompt", prompt, "--out", str(out), "--seed", str(len(prompt)),
                "--force-response", f"Sure. {IMG}", "--steps", "1", "--max-new-tokens", "2"]
    parallel = [start(*argv(p, tmp_path / f"par{i}"), weights_dir=tmp_path) for i, p in enumerate(prompts)]
    same = [start(*argv(p, tmp_path / "same"), weights_dir=tmp_path) for p in prompts[:2]]
    sequential = [argv(p, tmp_path / f"seq{i}") for i, p in enumerate(prompts)]
    seq = subprocess.run([sys.executable, "-c", f"from minignext import cli\nfor a in {sequential!r}: cli.main(a)"],
                         capture_output=True, text=True, env=env(tmp_path), timeout=240)
    results = [finish(p) for p in parallel]
    assert seq.returncode == 0, seq.stderr
    for i, r in enumerate(results):
        assert r.returncode == 0, r.stderr
        for name in ("reply_image0.png", "transcript.md"):
            assert (tmp_path / f"par{i}" / name).read_bytes() == (tmp_path / f"seq{i}" / name).read_bytes(), name
    both = [finish(p) for p in same]
    assert sorted(r.returncode for r in both) == [0, 2], [r.stderr for r in both]
    loser = next(r for r in both if r.returncode == 2)
    assert "earlier run" in one_line_error(loser, "run") and "loading preset" not in loser.stderr
    winner = next(r for r in both if r.returncode == 0)
    assert sorted(p.name for p in (tmp_path / "same").iterdir()) == ["reply_image0.png", "transcript.md"]
    assert winner.stdout.split("\n")[0] in (tmp_path / "same" / "transcript.md").read_text()


def claim_in_process(base, queue):
    from minignext.utils import fresh_folder
    queue.put(str(fresh_folder(base)))


def test_parallel_default_folders_are_never_shared(tmp_path):
    """What two `minignext demo` started together do with out/demo, with 8 processes."""
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / "transcript.md").write_text("an earlier run")
    procs = [ctx.Process(target=claim_in_process, args=(tmp_path / "demo", queue)) for _ in range(8)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
    folders = sorted(queue.get(timeout=5) for _ in procs)
    assert len(set(folders)) == 8 and str(tmp_path / "demo") not in folders
    assert (tmp_path / "demo" / "transcript.md").read_text() == "an earlier run"


# ---------------------------------------------------------------- output folders, in-process

def test_a_reply_that_cannot_be_saved_leaves_no_half_of_it(tmp_path):
    from PIL import Image

    from minignext.chat import save_reply
    from minignext.systems.nextgpt import Reply

    nan_sound = (np.full(8, np.nan, np.float32), 16000)
    reply = Reply(text="two things", images=[Image.new("RGB", (4, 4))], audios=[nan_sound])
    with pytest.raises(ValueError, match="NaN"):
        save_reply(reply, tmp_path, "turn1")
    assert list(tmp_path.iterdir()) == []


def test_chat_into_a_folder_holding_an_earlier_chat_needs_overwrite(tmp_path, capsys, monkeypatch):
    (tmp_path / "transcript.md").write_text("an earlier chat")
    with pytest.raises(SystemExit) as e:
        cli.main(["chat", "--preset", "tiny-random", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "earlier run" in err and "--overwrite" in err and "loading preset" not in err
    monkeypatch.setattr("builtins.input", lambda prompt="": (_ for _ in ()).throw(EOFError))
    cli.main(["chat", "--preset", "tiny-random", "--out", str(tmp_path), "--overwrite"])     # chat has --overwrite
    assert (tmp_path / "transcript.md").read_text() == "an earlier chat"        # nothing said, nothing written
