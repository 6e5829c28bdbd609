"""docs/quantization-quality.md as a user meets it: every python block runs as written, and every
flag its command lines give exists in that command."""

import importlib
import re
from pathlib import Path

import pytest

from corpus import shakespeare_lines
from tuning import model_with_tokenizer

from mlx_mamba.convert import convert

PAGE = (Path(__file__).resolve().parents[1] / "docs" / "quantization-quality.md").read_text()
PYTHON_BLOCKS = re.findall(r"^```python\n(.*?)^```", PAGE, re.M | re.S)
BASH_BLOCKS = re.findall(r"^```bash\n(.*?)^```", PAGE, re.M | re.S)


@pytest.fixture(scope="module")
def world(checkpoint, tmp_path_factory):
    cwd = tmp_path_factory.mktemp("docs")
    source = model_with_tokenizer(checkpoint("mamba2")[0], tmp_path_factory.mktemp("m") / "m")
    convert(source, cwd / "mamba2-model")
    (cwd / "held_out.txt").write_text("\n".join(shakespeare_lines(80, skip=3000)))
    return cwd


@pytest.mark.parametrize("index", range(len(PYTHON_BLOCKS)))
def test_python_block_runs_as_written(index, world, monkeypatch):
    monkeypatch.chdir(world)
    exec(compile(PYTHON_BLOCKS[index], f"python block {index}", "exec"), {"__name__": "__main__"})


@pytest.mark.parametrize("line", [b.strip() for b in BASH_BLOCKS])
def test_every_flag_exists(line, capsys):
    command = re.search(r"python (?:-m (mlx_mamba\.\w+)|(convert)\.py)(.*)", line)
    module = command[1] or "mlx_mamba.convert"
    with pytest.raises(SystemExit):
        importlib.import_module(module).main(["--help"])
    usage = capsys.readouterr().out
    flags = re.findall(r"(?<![\w.-])(--?[A-Za-z][\w-]*)", command[3])
    assert flags and not [f for f in flags
                          if not re.search(rf"(?<![\w-]){re.escape(f)}(?![\w-])", usage)]
