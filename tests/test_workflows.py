"""PEFT habits with c3a imported: Trainer with default arguments, TRL, AutoPeftModel, mixed-adapter batches,
QLoRA-style bitsandbytes bases. Tiny random models in local folders (what a hub id resolves to), CPU only."""

import os

import pytest
import torch
from datasets import Dataset
from peft import AutoPeftModelForCausalLM, PeftModel, get_peft_model, get_peft_model_state_dict, prepare_model_for_kbit_training
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForLanguageModeling, Trainer, TrainingArguments

import c3a
from c3a import C3AConfig, C3ALinear
from c3a.layer import c3a_layers
from conftest import write_tiny_llama

CORPUS = [f"the circulant kernel number {i} mixes {i % 7} blocks" for i in range(64)]
QV = ["q_proj", "v_proj"]


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return write_tiny_llama(tmp_path_factory.mktemp("llama") / "model", CORPUS)


@pytest.fixture(scope="module")
def wide_llama_dir(tmp_path_factory):  # bitsandbytes' CPU 4-bit inference needs in_features >= its block size 64
    return write_tiny_llama(tmp_path_factory.mktemp("wide") / "model", CORPUS, hidden_size=64, intermediate_size=128)


@pytest.fixture(scope="module")
def tied_llama_dir(tmp_path_factory):
    return write_tiny_llama(tmp_path_factory.mktemp("tied") / "model", CORPUS, tie_word_embeddings=True)


def _lm_data(path, n=32):
    tokenizer = AutoTokenizer.from_pretrained(path)
    rows = tokenizer(CORPUS[:n], truncation=True, max_length=24)
    # an extra text column, as datasets usually have: the Trainer must drop what the model does not take
    return tokenizer, Dataset.from_dict({**rows, "text": CORPUS[:n]})


def _adapter_weights(checkpoint) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(checkpoint, "adapter_model.safetensors"))


def _adapter_weights_of(model) -> dict[str, torch.Tensor]:
    """The model's adapter as a checkpoint holds it (PEFT's key names)."""
    return {k: v.detach().cpu() for k, v in get_peft_model_state_dict(model).items()}


def _trainer_args(out, **kwargs):
    defaults = dict(per_device_train_batch_size=8, num_train_epochs=2, report_to="none", use_cpu=True, disable_tqdm=True)
    return TrainingArguments(output_dir=str(out), **{**defaults, **kwargs})


@pytest.mark.parametrize("tied", [False, True])
def test_trainer_checkpoints_are_adapter_only_and_resume_and_best_reload(llama_dir, tied_llama_dir, tmp_path, tied):
    path = tied_llama_dir if tied else llama_dir
    tokenizer, data = _lm_data(path)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(path), C3AConfig(block_size=16, target_modules=QV))
    # "best" is the epoch with the highest validation loss (training lowers it): the first, not the last, so that
    # load_best_model_at_end has something to put back
    args = _trainer_args(tmp_path, eval_strategy="epoch", save_strategy="epoch", load_best_model_at_end=True,
                         metric_for_best_model="eval_loss", greater_is_better=True)
    collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)
    trainer = Trainer(model=model, args=args, train_dataset=data, eval_dataset=data.select(range(8)), data_collator=collator)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    trainer.train()
    assert "eval_loss" in trainer.evaluate()
    checkpoints = sorted((d for d in os.listdir(tmp_path) if d.startswith("checkpoint-")), key=lambda d: int(d[11:]))
    assert len(checkpoints) == 2
    assert trainer.state.best_model_checkpoint == str(tmp_path / checkpoints[0])
    saved = [_adapter_weights(tmp_path / c) for c in checkpoints]
    assert any(not torch.equal(saved[0][k], saved[1][k]) for k in saved[0])  # the two epochs differ
    assert _adapter_weights_of(model).keys() == saved[0].keys()
    assert all(torch.equal(v, saved[0][k]) for k, v in _adapter_weights_of(model).items())  # the best put back
    for checkpoint in checkpoints:
        files = set(os.listdir(tmp_path / checkpoint))
        assert {"adapter_model.safetensors", "adapter_config.json"} <= files
        assert not files & {"model.safetensors", "pytorch_model.bin"}  # the base model is never written
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters() if n in before)
    trainer.save_model(str(tmp_path / "final"))
    assert not os.path.exists(tmp_path / "final" / "model.safetensors")
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(path), tmp_path / "final")
    ids = torch.tensor([data[0]["input_ids"]])
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, model(input_ids=ids).logits)
    # resume from the first checkpoint: a fresh model, a fresh trainer, the same end state
    fresh = get_peft_model(AutoModelForCausalLM.from_pretrained(path), C3AConfig(block_size=16, target_modules=QV))
    resumed = Trainer(model=fresh, args=args, train_dataset=data, eval_dataset=data.select(range(8)), data_collator=collator)
    resumed.train(resume_from_checkpoint=str(tmp_path / checkpoints[0]))
    assert resumed.state.global_step == trainer.state.global_step
    # the second epoch again, from the first's weights, optimizer and data order: the same weights (one thread,
    # the same operations in the same order), and the same best checkpoint put back
    assert all(torch.equal(v, saved[1][k]) for k, v in _adapter_weights(tmp_path / checkpoints[1]).items())
    assert all(torch.equal(v, saved[0][k]) for k, v in _adapter_weights_of(fresh).items())


def test_trainer_seq_cls_with_default_arguments(tiny_bert, tmp_path):
    tiny_bert.train()
    data = Dataset.from_dict({
        "input_ids": torch.randint(1, 100, (24, 9), generator=torch.Generator().manual_seed(0)).tolist(),
        "label": [i % 3 for i in range(24)],
        "sentence": ["unused"] * 24,
    })
    model = get_peft_model(tiny_bert, C3AConfig(block_size=8, target_modules=["query", "value"], task_type="SEQ_CLS"))
    head = model.get_base_model().classifier.modules_to_save["default"].weight.detach().clone()
    trainer = Trainer(model=model, args=TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True,
                                                          max_steps=3, disable_tqdm=True), train_dataset=data)
    trainer.train()
    assert not torch.equal(model.get_base_model().classifier.modules_to_save["default"].weight, head)  # the head trained
    trainer.save_model()
    assert os.path.isfile(tmp_path / "adapter_model.safetensors") and not os.path.exists(tmp_path / "model.safetensors")


def test_trl_sft_trainer_with_our_config(llama_dir, tmp_path):
    trl = pytest.importorskip("trl")
    data = Dataset.from_dict({"text": CORPUS[:16]})
    trainer = trl.SFTTrainer(
        model=str(llama_dir),
        train_dataset=data,
        args=trl.SFTConfig(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, report_to="none",
                           use_cpu=True, disable_tqdm=True, max_length=32),
        peft_config=C3AConfig(block_size=16, target_modules=QV, task_type="CAUSAL_LM"),
        processing_class=AutoTokenizer.from_pretrained(llama_dir),
    )
    assert isinstance(trainer.model, PeftModel) and isinstance(trainer.model.base_model, c3a.C3AModel)
    assert len(c3a_layers(trainer.model)) == 4
    kernel = c3a_layers(trainer.model)[0][1].c3a_kernel["default"]
    before = kernel.detach().clone()
    trainer.train()
    assert not torch.equal(kernel, before)


def test_auto_peft_model_reads_base_model_from_config(llama_dir, tmp_path):
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(llama_dir),
                           C3AConfig(block_size=16, target_modules=QV, init_weights="gaussian", task_type="CAUSAL_LM"))
    model.save_pretrained(tmp_path)
    assert model.peft_config["default"].base_model_name_or_path == str(llama_dir)
    loaded = AutoPeftModelForCausalLM.from_pretrained(tmp_path)
    assert isinstance(loaded.base_model, c3a.C3AModel)
    ids = torch.randint(3, 100, (2, 7))
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits)


def test_mixed_adapter_batches_forward_and_generate(llama_dir):
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(llama_dir),
                           C3AConfig(block_size=16, target_modules=QV, init_weights="gaussian"))
    model.add_adapter("other", C3AConfig(block_size=8, target_modules=QV, init_weights="gaussian"))
    model.eval()
    ids = torch.randint(3, 100, (3, 6), generator=torch.Generator().manual_seed(0))
    names = ["other", "__base__", "default"]
    with torch.no_grad():
        mixed = model(input_ids=ids, adapter_names=names).logits
        alone = {}
        for adapter in ("default", "other"):
            model.set_adapter(adapter)
            alone[adapter] = model(input_ids=ids).logits
        with model.disable_adapter():
            alone["__base__"] = model(input_ids=ids).logits
    for row, name in enumerate(names):
        torch.testing.assert_close(mixed[row], alone[name][row], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(alone["default"], alone["other"])
    generated = model.generate(input_ids=ids, adapter_names=names, max_new_tokens=4, do_sample=False)
    for row, name in enumerate(names):
        if name == "__base__":
            with model.disable_adapter():
                alone_gen = model.generate(input_ids=ids[row:row + 1], max_new_tokens=4, do_sample=False)
        else:
            model.set_adapter(name)
            alone_gen = model.generate(input_ids=ids[row:row + 1], max_new_tokens=4, do_sample=False)
        assert torch.equal(generated[row], alone_gen[0])
    with pytest.raises(ValueError, match="nope"):
        model(input_ids=ids, adapter_names=["nope", "default", "default"])
    model.train()
    with pytest.raises(ValueError, match="inference"):
        model(input_ids=ids, adapter_names=names)


@pytest.mark.parametrize("bits", [8, 4])
def test_bitsandbytes_base_trains_saves_loads_merges(wide_llama_dir, tmp_path, bits):
    llama_dir = wide_llama_dir
    pytest.importorskip("bitsandbytes")
    from transformers import BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_8bit=True) if bits == 8 else BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32)

    def base():
        return AutoModelForCausalLM.from_pretrained(llama_dir, quantization_config=quant, device_map="cpu")

    model = get_peft_model(prepare_model_for_kbit_training(base()), C3AConfig(block_size=16, target_modules=QV))
    layer = c3a_layers(model)[0][1]
    assert isinstance(layer, C3ALinear) and layer.quantization_backend is not None
    assert layer.c3a_kernel["default"].dtype == torch.float32
    tokenizer, data = _lm_data(llama_dir, 16)
    trainer = Trainer(model=model, args=_trainer_args(tmp_path / "run", max_steps=2, per_device_train_batch_size=4),
                      train_dataset=data, data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False))
    before = layer.c3a_kernel["default"].detach().clone()
    trainer.train()  # Trainer accepts a quantized base with adapters attached
    assert not torch.equal(layer.c3a_kernel["default"], before)
    model.save_pretrained(tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(base(), tmp_path / "adapter")
    ids = torch.randint(3, 100, (2, 7), generator=torch.Generator().manual_seed(1))
    model.eval()
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
        torch.testing.assert_close(loaded(input_ids=ids).logits, adapted)
        with model.disable_adapter():
            plain = model(input_ids=ids).logits
        with pytest.warns(UserWarning, match="re-quantized"):
            model.merge_adapter()
        merged = model(input_ids=ids).logits
    # merging really adds the adapter (a silent drop would leave the base's logits), up to re-quantization rounding
    dequantized = layer.get_base_weight().float()
    layer.unmerge()
    assert (dequantized - layer.get_base_weight().float()).abs().max() > 0
    if bits == 8:  # 8-bit rounding is finer than the adapter's effect here; 4-bit (NF4) rounding is not
        assert (merged - adapted).abs().max() < 0.5 * (plain - adapted).abs().max()


def _tiny_c3a():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    model = get_peft_model(net, C3AConfig(block_size=4, target_modules=["0"]))
    with torch.no_grad():
        for _, layer in c3a_layers(model):
            layer.c3a_kernel["default"].normal_()  # not the init: what is saved must be what was trained
    return model


def _base():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))


def test_save_pretrained_writes_only_on_the_main_process(tmp_path):
    """Under DDP every rank calls save_pretrained; only the main one may write (two writers would race)."""
    model = _tiny_c3a()
    model.save_pretrained(tmp_path / "rank1", is_main_process=False)
    assert not (tmp_path / "rank1").exists() or list((tmp_path / "rank1").iterdir()) == []
    model.save_pretrained(tmp_path / "rank0", is_main_process=True)
    x = torch.randn(3, 8)
    with torch.no_grad():
        torch.testing.assert_close(PeftModel.from_pretrained(_base(), tmp_path / "rank0")(x), model(x), rtol=0, atol=0)


def test_push_to_hub_uploads_an_adapter_that_loads(tmp_path, monkeypatch):
    """push_to_hub (PEFT's, through transformers): what would be uploaded, caught at the hub client, is a C3A
    adapter that loads back to the same outputs. No network: the client's repo, card and commit calls are stubbed."""
    import shutil
    import types

    from huggingface_hub import HfApi, ModelCard
    from huggingface_hub.errors import EntryNotFoundError

    uploaded = tmp_path / "uploaded"
    uploaded.mkdir()

    def create_commit(self, repo_id, operations, **kwargs):
        for op in operations:  # the files live in a temporary folder removed after the call: keep copies
            shutil.copy(op.path_or_fileobj, uploaded / op.path_in_repo)
        return types.SimpleNamespace(commit_url=f"https://hub/{repo_id}/commit/1")

    def no_card(cls, repo_id, **kwargs):
        raise EntryNotFoundError(f"{repo_id} has no README.md")

    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kwargs: types.SimpleNamespace(repo_id=repo_id))
    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    monkeypatch.setattr(ModelCard, "load", classmethod(no_card))
    model = _tiny_c3a()
    model.push_to_hub("org/tiny-c3a")
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in uploaded.iterdir()}
    x = torch.randn(3, 8)
    loaded = PeftModel.from_pretrained(_base(), uploaded)
    assert isinstance(loaded.base_model.model[0], C3ALinear)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
