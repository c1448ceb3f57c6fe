import contextlib
import io
import math

import pytest
import torch
from transformers import (
    BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel, RobertaConfig, RobertaForSequenceClassification,
)

from c3a.functional import circulant_matrix

# Tests use tiny tensors: extra threads only add synchronisation, which is very slow on a busy machine.
torch.set_num_threads(1)


def saved_activations(call, like: torch.Tensor) -> list[torch.Tensor]:
    """Tensors at least as large as ``like`` that ``call()`` saves for backward (what it keeps of the activations)."""
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        call()
    return [t for t in saved if t.numel() >= like.numel()]


UNIT_ROUNDOFF = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
ROUNDINGS = {"forward": 6, "grad_x": 6, "grad_k": 6}


def half_tol(dtype, what, reduction):
    """Normwise tolerance of the DFT path (tests/test_functional_half.py derives it): roundings × 2√2·u plus the
    fp32 accumulation over a reduction of length ``reduction``."""
    return ROUNDINGS[what] * 2 * math.sqrt(2) * UNIT_ROUNDOFF[dtype] + reduction * 2.0**-24


def rel_err(actual, expected):
    return ((actual.double() - expected).norm() / expected.norm()).item()


def dense_reference(result, x, kernels, grad):
    """float64 dense: ``result + Σ x @ C(k)ᵀ`` and its gradients, from the very same (rounded) inputs."""
    x64 = x.detach().double().requires_grad_()
    ks64 = [k.detach().double().requires_grad_() for k in kernels]
    y = result.detach().double() + sum(x64 @ circulant_matrix(k).T for k in ks64)
    y.backward(grad.double())
    return y.detach(), x64.grad, [k.grad for k in ks64]


@pytest.fixture
def fit_trainer_args(monkeypatch) -> list:
    """The TrainingArguments of every fit the command under test runs, in order (a spy on the shared trainer)."""
    from c3a.experiments import train

    seen, real = [], train.fit

    def spy(*args, **kwargs):
        result = real(*args, **kwargs)
        seen.append(result.trainer.args)
        return result

    monkeypatch.setattr(train, "fit", spy)
    return seen


def grouped_by_length(args) -> bool:
    """Whether TrainingArguments batch by length (``train_sampling_strategy`` in transformers ≥ 5, else the flag)."""
    return getattr(args, "train_sampling_strategy", None) == "group_by_length" or getattr(args, "group_by_length", False)


@pytest.fixture
def tiny_bert():
    """A 2-layer BERT classifier (hidden 32), random weights, eval mode: no download."""
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48,
        max_position_embeddings=64, num_labels=3,
    )
    return BertForSequenceClassification(config).eval()


@pytest.fixture
def tiny_gpt2():
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=2, n_positions=64)
    return GPT2LMHeadModel(config).eval()


@pytest.fixture
def token_ids():
    return torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(0))


def write_tiny_llama(root, corpus, **config):
    """A 2-layer random Llama (hidden 32) and a byte-level BPE tokenizer trained on ``corpus``, saved in ``root``
    as a local model folder (what a hub id resolves to)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, set_seed

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<pad>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator(corpus, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    set_seed(0)
    settings = dict(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    tokenizer.save_pretrained(root)
    LlamaForCausalLM(LlamaConfig(**{**settings, **config})).save_pretrained(root)
    return root


def run_cli(*argv) -> str:
    """``c3a ARGV`` run in-process (errors raise); its stdout."""
    from c3a.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(list(argv)) == 0
    return out.getvalue()


def kernel_from_spectrum(spectrum: torch.Tensor, b: int) -> torch.Tensor:
    """Real kernel (m, n, b) whose real-FFT blocks are ``spectrum`` (F, m, n)."""
    return torch.fft.irfft(spectrum.permute(1, 2, 0), n=b, dim=-1)


def low_rank_kernel(m, n, b, ranks, seed=0) -> torch.Tensor:
    """A kernel whose frequency block f (real FFT) has rank ranks[f]; DC and Nyquist blocks stay real."""
    g = torch.Generator().manual_seed(seed)
    blocks = []
    for f, r in enumerate(ranks):
        real = f == 0 or (b % 2 == 0 and f == b // 2)
        dtype = torch.float64 if real else torch.complex128
        blocks.append(torch.randn(m, r, dtype=dtype, generator=g) @ torch.randn(r, n, dtype=dtype, generator=g))
    return kernel_from_spectrum(torch.stack([x.to(torch.complex128) for x in blocks]), b)


def tiny_roberta(seed=0, labels=2):
    torch.manual_seed(seed)
    config = RobertaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=64, max_position_embeddings=40, num_labels=labels)
    return RobertaForSequenceClassification(config).eval()
