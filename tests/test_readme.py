"""The README as a user meets it: every python block runs as written, and every flag that its
command lines give `python convert.py` or `python -m mlx_mamba.X` exists in that command."""

import importlib
import re
from pathlib import Path

import huggingface_hub
import pytest
import torch
import transformers

from mlx_mamba.convert import convert
from tuning import model_with_tokenizer, write_data, write_tokenizer

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
PYTHON_BLOCKS = re.findall(r"^```python\n(.*?)^```", README, re.M | re.S)
BASH_BLOCKS = re.findall(r"^```bash\n(.*?)^```", README, re.M | re.S)
REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def hub_model(directory):
    """What the README's hub repos stand for here: a tiny Mamba1 with the 8 layers that the
    fine-tuning block adapts, and a tokenizer that fits its vocabulary."""
    torch.manual_seed(0)
    config = transformers.MambaConfig(hidden_size=8, num_hidden_layers=8, state_size=4,
                                      expand=2, conv_kernel=4, vocab_size=100)
    transformers.MambaForCausalLM(config).save_pretrained(directory)
    write_tokenizer(directory)
    return directory


@pytest.fixture(scope="module")
def readme_world(checkpoint, tmp_path_factory):
    """A working directory holding what the blocks name (each local model path, converted from a
    tiny Mamba2; `data/`; `report.txt`), and the directory every hub repo id is served from."""
    cwd = tmp_path_factory.mktemp("readme")
    tokenizer = model_with_tokenizer(checkpoint("mamba2")[0], tmp_path_factory.mktemp("m") / "m")
    for path in set(re.findall(r"load\(\"([^\"]+)\"", "".join(PYTHON_BLOCKS))):
        if not REPO_ID.match(path):
            convert(checkpoint("mamba2")[0], cwd / path, tokenizer=tokenizer)
    write_data(cwd / "data")
    (cwd / "report.txt").write_text("The state-space model reads a long report, once. " * 20)
    return cwd, hub_model(tmp_path_factory.mktemp("hub") / "repo")


@pytest.mark.parametrize("index", range(len(PYTHON_BLOCKS)),
                         ids=[f"block{i}" for i in range(len(PYTHON_BLOCKS))])
def test_python_block_runs_as_written(index, readme_world, monkeypatch):
    cwd, hub = readme_world
    fetched = []

    def snapshot_download(repo_id, allow_patterns=None, **kwargs):
        fetched.append(repo_id)
        return str(hub)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.chdir(cwd)
    code = PYTHON_BLOCKS[index]
    exec(compile(code, f"README.md python block {index}", "exec"), {"__name__": "__main__"})
    assert set(fetched) <= set(re.findall(r"load\(\"([\w.-]+/[\w.-]+)\"", code))


def commands():
    """{module: flags} of the README's command lines: its bash blocks and inline code."""
    inline = re.findall(r"`([^`\n]+)`", re.sub(r"^```.*?^```", "", README, flags=re.M | re.S))
    found = {}
    for text in BASH_BLOCKS + inline:
        text = re.sub(r"#.*", "", text).replace("\\\n", " ")  # comments; continued lines
        for line in re.split(r"\n|&&", text):
            command = re.search(r"python (?:-m (mlx_mamba\.\w+)|(convert)\.py)(.*)", line)
            if command:
                module = command[1] or "mlx_mamba.convert"  # convert.py runs its main
                flags = re.findall(r"(?<![\w.-])(--?[A-Za-z][\w-]*)", command[3])
                found.setdefault(module, set()).update(flags)
    return found


def test_readme_names_every_command():
    assert set(commands()) == {"mlx_mamba.convert", "mlx_mamba.generate", "mlx_mamba.lora",
                               "mlx_mamba.fuse", "mlx_mamba.server"}


@pytest.mark.parametrize("module, flags", sorted(commands().items()))
def test_every_readme_flag_exists(module, flags, capsys):
    with pytest.raises(SystemExit):
        importlib.import_module(module).main(["--help"])
    usage = capsys.readouterr().out
    missing = [f for f in flags if not re.search(rf"(?<![\w-]){re.escape(f)}(?![\w-])", usage)]
    assert not missing, f"{module}: the README gives flags it does not have: {missing}"
