"""`--help` works for every subcommand; bad arguments give ONE line on stderr and exit 2."""

from __future__ import annotations

import subprocess

import pytest

from dist_cautious.cli import main
from cli_helpers import PYTHON, REPO, launch_env

SUBCOMMANDS = ["report", "train", "memory", "bench"]


@pytest.mark.parametrize("argv", [["--help"]] + [[name, "--help"] for name in SUBCOMMANDS])
def test_help(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: dist-cautious")
    if argv[0] == "train":
        for option in ("--optimizer", "--backend", "--nproc", "--steps"):
            assert option in out


BAD = [
    ([], "required"),
    (["fly"], "invalid choice"),
    (["train", "--steps", "0"], "positive integer"),
    (["train", "--steps", "x"], "positive integer"),
    (["train", "--optimizer", "sgd"], "unknown optimizer 'sgd'; accepted names"),
    (["train", "--lr", "-1"], ">= 0"),
    (["train", "--lr", "nan"], ">= 0"),
    (["train", "--width", "30", "--heads", "4"], "divisible by heads"),
    (["train", "--backend", "single", "--nproc", "2"], "one process"),
    (["--local_rank=1", "train", "--backend", "single", "--nproc", "2"], "one process"),  # deepspeed launcher's flag is accepted
    (["train", "--global-batch", "3", "--nproc", "2"], "divisible"),
    (["train", "--precision", "bf16", "--backend", "ddp"], "fsdp2"),
    (["train", "--context", "1000", "--corpus-bytes", "4096", "--backend", "single"], "shorter than context"),
    (["memory", "--model", "gpt5"], "unknown model"),
    (["memory", "--model", "/nonexistent/config.json"], "does not exist"),
    (["memory", "--world-size", "4", "--rank", "4"], "not a rank"),
    (["memory", "--offload", "all", "--sharding", "zero2"], "zero3 or fsdp"),
    (["memory", "--measure", "--measure-width", "30"], "divisible by 4"),
    (["bench"], "required"),
]


@pytest.mark.parametrize("argv,fragment", BAD, ids=[" ".join(argv) or "<none>" for argv, _ in BAD])
def test_bad_arguments_one_line(argv: list[str], fragment: str, capsys: pytest.CaptureFixture[str]) -> None:
    try:
        code = main(argv)
    except SystemExit as exit_info:
        code = exit_info.code
    assert code == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("dist-cautious") and "error:" in lines[0]
    assert fragment in lines[0]
    assert "Traceback" not in captured.err + captured.out


def test_bad_hf_config(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "config.json"
    config.write_text('{"model_type": "llama", "vocab_size": 100, "hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2}')
    assert main(["memory", "--model", str(config)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "intermediate_size" in err[0]


def test_real_entry_point_has_no_traceback() -> None:
    """The same through a real interpreter: what a user sees from the console script."""
    result = subprocess.run(
        [PYTHON, "-m", "dist_cautious.cli", "train", "--optimizer", "sgd"],
        cwd=REPO, env=launch_env(), capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.stderr


def test_memory_estimate_prints_a_row_per_optimizer(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["memory", "--model", "gpt2-124m", "--world-size", "1", "4", "--optimizer", "adamw", "lion"]) == 0
    out = capsys.readouterr().out
    assert "124,439,808 params" in out
    rows = [line for line in out.splitlines() if line.startswith("| adamw") or line.startswith("| lion")]
    assert len(rows) == 4


def test_report_lists_kernels(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report"]) == 0
    out = capsys.readouterr().out
    for key in ("torch", "cpu kernels", "torch.distributed", "DIST_CAUTIOUS_KERNELS"):
        assert key in out


def test_bench_dispatches_remaining_arguments(monkeypatch: pytest.MonkeyPatch) -> None:
    """`bench cpu ARGS` calls dist_cautious.bench.cpu_step.main(ARGS) and returns its status."""
    import sys
    import types

    seen = []
    fake = types.ModuleType("dist_cautious.bench.cpu_step")
    fake.main = lambda argv: seen.append(argv) or 3
    monkeypatch.setitem(sys.modules, "dist_cautious.bench.cpu_step", fake)
    assert main(["bench", "cpu", "--steps", "2", "--help"]) == 3
    assert seen == [["--steps", "2", "--help"]]


def test_bench_missing_module_is_one_line(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "dist_cautious.bench.gpu_step", None)  # import raises ModuleNotFoundError
    assert main(["bench", "gpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not in this build" in err[0]


def test_train_takes_timm_names_and_cautious_weight_decay(monkeypatch: pytest.MonkeyPatch) -> None:
    """``--optimizer CADAMW`` is cautious-adamw; ``--cautious-weight-decay`` reaches the optimizer's
    groups (the plain-torch backends) and the DeepSpeed config's params."""
    from dist_cautious import cli
    from dist_cautious.train import loop

    seen: dict = {}
    parser_args = ["train", "--optimizer", "CADAMW", "--cautious-weight-decay", "--backend", "single", "--steps", "1"]
    config = cli._train_config(cli.build_parser().parse_args(parser_args))
    assert config.optimizer == "cautious-adamw" and config.cautious_weight_decay
    real = loop.make_optimizer

    def recording(*args, **kwargs):
        seen["optimizer"] = real(*args, **kwargs)
        return seen["optimizer"]

    monkeypatch.setattr(loop, "make_optimizer", recording)
    small = dict(global_batch=2, context=8, width=16, layers=1, heads=2, corpus_bytes=8192, eval_batches=1, progress=False)
    loop.train(loop.TrainConfig(**{**config.__dict__, **small}))
    groups = seen["optimizer"].param_groups
    assert all(group["cautious_weight_decay"] and group["cautious"] for group in groups)
    params = loop.deepspeed_config(loop.TrainConfig(optimizer="lion", cautious_weight_decay=True), 2, 1e-3)["optimizer"]["params"]
    assert params["cautious_weight_decay"] is True
    assert "cautious_weight_decay" not in loop.deepspeed_config(loop.TrainConfig(optimizer="lion"), 2, 1e-3)["optimizer"]["params"]
