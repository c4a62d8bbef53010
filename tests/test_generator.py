"""generator.py: the six invariants of METHOD.md and the rest of the generator's contract."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import random_model, tiny_args
from generator import (AdapterGenerator, ContextState, GeneratorConfig, LoRA, export_peft, guard,
                       ingestion_flops, merged, randomized_svd, split_windows, svd_normalize)
from model import Tokenizer, forward_flops

W, w = 4, 8  # windows and window length of the equivalence tests


def tiny_config(**overrides) -> GeneratorConfig:
    base = dict(d_r=16, r=12, k=4, alpha=8.0, window=w, svd="exact")
    return GeneratorConfig(**{**base, **overrides})


def trained_like(generator: AdapterGenerator, seed: int = 1) -> AdapterGenerator:
    """A generator whose B is not zero, so that its adapters change the logits."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for g in generator.mods.values():
            g.B.normal_(0, 0.5)
            g.norm.uniform_(0.5, 1.5)
    return generator


def make(config=None, args=None):
    args = args or tiny_args()
    torch.manual_seed(0)
    return random_model(args), trained_like(AdapterGenerator(args, config or tiny_config()))


def strictly_earlier(n: int) -> torch.Tensor:
    return torch.ones(n, n).tril(-1).bool()


# -----------------------------------------------------------------------------
# Invariant 1: the parallel training forward computes what streaming computes


@pytest.mark.parametrize("modules", [["o_proj"], ["q_proj", "down_proj"]])
def test_parallel_forward_equals_streaming(modules):
    """Invariant 1 (streaming equals parallel): window t of the training forward gives the logits
    of the streaming loop after windows 0 .. t-1 (exact SVD)."""
    model, gen = make(tiny_config(target_modules=modules))
    tokens = torch.randint(3, 320, (1, W, w))
    parallel, fired = gen(model, tokens, torch.ones_like(tokens, dtype=torch.bool), strictly_earlier(W))
    assert fired.item() == 0
    state = gen.empty_state()
    for t in range(W):
        streamed = model(tokens[:, t], adapter=gen.on_the_fly(state))
        torch.testing.assert_close(parallel[:, t], streamed, atol=1e-5, rtol=1e-5)
        state = gen.update(model, state, tokens[0, t])
    assert not torch.allclose(parallel[:, W - 1], model(tokens[:, W - 1]), atol=1e-3)  # adapted


def test_logits_only_where_a_loss_is_taken():
    model, gen = make()
    tokens = torch.randint(3, 320, (2, W, w))
    mask = torch.ones_like(tokens, dtype=torch.bool)
    at = torch.rand(tokens.shape) < 0.3
    full, _ = gen(model, tokens, mask, strictly_earlier(W))
    some, _ = gen(model, tokens, mask, strictly_earlier(W), logits_at=at)
    torch.testing.assert_close(some, full[at])
    torch.testing.assert_close(model(tokens[0], logits_at=at[0]), model(tokens[0])[at[0]])


def test_visibility_matrix_picks_the_windows():
    model, gen = make()
    tokens = torch.randint(3, 320, (1, 3, w))
    mask = torch.ones_like(tokens, dtype=torch.bool)
    visible = torch.tensor([[0, 0, 0], [1, 0, 0], [1, 1, 0]]).bool()
    only_first = torch.tensor([[0, 0, 0], [1, 0, 0], [1, 0, 0]]).bool()
    a, _ = gen(model, tokens, mask, visible)
    b, _ = gen(model, tokens, mask, only_first)
    torch.testing.assert_close(a[:, :2], b[:, :2])
    state = gen.update(model, gen.empty_state(), tokens[0, 0])
    torch.testing.assert_close(b[:, 2], model(tokens[:, 2], adapter=gen.on_the_fly(state)), atol=1e-5, rtol=1e-5)


def test_padding_rows_do_not_count():
    model, gen = make()
    tokens = torch.randint(3, 320, (1, 2, w))
    mask = torch.ones_like(tokens, dtype=torch.bool)
    mask[0, 0, 6:] = False
    noisy = tokens.clone()
    noisy[0, 0, 6:] = 7  # padding content must not matter
    a, _ = gen(model, tokens, mask, strictly_earlier(2))
    b, _ = gen(model, noisy, mask, strictly_earlier(2))
    torch.testing.assert_close(a[:, 1], b[:, 1], atol=1e-5, rtol=1e-5)
    state = gen.update(model, gen.empty_state(), tokens[0, 0, :6])
    torch.testing.assert_close(a[:, 1], model(tokens[:, 1], adapter=gen.on_the_fly(state)), atol=1e-5, rtol=1e-5)


# -----------------------------------------------------------------------------
# Invariants 2 and 3: three ways to apply an adapter; a zero B changes nothing


@pytest.mark.parametrize("norm", ["svd", "frobenius"])
def test_three_forms_agree(norm):
    """Invariant 2 (three forms agree): on the fly, LoRA factors and merged weights give the same
    logits, and unmerging restores the weights exactly."""
    model, gen = make(tiny_config(norm=norm))
    state = gen.contextualize(model, torch.randint(3, 320, (3 * w,)).tolist())
    tokens = torch.randint(3, 320, (2, 10))
    on_the_fly = model(tokens, adapter=gen.on_the_fly(state))
    lora = model(tokens, adapter=gen.lora(state))
    before = model.state_dict()
    with merged(model, gen.lora(state)):
        merged_logits = model(tokens)
    torch.testing.assert_close(on_the_fly, lora, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(on_the_fly, merged_logits, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(on_the_fly, model(tokens), atol=1e-3)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # unmerged exactly


def test_zero_b_leaves_the_base_unchanged():
    """Invariant 3 (a zero B changes nothing): a fresh generator leaves the base's logits as they
    are, in training and in streaming."""
    model = random_model(tiny_args())
    gen = AdapterGenerator(model.args, tiny_config())  # fresh: B = 0
    tokens = torch.randint(3, 320, (1, W, w))
    adapted, _ = gen(model, tokens, torch.ones_like(tokens, dtype=torch.bool), strictly_earlier(W))
    assert torch.equal(adapted.view(W, w, -1), model(tokens.view(W, w)))
    state = gen.contextualize(model, tokens.flatten().tolist())
    assert torch.equal(model(tokens[0], adapter=gen.on_the_fly(state)), model(tokens[0]))


# -----------------------------------------------------------------------------
# Invariant 4: N(S)


def test_normalisation_is_orthonormal_with_unit_spectral_norm():
    """Invariant 4 (N(S) is normalised): orthonormal factors, spectral norm 1."""
    S = torch.randn(3, 2, 16, 12)
    for svd in ("exact", "randomized"):
        P, Q, _ = svd_normalize(S, tiny_config(svd=svd, svd_niter=2))
        eye = torch.eye(4).expand(3, 2, 4, 4)
        torch.testing.assert_close(P.mT @ P, eye, atol=1e-5, rtol=0)
        torch.testing.assert_close(Q.mT @ Q, eye, atol=1e-5, rtol=0)
        torch.testing.assert_close(torch.linalg.matrix_norm(P @ Q.mT, ord=2), torch.ones(3, 2))


def test_randomized_equals_exact_at_low_rank():
    """Invariant 4 (N(S) is normalised): the randomised and exact SVDs agree at rank <= k."""
    S = torch.randn(5, 16, 3) @ torch.randn(5, 3, 12) + 0.0  # rank 3 <= k = 4
    Pe, Qe, _ = svd_normalize(S, tiny_config(svd="exact"))
    Pr, Qr, _ = svd_normalize(S, tiny_config(svd="randomized"))
    torch.testing.assert_close(Pr @ Qr.mT, Pe @ Qe.mT, atol=1e-4, rtol=0)
    assert torch.linalg.matrix_rank(Pe @ Qe.mT).tolist() == [3] * 5  # the missing direction is left out


def test_randomized_svd_is_torch_svd_lowrank():
    S = torch.randn(16, 12)
    torch.manual_seed(3)
    U, sv, V = torch.svd_lowrank(S, q=4, niter=1)
    torch.manual_seed(3)
    U2, sv2, V2 = randomized_svd(S, 4, 1)
    torch.testing.assert_close(U2 @ V2.mT, U @ V.mT)
    torch.testing.assert_close(sv2, sv)


def test_no_context_gives_no_adapter():
    P, Q, _ = svd_normalize(torch.zeros(2, 16, 12), tiny_config())
    assert torch.equal(P, torch.zeros_like(P))


# -----------------------------------------------------------------------------
# Invariants 5 and 6: the state's size; persistence bit for bit


def test_state_size_does_not_grow_with_context():
    """Invariant 5 (the state does not grow): the same accumulator for 1 and 25 windows."""
    model, gen = make()
    short = gen.contextualize(model, list(range(3, 3 + w)))
    long = gen.contextualize(model, torch.randint(3, 320, (25 * w,)).tolist())
    assert long.tokens == 25 * w and short.tokens == w
    assert {m: s.shape for m, s in short.S.items()} == {m: s.shape for m, s in long.S.items()}


def test_save_and_reload_reproduce_the_adapter(tmp_path):
    """Invariant 6 (saving is exact): a reloaded generator and state give the same adapter, bit
    for bit."""
    model, gen = make(tiny_config(svd="randomized"))
    state = gen.contextualize(model, torch.randint(3, 320, (3 * w,)).tolist())
    gen.save(tmp_path / "gen")
    state.save(tmp_path / "state.safetensors")
    gen2 = AdapterGenerator.load(tmp_path / "gen", model.args)
    state2 = ContextState.load(tmp_path / "state.safetensors", gen2)
    a, b = gen.lora(state), gen2.lora(state2)
    assert state2.tokens == state.tokens
    assert all(torch.equal(a.A[m], b.A[m]) and torch.equal(a.B[m], b.B[m]) for m in a.A)


RESUME = """
import sys, torch
sys.path.insert(0, {root!r})
from model import Transformer
from generator import AdapterGenerator, ContextState
model = Transformer.from_pretrained({base!r})
gen = AdapterGenerator.load({gen!r}, model.args)
state = ContextState.load({state!r}, gen)
gen.contextualize(model, {rest!r}, state=state).save({out!r})
"""


def test_resumable_memory_equals_one_shot(tmp_path):
    """Invariant 6 (saving is exact), across processes: a memory saved after half a context and
    resumed in a new process equals the whole context streamed at once."""
    model, gen = make()
    ids = torch.randint(3, 320, (4 * w,)).tolist()
    model.save_pretrained(tmp_path / "base")
    gen.save(tmp_path / "gen")
    gen.contextualize(model, ids[:2 * w]).save(tmp_path / "half.safetensors")
    script = RESUME.format(root=str(Path(__file__).parents[1]), base=str(tmp_path / "base"),
                           gen=str(tmp_path / "gen"), state=str(tmp_path / "half.safetensors"),
                           rest=ids[2 * w:], out=str(tmp_path / "resumed.safetensors"))
    subprocess.run([sys.executable, "-c", script], check=True)
    resumed = ContextState.load(tmp_path / "resumed.safetensors", gen)
    one_shot = gen.contextualize(model, ids)
    assert resumed.tokens == one_shot.tokens
    assert all(torch.equal(resumed.S[m], one_shot.S[m]) for m in one_shot.S)


def test_windows_are_equal_length():
    assert [len(x) for x in split_windows(list(range(10)), 4)] == [4, 4, 2]
    assert [len(x) for x in split_windows(list(range(9)), 4)] == [3, 3, 3]
    assert [len(x) for x in split_windows(list(range(8)), 8)] == [8]
    assert split_windows([], 8) == []


# -----------------------------------------------------------------------------
# Multi-adapter batches, PEFT export


def test_multi_adapter_batch_equals_each_row_alone():
    model, gen = make()
    loras = [gen.lora(gen.contextualize(model, torch.randint(3, 320, (2 * w,)).tolist())) for _ in range(3)]
    tokens = torch.randint(3, 320, (3, 9))
    batched = model(tokens, adapter=LoRA.stack(loras))
    for i, lora in enumerate(loras):
        torch.testing.assert_close(batched[i], model(tokens[i:i + 1], adapter=lora)[0], atol=1e-5, rtol=1e-5)


def test_peft_export(tmp_path):
    model, gen = make(tiny_config(target_modules=["o_proj", "up_proj"]))
    lora = gen.lora(gen.contextualize(model, torch.randint(3, 320, (2 * w,)).tolist()))
    export_peft(lora, tmp_path, "tiny-base")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["target_modules"] == ["o_proj", "up_proj"]
    assert config["base_model_name_or_path"] == "tiny-base"
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert len(tensors) == 2 * 2 * model.args.n_layers
    assert tensors["base_model.model.model.layers.1.self_attn.o_proj.lora_A.weight"].shape == (4, 64)
    assert tensors["base_model.model.model.layers.1.self_attn.o_proj.lora_B.weight"].shape == (64, 4)
    assert tensors["base_model.model.model.layers.0.mlp.up_proj.lora_B.weight"].shape == (96, 4)
    # apply as peft does: W + (lora_alpha / r) B A
    peft_model = random_model(model.args)
    scaling = config["lora_alpha"] / config["r"]
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            key = f"base_model.model.model.{name.removesuffix('.weight')}"
            if f"{key}.lora_A.weight" in tensors:
                p += scaling * tensors[f"{key}.lora_B.weight"] @ tensors[f"{key}.lora_A.weight"]
    tokens = torch.randint(3, 320, (2, 7))
    with merged(model, lora):
        torch.testing.assert_close(peft_model(tokens), model(tokens), atol=1e-5, rtol=1e-5)


# -----------------------------------------------------------------------------
# Training: the SVD guard and frozen base


def with_singular_values(values, seed=0) -> torch.Tensor:
    """A 16 x 12 float64 matrix with the given singular values (and zeros after them)."""
    rng = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(16, 16, generator=rng, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(12, 12, generator=rng, dtype=torch.float64)).Q
    values = torch.tensor(values, dtype=torch.float64)
    return U[:, :len(values)] @ torch.diag(values) @ V[:, :len(values)].T


@pytest.mark.parametrize("svd", ["exact", "randomized"])
@pytest.mark.parametrize("values", [[3.0, 1.0], [2.0, 2.0, 1.0, 0.5]], ids=["rank-below-k", "kept-tie"])
def test_normalisation_gradient_is_the_derivative_of_N(svd, values):
    """NormalizedSVD's backward against finite differences (float64) where autograd through an
    SVD explodes: S of rank below k (a window of fewer than k tokens), and tied kept values."""
    S = with_singular_values(values).requires_grad_()
    config = tiny_config(svd=svd, svd_niter=2)
    N = lambda X: (lambda P, Q, _: P @ Q.mT)(*svd_normalize(X, config))
    assert torch.autograd.gradcheck(N, (S,), eps=1e-7, atol=1e-5, rtol=1e-4)
    U, _, Vh = torch.linalg.svd(S, full_matrices=False)
    through_svd = torch.autograd.grad((U[:, :4] @ Vh[:4]).sum(), S)[0]
    assert not (through_svd.abs() < 1e6).all()  # what autograd through the SVD gives: NaN or huge


def test_normalisation_gradient_equals_autograd_at_full_rank():
    S = torch.randn(3, 16, 12, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(3, 16, 12, dtype=torch.float64)
    P, Q, _ = svd_normalize(S, tiny_config(svd="exact"))
    ours = torch.autograd.grad((P @ Q.mT * weights).sum(), S)[0]
    U, _, Vh = torch.linalg.svd(S, full_matrices=False)
    torch.testing.assert_close(ours, torch.autograd.grad((U[..., :4] @ Vh[..., :4, :] * weights).sum(), S)[0])


@pytest.mark.parametrize("svd", ["exact", "randomized"])
def test_guard_fires_only_where_the_backward_is_singular(svd):
    """Fires on a kept value tied with a dropped one (s_4 = s_5 at k = 4: the top-4 subspace is
    not defined); not on ties among kept values, nor on rank below k."""
    boundary = with_singular_values([5.0, 4.0, 3.0, 2.0, 2.0, 1e-3])
    harmless = [with_singular_values([5.0, 5.0, 3.0, 2.0, 1.0]), with_singular_values([2.0, 1.0]),
                torch.randn(16, 12, dtype=torch.float64)]
    X = torch.stack([boundary, *harmless]).float().requires_grad_()
    S = X * 1.0
    P, Q, sv = svd_normalize(S, tiny_config(svd=svd, svd_niter=2))
    P, fired = guard(S, P, sv, 4)
    (P @ Q.mT * torch.randn(4, 16, 12)).sum().backward()
    dropped = [0] if svd == "exact" else []  # the randomised SVD does not compute s_5
    assert fired.item() == len(dropped)
    assert torch.isfinite(X.grad).all()
    for i in range(4):
        assert (P[i].abs().sum() == 0) == (i in dropped), i
        assert (X.grad[i].abs().sum() == 0) == (i in dropped), i


def test_guard_fires_on_a_non_finite_svd():
    sv = torch.tensor([[3.0, 2.0, 1.0, 0.5, 0.1], [float("nan")] * 5])
    P, fired = guard(torch.zeros(2, 16, 12), torch.ones(2, 16, 4), sv, 4)
    assert fired.item() == 1 and P[1].abs().sum() == 0 and P[0].abs().sum() > 0


def test_windows_shorter_than_k_train_as_they_stream():
    """Windows of 4 tokens at k = 10: S has rank 4, 8, then more. The parallel forward keeps
    every window's adapter, as streaming does, and gives the gradients of the streaming loop."""
    config = tiny_config(k=10, window=4)
    model, gen = make(config)
    tokens = torch.randint(3, 320, (1, W, 4))
    target = torch.randint(3, 320, (1, W, 4))
    parallel, fired = gen(model, tokens, torch.ones_like(tokens, dtype=torch.bool), strictly_earlier(W))
    assert fired.item() == 0
    loss = torch.nn.functional.cross_entropy(parallel.flatten(0, 2), target.flatten())
    grads = torch.autograd.grad(loss, list(gen.parameters()))
    state, streamed = gen.empty_state(), []  # the streaming loop (paper §3), with autograd on
    for t in range(W):
        adapter = gen.on_the_fly(state) if t else None
        logits, hidden = model(tokens[:, t], adapter=adapter, return_hidden=True)
        H = torch.stack(hidden)[:, 0]
        state = ContextState({m: state.S[m] + g.context_outer(H, None) for m, g in gen.mods.items()}, 4 * (t + 1))
        streamed.append(logits)
    streamed = torch.stack(streamed, 1)
    torch.testing.assert_close(parallel, streamed, atol=1e-5, rtol=1e-5)
    loss = torch.nn.functional.cross_entropy(streamed.flatten(0, 2), target.flatten())
    for name, a, b in zip([n for n, _ in gen.named_parameters()], grads, torch.autograd.grad(loss, list(gen.parameters()))):
        assert torch.isfinite(a).all() and a.abs().sum() > 0, name
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=name)


def test_gradients_reach_only_the_generator():
    model, gen = make(tiny_config(svd="randomized"))
    tokens = torch.randint(3, 320, (2, W, w))
    logits, _ = gen(model, tokens, torch.ones_like(tokens, dtype=torch.bool), strictly_earlier(W))
    torch.nn.functional.cross_entropy(logits[:, :, :-1].flatten(0, 2), tokens[:, :, 1:].flatten()).backward()
    assert all(p.grad is None for p in model.parameters())
    for name, p in gen.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_checkpointed_base_gives_the_generator_the_same_gradients():
    """Training with the base's layers recomputed in backward (as on CUDA) gives the generator
    the gradients of training without."""
    model, gen = make()
    tokens = torch.randint(3, 320, (2, W, w))
    grads = {}
    for checkpointing in (False, True):
        model.checkpointing = checkpointing
        logits, _ = gen(model, tokens, torch.ones_like(tokens, dtype=torch.bool), strictly_earlier(W))
        grads[checkpointing] = torch.autograd.grad(logits.logsumexp(-1).mean(), list(gen.parameters()))
    for plain, recomputed in zip(grads[False], grads[True]):
        torch.testing.assert_close(recomputed, plain, rtol=1e-6, atol=1e-7)


# -----------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize("change, message", [
    ({"k": 20}, r"GeneratorConfig.k = 20 is larger than min\(d_r, r\) = 12"),
    ({"target_modules": ["out_proj"]}, "GeneratorConfig.target_modules: unknown module 'out_proj'"),
    ({"norm": "spectral"}, "GeneratorConfig.norm = 'spectral': expected 'svd' or 'frobenius'"),
    ({"svd": "lanczos"}, "GeneratorConfig.svd = 'lanczos': expected 'exact' or 'randomized'"),
    ({"window": 0}, "GeneratorConfig.window: expected at least 1, got 0"),
    ({"alpha": -1.0}, "GeneratorConfig.alpha: expected a positive scale, got -1.0"),
    ({"d_r": "16"}, "GeneratorConfig.d_r: expected int, got '16'"),
    ({"target_modules": "o_proj"}, r"GeneratorConfig.target_modules: expected list\[str\], got 'o_proj'"),
])
def test_config_errors(change, message):
    with pytest.raises(ValueError, match=message):
        AdapterGenerator(tiny_args(), tiny_config(**change))


def test_window_longer_than_the_base_fails():
    with pytest.raises(ValueError, match=r"GeneratorConfig.window = 64 is longer than the base's window \(max_seq_len 32\)"):
        AdapterGenerator(tiny_args(max_seq_len=32), tiny_config(window=64))


def test_loading_against_another_base_fails(tmp_path):
    _, gen = make()
    gen.save(tmp_path)
    with pytest.raises(ValueError, match=r"holds a generator for the base .*'n_layers': 2.*but this base is .*'n_layers': 3"):
        AdapterGenerator.load(tmp_path, tiny_args(n_layers=3))
    with pytest.raises(FileNotFoundError, match="generator.json does not exist"):
        AdapterGenerator.load(tmp_path / "nowhere", tiny_args())


def test_state_for_another_generator_fails(tmp_path):
    model, gen = make()
    gen.contextualize(model, list(range(3, 20))).save(tmp_path / "s.safetensors")
    other = AdapterGenerator(model.args, tiny_config(d_r=8))
    with pytest.raises(ValueError, match="s.safetensors: state of modules .* does not fit this generator"):
        ContextState.load(tmp_path / "s.safetensors", other)


def test_empty_text_gives_the_empty_state(spm_path):
    # "" is no tokens, as [] is: a lone BOS would make a full-strength adapter
    model, gen = make()
    state = gen.contextualize(model, "", tokenizer=Tokenizer(spm_path))
    assert state.tokens == 0 and all(not s.any() for s in state.S.values())


def test_context_and_state_errors(tmp_path):
    model, gen = make()
    other = AdapterGenerator(model.args, tiny_config(d_r=8))
    with pytest.raises(ValueError, match=r"contextualize\(state=...\): state of modules \{'o_proj': \(2, 8, 12\)\} "
                                         r"does not fit this generator \(\{'o_proj': \(2, 16, 12\)\}\)"):
        gen.contextualize(model, [3, 4], state=other.empty_state())
    with pytest.raises(ValueError, match=r"the context holds token id 320, outside the model's vocabulary \(0 to 319\)"):
        gen.contextualize(model, [3, 320])
    save_file(gen.empty_state().S, tmp_path / "bare.safetensors")  # no metadata
    with pytest.raises(ValueError, match="bare.safetensors: metadata 'tokens' is missing"):
        ContextState.load(tmp_path / "bare.safetensors", gen)


@pytest.mark.parametrize("edit, message", [
    (lambda meta: "{oops", r"generator.json: not valid JSON \(Expecting property name"),
    (lambda meta: json.dumps({"config": meta["config"]}), "generator.json: missing field 'base'"),
    (lambda meta: json.dumps({**meta, "config": {**meta["config"], "rank": 4}}),
     r"generator.json: unknown config field\(s\) \['rank'\]; expected some of \['target_modules'"),
    (lambda meta: json.dumps({**meta, "config": {**meta["config"], "k": "4"}}),
     "generator.json: GeneratorConfig.k: expected int, got '4'"),
])
def test_generator_json_errors(tmp_path, edit, message):
    _, gen = make()
    gen.save(tmp_path)
    meta = json.loads((tmp_path / "generator.json").read_text())
    (tmp_path / "generator.json").write_text(edit(meta))
    with pytest.raises(ValueError, match=message):
        AdapterGenerator.load(tmp_path, gen.args)


def test_ingestion_flops_by_hand():
    args = tiny_args()  # the base's FLOPs are counted by hand in tests/test_model.py
    gen = AdapterGenerator(args, GeneratorConfig(d_r=16, r=12, k=4, window=8, svd_niter=1))
    # per token per layer: 2*64*(16+12) + 2*16*12 = 3968; per window per layer:
    # SVD 4*2*16*12*4 + 4*4*4*12 = 6912, LoRA factors 2*4*16*64 + 2*64*12*4 = 14336
    expected = forward_flops(args, 8) + 2 * 3968 * 8 + 2 * (6912 + 14336)
    assert ingestion_flops(args, gen, [8]) == expected
