"""Greedy decoding speed: minignext.llama against transformers' LlamaForCausalLM.

A random LLaMA (hidden 768, 12 layers, 12 heads, ffn 2048, vocab 32000) is saved by
transformers and loaded by minignext, so both run the same weights. Each side
generates 64 tokens after a 32-token prompt, greedily, on 2 threads; the time is
the median of 5 alternating runs. The bandwidth line puts the decode speed in context: every
new token reads all the weights once, so weight bytes / time per token can be
compared with what a plain memory copy achieves.

On a machine shared with other jobs, run it as `OMP_WAIT_POLICY=PASSIVE python -m minignext
bench llama`: with spinning OpenMP threads, two threads competing with other processes for
two cores spend most of their time waiting for each other, on both sides.
"""

import argparse
import statistics
import tempfile

import torch

from minignext.bench import copy_bandwidth, median_time, require_reference
from minignext.generation import generate
from minignext.llama import Llama

CONFIG = dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
              num_attention_heads=12, num_key_value_heads=12, max_position_embeddings=2048)


def main(argv=None):
    p = argparse.ArgumentParser(prog="minignext bench llama", description=__doc__.splitlines()[0])
    p.add_argument("--prompt", type=int, default=32, help="prompt tokens")
    p.add_argument("--new", type=int, default=64, help="new tokens")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    transformers = require_reference("transformers")
    torch.set_num_threads(2)
    torch.manual_seed(0)

    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**CONFIG)).eval()
    with tempfile.TemporaryDirectory() as folder:
        hf.save_pretrained(folder)
        ours = Llama.from_pretrained(folder)
    ids = torch.randint(3, CONFIG["vocab_size"], (1, args.prompt))

    def run_hf():
        with torch.inference_mode():
            return hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new,
                               min_new_tokens=args.new, do_sample=False, eos_token_id=None, pad_token_id=0)

    def run_ours():
        return generate(ours, ids, max_new_tokens=args.new, stop_token_ids=[], progress=False)

    same = run_hf().tolist() == run_ours().tolist()   # also the warm-up
    # Alternate the two so that a change in machine load hits both alike.
    times_hf, times_ours = [], []
    for _ in range(args.repeats):
        times_hf.append(median_time(run_hf, repeats=1, warmup=0))
        times_ours.append(median_time(run_ours, repeats=1, warmup=0))
    t_hf, t_ours = statistics.median(times_hf), statistics.median(times_ours)
    tps_hf, tps_ours = args.new / t_hf, args.new / t_ours

    weight_bytes = sum(p.numel() * p.element_size() for p in ours.parameters())
    weight_bytes -= ours.model.embed_tokens.weight.numel() * 4   # a lookup reads one row, not the table
    bandwidth = copy_bandwidth()
    print(f"llama greedy: prompt {args.prompt}, {args.new} new tokens, {torch.get_num_threads()} threads, "
          f"median of {args.repeats}; same tokens: {same}")
    print(f"  transformers {tps_hf:8.1f} tokens/s")
    print(f"  minignext    {tps_ours:8.1f} tokens/s")
    print(f"  ratio minignext/transformers: {tps_ours / tps_hf:.2f}")
    print(f"  bandwidth: {weight_bytes / 1e6:.0f} MB of weights per token -> "
          f"{weight_bytes * tps_ours / 1e9:.1f} GB/s (minignext), {weight_bytes * tps_hf / 1e9:.1f} GB/s "
          f"(transformers); copy bandwidth {bandwidth / 1e9:.1f} GB/s")
