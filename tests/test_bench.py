import json

import pytest
from transformers import RobertaConfig

from c3a.cli import main
import torch

from c3a.experiments.bench import Spec, _add_ratios, build_model, operator_grid, operator_table


def test_spec_parse_and_label():
    assert Spec.parse("c3a:128") == Spec("c3a", 128) and Spec.parse("c3a:128").label == "c3a (b=128)"
    assert Spec.parse("lora:8").label == "lora (r=8)"
    assert Spec.parse("bitfit") == Spec("bitfit") and Spec.parse("bitfit").label == "bitfit"


def test_ratios_are_paired_per_round():
    rows = [
        {"method": "lora", "step_seconds": [1.0, 2.0, 4.0], "peak_memory_bytes": 100},
        {"method": "c3a", "step_seconds": [0.9, 1.8, 3.6], "peak_memory_bytes": 90},
    ]
    _add_ratios(rows, "step_seconds")
    assert rows[1]["ratio_to_lora"] == pytest.approx(0.9)  # noisy rounds cancel out in paired ratios
    assert rows[1]["ratio_to_lora_iqr"] == pytest.approx([0.9, 0.9])
    assert rows[1]["median_ms"] == pytest.approx(1800)
    assert rows[1]["memory_ratio_to_lora"] == pytest.approx(0.9)


def test_ratios_pair_compiled_rows_with_compiled_lora():
    rows = [
        {"method": "lora", "compiled": False, "step_seconds": [2.0, 4.0], "peak_memory_bytes": 100},
        {"method": "c3a", "compiled": False, "step_seconds": [2.2, 4.4], "peak_memory_bytes": 100},
        {"method": "lora", "compiled": True, "step_seconds": [1.0, 2.0], "peak_memory_bytes": 50},
        {"method": "c3a", "compiled": True, "step_seconds": [0.9, 1.8], "peak_memory_bytes": 40},
    ]
    _add_ratios(rows, "step_seconds")
    assert [r["ratio_to_lora"] for r in rows] == pytest.approx([1.0, 1.1, 1.0, 0.9])
    assert rows[3]["memory_ratio_to_lora"] == pytest.approx(0.8)


@pytest.fixture
def tiny_roberta_dir(tmp_path):
    config = RobertaConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128)
    config.save_pretrained(tmp_path / "tiny")
    return str(tmp_path / "tiny")


def test_bench_smoke(tmp_path, tiny_roberta_dir):
    out = tmp_path / "bench"
    args = [
        "bench", "--model", tiny_roberta_dir, "--methods", "frozen,lora:4,c3a:32", "--batch", "2", "--seq", "16",
        "--warmup", "1", "--rounds", "2", "--threads", "1", "--operator", "--op-shapes", "64x64",
        "--op-blocks", "32", "--op-tokens", "8", "--op-reps", "1", "--out", str(out),
    ]
    assert main(args) == 0
    result = json.loads((out / "results.json").read_text())
    labels = [m["label"] for m in result["methods"]]
    assert labels == ["frozen", "lora (r=4)", "c3a (b=32)"]
    by = {m["method"]: m for m in result["methods"]}
    assert by["frozen"]["trainable_params"] == 0
    assert by["c3a"]["trainable_params"] == 2 * 2 * (64 * 64 // 32)  # 2 layers x (query, value)
    assert by["lora"]["trainable_params"] == 2 * 2 * 4 * (64 + 64)
    for m in result["methods"]:
        assert len(m["step_seconds"]) == 2 and m["median_ms"] > 0 and m["peak_memory_bytes"] > 0
        assert m["memory_kind"] == "cpu_peak_rss"
    assert by["lora"]["ratio_to_lora"] == 1.0
    (op,) = result["operator"]
    assert (op["d_in"], op["block_size"], op["tokens"]) == (64, 32, 8)
    assert set(op["ms"]) == {"frozen", "lora", "peft_c3a", "c3a", "c3a_fft", "c3a_fold"}  # fp32: no DFT path
    assert max(op["check_rel_err"].values()) < 1e-5
    assert "| c3a (b=32) |" in (out / "table.md").read_text()
    assert (out / "bench.png").read_bytes()[:4] == b"\x89PNG"


def test_operator_grid_half_precision_autocast():
    """bf16 weights under autocast: LoRA with fp32 and with bf16 adapters, PEFT's C3A, and each C³A path (the
    DFT path only for even b), every path first checked against float64."""
    rows = operator_grid("cpu", torch.bfloat16, [(40, 80)], [8, 5], [16], reps=2, warmup=1, lora_rank=4, autocast=True)
    even, odd = rows
    assert set(even["ms"]) == {"frozen", "lora", "lora_half", "peft_c3a", "c3a", "c3a_dft", "c3a_dense", "c3a_fft"}
    assert set(odd["ms"]) == {"frozen", "lora", "lora_half", "peft_c3a", "c3a", "c3a_dense", "c3a_fft"}
    assert even["lora_rank"] == 4 and even["adapter_ratio_to_lora"]["lora"] == 1.0
    assert max(even["check_rel_err"].values()) < 17 * 2**-8 and max(odd["check_rel_err"].values()) < 17 * 2**-8
    assert even["peak_extra_mib"]["c3a"] is None  # measured on CUDA only
    table = operator_table(rows)
    assert "C³A DFT-GEMM" in table and "under bf16 autocast" in table


def test_half_adapter_spec_keeps_trainable_weights_in_bf16(tiny_roberta_dir):
    net = build_model(tiny_roberta_dir, Spec.parse("lora-bf16:4"), 1, torch.bfloat16, "cpu")
    trainable = [p for p in net.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.bfloat16 for p in trainable)
    default = build_model(tiny_roberta_dir, Spec.parse("lora:4"), 1, torch.bfloat16, "cpu")
    assert all(p.dtype == torch.float32 for p in default.parameters() if p.requires_grad)  # PEFT's default


@pytest.mark.parametrize("argv, message", [
    (["--rounds", "0"], "--rounds: 0 must be a positive integer"),
    (["--methods", ","], "nothing to run"),
    (["--methods", "dora"], "unknown method 'dora'"),
    (["--methods", "lora:x"], "positive integer"),
    (["--methods", "", "--operator", "--op-shapes", "768"], "IN_xOUT"),
    (["--methods", "lora:8", "--model", "/no/such/model-folder"], "neither a built-in model"),
])
def test_bench_rejects_bad_options_before_any_worker(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) if argv[0] == "--rounds" else pytest.raises(ValueError, match=message):
        main(["bench", "--out", str(tmp_path / "b"), *argv])
    assert not (tmp_path / "b").exists()
    if argv[0] == "--rounds":
        assert message in capsys.readouterr().err


def test_gpu_script_commands_parse():
    """benchmarks/gpu.sh runs only on a GPU machine, never in CI: at least its `c3a bench` lines must stay valid
    for the current argument set (a renamed option would otherwise surface only on the next lent GPU)."""
    import argparse
    import pathlib
    import shlex

    from c3a.experiments.bench_cli import add_bench_arguments

    script = (pathlib.Path(__file__).parents[1] / "benchmarks" / "gpu.sh").read_text().replace("\\\n", " ")
    commands = [shlex.split(line)[2:] for line in script.splitlines() if line.startswith("c3a bench ")]
    assert len(commands) == 4
    for argv in commands:
        parser = argparse.ArgumentParser(exit_on_error=False)
        add_bench_arguments(parser)
        args = parser.parse_args(argv)
        assert args.device == "cuda" and args.out.startswith("$out/")


def test_bench_compile_times_eager_and_compiled_side_by_side(tmp_path, tiny_roberta_dir):
    out = tmp_path / "bench"
    args = ["bench", "--model", tiny_roberta_dir, "--methods", "lora:4,c3a:32", "--batch", "2", "--seq", "8",
            "--warmup", "2", "--rounds", "1", "--threads", "1", "--compile", "--out", str(out)]
    assert main(args) == 0
    result = json.loads((out / "results.json").read_text())
    assert result["compile"] is True
    rows = [(m["label"], m["compiled"], m["ratio_to_lora"]) for m in result["methods"]]
    assert [r[:2] for r in rows] == [("lora (r=4)", False), ("c3a (b=32)", False),
                                     ("lora (r=4), compiled", True), ("c3a (b=32), compiled", True)]
    assert rows[0][2] == rows[2][2] == 1.0  # each mode against its own LoRA
    assert "torch.compile" in (out / "table.md").read_text()


def test_bench_compile_refuses_too_few_warmup_steps(tmp_path, tiny_roberta_dir):
    args = ["bench", "--model", tiny_roberta_dir, "--methods", "lora:4", "--warmup", "1", "--compile",
            "--out", str(tmp_path / "bench")]
    with pytest.raises(ValueError, match=r"--compile needs --warmup of at least 2 \(the first steps compile\), got 1"):
        main(args)
    assert not (tmp_path / "bench").exists()  # refused before any worker started


def test_bench_serve_mixed_batches_over_adapter_counts(tmp_path, capfd):
    from transformers import LlamaConfig

    LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=1, architectures=["LlamaForCausalLM"]).save_pretrained(tmp_path / "llama")
    out = tmp_path / "serve"
    assert main(["bench", "--model", str(tmp_path / "llama"), "--serve", "1,4", "--serve-methods", "frozen,lora:4,c3a:16",
                 "--serve-batch", "6", "--seq", "8", "--warmup", "1", "--rounds", "1", "--threads", "1",
                 "--out", str(out)]) == 0
    result = json.loads((out / "results.json").read_text())
    assert result["methods"] == [] and result["serve_batch"] == 6
    rows = [(r["method"], r["adapters"], r["distinct_in_batch"]) for r in result["serve"]]
    assert rows == [("frozen", 0, 0), ("lora", 1, 1), ("c3a", 1, 1), ("frozen", 0, 0), ("lora", 4, 4), ("c3a", 4, 4)]
    by = {(r["method"], r["adapters"]): r for r in result["serve"]}
    # every adapter is resident: weights grow with N (c3a: one layer's q/v kernels, 32·32/16 + 32·16/16 fp32 each)
    assert by["c3a", 4]["adapter_bytes"] == 4 * by["c3a", 1]["adapter_bytes"] == 4 * 4 * (64 + 32)
    for r in result["serve"]:
        assert r["forward_ms"] > 0 and r["generate_tokens_per_s"] > 0
    assert by["lora", 4]["forward_ratio_to_lora"] == 1.0
    assert (out / "serve.png").stat().st_size > 0 and "| c3a (b=16) | 4 | 4 |" in (out / "table.md").read_text()
    assert "Warning" not in capfd.readouterr().err  # the spawned workers quiet what the command quiets


def test_bench_serve_refuses_methods_that_cannot_route_rows(tmp_path, tiny_roberta_dir):
    with pytest.raises(ValueError, match=r"--serve-methods: vera \(r=8\): choose from frozen, lora:RANK, c3a:BLOCK_SIZE"):
        main(["bench", "--model", tiny_roberta_dir, "--serve", "2", "--serve-methods", "lora:4,vera:8",
              "--out", str(tmp_path / "serve")])
    assert not (tmp_path / "serve").exists()


def test_bench_bad_inputs_are_user_errors_before_the_run(tmp_path, tiny_roberta_dir):
    common = ["bench", "--model", tiny_roberta_dir, "--batch", "1", "--seq", "4", "--warmup", "0", "--rounds", "1"]
    # a block size that fits no layer: the worker's ValueError comes back as one (a user error), naming the method
    with pytest.raises(ValueError, match=r"c3a \(b=7\): ValueError: block size 7 does not fit 4 layer\(s\) of 64→64"):
        main([*common, "--methods", "c3a:7", "--out", str(tmp_path / "a")])
    with pytest.raises(ValueError, match="--op-blocks 7: no block size divides both sides of any --op-shapes 64x64"):
        main([*common, "--methods", "", "--operator", "--op-shapes", "64x64", "--op-blocks", "7", "--out", str(tmp_path / "b")])
    (tmp_path / "file").write_text("")
    with pytest.raises(NotADirectoryError, match="--out .*file is a file; expected a folder"):
        main([*common, "--methods", "lora:4", "--out", str(tmp_path / "file")])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "tiny"]  # nothing written by the refused runs
