"""minignext: NExT-GPT (Wu et al. 2023, arXiv 2309.05519), the any-to-any multimodal
LLM, written from scratch in PyTorch for teaching.

The package follows the data flow:
    encode   clip.py, imagebind.py, media.py
    project  projection.py, perceiver.py (Flamingo: resampler + gated cross-attention)
    LLM      attention.py, llama.py, tokenizer.py, generation.py
    project  projection.py
    decode   unet.py, unet3d.py, vae.py, vocoder.py, schedulers.py, diffusion.py
    glue     nextgpt.py, weights.py, cli.py
"""

__version__ = "0.1.0"
