"""The toy world: a procedural multimodal world small enough to train a whole NExT-GPT on a CPU.

    world.py      seeded generator of objects, images, sounds, videos, captions and dialogues
    checkers.py   analytic judges that read the attributes back out of generated media and text
"""
