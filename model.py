"""A Llama-2 / Mistral decoder written out by hand, with checkpoint loading, the
sentencepiece tokenizer with its chat templates, and generation.

The base language model of GenerativeAdapter is frozen: this file knows nothing of
generators. It offers the two hooks the method needs (paper §3):
  * `adapter`: a callable `(layer_index, h) -> {module_name: delta_fn}` called with the
    residual stream `h` entering each layer; each `delta_fn(x)` is added to the output of
    the linear module of that name (`q_proj` ... `down_proj`) for this call only;
  * `return_hidden`: the residual streams entering each layer (hidden state l of the usual
    `output_hidden_states` list).

Read top to bottom: config, norm, RoPE, attention, MLP, block, model, loading and saving,
tokenizer and chat prompts, generation, costs. Shape notes use the letters of METHOD.md (B rows,
T tokens, S key slots, L layers, D width, V vocabulary, hd head width).
"""

import json
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Callable

import sentencepiece as spm
import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn
from torch.utils.checkpoint import checkpoint

DeltaFn = Callable[[torch.Tensor], torch.Tensor]
Adapter = Callable[[int, torch.Tensor], dict[str, DeltaFn]]
ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
LINEAR_MODULES = (*ATTENTION_MODULES, "gate_proj", "up_proj", "down_proj")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

# -----------------------------------------------------------------------------
# Config


def read_json(path) -> dict:
    """The JSON object in a file; errors name the file."""
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected a JSON object, found {type(value).__name__}")
    return value


REQUIRED = object()  # config_field's default for a field that must be present


def config_field(config: dict, key: str, source: str, kind: type, default=REQUIRED, minimum: int = 1):
    """config[key] of a JSON config, checked: an int at least `minimum`, a positive float (an int
    will do), a bool, a str or a dict. A missing key or null gives `default`, or an error."""
    value = config.get(key)
    if value is None:
        if default is REQUIRED:
            raise ValueError(f"{source}: missing field '{key}'")
        return default
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        fits, expected = number and isinstance(value, int) and value >= minimum, f"an integer >= {minimum}"
    elif kind is float:
        fits, expected = number and value > 0, "a positive number"
    else:
        fits, expected = isinstance(value, kind), {bool: "true or false", str: "a string", dict: "an object"}[kind]
    if not fits:
        raise ValueError(f"{source}: field '{key}' is {json.dumps(value)}, expected {expected}")
    return float(value) if kind is float else value


def has_type(value, kind) -> bool:
    """Whether value is of a dataclass field's type: a class, list[X] or X | None (an int will
    do for a float; a bool is not an int)."""
    if isinstance(kind, types.UnionType):
        return any(has_type(value, k) for k in typing.get_args(kind))
    if typing.get_origin(kind) is list:
        return isinstance(value, list) and all(has_type(v, typing.get_args(kind)[0]) for v in value)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, kind) and (kind is bool or not isinstance(value, bool))


def check_types(config, prefix: str) -> None:
    """Raises ValueError naming (prefix + field) the first field of a dataclass whose value does
    not have the declared type."""
    for f in fields(config):
        value = getattr(config, f.name)
        if not has_type(value, f.type):
            name = str(f.type) if typing.get_origin(f.type) else f.type.__name__
            raise ValueError(f"{prefix}{f.name}: expected {name}, got {value!r}")


def setting(default, help: str, path: bool = False):
    """A config dataclass field that is also a command-line flag (cli.add_flags): its default and
    its --help text in one place. `path`: a file or directory, which a checkpoint records relative
    to the repository; a list of paths is given space separated, any other list comma separated."""
    metadata = {"help": help, "path": path}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def check_at_least(config, low, names, prefix: str) -> None:
    """Raises ValueError naming (prefix + name) the first attribute among `names` whose value,
    or one of whose values for a list, is below `low` (None passes)."""
    for name in names:
        value = getattr(config, name)
        for v in value if isinstance(value, list) else [value]:
            if v is not None and v < low:
                raise ValueError(f"{prefix}{name}: expected at least {low}, got {v}")


@dataclass
class ModelArgs:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 8
    head_dim: int = 128
    hidden_dim: int = 14336
    vocab_size: int = 32000
    norm_eps: float = 1e-5
    rope_theta: float = 1e6
    max_seq_len: int = 32768
    sliding_window: int | None = None  # Mistral v0.1: each token sees the last 4096
    tie_embeddings: bool = False
    bos_id: int = 1
    eos_id: int = 2
    model_type: str = "mistral"  # "llama" or "mistral": picks the chat template
    dtype: str = "bfloat16"  # the checkpoint's dtype, used on CUDA

    def __post_init__(self):
        """Checks what would otherwise fail deep inside the model, naming the field."""
        check_types(self, "ModelArgs.")
        check_at_least(self, 1, ("dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "hidden_dim",
                                 "vocab_size", "max_seq_len", "sliding_window"), "ModelArgs.")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"ModelArgs.n_heads = {self.n_heads} is not a multiple of "
                             f"n_kv_heads = {self.n_kv_heads}: each key/value head serves a group of query heads")
        if self.head_dim % 2:
            raise ValueError(f"ModelArgs.head_dim = {self.head_dim} is odd: RoPE rotates pairs of dimensions")

    @classmethod
    def checked(cls, source: str, **values) -> "ModelArgs":
        """cls(**values), with the file the values came from named in any error."""
        try:
            return cls(**values)
        except ValueError as err:
            raise ValueError(f"{source}: {err}") from None

    @classmethod
    def from_hf_config(cls, cfg: dict, source: str = "config.json") -> "ModelArgs":
        """Reads a Hugging Face config.json (transformers 4.x or 5.x spelling)."""
        get = lambda key, kind, default=REQUIRED, minimum=1: config_field(cfg, key, source, kind, default, minimum)
        model_type = get("model_type", str)
        if model_type not in ("llama", "mistral"):
            raise ValueError(f"{source}: model_type '{model_type}' is not supported "
                             "(expected 'llama' or 'mistral')")
        if "rope_parameters" in cfg:  # transformers 5.x
            rope, rope_key = get("rope_parameters", dict, {}), "rope_parameters.rope_type"
            theta = config_field(rope, "rope_theta", source, float, 10000.0)
            rope_type = rope.get("rope_type", "default")
        else:  # transformers 4.x
            rope, rope_key = get("rope_scaling", dict, {}), "rope_scaling.rope_type"
            theta = get("rope_theta", float, 10000.0)
            rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise ValueError(f"{source}: {rope_key} '{rope_type}' is not implemented "
                             "(only plain RoPE, 'default', is)")
        dim, n_heads = get("hidden_size", int), get("num_attention_heads", int)
        dtype = get("torch_dtype", str, None) or get("dtype", str, "float32")
        if dtype not in DTYPES:
            raise ValueError(f"{source}: dtype '{dtype}' is not one of {sorted(DTYPES)}")
        return cls.checked(
            source, dim=dim, n_layers=get("num_hidden_layers", int), n_heads=n_heads,
            n_kv_heads=get("num_key_value_heads", int, n_heads),
            head_dim=get("head_dim", int, dim // n_heads),
            hidden_dim=get("intermediate_size", int), vocab_size=get("vocab_size", int),
            norm_eps=get("rms_norm_eps", float, 1e-6), rope_theta=theta,
            max_seq_len=get("max_position_embeddings", int),
            sliding_window=get("sliding_window", int, None),
            tie_embeddings=get("tie_word_embeddings", bool, False),
            bos_id=get("bos_token_id", int, 1, minimum=0), eos_id=get("eos_token_id", int, 2, minimum=0),
            model_type=model_type, dtype=dtype)

    @classmethod
    def from_params(cls, params: dict, source: str = "params.json") -> "ModelArgs":
        """Reads a Mistral / Meta params.json (consolidated format)."""
        get = lambda key, kind, default=REQUIRED: config_field(params, key, source, kind, default)
        if isinstance(params.get("vocab_size"), int) and params["vocab_size"] <= 0:
            raise ValueError(f"{source}: vocab_size is {params['vocab_size']}; "
                             "set it to the tokenizer's vocabulary size")
        dim, n_heads = get("dim", int), get("n_heads", int)
        hidden_dim = get("hidden_dim", int, None)
        if hidden_dim is None:  # Meta's rule: 2/3 of 4*dim, scaled, rounded up to multiple_of
            hidden_dim = int(get("ffn_dim_multiplier", float, 1.0) * int(8 * dim / 3))
            multiple = get("multiple_of", int)
            hidden_dim = multiple * math.ceil(hidden_dim / multiple)
        return cls.checked(
            source, dim=dim, n_layers=get("n_layers", int), n_heads=n_heads,
            n_kv_heads=get("n_kv_heads", int, n_heads), head_dim=get("head_dim", int, dim // n_heads),
            hidden_dim=hidden_dim, vocab_size=get("vocab_size", int),
            norm_eps=get("norm_eps", float, 1e-5), rope_theta=get("rope_theta", float, 10000.0),
            # params.json does not state the context length; Mistral's models use 32768.
            max_seq_len=get("max_seq_len", int, 32768),
            sliding_window=get("sliding_window", int, None), model_type="mistral")

    def to_hf_config(self) -> dict:
        """The config.json that save_pretrained writes (transformers 4.x spelling)."""
        arch = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM"}[self.model_type]
        cfg = {
            "architectures": [arch], "model_type": self.model_type,
            "hidden_size": self.dim, "intermediate_size": self.hidden_dim,
            "num_hidden_layers": self.n_layers, "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads, "head_dim": self.head_dim,
            "rms_norm_eps": self.norm_eps, "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_seq_len, "vocab_size": self.vocab_size,
            "tie_word_embeddings": self.tie_embeddings, "bos_token_id": self.bos_id,
            "eos_token_id": self.eos_id, "hidden_act": "silu", "torch_dtype": self.dtype,
        }
        if self.model_type == "mistral":
            cfg["sliding_window"] = self.sliding_window
        return cfg


# -----------------------------------------------------------------------------
# Layers


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()  # normalise in float32, as Llama and Mistral do
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float):
    """RoPE tables for the given positions (B, T) -> cos, sin (B, 1, T, hd), float32."""
    inv_freq = theta ** -(torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim)
    angles = positions.float()[..., None] * inv_freq  # (B, T, hd / 2)
    angles = torch.cat([angles, angles], dim=-1)  # rotate-half layout: both halves share a frequency
    return angles.cos()[:, None], angles.sin()[:, None]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotates (B, heads, T, hd) pairs (i, i + hd / 2): the rotate-half convention."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x * cos.to(x.dtype) + rotated * sin.to(x.dtype))


def linear(module: nn.Linear, name: str, x: torch.Tensor, deltas: dict[str, DeltaFn] | None):
    """module(x), plus the caller's delta for this module name when there is one."""
    y = module(x)
    if deltas and name in deltas:
        y = y + deltas[name](x).to(y.dtype)
    return y


def module_widths(args: ModelArgs) -> dict[str, tuple[int, int]]:
    """(d_in, d_out) of every linear module of a layer: the one place their widths are set."""
    q, kv, D, hidden = args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim, args.dim, args.hidden_dim
    return {"q_proj": (D, q), "k_proj": (D, kv), "v_proj": (D, kv), "o_proj": (q, D),
            "gate_proj": (D, hidden), "up_proj": (D, hidden), "down_proj": (hidden, D)}


def module_path(name: str) -> str:
    """Where a linear module sits in a layer: 'self_attn.q_proj' ... 'mlp.down_proj'."""
    return f"{'self_attn' if name in ATTENTION_MODULES else 'mlp'}.{name}"


class KVCache:
    """Preallocated keys and values for all layers, with each slot's position and validity.

    Slots are shared by the rows of a batch; positions are per row, so left-padded prompts
    of different lengths decode together. All slots are kept (no rolling buffer): a sliding
    window is applied through the attention mask, which is exact. With static=True attention
    always spans all max_len slots (unfilled ones masked): every decode step has the same
    shapes, as torch.compile's CUDA graphs need.
    """

    def __init__(self, args: ModelArgs, batch: int, max_len: int, device, dtype, static: bool = False):
        shape = (args.n_layers, batch, args.n_kv_heads, max_len, args.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.pos = torch.zeros(batch, max_len, dtype=torch.long, device=device)
        self.valid = torch.zeros(batch, max_len, dtype=torch.bool, device=device)
        self.next_pos = torch.zeros(batch, dtype=torch.long, device=device)  # each row's next position
        self.start = self.length = 0  # the slots of the tokens being run are start .. length - 1
        self.padded = False  # whether any filled slot is padding (then a mask is needed)
        self.static = static

    def append(self, positions: torch.Tensor, real: torch.Tensor, padded: bool) -> None:
        """Takes the next T slots for a forward of T tokens, recording their positions (B, T) and
        which of them are real (B, T); `padded`: whether the forward has a padding mask."""
        self.start, self.length = self.length, self.length + positions.shape[1]
        self.pos[:, self.start:self.length], self.valid[:, self.start:self.length] = positions, real
        self.next_pos += real.sum(1)
        self.padded |= padded

    @property
    def span(self) -> int:
        """How many slots attention spans: those filled, or all of them when static."""
        return self.k.shape[3] if self.static else self.length

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Writes k, v (B, n_kv, T, hd) into the slots `append` took; returns the keys and values
        attention spans, (B, n_kv, S, hd)."""
        self.k[layer, :, :, self.start:self.length] = k
        self.v[layer, :, :, self.start:self.length] = v
        return self.k[layer, :, :, :self.span], self.v[layer, :, :, :self.span]


def attention_mask(qpos, kpos, kvalid, qslot, window):
    """Which keys each query may see -> bool (B, 1, T, S).

    qpos (B, T) and kpos (B, S) are RoPE positions; kvalid (B, S) marks real keys; qslot
    (T,) is each query's own key slot. A query sees valid keys at positions <= its own
    (and within the sliding window), and always its own slot, so padding rows stay finite.
    """
    allowed = (kpos[:, None, :] <= qpos[:, :, None]) & kvalid[:, None, :]
    if window is not None:
        allowed &= qpos[:, :, None] - kpos[:, None, :] < window
    own = torch.arange(kpos.shape[1], device=kpos.device) == qslot[:, None]  # (T, S)
    return (allowed | own)[:, None]


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        widths = module_widths(args)
        self.q_proj = nn.Linear(*widths["q_proj"], bias=False)
        self.k_proj = nn.Linear(*widths["k_proj"], bias=False)
        self.v_proj = nn.Linear(*widths["v_proj"], bias=False)
        self.o_proj = nn.Linear(*widths["o_proj"], bias=False)

    def forward(self, x, cos, sin, mask, cache, layer, deltas):
        B, T, _ = x.shape
        q = linear(self.q_proj, "q_proj", x, deltas).view(B, T, self.n_heads, self.head_dim)
        k = linear(self.k_proj, "k_proj", x, deltas).view(B, T, self.n_kv_heads, self.head_dim)
        v = linear(self.v_proj, "v_proj", x, deltas).view(B, T, self.n_kv_heads, self.head_dim)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, n_kv, S, hd)
        # mask is None: plain causal attention over T == S keys, or one query seeing all keys
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None and q.shape[2] > 1,
            enable_gqa=self.n_heads != self.n_kv_heads)
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)
        return linear(self.o_proj, "o_proj", y, deltas)


class MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        widths = module_widths(args)
        self.gate_proj = nn.Linear(*widths["gate_proj"], bias=False)
        self.up_proj = nn.Linear(*widths["up_proj"], bias=False)
        self.down_proj = nn.Linear(*widths["down_proj"], bias=False)

    def forward(self, x, deltas):
        gate = F.silu(linear(self.gate_proj, "gate_proj", x, deltas))  # SwiGLU
        return linear(self.down_proj, "down_proj", gate * linear(self.up_proj, "up_proj", x, deltas), deltas)


class Block(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.input_layernorm = RMSNorm(args.dim, args.norm_eps)
        self.self_attn = Attention(args)
        self.post_attention_layernorm = RMSNorm(args.dim, args.norm_eps)
        self.mlp = MLP(args)

    def forward(self, h, cos, sin, mask, cache, layer, deltas):
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, mask, cache, layer, deltas)
        return h + self.mlp(self.post_attention_layernorm(h), deltas)


# -----------------------------------------------------------------------------
# Model


class Transformer(nn.Module):
    """The decoder. Parameter names are Hugging Face's without the leading 'model.'."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.embed_tokens = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(Block(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.lm_head = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.checkpointing = False  # recompute each layer in backward (set by train.py)

    def forward(self, tokens: torch.Tensor, *, start_pos: int = 0,
                pad_mask: torch.Tensor | None = None, cache: KVCache | None = None,
                adapter: Adapter | None = None, return_hidden: bool = False,
                logits_at: torch.Tensor | None = None):
        """Runs the decoder.

        Args:
            tokens: (B, T) token ids.
            start_pos: RoPE position of the first token (without a cache).
            pad_mask: (B, T) bool, False on padding. Needed for left padding only: with right
                padding, causal attention already keeps real tokens off the padding.
            cache: a KVCache; positions then continue from what it holds.
            adapter: `(layer, h) -> {module_name: delta_fn}`, called with the residual stream
                h (B, T, D) entering each layer; delta_fn(x) is added to that module's output.
            return_hidden: also return the residual streams entering each layer.
            logits_at: (B, T) bool: compute logits only there (training, where a loss is taken:
                the output layer is a large share of a small model's step).
        Returns:
            logits (B, T, V), or (n, V) at the n positions of logits_at; with return_hidden
            also a list of L tensors (B, T, D).
        """
        real = torch.ones_like(tokens, dtype=torch.bool) if pad_mask is None else pad_mask.bool()
        base = cache.next_pos[:, None] if cache is not None else start_pos
        positions = (base + real.long().cumsum(1) - 1).clamp(min=0)  # (B, T); padding repeats
        if cache is not None:
            cache.append(positions, real, pad_mask is not None)
        cos, sin = rope_cos_sin(positions, self.args.head_dim, self.args.rope_theta)
        mask = self._mask(positions, real, pad_mask is not None, cache)
        h = self.embed_tokens(tokens)
        hidden = []
        for i, layer in enumerate(self.layers):
            hidden.append(h)
            deltas = adapter(i, h) if adapter is not None else None
            if self.checkpointing and torch.is_grad_enabled():
                h = checkpoint(layer, h, cos, sin, mask, cache, i, deltas, use_reentrant=False)
            else:
                h = layer(h, cos, sin, mask, cache, i, deltas)
        h = self.norm(h)
        logits = self.lm_head(h if logits_at is None else h[logits_at])
        return (logits, hidden) if return_hidden else logits

    def _mask(self, positions, real, padded, cache):
        """The boolean attention mask of this forward's queries, or None when plain causal
        attention is exact (reads the cache, which `KVCache.append` has already advanced)."""
        T, window = positions.shape[1], self.args.sliding_window
        if cache is None:
            if not padded and (window is None or T <= window):
                return None
            return attention_mask(positions, positions, real, torch.arange(T, device=positions.device), window)
        if (not cache.padded and not cache.static and (window is None or cache.length <= window)
                and (T == 1 or cache.start == 0)):
            return None
        qslot = torch.arange(cache.start, cache.length, device=positions.device)
        return attention_mask(positions, cache.pos[:, :cache.span], cache.valid[:, :cache.span], qslot, window)

    @classmethod
    def from_pretrained(cls, path, device=None, dtype=None) -> "Transformer":
        """Loads a checkpoint directory with no conversion step.

        Args:
            path: a Hugging Face directory (config.json with model.safetensors, or shards with
                model.safetensors.index.json) or a Mistral one (params.json, consolidated.safetensors).
            device: where the weights go (default CPU); they are read there directly.
            dtype: default: the checkpoint's dtype on CUDA, float32 on CPU.
        Returns:
            the model in eval mode with frozen parameters.
        """
        path = Path(path)
        args, layout, files = read_checkpoint(path)
        device = torch.device(device or "cpu")
        dtype = dtype or (DTYPES[args.dtype] if device.type == "cuda" else torch.float32)
        with torch.device("meta"):  # no memory: the checkpoint's tensors are assigned in place
            model = cls(args)
        expected = {k: v.shape for k, v in model.state_dict().items()}
        if args.tie_embeddings:
            del expected["lm_head.weight"]
        state = load_weights(files, layout, args, expected, device, dtype)
        if args.tie_embeddings:
            state["lm_head.weight"] = state["embed_tokens.weight"]
        model.load_state_dict(state, strict=True, assign=True)
        if args.tie_embeddings:  # assign replaced both parameters: tie them again
            model.lm_head.weight = model.embed_tokens.weight
        return model.eval().requires_grad_(False)

    def save_pretrained(self, out_dir, max_shard_bytes: int = 5 * 10**9) -> None:
        """Writes the Hugging Face layout: config.json and model.safetensors, or shards of at
        most max_shard_bytes with model.safetensors.index.json. Each file is written atomically."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        tensors = {hf_name(k): v.detach().contiguous() for k, v in self.state_dict().items()
                   if not (self.args.tie_embeddings and k == "lm_head.weight")}
        shards, size = [{}], 0
        for name, t in tensors.items():
            nbytes = t.numel() * t.element_size()
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append({})
                size = 0
            shards[-1][name], size = t, size + nbytes
        if len(shards) == 1:
            atomic_write(out / "model.safetensors", lambda p: save_file(tensors, p, {"format": "pt"}))
        else:
            weight_map = {}
            for i, shard in enumerate(shards):
                name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                atomic_write(out / name, lambda p: save_file(shard, p, {"format": "pt"}))
                weight_map.update(dict.fromkeys(shard, name))
            index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
                     "weight_map": weight_map}
            atomic_write(out / "model.safetensors.index.json", lambda p: p.write_text(json.dumps(index, indent=2)))
        dtype = next(k for k, v in DTYPES.items() if v == self.lm_head.weight.dtype)
        config = {**self.args.to_hf_config(), "torch_dtype": dtype}
        atomic_write(out / "config.json", lambda p: p.write_text(json.dumps(config, indent=2)))
        written = {"model.safetensors"} if len(shards) == 1 else {*weight_map.values(), "model.safetensors.index.json"}
        for old in [*out.glob("model-*-of-*.safetensors"), *out.glob("model.safetensors*")]:
            if old.name not in written:  # left by an earlier save in another layout
                old.unlink()


# -----------------------------------------------------------------------------
# Loading and saving


IGNORED = ("rotary_emb.inv_freq", "rope.freqs")  # RoPE tables some checkpoints store
NATIVE_NAMES = [  # Mistral / Meta consolidated names -> ours (Hugging Face's, less 'model.')
    (r"^tok_embeddings\.", "embed_tokens."), (r"^output\.", "lm_head."),
    (r"\.attention_norm\.", ".input_layernorm."), (r"\.ffn_norm\.", ".post_attention_layernorm."),
    (r"\.attention\.w([qkvo])\.", r".self_attn.\1_proj."), (r"\.feed_forward\.w1\.", ".mlp.gate_proj."),
    (r"\.feed_forward\.w2\.", ".mlp.down_proj."), (r"\.feed_forward\.w3\.", ".mlp.up_proj."),
]


def hf_name(name: str) -> str:
    return name if name.startswith("lm_head.") else "model." + name


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Calls write(temporary path), then renames it over `path`: readers never see half a file.
    The file gets the mode a new file usually gets (safetensors creates its files 0600)."""
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, path)


def read_safetensors(file: Path, device, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """All tensors of one .safetensors file, placed on `device` and, when given, cast to `dtype`
    one tensor at a time (the file's copy of each is released once converted). A tensor with a
    NaN or an infinity is an error, caught here once rather than as garbage output later."""
    tensors = {}
    try:
        with safe_open(str(file), framework="pt", device=str(device)) as f:
            for key in f.keys():
                t = f.get_tensor(key).to(dtype) if dtype else f.get_tensor(key)
                if t.is_floating_point() and not torch.isfinite(t).all():
                    raise ValueError(f"{file}: tensor '{key}' holds NaN or infinite values (as {t.dtype})")
                tensors[key] = t
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{file}: not a readable safetensors file "
                         f"(truncated or corrupt?): {err}") from None
    return tensors


def interleaved_to_half(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorders q/k rows stored for interleaved RoPE pairs (2i, 2i+1), as in Mistral's and
    Meta's consolidated files, into the rotate-half pairs (i, i + head_dim/2)."""
    out_dim, in_dim = w.shape
    return w.view(n_heads, out_dim // n_heads // 2, 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def read_checkpoint(path: Path) -> tuple[ModelArgs, str, list[Path]]:
    """Finds the config, the layout ("hf" or "consolidated") and the weight files of a checkpoint."""
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint directory {path} does not exist")
    present = sorted(p.name for p in path.iterdir())
    if (path / "config.json").is_file():
        args = ModelArgs.from_hf_config(read_json(path / "config.json"), str(path / "config.json"))
        index = path / "model.safetensors.index.json"
        if index.is_file():
            weight_map = config_field(read_json(index), "weight_map", str(index), dict)
            files = sorted(set(weight_map.values()))
            if not files or not all(isinstance(name, str) for name in files):
                raise ValueError(f"{index}: field 'weight_map' should map tensor names to shard "
                                 f"file names, got {len(weight_map)} entries")
            for name in files:
                if not (path / name).is_file():
                    raise FileNotFoundError(f"{index} names shard {name}, which is missing from {path}")
            return args, "hf", [path / name for name in files]
        if (path / "model.safetensors").is_file():
            return args, "hf", [path / "model.safetensors"]
    elif (path / "params.json").is_file():
        args = ModelArgs.from_params(read_json(path / "params.json"), str(path / "params.json"))
        if (path / "consolidated.safetensors").is_file():
            return args, "consolidated", [path / "consolidated.safetensors"]
    else:
        raise FileNotFoundError(f"{path}: no config.json (Hugging Face) or params.json "
                                f"(Mistral consolidated) found; the directory holds {present}")
    raise FileNotFoundError(
        f"{path}: no weights found: expected model.safetensors, a sharded checkpoint with "
        f"model.safetensors.index.json, or consolidated.safetensors (pickled .bin/.pth files "
        f"are not loaded: they can run code); the directory holds {present}")


def load_weights(files, layout: str, args: ModelArgs, expected: dict[str, torch.Size],
                 device, dtype) -> dict[str, torch.Tensor]:
    """Reads weight files into our parameter names, checking names and shapes strictly."""
    state = {}
    for file in files:
        for name, tensor in read_safetensors(file, device, dtype).items():
            if name.endswith(IGNORED):
                continue
            ours = name.removeprefix("model.")
            if layout == "consolidated":
                for pattern, repl in NATIVE_NAMES:
                    ours = re.sub(pattern, repl, ours)
                if ours.endswith(("q_proj.weight", "k_proj.weight")):
                    heads = args.n_heads if "q_proj" in ours else args.n_kv_heads
                    tensor = interleaved_to_half(tensor, heads)
            if ours in expected and tensor.shape != expected[ours]:
                raise ValueError(f"{file}: tensor '{name}' has shape {tuple(tensor.shape)}, "
                                 f"expected {tuple(expected[ours])}")
            state[ours] = tensor
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{files[0].parent}: checkpoint does not match the config: "
            f"{len(missing)} missing tensors {[hf_name(k) for k in missing[:10]]}, "
            f"{len(unexpected)} unexpected tensors {[hf_name(k) for k in unexpected[:10]]}")
    return state


# -----------------------------------------------------------------------------
# Tokenizer and chat templates


class Tokenizer:
    """A sentencepiece model (Llama-2 and Mistral: unk 0, bos 1, eos 2, no pad) and the chat
    template of its checkpoint: 'mistral' (Mistral-Instruct v0.1/v0.2) or 'llama2'."""

    TEMPLATES = ("mistral", "llama2")

    def __init__(self, path, template: str | None = None):
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer model {path} does not exist")
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(str(path))
        except (OSError, RuntimeError) as err:
            raise ValueError(f"{path} is not a sentencepiece model: {err}") from None
        self.path = path
        self.vocab_size = self.sp.vocab_size()
        self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()
        if template is not None and template not in self.TEMPLATES:
            raise ValueError(f"chat template '{template}' is not one of {self.TEMPLATES}")
        self.template = template or detect_template(path.parent)

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        return [self.bos_id] * bos + self.sp.encode(text) + [self.eos_id] * eos

    def decode(self, ids: list[int]) -> str:
        try:
            return self.sp.decode(list(ids))
        except IndexError:  # checked only on failure: decoding runs at every generated token
            bad = next((i for i in ids if not 0 <= i < self.vocab_size), None)
            raise ValueError(f"token id {bad} is outside the vocabulary of {self.path} "
                             f"(0 to {self.vocab_size - 1})") from None

    def encode_chat(self, messages: list[dict]) -> list[int]:
        """Token ids of a conversation in the checkpoint's chat template.

        Args:
            messages: [{"role": "system" | "user" | "assistant", "content": str}, ...]: an
                optional system message, then user and assistant turns alternating, starting
                with the user. Ending on a user turn gives the prompt for the model's answer.
        """
        if self.template is None:
            raise ValueError(f"no chat template is known for {self.path.parent} (no config.json, "
                             f"params.json or tokenizer_config.json); pass template='mistral' or 'llama2'")
        if not isinstance(messages, list):
            raise ValueError(f"a chat is a list of messages, got {type(messages).__name__}")
        for i, m in enumerate(messages):
            if not isinstance(m, dict):
                raise ValueError(f"chat message {i} is a {type(m).__name__}, expected a dict with "
                                 "'role' and 'content'")
            for key in ("role", "content"):
                if not isinstance(m.get(key), str):
                    found = f"is {m[key]!r:.40}" if key in m else "is missing"
                    raise ValueError(f"chat message {i}: '{key}' {found}, expected a string")
        system = messages[0]["content"] if messages and messages[0]["role"] == "system" else None
        turns = [m["content"] for m in messages[system is not None:]]
        for i, m in enumerate(messages[system is not None:]):
            expected = ("user", "assistant")[i % 2]
            if m["role"] != expected:
                raise ValueError(f"chat message {i + (system is not None)} has role '{m['role']}', "
                                 f"expected '{expected}': after an optional system message, "
                                 "roles must alternate user, assistant, user, ...")
        if not turns:
            raise ValueError("a chat needs at least one user message")
        if self.template == "mistral":
            if system is not None:
                turns[0] = f"{system}\n\n{turns[0]}"
            ids = [self.bos_id]
            for i, content in enumerate(turns):
                ids += (self.encode(f"[INST] {content} [/INST]", bos=False) if i % 2 == 0
                        else self.encode(content, bos=False, eos=True))
            return ids
        if system is not None:
            turns[0] = f"<<SYS>>\n{system}\n<</SYS>>\n\n{turns[0]}"
        ids = []
        for i in range(0, len(turns), 2):
            if i + 1 < len(turns):
                ids += self.encode(f"[INST] {turns[i]} [/INST] {turns[i + 1]} ", eos=True)
            else:
                ids += self.encode(f"[INST] {turns[i]} [/INST]")
        return ids


def detect_template(directory: Path) -> str | None:
    """The chat template of a checkpoint directory, from tokenizer_config.json or its config."""
    tokenizer_config = directory / "tokenizer_config.json"
    if tokenizer_config.is_file():
        template = read_json(tokenizer_config).get("chat_template") or ""
        if "<<SYS>>" in template:
            return "llama2"
        if "[INST]" in template:
            return "mistral"
    if (directory / "config.json").is_file():
        model_type = read_json(directory / "config.json").get("model_type")
        return {"llama": "llama2", "mistral": "mistral"}.get(model_type)
    return "mistral" if (directory / "params.json").is_file() else None


def user_turn(prompt: str, context: str | None = None) -> str:
    """The user message of a query: the context (when it is in the prompt), then the prompt."""
    return f"{context}\n\n{prompt}" if context else prompt


def query_prompt(tokenizer: Tokenizer, query: str, context: str | None = None) -> list[int]:
    """Token ids of a query as one user turn (the context first, when it is in the prompt),
    ready for the model's answer."""
    return tokenizer.encode_chat([{"role": "user", "content": user_turn(query, context)}])


def context_ids(tokenizer: Tokenizer, context: str) -> list[int]:
    """Token ids of a context as the generator reads it: one user turn of the chat template
    (the instruction-tuning format of paper §4 and of the released code)."""
    return query_prompt(tokenizer, context)


def chat_example(tokenizer: Tokenizer, prompt: str, answer: str,
                 follow_ups: list[tuple[str, str]] = ()) -> tuple[list[int], list[int]]:
    """Token ids of a user turn + assistant answer (then any follow-up (question, answer) turns),
    and the targets: each answer's tokens (and EOS) where they are predicted, -100 elsewhere,
    so that the loss is on the answers only."""
    messages, ids, targets = [], [], []
    for question, reply in [(prompt, answer), *follow_ups]:
        messages.append({"role": "user", "content": question})
        asked = tokenizer.encode_chat(messages)
        messages.append({"role": "assistant", "content": reply})
        full = tokenizer.encode_chat(messages)
        if asked[:len(ids)] != ids or full[:len(asked)] != asked:
            raise ValueError(f"the chat template tokenises the prompt differently once the answer "
                             f"follows; cannot mask the prompt of {question[:40]!r}")
        targets += [-100] * (len(asked) - len(ids) - 1) + full[len(asked):] + [-100]
        ids = full
    return ids, targets


def load(path, device=None, dtype=None) -> tuple[Transformer, Tokenizer]:
    """The model and the tokenizer.model of a checkpoint directory, checked against each other."""
    model = Transformer.from_pretrained(path, device, dtype)
    tokenizer = Tokenizer(Path(path) / "tokenizer.model")
    if tokenizer.vocab_size > model.args.vocab_size:
        raise ValueError(f"{tokenizer.path} has {tokenizer.vocab_size} pieces, more than the "
                         f"model's vocabulary (vocab_size {model.args.vocab_size})")
    return model, tokenizer


# -----------------------------------------------------------------------------
# Generation


def sample(logits: torch.Tensor, temperature: float, top_p: float, rng) -> torch.Tensor:
    """Next tokens (B,) from logits (B, V): greedy at temperature 0, else nucleus sampling."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs > top_p  # keep the smallest head >= top_p
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs.masked_fill(outside, 0.0))
    return torch.multinomial(probs, 1, generator=rng).squeeze(-1)


def check_token_ids(ids: list[int], vocab_size: int, what: str) -> None:
    """Raises ValueError naming `what` unless ids is a non-empty list of ints in [0, vocab_size)."""
    if not isinstance(ids, list):
        raise ValueError(f"{what} is a {type(ids).__name__}, expected a list of token ids")
    if not ids:
        raise ValueError(f"{what} is empty: expected at least one token id")
    bad = next((t for t in ids if not (isinstance(t, int) and 0 <= t < vocab_size)), None)
    if bad is not None:
        raise ValueError(f"{what} holds token id {bad!r}, outside the model's vocabulary (0 to {vocab_size - 1})")


@torch.no_grad()
def generate(model: Transformer, prompts: list[list[int]], max_new_tokens: int, *,
             temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
             stop: tuple[str, ...] = (), tokenizer: Tokenizer | None = None,
             adapter: Adapter | None = None, truncate: bool = False) -> list[list[int]]:
    """Generates from a batch of prompts of different lengths (left-padded, KV-cached).

    Args:
        prompts: token ids per row.
        max_new_tokens: at most this many tokens per row.
        temperature, top_p, seed: sampling (temperature 0: greedy).
        stop: a row ends once its decoded text contains one of these (needs `tokenizer`);
            the caller cuts the text at the stop string.
        adapter: passed to every forward (see Transformer.forward).
        truncate: keep the last tokens of prompts that do not fit the model's window,
            instead of raising an error.
    Returns:
        the new token ids of each row, without the EOS.
    """
    if stop and tokenizer is None:
        raise ValueError("stop strings need a tokenizer to decode the generated text")
    if not 0 <= max_new_tokens < model.args.max_seq_len:
        raise ValueError(f"max_new_tokens = {max_new_tokens}: expected 0 to {model.args.max_seq_len - 1} "
                         f"(the model's window, max_position_embeddings, is {model.args.max_seq_len})")
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"temperature = {temperature}, top_p = {top_p}: expected temperature >= 0 "
                         "and 0 < top_p <= 1")
    if not isinstance(prompts, list) or not prompts:
        raise ValueError("generate: prompts should be a non-empty list of token-id lists")
    limit = model.args.max_seq_len - max_new_tokens
    for i, p in enumerate(prompts):
        check_token_ids(p, model.args.vocab_size, f"prompt {i}")
        if len(p) > limit and not truncate:
            raise ValueError(f"prompt {i} has {len(p)} tokens; the model's window "
                             f"(max_position_embeddings {model.args.max_seq_len}) leaves room for "
                             f"{limit} with max_new_tokens={max_new_tokens}; pass truncate=True "
                             "to keep the last tokens")
    prompts = [p[-limit:] for p in prompts]
    device, T = model.lm_head.weight.device, max(len(p) for p in prompts)
    tokens = torch.tensor([[0] * (T - len(p)) + p for p in prompts], device=device)  # (B, T), left padding
    pad_mask = torch.arange(T, device=device) >= torch.tensor([T - len(p) for p in prompts], device=device)[:, None]
    uneven = any(len(p) != T for p in prompts)
    cache = KVCache(model.args, len(prompts), T + max_new_tokens, device, model.lm_head.weight.dtype)
    rng = torch.Generator(device).manual_seed(seed)
    logits = model(tokens, pad_mask=pad_mask if uneven else None, cache=cache, adapter=adapter)
    out, done = [[] for _ in prompts], [False] * len(prompts)
    for step in range(max_new_tokens):
        next_tokens = sample(logits[:, -1], temperature, top_p, rng)  # (B,)
        for row, token in enumerate(next_tokens.tolist()):  # one host sync per step
            if done[row]:
                continue
            if token == model.args.eos_id:
                done[row] = True
                continue
            out[row].append(token)
            done[row] = any(s in tokenizer.decode(out[row]) for s in stop)
        if all(done) or step == max_new_tokens - 1:
            break
        logits = model(next_tokens[:, None], cache=cache, adapter=adapter)
    return out


def answer_text(tokenizer: Tokenizer, ids: list[int]) -> str:
    """A generated answer as the evaluations read it: decoded, cut at the first newline, stripped."""
    return tokenizer.decode(ids).split("\n")[0].strip()


# -----------------------------------------------------------------------------
# Costs: analytic FLOPs and memory of the base


def matmul_params(args: ModelArgs) -> int:
    """Weights a token multiplies through: every linear layer and the output head."""
    per_layer = sum(d_in * d_out for d_in, d_out in module_widths(args).values())
    return args.n_layers * per_layer + args.vocab_size * args.dim


def forward_flops(args: ModelArgs, new: int, past: int = 0) -> int:
    """FLOPs of running `new` tokens after `past` cached ones:
    2 * matmul_params per token, plus attention: q.k and att.v, 2 * 2 * n_heads * head_dim
    multiply-adds against each visible key (token t sees past + t + 1 keys)."""
    keys = new * past + new * (new + 1) // 2
    return 2 * matmul_params(args) * new + 4 * args.n_layers * args.n_heads * args.head_dim * keys


def generation_flops(args: ModelArgs, prompt: int, generated: int) -> int:
    """Prefill of the prompt, then one token at a time against the cache."""
    return forward_flops(args, prompt) + sum(forward_flops(args, 1, prompt + t) for t in range(generated))


def kv_cache_floats(args: ModelArgs, tokens: int) -> int:
    """What prompting keeps per user: keys and values of every context token at every layer."""
    return 2 * args.n_layers * args.n_kv_heads * args.head_dim * tokens
