"""Package metadata: segrl installs beside the torch an environment already has (a floor, never
a pin), optional parts are extras, and ``pip install 'segrl[vllm]'`` resolves against the
package index (checked with ``pip install --dry-run``; skipped when the index is unreachable)."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def _reqs(items) -> dict[str, Requirement]:
    return {r.name: r for r in map(Requirement, items)}


def test_torch_is_a_floor_not_a_pin():
    torch = _reqs(PROJECT["dependencies"])["torch"]
    assert [s.operator for s in torch.specifier] == [">="], torch  # a CUDA environment keeps its torch
    assert torch.specifier.contains("2.13.0") and torch.specifier.contains("2.11.0+cu130") and torch.specifier.contains("3.0")


def test_transformers_floor_admits_the_releases_vllm_accepts():
    tf = _reqs(PROJECT["dependencies"])["transformers"]
    assert all(tf.specifier.contains(v) for v in ("5.16.1", "5.20.2", "5.22.2", "5.25.0"))  # vLLM 0.32-0.34 and the newest
    import transformers

    assert tf.specifier.contains(transformers.__version__)


def test_extras_hold_what_the_optional_commands_need():
    extras = {k: _reqs(v) for k, v in PROJECT["optional-dependencies"].items()}
    assert "trl" in extras["bench"]  # segrl bench trl
    assert {"gguf", "accelerate"} <= set(extras["gguf"])  # transformers reads GGUF with both
    assert "peft" in extras["peft"] and "vllm" in extras["vllm"]


def _pip(*args: str, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True, timeout=timeout)


def test_the_vllm_extra_resolves(tmp_path):
    """What `pip install 'segrl[vllm]'` would install into a fresh environment (about a minute:
    pip fetches the metadata of vLLM's dependencies; part of the README's test command, so CI
    checks it)."""
    try:
        probe = _pip("install", "--dry-run", "--no-deps", "--ignore-installed", "--quiet", "vllm", timeout=180)
    except subprocess.TimeoutExpired:
        pytest.skip("package index unreachable (timed out)")
    if probe.returncode != 0:
        pytest.skip(f"package index unreachable: {probe.stderr.strip().splitlines()[-1:]}")
    report = tmp_path / "report.json"
    try:
        r = _pip("install", "--dry-run", "--ignore-installed", "--quiet", "--report", str(report), f"{REPO}[vllm]", timeout=1200)
    except subprocess.TimeoutExpired:
        pytest.skip("package index too slow: no answer in 20 minutes")
    assert r.returncode == 0, r.stderr[-3000:]
    got = {i["metadata"]["name"].lower(): i["metadata"]["version"] for i in json.loads(report.read_text())["install"]}
    assert "vllm" in got and "segrl" in got
    assert Version(got["transformers"]) >= Version("5.16.1")


def test_the_kv_cache_is_passed_under_the_installed_transformers_name():
    """transformers 5.24 renamed ``past_key_values`` to ``cache``; under the other name the
    cache is silently ignored. A forward through segrl.hf_compat must fill the cache passed."""
    import inspect

    import torch
    from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, LlamaModel

    from segrl.hf_compat import CACHE_ARG, cache_kw, output_cache

    assert CACHE_ARG in inspect.signature(LlamaModel.forward).parameters
    cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    model = LlamaForCausalLM(cfg).eval()
    cache = DynamicCache(config=cfg)
    with torch.no_grad():
        out = model(input_ids=torch.tensor([[1, 2, 3]]), use_cache=True, **cache_kw(cache))
    assert cache.get_seq_length() == 3 and output_cache(out) is cache
