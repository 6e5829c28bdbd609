"""The language model: embeddings, a stack of pre-norm residual layers, final norm, head.

Each layer is a mixer (Mamba1, Mamba2, attention, MLP or MoE) after its norm, optionally followed
by a feed-forward (MLP or MoE) after a second norm, as the config's `layer_types` and `ffn_types`
say. Pure Mamba models are the stack with Mamba mixers only; the hybrids add layer kinds.
"""

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from ..cache import LayerCaches
from ..config import ModelConfig
from .attention import Attention
from .mamba1 import Mamba1
from .mamba2 import Mamba2
from .mamba3 import Mamba3
from .mlp import MLP
from .moe import MoE
from .parallel import ParallelMixer
from .shared_block import InvocationAdapters, SharedBlock
from .sharding import balanced_ranges, prefixed


def make_layer(config: ModelConfig, kind):
    c = config
    if kind == "mamba1":
        return Mamba1(c.d_model, c.d_state, c.d_conv, c.expand, c.dt_rank, c.conv_bias, c.bias,
                      c.mixer_rms_eps, c.mixer_rms_weights)
    if kind in ("mamba2", "hybrid"):
        return Mamba2(c.d_model, c.d_state, c.d_conv, c.expand, c.head_dim, c.n_groups,
                      c.chunk_size, c.dt_limit, c.conv_bias, c.bias, c.gate_norm_eps or c.norm_eps,
                      c.d_inner, c.mamba_gate_norm, c.ssm_multipliers or None)
    if kind == "mamba3":
        return Mamba3(c.d_model, c.d_state, c.expand, c.head_dim, c.n_groups, c.rope_fraction,
                      A_floor=c.A_floor, is_outproj_norm=c.is_outproj_norm, is_mimo=c.is_mimo,
                      mimo_rank=c.mimo_rank, chunk_size=c.chunk_size,
                      A_activation=c.A_activation)
    if kind == "attention":
        return Attention(c.d_model, c.attn_heads, c.attn_kv_heads, c.attn_head_dim, c.attn_bias,
                         c.attn_scale, c.rope_theta, c.rope_dims, c.key_multiplier)
    if kind == "parallel":
        return ParallelMixer(make_layer(c, "mamba2"), make_layer(c, "attention"),
                             c.parallel_multipliers)
    if kind == "mlp":
        return MLP(c.d_model, c.mlp_size, c.mlp_activation, c.mlp_bias, c.mlp_multipliers)
    return MoE(c.d_model, c.n_experts, c.top_k, c.expert_size, c.mlp_activation,
               c.shared_expert_size, c.router, c.router_groups, c.router_topk_groups,
               c.router_normalize, c.router_scale, c.expert_latent_size, c.mlp_bias)


class ResidualBlock(nn.Module):
    def __init__(self, config: ModelConfig, index):
        super().__init__()
        self.norm = nn.RMSNorm(config.d_model, eps=config.norm_eps)
        self.mixer = make_layer(config, config.layer_type(index))
        if config.ffn_type(index):
            self.ffn_norm = nn.RMSNorm(config.d_model, eps=config.norm_eps)
            self.ffn = make_layer(config, config.ffn_type(index))
        if config.layer_type(index) == "hybrid":  # Zamba2: a shared block feeds the Mamba input
            c = config
            self.linear = nn.Linear(c.d_model, c.d_model, bias=False)
            self.adapters = InvocationAdapters(c.d_model, c.attn_heads * c.attn_head_dim,
                                               c.attn_kv_heads * c.attn_head_dim, c.mlp_size,
                                               c.adapter_rank, c.attention_adapters)


class Backbone(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embeddings = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = [ResidualBlock(config, i) for i in range(config.n_layer)]
        c = config
        # Held once here and invoked by the hybrid layers: shared in memory and on disk.
        self.blocks = [SharedBlock(c.d_model, c.attn_heads, c.attn_kv_heads, c.attn_head_dim,
                                   c.mlp_size, c.mlp_activation, c.norm_eps, c.rope_theta,
                                   c.mlp_bias)
                       for _ in range(c.shared_blocks)]
        self.norm_f = nn.RMSNorm(config.d_model, eps=config.norm_eps)


class Model(nn.Module):
    """input_ids (B, T) -> logits (B, T, V); `step` decodes one token per sequence in O(1)
    (attention layers: O(context) per token).

    Token ids are not range-checked here: that would force evaluation inside a lazy graph. An
    id outside [0, vocab_size) never reads outside the embedding table: the lookup is clamped
    into it and the logits at that position are NaN, so the fault shows (later positions read
    the clamped row). Every entry point that takes ids from a user (generation, the CLIs, the
    tuner's data, prompt cache files) checks them and says which is wrong; check ids of your own
    with `mlx_mamba.check_token_ids(ids, model.config.vocab_size)`.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.backbone = Backbone(config)
        if not config.tie_embeddings:
            self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self._stage = None  # pipeline parallel: (group, first layer, end layer)
        # Which part of the model this process holds ("" for all of it): a sharded rank's
        # caches hold only its part of the state.
        self.part = ""

    def make_cache(self, batch_size=1):
        """One cache per layer: MambaCache, KVCache, None for MLP and MoE layers, LayerCaches
        for layers with several stateful parts (Falcon-H1's parallel layer, Zamba2's hybrid)."""
        caches = []
        for i, layer in enumerate(self.backbone.layers):
            if "mixer" not in layer:  # held by another rank of a pipeline
                caches.append(None)
                continue
            cache = layer.mixer.make_cache(batch_size)
            if "linear" in layer:
                block = self.backbone.blocks[self.config.shared_block(i)[0]]
                cache = LayerCaches(mamba=cache,
                                    attention=block.self_attn.make_cache(batch_size))
            caches.append(cache)
        return caches

    def shard(self, group=None):
        """Tensor parallel over `group` (default: the world of `mx.distributed.init()`), in
        place: every layer keeps its share of heads, channels or hidden size and sums its output
        over the group; embeddings, norms, routers and the head stay whole, so every rank gets
        the full logits. Returns the plan, {parameter: (axis, [(start, stop), ...])}, that says
        which slices of each full tensor this rank holds.

        A world size that does not divide what must be split raises `ShardingError` (naming the
        field, its value and the world size); the model is then unusable."""
        group = group or mx.distributed.init()
        if group.size() == 1:
            return {}
        self.part = f"rank {group.rank()} of {group.size()}, tensor parallel"
        plan = {}
        rows = [block.adapter_rows(group) for block in self.backbone.blocks]
        for i, layer in enumerate(self.backbone.layers):
            for name in ("mixer", "ffn"):
                if name in layer:
                    plan.update(prefixed(f"backbone.layers.{i}.{name}", layer[name].shard(group)))
            if "adapters" in layer:
                adapters = layer.adapters.shard(rows[self.config.shared_block(i)[0]])
                plan.update(prefixed(f"backbone.layers.{i}.adapters", adapters))
        for j, block in enumerate(self.backbone.blocks):
            plan.update(prefixed(f"backbone.blocks.{j}", block.shard(group)))
        return plan

    def pipeline(self, group=None):
        """Pipeline parallel over `group` (default: the world of `mx.distributed.init()`), in
        place: rank r keeps the r-th of contiguous layer ranges balanced by their parameter
        bytes (an MoE layer weighs more than a Mamba layer), and only those layers' caches; the
        hidden state goes from rank to rank with send/recv, and the last rank's final hidden
        state reaches every rank, which holds the head. Returns (first layer, end layer)."""
        group = group or mx.distributed.init()
        layers = self.backbone.layers
        if group.size() == 1:
            return 0, len(layers)
        sizes = [sum(v.nbytes for _, v in tree_flatten(layer.parameters())) for layer in layers]
        bounds = balanced_ranges(sizes, group.size(), "layers (num_hidden_layers)")
        start, stop = bounds[group.rank()], bounds[group.rank() + 1]
        c = self.config
        self._stage = (group, start, stop)
        self.part = f"rank {group.rank()} of {group.size()}, pipeline parallel"
        for i in range(len(layers)):
            if not start <= i < stop:
                layers[i] = nn.Module()
        hybrids = [i for i in range(start, stop) if "linear" in layers[i]]
        used = {c.shared_block(i)[0] for i in hybrids}
        for j in range(len(self.backbone.blocks)):
            if j not in used:
                self.backbone.blocks[j] = nn.Module()
        # The first rank embeds; Zamba2's hybrid layers take the embeddings too; every rank
        # holds the final norm and the head (the embeddings when tied).
        if not (start == 0 or hybrids or c.tie_embeddings):
            self.backbone.pop("embeddings")
        return start, stop

    def _dtype(self):
        # The dtype the layers compute in: that of the first Mamba conv, which is never
        # quantized (a quantized embedding dequantizes to bfloat16 in the fp4/fp8 modes) nor
        # kept in float32 like the norms. A pipeline rank asks the layers it holds.
        mixers = [layer.mixer for layer in self.backbone.layers if "mixer" in layer]
        for mixer in mixers:
            mamba = mixer.get("mamba", mixer)  # a parallel layer's Mamba part
            if "conv1d" in mamba:
                return mamba.conv1d.weight.dtype
        # No conv (Mamba-3, attention): the dtype of the first projection, or of an
        # affine-quantized one's scales; with float quantization modes, what the (then
        # quantized) embedding gives.
        for mixer in mixers:
            projection = mixer.get("out_proj", mixer.get("o_proj"))
            if projection is not None:
                projection = projection.get("linear", projection)  # the layer inside a LoRA
                dtype = projection.get("scales", projection.weight).dtype
                if mx.issubdtype(dtype, mx.floating):
                    return dtype
        if "embeddings" not in self.backbone:  # a pipeline rank: the untied head's
            return self.lm_head(mx.zeros((1, self.config.d_model), mx.bfloat16)).dtype
        return self.backbone.embeddings(mx.zeros((1,), mx.int32)).dtype

    def _run(self, input_ids, cache, mask, step):
        c = self.config
        dtype = self._dtype()
        group, start, stop = self._stage or (None, 0, c.n_layer)
        # The one lookup of ids (every family, quantized tables too), kept inside the table.
        in_vocab = (input_ids >= 0) & (input_ids < c.vocab_size)
        embedded = None
        if "embeddings" in self.backbone:  # not on every pipeline rank
            embedded = self.backbone.embeddings(mx.clip(input_ids, 0, c.vocab_size - 1))
            embedded = embedded.astype(dtype)
            if c.embedding_multiplier != 1.0:
                embedded = embedded * c.embedding_multiplier
        # The residual stream stays in float32 when the checkpoint says so (residual_in_fp32).
        residual_dtype = mx.float32 if c.residual_in_fp32 else dtype
        if start == 0:
            residual = embedded.astype(residual_dtype)
        else:  # from the rank before in the pipeline
            residual = mx.distributed.recv((*input_ids.shape, c.d_model), residual_dtype,
                                           group.rank() - 1, group=group)
            mx.eval(residual)  # at once: see _exchanged
        for i in range(start, stop):
            layer = self.backbone.layers[i]
            layer_cache = cache[i] if cache is not None else None
            x = residual
            if "linear" in layer:
                block = self.backbone.blocks[c.shared_block(i)[0]]
                inputs = mx.concatenate([x.astype(dtype), embedded], axis=-1)
                attention_cache = layer_cache and layer_cache.attention
                shared = block.step(inputs, layer.adapters, attention_cache) if step else \
                    block(inputs, layer.adapters, cache=attention_cache, mask=mask)
                x = x + layer.linear(shared).astype(x.dtype)
                layer_cache = layer_cache and layer_cache.mamba
            h = layer.norm(x).astype(dtype)
            h = layer.mixer.step(h, layer_cache) if step else \
                layer.mixer(h, cache=layer_cache, mask=mask)
            residual = self._add(residual, h)
            if "ffn" in layer:
                residual = self._add(residual, layer.ffn(layer.ffn_norm(residual).astype(dtype)))
        if group is not None:
            if stop < c.n_layer:  # the next rank goes on
                mx.eval(mx.distributed.send(residual, group.rank() + 1, group=group))
                residual = mx.zeros_like(residual)
            residual = _exchanged(residual, group)
        hidden = self.backbone.norm_f(residual).astype(dtype)
        # NaN at an id outside the vocabulary, and so in its logits (see the class docstring).
        return mx.where(in_vocab[..., None], hidden, mx.array(mx.nan, hidden.dtype))

    def head(self, hidden):
        """hidden (..., D), the final norm's output -> logits (..., V)."""
        c = self.config
        logits = self.backbone.embeddings.as_linear(hidden) if c.tie_embeddings \
            else self.lm_head(hidden)
        return logits * c.logits_multiplier if c.logits_multiplier != 1.0 else logits

    def head_layer(self):
        """The layer whose weight `head` applies: lm_head, or the embeddings when tied."""
        return self.backbone.embeddings if self.config.tie_embeddings else self.lm_head

    def _add(self, residual, branch):
        scale = self.config.residual_multiplier
        return residual + (branch * scale if scale != 1.0 else branch).astype(residual.dtype)

    def __call__(self, input_ids, cache=None, mask=None):
        """Parallel over T; with a cache (from `make_cache`), continues from it in place.

        mask (B, T): 1 for tokens, 0 for left padding; a left-padded row then gives exactly the
        logits and state of the unpadded row (padding reaches no state, conv or attention).
        """
        _check_inputs(input_ids, cache, mask, 2, self.config.n_layer)
        return self.head(self._run(input_ids, cache, mask, step=False))

    def hidden_states(self, input_ids, mask=None):
        """input_ids (B, T) -> the final norm's output (B, T, D), which `head` turns into logits:
        the tuner's loss takes the logits from it a few tokens at a time."""
        _check_inputs(input_ids, None, mask, 2, self.config.n_layer)
        return self._run(input_ids, None, mask, step=False)

    def step(self, token_ids, cache):
        """token_ids (B,) -> logits (B, V), advancing `cache` by one token."""
        _check_inputs(token_ids, cache, None, 1, self.config.n_layer)
        return self.head(self._run(token_ids, cache, None, step=True))


def _exchanged(residual, group):
    """The last pipeline rank's final hidden state on every rank (the others give zeros), which
    each turns into the logits: one hidden vector per token crosses the group, not a vocabulary.

    Messages between ranks match in the order they are evaluated, not by call: a pipeline's
    receives, sends and this sum therefore run at once, in call order on every rank, whatever
    the caller evaluates later (a prefill evaluates only the caches)."""
    residual = mx.distributed.all_sum(residual, group=group)
    mx.eval(residual)
    return residual


def _check_inputs(ids, cache, mask, ndim, layers):
    """Shapes only (no evaluation): ids (B, T) or (B,), a cache of this batch, a mask like ids."""
    shape = tuple(getattr(ids, "shape", ()))
    if len(shape) != ndim or 0 in shape:
        expected = "(batch, length) with length >= 1" if ndim == 2 else "(batch,)"
        hint = " (model.step takes one token per row)" if ndim == 2 and len(shape) == 1 else ""
        raise ValueError(f"token ids of shape {shape}: expected {expected}{hint}")
    if not mx.issubdtype(ids.dtype, mx.integer):
        raise ValueError(f"token ids of dtype {ids.dtype}: expected integers")
    if mask is not None and tuple(mask.shape) != shape:
        raise ValueError(f"mask has shape {tuple(mask.shape)}; expected (batch, length) = "
                         f"{shape}, those of the ids")
    if cache is None:
        return
    if not isinstance(cache, (list, tuple)) or len(cache) != layers:
        raise ValueError(f"the cache must be the list of {layers} layer caches that "
                         "model.make_cache() returns")
    for layer in cache:
        if layer is not None and layer.batch_size != shape[0]:
            raise ValueError(f"the cache holds {layer.batch_size} sequences, the input has "
                             f"{shape[0]}: make the cache with model.make_cache(batch_size)")
        parts = getattr(layer, "parts", {"": layer}).values()
        if mask is not None and any(getattr(p, "trail", None) is not None for p in parts):
            raise ValueError("a marked (rewindable) cache takes no mask: its windows are "
                             "unpadded")
