"""NExT-GPT's training data in the reference's own formats (NExT-GPT-Lagacy code/dataset/*.py,
data/DATA_README.md and data/IT_data/MosIT_data/construction of github.com/NExT-GPT/NExT-GPT), read by
minignext's own code, and written small and synthetic for tests and lessons (`write_synthetic`).

    DIR/T_X_pair_data/cc3m/cc3m.json          [{"image_name": "001.jpg", "caption": "..."}, ...]
        .../cc3m/images/                      the images
    DIR/T_X_pair_data/webvid/webvid.json      [{"video_name": ..., "caption": ...}]; videos in webvid/videos/
    DIR/T_X_pair_data/audiocap/audiocap.json  [{"audio_name": ..., "caption": ...}]; sounds in audiocap/audios/
    DIR/embed/NAME.npy                        a caption's decoder conditioning, the target of the signal
                                              tokens, as the reference's process_embeddings.py writes it:
                                              SD-1.5's 77 x 768 text states (image), ZeroScope's 77 x 1024
                                              (video), AudioLDM's 512-d CLAP vector (audio)
    DIR/IT_data/MosIT_data/mosit.json         [{"conversation": [{"from": "human" | "gpt", "value": ...}, ...],
                                                "image_list": [{"image_name", "caption"}, ...],
                                                "video_list": [...], "audio_list": [...]}]
        .../MosIT_data/{images,videos,audios}/  the media the dialogues show

Stage 1 reads each pair as an input: "### Human: <Img>[x]</Img> generate a caption" (the reference's
stage-1 prompt), answered by the caption. Stage 2 reads it as an output: the caption, answered by the
caption and the signal tokens (process_batch_stage_2). Stage 3 reads MosIT dialogues, whose turns
name media with tags, `<Image>a dog on a beach</Image>`: the k-th image tag of a dialogue is the k-th
entry of its image_list. A tag in a human turn is an input, read from the media folder; in a gpt
turn, an output, whose target is embed/NAME.npy; the tags leave the text, and an answer's signal
tokens follow it, as the reference's stage-3 builder puts them. Captions of the pairs are cleaned as
the reference's process_caption cleans them. Videos are read as animated GIFs or folders of frames
(minignext.media): WebVid's .mp4 files must be converted first, e.g. to NAME.gif beside them.
"""

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

PAIRS = {                     # modality: (folder, json, name field, media folder)
    "image": ("cc3m", "cc3m.json", "image_name", "images"),
    "video": ("webvid", "webvid.json", "video_name", "videos"),
    "audio": ("audiocap", "audiocap.json", "audio_name", "audios"),
}
PAIR_ROOTS = ("T_X_pair_data", "T-X_pair_data")      # the repository's folder, and its README's spelling
MOSIT = Path("IT_data") / "MosIT_data" / "mosit.json"
TAGS = {"Image": "image", "Video": "video", "Audio": "audio"}
MEDIA_FOLDERS = {"image": "images", "video": "videos", "audio": "audios"}
CAPTION_PROMPT = "generate a caption"               # the reference's stage-1 prompt (config/stage_1.yaml)


@dataclass(frozen=True)
class Medium:
    modality: str               # image, video or audio
    path: Path                  # the file (inputs are read from it)
    caption: str
    embed: Path                 # its decoder conditioning (outputs)


@dataclass
class Turn:
    """One exchange, as minignext.training.stages.encode_dialogue takes it."""
    user: str
    assistant: str
    user_media: list = field(default_factory=list)
    assistant_media: list = field(default_factory=list)


def clean_caption(text: str) -> str:
    """The reference's process_caption: lower case, the characters "()*#:;~ and double quotes become
    spaces, runs of spaces one, no surrounding spaces."""
    text = re.sub(r"[\"()*#:;~]", " ", text.lower())
    return re.sub(r"\s{2,}", " ", text).strip()


def _read_json(path: Path) -> list:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of entries, got {type(data).__name__}")
    return data


def _field(entry, key, path, where):
    """entry[key], a non-empty string; `where` names the entry (its index) in the error."""
    if not isinstance(entry, dict) or not isinstance(entry.get(key), str) or not entry[key]:
        where = f"entry {where}" if isinstance(where, int) else where
        raise ValueError(f"{path}: {where} lacks the text field {key!r}")
    return entry[key]


def pair_root(data_dir) -> Path:
    for name in PAIR_ROOTS:
        if (Path(data_dir) / name).is_dir():
            return Path(data_dir) / name
    raise FileNotFoundError(f"{data_dir} holds no {PAIR_ROOTS[0]}/ folder of caption pairs (cc3m, webvid, audiocap)")


def read_pairs(data_dir) -> list[Medium]:
    """Every caption pair of CC3M, WebVid and AudioCaps present under DIR/T_X_pair_data/."""
    root, out = pair_root(data_dir), []
    for modality, (folder, name, key, media) in PAIRS.items():
        path = root / folder / name
        if not path.is_file():
            continue
        for i, entry in enumerate(_read_json(path)):
            file = _field(entry, key, path, i)
            caption = clean_caption(_field(entry, "caption", path, i))
            embed = Path(data_dir) / "embed" / f"{file}.npy"
            out.append(Medium(modality, root / folder / media / file, caption, embed))
    if not out:
        raise FileNotFoundError(f"{root} holds none of {', '.join(f'{f}/{n}' for f, n, _, _ in PAIRS.values())}")
    return out


def pair_dialogues(pairs: list[Medium], stage: int) -> list[list[Turn]]:
    """Stage 1: the medium in, its caption out. Stage 2: the caption in, the caption and the medium's
    signal tokens out."""
    if stage == 1:
        return [[Turn(CAPTION_PROMPT, m.caption, user_media=[m])] for m in pairs]
    return [[Turn(m.caption, m.caption, assistant_media=[m])] for m in pairs]


def read_mosit(data_dir) -> list[list[Turn]]:
    """The MosIT-style dialogues of DIR/IT_data/MosIT_data/mosit.json."""
    path = Path(data_dir) / MOSIT
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: stage 3 reads MosIT-style dialogues from it")
    dialogues = []
    for i, entry in enumerate(_read_json(path)):
        turns = entry.get("conversation") if isinstance(entry, dict) else None
        if not isinstance(turns, list) or not turns:
            raise ValueError(f"{path}: entry {i} lacks its 'conversation' list")
        media = {m: iter(entry.get(f"{m}_list") or []) for m in MEDIA_FOLDERS}
        dialogue = []
        for j in range(0, len(turns), 2):
            pair = turns[j:j + 2]
            roles = tuple(t.get("from") if isinstance(t, dict) else None for t in pair)
            if roles != ("human", "gpt"):
                raise ValueError(f"{path}: entry {i} must alternate human and gpt turns, starting with human; "
                                 f"turns {j} and {j + 1} are {roles}")
            (user, inputs), (answer, outputs) = (_tagged(_field(t, "value", path, i), media, data_dir, f"entry {i}")
                                                 for t in pair)
            dialogue.append(Turn(user, answer, inputs, outputs))
        dialogues.append(dialogue)
    return dialogues


def _tagged(text, media: dict, data_dir, where: str) -> tuple[str, list]:
    """A turn's text without its <Image>...</Image> tags, and the media they stand for: the next
    entries of the dialogue's lists (`media`, an iterator per modality)."""
    path, found = Path(data_dir) / MOSIT, []
    for tag in re.findall(r"<(Image|Video|Audio)>.*?</\1>", text, flags=re.DOTALL):
        m = TAGS[tag]
        item = next(media[m], None)
        if item is None:
            raise ValueError(f"{path}: {where} shows more <{tag}> tags than its {m}_list has entries")
        file = _field(item, f"{m}_name", path, where)
        found.append(Medium(m, path.parent / MEDIA_FOLDERS[m] / file, item.get("caption", ""),
                            Path(data_dir) / "embed" / f"{file}.npy"))
    text = re.sub(r"<(Image|Video|Audio)>.*?</\1>", " ", text, flags=re.DOTALL)
    return re.sub(r"\s+", " ", text).strip(), found


def video_source(path: Path):
    """What minignext.media reads for a video file: itself if a GIF or a folder of frames, else the
    NAME.gif or NAME/ folder beside it."""
    if path.suffix.lower() == ".gif" or path.is_dir():
        return path
    for other in (path.with_suffix(".gif"), path.with_suffix("")):
        if other.exists():
            return other
    raise ValueError(f"{path}: minignext reads videos as animated GIFs or folders of frames; convert it, e.g. "
                     f"`ffmpeg -i {path.name} {path.with_suffix('').name}/%04d.png` in its folder")


def load_target(medium: Medium, shape) -> torch.Tensor:
    """The decoder conditioning of an output medium, (Q, D) = `shape` (a 1-d vector is one token)."""
    if not medium.embed.is_file():
        raise FileNotFoundError(f"{medium.embed} is missing: the {medium.modality} output {medium.path.name} needs "
                                f"its caption's decoder conditioning, shape {tuple(shape)}, precomputed as the "
                                f"reference's process_embeddings.py does")
    x = torch.from_numpy(np.load(medium.embed, allow_pickle=False)).float()
    x = x[None] if x.dim() == 1 else x
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{medium.embed} holds shape {tuple(x.shape)}; the {medium.modality} projection makes "
                         f"{tuple(shape)}")
    return x


# ---------------------------------------------------------------- a small synthetic set in those formats

WORDS = ("red", "blue", "green", "dog", "cat", "bird", "on", "a", "beach", "field", "running", "sings", "loud")


def write_synthetic(data_dir, cond_shapes: dict, n=6, seed=0) -> Path:
    """n caption pairs per modality and n MosIT dialogues of two turns, with random media and random
    conditioning of `cond_shapes` {modality: (Q, D)}, laid out as the reference keeps its data."""
    from PIL import Image

    from minignext.media import write_gif, write_wav

    rng = np.random.default_rng(seed)
    root = Path(data_dir)
    pair = root / PAIR_ROOTS[0]

    def caption():
        return " ".join(WORDS[i] for i in rng.integers(len(WORDS), size=rng.integers(3, 7)))

    def medium(modality, folder, stem):
        folder.mkdir(parents=True, exist_ok=True)
        if modality == "image":
            name = f"{stem}.jpg"
            Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(folder / name)
        elif modality == "video":
            name = f"{stem}.gif"
            write_gif(folder / name, rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8))
        else:
            name = f"{stem}.wav"
            write_wav(folder / name, torch.from_numpy(rng.standard_normal(8000).astype(np.float32) * 0.1), 16000)
        q, d = cond_shapes[modality]
        (root / "embed").mkdir(parents=True, exist_ok=True)
        target = rng.standard_normal((d,) if modality == "audio" and q == 1 else (q, d)).astype(np.float32)
        np.save(root / "embed" / f"{name}.npy", target)
        return name

    for modality, (folder, file, key, media) in PAIRS.items():
        entries = [{key: medium(modality, pair / folder / media, f"{modality[0]}{i:05d}"), "caption": caption()}
                   for i in range(n)]
        (pair / folder / file).write_text(json.dumps(entries, indent=1))
    mosit, dialogues = root / MOSIT, []
    for i in range(n):
        shown, made = ("image", "audio", "video")[i % 3], ("video", "image", "audio")[i % 3]
        lists = {m: [] for m in MEDIA_FOLDERS}
        for modality in (shown, made):
            stem = f"mosit_{modality[0]}_{i:05d}_{len(lists[modality])}"
            lists[modality].append({f"{modality}_name": medium(modality, mosit.parent / MEDIA_FOLDERS[modality], stem),
                                    "data_source": "synthetic", "caption": caption()})
        tag, out = shown.capitalize(), made.capitalize()
        dialogues.append({
            **{f"{m}_list": v for m, v in lists.items()},
            "conversation": [
                {"from": "human", "value": f"look at this {caption()} <{tag}>{lists[shown][0]['caption']}</{tag}>"},
                {"from": "gpt", "value": f"it shows {caption()}."},
                {"from": "human", "value": f"now make one of {caption()}"},
                {"from": "gpt", "value": f"here it is. <{out}>{lists[made][-1]['caption']}</{out}>"}]})
    mosit.write_text(json.dumps(dialogues, indent=1))
    return root
