"""minignext: NExT-GPT (Wu et al. 2023, arXiv 2309.05519), the any-to-any multimodal LLM,
and the family of systems around it, written from scratch in PyTorch for teaching.

A map of the package. The parts are flat modules, in data-flow order:

    encode   media.py (reading and preprocessing files; mediafile.py opens them within
             limits), clip.py, imagebind.py,
             blip2.py (BLIP-2's vision model and Q-Former), vq.py and encodec.py (discrete
             image and audio tokenizers)
    project  projection.py (input Linear, output transformer), perceiver.py (perceiver
             resampler and gated cross-attention)
    LLM      attention.py, llama.py, lora.py, tokenizer.py, generation.py
    decode   unet.py, unet3d.py, vae.py, vocoder.py, schedulers.py, diffusion.py (the pipelines)
    files    weights.py (finding, reading, checking, converting checkpoints), gguf.py (llama.cpp's
             GGUF files -> Hugging Face folders), utils.py

Each system of the family is one file in systems/ that assembles those parts and loads its
official checkpoint:

    systems/nextgpt.py             NExT-GPT's any-to-any loop: signal tokens, conversation, model, decoders
    systems/nextgpt_checkpoint.py  NExT-GPT's released delta and minignext's saved-folder layout
    systems/llava.py               LLaVA-1.5: CLIP patch features -> MLP -> one soft token per <image> placeholder
    systems/pandagpt.py            PandaGPT: NExT-GPT's input side, all six ImageBind modalities, text out
    systems/minigpt4.py            MiniGPT-4 (and BLIP-2's own Blip2ForConditionalGeneration)
    systems/flamingo.py            IDEFICS and OpenFlamingo
    systems/anygpt.py              AnyGPT: media as discrete tokens in the vocabulary

Ready-made models by name live apart from both: presets.py ("nextgpt-7b", "smol", "toy", "tiny-random")
and tiny.py (tiny random builds of every part, for tests and lessons).

Around them: cli.py, chat.py and demo.py (the `minignext` command), serve.py and web/ (the live
chat page of `minignext serve`), bench/ (speed against the reference libraries), toy/ (the toy
world, its analytic checkers, and the training and evaluation of every toy model), exercises.py (the
library run with a student's exercise solutions swapped in).
"""

__version__ = "0.1.0"
