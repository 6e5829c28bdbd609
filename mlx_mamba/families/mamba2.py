"""transformers Mamba2 (`model_type` mamba2, `Mamba2Config`): Mamba-Codestral's conversions and
the state-spaces Mamba2 ports. Its tensor names are this package's own."""

import math

from ..config_fields import ConfigError, dt_limit, get
from .mamba import read_shared, write_shared


def read_config(config):
    fields = read_shared(config)
    d_model, expand = fields["d_model"], fields["expand"]
    head_dim = get(config, "head_dim", 64)
    heads = get(config, "num_heads", max(expand * d_model // head_dim, 1))
    if heads * head_dim != expand * d_model:
        raise ConfigError(
            f"fields 'num_heads' * 'head_dim' ({heads} * {head_dim}) must equal "
            f"'expand' * 'hidden_size' ({expand} * {d_model})")
    return dict(
        arch="mamba2", d_state=get(config, "state_size", 128), head_dim=head_dim,
        n_groups=get(config, "n_groups", 8), chunk_size=get(config, "chunk_size", 256),
        dt_limit=dt_limit(config),
        tie_embeddings=get(config, "tie_word_embeddings", False, "bool"), **fields)


def write_config(config):
    # time_step_rank is unused by Mamba2, but transformers writes it and mlx-lm needs it.
    return dict(write_shared(config), num_heads=config.n_heads, head_dim=config.head_dim,
                n_groups=config.n_groups, chunk_size=config.chunk_size,
                time_step_limit=list(config.dt_limit),
                time_step_rank=math.ceil(config.d_model / 16))
