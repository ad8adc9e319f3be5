"""Time one UNet denoising step (a forward pass), minignext against diffusers, on the same random
weights: SD-1.5's block layout at reduced width, block_out_channels (128, 256, 512, 512),
2 layers per block, cross-attention 768; latents 2x4x32x32 and context 2x77x768 (one
classifier-free-guidance batch at 256x256 pixels)."""

import argparse
import statistics
import tempfile
import time

import torch

from minignext.bench import median_time, require_reference

CONFIG = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, cross_attention_dim=768,
              attention_head_dim=8, norm_num_groups=32, sample_size=32,
              down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
              up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)


def main(argv=None):
    p = argparse.ArgumentParser(prog="minignext bench unet", description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    diffusers = require_reference("diffusers")
    from minignext.unet import UNet2DCondition

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    ref = diffusers.UNet2DConditionModel(**CONFIG).eval()
    with tempfile.TemporaryDirectory() as folder:
        ref.save_pretrained(folder)
        mine = UNet2DCondition.from_pretrained(folder)
    x, ctx, t = torch.randn(2, 4, 32, 32), torch.randn(2, 77, 768), torch.tensor(500)

    with torch.inference_mode():
        diff = (mine(x, t, ctx) - ref(x, t, ctx).sample).abs().max().item()     # also the warm-up
        # alternate the two so that load from other processes hits both alike; CPU time as well,
        # which a busy shared machine disturbs less than wall time
        wall, cpu = {"ref": [], "mine": []}, {"ref": [], "mine": []}
        for _ in range(args.repeats):
            for name, fn in (("ref", lambda: ref(x, t, ctx)), ("mine", lambda: mine(x, t, ctx))):
                c0 = time.process_time()
                wall[name].append(median_time(fn, repeats=1, warmup=0))
                cpu[name].append(time.process_time() - c0)
    ref_s, mine_s = statistics.median(wall["ref"]), statistics.median(wall["mine"])
    ref_c, mine_c = statistics.median(cpu["ref"]), statistics.median(cpu["mine"])
    params = sum(p.numel() for p in mine.parameters()) / 1e6
    print(f"UNet step, {params:.0f}M params, latents 2x4x32x32, context 2x77x768, {args.threads} threads, "
          f"median of {args.repeats}")
    print(f"  diffusers  {ref_s * 1000:8.1f} ms/step   (CPU time {ref_c * 1000:8.1f} ms)")
    print(f"  minignext  {mine_s * 1000:8.1f} ms/step   (CPU time {mine_c * 1000:8.1f} ms)")
    print(f"  ratio minignext/diffusers {mine_s / ref_s:.3f}   (CPU time {mine_c / ref_c:.3f}; best of "
          f"{args.repeats} {min(wall['mine']) / min(wall['ref']):.3f}; max |diff| {diff:.2e})")
    return mine_s / ref_s
