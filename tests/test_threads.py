"""Mixed-adapter batches from several threads on one model: each call routed by its own ``adapter_names``."""

import copy
import random
import threading

import pytest
import torch
from peft import get_peft_model

from c3a import C3AConfig
from c3a.layer import c3a_layers
from c3a.tuner import _ROUTING

NAMES = ["default", "other", "__base__"]


def _two_adapters(base, targets, **extra):
    model = get_peft_model(copy.deepcopy(base), C3AConfig(block_size=8, target_modules=targets, init_weights="gaussian",
                                                          **extra))
    model.add_adapter("other", C3AConfig(block_size=16, target_modules=targets, init_weights="gaussian", **extra))
    return model.eval()


def _hooks(model) -> int:
    return sum(len(m._forward_pre_hooks) for m in model.modules())


def _run_threads(jobs, call):
    """``call(job item)`` for every item of every job, one thread per job, all started together; results by job."""
    results = [[None] * len(job) for job in jobs]
    errors = []
    start = threading.Barrier(len(jobs))

    def work(t):
        start.wait()
        try:
            with torch.no_grad():
                for i, item in enumerate(jobs[t]):
                    results[t][i] = call(item)
        except Exception as e:  # reported below, with the thread's calls
            errors.append(e)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(len(jobs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    return results


def _jobs(rng: random.Random, calls: int, max_rows: int, length: int, low: int = 0, plain: float = 0.0) -> list:
    """Per thread (4), ``calls`` pairs of token ids (1..max_rows rows) and adapter names per row (``None``, a call
    without routing, with probability ``plain``)."""
    jobs = []
    for _ in range(4):
        job = []
        for _ in range(calls):
            rows = rng.randint(1, max_rows)
            ids = torch.randint(low, 100, (rows, length), generator=torch.Generator().manual_seed(rng.randrange(2**31)))
            names = None if plain and rng.random() < plain else [rng.choice(NAMES) for _ in range(rows)]
            job.append((ids, names))
        jobs.append(job)
    return jobs


def _assert_serial(jobs, concurrent, serial) -> None:
    for t, job in enumerate(jobs):
        for i in range(len(job)):
            assert torch.equal(concurrent[t][i], serial[t][i]), (t, i, job[i][1])


def test_concurrent_mixed_batches_give_each_caller_its_serial_result(tiny_bert):
    # modules_to_save: the classifier's copies are routed per row too (PEFT's wrapper, through the same hook)
    model = _two_adapters(tiny_bert, ["query", "value"], modules_to_save=["classifier"])
    with torch.no_grad():
        for name in ("default", "other"):
            model.base_model.model.classifier.modules_to_save[name].weight.normal_()
    jobs = _jobs(random.Random(0), calls=20, max_rows=4, length=7, plain=0.2)  # some plain calls too

    def call(item):
        ids, names = item
        return model(input_ids=ids, adapter_names=names).logits

    with torch.no_grad():
        serial = [[call(item) for item in job] for job in jobs]
    assert len({tuple(names) for job in jobs for _, names in job if names}) > 20  # the rows really differ
    _assert_serial(jobs, _run_threads(jobs, call), serial)
    assert _hooks(model) == 0 and _ROUTING.get() == {}


def test_concurrent_generate_with_different_adapter_names(tiny_gpt2):
    model = _two_adapters(tiny_gpt2, ["c_attn"])
    jobs = _jobs(random.Random(1), calls=3, max_rows=3, length=5, low=1)

    def call(item):
        ids, names = item
        return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), adapter_names=names,
                              max_new_tokens=3, do_sample=False, pad_token_id=0)

    with torch.no_grad():
        serial = [[call(item) for item in job] for job in jobs]
    _assert_serial(jobs, _run_threads(jobs, call), serial)
    assert _hooks(model) == 0


def test_no_routing_left_after_an_exception_inside_the_call(tiny_bert, token_ids):
    model = _two_adapters(tiny_bert, ["query", "value"])
    with torch.no_grad():
        plain = model(input_ids=token_ids).logits
        with pytest.raises(ValueError, match="3 entries for a batch of 2 rows"):
            model(input_ids=token_ids, adapter_names=["other", "default", "other"])
        assert _hooks(model) == 0 and _ROUTING.get() == {}
        assert torch.equal(model(input_ids=token_ids).logits, plain)
        assert all(layer.active_adapters == ["default"] for _, layer in c3a_layers(model))
