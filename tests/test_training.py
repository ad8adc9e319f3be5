"""The training kit's pieces in one process: torchrun's environment, shares and the stateless sampler,
a run stopped and resumed, checkpoints without the frozen weights, the twin FSDP shards, the readers of
the reference's data formats, NExT-GPT's examples with several media, and the memory table of the
README and lesson 11 against its computation."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from minignext.systems.nextgpt import Conversation
from minignext.tiny import TINY, tiny_random
from minignext.toy.trainer import Run, RunArgs, RunStopped, optimizer_step
from minignext.training import data, distributed, memory, stages

ROOT = Path(__file__).resolve().parent.parent


def test_run_args_from_torchruns_environment(monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    args = RunArgs.from_env(seed=4, device="cuda")
    assert (args.rank, args.world_size, args.device, args.main) == (1, 3, "cuda:1", False)
    assert args.shard(list(range(8))) == [1, 4, 7]
    assert torch.equal(args.shard(torch.arange(8)), torch.tensor([1, 4, 7]))
    monkeypatch.setenv("RANK", "3")
    with pytest.raises(ValueError, match="RANK=3 must be below WORLD_SIZE=3"):
        RunArgs.from_env()
    monkeypatch.setenv("RANK", "x")
    with pytest.raises(ValueError, match="RANK must be a non-negative integer"):
        RunArgs.from_env()
    with pytest.raises(ValueError, match="stop_after"):
        RunArgs(stop_after=0)


def test_the_sampler_walks_epochs_of_permutations():
    args = RunArgs(seed=3)
    steps = [args.sample("s", step, n=5, batch=3) for step in range(5)]      # 15 draws = 3 epochs
    flat = [i for s in steps for i in s]
    assert all(sorted(flat[k:k + 5]) == list(range(5)) for k in (0, 5, 10))
    assert flat[:5] != flat[5:10] or flat[5:10] != flat[10:]
    assert args.sample("s", 3, 5, 3) == steps[3] and RunArgs(seed=4).sample("s", 0, 5, 3) != steps[0]


def train_tiny(tmp_path, total, **args):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 1))
    model[0].requires_grad_(False)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.1)
    run_args = RunArgs(progress=False, runs_dir=tmp_path, **args)
    run = Run.start("tiny", run_args, {"model": model}, opt, total, 0.1, warmup=1, save_frozen=False)
    for step in run.steps():
        x = run_args.rng("tiny/x", step).standard_normal((5, 3)).astype(np.float32)
        loss = run.forward(lambda m, x: m(torch.from_numpy(x)).pow(2).mean(), model, x)
        optimizer_step(opt, loss, model.parameters())
        run.log(loss.item())
    return model


def test_a_stopped_run_resumes_to_the_uninterrupted_result(tmp_path):
    whole = train_tiny(tmp_path / "a", 6)
    with pytest.raises(RunStopped, match="stopped after step 4 of 6"):
        train_tiny(tmp_path / "b", 6, stop_after=4)
    state = torch.load(tmp_path / "b" / "tiny-seed0-scale1" / "state.pt", weights_only=True)
    assert state["step"] == 4 and set(state["modules"]["model"]) == {"1.weight", "1.bias"}   # no frozen weights
    resumed = train_tiny(tmp_path / "b", 6)
    for a, b in zip(whole.parameters(), resumed.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_the_twin_shares_tensors_not_modules():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU())
    model[0].weight.first_trained_row = 1
    shadow = distributed.twin(model)
    assert shadow[0] is not model[0] and shadow[0].weight is not model[0].weight
    assert shadow[0].weight.data_ptr() == model[0].weight.data_ptr()
    shadow[0].register_forward_pre_hook(lambda m, a: None)
    shadow[0].weight = torch.nn.Parameter(torch.zeros(2, 2))
    assert not model[0]._forward_pre_hooks and model[0].weight.abs().sum() > 0
    x = torch.ones(1, 2)
    out = model(x).sum()
    assert distributed.graph_leaves(out) == {id(model[0].weight), id(model[0].bias)}


def write_pairs(root):
    pair = root / "T_X_pair_data" / "cc3m"
    (pair / "images").mkdir(parents=True)
    (pair / "cc3m.json").write_text(json.dumps([{"image_name": "1.jpg", "caption": "A \"Dog\" (running): ~ "}]))
    return root


def test_caption_pairs_read_as_the_reference_reads_them(tmp_path):
    (m,) = data.read_pairs(write_pairs(tmp_path))
    assert (m.modality, m.caption) == ("image", "a dog running")
    assert m.path == tmp_path / "T_X_pair_data" / "cc3m" / "images" / "1.jpg"
    assert m.embed == tmp_path / "embed" / "1.jpg.npy"
    (first,), (second,) = data.pair_dialogues([m], 1), data.pair_dialogues([m], 2)
    assert (first[0].user, first[0].assistant, first[0].user_media) == ("generate a caption", "a dog running", [m])
    assert (second[0].user, second[0].assistant_media) == ("a dog running", [m])
    with pytest.raises(FileNotFoundError, match="1.jpg.npy is missing.*shape \\(77, 768\\)"):
        data.load_target(m, (77, 768))
    (tmp_path / "embed").mkdir()
    np.save(tmp_path / "embed" / "1.jpg.npy", np.zeros((77, 1024), np.float32))
    with pytest.raises(ValueError, match="holds shape \\(77, 1024\\); the image projection makes \\(77, 768\\)"):
        data.load_target(m, (77, 768))
    (tmp_path / "T_X_pair_data" / "cc3m" / "cc3m.json").write_text(json.dumps([{"image_name": "1.jpg"}]))
    with pytest.raises(ValueError, match="entry 0 lacks the text field 'caption'"):
        data.read_pairs(tmp_path)


def write_mosit(root, conversation, **lists):
    path = root / data.MOSIT
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps([{"conversation": conversation, **lists}]))


def test_mosit_tags_become_inputs_and_outputs(tmp_path):
    conversation = [{"from": "human", "value": "hear this <Audio>rain</Audio> and see <Image>a cloud</Image>"},
                    {"from": "gpt", "value": "a storm. <Image>dark sky</Image> <Video>lightning</Video>"}]
    write_mosit(tmp_path, conversation, image_list=[{"image_name": "i0.jpg", "caption": "a cloud"},
                                                    {"image_name": "i1.jpg", "caption": "dark sky"}],
                audio_list=[{"audio_name": "a0.wav"}], video_list=[{"video_name": "v0.mp4"}])
    ((turn,),) = data.read_mosit(tmp_path)
    assert (turn.user, turn.assistant) == ("hear this and see", "a storm.")
    assert [(m.modality, m.path.name) for m in turn.user_media] == [("audio", "a0.wav"), ("image", "i0.jpg")]
    assert [(m.modality, m.path.name) for m in turn.assistant_media] == [("image", "i1.jpg"), ("video", "v0.mp4")]
    assert turn.assistant_media[0].embed == tmp_path / "embed" / "i1.jpg.npy"
    with pytest.raises(ValueError, match="GIFs or folders of frames; convert it"):
        data.video_source(turn.assistant_media[1].path)
    write_mosit(tmp_path, conversation[::-1], image_list=[{"image_name": "i0.jpg"}] * 2)
    with pytest.raises(ValueError, match="alternate human and gpt turns"):
        data.read_mosit(tmp_path)
    write_mosit(tmp_path, conversation, image_list=[{"image_name": "i0.jpg"}], audio_list=[{"audio_name": "a"}])
    with pytest.raises(ValueError, match="more <Image> tags than its image_list has entries"):
        data.read_mosit(tmp_path)


def test_a_dialogue_with_several_media_is_laid_out_as_the_prompt():
    model = tiny_random()
    vectors = {"a": torch.randn(model.llama_proj.in_features), "b": torch.randn(model.llama_proj.in_features)}
    shown = [data.Medium("image", Path(k), "", None) for k in vectors]
    made = [data.Medium(m, None, "", None) for m in ("audio", "image")]
    turn = data.Turn("compare them", "done", shown, made)
    ex = stages.encode_dialogue(model, [turn], lambda m: vectors[str(m.path)],
                                lambda m: torch.zeros(TINY["cond"][m.modality]))
    conv = Conversation().user("compare them", image=[np.zeros((8, 8, 3), np.uint8)] * 2)
    conv.turns[0].soft.extend(torch.zeros(1, model.llama_model.config.hidden_size) for _ in range(2))
    prompt = model.build_prompt(conv)
    assert [0 if i == -1 else i for i in prompt.ids] == ex["ids"][:len(prompt.ids)]
    assert [p for p, _ in ex["soft"]] == prompt.soft_positions
    assert [torch.equal(v, vectors[k]) for (_, v), k in zip(ex["soft"], "ab")] == [True, True]
    (audio, a_start, _), (image, i_start, _) = ex["runs"]
    assert (audio, image) == ("audio", "image") and i_start == a_start + len(model.signal_ids["audio"])
    cut = stages.encode_dialogue(model, [turn], lambda m: vectors[str(m.path)],
                                 lambda m: torch.zeros(TINY["cond"][m.modality]), max_tokens=i_start + 1)
    assert len(cut["ids"]) == i_start + 1 and [r[0] for r in cut["runs"]] == ["audio"]


def test_the_memory_tables_of_the_docs_are_computed():
    """README and lesson 11 print what python -m minignext.train memory computes on the meta device."""
    text = memory.markdown_table()
    for doc in ("README.md", "LESSONS.md"):
        assert text in (ROOT / doc).read_text(), doc
    t = memory.table(gpus=(1, 4))
    rows = {(way, stage): gb for way, stage, _, gb in t["rows"]}
    assert rows[("FSDP", 3)][0] == rows[("DDP", 3)][0] > rows[("FSDP", 3)][1]
    lora = 32 * 4 * 2 * 32 * 4096                    # r = 32 on q, k, v, o of 32 layers: A and B
    trained = {stage: n for way, stage, n, _ in t["rows"] if way == "DDP"}
    assert trained[1] == 1024 * 4096 + 4096 and trained[3] == trained[2] + trained[1] + lora
    assert 2e6 < t["activations"] < 2e7              # bytes a token: a 7B LLaMA keeps megabytes


def test_the_training_command(tmp_path, capsys):
    from minignext import train

    train.main(["synthetic", str(tmp_path / "data"), "--n", "2"])
    assert len(data.read_pairs(tmp_path / "data")) == 6 and len(data.read_mosit(tmp_path / "data")) == 2
    ns = train.parser().parse_args(["nextgpt", "--data", "d", "--out", "o", "--fsdp", "--last-stage", "2"])
    assert (ns.preset, ns.fsdp, ns.last_stage, ns.dtype) == ("nextgpt-7b", True, 2, "float32")
    with pytest.raises(SystemExit):
        train.parser().parse_args(["nextgpt", "--data", "d", "--out", "o", "--last-stage", "4"])
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            train.main(["nextgpt", "--data", "d", "--out", "o", "--device", "cuda"])
        assert "no CUDA device" in capsys.readouterr().err


def test_replay_updates_run_after_each_step_on_one_process_only(tmp_path):
    """The smol recipe's Replay, through stages.run_stage: it keeps every step's signal states and moves
    the output projections further than the step alone; on several processes it is refused."""
    from minignext.toy.train_nextgpt import Replay

    torch.manual_seed(0)
    target = torch.randn(TINY["cond"]["image"])
    turn = data.Turn("make a picture", "here it is", [], [data.Medium("image", None, "", None)])

    def train(replay_updates):
        model = tiny_random()
        model.first_new_id = model.signal_ids["image"][0]
        ex = stages.encode_dialogue(model, [turn], None, lambda m: target)
        args = RunArgs(progress=False, runs_dir=tmp_path / str(replay_updates))
        replay = Replay(model, replay_updates, args) if replay_updates else None
        stages.run_stage(model, 2, args, lambda step: [ex, ex], steps=2, lr=1e-3, warmup=1, replay=replay)
        return model, replay

    plain, _ = train(0)
    model, replay = train(3)
    assert len(replay.steps) == 2 and [m for m, _, _ in replay.steps[0]] == ["image", "image"]
    moved = [(a - b).abs().max() for a, b in zip(model.output_projection("image").parameters(),
                                                 plain.output_projection("image").parameters())]
    assert max(moved) > 1e-4
    with pytest.raises(ValueError, match="trains on one process"):
        Replay(model, 3, RunArgs(rank=0, world_size=2))
