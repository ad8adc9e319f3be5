"""Vision transformer speed: minignext.clip.CLIPVision against transformers'
CLIPVisionModelWithProjection.

A random ViT-B/16-sized CLIP vision tower (hidden 768, 12 layers, 12 heads, patch 16,
224x224 images, projection 512) is saved by transformers and loaded by minignext, so
both run the same weights on the same 1x3x224x224 batch. Forward only, no gradients,
2 threads, median of 5 runs after one warm-up. The two sides take turns, run by run, so
that a change in machine load during the benchmark hits both alike.
"""

import argparse
import statistics
import tempfile

import torch

from minignext.bench import median_time, require_reference
from minignext.clip import CLIPVision

CONFIG = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              image_size=224, patch_size=16, projection_dim=512)


def main(argv=None):
    p = argparse.ArgumentParser(prog="minignext bench vit", description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    transformers = require_reference("transformers")
    torch.set_num_threads(2)
    torch.manual_seed(0)

    hf = transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(**CONFIG)).eval()
    with tempfile.TemporaryDirectory() as folder:
        hf.save_pretrained(folder)
        ours = CLIPVision.from_pretrained(folder)
    pixels = torch.randn(args.batch, 3, CONFIG["image_size"], CONFIG["image_size"])

    with torch.inference_mode():
        diff = (ours(pixels).embeds - hf(pixel_values=pixels).image_embeds).abs().max().item()   # also warms up
        rounds = [(median_time(lambda: hf(pixel_values=pixels), repeats=1, warmup=0),
                   median_time(lambda: ours(pixels), repeats=1, warmup=0)) for _ in range(args.repeats)]
    t_hf = statistics.median(r[0] for r in rounds)
    t_ours = statistics.median(r[1] for r in rounds)

    print(f"ViT-B/16 vision tower, {args.batch}x3x224x224, {torch.get_num_threads()} threads, "
          f"median of {args.repeats}")
    print(f"  transformers  {t_hf * 1e3:8.1f} ms")
    print(f"  minignext     {t_ours * 1e3:8.1f} ms")
    print(f"  ratio minignext/transformers = {t_ours / t_hf:.3f}   (max |diff| of the embeddings {diff:.2e})")
    return t_ours / t_hf
