"""AnyGPT (Zhan et al. 2024, "AnyGPT: Unified Multimodal LLM with Discrete Sequence Modeling", arXiv
2402.12226) on the toy world: every medium becomes discrete codes in the LLM's own vocabulary, and the
LLM itself learns to read and write them with one next-token loss. No encoder, no projection, no
decoder conditioning: the tokenizers' decoders turn the codes the LLM writes back into media.

    1. image tokenizer  a VQ-VAE (minignext.vq, diffusers' VQModel layout): a 32x32 image -> 4x4 = 16
                        codes of a 256-row codebook, trained on reconstruction plus a semantic term
                        (semantic_loss: a linear map of each code's row must name the colour and shape
                        of the object the code covers). AnyGPT's SEED tokenizer (a Q-Former over a ViT,
                        decoded through unCLIP) exists only in its own code; a VQ-VAE is the image
                        tokenizer of its predecessors (Chameleon, LVM) and of the toy, and the semantic
                        term gives its codes what SEED's training gives SEED's: codes that say what
                        they show.
    2. audio tokenizer  a mel codec (minignext.melcodec): EnCodec's encoder, residual VQ and decoder over
                        the log-mel frames of the toy audio decoder (32 bands, 64 frames per second),
                        2 codebooks of 128 at 16 frames per second: 32 codes per 1 s sound, laid out as
                        AnyGPT lays out EnCodec's music codes (frame by frame, codebook k's codes offset
                        by 128 k); Griffin-Lim turns decoded mels into sound, as in the toy audio decoder.
                        AnyGPT's music tokenizer is EnCodec on the waveform. Trained here without a
                        discriminator, that codec did not learn to oscillate in budget: at 4 kHz, 2 x 128
                        codes at 25 Hz, 1,200 steps of 16 sounds (4 CPU minutes), 2% of the world's sounds
                        came back as one clean tone by the checker (at 16 kHz, 300 steps: 0%), where this
                        codec brings back 98% after 800 steps (25 CPU seconds).
    3. the LLM          the toy LLaMA (weights/toy/llm) with AnyGPT's media tokens added
                        (MediaVocab.add_to, then resize_token_embeddings; the new rows start random), ALL
                        of it trained, as AnyGPT trains its LLM, on single-turn exchanges in the toy LLM's
                        Vicuna-v0 template: text -> image and audio, image and audio -> text, image <->
                        audio. Labels only on the answer (its words, its media span and the closing "###").

The world has no speech: AnyGPT's speech block stays in the vocabulary (so the layout is AnyGPT's), at
the size of one audio codebook, and no example uses it. Video is out of scope: a clip at the image
tokenizer's grid is 8 frames x 16 = 128 codes, a third kind of medium to write that the LLM's share of
the toy AnyGPT's 20 minutes does not cover.

Why the semantic term. Trained on reconstruction alone, the tokenizer's codes describe pixels: the same
red circle rendered four times shares hardly a code, and a probe (an MLP over the 16 codes) trained on the
bank's renders names the object of fresh renders 24% of the time. The LLM, which sees each bank render
a few times, learned the bank by heart and named fresh pictures 19-25% right (8x8 and 4x4 grids alike,
after 1,000 and 2,400 steps). With the semantic term (weight SEMANTIC_WEIGHT, averaged over the codes that
cover the object, so background codes stay free) the same probe reaches 97%, the decoder still draws
the object right from the codes (124 of 126 renders by the checker), and the LLM reads and writes
pictures (lesson 10 has the table).

The tokenizers train on rendered media (counted apart from the LLM's examples, which count against
family.DATA_BUDGET); the LLM reads media as the codes of a bank rendered and encoded once. What ships,
in weights/toy/anygpt/ (all of it in fp16, under 8 MB): llm/ (HF LLaMA folder whose tokenizer holds the
media tokens), image_tokenizer/ (diffusers VQModel), music_tokenizer/ (EncodecModel folder with its
mel settings), generation.json (sampling per answer modality, as AnyGPT's config/*_generate_config.json)
and training.json.

    python -m minignext.toy.train anygpt
    python -m minignext.toy.eval anygpt
"""

import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from minignext.encodec import Encodec, EncodecConfig, quantize_for_training
from minignext.llama import Llama
from minignext.melcodec import MelCodec
from minignext.systems.anygpt import AnyGPT, MediaVocab, MediaVocabConfig
from minignext.tokenizer import VICUNA_V0, Tokenizer
from minignext.toy import family, latent_diffusion, world
from minignext.toy import train_llm as toy_llm
from minignext.toy.mllm import pad_batch
from minignext.toy.train_audio_decoder import MEL_FLOOR, vocoder_config
from minignext.toy.train_image_decoder import coloured, object_weights
from minignext.toy.trainer import ADAM_BETAS, TOY_DIR, Run, RunArgs, optimizer_step
from minignext.vq import VQModel, VQModelConfig

OUT_DIR = TOY_DIR / "anygpt"
MODALITY = {"image": "image", "audio": "music"}        # world modality -> AnyGPT's
IMAGE_CODES = 256
AUDIO_CODES, AUDIO_CODEBOOKS, AUDIO_HOP = 128, 2, 4     # 64 mel frames per second / 4 = 16 code frames
SCHEDULE = {                                            # steps, batch, peak lr; media rendered for the run
    "image_tokenizer": dict(steps=2400, batch=32, lr=2e-3, media=4096),
    "audio_tokenizer": dict(steps=800, batch=32, lr=3e-3, media=2048),
    "llm": dict(steps=3000, batch=32, lr=1.5e-3),
}
KINDS = {"make_image": 0.28, "describe_image": 0.22, "make_audio": 0.12, "describe_audio": 0.10,
         "image_to_audio": 0.12, "audio_to_image": 0.16}   # share of each exchange in the LLM's batches
BANK_PER_KEY = 64                                        # rendered and encoded media per object and modality
SEMANTIC_WEIGHT = 0.5                                    # the image tokenizer's semantic term (0: pixels only)
LLM_BF16 = True         # the LLM's matmuls in bfloat16 (autocast; weights and Adam stay fp32): a fifth faster here
RESTART_UNTIL = 0.8                                      # dead codebook rows restart until this share of a run
GENERATION = {"text": {"temperature": 0.0}, "image": {"temperature": 0.3}, "music": {"temperature": 1.0}}
STORE_DTYPE = torch.float16


# ---------------------------------------------------------------- 1. the image tokenizer

def image_tokenizer_config() -> VQModelConfig:
    """About 0.3M parameters; four levels make 8x8 pixels per code."""
    return VQModelConfig(block_out_channels=(16, 32, 32, 32), down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=1, latent_channels=8,
                         norm_num_groups=4, num_vq_embeddings=IMAGE_CODES, sample_size=world.IMAGE_SIZE,
                         mid_block_add_attention=False)


def rendered(modality, n, rng):
    """n training media as the tokenizers take them, and each one's object as (colour index, shape
    index), (n, 2): images (n, 3, 32, 32) in [-1, 1], sounds (n, 1, 16000)."""
    media = world.sample_media(modality, n, rng)
    x = world.render_batch(media, rng)
    x = latent_diffusion.to_pixels(x) if modality == "image" else torch.from_numpy(x)[:, None]
    return x, torch.tensor([[world.COLOURS.index(m.obj.colour), world.SHAPES.index(m.obj.shape)] for m in media])


def semantic_loss(head: torch.nn.Linear, z_q, labels, images) -> torch.Tensor:
    """The tokenizer's semantic term: every code's vector scores the colours and shapes by one linear map,
    the scores are averaged over the codes that hold some of the object (weighted by how much), and
    cross-entropy asks them to name the image's object. A code's row must then say what it is part of,
    not only what its pixels look like; the background's codes stay free for the background."""
    cover = F.adaptive_avg_pool2d(coloured(images), z_q.shape[-2:])   # (B, 1, h, w)
    cover = cover / cover.sum(dim=(2, 3), keepdim=True).clamp_min(1e-6)
    scores = (head(z_q.permute(0, 2, 3, 1)) * cover.permute(0, 2, 3, 1)).sum(dim=(1, 2))
    colours = len(world.COLOURS)
    return (F.cross_entropy(scores[:, :colours], labels[:, 0])
            + F.cross_entropy(scores[:, colours:], labels[:, 1]))


@torch.no_grad()
def restart_dead_rows(codebook: torch.Tensor, used, frames, generator):
    """Codebook rows no frame chose restart at random frames of the batch (van den Oord et al.'s codebook
    loss only moves the rows that are chosen, so an unlucky row stays dead)."""
    dead = used == 0
    if dead.any():
        codebook[dead] = frames[torch.randint(0, len(frames), (int(dead.sum()),), generator=generator)]


def train_image_tokenizer(args: RunArgs):
    """The VQ-VAE on rendered images: L1 + L2 reconstruction with the object's pixels weighted 10x (the
    checkers judge its corners and arms), plus van den Oord et al.'s codebook and commitment terms
    (vq.vq_loss) and SEMANTIC_WEIGHT x semantic_loss, whose linear head trains alongside and is not
    shipped. The codebook starts at encoder outputs of the first batch."""
    s = SCHEDULE["image_tokenizer"]
    n = args.count(s["media"], least=s["batch"])
    images, labels = rendered("image", n, args.rng("anygpt_image_tokenizer/dataset"))
    torch.manual_seed(args.seed_of("anygpt_image_tokenizer/init"))
    vq = VQModel(image_tokenizer_config())
    head = torch.nn.Linear(vq.config.latent_channels, len(world.COLOURS) + len(world.SHAPES))
    params = [*vq.parameters(), *head.parameters()]
    opt = torch.optim.Adam(params, lr=s["lr"], betas=ADAM_BETAS)
    run = Run.start("anygpt_image_tokenizer", args, {"vq": vq, "head": head}, opt, s["steps"], s["lr"], warmup=30)
    codebook = vq.quantize.embedding.weight
    for step in run.steps():
        pick = args.rng("anygpt_image_tokenizer/batches", step).integers(len(images), size=s["batch"])
        x = images[pick]
        z = vq.encode(x)
        frames = z.detach().permute(0, 2, 3, 1).reshape(-1, z.shape[1])
        if step == 0:
            with torch.no_grad():
                codebook.copy_(frames[torch.randperm(len(frames), generator=args.generator("anygpt_image_tokenizer/start"))
                                      [:len(codebook)]])
        z_q, vq_loss, codes = vq.quantize(z)
        err = vq.decoder(vq.post_quant_conv(z_q)) - x
        w = object_weights(x)
        semantic = semantic_loss(head, z_q, labels[pick], x)
        optimizer_step(opt, (w * err.abs()).mean() + (w * err ** 2).mean() + vq_loss + SEMANTIC_WEIGHT * semantic,
                       params)
        if step < RESTART_UNTIL * run.total:
            restart_dead_rows(codebook, torch.bincount(codes.flatten(), minlength=len(codebook)), frames,
                              args.generator("anygpt_image_tokenizer/restarts", step))
        run.log(err.abs().mean().detach(), vq=vq_loss.detach(), semantic=semantic.detach())
    return vq.eval().requires_grad_(False), run


# ---------------------------------------------------------------- 2. the audio tokenizer

def audio_tokenizer_config() -> EncodecConfig:
    """About 0.13M parameters over 32 mel bins at 64 frames per second; 1 or 2 codebooks of 128."""
    mel = vocoder_config()
    rate = mel.sampling_rate // mel.hop_length
    bits = np.log2(AUDIO_CODES) * rate / AUDIO_HOP / 1000          # kbps per codebook
    return EncodecConfig(target_bandwidths=tuple(round(k * bits, 6) for k in range(1, AUDIO_CODEBOOKS + 1)),
                         sampling_rate=rate, audio_channels=mel.model_in_dim, hidden_size=32, num_filters=32,
                         upsampling_ratios=(AUDIO_HOP,), codebook_size=AUDIO_CODES, num_lstm_layers=1,
                         use_causal_conv=False)


def new_audio_tokenizer() -> MelCodec:
    return MelCodec(Encodec(audio_tokenizer_config()), vocoder_config(), MEL_FLOOR)


def train_audio_tokenizer(args: RunArgs):
    """The mel codec on rendered sounds: L1 + L2 between the log-mel and its reconstruction through both
    codebooks, plus the commitment loss; the codebooks start by k-means and follow their frames by a
    moving average, with dead rows restarted (EnCodec's quantiser training, encodec.quantize_for_training)."""
    s = SCHEDULE["audio_tokenizer"]
    torch.manual_seed(args.seed_of("anygpt_audio_tokenizer/init"))
    codec = new_audio_tokenizer()
    sounds, _ = rendered("audio", args.count(s["media"], least=s["batch"]), args.rng("anygpt_audio_tokenizer/dataset"))
    mels = codec.log_mel(sounds[:, 0])
    opt = torch.optim.Adam(codec.parameters(), lr=s["lr"], betas=ADAM_BETAS)
    run = Run.start("anygpt_audio_tokenizer", args, {"codec": codec}, opt, s["steps"], s["lr"], warmup=30)
    for step in run.steps():
        x = mels[args.rng("anygpt_audio_tokenizer/batches", step).integers(len(mels), size=s["batch"])]
        q, _, commitment = quantize_for_training(codec.quantizer, codec.codec.encoder(x), AUDIO_CODEBOOKS,
                                                 generator=args.generator("anygpt_audio_tokenizer/codebooks", step))
        err = codec.codec.decoder(q)[..., :x.shape[-1]] - x
        optimizer_step(opt, err.abs().mean() + (err ** 2).mean() + commitment, codec.parameters())
        run.log(err.abs().mean().detach(), commitment=commitment.detach())
    return codec.eval().requires_grad_(False), run


# ---------------------------------------------------------------- 3. the LLM

def build(root=TOY_DIR, image_tokenizer=None, audio_tokenizer=None, seed=0) -> AnyGPT:
    """The toy LLaMA with AnyGPT's media tokens added, its new rows random, and the two tokenizers."""
    root = Path(root)
    if not (root / "llm").is_dir():
        raise FileNotFoundError(f"{root} lacks the toy LLM; train it first with "
                                f"`python -m minignext.toy.train foundations --only llm`")
    llm = Llama.from_pretrained(root / "llm", dtype=torch.float32)
    tokenizer = Tokenizer.from_pretrained(root / "llm")
    vocab = MediaVocab.add_to(tokenizer, MediaVocabConfig(image_vocab_size=IMAGE_CODES, speech_vocab_size=AUDIO_CODES,
                                                          music_codebook_size=AUDIO_CODES,
                                                          music_codebook_num=AUDIO_CODEBOOKS))
    new = llm.resize_token_embeddings(tokenizer.vocab_size)
    with torch.no_grad(), torch.random.fork_rng():     # distinct random rows: resize starts them all at the mean
        torch.manual_seed(seed)
        for w in (llm.model.embed_tokens.weight, llm.lm_head.weight):
            w[new.start:] = torch.randn(len(new), w.shape[1]) * w[:new.start].std()
    return AnyGPT(llm, vocab, tokenizer, image_tokenizer, None, audio_tokenizer)


def media_tensor(modality, x) -> torch.Tensor:
    """One rendered medium of the world (uint8 image (H, W, 3) or waveform (16000,)) as a batch of one
    for the tokenizer of `modality`."""
    x = np.asarray(x)
    return latent_diffusion.to_pixels(x[None]) if modality == "image" else torch.from_numpy(x).float()[None, None]


@torch.no_grad()
def media_bank(model: AnyGPT, rng, per_key=BANK_PER_KEY) -> dict:
    """{(world modality, obj): [token span, ...]}: per_key rendered media of every training object,
    encoded once to their spans [start, codes..., end]."""
    bank = {}
    for modality, name in MODALITY.items():
        for obj in world.train_combinations():
            media = world.render_batch([world.Media(modality, obj)] * per_key, rng)
            x = latent_diffusion.to_pixels(media) if modality == "image" else torch.from_numpy(media)[:, None]
            bank[(modality, obj)] = model.media_ids(name, x)
    return bank


def prompt_ids(tokenizer: Tokenizer, text: str, span=None) -> list[int]:
    """One user turn in the Vicuna-v0 template, a medium's span first (where the toy LLM read its
    <Img>...</Img> marker), up to the assistant's prompt: what the answer continues."""
    head = tokenizer.encode(VICUNA_V0.user, add_bos=True)
    tail = f"{' ' if span else ''}{text}{VICUNA_V0.sep}{VICUNA_V0.assistant.rstrip()}"
    return head + list(span or []) + tokenizer.encode(tail, add_bos=False)


def stop_id(tokenizer: Tokenizer) -> int:
    """The "###" that ends an answer (the first token of the next "### Human: ")."""
    return tokenizer.encode(VICUNA_V0.user, add_bos=False)[0]


def encode_turn(tokenizer: Tokenizer, turn: world.Turn, user_span=None, answer_span=None):
    """A world turn -> (ids, labels): the prompt unlabelled (-100), then the answer's words, its media
    span and the closing "\\n###" labelled."""
    ids = prompt_ids(tokenizer, turn.user, user_span)
    answer = tokenizer.encode(f" {turn.assistant}", add_bos=False) + list(answer_span or [])
    answer += tokenizer.encode(VICUNA_V0.sep, add_bos=False) + [stop_id(tokenizer)]
    return ids + answer, [-100] * len(ids) + answer


def training_turn(rng) -> world.Turn:
    return world.turn(world.weighted_pick(rng, KINDS), rng, "train", "train")


def training_example(tokenizer, bank, rng):
    """One exchange of the LLM's data, its media drawn from the bank."""
    t = training_turn(rng)

    def span(m):
        return None if m is None else bank[(m.modality, m.obj)][rng.integers(len(bank[(m.modality, m.obj)]))]
    return encode_turn(tokenizer, t, span(t.user_media), span(t.assistant_media))


def train_llm(model: AnyGPT, bank, args: RunArgs) -> Run:
    """All of the LLM, new rows included, on the next-token loss of the answers (AnyGPT.loss)."""
    s = SCHEDULE["llm"]
    params = list(model.llm.parameters())
    opt = torch.optim.Adam(params, lr=s["lr"], betas=ADAM_BETAS)
    run = Run.start("anygpt_llm", args, {"llm": model.llm}, opt, s["steps"], s["lr"], warmup=50)
    model.llm.train()
    for step in run.steps():
        rng = args.rng("anygpt_llm/batches", step)
        batch = args.shard([training_example(model.tokenizer, bank, rng) for _ in range(s["batch"])])
        ids, labels = pad_batch([i for i, _ in batch], [lab for _, lab in batch])
        with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=LLM_BF16):
            loss = model.loss(ids, labels)
        optimizer_step(opt, loss, params)
        run.log(loss.detach())
    model.llm.eval()
    return run


# ---------------------------------------------------------------- training and saving

def train(args: RunArgs, out_dir=None, root=TOY_DIR, bank_per_key=BANK_PER_KEY) -> dict:
    t0 = time.perf_counter()
    image_tokenizer, image_run = train_image_tokenizer(args)
    audio_tokenizer, audio_run = train_audio_tokenizer(args)
    model = build(root, image_tokenizer, audio_tokenizer, args.seed_of("anygpt_llm/new-rows"))
    bank = media_bank(model, args.rng("anygpt_llm/media-bank"), bank_per_key)
    llm_run = train_llm(model, bank, args)
    out = save(model, out_dir or OUT_DIR, overwrite=True)
    runs = {"image_tokenizer": image_run, "audio_tokenizer": audio_run, "llm": llm_run}
    stages = {k: {"steps": r.total, "batch": SCHEDULE[k]["batch"], "loss": r.mean_loss(),
                  "seconds": round(r.seconds, 1)} for k, r in runs.items()}
    for k in ("image_tokenizer", "audio_tokenizer"):
        stages[k]["rendered"] = args.count(SCHEDULE[k]["media"], least=SCHEDULE[k]["batch"])
    stages["llm"]["bank"] = len(bank) * bank_per_key
    examples = llm_run.total * SCHEDULE["llm"]["batch"]
    family.write_training_record(out, minutes=round((time.perf_counter() - t0) / 60, 1), examples=examples,
                                 stages=stages)
    megabytes = sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) / 2 ** 20
    return {"folder": str(out), "megabytes": round(megabytes, 2), "examples": examples, "stages": stages}


def save(model: AnyGPT, folder, overwrite=False) -> Path:
    """folder/{llm, image_tokenizer, music_tokenizer}/ and generation.json."""
    folder = Path(folder)
    toy_llm.save(folder / "llm", model.llm, model.tokenizer, dtype=STORE_DTYPE, overwrite=overwrite)
    latent_diffusion.save_model(folder / "image_tokenizer", model.image_tokenizer, "VQModel", overwrite=overwrite)
    model.music_tokenizer.save_pretrained(folder / "music_tokenizer", dtype=STORE_DTYPE, overwrite=overwrite)
    (folder / "generation.json").write_text(json.dumps(GENERATION, indent=2) + "\n")
    return folder


def load(folder=None, dtype=torch.float32) -> tuple[AnyGPT, dict]:
    """The shipped toy AnyGPT and its sampling settings per answer modality."""
    folder = Path(folder or OUT_DIR)
    model = AnyGPT.from_pretrained(folder / "llm", image_tokenizer=folder / "image_tokenizer",
                                   music_tokenizer=folder / "music_tokenizer", dtype=dtype)
    return model, json.loads((folder / "generation.json").read_text())


def random_foundations(root) -> Path:
    """An untrained toy LLM with its tokenizer in the shipped layout: enough to run the recipe end to end."""
    root = Path(root)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        tok = toy_llm.build_tokenizer(toy_llm.corpus(300, seed=0))
        toy_llm.save(root / "llm", Llama(toy_llm.model_config(tok)), tok)
    return root
