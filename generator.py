"""GenerativeAdapter's adapter generator (Chen et al., ICLR 2025, arXiv 2411.05877).

Context streams through the frozen base LM once; at every layer l the generator turns the
residual stream H^l entering that layer into a low-rank adapter for the layer's target
modules (paper §3; METHOD.md states the whole computation, its shapes and its letters):

    K_t = A2(norm(H_t^l)),  V_t = A3(norm(H_t^l))        keys (w, d_r) and values (w, r) of window t
    S_t = S_{t-1} + K_t^T V_t                             the accumulator, d_r x r, float32
    N(S) = U_k V_k^T                                      SVD normalisation, singular values dropped
    delta(x) = s * B(A1(x) @ N(S)),  s = alpha / r        added to the module's output W x (Eq. 3)

This file holds, in order: the config, SVD normalisation, the generator's parameters and
equations, the accumulator state and streaming, the three ways of applying an adapter
(on the fly, LoRA factors, merged), the parallel training forward and the pretraining tasks'
layout, persistence, costs and export.
"""

import json
import math
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from model import (LINEAR_MODULES, ModelArgs, Tokenizer, Transformer, atomic_write, check_at_least,
                   check_token_ids, check_types, config_field, forward_flops, module_path, module_widths, read_json,
                   read_safetensors, setting)

NORM_EPS = 1e-6  # epsilon of the generator's RMSNorm over hidden states
# The released code's gradient guard drops a window's adapter when two top singular values are
# within 1e-7 (relative). In float32 an exactly repeated singular value comes out of the SVD with
# a relative gap of about 6e-7 (tests/test_generator.py), which that threshold misses; 1e-6 does not.
GUARD_GAP = 1e-6
TASKS = ("completion", "reconstruction")  # the self-supervised pretraining tasks
INFERENCE_SEED = 0  # randomised SVD outside training draws a fixed Gaussian: adapters are reproducible

# -----------------------------------------------------------------------------
# Config


@dataclass
class GeneratorConfig:
    """The generator's settings (paper §3), each also a flag of train.py under its own name."""
    target_modules: list[str] = setting(["o_proj"], "linear modules that receive an adapter (q_proj ... down_proj)")
    d_r: int = setting(1024, "generator width d_r (A1, A2 output)")
    r: int = setting(1024, "generator width r (A3 output, B input)")
    k: int = setting(128, "SVD rank of the adapter")
    alpha: float = setting(64.0, "adapter scale s = alpha / r")
    window: int = setting(1024, "tokens per context window w: the context streams in windows (paper §3)")
    norm: str = setting("svd", "svd (N(S) = U_k V_k^T, paper §3) or frobenius (S / ||S||_F, the paper's ablation)")
    svd: str = setting("randomized", "randomized (torch.svd_lowrank's algorithm, as released) or exact")
    svd_niter: int = setting(1, "power iterations of the randomized SVD")

    def __post_init__(self):
        """Raises ValueError naming (GeneratorConfig.field) the first setting that cannot work."""
        prefix = "GeneratorConfig."
        check_types(self, prefix)
        for m in self.target_modules:
            if m not in LINEAR_MODULES:
                raise ValueError(f"{prefix}target_modules: unknown module '{m}'; "
                                 f"expected names among {list(LINEAR_MODULES)}")
        if not self.target_modules or len(set(self.target_modules)) != len(self.target_modules):
            raise ValueError(f"{prefix}target_modules: {self.target_modules} must be "
                             "a non-empty list without repeats")
        check_at_least(self, 1, ("d_r", "r", "k", "window"), prefix)
        check_at_least(self, 0, ("svd_niter",), prefix)
        if self.k > min(self.d_r, self.r):
            raise ValueError(f"{prefix}k = {self.k} is larger than min(d_r, r) = "
                             f"{min(self.d_r, self.r)}: N(S) has at most that rank")
        if self.alpha <= 0:
            raise ValueError(f"{prefix}alpha: expected a positive scale, got {self.alpha}")
        if self.norm not in ("svd", "frobenius"):
            raise ValueError(f"{prefix}norm = '{self.norm}': expected 'svd' or 'frobenius'")
        if self.svd not in ("exact", "randomized"):
            raise ValueError(f"{prefix}svd = '{self.svd}': expected 'exact' or 'randomized'")

    @property
    def scale(self) -> float:
        return self.alpha / self.r


def base_identity(args: ModelArgs) -> dict:
    """What a generator records of its base: loading against another base is an error."""
    return {"model_type": args.model_type, "dim": args.dim, "n_layers": args.n_layers,
            "vocab_size": args.vocab_size}


# -----------------------------------------------------------------------------
# SVD normalisation (paper §3, "SVD normalization")


def randomized_svd(S: torch.Tensor, k: int, niter: int, rng=None):
    """torch.svd_lowrank's algorithm (Halko et al. 2011) with a choosable random source.

    S (..., m, n) -> U (..., m, k), singular values (..., k), V (..., n, k). One Gaussian test
    matrix serves the whole batch, as in torch.svd_lowrank.
    """
    omega = torch.randn(S.shape[-1], k, generator=rng, device=S.device, dtype=S.dtype)
    Q = torch.linalg.qr(S @ omega).Q  # (..., m, k): an orthonormal basis of S's range
    for _ in range(niter):  # power iterations sharpen the basis
        Q = torch.linalg.qr(S.mT @ Q).Q
        Q = torch.linalg.qr(S @ Q).Q
    U, sv, Vh = torch.linalg.svd(Q.mT @ S, full_matrices=False)  # SVD of the small (k, n) matrix
    return Q @ U, sv, Vh.mT


KEEP_RTOL = 1e-5  # a singular value below 1e-5 s_1 is float32 noise: its direction is left out


def kept_directions(sv: torch.Tensor, k: int) -> torch.Tensor:
    """The singular directions N(S) keeps: of the top k, those whose value is not noise.

    sv (..., t) sorted descending -> (..., t) bool. None when S == 0; only rank(S) of them
    when S has rank below k (a context window of fewer than k tokens)."""
    top_k = torch.arange(sv.shape[-1], device=sv.device) < k
    return top_k & (sv > KEEP_RTOL * sv[..., :1])


class NormalizedSVD(torch.autograd.Function):
    """N(S) = U_J V_J^T over the kept directions J, as factors P = U_J (..., d_r, k) and
    Q = V_J (..., r, k) (zero columns where fewer than k are kept), and the singular values
    (..., k + 1, or k for the randomised SVD). Its backward is the derivative of N(S) itself.

    Autograd through an SVD divides by s_i^2 - s_j^2 for every pair of singular values, so a
    window of fewer than k tokens (S of rank below k: zero singular values, which tie) gets a
    NaN gradient although none of its zero directions is in N(S). N(S) drops the singular
    values, and its derivative needs no such division. With E = U^T dS V over the t computed
    directions (the randomised SVD computes k; the others count as singular value 0):

        dN = U Y V^T + (I - U U^T) dS V_J diag(1/s_J) V_J^T + U_J diag(1/s_J) U_J^T dS (I - V V^T)
        Y_ij = (E_ij - E_ji) / (s_i + s_j)              i and j kept
        Y_ij = (s_a E_ij + s_b E_ji) / (s_a^2 - s_b^2)  one of them kept (a), the other not (b)
        Y_ij = 0                                        neither kept

    (write dU = U a, dV = V b with a, b skew, solve E = a diag(s) - diag(s) b + d diag(s) for
    the pairs). A tie among kept values is harmless: N(S) does not depend on the basis of a
    repeated singular value. The one singular case left is a kept value tied with a dropped
    non-zero one (s_k = s_{k+1}), which `guard` catches. The backward assumes the loss depends
    on P and Q only through N = P Q^T, as generated_delta and the LoRA factors do. The released
    code differentiates through torch.svd_lowrank's algorithm instead; on S of rank > k it and
    this backward give different (both finite) gradients for the randomised SVD.
    """

    @staticmethod
    def forward(ctx, S, k: int, svd: str, niter: int, rng):
        if svd == "exact":
            U, sv, Vh = torch.linalg.svd(S, full_matrices=False)  # t = min(d_r, r) directions
            V = Vh.mT
        else:
            U, sv, V = randomized_svd(S, k, niter, rng)  # t = k directions
        kept = kept_directions(sv, k)[..., None, :k]
        ctx.k = k
        ctx.save_for_backward(U, sv, V)
        top = sv[..., :k + 1]
        ctx.mark_non_differentiable(top)
        return U[..., :k] * kept, V[..., :k] * kept, top

    @staticmethod
    def backward(ctx, gP, gQ, _):
        U, sv, V = ctx.saved_tensors  # (..., d_r, t), (..., t), (..., r, t)
        kept = kept_directions(sv, ctx.k)  # (..., t)
        pad = (0, sv.shape[-1] - ctx.k)
        gP = F.pad(gP, pad) * kept[..., None, :]  # (..., d_r, t): (dL/dN) V_J, zero off J
        gQ = F.pad(gQ, pad) * kept[..., None, :]  # (..., r, t): (dL/dN)^T U_J, zero off J
        UgP, VgQ = U.mT @ gP, V.mT @ gQ  # (..., t, t)
        G = torch.where(kept[..., None, :], UgP, VgQ.mT)  # G_ij = u_i^T (dL/dN) v_j, i or j kept
        si, sj, ki, kj = sv[..., :, None], sv[..., None, :], kept[..., :, None], kept[..., None, :]
        tiny = torch.finfo(sv.dtype).tiny
        both = (G - G.mT) / (si + sj).clamp_min(tiny)
        sa, sb = torch.where(ki, si, sj), torch.where(ki, sj, si)  # the kept one, the other
        one = (sa * G + sb * G.mT) / torch.where(ki ^ kj, sa * sa - sb * sb, 1.0)
        Y = torch.where(ki & kj, both, torch.where(ki ^ kj, one, 0.0))  # (..., t, t)
        inv = torch.where(kept, 1.0 / sv.clamp_min(tiny), 0.0)[..., None, :]  # 1/s_J, 0 off J
        gS = U @ Y @ V.mT
        gS = gS + ((gP - U @ UgP) * inv) @ V.mT  # dL/dS along what no computed u spans
        return gS + U @ ((gQ - V @ VgQ) * inv).mT, None, None, None, None  # ... no computed v


def svd_normalize(S: torch.Tensor, config: GeneratorConfig, rng=None):
    """N(S) = U_k V_k^T as factors P (..., d_r, k) and Q (..., r, k), in float32 (or float64).

    Singular values are dropped, so N(S) has spectral norm 1 and does not depend on the scale
    of S. Directions whose singular value is zero (S = 0, or rank below k) are left out, so a
    window that sees no context gets no adapter, and one of fewer than k tokens gets rank(S).
    Also returns the singular values (..., k+1 or k) for the gradient guard. With
    norm='frobenius' (the paper's ablation of the normalisation): P = S / ||S||_F, Q = I.
    """
    S = S.to(torch.promote_types(S.dtype, torch.float32))
    if config.norm == "frobenius":
        P = S / S.norm(dim=(-2, -1), keepdim=True).clamp_min(1e-12)
        Q = torch.eye(config.r, device=S.device, dtype=S.dtype).expand(*S.shape[:-2], -1, -1)
        return P, Q, None
    return NormalizedSVD.apply(S, config.k, config.svd, config.svd_niter, rng)


def guard(S: torch.Tensor, P: torch.Tensor, sv: torch.Tensor | None, k: int):
    """The SVD gradient guard of the authors' released code: a window whose SVD backward would
    divide by (nearly) zero has its adapter dropped for this step (P set to zero) and no gradient
    through its SVD.

    The release fires on any two top singular values within 1e-7 of each other. With
    NormalizedSVD's backward only one such pair matters: the last kept direction and the first
    dropped one (s_k and s_{k+1}, when both are above noise). The released test, with GUARD_GAP
    for its 1e-7, applied to that gap:
        min(gap / (s_1 + 1e-6), gap) < GUARD_GAP,
    and a window whose SVD is not finite fires too. Returns the guarded P and how many windows
    fired (a tensor: reading it is a host sync, left to the caller's log line).
    """
    if sv is None:  # Frobenius normalisation: no SVD to guard
        return P, torch.zeros((), device=P.device)
    rank = kept_directions(sv, k).sum(-1, keepdim=True)  # (..., 1): directions kept
    has_next = rank < sv.shape[-1]  # a dropped direction was computed
    last = sv.gather(-1, (rank - 1).clamp_min(0))
    following = sv.gather(-1, rank.clamp_max(sv.shape[-1] - 1))
    gap = last - following
    separation = torch.minimum(gap / (sv[..., :1] + 1e-6), gap)
    tied = has_next & (rank > 0) & (separation < GUARD_GAP)
    drop = (tied | ~torch.isfinite(sv).all(-1, keepdim=True))[..., 0]
    if S.requires_grad:  # cleans the SVD's backward output before it reaches S
        S.register_hook(lambda grad: grad.masked_fill(drop[..., None, None], 0.0))
    return P.masked_fill(drop[..., None, None], 0.0), drop.sum()


# -----------------------------------------------------------------------------
# The generator


def rms_norm(h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The generator's RMSNorm over hidden states (..., w, D), computed in float32."""
    hf = h.float()
    return weight * (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + NORM_EPS))


def generated_delta(x, A1, P, Q, B, scale):
    """Paper §3, Eq. 3: delta(x) = s * B(A1(x) @ N(S)) with N(S) = P Q^T.

    x (..., T, d_in), A1 (d_r, d_in), P (..., d_r, k), Q (..., r, k), B (d_out, r)
    -> (..., T, d_out). Factored through rank k: d_in -> d_r -> k -> r -> d_out.
    """
    z = x @ A1.mT.to(x.dtype)  # (..., T, d_r)
    z = (z @ P.to(z.dtype)) @ Q.mT.to(z.dtype)  # (..., T, r)
    return scale * (z @ B.mT.to(z.dtype))  # (..., T, d_out)


class ModuleGenerator(nn.Module):
    """The generator's weights for one target module, stacked over the base's L layers."""

    def __init__(self, n_layers: int, dim: int, d_in: int, d_out: int, config: GeneratorConfig):
        super().__init__()
        self.norm = nn.Parameter(torch.ones(n_layers, dim))  # RMSNorm weight over H^l
        self.A1 = nn.Parameter(torch.empty(n_layers, config.d_r, d_in))  # query: module input x
        self.A2 = nn.Parameter(torch.empty(n_layers, config.d_r, dim))  # key: hidden states
        self.A3 = nn.Parameter(torch.empty(n_layers, config.r, dim))  # value: hidden states
        self.B = nn.Parameter(torch.zeros(n_layers, d_out, config.r))  # output: zero, so a fresh
        for stacked in (self.A1, self.A2, self.A3):                   # generator changes nothing
            for w in stacked:  # Kaiming-normal over each layer's fan-in, as the release (a = sqrt 5)
                nn.init.kaiming_normal_(w, a=math.sqrt(5))

    def context_outer(self, H: torch.Tensor, mask: torch.Tensor | None, layer=slice(None)):
        """K^T V of a window's hidden states, float32: the term it adds to S (paper §3).

        H (..., w, D) with mask (..., w) (False rows are padding and count as zero);
        `layer` picks one layer's weights (an int), or all of them (H then (L, w, D)).
        Returns (..., d_r, r).
        """
        Hn = rms_norm(H, self.norm[layer][..., None, :]).to(H.dtype)
        K = Hn @ self.A2[layer].mT.to(H.dtype)  # (..., w, d_r)
        V = Hn @ self.A3[layer].mT.to(H.dtype)  # (..., w, r)
        if mask is not None:
            K = K * mask[..., None].to(K.dtype)
        with torch.autocast(H.device.type, enabled=False):  # the sum over tokens in float32
            return K.float().mT @ V.float()


class AdapterGenerator(nn.Module):
    """The adapter generator of paper §3: for every layer and target module, norm, A1, A2, A3
    and B."""

    def __init__(self, args: ModelArgs, config: GeneratorConfig):
        super().__init__()
        if config.window > args.max_seq_len:
            raise ValueError(f"GeneratorConfig.window = {config.window} is longer than the base's window "
                             f"(max_seq_len {args.max_seq_len}): windows run from position 0")
        self.args, self.config = args, config
        widths = module_widths(args)
        self.mods = nn.ModuleDict({m: ModuleGenerator(args.n_layers, args.dim, *widths[m], config)
                                   for m in config.target_modules})

    @property
    def device(self) -> torch.device:
        return self.mods[self.config.target_modules[0]].A2.device

    # --- streaming contextualisation (paper §3, Fig. 1 left) ----------------------------

    def empty_state(self) -> "ContextState":
        return ContextState({m: torch.zeros(self.args.n_layers, self.config.d_r, self.config.r,
                                            device=self.device) for m in self.mods})

    def check_state(self, state: "ContextState", source: str = "state") -> None:
        """Raises ValueError unless `state` is a ContextState of this generator's modules, with
        S of shape (L, d_r, r) on the generator's device."""
        wanted = {m: (self.args.n_layers, self.config.d_r, self.config.r) for m in self.mods}
        if not isinstance(state, ContextState):
            raise ValueError(f"{source}: expected a ContextState, got {type(state).__name__}")
        found = {m: tuple(s.shape) for m, s in state.S.items()}
        if found != wanted:
            raise ValueError(f"{source}: state of modules {found} does not fit this generator ({wanted})")
        devices = {s.device for s in state.S.values()}
        if devices != {self.device}:
            raise ValueError(f"{source}: state on {sorted(map(str, devices))}, this generator on {self.device}")

    def normalized(self, state: "ContextState"):
        """N(S_t) of every module and layer in one batched SVD -> {module: (P, Q)}, each (L, ., k)."""
        self.check_state(state)
        S = torch.stack([state.S[m] for m in self.mods])  # (M, L, d_r, r)
        rng = torch.Generator(S.device).manual_seed(INFERENCE_SEED)
        P, Q, _ = svd_normalize(S, self.config, rng)
        return {m: (P[i], Q[i]) for i, m in enumerate(self.mods)}

    @torch.no_grad()
    def update(self, model: Transformer, state: "ContextState", window: torch.Tensor) -> "ContextState":
        """One step of the stream: run window (w,) token ids through the base with the adapter of
        S_{t-1}, then S_t = S_{t-1} + K_t^T V_t at every layer. Returns the new state."""
        adapter = self.lora(state) if state.tokens else None  # S_0 = 0 gives no adapter
        _, hidden = model(window[None], adapter=adapter, return_hidden=True)
        H = torch.stack(hidden)[:, 0]  # (L, w, D): the residual stream entering each layer
        S = {m: state.S[m] + g.context_outer(H, None) for m, g in self.mods.items()}
        return ContextState(S, state.tokens + window.numel())

    def contextualize(self, model: Transformer, context: str | list[int],
                      tokenizer: Tokenizer | None = None, state: "ContextState | None" = None) -> "ContextState":
        """Streams a context of any length through the base, window by window (paper §3, Fig. 1).

        Args:
            context: text (tokenised with a BOS by `tokenizer`; "" is no tokens) or token ids.
            state: a state to continue (a user's memory); default: empty.
        Returns:
            the accumulator state; its size does not depend on the context's length.
        """
        if isinstance(context, str) and tokenizer is None:
            raise ValueError("contextualize: a text context needs the tokenizer")
        if isinstance(context, str):  # no text, no tokens: not even a BOS, whose adapter is full-strength
            ids = tokenizer.encode(context) if context else []
        else:
            ids = list(context)
        if ids:
            check_token_ids(ids, self.args.vocab_size, "contextualize: the context")
        if state is not None:
            self.check_state(state, "contextualize(state=...)")
        state = state or self.empty_state()
        for window in split_windows(ids, self.config.window):
            state = self.update(model, state, torch.tensor(window, device=self.device))
        return state

    # --- three equivalent ways to apply an adapter (the merged one is Fig. 1 right) -----

    def on_the_fly(self, state: "ContextState"):
        """The adapter as the base's `adapter` hook, computed from S by Eq. 3 at every call."""
        factors = self.normalized(state)
        s = self.config.scale

        def adapter(layer, h):
            return {m: (lambda x, g=g, P=factors[m][0][layer], Q=factors[m][1][layer]:
                        generated_delta(x, g.A1[layer], P, Q, g.B[layer], s))
                    for m, g in self.mods.items()}
        return adapter

    def lora(self, state: "ContextState") -> "LoRA":
        """Rank-k LoRA factors: Delta W = s B N^T A1 = (s B V_k)(U_k^T A1)."""
        factors = self.normalized(state)
        A, B = {}, {}
        for m, g in self.mods.items():
            P, Q = factors[m]  # (L, d_r, k), (L, r, k)
            A[m] = (P.mT @ g.A1.float())[None]  # lora_A = U_k^T A1: (1, L, k, d_in)
            B[m] = (self.config.scale * g.B.float() @ Q)[None]  # lora_B = s B V_k: (1, L, d_out, k)
        return LoRA(A, B)

    # --- the parallel training forward ---------------------------------------------------

    def forward(self, model: Transformer, tokens: torch.Tensor, pad_mask: torch.Tensor,
                visible: torch.Tensor, logits_at: torch.Tensor | None = None):
        """All windows of a batch at once, computing what the streaming loop (`update`)
        computes; the released code trains this way.

        Args:
            tokens: (N, W, w) token ids: N sequences of W windows, each run from position 0.
            pad_mask: (N, W, w) bool, False on (right) padding.
            visible: (W, W) bool; visible[i, j]: window i uses the context of window j. The
                plain layout: strictly earlier windows (lower triangle without diagonal).
            logits_at: (N, W, w) bool: compute logits only there (see Transformer.forward).
        Returns:
            logits (N, W, w, V), or (n, V) with logits_at, and the number of windows
            the SVD guard dropped.
        """
        N, W, w = tokens.shape
        fired = []

        def adapter(layer, h):  # h (B, w, D), B = N * W: every window's stream entering `layer`
            h = h.view(N, W, w, -1)
            KV = torch.stack([g.context_outer(h, pad_mask, layer) for g in self.mods.values()])
            S = torch.einsum("vu,mnuij->mnvij", visible.float(), KV)  # S_i = sum_{j visible} K_j^T V_j
            P, Q, sv = svd_normalize(S, self.config)  # one SVD per window: (M, N, W, d_r, k)
            P, count = guard(S, P, sv, self.config.k)
            fired.append(count)
            return {m: (lambda x, g=g, P=P[i], Q=Q[i]: generated_delta(
                        x.view(N, W, w, -1), g.A1[layer], P, Q, g.B[layer], self.config.scale
                    ).view(N * W, w, -1)) for i, (m, g) in enumerate(self.mods.items())}

        if logits_at is not None:
            return model(tokens.view(N * W, w), adapter=adapter, logits_at=logits_at.view(N * W, w)), \
                torch.stack(fired).sum()
        return model(tokens.view(N * W, w), adapter=adapter).view(N, W, w, -1), torch.stack(fired).sum()

    # --- persistence ---------------------------------------------------------------------

    def save(self, directory) -> None:
        """generator.safetensors (weights) and generator.json (config and base identity)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        atomic_write(directory / "generator.safetensors", lambda p: save_file(tensors, p))
        meta = {"config": asdict(self.config), "base": base_identity(self.args)}
        atomic_write(directory / "generator.json", lambda p: p.write_text(json.dumps(meta, indent=2)))

    @classmethod
    def load(cls, directory, args: ModelArgs, device=None) -> "AdapterGenerator":
        """Loads a saved generator for the base described by `args` (checked)."""
        directory = Path(directory)
        for name in ("generator.json", "generator.safetensors"):
            if not (directory / name).is_file():
                hint = f"; {directory / 'checkpoint'} holds one" if (directory / "checkpoint" / name).is_file() else ""
                raise FileNotFoundError(f"{directory / name} does not exist (a generator directory "
                                        f"holds generator.json and generator.safetensors){hint}")
        source = directory / "generator.json"
        meta = read_json(source)
        base, config = (config_field(meta, key, str(source), dict) for key in ("base", "config"))
        if base != base_identity(args):
            raise ValueError(f"{directory} holds a generator for the base {base}, "
                             f"but this base is {base_identity(args)}")
        known = [f.name for f in fields(GeneratorConfig)]
        if set(config) - set(known):
            raise ValueError(f"{source}: unknown config field(s) {sorted(set(config) - set(known))}; "
                             f"expected some of {known}")
        try:
            config = GeneratorConfig(**config)
        except ValueError as err:
            raise ValueError(f"{source}: {err}") from None
        with torch.device("meta"):
            generator = cls(args, config)
        state = read_safetensors(directory / "generator.safetensors", device or "cpu")
        expected = {k: v.shape for k, v in generator.state_dict().items()}
        missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        if missing or unexpected:
            raise ValueError(f"{directory / 'generator.safetensors'} does not match {source}: missing "
                             f"tensors {missing[:10]}, unexpected tensors {unexpected[:10]}")
        for name, t in state.items():
            if name in expected and t.shape != expected[name]:
                raise ValueError(f"{directory / 'generator.safetensors'}: '{name}' has shape "
                                 f"{tuple(t.shape)}, the base and config need {tuple(expected[name])}")
        generator.load_state_dict(state, strict=True, assign=True)
        return generator


def split_windows(ids: list[int], window: int) -> list[list[int]]:
    """The chunks of paper §3: n tokens -> ceil(n / window) windows of equal length ceil(n / count)
    (the last one shorter by what padding would fill)."""
    count = math.ceil(len(ids) / window)
    size = math.ceil(len(ids) / count) if count else 0
    return [ids[i:i + size] for i in range(0, len(ids), size)] if ids else []


def pretraining_layout(C: int, tasks) -> tuple[torch.Tensor, torch.Tensor]:
    """The windows of the self-supervised tasks (paper §3): C completion windows, then C
    reconstruction windows when that task is on.

    Returns visible (W, W), where completion window i sees completion windows j < i and
    reconstruction window i sees completion windows j <= i (nobody sees a reconstruction
    window), and task (W,) for each window.
    """
    with_reconstruction = "reconstruction" in tasks
    W = 2 * C if with_reconstruction else C
    visible = torch.zeros(W, W, dtype=torch.bool)
    visible[:C, :C] = torch.ones(C, C).tril(-1).bool()  # completion: strictly earlier windows
    if with_reconstruction:
        visible[C:, :C] = torch.ones(C, C).tril(0).bool()  # reconstruction i: windows 1..i
    task = torch.tensor([0] * C + [1] * (W - C))
    return visible, task


# -----------------------------------------------------------------------------
# The accumulator state and the LoRA form


@dataclass
class ContextState:
    """The accumulator of paper §3: S per target module, (L, d_r, r) float32, and the tokens seen.
    Its size is fixed whatever the context's length: a user's memory."""
    S: dict[str, torch.Tensor]
    tokens: int = 0

    def __add__(self, other: "ContextState") -> "ContextState":
        """Two contexts streamed apart, each from an empty state, as one state: S is a sum over
        windows, so states add up (evaluate.py's adapter_apart)."""
        return ContextState({m: s + other.S[m] for m, s in self.S.items()}, self.tokens + other.tokens)

    def save(self, path) -> None:
        tensors = {m: s.contiguous() for m, s in self.S.items()}
        atomic_write(Path(path), lambda p: save_file(tensors, p, {"tokens": str(self.tokens)}))

    @classmethod
    def load(cls, path, generator: AdapterGenerator) -> "ContextState":
        S = read_safetensors(Path(path), generator.device)
        with safe_open(str(path), framework="pt") as f:
            tokens = (f.metadata() or {}).get("tokens", "")
        if not tokens.isdigit():
            found = f"is {tokens!r}" if tokens else "is missing"
            raise ValueError(f"{path}: metadata 'tokens' {found}, expected the count of tokens seen "
                             "(ContextState.save writes it)")
        state = cls(S, int(tokens))
        generator.check_state(state, str(path))
        return state


@dataclass
class LoRA:
    """Rank-k factors per target module: A (n, L, k, d_in) and B (n, L, d_out, k), for n
    adapters. With n > 1, row i of a batch uses adapter i (several users in one batch)."""
    A: dict[str, torch.Tensor]
    B: dict[str, torch.Tensor]

    def __call__(self, layer: int, h: torch.Tensor):
        """The base's adapter hook: delta(x) = x A^T B^T, batched over rows."""
        return {m: (lambda x, A=self.A[m][:, layer], B=self.B[m][:, layer]:
                    (x @ A.mT.to(x.dtype)) @ B.mT.to(x.dtype)) for m in self.A}

    @staticmethod
    def stack(loras: list["LoRA"]) -> "LoRA":
        """One multi-adapter LoRA whose adapter i is loras[i]."""
        return LoRA({m: torch.cat([l.A[m] for l in loras]) for m in loras[0].A},
                    {m: torch.cat([l.B[m] for l in loras]) for m in loras[0].B})

    def delta_weights(self, layer: int, module: str) -> torch.Tensor:
        """Delta W = B A (d_out, d_in) of a single adapter."""
        return self.B[module][0, layer] @ self.A[module][0, layer]


def module_weight(model: Transformer, layer: int, module: str) -> torch.Tensor:
    return model.layers[layer].get_submodule(module_path(module)).weight


@contextmanager
def merged(model: Transformer, lora: LoRA):
    """The merged form: W <- W + B A inside the block (no decode overhead), and the original
    weights restored exactly (from a copy) on exit."""
    originals = {}
    try:
        with torch.no_grad():
            for m in lora.A:
                for layer in range(model.args.n_layers):
                    w = module_weight(model, layer, m)
                    originals[layer, m] = w.clone()
                    w += lora.delta_weights(layer, m).to(w.dtype)
        yield model
    finally:
        with torch.no_grad():
            for (layer, m), w in originals.items():
                module_weight(model, layer, m).copy_(w)


# -----------------------------------------------------------------------------
# Costs: what the adapter computes and keeps


def ingestion_flops(args: ModelArgs, generator: AdapterGenerator, windows: list[int]) -> int:
    """GenerativeAdapter's one pass over a context (paper §3), per window of w tokens: the base
    forward, then per layer and module K = A2 h, V = A3 h (2 D (d_r + r) per token), K^T V
    (2 d_r r per token), the randomised SVD ((2 niter + 2) matmuls of 2 d_r r k, plus the
    (k x r) SVD, ~4 k^2 r) and the LoRA factors (2 k d_r d_in + 2 d_out r k)."""
    c, widths = generator.config, module_widths(args)
    per_token = 2 * args.dim * (c.d_r + c.r) + 2 * c.d_r * c.r
    svd = (2 * c.svd_niter + 2) * 2 * c.d_r * c.r * c.k + 4 * c.k * c.k * c.r
    lora = sum(2 * c.k * c.d_r * widths[m][0] + 2 * widths[m][1] * c.r * c.k for m in c.target_modules)
    per_window = args.n_layers * (len(c.target_modules) * svd + lora)
    return sum(forward_flops(args, w) + args.n_layers * len(c.target_modules) * per_token * w + per_window
               for w in windows)


def lora_floats(lora: LoRA) -> int:
    """What GenerativeAdapter keeps per user: the rank-k factors."""
    return sum(a.numel() + b.numel() for a, b in zip(lora.A.values(), lora.B.values()))


# -----------------------------------------------------------------------------
# Export for peft / vLLM


def export_peft(lora: LoRA, directory, base_model_name_or_path: str) -> None:
    """Writes a PEFT LoRA directory (adapter_config.json, adapter_model.safetensors).

    PEFT scales B A by lora_alpha / r; our lora_B already holds s, so lora_alpha = r.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for m in lora.A:
        for layer in range(lora.A[m].shape[1]):
            prefix = f"base_model.model.model.layers.{layer}.{module_path(m)}"
            tensors[f"{prefix}.lora_A.weight"] = lora.A[m][0, layer].contiguous()
            tensors[f"{prefix}.lora_B.weight"] = lora.B[m][0, layer].contiguous()
    rank = next(iter(lora.A.values())).shape[2]
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": rank,
              "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
              "target_modules": sorted(lora.A), "base_model_name_or_path": base_model_name_or_path}
    atomic_write(directory / "adapter_model.safetensors", lambda p: save_file(tensors, p, {"format": "pt"}))
    atomic_write(directory / "adapter_config.json", lambda p: p.write_text(json.dumps(config, indent=2)))
