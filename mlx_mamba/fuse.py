"""Merge trained adapters into their model and save a model directory that `mlx_mamba.load` reads.

    python -m mlx_mamba.fuse --model M --adapter-path adapters --save-path fused [--de-quantize]

OUT gets config.json (the transformers form, with a `quantization` entry while the model stays
quantized), model.safetensors (transformers tensor names; written by convert.py's writer, so sharded and
atomic the same way) and the tokenizer files. OUT must not exist yet.
"""

import sys
from pathlib import Path

import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from . import cli
from .checkpoint import CheckpointError
from .config import ConfigError
from .convert import ConvertError, check_destination
from .convert import save_model as save_model_directory
from .loader import load_model, resolve
from .models.moe import ExpertLinear, QuantizedExpertLinear
from .tuner.adapters import AdapterError, load_adapters
from .tuner.lora import LoRALinear, dense_weight, fuse_linear


def _replace_modules(model, replacement):
    # replacement(module) -> a new module or None; applied to every leaf module in place.
    updates = [(name, new) for name, module in model.named_modules()
               if (new := replacement(module)) is not None]
    model.update_modules(tree_unflatten(updates))


def fuse_adapters(model, dequantize=False):
    """Replace every LoRA/DoRA layer by the plain layer it equals, in place."""
    _replace_modules(model, lambda m: fuse_linear(m, dequantize)
                     if isinstance(m, LoRALinear) else None)
    return model


def dequantize_model(model):
    """Replace quantized linear, expert and embedding layers by float ones, in place."""
    def dense(module):
        if "scales" not in module:
            return None
        weight = dense_weight(module)
        if isinstance(module, nn.QuantizedEmbedding):
            layer = nn.Embedding(*weight.shape)
        elif isinstance(module, QuantizedExpertLinear):
            experts, out_dims, in_dims = weight.shape
            layer = ExpertLinear(experts, in_dims, out_dims)
        else:
            layer = nn.Linear(weight.shape[1], weight.shape[0], bias="bias" in module)
        layer.weight = weight
        if "bias" in module:
            layer.bias = module.bias
        return layer

    _replace_modules(model, dense)
    model.config.quantization = None
    return model


def save_model(model, source, save_path):
    """The model as a new directory `save_path` with the tokenizer files of `source`."""
    save_model_directory(save_path, dict(tree_flatten(model.parameters())), model.config,
                         Path(source))


def build_parser():
    parser = cli.ArgumentParser(prog="python -m mlx_mamba.fuse",
                                description=__doc__.split("\n")[0])
    cli.add_model_arguments(parser, tokenizer=False)
    parser.add_argument("--adapter-path", default="adapters",
                        help="directory with adapters.safetensors and adapter_config.json")
    parser.add_argument("--save-path", default="fused_model",
                        help="the new output directory (it must not exist)")
    parser.add_argument("--de-quantize", action="store_true",
                        help="save a float model (drops the config's quantization entry)")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    return cli.run(lambda: fuse(args), (AdapterError, CheckpointError, ConfigError, ConvertError,
                                        OSError), interrupted="nothing was saved")


def fuse(args):
    check_destination(args.save_path, "--save-path")
    source = resolve(args.model)
    print("Loading pretrained model", flush=True)
    model = load_model(source)
    print(f"Loading adapters from {args.adapter_path}", flush=True)
    load_adapters(model, args.adapter_path)
    fuse_adapters(model, args.de_quantize)
    if args.de_quantize:
        dequantize_model(model)
    save_model(model, source, args.save_path)
    print(f"Saved the fused model to {args.save_path}")


if __name__ == "__main__":
    sys.exit(main())
