"""The demo and the examples as a new user meets them on a CPU machine: they run for any valid
rank count and end with a line saying what they checked; bad arguments get one-line errors;
every option has a help text; the CUDA-only example says how to launch it instead of failing."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from deep_ep_ops import demo
from deep_ep_ops.local_ranks import gpu_count

ROOT = Path(__file__).resolve().parent.parent


def _run(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


def test_demo_runs_on_three_cpu_ranks(capsys) -> None:
    demo.main(["--ranks", "3", "--tokens", "16", "--repeats", "1", "--backend", "gloo"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("deep_ep_ops demo: 3 ranks (gloo), T=16 tokens/rank, H=128, "
                               "E=12 experts (4/rank), top-2"), lines
    assert [line.split("|")[0].strip() for line in lines[2:5]] == ["0", "1", "2"], lines
    assert lines[-1].startswith("checked: combine(experts(dispatch(x))) equals the dense MoE "
                                "on all 3 ranks"), lines[-1]


BAD_ARGS = [
    (["--tokens", "0"], "argument --tokens: must be >= 1, got 0"),
    (["--ranks", "two"], "argument --ranks: must be an integer, got 'two'"),
    (["--ranks", "3", "--experts", "8"], "--experts 8 must be a multiple of --ranks 3"),
    (["--experts", "4", "--topk", "5"], "--topk 5 must be at most --experts 4"),
    (["--backend", "mpi"], "argument --backend: invalid choice: 'mpi'"),
]
if gpu_count() == 0:
    BAD_ARGS.append((["--backend", "nccl"], "--backend nccl needs CUDA GPUs and this machine "
                                            "has none; use --backend gloo"))


@pytest.mark.parametrize("argv,message", BAD_ARGS, ids=[" ".join(a) for a, _ in BAD_ARGS])
def test_demo_argument_errors_are_one_line(argv, message, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        demo.parse_args(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("python -m deep_ep_ops.demo: error: "), err
    assert message in err, err


def test_demo_options_all_have_help_texts(capsys) -> None:
    parser = demo._parser()
    for action in parser._actions:
        assert action.help, f"{action.option_strings} has no help text"
    with pytest.raises(SystemExit) as exit_info:
        demo.parse_args(["--help"])
    assert exit_info.value.code == 0
    assert "--experts" in capsys.readouterr().out


def test_train_step_example_runs_on_three_cpu_ranks() -> None:
    pytest.importorskip("transformers")
    run = _run("examples/train_step.py", "--ranks", "3", "--steps", "1")
    assert run.returncode == 0, run.stdout + run.stderr
    lines = run.stdout.splitlines()
    assert lines[0].startswith("step 0: loss  rank 0: ") and "rank 2: " in lines[0], lines
    assert lines[-1] == ("checked: 1 step on 3 ranks (gloo), E=12 experts (4 per rank): losses "
                         "finite, replicated parameters identical on every rank"), lines


def test_train_step_example_rejects_bad_arguments_in_one_line() -> None:
    run = _run("examples/train_step.py", "--ranks", "0")
    assert run.returncode == 2 and run.stderr == (
        "python examples/train_step.py: error: argument --ranks: must be >= 1, got 0 "
        "(--help lists the options)\n"), run.stderr


@pytest.mark.skipif(gpu_count() > 0, reason="checks the message of a machine without GPUs")
def test_decode_example_without_gpus_says_what_it_needs() -> None:
    run = _run("examples/decode_cuda_graph.py")
    assert run.returncode == 1 and run.stdout == "", run
    assert run.stderr == ("examples/decode_cuda_graph.py captures CUDA graphs and needs CUDA "
                          "GPUs; this machine has none. On a GPU machine: python "
                          "examples/decode_cuda_graph.py [--ranks R]\n"), run.stderr
