"""bench.py: the harness runs and writes valid JSON; its FLOP accounting matches a hand count."""

import json

import pytest

import bench
import cli
from conftest import tiny_args
from generator import AdapterGenerator, GeneratorConfig


def test_training_step_flops_by_hand():
    args = tiny_args()  # 81920 weights per token, see tests/test_evaluate.py
    gen = AdapterGenerator(args, GeneratorConfig(d_r=16, r=12, k=4, window=8))
    # o_proj, 2 layers: norm 64 + A1 16*64 + A2 16*64 + A3 12*64 + B 64*12 = 3648 per layer
    assert sum(p.numel() for p in gen.parameters()) == 2 * 3648
    # one window of 8 tokens: 3 base forwards (2*81920*8 + attention 4*2*4*16*36 keys = 1329152)
    # and 6 * 7296 generator parameters per token
    assert bench.training_step_flops(args, gen, 1, 8) == 3 * 1329152 + 6 * 7296 * 8


def test_tiny_preset_on_cpu_writes_json(tmp_path, monkeypatch):
    # the tiny preset's shapes on shorter contexts (still 16x apart), one repeat: every measurement, faster
    monkeypatch.setitem(bench.PRESETS, "tiny", bench.PRESETS["tiny"] | dict(
        contexts=[128, 256, 512, 1024, 2048], new_tokens=8, repeats=1))
    out = tmp_path / "bench.json"
    bench.main(["--preset", "tiny", "--device", "cpu", "--out", str(out)])
    results = json.loads(out.read_text())
    assert results["device"] == "cpu" and results["torch"] and "--preset tiny" in results["command"]
    assert 0.9 < results["loading"]["extra_per_weight_byte"] < 3  # about one copy of the weights
    assert results["base"]["forward"]["tokens_per_s"] > 0 and results["base"]["forward"]["mfu"] is None
    assert 0 < results["training_step"]["svd_share"] < 1
    states = {row["adapter_state_bytes"] for row in results["ingestion"]}
    assert len(states) == 1  # the adapter state does not grow with the context
    kv = [row["kv_cache_bytes"] for row in results["ingestion"]]
    assert kv == sorted(kv) and kv[-1] == 16 * kv[0]
    # Linux syncs a process's RSS counters lazily, so a block that adds nothing can read a
    # fraction of a MB below its start under load
    assert all(row["adapter_s_per_window"] > 0 and row["adapter_extra_mb"] > -2 for row in results["ingestion"])
    forms = {(row["form"], row["batch"]) for row in results["decoding"]}
    assert forms == {(f, b) for f in ("base", "merged", "lora", "on_the_fly") for b in (1, 8)}
    # tokens/s is the decoded tokens over the decoding time alone (the prefill is not timed)
    assert all(row["tokens_per_s"] * row["median_s"] == pytest.approx(8 * row["batch"]) for row in results["decoding"])


def test_output_path_is_checked_before_measuring(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit:
        cli.run(bench.main, "bench.py", ["--device", "cpu", "--out", str(tmp_path)])
    assert exit.value.code == 2
    assert capsys.readouterr().err == f"bench.py: error: --out '{tmp_path}' is a directory: expected the path of a JSON file\n"
