"""``segrl bench gpu`` runs on the CPU at the tiny shape (its dry run) and prints every figure
it promises, with ratios that follow from the figures next to them."""

from __future__ import annotations

import json
import re

import pytest
import torch

from segrl.programs import bench_gpu

FIELDS = {
    "rollout": ("segrl_tok_s", "generate_tok_s", "speedup", "segrl_peak_gib", "generate_peak_gib"),
    "treepo": ("independent_s", "tree_s", "decoded_token_saving", "wall_saving", "saving_ratio", "peak_gib"),
    "grpo": ("segrl_s", "trl_s", "speedup", "segrl_peak_gib", "trl_peak_gib"),
}
CPU_ONLY = pytest.mark.skipif(torch.cuda.is_available(), reason="the dry run is the CPU's; on CUDA the real sizes take minutes")


def _run(tmp_path, capsys, sections: str) -> tuple[dict[str, str], dict]:
    out = tmp_path / "gpu.json"
    assert bench_gpu.main(["--repeats", "1", "--sections", sections, "--json", str(out)]) == 0
    text = capsys.readouterr().out
    lines = {ln.split(" (")[0]: ln for ln in text.strip().splitlines()[-1 - sections.count(",") - 1 :]}
    assert lines["segrl bench gpu: cpu"].startswith("segrl bench gpu: cpu (dry run at tiny sizes) | model tiny")
    for sec in sections.split(","):
        for f in FIELDS[sec]:
            assert re.search(rf"\b{f} ", lines[sec]), (sec, f)
    return lines, json.loads(out.read_text())


@CPU_ONLY
def test_bench_gpu_dry_run_prints_rollout_and_treepo_figures(tmp_path, capsys):
    _, res = _run(tmp_path, capsys, "rollout,treepo")
    r = res["rollout"]
    assert r["speedup"] == pytest.approx(r["segrl_tok_s"] / r["generate_tok_s"])
    t = res["treepo"]
    assert 0 < t["decoded_token_saving"] < 1  # the tree decodes its shared prefixes once
    assert t["saving_ratio"] == pytest.approx(t["wall_saving"] / t["decoded_token_saving"])
    assert t["wall_saving"] == pytest.approx(1 - t["tree_s"] / t["independent_s"])
    assert res["params_m"] < 10 and r["segrl_peak_gib"] is None  # tiny shape, no GPU memory on the CPU


@CPU_ONLY
@pytest.mark.slow
def test_bench_gpu_dry_run_prints_the_grpo_comparison(tmp_path, capsys):
    _, res = _run(tmp_path, capsys, "grpo")
    g = res["grpo"]
    assert g["speedup"] == pytest.approx(g["trl_s"] / g["segrl_s"])


def test_shipped_tokenizer_is_the_real_vocabulary(tmp_path):
    from transformers import AutoTokenizer

    bench_gpu.write_tokenizer(tmp_path)
    tok = AutoTokenizer.from_pretrained(str(tmp_path), local_files_only=True)
    assert len(tok) == 49152 and tok.eos_token == "<|im_end|>"
    assert tok.decode(tok("What is 7 + 5?")["input_ids"]) == "What is 7 + 5?"
