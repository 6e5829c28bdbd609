"""Tiny checkpoints in every flavour of REFERENCE.md, written by transformers (or torch.save with the
original names), so that tests run the real loading code on real files."""

import json
from pathlib import Path

import torch
import transformers

VOCAB = 100  # unpadded; originals pad it to a multiple of pad_vocab_size_multiple

MAMBA1 = dict(hidden_size=32, num_hidden_layers=2, state_size=8, expand=2, conv_kernel=4,
              time_step_rank=4)
MAMBA2 = dict(hidden_size=32, num_hidden_layers=2, state_size=8, expand=2, conv_kernel=4,
              num_heads=4, head_dim=16, chunk_size=8)

# Hybrids with their distinctive features switched on: a non-trivial layer order, grouped-query
# attention, Mamba2 with n_groups > 1, MoE with shared experts, non-1 multipliers; Jamba's Mamba1
# with an explicit dt rank (not "auto") and projection biases, attention and experts at periods
# and offsets that give every pairing of mixer and feed-forward but attention + MLP.
HYBRID_COMMON = dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2)
HYBRID_MAMBA = dict(mamba_n_heads=4, mamba_d_head=16, mamba_n_groups=2, mamba_d_state=8,
                    mamba_chunk_size=8)
GRANITE = dict(HYBRID_COMMON, **HYBRID_MAMBA, num_hidden_layers=4,
               layer_types=["mamba", "attention", "mamba", "attention"], intermediate_size=24,
               shared_intermediate_size=20, embedding_multiplier=3.0, residual_multiplier=0.7,
               attention_multiplier=0.3, logits_scaling=2.5)
HYBRIDS = {
    "bamba": ("BambaForCausalLM", dict(HYBRID_COMMON, **HYBRID_MAMBA, num_hidden_layers=4,
                                       attn_layer_indices=[1, 2], intermediate_size=24)),
    "granite_dense": ("GraniteMoeHybridForCausalLM", dict(GRANITE, num_local_experts=0)),
    "granite_moe": ("GraniteMoeHybridForCausalLM",
                    dict(GRANITE, num_local_experts=4, num_experts_per_tok=2)),
    # What mlx-lm 0.32's Granite reads as transformers does: one Mamba group (it gets more
    # groups wrong), 64 wide (it quantizes the router at group size 64), a dense MLP as wide as
    # `intermediate_size` (its dense MLP's width), as on the hub; see test_mlx_lm_granite.py.
    **{f"granite_{kind}_hub": ("GraniteMoeHybridForCausalLM", dict(
        GRANITE, hidden_size=64, mamba_d_head=32, mamba_n_groups=1, **experts))
       for kind, experts in (("dense", dict(num_local_experts=0, intermediate_size=20)),
                             ("moe", dict(num_local_experts=4, num_experts_per_tok=2)))},
    "granite_rope": ("GraniteMoeHybridForCausalLM",
                     dict(GRANITE, num_local_experts=0, position_embedding_type="rope")),
    # time_step_limit starts at time_step_min: where transformers' clamp and NVIDIA's agree.
    "nemotron_h": ("NemotronHForCausalLM", dict(
        HYBRID_COMMON, layers_block_type=["linear_attention", "moe", "full_attention", "mlp",
                                          "linear_attention", "moe"],
        head_dim=8, intermediate_size=24, mamba_num_heads=4, mamba_head_dim=16, n_groups=2,
        ssm_state_size=8, chunk_size=8, n_routed_experts=8, num_experts_per_tok=2,
        moe_intermediate_size=12, moe_shared_expert_intermediate_size=10, n_group=4, topk_group=2,
        routed_scaling_factor=2.5, time_step_min=0.001, time_step_limit=(0.001, float("inf")))),
    "falcon_h1": ("FalconH1ForCausalLM", dict(
        HYBRID_COMMON, **HYBRID_MAMBA, num_hidden_layers=3, intermediate_size=24, mamba_d_ssm=64,
        mamba_rms_norm=True, embedding_multiplier=1.7, lm_head_multiplier=0.6,
        mlp_multipliers=[0.8, 1.3], ssm_multipliers=[0.9, 1.2, 0.7, 1.1, 0.5],
        ssm_in_multiplier=1.4, ssm_out_multiplier=0.8, attention_in_multiplier=0.6,
        attention_out_multiplier=1.5, key_multiplier=0.7,
        rope_parameters={"rope_type": "default", "rope_theta": 500.0})),
    # Zamba2: two shared blocks taking turns over three hybrid layers, each invocation with its
    # own adapters (on q, k, v too), RoPE in the shared attention.
    "zamba2": ("Zamba2ForCausalLM", dict(
        hidden_size=32, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=4,
        layers_block_type=["mamba", "hybrid", "mamba", "hybrid", "hybrid", "mamba"],
        mamba_d_state=8, n_mamba_heads=4, mamba_ngroups=2, chunk_size=8, intermediate_size=24,
        num_mem_blocks=2, use_shared_attention_adapter=True, adapter_rank=4, use_mem_rope=True,
        time_step_min=0.001)),
    "zamba2_plain": ("Zamba2ForCausalLM", dict(
        hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
        layers_block_type=["hybrid", "mamba", "hybrid"], mamba_d_state=8, n_mamba_heads=2,
        chunk_size=8, intermediate_size=24, num_mem_blocks=1, adapter_rank=4)),
    # Falcon-H1's other gate option (no norm), and a Mamba width that is not expand * hidden.
    "falcon_h1_no_norm": ("FalconH1ForCausalLM", dict(
        HYBRID_COMMON, **dict(HYBRID_MAMBA, mamba_n_heads=6), num_hidden_layers=2,
        intermediate_size=24, mamba_d_ssm=96, mamba_rms_norm=False,
        ssm_multipliers=[0.9, 1.2, 0.7, 1.1, 0.5])),
    # Layers: Mamba1 + MLP, attention + MoE, Mamba1 + MLP, Mamba1 + MoE.
    "jamba": ("JambaForCausalLM", dict(
        HYBRID_COMMON, num_hidden_layers=4, attn_layer_period=3, attn_layer_offset=1,
        expert_layer_period=2, expert_layer_offset=1, num_experts=4, num_experts_per_tok=2,
        intermediate_size=24, mamba_d_state=8, mamba_dt_rank=4, mamba_proj_bias=True)),
}

# flavour -> (transformers class, config, layout); layout "hf" is save_pretrained,
# "original" is state-spaces' config.json + pytorch_model.bin.
FLAVOURS = {
    "mamba1": ("MambaForCausalLM", dict(MAMBA1, vocab_size=VOCAB), "hf"),
    "mamba1_untied": ("MambaForCausalLM",
                      dict(MAMBA1, vocab_size=VOCAB, tie_word_embeddings=False), "hf"),
    "mamba1_sharded": ("MambaForCausalLM", dict(MAMBA1, vocab_size=VOCAB), "hf_sharded"),
    "falcon_mamba": ("FalconMambaForCausalLM",
                     dict(MAMBA1, vocab_size=VOCAB, mixer_rms_eps=1e-6), "hf"),
    "mamba2": ("Mamba2ForCausalLM",
               dict(MAMBA2, vocab_size=VOCAB, n_groups=1, tie_word_embeddings=True), "hf"),
    "mamba2_groups_untied": ("Mamba2ForCausalLM",
                             dict(MAMBA2, vocab_size=VOCAB, n_groups=2, tie_word_embeddings=False),
                             "hf"),
    "mamba1_original": ("MambaForCausalLM", dict(MAMBA1, vocab_size=104), "original"),
    **{name: (cls, dict(kw, vocab_size=VOCAB), "hf") for name, (cls, kw) in HYBRIDS.items()},
    "mamba2_original": ("Mamba2ForCausalLM",
                        dict(MAMBA2, vocab_size=112, n_groups=1, tie_word_embeddings=True),
                        "original"),
}


def build_transformers_model(flavour, seed=0):
    """A randomly initialised transformers model of `flavour`, every weight perturbed so that no
    parameter sits at a value (zero bias, unit norm) that would hide a mistake."""
    class_name, config_kwargs, _ = FLAVOURS[flavour]
    cls = getattr(transformers, class_name)
    config_cls = getattr(transformers, class_name.replace("ForCausalLM", "Config"))
    torch.manual_seed(seed)
    model = cls(config_cls(**config_kwargs)).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("A_log"):
                param.copy_(torch.log(torch.empty_like(param).uniform_(0.5, 8.0)))
            elif name.endswith(("dt_bias", "dt_proj.bias")):
                param.copy_(torch.empty_like(param).uniform_(-4.0, 0.0))
            elif name.endswith("norm.weight") or name.endswith("norm_f.weight"):
                param.copy_(1.0 + 0.2 * torch.randn_like(param))
            else:
                param.add_(0.05 * torch.randn_like(param))
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.copy_(0.1 * torch.randn_like(buffer))
    return model


def write_checkpoint(flavour, directory, seed=0):
    """Write `flavour` into `directory`; returns the transformers model that it holds."""
    model = build_transformers_model(flavour, seed)
    _, config_kwargs, layout = FLAVOURS[flavour]
    directory = Path(directory)
    if layout == "hf":
        model.save_pretrained(directory)
    elif layout == "hf_sharded":
        model.save_pretrained(directory, max_shard_size="20KB")
    else:
        _write_original(model, config_kwargs, directory)
    return model


def _write_original(model, kw, directory):
    directory.mkdir(parents=True, exist_ok=True)
    mamba2 = "num_heads" in kw
    ssm_cfg = {"d_state": kw["state_size"], "d_conv": kw["conv_kernel"], "expand": kw["expand"]}
    if mamba2:
        ssm_cfg.update(layer="Mamba2", headdim=kw["head_dim"], ngroups=kw["n_groups"],
                       chunk_size=kw["chunk_size"])
    else:
        ssm_cfg["dt_rank"] = kw["time_step_rank"]
    multiple = 16 if mamba2 else 8
    config = {"d_model": kw["hidden_size"], "d_intermediate": 0,
              "n_layer": kw["num_hidden_layers"], "vocab_size": VOCAB, "ssm_cfg": ssm_cfg,
              "rms_norm": True, "residual_in_fp32": True, "fused_add_norm": True,
              "pad_vocab_size_multiple": multiple, "tie_embeddings": True}
    (directory / "config.json").write_text(json.dumps(config))
    # Original names, the tied head stored once, as state-spaces ships them.
    state = {name.replace("backbone.embeddings.", "backbone.embedding."): tensor.clone()
             for name, tensor in model.state_dict().items() if name != "lm_head.weight"}
    torch.save(state, directory / "pytorch_model.bin")
