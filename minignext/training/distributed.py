"""Training on several processes with torch.distributed, started by torchrun, PyTorch's launcher:

    torchrun --nproc_per_node N -m minignext.toy.train foundations     # = python -m torch.distributed.run ...

torchrun starts N copies of the command and tells each its place through the environment (RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT). Each process is a *rank*; they join one process
group (gloo for CPU tensors, NCCL for CUDA tensors) and meet only in collectives: all-reduce,
all-gather, reduce-scatter, barrier.

Data parallelism, as minignext's training kit (minignext.toy.trainer) uses it: every rank draws the
same global batch from the step's random stream and keeps its share (RunArgs.shard), computes the
loss of its share, and the ranks combine their gradients so that all take the same step:

    DDP   (Li et al. 2020, "PyTorch Distributed", arXiv 2006.15704) keeps a whole copy of the model on
          every rank and all-reduces (averages) each gradient while backward runs.
    FSDP  (Zhao et al. 2023, "PyTorch FSDP", arXiv 2304.11277; torch's fully_shard) keeps 1/N of every
          parameter, gradient and optimiser state per rank. Before a unit runs forward or backward its
          parameters are all-gathered; after its backward its gradients are reduce-scattered, and each
          rank updates its own shard. The units are the LLM's decoder layers and ImageBind's blocks,
          one by one; everything else forms one root unit.

Averaging gradients over the ranks gives the gradient of the global batch's mean loss only if every
rank's loss is weighted by its share of the batch: `mean` makes that exact when the shares hold
different numbers of items (token-level cross-entropy), and `gather` builds the whole batch for
losses that need it (contrastive ones).
"""

import functools
import gc
import math
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn


def environment() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) as torchrun sets them; (0, 1, 0) in a process of its own."""
    values = []
    for key, default in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)):
        raw = os.environ.get(key, str(default))
        if not raw.isdigit():
            raise ValueError(f"the environment variable {key} must be a non-negative integer; got {raw!r}")
        values.append(int(raw))
    rank, world, local = values
    if world < 1 or rank >= world:
        raise ValueError(f"RANK={rank} must be below WORLD_SIZE={world}")
    return rank, world, local


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def setup(device="cpu"):
    """Join the process group that torchrun's environment describes (nothing to do in one process).
    CPU tensors travel over gloo; with CUDA, CUDA tensors over NCCL and CPU ones still over gloo."""
    _, world, local = environment()
    if world == 1 or dist.is_initialized():
        return
    if torch.device(device).type == "cuda":
        torch.cuda.set_device(local)
        dist.init_process_group("cpu:gloo,cuda:nccl")
    else:
        dist.init_process_group("gloo")


def teardown():
    """Leave the process group. A run's DDP or FSDP wrapper can outlive it in a reference cycle (a
    stopped run's, kept by its hooks), holding gloo's pending work; collected only at interpreter exit,
    gloo's threads would then touch Python objects being torn down and abort the process. So the
    cycles are collected first, while everything is alive."""
    if dist.is_available() and dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()


def barrier():
    if active():
        dist.barrier()


def all_sum(x) -> torch.Tensor:
    """The sum over ranks of a number or tensor (a new tensor; gradients do not pass)."""
    x = torch.as_tensor(x, dtype=torch.float64 if not torch.is_tensor(x) else None).detach().clone()
    if active():
        dist.all_reduce(x)
    return x


def mean(total, count, world_size=1):
    """This rank's loss for a global mean: `total` summed over this rank's `count` items. Returns
    total * world_size / (count summed over ranks), whose average over the ranks (what DDP and FSDP
    do to gradients) is the mean over the global batch; total / count in one process."""
    if world_size == 1:
        return total / count
    n = all_sum(torch.as_tensor(count, device=total.device).float())
    return total * world_size / n


def average(values: list[float]) -> list[float]:
    """The mean over ranks of each number, for logging."""
    if not active():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return (t / dist.get_world_size()).tolist()


def all_objects(obj) -> list:
    """Every rank's `obj` (picklable), in rank order."""
    if not active():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


class _Gather(torch.autograd.Function):
    """All-gather of the shares batch[r::W] back into batch order. Its backward sums the gradients
    that every rank's loss sends to each item (an all-reduce) and returns this rank's share."""

    @staticmethod
    def forward(ctx, x, rank, world):
        sizes = torch.tensor([x.shape[0]], device=x.device)
        all_sizes = [torch.zeros_like(sizes) for _ in range(world)]
        dist.all_gather(all_sizes, sizes)
        sizes = [int(s) for s in all_sizes]
        padded = x.new_zeros((max(sizes),) + x.shape[1:])
        padded[:x.shape[0]] = x
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded.contiguous())
        out = x.new_empty((sum(sizes),) + x.shape[1:])
        for r, (part, n) in enumerate(zip(parts, sizes)):
            out[r::world] = part[:n]
        ctx.rank, ctx.world = rank, world
        return out

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[ctx.rank::ctx.world], None, None


def gather(x: torch.Tensor, rank=0, world_size=1) -> torch.Tensor:
    """The global batch from every rank's share x = batch[rank::world_size], in batch order. Every
    rank gets the same tensor; gradients reach each rank's own share, summed over the ranks' losses."""
    if world_size == 1:
        return x
    return _Gather.apply(x, rank, world_size)


# ---------------------------------------------------------------- DDP and FSDP over a run's modules

class _Modules(nn.Module):
    """The modules of a run as one module, whose forward runs the loop's function: DDP and FSDP
    prepare for backward in the forward of the module they wrap, and a loop uses its modules through
    many methods (embed, encode, a projection), not one forward."""

    def __init__(self, modules: dict):
        super().__init__()
        self.parts = nn.ModuleDict(modules)

    def forward(self, fn, *args, **kwargs):
        return fn(*args, **kwargs)


def twin(module: nn.Module) -> nn.Module:
    """A second module tree over the same tensors: every module a shallow copy, every parameter and
    buffer a new tensor object on the same storage, everything else (configs, tokenizers) shared.
    FSDP can then swap the twin's parameters for shards while `module` stays as it was."""
    copies = {}

    def alias(t):
        if t is None:
            return None
        if id(t) not in copies:
            copies[id(t)] = nn.Parameter(t.detach(), t.requires_grad) if isinstance(t, nn.Parameter) else t.detach()
        return copies[id(t)]

    def copy(m):
        if id(m) in copies:
            return copies[id(m)]
        new = m.__class__.__new__(m.__class__)
        new.__dict__ = {k: (type(v)(v) if k.startswith("_") and isinstance(v, (dict, set)) else v)
                        for k, v in m.__dict__.items()}
        copies[id(m)] = new
        new._parameters = {k: alias(p) for k, p in m._parameters.items()}
        new._buffers = {k: alias(b) for k, b in m._buffers.items()}
        new._modules = {k: None if c is None else copy(c) for k, c in m._modules.items()}
        return new

    return copy(module)


def fsdp_units() -> tuple:
    """The blocks FSDP shards one by one: the LLM's decoder layers and ImageBind's transformer blocks."""
    from minignext.imagebind import Block
    from minignext.llama import LlamaDecoderLayer

    return (LlamaDecoderLayer, Block)


class DataParallel:
    """A run's modules under DDP (the default) or FSDP, for as long as the run lasts.

    DDP wraps them in place. FSDP replaces every parameter by its shard, which would leave the loop's
    own modules unusable after the run (NExT-GPT's stage 3 adds LoRA to the LLM that stages 1 and 2
    trained). So FSDP shards a `twin`, and `finish` writes the trained weights back into the loop's
    modules, whole; the optimiser is pointed at the shards meanwhile. `forward(fn, *args)` runs
    fn(*args) as the forward of the wrapped modules, with the run's modules (and their submodules)
    among `args` replaced by their twins; fn must reach the modules only through its arguments.
    unused_params: some steps leave trained parameters unused (NExT-GPT's projection of a modality
    that no example of the batch makes), which DDP must then look for in every step's graph; FSDP
    always does, and as DDP gives them no gradient.
    """

    def __init__(self, modules: dict, optimizer, fsdp=False, device="cpu", unused_params=False):
        self.modules, self.optimizer, self.fsdp = _Modules(modules), optimizer, fsdp
        self.device, self.forwarded = torch.device(device), False
        if fsdp:
            self._shard()
        else:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.device.index or 0] if self.device.type == "cuda" else None
            self.wrapped = DDP(self.modules, device_ids=ids, find_unused_parameters=unused_params,
                               forward_sync_buffers=False, gradient_as_bucket_view=True)
            self.substitute = {}
        optimizer.data_parallel = self

    def _shard(self):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        if any(self.optimizer.state.values()):
            raise ValueError("FSDP must shard the parameters before the optimiser takes its first step")
        shadow = twin(self.modules)
        # fully_shard cannot shard 0-d tensors (ImageBind's logit scale); frozen ones stay whole on every rank
        scalars = {name: p for name, p in shadow.named_parameters() if p.dim() == 0}
        if any(p.requires_grad for p in scalars.values()):
            raise ValueError(f"FSDP cannot shard the 0-d parameters {', '.join(scalars)} that train; train this run "
                             f"under DDP (without --fsdp)")
        mesh = init_device_mesh(self.device.type, (dist.get_world_size(),))
        units = fsdp_units()
        for m in list(shadow.modules()):
            if isinstance(m, units):
                fully_shard(m, mesh=mesh, ignored_params=set(scalars.values()))
        fully_shard(shadow, mesh=mesh, ignored_params=set(scalars.values()))
        shadow.set_reduce_scatter_unused_params(True)     # ranks whose share leaves a part unused
        self.held, self.reached = {}, set()
        for prefix, m in shadow.named_modules():
            names = [n for n, _ in m.named_parameters(recurse=False)]
            if names:
                m.register_forward_pre_hook(functools.partial(self._note, f"{prefix}.".lstrip("."), names))
        self.wrapped = shadow
        self.substitute = {id(a): b for a, b in zip(self.modules.modules(), shadow.modules())}
        shards = dict(shadow.named_parameters())
        self.pairs = [(p, shards[name]) for name, p in self.modules.named_parameters()]
        self.shard_of = {id(p): s for p, s in self.pairs}
        for group in self.optimizer.param_groups:
            group["params"] = [self.shard_of[id(p)] for p in group["params"]]
        # rows kept frozen by a gradient hook (minignext.systems.nextgpt.freeze_old_rows), which the
        # shards' gradients never pass through
        self.frozen_rows = [(s, p.first_trained_row) for p, s in self.pairs if hasattr(p, "first_trained_row")]

    def _note(self, prefix, names, module, args):
        """Which tensor a module's parameter is while it runs: FSDP's gathered copy, the leaf that
        autograd will accumulate into."""
        for n in names:
            t = getattr(module, n)
            self.held[id(t)] = (t, prefix + n)           # the tensor kept, so that its id stays its own

    def forward(self, fn, *args, **kwargs):
        args = [self.substitute.get(id(a), a) for a in args]
        kwargs = {k: self.substitute.get(id(v), v) for k, v in kwargs.items()}
        self.forwarded = True
        out = self.wrapped(fn, *args, **kwargs)
        if self.fsdp:
            self.reached = {self.held[i][1] for i in graph_leaves(out) if i in self.held}
        return out

    def after_backward(self, params) -> list:
        """The parameters to clip and step, once backward has run: under FSDP their shards, with the
        frozen rows' gradients zeroed. A loss that did not come through `forward` is refused."""
        params = list(params)
        if not self.forwarded:
            raise RuntimeError("on several processes the step's loss must come from run.forward(fn, *modules, ...): "
                               "computed outside it, DDP and FSDP never combine the processes' gradients")
        self.forwarded = False
        if not self.fsdp:
            return params
        used = [name for name, p in self.modules.named_parameters() if p.grad is not None]
        if used:
            raise RuntimeError(f"the run's own modules received gradients ({', '.join(used[:3])}): under FSDP the "
                               f"loss must be computed by run.forward(fn, *modules, ...) with fn reaching the "
                               f"modules through its arguments only")
        # as DDP and one process do: a parameter no rank's loss reached gets no gradient (Adam skips
        # it), not the zeros FSDP reduce-scattered for it
        names = [name for name, p in self.modules.named_parameters() if p.requires_grad]
        reached = all_sum(torch.tensor([float(n in self.reached) for n in names]))
        shards = dict(self.wrapped.named_parameters())
        for name, count in zip(names, reached.tolist()):
            if count == 0:
                shards[name].grad = None
        for shard, first in self.frozen_rows:
            if shard.grad is not None:
                zero_rows_below(shard.grad, first)
        return [self.shard_of.get(id(p), p) for p in params]

    def clip(self, params, max_norm):
        """torch's clip_grad_norm_ (the norm of all gradients together, scaled down to max_norm); under
        FSDP on the local shards and one all-reduce of the squared norm, which DTensor's per-op
        dispatch makes many times slower."""
        if not self.fsdp:
            return torch.nn.utils.clip_grad_norm_(params, max_norm)
        local = [p.grad.to_local() for p in params if p.grad is not None]
        norm = all_sum(sum((g.float().pow(2).sum() for g in local), torch.zeros((), device=self.device))).sqrt()
        scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        for g in local:
            g.mul_(scale.to(g.dtype))
        return norm

    def save(self, folder, frozen=True):
        """FSDP: every rank writes its shards of the modules and the optimiser (torch.distributed.checkpoint)."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        options = StateDictOptions(ignore_frozen_params=not frozen)
        modules, optimizer = get_state_dict(self.wrapped, self.optimizer, options=options)
        dcp.save({"modules": modules, "optimizer": optimizer}, checkpoint_id=str(folder))

    def load(self, folder, frozen=True):
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

        options = StateDictOptions(ignore_frozen_params=not frozen, strict=frozen)   # frozen ones stay as built
        modules, optimizer = get_state_dict(self.wrapped, self.optimizer, options=options)
        state = {"modules": modules, "optimizer": optimizer}
        dcp.load(state, checkpoint_id=str(folder))
        set_state_dict(self.wrapped, self.optimizer, model_state_dict=state["modules"],
                       optim_state_dict=state["optimizer"], options=options)

    def finish(self):
        """End of the run: FSDP gathers every trained weight back into the loop's own parameters (the
        single-file layout the parts then save; the optimiser's state stays in the run's checkpoint);
        DDP lets go of its hooks."""
        if self.fsdp:
            trained = [(p, s) for p, s in self.pairs if p.requires_grad]     # frozen weights never changed
            with torch.no_grad():
                for (p, _), full in zip(trained, gather_rows([s for _, s in trained])):
                    p.copy_(full.to(p.device, p.dtype))
            original = {id(s): p for p, s in self.pairs}
            for group in self.optimizer.param_groups:
                group["params"] = [original[id(s)] for s in group["params"]]
            self.optimizer.state.clear()
        del self.optimizer.data_parallel
        self.wrapped = self.substitute = None


def graph_leaves(out) -> set:
    """ids of the leaf tensors (parameters) that backward from the tensors in `out` will reach."""
    tensors = [out] if torch.is_tensor(out) else [t for t in out if torch.is_tensor(t)]
    todo = [t.grad_fn for t in tensors if t.grad_fn is not None]
    seen, leaves = set(), set()
    while todo:
        node = todo.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if hasattr(node, "variable"):
            leaves.add(id(node.variable))
        todo.extend(n for n, _ in node.next_functions)
    return leaves


def gather_rows(shards: list) -> list:
    """The whole tensors of DTensors sharded by rows as FSDP shards them (rank r holds rows
    [r * c, r * c + local), c = ceil(rows / world), as torch.chunk splits them), in one all-gather."""
    world = dist.get_world_size()
    sizes = [(-(-s.shape[0] // world),) + tuple(s.shape[1:]) for s in shards]
    padded = []
    for s, size in zip(shards, sizes):
        local = s.to_local().float()
        padded.append(torch.cat([local, local.new_zeros((size[0] - local.shape[0],) + size[1:])]).flatten())
    flat = torch.cat(padded) if padded else torch.zeros(0)
    parts = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(parts, flat)
    out, offset = [], 0
    for s, size in zip(shards, sizes):
        n = math.prod(size)
        out.append(torch.cat([part[offset:offset + n].view(size) for part in parts])[:s.shape[0]].to(s.dtype))
        offset += n
    return out


def zero_rows_below(grad, first: int):
    """Zero the gradient of rows < first of a matrix sharded by rows (FSDP's Shard(0)): rank r holds
    rows [r * c, r * c + local) with c = ceil(rows / world), as torch.chunk splits them."""
    local = grad.to_local()
    rows, world = grad.shape[0], grad.device_mesh.size()
    start = grad.device_mesh.get_local_rank() * -(-rows // world)
    n = min(max(first - start, 0), local.shape[0])
    local[:n] = 0


def replace_folder(partial: Path, final: Path):
    """Put a fully written folder in the place of `final` (an older copy is removed after)."""
    old = final.with_name(final.name + ".old")
    if final.exists():
        final.replace(old)
    partial.replace(final)
    if old.exists():
        shutil.rmtree(old)
