"""What every training in minignext shares, the toy world's and the real-size one's:

    distributed.py   torch.distributed under torchrun: the process group, DDP and FSDP over a run's
                     modules, and the reductions that make N ranks equal one process
    stages.py        NExT-GPT's three training stages: what each trains, the examples, the losses, the delta
    data.py          the reference's training data: caption pairs (CC3M, WebVid, AudioCaps) and
                     MosIT-style dialogues, read and written
    nextgpt.py       the real-size path: `python -m minignext.train nextgpt --preset nextgpt-7b --data DIR`
    memory.py        memory per GPU of each way to train NExT-GPT-7B, computed on the meta device

The run book-keeping (arguments, named random streams, checkpoints, the loss log) is
minignext.toy.trainer's, which the toy parts and the real-size path use alike.
"""
