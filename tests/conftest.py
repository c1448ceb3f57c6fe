import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel

# Tests use tiny tensors: extra threads only add synchronisation, which is very slow on a busy machine.
torch.set_num_threads(1)


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
