import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel

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
