"""The published per-expert MoE weight names over transformers' fused Qwen3-MoE experts (shared by the RND1 and
LLaDA-MoE layouts): ``mlp.experts.E.{gate,up,down}_proj.weight`` ([I, H], [I, H], [H, I]) are slices of
``mlp.experts.gate_up_proj`` [E, 2I, H] (gate rows first, then up: ``gate, up = linear(x, W[e]).chunk(2)``) and
``mlp.experts.down_proj`` [E, H, I]; the router ``mlp.gate.weight`` [E, H] keeps its name."""

from __future__ import annotations

from dlm.models.zoo.layout import Target

ATTENTION = ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
             "self_attn.o_proj.weight", "self_attn.q_norm.weight", "self_attn.k_norm.weight")
NORMS = ("input_layernorm.weight", "post_attention_layernorm.weight")
DENSE = ("mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight")


def is_sparse(hf: dict, layer: int) -> bool:
    """Qwen3-MoE's rule (Qwen3MoeDecoderLayer): sparse unless in mlp_only_layers, every decoder_sparse_step."""
    step = hf.get("decoder_sparse_step", 1) or 1
    return layer not in (hf.get("mlp_only_layers") or []) and hf["num_experts"] > 0 and (layer + 1) % step == 0


def qwen3_moe_names(hf: dict, attention_bias: bool = False) -> dict[str, Target]:
    """Published name -> Target for a Qwen3-MoE-shaped checkpoint with per-expert weights (transformers 4.x names,
    which RND1 and LLaDA-MoE publish)."""
    inter = hf["moe_intermediate_size"]
    table = {"model.embed_tokens.weight": Target("model.embed_tokens.weight")}
    for i in range(hf["num_hidden_layers"]):
        p = f"model.layers.{i}."
        names = list(ATTENTION)
        if attention_bias:
            names += [n.replace(".weight", ".bias") for n in ATTENTION[:4]]
        names += list(NORMS)
        for name in names:
            table[p + name] = Target(p + name)
        if not is_sparse(hf, i):
            for name in DENSE:
                table[p + name] = Target(p + name)
            continue
        table[p + "mlp.gate.weight"] = Target(p + "mlp.gate.weight")
        fused, down = p + "mlp.experts.gate_up_proj", p + "mlp.experts.down_proj"
        for e in range(hf["num_experts"]):
            table[f"{p}mlp.experts.{e}.gate_proj.weight"] = Target(fused, (e, slice(0, inter)))
            table[f"{p}mlp.experts.{e}.up_proj.weight"] = Target(fused, (e, slice(inter, 2 * inter)))
            table[f"{p}mlp.experts.{e}.down_proj.weight"] = Target(down, (e,))
    table["model.norm.weight"] = Target("model.norm.weight")
    if not hf.get("tie_word_embeddings"):
        table["lm_head.weight"] = Target("lm_head.weight")
    return table
