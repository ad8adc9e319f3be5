"""Tiny random models: every part of NExT-GPT small and random, built in-process from fixed
seeds, so the data flow can be shown and tested in seconds without any checkpoint. Their
outputs are noise."""

import torch
import torch.nn.functional as F

from minignext.projection import OutputProjectionConfig
from minignext.systems.nextgpt import SIGNALS, MediaDecoder, NextGPT, add_nextgpt_tokens

TINY_CORPUS = [
    "### Human: What is in this picture?\n### Assistant: A red circle on a blue background.",
    "### Human: Show me a green square.\n### Assistant: Here is a green square.",
    "### Human: What do you hear?\n### Assistant: A high tone that rises, then falls.",
    "### Human: Make a short video of a ball moving left.\n### Assistant: Here is the video.",
    "### Human: Describe the sound and draw it.\n### Assistant: A low hum. This is how it looks.",
    "### Human: Play a sound like this image.\n### Assistant: Sure, listen to this tone.",
    "the quick brown fox jumps over the lazy dog. a photo of a cat, a dog and a yellow triangle.",
]


def tiny_tokenizer():
    """A byte-level BPE of about 400 tokens trained in-process on TINY_CORPUS (deterministic)."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    from minignext.tokenizer import Tokenizer

    tok = HFTokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TINY_CORPUS, trainer)
    return Tokenizer(tok, bos_token="<s>", eos_token="</s>")


def _tiny_clip_text(hidden, with_projection=False, projection_dim=None):
    """A tiny random CLIP text encoder and its byte-level tokenizer (no merges)."""
    from tokenizers import Regex, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers

    from minignext.clip import CLIP_SPLIT, CLIPText, CLIPTextConfig, CLIPTokenizer

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {t: i for i, t in enumerate(alphabet + [c + "</w>" for c in alphabet])}
    vocab.update({"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})
    bpe = HFTokenizer(models.BPE(vocab, [], end_of_word_suffix="</w>", unk_token="<|endoftext|>"))
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(CLIP_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.Split(Regex(r"\s+"), behavior="removed"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    bpe.decoder = decoders.ByteLevel()
    config = CLIPTextConfig.tiny(vocab_size=len(vocab), hidden_size=hidden, intermediate_size=2 * hidden,
                            num_hidden_layers=1, num_attention_heads=4, max_position_embeddings=77,
                            projection_dim=projection_dim or hidden, with_projection=with_projection,
                            eos_token_id=vocab["<|endoftext|>"])
    return CLIPText(config).eval(), CLIPTokenizer(bpe)


TINY = {"llm_hidden": 64, "cond": {"image": (77, 32), "video": (77, 32), "audio": (1, 16)}}


def _tiny_image_pipeline():
    from minignext.diffusion import ImagePipeline
    from minignext.schedulers import DDIMScheduler
    from minignext.unet import UNet2DCondition, UNet2DConditionConfig
    from minignext.vae import AutoencoderKL, AutoencoderKLConfig

    text_encoder, tokenizer = _tiny_clip_text(TINY["cond"]["image"][1])
    unet = UNet2DCondition(UNet2DConditionConfig.tiny(sample_size=16, block_out_channels=(16, 32), norm_num_groups=8,
                                                 cross_attention_dim=TINY["cond"]["image"][1], attention_head_dim=4))
    vae = AutoencoderKL(AutoencoderKLConfig.tiny(block_out_channels=(16, 32), norm_num_groups=8, sample_size=32))
    return ImagePipeline(unet.eval(), vae.eval(), DDIMScheduler.from_config(SD_SCHEDULER), text_encoder, tokenizer)


SD_SCHEDULER = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "steps_offset": 1,
                "set_alpha_to_one": False, "clip_sample": False, "num_train_timesteps": 1000}


def _tiny_audio_pipeline():
    """AudioLDM in miniature: the CLAP-space vector enters as class_labels; the unconditional
    branch is a tiny random CLIP-style text encoder's normalised embedding of ""."""
    from minignext.diffusion import AudioPipeline
    from minignext.schedulers import DDIMScheduler
    from minignext.unet import UNet2DCondition, UNet2DConditionConfig
    from minignext.vae import AutoencoderKL, AutoencoderKLConfig
    from minignext.vocoder import HifiGan, HifiGanConfig

    dim = TINY["cond"]["audio"][1]
    clap, clap_tok = _tiny_clip_text(32, with_projection=True, projection_dim=dim)
    with torch.no_grad():
        empty = F.normalize(clap(clap_tok([""])).embeds, dim=-1)[0]
    unet = UNet2DCondition(UNet2DConditionConfig.tiny(
        sample_size=8, block_out_channels=(16, 32), norm_num_groups=8, attention_head_dim=4,
        cross_attention_dim=(16, 32), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), class_embed_type="simple_projection",
        projection_class_embeddings_input_dim=dim, class_embeddings_concat=True))
    vae = AutoencoderKL(AutoencoderKLConfig.tiny(in_channels=1, out_channels=1, block_out_channels=(8, 16), norm_num_groups=4))
    vocoder = HifiGan(HifiGanConfig.tiny(model_in_dim=16, upsample_initial_channel=16, upsample_rates=(8, 8),
                                    upsample_kernel_sizes=(16, 16)))
    scheduler = DDIMScheduler.from_config({**SD_SCHEDULER, "beta_start": 0.0015, "beta_end": 0.0195})
    return AudioPipeline(unet.eval(), vae.eval(), scheduler, vocoder.eval(), unconditional_embeds=empty)


def _tiny_video_pipeline():
    from minignext.diffusion import VideoPipeline
    from minignext.schedulers import DDIMScheduler
    from minignext.unet3d import UNet3DCondition, UNet3DConditionConfig
    from minignext.vae import AutoencoderKL, AutoencoderKLConfig

    text_encoder, tokenizer = _tiny_clip_text(TINY["cond"]["video"][1])
    unet = UNet3DCondition(UNet3DConditionConfig.tiny(sample_size=8, block_out_channels=(16, 32), norm_num_groups=8,
                                                 cross_attention_dim=TINY["cond"]["video"][1], attention_head_dim=8,
                                                 transformer_in_heads=2))
    vae = AutoencoderKL(AutoencoderKLConfig.tiny(block_out_channels=(16, 32), norm_num_groups=8, sample_size=16))
    return VideoPipeline(unet.eval(), vae.eval(), DDIMScheduler.from_config(SD_SCHEDULER), text_encoder, tokenizer)


TINY_DECODERS = {"image": (_tiny_image_pipeline, {}),
                 "audio": (_tiny_audio_pipeline, {"audio_length_in_s": 0.5}),
                 "video": (_tiny_video_pipeline, {"num_frames": 8})}


def _seeded(seed, build):
    def run():
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            return build()
    return run


def tiny_random() -> NextGPT:
    """Every part tiny and random, built in-process from fixed seeds: the same model every time.
    Its outputs are noise; it exists to show (and test) the data flow."""
    from minignext.imagebind import ImageBind, ImageBindConfig

    tok = tiny_tokenizer()
    with torch.random.fork_rng():
        torch.manual_seed(0)
        encoder = ImageBind(ImageBindConfig.tiny(modalities=("vision", "text", "audio"))).eval()
        llm = _tiny_llm(tok)
        new = add_nextgpt_tokens(tok, llm)
        with torch.no_grad():              # random rows too, rather than resize's copies of the mean row
            for w in (llm.model.embed_tokens.weight, llm.lm_head.weight):
                w[new] = torch.randn(len(new), w.shape[1]) * w[:new[0]].std()
        projections = {m: OutputProjectionConfig.tiny(in_dim=TINY["llm_hidden"], out_dim=d, num_queries=q,
                                                 num_signal_tokens=SIGNALS[m][1])
                       for m, (q, d) in TINY["cond"].items()}
        loaders = {}
        for i, (m, (build, kwargs)) in enumerate(TINY_DECODERS.items()):
            decoder = lambda m=m, build=build, kw=kwargs: MediaDecoder(m, build(), num_inference_steps=4, **kw)  # noqa: E731
            loaders[m] = _seeded(100 + i, decoder)
        model = NextGPT(encoder, llm, tok, projections, loaders, enc_dim=encoder.config.out_embed_dim).eval()
    return model


def _tiny_llm(tok):
    from minignext.llama import Llama, LlamaConfig

    return Llama(LlamaConfig.tiny(vocab_size=tok.vocab_size, hidden_size=TINY["llm_hidden"], intermediate_size=128,
                             num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=512,
                             bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)).eval()


def tiny_pandagpt():
    """PandaGPT with every part tiny and random (an ImageBind with all six branches), from fixed
    seeds: the same model every time."""
    from minignext.imagebind import ImageBind, ImageBindConfig
    from minignext.systems.pandagpt import PandaGPT

    tok = tiny_tokenizer()
    with torch.random.fork_rng():
        torch.manual_seed(0)
        encoder = ImageBind(ImageBindConfig.tiny()).eval()
        return PandaGPT(encoder, _tiny_llm(tok), tok, enc_dim=encoder.config.out_embed_dim).eval()
