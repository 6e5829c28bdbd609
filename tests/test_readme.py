"""The README and the pages of docs/ as a user meets them: every python block runs as written,
every flag that their command lines give `python convert.py`, `python -m mlx_mamba.X` or a script
of benchmarks/ or examples/ exists in that command's parser, and every link leads somewhere."""

import importlib
import re
import runpy
import sys
from pathlib import Path

import huggingface_hub
import pytest
import torch
import transformers

from mlx_mamba.convert import convert
from tuning import model_with_tokenizer, write_data, write_tokenizer

ROOT = Path(__file__).resolve().parents[1]
PAGES = {path.relative_to(ROOT).as_posix(): path.read_text()
         for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]}
PYTHON_BLOCKS = [(page, code) for page, text in PAGES.items()
                 for code in re.findall(r"^```python\n(.*?)^```", text, re.M | re.S)]
REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
COMMAND = re.compile(r"python (?:-m (mlx_mamba\.\w+)|((?:benchmarks/|examples/)?\w+\.py))(.*)")


# Each hub repo that a page names is stood for by a tiny Mamba1 with a tokenizer that fits its
# vocabulary: the fine-tuning blocks' repo by one with the 8 layers they adapt, any other by one
# whose inputs are as wide as quantization's default group (64).
STAND_INS = {"state-spaces/mamba-130m-hf": dict(hidden_size=8, num_hidden_layers=8)}
WIDE = dict(hidden_size=64, num_hidden_layers=2)


def hub_model(directory, sizes):
    torch.manual_seed(0)
    config = transformers.MambaConfig(**sizes, state_size=4, expand=2, conv_kernel=4,
                                      vocab_size=100)
    transformers.MambaForCausalLM(config).save_pretrained(directory)
    write_tokenizer(directory)
    return directory


@pytest.fixture(scope="module")
def pages_world(checkpoint, tmp_path_factory):
    """A working directory holding what the blocks name (each local model path, converted from a
    tiny Mamba2; `data/`; `report.txt`), and the hub: repo id -> its stand-in, made on demand."""
    cwd = tmp_path_factory.mktemp("pages")
    tokenizer = model_with_tokenizer(checkpoint("mamba2")[0], tmp_path_factory.mktemp("m") / "m")
    for path in set(re.findall(r"load\(\"([^\"]+)\"", "".join(c for _, c in PYTHON_BLOCKS))):
        if not REPO_ID.match(path):
            convert(checkpoint("mamba2")[0], cwd / path, tokenizer=tokenizer)
    write_data(cwd / "data")
    (cwd / "report.txt").write_text("The state-space model reads a long report, once. " * 20)
    hub_root = tmp_path_factory.mktemp("hub")

    def hub(repo_id):
        directory = hub_root / repo_id.replace("/", "--")
        if not directory.exists():
            hub_model(directory, STAND_INS.get(repo_id, WIDE))
        return directory

    return cwd, hub


def block_ids(blocks):
    counts = {}
    for page, _ in blocks:
        counts[page] = counts.get(page, -1) + 1
        yield f"{page}:block{counts[page]}"


@pytest.mark.parametrize("page, code", PYTHON_BLOCKS, ids=list(block_ids(PYTHON_BLOCKS)))
def test_python_block_runs_as_written(page, code, pages_world, monkeypatch):
    cwd, hub = pages_world
    fetched = []

    def snapshot_download(repo_id, allow_patterns=None, **kwargs):
        fetched.append(repo_id)
        return str(hub(repo_id))

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.chdir(cwd)
    exec(compile(code, f"{page} python block", "exec"), {"__name__": "__main__"})
    assert set(fetched) <= set(re.findall(r"\"([\w.-]+/[\w.-]+)\"", code))


def commands(text):
    """{command: flags} of a page's command lines: its bash blocks and its inline code (which
    may wrap over lines); a command is a module name or a script's path."""
    bash = re.findall(r"^```bash\n(.*?)^```", text, re.M | re.S)
    inline = re.findall(r"`([^`]+)`", re.sub(r"^```.*?^```", "", text, flags=re.M | re.S))
    found = {}
    for part in bash + [code.replace("\n", " ") for code in inline]:
        part = re.sub(r"#.*", "", part).replace("\\\n", " ")  # comments; continued lines
        for line in re.split(r"\n|&&", part):
            command = COMMAND.search(line)
            if command:
                name = command[1] or command[2]
                name = "mlx_mamba.convert" if name == "convert.py" else name  # convert.py runs it
                flags = re.findall(r"(?<![\w.-])(--?[A-Za-z][\w-]*)", command[3])
                found.setdefault(name, set()).update(flags)
    return found


PAGE_COMMANDS = [(page, name, flags) for page, text in PAGES.items()
                 for name, flags in sorted(commands(text).items())]


def package_commands():
    """Every `python -m mlx_mamba.X` the package has: a module run as a script, or a package with
    a __main__.py."""
    package = ROOT / "mlx_mamba"
    scripts = {path.stem for path in package.glob("*.py")
               if 'if __name__ == "__main__"' in path.read_text()}
    scripts |= {path.parent.name for path in package.glob("*/__main__.py")}
    return {f"mlx_mamba.{name}" for name in scripts}


def test_readme_names_every_command():
    assert {name for name in commands(PAGES["README.md"]) if name.startswith("mlx_mamba.")} == (
        package_commands())


def usage(command, monkeypatch, capsys):
    """The --help text of a package command or of a script (run in this process: the scripts'
    imports are mostly loaded already, a subprocess would load them all again)."""
    if command.startswith("mlx_mamba."):
        with pytest.raises(SystemExit):
            importlib.import_module(command).main(["--help"])
        return capsys.readouterr().out
    script = ROOT / command
    assert script.is_file(), f"{command} does not exist"
    loaded = set(sys.modules)
    monkeypatch.syspath_prepend(str(script.parent))  # the scripts import their neighbours
    monkeypatch.setattr(sys, "argv", [str(script), "--help"])
    try:
        with pytest.raises(SystemExit):
            runpy.run_path(str(script), run_name="__main__")
    finally:  # the neighbours leave, lest a name like `generate` shadow another later
        for name in set(sys.modules) - loaded:
            if str(getattr(sys.modules[name], "__file__", None)).startswith(str(script.parent)):
                del sys.modules[name]
    return capsys.readouterr().out


@pytest.mark.parametrize("page, command, flags", PAGE_COMMANDS,
                         ids=[f"{page}:{command}" for page, command, _ in PAGE_COMMANDS])
def test_every_flag_exists(page, command, flags, monkeypatch, capsys):
    text = usage(command, monkeypatch, capsys)
    missing = [f for f in flags if not re.search(rf"(?<![\w-]){re.escape(f)}(?![\w-])", text)]
    assert not missing, f"{page} gives {command} flags it does not have: {sorted(missing)}"


def anchors(text):
    """The #anchors of a page's headings, as GitHub makes them."""
    return {re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
            for heading in re.findall(r"^#+ (.+)$", re.sub(r"^```.*?^```", "", text,
                                                             flags=re.M | re.S), re.M)}


@pytest.mark.parametrize("page", PAGES)
def test_every_link_resolves(page):
    text = re.sub(r"^```.*?^```", "", PAGES[page], flags=re.M | re.S)
    broken = []
    for link in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"\w+://", link):
            continue
        path, _, anchor = link.partition("#")
        target = (ROOT / page).parent / path if path else ROOT / page
        if not target.exists() or anchor and anchor not in anchors(target.read_text()):
            broken.append(link)
    assert not broken, f"{page} links to what does not exist: {broken}"
