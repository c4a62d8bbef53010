"""model.py: parity with an independent reference, caching, loading, tokenizer, errors."""

import json
import os
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from conftest import random_model, tiny_args
from model import (KVCache, ModelArgs, Tokenizer, Transformer, apply_rope, chat_example, forward_flops, generate,
                   generation_flops, kv_cache_floats, load, matmul_params, rope_cos_sin)

TINY_TOKENIZER = Path(__file__).resolve().parents[1] / "data" / "tiny" / "tokenizer.model"

# -----------------------------------------------------------------------------
# An independent reference: Meta's formulation on the consolidated (native) weights


def to_native(model: Transformer) -> dict[str, torch.Tensor]:
    """Our weights under Mistral's consolidated names, q/k rows back in interleaved order."""
    args, native = model.args, {}
    names = {"self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk",
             "self_attn.v_proj": "attention.wv", "self_attn.o_proj": "attention.wo",
             "mlp.gate_proj": "feed_forward.w1", "mlp.down_proj": "feed_forward.w2",
             "mlp.up_proj": "feed_forward.w3", "input_layernorm": "attention_norm",
             "post_attention_layernorm": "ffn_norm", "embed_tokens": "tok_embeddings",
             "lm_head": "output"}
    for key, w in model.state_dict().items():
        new = key
        for ours, theirs in names.items():
            new = new.replace(ours, theirs)
        if "wq" in new or "wk" in new:
            heads = args.n_heads if "wq" in new else args.n_kv_heads
            out_dim, in_dim = w.shape  # half -> interleaved: the inverse of the loader's permutation
            w = w.view(heads, 2, out_dim // heads // 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)
        native[new] = w.clone()
    return native


def reference_logits(native, args: ModelArgs, tokens, start=0):
    """Logits by Meta's recipe: complex-number RoPE on interleaved pairs, kv heads repeated,
    an explicit (banded when there is a sliding window) causal mask, plain softmax."""
    B, T = tokens.shape
    H, KV, hd = args.n_heads, args.n_kv_heads, args.head_dim
    freqs = 1.0 / args.rope_theta ** (torch.arange(0, hd, 2).float() / hd)
    rot = torch.polar(torch.ones(T, hd // 2), torch.outer(torch.arange(start, start + T).float(), freqs))

    def rms(x, w):
        return w * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + args.norm_eps)

    def rope(x):  # (B, T, heads, hd)
        xc = torch.view_as_complex(x.reshape(*x.shape[:-1], hd // 2, 2))
        return torch.view_as_real(xc * rot[None, :, None]).flatten(-2)

    i = torch.arange(T)
    allowed = i[None, :] <= i[:, None]
    if args.sliding_window is not None:
        allowed &= i[:, None] - i[None, :] < args.sliding_window
    h = native["tok_embeddings.weight"][tokens]
    for layer in range(args.n_layers):
        w = {k.split(f"layers.{layer}.", 1)[1]: v for k, v in native.items() if k.startswith(f"layers.{layer}.")}
        x = rms(h, w["attention_norm.weight"])
        q = rope((x @ w["attention.wq.weight"].T).view(B, T, H, hd))
        k = rope((x @ w["attention.wk.weight"].T).view(B, T, KV, hd)).repeat_interleave(H // KV, 2)
        v = (x @ w["attention.wv.weight"].T).view(B, T, KV, hd).repeat_interleave(H // KV, 2)
        scores = torch.einsum("bthd,bshd->bhts", q, k) / math.sqrt(hd)
        att = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
        h = h + torch.einsum("bhts,bshd->bthd", att, v).reshape(B, T, H * hd) @ w["attention.wo.weight"].T
        x = rms(h, w["ffn_norm.weight"])
        h = h + (F.silu(x @ w["feed_forward.w1.weight"].T) * (x @ w["feed_forward.w3.weight"].T)) @ w["feed_forward.w2.weight"].T
    return rms(h, native["norm.weight"]) @ native["output.weight"].T


@pytest.mark.parametrize("window", [None, 5])
def test_matches_reference(window):
    args = tiny_args(sliding_window=window)
    model = random_model(args)
    tokens = torch.randint(0, args.vocab_size, (2, 17))
    ref = reference_logits(to_native(model), args, tokens, start=3)
    torch.testing.assert_close(model(tokens, start_pos=3), ref, atol=1e-5, rtol=1e-5)


def test_rope_rotates_by_position():
    pos = torch.tensor([[0, 7, 100]])
    cos, sin = rope_cos_sin(pos, 8, 10000.0)
    x = torch.randn(1, 1, 3, 8)
    freqs = 10000.0 ** -(torch.arange(0, 8, 2).float() / 8)
    expected = torch.view_as_complex(torch.stack(x.chunk(2, -1), -1).contiguous()) * torch.polar(
        torch.ones(3, 4), pos[0, :, None].float() * freqs)
    got = apply_rope(x, cos, sin)
    torch.testing.assert_close(torch.stack(got.chunk(2, -1), -1), torch.view_as_real(expected))


def test_grouped_query_equals_repeated_heads():
    gqa = random_model(tiny_args())
    mha = Transformer(tiny_args(n_kv_heads=4)).eval()
    state = gqa.state_dict()
    for key in list(state):
        if "k_proj" in key or "v_proj" in key:  # (KV*hd, dim) -> (H*hd, dim), each kv head twice
            state[key] = state[key].view(2, 16, -1).repeat_interleave(2, 0).reshape(64, -1)
    mha.load_state_dict(state)
    tokens = torch.randint(0, 320, (2, 12))
    torch.testing.assert_close(mha(tokens), gqa(tokens), atol=1e-5, rtol=1e-5)


def test_adapter_delta_equals_changed_weight():
    model = random_model(tiny_args())
    tokens = torch.randint(0, 320, (2, 9))
    delta_w = torch.randn(64, 64) * 0.1
    seen = []

    def adapter(layer, h):
        seen.append(h)
        return {"o_proj": lambda x: x @ delta_w.T} if layer == 1 else {}

    logits, hidden = model(tokens, adapter=adapter, return_hidden=True)
    changed = random_model(tiny_args())
    changed.layers[1].self_attn.o_proj.weight.add_(delta_w)
    torch.testing.assert_close(logits, changed(tokens), atol=1e-5, rtol=1e-5)
    assert len(hidden) == 2 and all(a is b for a, b in zip(hidden, seen))
    torch.testing.assert_close(hidden[0], model.embed_tokens(tokens))
    assert torch.equal(model(tokens), random_model(tiny_args())(tokens))  # weights untouched


def test_gradient_checkpointing_gives_the_same_gradients():
    """Transformer.checkpointing (each layer recomputed in backward) changes no gradient."""
    model = random_model(tiny_args()).requires_grad_(True)
    tokens = torch.randint(0, 320, (2, 12))
    grads = {}
    for checkpointing in (False, True):
        model.checkpointing = checkpointing
        loss = model(tokens).logsumexp(-1).mean()
        grads[checkpointing] = torch.autograd.grad(loss, list(model.parameters()))
    for plain, recomputed in zip(grads[False], grads[True]):
        torch.testing.assert_close(recomputed, plain, rtol=1e-6, atol=1e-7)


# -----------------------------------------------------------------------------
# KV cache and generation


@pytest.mark.parametrize("window", [None, 6])
def test_cached_decoding_matches_recomputation(window):
    model = random_model(tiny_args(sliding_window=window))
    seq = torch.randint(0, 320, (2, 7))
    cache = KVCache(model.args, 2, 30, "cpu", torch.float32)
    logits = model(seq, cache=cache)[:, -1]
    for _ in range(14):  # well past the window boundary
        torch.testing.assert_close(logits, model(seq)[:, -1], atol=1e-5, rtol=1e-5)
        nxt = logits.argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], 1)
        logits = model(nxt, cache=cache)[:, -1]
    greedy = generate(model, seq[:, :7].tolist(), 14)
    assert greedy == seq[:, 7:].tolist()


@pytest.mark.parametrize("window", [None, 5])
def test_static_cache_equals_growing_cache(window):
    model = random_model(tiny_args(sliding_window=window))
    seq = torch.randint(0, 320, (2, 6))
    growing = KVCache(model.args, 2, 20, "cpu", torch.float32)
    static = KVCache(model.args, 2, 20, "cpu", torch.float32, static=True)
    torch.testing.assert_close(model(seq, cache=static), model(seq, cache=growing), atol=1e-5, rtol=1e-5)
    for _ in range(8):
        token = torch.randint(0, 320, (2, 1))
        torch.testing.assert_close(model(token, cache=static), model(token, cache=growing), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("window", [None, 4])
def test_batch_of_different_lengths_equals_each_alone(window):
    model = random_model(tiny_args(sliding_window=window))
    prompts = [[5, 6, 7], [9, 10, 11, 12, 13, 14, 15, 16], [20]]
    batch = generate(model, prompts, 8)
    assert batch == [generate(model, [p], 8)[0] for p in prompts]


def test_sampling_is_seeded():
    model = random_model(tiny_args())
    a = generate(model, [[1, 2, 3]] * 2, 10, temperature=1.0, top_p=0.9, seed=4)
    b = generate(model, [[1, 2, 3]] * 2, 10, temperature=1.0, top_p=0.9, seed=4)
    c = generate(model, [[1, 2, 3]] * 2, 10, temperature=1.0, top_p=0.9, seed=5)
    assert a == b and a != c


def test_generation_stops_on_eos_and_stop_strings(spm_path):
    model = random_model(tiny_args(eos_id=2))
    tok = Tokenizer(spm_path, template="mistral")
    free = generate(model, [[1, 5, 6]], 12)[0]
    eos_model = random_model(tiny_args(eos_id=free[3]))
    assert generate(eos_model, [[1, 5, 6]], 12)[0] == free[:3]
    stop = tok.decode(free[:4])[-1]
    cut = generate(model, [[1, 5, 6]], 12, stop=(stop,), tokenizer=tok)[0]
    assert stop in tok.decode(cut) and len(cut) <= 4


def test_long_prompt_is_an_error_unless_truncated():
    model = random_model(tiny_args(max_seq_len=32))
    prompt = list(range(3, 33))
    with pytest.raises(ValueError, match=r"prompt 0 has 30 tokens.*leaves room for 24.*truncate=True"):
        generate(model, [prompt], 8)
    assert generate(model, [prompt], 8, truncate=True) == generate(model, [prompt[-24:]], 8)


# -----------------------------------------------------------------------------
# Loading and saving


def test_save_load_single_and_sharded(tmp_path):
    model = random_model(tiny_args())
    tokens = torch.randint(0, 320, (1, 10))
    model.save_pretrained(tmp_path / "single")
    model.save_pretrained(tmp_path / "sharded", max_shard_bytes=40_000)
    assert (tmp_path / "single" / "model.safetensors").is_file()
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "single" / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask  # not 0600
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    for folder in ("single", "sharded"):
        loaded = Transformer.from_pretrained(tmp_path / folder)
        assert torch.equal(loaded(tokens), model(tokens))


def test_tied_embeddings_round_trip(tmp_path):
    model = random_model(tiny_args(tie_embeddings=True))
    model.save_pretrained(tmp_path)
    loaded = Transformer.from_pretrained(tmp_path)
    assert loaded.lm_head.weight is loaded.embed_tokens.weight
    tokens = torch.randint(0, 320, (1, 6))
    assert torch.equal(loaded(tokens), model(tokens))


def test_consolidated_checkpoint_loads(tmp_path):
    model = random_model(tiny_args(sliding_window=8))
    a = model.args
    save_file({**to_native(model), "rope.freqs": torch.ones(8)}, tmp_path / "consolidated.safetensors")
    (tmp_path / "params.json").write_text(json.dumps({
        "dim": a.dim, "n_layers": a.n_layers, "n_heads": a.n_heads, "n_kv_heads": a.n_kv_heads,
        "head_dim": a.head_dim, "hidden_dim": a.hidden_dim, "norm_eps": a.norm_eps,
        "vocab_size": a.vocab_size, "rope_theta": a.rope_theta, "sliding_window": 8,
        "max_seq_len": a.max_seq_len}))
    loaded = Transformer.from_pretrained(tmp_path)
    tokens = torch.randint(0, 320, (2, 12))
    torch.testing.assert_close(loaded(tokens), model(tokens), atol=1e-6, rtol=1e-6)


def test_params_json_ffn_rule():
    args = ModelArgs.from_params({"dim": 4096, "n_layers": 32, "n_heads": 32, "multiple_of": 256,
                                  "norm_eps": 1e-5, "vocab_size": 32000})
    assert args.hidden_dim == 11008 and args.n_kv_heads == 32  # Llama-2-7B


def test_both_config_spellings_load(tmp_path):
    model = random_model(tiny_args(rope_theta=500000.0))
    model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["rope_theta"] == 500000.0 and cfg["torch_dtype"] == "float32"  # 4.x spelling
    cfg["rope_parameters"] = {"rope_theta": cfg.pop("rope_theta"), "rope_type": "default"}
    cfg["dtype"] = cfg.pop("torch_dtype")
    cfg["model.layers.0.self_attn.rotary_emb.inv_freq"] = None
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    loaded = Transformer.from_pretrained(tmp_path)
    assert loaded.args.rope_theta == 500000.0
    tokens = torch.randint(0, 320, (1, 8))
    assert torch.equal(loaded(tokens), model(tokens))


def test_loads_onto_meta_then_assigns(tmp_path):
    random_model(tiny_args()).save_pretrained(tmp_path)
    loaded = Transformer.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert all(p.device.type == "cpu" and p.dtype == torch.bfloat16 for p in loaded.parameters())
    assert not any(p.requires_grad for p in loaded.parameters())


def test_ignores_stored_rope_tables(tmp_path):
    model = random_model(tiny_args())
    state = {("model." + k if not k.startswith("lm_head") else k): v for k, v in model.state_dict().items()}
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    save_file(state, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(model.args.to_hf_config()))
    Transformer.from_pretrained(tmp_path)


# -----------------------------------------------------------------------------
# Tokenizer


def test_tokenizer_round_trip_and_ids(spm_path):
    tok = Tokenizer(spm_path, template="mistral")
    assert (tok.sp.unk_id(), tok.bos_id, tok.eos_id) == (0, 1, 2)
    for text in ["Grüße aus Köln — 東京 🙂 and  two  spaces", "Maro Velin, born 1962 in Tesk."]:
        ids = tok.encode(text, bos=True, eos=True)
        assert ids[0] == 1 and ids[-1] == 2
        assert tok.decode(ids) == text


CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Where was Maro born?"},
        {"role": "assistant", "content": "Tesk"}, {"role": "user", "content": "And his job?"}]


def test_mistral_chat_template(spm_path):
    tok = Tokenizer(spm_path, template="mistral")
    enc = tok.sp.encode
    ids = tok.encode_chat(CHAT)
    assert ids == ([1] + enc("[INST] Be brief.\n\nWhere was Maro born? [/INST]") + enc("Tesk") + [2]
                   + enc("[INST] And his job? [/INST]"))


def test_llama2_chat_template(spm_path):
    tok = Tokenizer(spm_path, template="llama2")
    enc = tok.sp.encode
    ids = tok.encode_chat(CHAT)
    assert ids == ([1] + enc("[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nWhere was Maro born? [/INST] Tesk ")
                   + [2] + [1] + enc("[INST] And his job? [/INST]"))


def test_template_follows_checkpoint(tmp_path, spm_path):
    shutil.copy(spm_path, tmp_path / "tokenizer.model")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert Tokenizer(tmp_path / "tokenizer.model").template == "llama2"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ '[INST] ' }}"}))
    assert Tokenizer(tmp_path / "tokenizer.model").template == "mistral"
    assert Tokenizer(tmp_path / "tokenizer.model", template="llama2").template == "llama2"


def test_chat_roles_must_alternate(spm_path):
    tok = Tokenizer(spm_path, template="mistral")
    with pytest.raises(ValueError, match="chat message 1 has role 'user', expected 'assistant'"):
        tok.encode_chat([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    with pytest.raises(ValueError, match="no chat template is known"):
        Tokenizer(spm_path).encode_chat([{"role": "user", "content": "a"}])


def test_chat_example_with_follow_up_questions():
    # the base stage asks several questions about one context: each answer is supervised,
    # every user turn is not, and the ids are the conversation in the chat template
    tok = Tokenizer(TINY_TOKENIZER, template="mistral")
    turns = [("Maro Velin was born in Tesk.\n\nWhere was Maro Velin born?", "Tesk"),
             ("When was Maro Velin born?", "1961"), ("What does Maro Velin do?", "baker")]
    ids, targets = chat_example(tok, *turns[0], follow_ups=turns[1:])
    messages = [m for q, a in turns for m in ({"role": "user", "content": q}, {"role": "assistant", "content": a})]
    assert ids == tok.encode_chat(messages) and len(targets) == len(ids)
    supervised = [t for t in targets if t != -100]
    assert supervised == sum((tok.encode(a, bos=False, eos=True) for _, a in turns), [])
    assert all(t == -100 or ids[i + 1] == t for i, t in enumerate(targets))  # target t predicts token t + 1
    first = len(tok.encode_chat(messages[:2]))
    assert chat_example(tok, *turns[0]) == (ids[:first], targets[:first])


# -----------------------------------------------------------------------------
# Costs


def test_flop_formulas_by_hand():
    args = tiny_args()  # dim 64, 2 layers, 4 heads, 2 kv heads, head_dim 16, hidden 96, vocab 320
    # per layer: q 64*64 + k 64*32 + v 64*32 + o 64*64 = 12288; MLP 3*64*96 = 18432
    # 2 layers: 61440; output head 320*64 = 20480; in all 81920 weights per token
    assert matmul_params(args) == 81920
    # 3 new tokens after 2 cached: 2*81920*3 = 491520; they see 3 + 4 + 5 = 12 keys:
    # 4 * 2 layers * 4 heads * 16 * 12 = 6144
    assert forward_flops(args, 3, 2) == 497664
    assert generation_flops(args, 2, 1) == forward_flops(args, 2) + forward_flops(args, 1, 2)
    # KV cache: 2 (k, v) * 2 layers * 2 kv heads * 16 * 10 tokens
    assert kv_cache_floats(args, 10) == 1280


# -----------------------------------------------------------------------------
# Bad input


@pytest.fixture
def saved(tmp_path):
    random_model(tiny_args()).save_pretrained(tmp_path / "ckpt", max_shard_bytes=100_000)
    return tmp_path / "ckpt"


def test_error_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint directory .*nowhere does not exist"):
        Transformer.from_pretrained(tmp_path / "nowhere")


def test_error_no_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(tiny_args().to_hf_config()))
    (tmp_path / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(FileNotFoundError, match=r"no weights found.*holds \['config.json', 'pytorch_model.bin'\]"):
        Transformer.from_pretrained(tmp_path)
    (tmp_path / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="no config.json .* or params.json"):
        Transformer.from_pretrained(tmp_path)


def test_error_missing_shard(saved):
    (saved / "model-00002-of-00005.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="names shard model-00002-of-00005.safetensors, which is missing"):
        Transformer.from_pretrained(saved)


def test_error_corrupt_file(saved):
    shard = saved / "model-00003-of-00005.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(ValueError, match="model-00003-of-00005.safetensors: not a readable safetensors file"):
        Transformer.from_pretrained(saved)


def test_error_wrong_shape(saved):
    cfg = json.loads((saved / "config.json").read_text())
    cfg["intermediate_size"] = 100
    (saved / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"tensor 'model.layers.0.mlp.(gate|up|down)_proj.weight' has shape \(\d+, \d+\), expected"):
        Transformer.from_pretrained(saved)


def test_error_missing_and_unexpected_keys(tmp_path):
    model = random_model(tiny_args())
    state = {("model." + k if not k.startswith("lm_head") else k): v for k, v in model.state_dict().items()}
    del state["model.norm.weight"]
    state["model.extra.weight"] = torch.ones(2)
    save_file(state, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(model.args.to_hf_config()))
    with pytest.raises(ValueError, match=r"1 missing tensors \['model.norm.weight'\], 1 unexpected tensors \['model.extra.weight'\]"):
        Transformer.from_pretrained(tmp_path)


@pytest.mark.parametrize("change, message", [
    ({"model_type": "gpt2"}, "model_type 'gpt2' is not supported"),
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_scaling.rope_type 'linear' is not implemented"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4}}, "rope_parameters.rope_type 'yarn' is not implemented"),
    ({"hidden_size": None}, "missing field 'hidden_size'"),
    ({"hidden_size": "64"}, "field 'hidden_size' is \"64\", expected an integer >= 1"),
    ({"num_hidden_layers": 2.5}, "field 'num_hidden_layers' is 2.5, expected an integer >= 1"),
    ({"rms_norm_eps": -1e-5}, "field 'rms_norm_eps' is -1e-05, expected a positive number"),
    ({"tie_word_embeddings": "no"}, "field 'tie_word_embeddings' is \"no\", expected true or false"),
    ({"rope_scaling": "linear"}, "field 'rope_scaling' is \"linear\", expected an object"),
    ({"num_key_value_heads": 3}, "ModelArgs.n_heads = 4 is not a multiple of n_kv_heads = 3"),
])
def test_error_config_fields(saved, change, message):
    cfg = json.loads((saved / "config.json").read_text())
    cfg.update(change)
    cfg = {k: v for k, v in cfg.items() if v is not None}
    (saved / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=f"config.json: {message}"):
        Transformer.from_pretrained(saved)


def test_error_json_files(saved):
    index = saved / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}}))
    with pytest.raises(ValueError, match="model.safetensors.index.json: missing field 'weight_map'"):
        Transformer.from_pretrained(saved)
    (saved / "config.json").write_text("{'hidden_size': 64}")
    with pytest.raises(ValueError, match=r"config.json: not valid JSON \(Expecting property name"):
        Transformer.from_pretrained(saved)
    (saved / "config.json").write_text("[64]")
    with pytest.raises(ValueError, match="config.json: expected a JSON object, found list"):
        Transformer.from_pretrained(saved)


def test_error_non_finite_weight(tmp_path):
    random_model(tiny_args()).save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    tensors["model.layers.1.mlp.up_proj.weight"][3, 5] = float("inf")
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"model.safetensors: tensor 'model.layers.1.mlp.up_proj.weight' "
                                         r"holds NaN or infinite values \(as torch.float32\)"):
        Transformer.from_pretrained(tmp_path)


def test_generation_and_chat_input_errors(spm_path):
    model = random_model(tiny_args())  # vocabulary of 320
    for prompts, message in [([[1, 320]], r"prompt 0 holds token id 320, outside the model's vocabulary \(0 to 319\)"),
                             ([[1, 2], [-1]], "prompt 1 holds token id -1"), ([[1], []], "prompt 1 is empty"),
                             ([], "prompts should be a non-empty list"),
                             ([torch.tensor([1, 2])], "prompt 0 is a Tensor, expected a list of token ids")]:
        with pytest.raises(ValueError, match=message):
            generate(model, prompts, 4)
    with pytest.raises(ValueError, match="max_new_tokens = -1: expected 0 to 127"):
        generate(model, [[1]], -1)
    tok = Tokenizer(spm_path, template="mistral")
    for messages, message in [([{"role": "user"}], "chat message 0: 'content' is missing, expected a string"),
                              ([{"role": "user", "content": None}], "chat message 0: 'content' is None, expected a string"),
                              ([{"role": "user", "content": "a"}, "b"], "chat message 1 is a str, expected a dict")]:
        with pytest.raises(ValueError, match=message):
            tok.encode_chat(messages)
    with pytest.raises(ValueError, match=r"token id 320 is outside the vocabulary of .*tokenizer.model \(0 to 319\)"):
        tok.decode([5, 320])


def test_error_tokenizer_files(tmp_path, saved, spm_path):
    with pytest.raises(FileNotFoundError, match="tokenizer model .*tokenizer.model does not exist"):
        load(saved)
    (saved / "tokenizer.model").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="tokenizer.model is not a sentencepiece model"):
        load(saved)
    shutil.copy(spm_path, saved / "tokenizer.model")  # 320 pieces
    random_model(tiny_args(vocab_size=300)).save_pretrained(saved)
    with pytest.raises(ValueError, match=r"has 320 pieces, more than the model's vocabulary \(vocab_size 300\)"):
        load(saved)
