"""Run minignext with a student's exercise solutions in place of the library's own functions.

    from minignext.exercises import use
    with use("mine"):                          # the folder `make exercises` fills
        NextGPT.from_preset("toy").chat("draw a red circle.")

    python -m minignext.exercises mine demo --out out/demo-mine             # any `minignext` command
    python -m minignext.exercises mine -m minignext.toy.eval nextgpt --quick  # any module
    python -m minignext.exercises mine --lessons lesson02,lesson06 demo      # only those lessons

Only the functions in SWAPS are replaced, at the places where the library calls them; the rest
is minignext's own code. Leaving the block puts the library's functions back. A function that is
still a stub raises its NotImplementedError (with its first hint) when the library calls it;
`lessons=` limits the swap to the lessons you have solved.
"""

import contextlib
import importlib
import importlib.util
import runpy
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent        # the checkout: exercises/, mine/


def _ddim_update(ddim_step):
    # the library splits the step in two: x0 is already predicted; ddim_step at alpha_bar_t = 1
    # re-predicts x0 = x_t and then re-noises it, which is exactly the second half
    return lambda x0, eps, alpha_bar_prev: ddim_step(eps, x0, 1.0, alpha_bar_prev)


def _signal_states(extract_signal_states):
    def signal_states(hidden, start, n):
        ids = [0] * hidden.shape[1]
        ids[start:start + n] = range(1, n + 1)
        return extract_signal_states(hidden, ids, list(range(1, n + 1)))
    return signal_states


def _diffusion_loss(diffusion_loss, library):
    # the video trainer also asks for a share of high-noise steps, which the exercise leaves out
    def loss(unet_fn, scheduler, latents, cond, generator, high_noise_share=0.0):
        if high_noise_share:
            return library(unet_fn, scheduler, latents, cond, generator, high_noise_share)
        return diffusion_loss(unet_fn, scheduler, latents, cond, generator)
    return loss


# lesson file -> exercise function -> [(module, attribute it replaces)]; an entry whose signature
# differs from the library's names an adapter: (adapter, [(module, attribute)])
SWAPS = {
    "lesson01_attention": {"online_softmax_step": [("minignext.attention", "online_softmax_step")]},
    "lesson02_llama": {name: [("minignext.llama", name)] for name in ("rms_norm", "apply_rope", "kv_cache_update")},
    "lesson03_audio": {name: [("minignext.media", name)] for name in ("hz_to_mel", "mel_filterbank")},
    "lesson03_encoders": {name: [("minignext.clip", name)] for name in ("patchify", "interpolate_pos_embed")},
    "lesson04_diffusion": {
        "timestep_embedding": [("minignext.unet", "timestep_embedding")],
        "add_noise": [("minignext.schedulers", "q_sample")],
        "ddim_step": (_ddim_update, [("minignext.schedulers", "ddim_update")]),
        "classifier_free_guidance": [("minignext.diffusion", "classifier_free_guidance")],
    },
    "lesson05_av": {
        "mrf": [("minignext.vocoder", "mrf")],
        **{name: [("minignext.unet3d", name)]
           for name in ("fold_frames", "unfold_frames", "pixels_as_sequences", "sequences_as_pixels")},
    },
    "lesson06_any_to_any": {
        "splice_soft_tokens": [("minignext.systems.nextgpt", "splice_soft_tokens")],
        "extract_signal_states": (_signal_states, [("minignext.systems.nextgpt", "signal_states")]),
    },
    "lesson07_toy": {
        "info_nce": [("minignext.toy.train_imagebind", "info_nce")],
        "diffusion_loss": ("library", [("minignext.toy.latent_diffusion", "diffusion_loss")]),
    },
    "lesson08_training": {
        "signal_distance": [("minignext.toy.train_nextgpt", "signal_distance")],
        "answer_ce": [("minignext.toy.mllm", "answer_ce"), ("minignext.toy.train_llm", "answer_ce")],
        "freeze_old_rows": [("minignext.toy.train_nextgpt", "freeze_old_rows"),
                            ("minignext.systems.nextgpt", "freeze_old_rows")],
        "merge_lora": [("minignext.weights", "merge_lora"), ("minignext.lora", "merge_lora")],
    },
}


def exercise_folder(folder) -> Path:
    """"solutions", "stubs", or a folder (relative to the working directory or to the checkout)."""
    if folder == "solutions":
        return ROOT / "exercises" / "solutions"
    if folder == "stubs":
        return ROOT / "exercises"
    for path in (Path(folder), ROOT / folder):
        if path.is_dir():
            return path.resolve()
    raise FileNotFoundError(f"no exercise folder {folder!r} (looked in {Path.cwd()} and {ROOT}); "
                            f"`make exercises` copies the stubs to mine/")


def unsolved(folder, lesson) -> list:
    """The exercises of a lesson file that still only raise their hint."""
    import ast

    tree = ast.parse((exercise_folder(folder) / f"{lesson}.py").read_text())
    return [n.name for n in tree.body if isinstance(n, ast.FunctionDef) and not n.name.startswith("_")
            and any(isinstance(s, ast.Raise) and "_stuck(" in ast.unparse(s) for s in n.body)]


def yours(lesson) -> str:
    """"mine" when mine/<lesson>.py exists with every exercise solved, else "solutions": what a
    notebook's last section runs, so that a student sees their own code at work once it is done."""
    mine = ROOT / "mine" / f"{lesson}.py"
    if mine.is_file() and not unsolved("mine", lesson):
        return "mine"
    if mine.is_file():
        print(f"mine/{lesson}.py still has {', '.join(unsolved('mine', lesson))} to solve: running the solutions")
    return "solutions"


def load_lesson(folder, lesson):
    path = exercise_folder(folder) / f"{lesson}.py"
    spec = importlib.util.spec_from_file_location(f"minignext_exercise_{lesson}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def replacements(folder, lessons=None) -> list:
    """[(module, attribute, new function)] for the lessons chosen (all that the folder has)."""
    chosen = [name for name in SWAPS if lessons is None or any(name.startswith(x) for x in lessons)]
    if lessons is not None and not chosen:
        raise ValueError(f"no lesson matches {lessons}; choose from {', '.join(SWAPS)}")
    out = []
    for lesson in chosen:
        if lessons is None and not (exercise_folder(folder) / f"{lesson}.py").is_file():
            continue
        student = load_lesson(folder, lesson)
        for name, sites in SWAPS[lesson].items():
            fn, adapter = getattr(student, name), None
            if isinstance(sites, tuple):
                adapter, sites = sites
            for module_name, attr in sites:
                module = importlib.import_module(module_name)
                new = fn
                if adapter == "library":
                    new = _diffusion_loss(fn, getattr(module, attr))
                elif adapter is not None:
                    new = adapter(fn)
                out.append((module, attr, new))
    return out


@contextlib.contextmanager
def use(folder="mine", lessons=None):
    """Inside the block the library calls your functions (see SWAPS). lessons: names or prefixes,
    e.g. ["lesson02", "lesson06"]; None takes every lesson file in the folder."""
    from minignext import attention

    swaps = replacements(folder, lessons)
    saved = [(module, attr, getattr(module, attr)) for module, attr, _ in swaps]
    impl = attention.get_default_impl()
    try:
        for module, attr, new in swaps:
            setattr(module, attr, new)
        if any(module is attention for module, _, _ in swaps):
            attention.set_default_impl("tiled")      # the path that calls online_softmax_step
        yield [f"{module.__name__}.{attr}" for module, attr, _ in swaps]
    finally:
        for module, attr, old in saved:
            setattr(module, attr, old)
        attention.set_default_impl(impl)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return
    folder, rest, lessons = argv[0], argv[1:], None
    if rest[:1] == ["--lessons"] and len(rest) > 1:
        lessons, rest = rest[1].split(","), rest[2:]
    with use(folder, lessons) as swapped:
        print(f"running with {len(swapped)} library functions replaced from {exercise_folder(folder)}",
              file=sys.stderr)
        try:
            if rest[:1] == ["-m"] and len(rest) > 1:
                sys.argv = rest[1:]
                runpy.run_module(rest[1], run_name="__main__", alter_sys=True)
            else:
                from minignext.cli import main as cli_main

                cli_main(rest)
        except NotImplementedError as e:
            raise SystemExit(f"an exercise the library called is not solved yet: {e}\n"
                             f"(solve it, or choose the solved lessons with --lessons)") from None


if __name__ == "__main__":
    main()
