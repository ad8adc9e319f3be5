"""The notebooks as a student meets them: each runs top to bottom in under 40 seconds and leaves no
temporary files behind, no figure comes from random weights unless its cell says so, and `make lab`
serves them from a clean copy of the checkout."""

import ast
import importlib.metadata
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.request
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from conftest import ROOT

NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
LIMIT = 40.0          # seconds per notebook in CI; a quiet machine takes well under 25


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs_quickly_and_cleans_up(path: Path, tmp_path, monkeypatch):
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setenv("TMPDIR", str(scratch))          # the kernel's tempfile folder
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=120, kernel_name="python3",
                            resources={"metadata": {"path": str(path.parent)}})
    start = time.perf_counter()
    client.execute()
    elapsed = time.perf_counter() - start
    print(f"{path.name}: {elapsed:.1f} s")
    assert elapsed < LIMIT, f"{path.name} took {elapsed:.1f}s (limit {LIMIT:.0f}s)"
    left = sorted(p.name for p in scratch.iterdir() if not p.name.startswith("torchinductor_"))  # torch's own cache
    assert not left, f"{path.name} left temporary files behind: {left}"


# ---------------------------------------------------------------- figures from random weights

# Calls that make a model with random weights; names assigned from them (or from anything that
# uses such a name) stay random until the notebook trains them with an optimizer.
RANDOM_SOURCES = ("Llama(", "CLIPVision(", "ImageBind(", "UNet2DCondition(", "UNet3DCondition(",
                  "AutoencoderKL(", "HifiGan(", "from_preset('tiny-random')", "tiny_random(", "random_foundations(",
                  "build(")
FIGURE_CALLS = ("plt.", ".imshow(", ".plot(", ".bar(", "display(")
MARKER = "# random weights:"


def code_cells(path):
    nb = nbformat.read(path, as_version=4)
    return [(i, c.source) for i, c in enumerate(nb.cells) if c.cell_type == "code"]


def names_in(node):
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}


def statements(body):
    """Every statement, in the order the code runs them (loops and branches once)."""
    for node in body:
        yield node
        for field in ("body", "orelse", "finalbody"):
            if not isinstance(node, (ast.FunctionDef, ast.Lambda)) and isinstance(getattr(node, field, None), list):
                yield from statements(getattr(node, field))


def taint(node, random):
    """The names that `node` makes hold (or write) random weights, and those it gives other values."""
    targets, value = [], None
    if isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
        targets, value = (node.targets if isinstance(node, ast.Assign) else [node.target]), node.value
    elif isinstance(node, (ast.For, ast.With)):
        pairs = [(node.target, node.iter)] if isinstance(node, ast.For) else \
            [(i.optional_vars, i.context_expr) for i in node.items if i.optional_vars is not None]
        targets, value = [t for t, _ in pairs], (pairs[0][1] if pairs else None)
    elif isinstance(node, ast.Expr) and isinstance(node.value, ast.Call) and "save" in ast.unparse(node.value.func):
        args = list(node.value.args) + [k.value for k in node.value.keywords]     # weights written to a folder
        if any(names_in(a) & random for a in args):
            return set().union(*(names_in(a) for a in args)), set()
    if value is None:
        return set(), set()
    names = set().union(set(), *(names_in(t) for t in targets))
    if isinstance(value, ast.Call) and ast.unparse(value.func).startswith("torch.optim."):
        return set(), names
    if any(s in ast.unparse(value) for s in RANDOM_SOURCES) or names_in(value) & random:
        return names, set()
    return set(), names


def random_figure_cells(path):
    """Cells that show a figure using a random-weight model without saying so."""
    random, unmarked = set(), []
    for i, source in code_cells(path):
        tree = ast.parse("\n".join(line for line in source.splitlines() if not line.startswith("%")))
        made_here = set()
        for node in statements(tree.body):
            made, cleared = taint(node, random)
            random = (random - cleared) | made
            made_here |= made
        for node in ast.walk(tree):         # trained here: torch.optim.X(model.parameters(), ...)
            if isinstance(node, ast.Call) and ast.unparse(node.func).startswith("torch.optim."):
                for arg in node.args:
                    random -= names_in(arg)
        # names the cell binds itself (loop and comprehension variables, arguments) count only if it made them random
        bound = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
        bound |= {a.arg for a in ast.walk(tree) if isinstance(a, ast.arg)}
        used = names_in(tree) & random - (bound - made_here)
        if used and any(f in source for f in FIGURE_CALLS) and MARKER not in source:
            unmarked.append((i, sorted(used)))
    return unmarked


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_no_figure_from_random_weights_unless_the_cell_says_so(path):
    unmarked = random_figure_cells(path)
    assert not unmarked, (f"{path.name}: cells {unmarked} show a figure from random-weight models; load the trained "
                          f"toy weights, or say why randomness is the point with a '{MARKER} ...' comment")


def test_the_random_weight_check_catches_a_random_figure(tmp_path):
    nb = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell("unet = UNet2DCondition(config)\nfolder = work / 'unet'"),
        nbformat.v4.new_code_cell("save(unet.state_dict(), folder)\nloaded = UNet2DCondition.from_pretrained(folder)"),
        nbformat.v4.new_code_cell("plt.imshow(loaded(x))"),
        nbformat.v4.new_code_cell("# random weights: the point is the shapes\nplt.imshow(loaded(x))"),
        nbformat.v4.new_code_cell("opt = torch.optim.Adam(unet.parameters())\nplt.imshow(unet(x))"),
    ])
    path = tmp_path / "probe.ipynb"
    nbformat.write(nb, path)
    assert random_figure_cells(path) == [(2, ["loaded"])]


# ---------------------------------------------------------------- make lab

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_make_lab_serves_the_notebooks_from_a_clean_copy(tmp_path):
    """A copy of the tracked files, a fresh venv that borrows this one's packages (so nothing big is
    installed), then `make lab`: it installs the checkout and JupyterLab, and the server answers."""
    if shutil.which("make") is None or shutil.which("git") is None:
        pytest.fail("make and git are needed to check `make lab`")
    clone = tmp_path / "clone"
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT, capture_output=True, check=True).stdout
    for name in files.decode().split("\0"):
        if name and not name.startswith("weights/") and (ROOT / name).is_file():
            (clone / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, clone / name)
    venv = clone / ".venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    site = subprocess.run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    Path(site, "borrowed.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    port, token = free_port(), "minignext-lab-test"
    log = open(tmp_path / "lab.log", "w")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    try:
        if int(importlib.metadata.version("setuptools").split(".")[0]) >= 64:
            env["PIP_NO_BUILD_ISOLATION"] = "false"  # pip's spelling: build the checkout with the borrowed setuptools
    except importlib.metadata.PackageNotFoundError:
        pass                                         # pip then builds it in isolation, which takes longer
    server = subprocess.Popen(["make", "lab", f"LAB_ARGS=--no-browser --ip=127.0.0.1 --port={port} "
                               f"--IdentityProvider.token={token} --ServerApp.port_retries=0"],
                              cwd=clone, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    try:
        deadline, answer = time.monotonic() + 240, None
        while time.monotonic() < deadline and server.poll() is None and answer is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api?token={token}", timeout=5) as r:
                    answer = json.loads(r.read())
            except OSError:
                time.sleep(1)
        assert answer is not None, f"JupyterLab did not answer:\n{(tmp_path / 'lab.log').read_text()[-3000:]}"
        assert "version" in answer
        where = subprocess.run([str(venv / "bin" / "python"), "-c", "import minignext; print(minignext.__file__)"],
                               capture_output=True, text=True, cwd=tmp_path, env=env).stdout
        assert where.startswith(str(clone)), f"the copy's venv imports minignext from {where!r}, not from the copy"
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
        log.close()
