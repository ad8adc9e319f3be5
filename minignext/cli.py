"""The `minignext` command line (also `python -m minignext`).

Each subcommand is a thin shell over a function elsewhere in the package, imported
only when that subcommand runs, so `minignext --help` stays instant. `main` is the one
error boundary: every failure a user can act on ends as one line,
`minignext <command>: error: ...`, and a non-zero exit.
"""

import argparse
import importlib
import pkgutil
import sys

from minignext.weights import WeightsError

# kind -> "module:function(src, dst, overwrite=...)"
CONVERTERS = {
    "gguf": "minignext.gguf:convert_gguf",
    "imagebind": "minignext.imagebind:convert_checkpoint",
    "nextgpt-delta": "minignext.systems.nextgpt_checkpoint:convert_delta",
    "pickle": "minignext.weights:convert_pickle",
}


def _load(target):
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def benchmarks():
    import minignext.bench as pkg
    return sorted(m.name for m in pkgutil.iter_modules(pkg.__path__))


def cmd_bench(args):
    names = benchmarks() if args.name == "all" else [args.name]
    for name in names:
        if name not in benchmarks():
            raise SystemExit(f"no benchmark {name!r}; choose from: {', '.join(benchmarks())}, all")
        _load(f"minignext.bench.{name}:main")(args.rest)


def cmd_convert(args):
    if args.kind not in CONVERTERS:
        raise SystemExit(f"cannot convert {args.kind!r}; choose from: {', '.join(CONVERTERS)}")
    out = _load(CONVERTERS[args.kind])(args.src, args.dst, overwrite=args.overwrite)
    print(f"wrote {out}")


def cmd_forward(target):
    """Subcommands whose options are parsed by the module that implements them."""
    def run(args):
        _load(target)(args.rest)
    return run


FORWARDED = {
    "demo": ("minignext.demo:main", "run a scripted any-to-any conversation"),
    "chat": ("minignext.chat:chat_main", "interactive multi-turn chat"),
    "run": ("minignext.chat:run_main", "one exchange, written to a folder"),
    "download": ("minignext.chat:download_main", "fetch the weights of a preset"),
    "serve": ("minignext.serve:main", "a live chat page in the browser"),
}


def build_parser():
    p = argparse.ArgumentParser(prog="minignext", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    for name, (target, helptext) in FORWARDED.items():
        s = sub.add_parser(name, help=helptext, add_help=False)
        s.add_argument("rest", nargs=argparse.REMAINDER)
        s.set_defaults(func=cmd_forward(target))

    s = sub.add_parser("convert", help="convert a public checkpoint to safetensors")
    s.add_argument("kind", help=", ".join(CONVERTERS))
    s.add_argument("src")
    s.add_argument("dst")
    s.add_argument("--overwrite", action="store_true", help="replace an existing output")
    s.set_defaults(func=cmd_convert)

    s = sub.add_parser("bench", help="time minignext against the reference libraries")
    s.add_argument("name", help="a benchmark name, or all")
    s.add_argument("rest", nargs=argparse.REMAINDER)
    s.set_defaults(func=cmd_bench)
    return p


def user_error(e: BaseException) -> str | None:
    """The one-line message for a failure the user can act on (a file, an option, the weights, the
    memory), or None for a bug, which keeps its traceback."""
    if isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError" or \
            (isinstance(e, RuntimeError) and "can't allocate memory" in str(e)):
        return f"out of memory ({type(e).__name__}: {e}); try a smaller input or fewer new tokens"
    if isinstance(e, OSError) and e.filename is not None and e.strerror:
        return f"{e.filename}: {e.strerror}"
    if isinstance(e, (WeightsError, OSError, ValueError)):
        return "; ".join(line.strip() for line in str(e).splitlines() if line.strip())
    return None


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in FORWARDED:
        # argparse's REMAINDER drops leading options ("demo --out x"); hand them all over as they are
        args = argparse.Namespace(command=argv[0], rest=argv[1:], func=cmd_forward(FORWARDED[argv[0]][0]))
    else:
        args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except KeyboardInterrupt:
        print(f"\nminignext {args.command}: interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    except Exception as e:
        message = user_error(e)
        if message is None:
            raise
        print(f"minignext {args.command}: error: {message}", file=sys.stderr)
        raise SystemExit(2) from None
