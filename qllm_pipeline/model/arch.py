"""One description of a decoder-only family's layout, read by every module that reaches into a model.

A :class:`Family` says where a model keeps its decoder blocks, embeddings, rotary embedding, final norm and head,
and, inside one decoder block, its projections in forward order, which projections read the same input (one
activation quantizer each when deployed), which norm produces that input (QLLM's reassembly points, SmoothQuant's
and the rotation's folding points), and which projections read and write the residual stream. Modules ask for
the family of a model (:func:`family_of`, by ``config.model_type``) or of a block (:func:`block_family`, by its
class) instead of spelling ``self_attn.q_proj`` or ``model.model.layers`` themselves.

A family also says what its blocks do beyond LLaMA's (the `features`): norms after the attention and the MLP outputs
(Gemma's sandwich norms), norms that scale by (1 + w) (`norm_offset`), a rotary embedding per layer type (Gemma's
local and global layers), q/k norms and q/k/v biases (read from the modules themselves). Sliding-window layers are
read from each block's attention module (:func:`sliding_window`) and honoured by the block runner's mask.

Adding a family is one entry in :data:`FAMILIES` and its tests (tests/test_arch.py, tests/test_families.py).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from torch import nn

from qllm_pipeline.core.errors import PipelineError

# QLLM's three reassembly points, by the names configs use (search_theta.points); every family has all three.
POINT_NAMES = ("qkv", "gate_up", "down")


@dataclass(frozen=True)
class Point:
    """A set of projections reading one input: QLLM's reassembly point, SmoothQuant's smoothing point."""

    name: str
    linears: tuple[str, ...]
    norm: str | None  # the norm whose output the linears read (foldable: rotation, smoothing); None for down_proj
    label: str  # how plots and reports name it


@dataclass(frozen=True)
class Family:
    model_type: str  # config.model_type
    block_class: str  # the transformers decoder-layer class
    input_groups: tuple[tuple[str, ...], ...]  # projections by the input they read, in forward order
    points: tuple[Point, ...]  # the groups whose input QLLM reassembles (and SmoothQuant smooths, when normed)
    writers: tuple[str, ...]  # projections that write the residual stream (rotation: W <- Qᵀ W)
    attention: str = "self_attn"
    act_fn: str = "mlp.act_fn"  # the gated MLP's activation: down_proj reads act_fn(gate(h)) * up(h)
    layers: str = "model.layers"
    embeddings: str = "model.embed_tokens"
    final_norm: str = "model.norm"
    rotary: str = "model.rotary_emb"
    head: str = "lm_head"
    causal_lm_class: str = "LlamaForCausalLM"  # the transformers class a checkpoint of the family loads as
    attention_out_norm: str | None = None  # a norm on the attention output before the residual add (Gemma)
    mlp_out_norm: str | None = None  # a norm on the MLP output before the residual add (Gemma)
    norm_offset: float = 0.0  # the norms scale by (norm_offset + w): 1 for Gemma's (1 + w) norms
    rotary_per_layer_type: bool = False  # rotary_emb(x, position_ids, layer_type): Gemma's local/global bases
    # Every window starts with the BOS token: Gemma is trained that way and, without it, its perplexity on the
    # first wiki_sample windows doubles (31.1 against 14.7 at Gemma-3 270M). LLaMA's protocol (GPTQ's) has none.
    bos_per_window: bool = False

    @property
    def post_norms(self) -> tuple[str, ...]:
        """Norms on a writer's output before the residual add: the residual rotation cannot pass through them."""
        return tuple(n for n in (self.attention_out_norm, self.mlp_out_norm) if n is not None)

    @property
    def linears(self) -> tuple[str, ...]:
        """Every projection of a block, in forward order."""
        return tuple(name for group in self.input_groups for name in group)

    @property
    def readers(self) -> tuple[str, ...]:
        """Projections that read the residual stream (through a norm): rotation's W <- W Q."""
        return tuple(name for p in self.points if p.norm is not None for name in p.linears)

    @property
    def norms(self) -> tuple[str, ...]:
        """The block's norms that feed projections (trainable by the low-rank stage, stored by fuse)."""
        return tuple(p.norm for p in self.points if p.norm is not None)

    @property
    def point_linears(self) -> dict[str, tuple[str, ...]]:
        return {p.name: p.linears for p in self.points}

    @property
    def norm_linears(self) -> dict[str, tuple[str, ...]]:
        return {p.norm: p.linears for p in self.points if p.norm is not None}

    def point(self, name: str) -> Point:
        return next(p for p in self.points if p.name == name)

    def stat_key(self, point: str) -> str:
        """The projection whose input statistics stand for the point's input (its first projection)."""
        return self.point(point).linears[0]

    @property
    def value_proj(self) -> str:
        """The projection giving the attention's values (v_proj): rotated per head with o_proj (R2)."""
        return self.point("qkv").linears[2]

    @property
    def attention_output(self) -> str:
        """The projection that writes the attention's output into the residual stream (o_proj)."""
        return self.writers[0]


LLAMA = Family(
    model_type="llama",
    block_class="LlamaDecoderLayer",
    input_groups=(
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        ("self_attn.o_proj",),
        ("mlp.gate_proj", "mlp.up_proj"),
        ("mlp.down_proj",),
    ),
    points=(
        Point("qkv", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "input_layernorm",
              "input_layernorm → q/k/v"),
        Point("gate_up", ("mlp.gate_proj", "mlp.up_proj"), "post_attention_layernorm",
              "post_attention_layernorm → gate/up"),
        Point("down", ("mlp.down_proj",), None, "SwiGLU → down_proj"),
    ),
    writers=("self_attn.o_proj", "mlp.down_proj"),
)

# Mistral, Qwen2 and Qwen3 lay their blocks out as LLaMA does; what differs lives inside the modules the block
# runner calls (sliding windows, q/k/v biases, q/k norms) or in the config (explicit head_dim).
MISTRAL = replace(LLAMA, model_type="mistral", block_class="MistralDecoderLayer", causal_lm_class="MistralForCausalLM")
QWEN2 = replace(LLAMA, model_type="qwen2", block_class="Qwen2DecoderLayer", causal_lm_class="Qwen2ForCausalLM")
QWEN3 = replace(LLAMA, model_type="qwen3", block_class="Qwen3DecoderLayer", causal_lm_class="Qwen3ForCausalLM")
# Gemma-3: sandwich norms (pre and post the attention and the MLP), (1 + w) norms, GeGLU, scaled embeddings,
# local (sliding, rope base 10k) and global layers. The gate/up input is the pre-feed-forward norm's output.
GEMMA3 = Family(
    model_type="gemma3_text",
    block_class="Gemma3DecoderLayer",
    causal_lm_class="Gemma3ForCausalLM",
    input_groups=LLAMA.input_groups,
    points=(
        LLAMA.points[0],
        Point("gate_up", ("mlp.gate_proj", "mlp.up_proj"), "pre_feedforward_layernorm",
              "pre_feedforward_layernorm → gate/up"),
        Point("down", ("mlp.down_proj",), None, "GeGLU → down_proj"),
    ),
    writers=LLAMA.writers,
    attention_out_norm="post_attention_layernorm",
    mlp_out_norm="post_feedforward_layernorm",
    norm_offset=1.0,
    rotary_per_layer_type=True,
    bos_per_window=True,
)

FAMILIES: dict[str, Family] = {f.model_type: f for f in (LLAMA, MISTRAL, QWEN2, QWEN3, GEMMA3)}
_BY_BLOCK_CLASS = {f.block_class: f for f in FAMILIES.values()}
# Settings of a family's config that our block runner and head do not compute, refused before weights load.
UNSUPPORTED_CONFIG = {
    "final_logit_softcapping": "soft-capped logits",
    "attn_logit_softcapping": "soft-capped attention scores",
}


def family_for_type(model_type: str | None, name: str = "the model") -> Family:
    if model_type not in FAMILIES:
        raise PipelineError(f"model={name} is a '{model_type}' model; qllm-pipeline quantizes "
                            f"{', '.join(FAMILIES)} models only (model_type in {list(FAMILIES)})")
    return FAMILIES[model_type]


def family_of(model_or_config) -> Family:
    """The family of a model (or of its config), by ``config.model_type``."""
    config = getattr(model_or_config, "config", model_or_config)
    return family_for_type(getattr(config, "model_type", None))


def check_config(config, name: str = "the model") -> Family:
    """The config's family, or one error naming what this model uses that the pipeline does not compute."""
    family = family_for_type(getattr(config, "model_type", None), name)
    for key, what in UNSUPPORTED_CONFIG.items():
        if getattr(config, key, None) is not None:
            raise PipelineError(f"model={name} uses {what} ({key}={getattr(config, key)}), which qllm-pipeline's "
                                f"block runner does not compute; quantize a model without them")
    return family


def block_family(block: nn.Module) -> Family:
    """The family of one decoder block, by its class (a block carries no config of its own)."""
    for cls in type(block).__mro__:
        if cls.__name__ in _BY_BLOCK_CLASS:
            return _BY_BLOCK_CLASS[cls.__name__]
    raise PipelineError(f"{type(block).__name__} is not the decoder block of a supported family ({', '.join(FAMILIES)})")


def family_of_arch(arch: dict) -> Family:
    """The family of a plan's architecture numbers (`plan.arch_from_config`, or a conf/model `arch` block; the
    blocks written before families existed are LLaMA's)."""
    return family_for_type(arch.get("model_type", "llama"))


def get_path(root: nn.Module, path: str):
    """The attribute at a dotted `path` (for modules, submodules and module lists alike)."""
    for part in path.split("."):
        root = getattr(root, part)
    return root


def set_path(root: nn.Module, path: str, value) -> None:
    parent, _, name = path.rpartition(".")
    setattr(get_path(root, parent) if parent else root, name, value)


def decoder_layers(model: nn.Module):
    return get_path(model, family_of(model).layers)


def set_decoder_layers(model: nn.Module, layers) -> None:
    set_path(model, family_of(model).layers, layers)


def embeddings(model: nn.Module) -> nn.Module:
    return get_path(model, family_of(model).embeddings)


def final_norm(model: nn.Module) -> nn.Module:
    return get_path(model, family_of(model).final_norm)


def rotary_embedding(model: nn.Module) -> nn.Module:
    return get_path(model, family_of(model).rotary)


def set_rotary_embedding(model: nn.Module, rotary: nn.Module) -> None:
    set_path(model, family_of(model).rotary, rotary)


def attention(block: nn.Module) -> nn.Module:
    return get_path(block, block_family(block).attention)


def layer_type(block: nn.Module) -> str:
    """The block's attention kind (`full_attention` or `sliding_attention`, as the config's `layer_types` says)."""
    return getattr(attention(block), "layer_type", None) or "full_attention"


def sliding_window(block: nn.Module) -> int | None:
    """How many past tokens (the token itself included) the block's attention sees, or None for all of them:
    Qwen2/3 and Gemma-3 set it per layer on the attention module; Mistral in its config for every layer."""
    attn = attention(block)
    if hasattr(attn, "sliding_window"):
        return attn.sliding_window
    if block_family(block).model_type == "mistral":
        return getattr(attn.config, "sliding_window", None)
    return None
