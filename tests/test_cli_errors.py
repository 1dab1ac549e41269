"""User mistakes end with one line, ``segrl: ...``, and exit status 2, never a traceback; a
bug still shows its traceback, and ``--debug`` shows it for a user error too.

Each case is the ``segrl`` command in a subprocess, as a user runs it; every one fails before
(or without) loading a model, so each takes a few seconds at most.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from reliability_helpers import env, one_torch_thread, tiny_model_dir  # noqa: F401  (autouse fixture)

REPO_ROOT = env()["PYTHONPATH"].split(":")[0]


def segrl(*args: str, blocked: tuple[str, ...] = (), **env_extra: str) -> subprocess.CompletedProcess:
    """``segrl ARGS`` in a fresh interpreter; modules in ``blocked`` cannot be imported there
    (as if not installed)."""
    code = (
        f"import runpy, sys\nfor m in {list(blocked)!r}: sys.modules[m] = None\n"
        "sys.argv = ['segrl', *sys.argv[1:]]\nrunpy.run_module('segrl.cli', run_name='__main__')"
    )
    cmd = [sys.executable, "-c", code, *args] if blocked else [sys.executable, "-m", "segrl.cli", *args]
    return subprocess.run(cmd, env=env(**env_extra), cwd=REPO_ROOT, capture_output=True, text=True, timeout=180)


def one_line_error(r: subprocess.CompletedProcess, *needles: str, code: int = 2) -> str:
    """Assert ``r`` failed with status ``code`` and a single stderr line holding ``needles``."""
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    lines = r.stderr.strip().splitlines()
    assert r.returncode == code, (r.returncode, r.stderr[-2000:])
    assert len(lines) == 1 and lines[0].startswith("segrl: "), r.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("model"))


def _copy(src, dst, names):
    dst.mkdir(parents=True)
    for n in names:
        (dst / n).write_bytes((src / n).read_bytes())
    return dst


def test_missing_model_path(tmp_path):
    one_line_error(segrl("eval", "--model", str(tmp_path / "nope")), "nope: no such directory", "preset")
    one_line_error(segrl("train", "--model", "./also-not-here"), "also-not-here: no such directory")
    one_line_error(segrl("train", "--model", str(tmp_path)), "has no config.json")


def test_model_id_not_in_the_local_cache(tmp_path):
    r = segrl("eval", "--model", "someone/some-model", HF_HOME=str(tmp_path / "hf"))
    one_line_error(r, "someone/some-model", "not a local directory", "Hugging Face cache", "hf download someone/some-model")


def test_model_dir_without_tokenizer_or_with_only_pytorch_bin(model, tmp_path):
    no_tok = _copy(model, tmp_path / "no-tok", ["config.json", "model.safetensors"])
    one_line_error(segrl("eval", "--model", str(no_tok)), "no tokenizer files", "save_pretrained")
    from safetensors.torch import load_file

    only_bin = _copy(model, tmp_path / "bin", ["config.json", "tokenizer.json", "tokenizer_config.json"])
    torch.save(load_file(model / "model.safetensors"), only_bin / "pytorch_model.bin")
    one_line_error(segrl("train", "--model", str(only_bin)), "no safetensors", "use_safetensors=False).save_pretrained(")


def test_eval_of_a_run_directory(model, tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints" / "step-000003").mkdir(parents=True)
    (run / "config.yaml").write_text("train:\n  max_steps: 3\n")
    _copy(model, run / "checkpoints" / "step-000003" / "model", [p.name for p in model.iterdir()])
    # unfinished: no final_model/, so name its newest checkpoint
    one_line_error(segrl("eval", "--model", str(run)), "without final_model/", "step-000003/model")
    # finished: the run directory means its final_model/
    _copy(model, run / "final_model", [p.name for p in model.iterdir()])
    r = segrl("eval", "--model", str(run), "--eval.num_problems", "2", "--eval.num_samples", "1", "--sampling.max_completion_length", "4")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "pass@1:" in r.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_device_without_cuda():
    line = one_line_error(segrl("train", "--model.device", "cuda"), "model.device=cuda", "--model.device cpu")
    if torch.version.cuda is None:
        assert "this torch build" in line and "has no CUDA" in line
    one_line_error(segrl("eval", "--model.device", "gpu"), "not a torch device")


def test_conversational_prompts_need_a_chat_template(tmp_path):
    rows = [{"prompt": [{"role": "user", "content": f"Q: {a}+1 ="}], "answer": str(a + 1)} for a in range(12)]
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    # the embedded model's character tokenizer has no chat template
    r = segrl("train", "--data.train_file", str(data), "--log.output_dir", str(tmp_path / "run"), "--log.report_to", "none")
    one_line_error(r, "conversational prompts", "chat template")


def test_lora_without_peft():
    one_line_error(segrl("train", "--lora.r", "8", blocked=("peft",)), "lora.r=8", "pip install 'segrl[peft]'")


def test_bench_without_trl_fails_before_any_work():
    r = segrl("bench", blocked=("trl",))
    one_line_error(r, "TRL", "pip install 'segrl[bench]'", "segrl bench sampler")
    one_line_error(segrl("bench", "--model", "default", "trl", "--repeats", "1", blocked=("trl",)), "segrl[bench]")


def test_bench_options_may_come_before_the_benchmark_name():
    """The name picks the benchmark wherever it stands: options before it are not the name."""
    r = segrl("bench", "--repeats", "1", "--batch", "8", "--new-tokens", "2", "sampler", blocked=("trl",))
    assert r.returncode == 0 and "sampler vs model.generate" in r.stdout and "GRPO" not in r.stdout, r.stderr[-2000:]
    r = segrl("bench", "--threads", "1", "treepo", "--help")
    assert r.returncode == 0 and "bench_treepo" in r.stdout and "--new-tokens" not in r.stdout


def test_invalid_config_is_one_line_with_status_2():
    one_line_error(segrl("train", "--train.epsilon", "7"), "invalid config", "train.epsilon")


def test_debug_shows_the_traceback(tmp_path):
    r = segrl("--debug", "eval", "--model", str(tmp_path / "nope"))
    assert r.returncode == 1 and "Traceback" in r.stderr and "ModelLoadError" in r.stderr
    r = segrl("eval", "--model", str(tmp_path / "nope"), "--debug")
    assert "Traceback" in r.stderr
    # a run that fails on its data: one line, or with --debug the traceback
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "1+1", "answer": "2"}\nnot json\n')
    r = segrl("train", "--data.train_file", str(bad), "--log.output_dir", str(tmp_path / "run"))
    assert r.returncode == 1 and "Traceback" not in r.stderr and str(bad) in r.stderr
    r = segrl("--debug", "train", "--data.train_file", str(bad), "--log.output_dir", str(tmp_path / "run"))
    assert "Traceback" in r.stderr and "DatasetError" in r.stderr


def test_a_bug_keeps_its_traceback(monkeypatch):
    """Errors that are not the user's (here a ZeroDivisionError inside a command) propagate."""
    from segrl import cli

    def broken(args, rest):
        return 1 / 0

    monkeypatch.setattr(cli, "cmd_config", broken)
    with pytest.raises(ZeroDivisionError):
        cli.main(["config"])


def test_user_error_in_process_is_a_system_exit_with_the_message(tmp_path, capsys):
    """Library callers of ``main`` get ``SystemExit`` (status 2) whose text is the message."""
    from segrl.cli import main

    with pytest.raises(SystemExit) as e:
        main(["eval", "--model", str(tmp_path / "nope")])
    assert e.value.code == 2 and "no such directory" in str(e.value)
    assert capsys.readouterr().err.startswith("segrl: ")
