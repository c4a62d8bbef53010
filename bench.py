"""Measures speed and memory: loading a checkpoint, the base model, a generator pretraining
step, context ingestion against prompting, and decoding with each form of the adapter.

    python bench.py --preset tiny --device cpu          # the tiny default, under a minute
    python bench.py --preset small --device cpu         # a 52M Llama-2-shaped model, a few minutes
    python bench.py --preset 7b --device cuda --compile # a Mistral-7B-shaped model, random bf16 weights

Every number is the median of repeats after warm-up, with device synchronisation; the spread
(min..max) is kept beside it. Results are printed and written as JSON (--out) together with
the device, torch version and command line.

FLOPs are counted off the config (model.forward_flops): 2 x the weights a token multiplies
through, plus attention. MFU = achieved FLOP/s / the device's dense bf16 peak (PEAK_TFLOPS).
A generator pretraining step on the frozen base is charged, per processed token, the base's
forward, its input-gradient backward and its recomputation under gradient checkpointing (one
forward's FLOPs each), and 6 x the generator's parameters. Shape notes use METHOD.md's letters.
"""

import argparse
import contextlib
import json
import math
import tempfile
import statistics
import sys
import time
from pathlib import Path

import torch

import cli
from generator import (TASKS, AdapterGenerator, ContextState, GeneratorConfig, merged, pretraining_layout,
                       svd_normalize)
from model import KVCache, ModelArgs, Transformer, forward_flops, kv_cache_floats, read_json

TINY = Path(__file__).resolve().parent / "data" / "tiny"  # the bundled base and generator: their shapes
PEAK_TFLOPS = {"H100 PCIe": 756, "H100": 989, "H200": 989, "A100": 312}  # dense bf16, by device name
MISTRAL_7B = ModelArgs(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, head_dim=128, hidden_dim=14336,
                       vocab_size=32000, max_seq_len=32768, rope_theta=1e6, model_type="mistral")
SMALL = ModelArgs(dim=512, n_layers=6, n_heads=8, n_kv_heads=8, head_dim=64, hidden_dim=1376, vocab_size=32000,
                  max_seq_len=4096, rope_theta=1e4, model_type="llama")  # 51.7M parameters
PRESETS = {
    # base, generator, tokens per training window x windows, context lengths, decode prompt
    "tiny": dict(base=ModelArgs.from_hf_config(read_json(TINY / "config.json")),
                 generator=GeneratorConfig(**read_json(TINY / "generator" / "generator.json")["config"]),
                 windows=4, micro_batch=4,
                 contexts=[1024, 2048, 4096, 8192, 16384], prompt=128, new_tokens=32, repeats=3),
    "small": dict(base=SMALL, generator=GeneratorConfig(d_r=256, r=256, k=32, alpha=16.0, window=512),
                  windows=4, micro_batch=1, contexts=[1024, 2048, 4096, 8192, 16384], prompt=128,
                  new_tokens=32, repeats=3),
    "7b": dict(base=MISTRAL_7B, generator=GeneratorConfig(), windows=8, micro_batch=1,
               contexts=[1024, 2048, 4096, 8192, 16384, 32768], prompt=512, new_tokens=128, repeats=5),
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, repeats: int, warmup: int = 1, setup=tuple) -> dict:
    """Median and spread of the wall time of fn(*setup()) in seconds, after warm-up; setup()
    itself is not timed."""
    for _ in range(warmup):
        fn(*setup())
    times = []
    for _ in range(repeats):
        inputs = setup()
        sync(device)
        start = time.perf_counter()
        fn(*inputs)
        sync(device)
        times.append(time.perf_counter() - start)
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times)}


def peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def random_base(args: ModelArgs, device, dtype) -> Transformer:
    """A model with random weights made directly on the device, in its dtype."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Transformer(args)
            for p in model.parameters():
                torch.nn.init.normal_(p, 0.0, 0.02)
    finally:
        torch.set_default_dtype(default)
    return model.eval().requires_grad_(False)


def training_step_flops(args: ModelArgs, generator: AdapterGenerator, windows: int, w: int) -> int:
    """Frozen-base accounting for `windows` windows of w tokens: forward, input-gradient backward
    and recomputation of the base (3 forwards), and 6 x the generator's parameters per token."""
    gen_params = sum(p.numel() for p in generator.parameters())
    return windows * (3 * forward_flops(args, w) + 6 * gen_params * w)


# -----------------------------------------------------------------------------
# The measurements


def bench_loading(model: Transformer, device) -> dict:
    """Transformer.from_pretrained of the model saved in its own dtype: time, and the memory it
    adds (host RSS on a CPU, the allocator on a GPU) as a multiple of the weights' bytes."""
    weight_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        Transformer.from_pretrained(tmp, device)  # warm-up: the first call pays one-time library set-up
        with cli.PeakMemory(device) as memory:
            start = time.perf_counter()
            loaded = Transformer.from_pretrained(tmp, device)
            torch.stack([p.sum() for p in loaded.parameters()])  # every weight read: all pages in
            sync(device)
            seconds = time.perf_counter() - start
    return {"load_s": seconds, "weights_mb": weight_mb, "extra_mb": memory.extra_mb,
            "extra_per_weight_byte": memory.extra_mb / weight_mb if memory.extra_mb is not None else None}


def bench_base(model: Transformer, device, preset: dict, peak) -> dict:
    """The base alone: forward, and forward + backward into every weight (3 forwards' FLOPs)."""
    B, T = preset["micro_batch"] * preset["windows"], preset["generator"].window
    tokens = torch.randint(0, model.args.vocab_size, (B, T), device=device)

    def forward():
        with torch.no_grad(), cli.autocast(device):
            model(tokens)

    def forward_backward():
        with cli.autocast(device):
            model(tokens).float().logsumexp(-1).mean().backward()
        model.zero_grad(set_to_none=True)

    out = {}
    model.requires_grad_(True)
    for name, fn, multiple in (("forward", forward, 1), ("forward_backward", forward_backward, 3)):
        t = timed(fn, device, preset["repeats"])
        flops = multiple * forward_flops(model.args, T) * B
        out[name] = {**t, "tokens_per_s": B * T / t["median_s"],
                     "mfu": flops / t["median_s"] / (peak * 1e12) if peak else None}
    model.requires_grad_(False)
    return out


def bench_training(model: Transformer, generator: AdapterGenerator, device, preset: dict, peak) -> dict:
    """One generator pretraining micro-step (both self-supervised tasks: C completion + C
    reconstruction windows) on the frozen base: tokens/s, peak memory, MFU, and the share spent
    in SVDs."""
    C, w, N = preset["windows"], generator.config.window, preset["micro_batch"]
    visible = pretraining_layout(C, TASKS)[0].to(device)  # (W, W), W = 2C
    W = len(visible)
    tokens = torch.randint(0, model.args.vocab_size, (N, W, w), device=device)
    mask = torch.ones_like(tokens, dtype=torch.bool)
    model.checkpointing = device.type == "cuda"

    def step():
        with cli.autocast(device):
            logits, _ = generator(model, tokens, mask, visible)
            logits.float().logsumexp(-1).mean().backward()
        generator.zero_grad(set_to_none=True)

    with cli.PeakMemory(device) as memory:
        t = timed(step, device, preset["repeats"])
    S = torch.randn(len(generator.mods), N, W, generator.config.d_r, generator.config.r, device=device,
                    requires_grad=True)

    def svds():  # the step's SVDs: one batch per layer, forward and backward
        for _ in range(model.args.n_layers):
            P, Q, _ = svd_normalize(S, generator.config)
            (P.sum() + Q.sum()).backward()

    svd = timed(svds, device, preset["repeats"])
    flops = training_step_flops(model.args, generator, N * W, w)
    return {**t, "tokens_per_s": N * W * w / t["median_s"], "peak_mb": memory.peak_mb,
            "mfu": flops / t["median_s"] / (peak * 1e12) if peak else None,
            "svd_share": svd["median_s"] / t["median_s"]}


def bench_ingestion(model: Transformer, generator: AdapterGenerator, device, preset: dict) -> list[dict]:
    """Per context length: streaming the context into an adapter state (time, time per window,
    peak memory and what streaming added to it, the state's bytes) against prompting's prefill
    (time, peak memory, KV-cache bytes)."""
    rows = []
    dtype = model.lm_head.weight.dtype
    for n in preset["contexts"]:
        ids = torch.randint(3, model.args.vocab_size, (n,)).tolist()
        states = []
        with cli.PeakMemory(device) as adapter_memory, torch.no_grad(), cli.autocast(device):
            adapter = timed(lambda: states.append(generator.contextualize(model, ids)), device, 1, warmup=0)
        state_bytes = sum(s.numel() * s.element_size() for s in states.pop().S.values())
        windows = math.ceil(n / generator.config.window)

        def prefill():
            cache = KVCache(model.args, 1, n, device, dtype)
            with torch.no_grad(), cli.autocast(device):
                model(torch.tensor([ids], device=device), cache=cache)

        with cli.PeakMemory(device) as prompt_memory:
            prompt = timed(prefill, device, 1, warmup=0)
        kv_bytes = kv_cache_floats(model.args, n) * torch.finfo(dtype).bits // 8
        rows.append({"context_tokens": n, "adapter_s": adapter["median_s"],
                     "adapter_s_per_window": adapter["median_s"] / windows, "adapter_peak_mb": adapter_memory.peak_mb,
                     "adapter_extra_mb": adapter_memory.extra_mb,
                     "adapter_state_bytes": state_bytes, "prompt_prefill_s": prompt["median_s"],
                     "prompt_peak_mb": prompt_memory.peak_mb,
                     "prompt_extra_mb": prompt_memory.extra_mb, "kv_cache_bytes": kv_bytes})
    return rows


def decode_step(model: Transformer, adapter):
    def step(token, cache):
        return model(token, cache=cache, adapter=adapter)[:, -1].argmax(-1, keepdim=True)
    return step


def bench_decoding(model: Transformer, generator: AdapterGenerator, state: ContextState, device,
                   preset: dict, compile_step: bool) -> list[dict]:
    """Greedy decoding tokens/s and achieved GB/s (weights + KV cache read per step) for the
    base, the merged adapter, LoRA factors and the on-the-fly adapter; batch 1 and 8."""
    T, new = preset["prompt"], preset["new_tokens"]
    dtype = model.lm_head.weight.dtype
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    forms = {"base": None, "merged": None, "lora": generator.lora(state), "on_the_fly": generator.on_the_fly(state)}
    rows = []
    for batch in (1, 8):
        prompt = torch.randint(3, model.args.vocab_size, (batch, T), device=device)
        for form, adapter in forms.items():
            step = decode_step(model, adapter)
            if compile_step:
                step = torch.compile(step, mode="reduce-overhead")

            def prefilled():  # the prompt's forward, eager and not timed: only decoding is
                cache = KVCache(model.args, batch, T + new, device, dtype, static=compile_step)
                with torch.no_grad(), cli.autocast(device):
                    return decode_step(model, adapter)(prompt, cache), cache

            def decode(token, cache):
                with torch.no_grad(), cli.autocast(device):
                    for _ in range(new):
                        token = step(token, cache)

            with torch.no_grad(), merged(model, forms["lora"]) if form == "merged" else contextlib.nullcontext():
                t = timed(decode, device, preset["repeats"], setup=prefilled)
            kv_read = kv_cache_floats(model.args, batch * (T + new // 2)) * torch.finfo(dtype).bits // 8
            rows.append({"form": form, "batch": batch, "tokens_per_s": batch * new / t["median_s"],
                         "gb_per_s": new * (weight_bytes + kv_read) / t["median_s"] / 1e9, **t})
    return rows


# -----------------------------------------------------------------------------


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, epilog=cli.EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=None, help=cli.DEVICE_HELP)
    p.add_argument("--preset", default="tiny", choices=list(PRESETS),
                   help="tiny: the embedded default's shapes; small: a 52M Llama-2-shaped base; "
                   "7b: Mistral-7B with the released generator")
    p.add_argument("--compile", action="store_true", help="torch.compile (reduce-overhead) the decode step")
    p.add_argument("--out", default=None, help="JSON file (default: runs/bench/<preset>-<device>.json)")
    args = p.parse_args(argv)
    device = cli.pick_device(args.device)
    out = Path(args.out or f"runs/bench/{args.preset}-{device.type}.json")
    if out.is_dir():
        raise ValueError(f"--out {args.out!r} is a directory: expected the path of a JSON file")
    preset = PRESETS[args.preset]
    torch.manual_seed(0)
    model = random_base(preset["base"], device, cli.compute_dtype(device))
    generator = AdapterGenerator(model.args, preset["generator"]).to(device)
    with torch.no_grad():
        for g in generator.mods.values():
            g.B.normal_(0.0, 0.02)
    peak = peak_tflops(device)
    results = {"command": " ".join(["python bench.py", *(argv if argv is not None else sys.argv[1:])]),
               "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               "torch": torch.__version__, "preset": args.preset, "peak_tflops": peak}
    print(f"{results['device']}, torch {results['torch']}, preset {args.preset}")
    results["loading"] = bench_loading(model, device)
    print("loading:", json.dumps(results["loading"]))
    results["base"] = bench_base(model, device, preset, peak)
    print("base:", json.dumps(results["base"]))
    results["training_step"] = bench_training(model, generator, device, preset, peak)
    print("generator pretraining step:", json.dumps(results["training_step"]))
    results["ingestion"] = bench_ingestion(model, generator, device, preset)
    for row in results["ingestion"]:
        print("ingestion:", json.dumps(row))
    with torch.no_grad():
        state = generator.contextualize(model, torch.randint(3, model.args.vocab_size, (preset["contexts"][0],)).tolist())
    results["decoding"] = bench_decoding(model, generator, state, device, preset, args.compile)
    for row in results["decoding"]:
        print("decoding:", json.dumps(row))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(cli.strict_json(results))
    print(f"wrote {out}")
    return results


if __name__ == "__main__":
    cli.run(main, "bench.py")
