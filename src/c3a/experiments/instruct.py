"""Instruction tuning (the paper's Table 3): `c3a sft` fine-tunes a causal LM with one method of the registry
and scores it by greedy generation.

Protocol: train on the train split with the loss on the answer tokens only (the prompt is masked), for
``--epochs`` (the paper: one). The validation split (the dataset's own, else a seeded slice carved from train)
gives a teacher-forced loss every epoch; the epoch with the lowest is kept. Then the test split (``--eval-data``,
else the dataset's test split, else a seeded hold-out of train) is answered by greedy generation and each
answer checked by the format's scorer (:mod:`c3a.experiments.answers`).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

from c3a.argtypes import positive_int
from c3a.experiments.answers import SCORERS, Scorer
from c3a.experiments.jsonl import read_jsonl
from c3a.experiments.methods import METHODS


# -- formats --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Format:
    columns: tuple[str, ...]  # fields every row needs
    prompt: Callable[[dict], str]  # the text the model continues
    target: Callable[[dict], str]  # what it learns to write; also the reference its answers are checked against
    scorer: Scorer
    aliases: dict[str, str] = field(default_factory=dict)  # other datasets' names for the fields

    def check(self, dataset, name: str):
        """``dataset`` with aliased fields renamed; a clear error when a field is missing."""
        renames = {a: c for a, c in self.aliases.items() if a in dataset.column_names and c not in dataset.column_names}
        dataset = dataset.rename_columns(renames) if renames else dataset
        missing = [c for c in self.columns if c not in dataset.column_names]
        if missing:
            known = ", ".join(f"{a}→{c}" for a, c in self.aliases.items())
            raise ValueError(
                f"{name}: fields {missing} missing (has {dataset.column_names}); this format needs {list(self.columns)}"
                + (f" (also accepted: {known})" if known else "")
            )
        return dataset


def _alpaca_prompt(row: dict) -> str:
    context = f"### Input:\n{row['input']}\n\n" if (row.get("input") or "").strip() else ""
    return f"### Instruction:\n{row['instruction']}\n\n{context}### Response:\n"


FORMATS = {
    "gsm8k": Format(
        ("question", "answer"),
        lambda r: f"Question: {r['question']}\nAnswer:\n",
        # calculator annotations (<<48/2=24>>) are not prose; they never change the final number
        lambda r: re.sub(r"<<[^<>]*>>", "", r["answer"]),
        SCORERS["gsm8k"],
    ),
    "metamath": Format(
        ("query", "response"),
        lambda r: f"Solve the problem step by step.\n\n### Problem:\n{r['query']}\n\n### Solution:\n",
        lambda r: r["response"],
        SCORERS["math"],
        aliases={"problem": "query", "solution": "response"},  # the MATH test set's fields
    ),
    "viggo": Format(
        ("target", "meaning_representation"),
        lambda r: (
            "Turn the sentence about a video game into its meaning representation: a dialogue act with "
            f"attribute[value] slots.\n\n### Sentence:\n{r['target']}\n\n### Meaning representation:\n"
        ),
        lambda r: r["meaning_representation"],
        SCORERS["mr"],
    ),
    "sql": Format(
        ("question", "context", "answer"),
        lambda r: f"Write one SQL query that answers the question.\n\n### Tables:\n{r['context']}\n\n### Question:\n{r['question']}\n\n### SQL:\n",
        lambda r: r["answer"],
        SCORERS["sql"],
    ),
    "alpaca": Format(("instruction", "input", "output"), _alpaca_prompt, lambda r: r["output"], SCORERS["text"]),
}


# -- data -----------------------------------------------------------------------------------------------
_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


def load_source(source: str, config: Optional[str] = None):
    """``DatasetDict`` from a hub id or local folder (``datasets.load_dataset``), or from one local
    JSON/JSONL/CSV/Parquet file, which becomes the ``train`` split."""
    from datasets import load_dataset

    if os.path.isfile(source):
        builder = _FILE_BUILDERS.get(os.path.splitext(source)[1].lower())
        if builder is None:
            raise ValueError(f"{source}: data files must be one of {', '.join(_FILE_BUILDERS)}")
        if builder == "json" and source.lower().endswith(".jsonl"):  # bad rows named by file and line
            from datasets import Dataset, DatasetDict

            return DatasetDict(train=Dataset.from_list(read_jsonl(source)))
        return load_dataset(builder, data_files={"train": source})
    return load_dataset(source, config)


def _only_split(raw, name: str):
    """The evaluation split of a separate evaluation source: its test split, else its single split."""
    if "test" in raw:
        return raw["test"]
    if len(raw) == 1:
        return next(iter(raw.values()))
    raise ValueError(f"{name} has splits {list(raw)} and none is called 'test'")


def _carve(dataset, n: int, seed: int, what: str):
    if not 0 < n < len(dataset):
        raise ValueError(f"{what}: {n} rows must be between 1 and {len(dataset) - 1} (train has {len(dataset)} rows)")
    parts = dataset.train_test_split(test_size=n, seed=seed)
    return parts["train"], parts["test"]


def make_splits(raw, fmt: Format, seed: int, eval_raw=None, eval_samples=None, validation_size=None, max_train_samples=None):
    """``train``, ``validation`` and ``test`` (module docstring); all rows in ``fmt``'s fields."""
    if "train" not in raw:
        raise ValueError(f"the data needs a 'train' split; it has {list(raw)}")
    train = raw["train"]
    if eval_raw is not None:
        test = _only_split(eval_raw, "--eval-data")
    elif "test" in raw:
        test = raw["test"]
    else:
        train, test = _carve(train, eval_samples or min(500, len(train) // 10), seed, "test hold-out (--eval-samples)")
    if eval_samples is not None:
        test = test.select(range(min(eval_samples, len(test))))
    if "validation" in raw:
        validation = raw["validation"]
    else:
        size = validation_size or max(1, min(200, len(train) // 20))
        train, validation = _carve(train, size, seed, "validation (--validation-size)")
    if max_train_samples is not None:
        train = train.select(range(min(max_train_samples, len(train))))
    splits = {name: fmt.check(split, name) for name, split in [("train", train), ("validation", validation), ("test", test)]}
    golds = [fmt.scorer.extract(fmt.target(row)) for row in splits["test"]]
    bad = [i for i, gold in enumerate(golds) if gold is None or gold == ""]
    if bad:  # a reference without an answer would count as a wrong prediction: stop before training
        raise ValueError(f"test: {len(bad)} reference answer(s) hold no answer this format can read, e.g. row {bad[0]}")
    return splits


def _rows(batch: dict) -> list[dict]:
    return [dict(zip(batch, values)) for values in zip(*batch.values())]


def tokenize(dataset, tokenizer, fmt: Format, max_length: int):
    """``input_ids`` = prompt + answer + EOS, cut at ``max_length``; ``labels`` the same with the prompt
    masked (-100). Rows whose prompt fills ``max_length`` (no answer token left) are dropped."""

    def encode(batch):
        rows = _rows(batch)
        prompts = tokenizer([fmt.prompt(r) for r in rows])["input_ids"]
        answers = tokenizer([fmt.target(r) for r in rows], add_special_tokens=False)["input_ids"]
        out = {"input_ids": [], "attention_mask": [], "labels": []}
        for prompt, answer in zip(prompts, answers):
            answer = answer + [tokenizer.eos_token_id]
            ids = (prompt + answer)[:max_length]
            if len(prompt) >= len(ids):
                continue
            out["input_ids"].append(ids)
            out["attention_mask"].append([1] * len(ids))
            out["labels"].append(([-100] * len(prompt) + answer)[:max_length])
        return out

    encoded = dataset.map(encode, batched=True, remove_columns=dataset.column_names, desc="tokenizing")
    if len(encoded) == 0:
        raise ValueError(f"every prompt is at least --max-length {max_length} tokens long")
    if len(encoded) < len(dataset):
        print(f"{len(dataset) - len(encoded)} of {len(dataset)} rows dropped: prompt at least {max_length} tokens")
    return encoded


# -- generation -----------------------------------------------------------------------------------------
def generate(model, tokenizer, prompts: list[str], *, batch_size: int, max_new_tokens: int, accelerator=None) -> list[str]:
    """Greedy continuations of ``prompts``, in order. Under several processes each generates its share
    and all get the whole list back."""
    import torch
    from accelerate.utils import gather_object
    from tqdm.auto import tqdm

    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths share a batch: less padding
    shared = accelerator is not None and accelerator.num_processes > 1
    if shared:
        with accelerator.split_between_processes(order) as share:
            mine = list(share)
    else:
        mine = order
    tokenizer.padding_side = "left"  # generation continues right after each prompt
    device = next(model.parameters()).device
    model.eval()
    texts = []
    for start in tqdm(range(0, len(mine), batch_size), desc="generating", disable=shared and not accelerator.is_main_process):
        # token ids and attention mask only: causal LMs' generate rejects the token_type_ids some tokenizers emit
        batch = tokenizer([prompts[i] for i in mine[start : start + batch_size]], return_tensors="pt", padding=True,
                          return_token_type_ids=False).to(device)  # fmt: skip
        with torch.no_grad():
            output = model.generate(
                **batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
            )
        texts += tokenizer.batch_decode(output[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    pairs = list(zip(mine, texts))
    result = dict(gather_object(pairs) if shared else pairs)
    return [result[i] for i in range(len(prompts))]


def score(fmt: Format, rows, predictions: list[str]) -> tuple[dict, list[dict]]:
    """Accuracy over ``rows`` and one record per row (prompt, prediction, gold, extracted answers, correct)."""
    records = []
    for row, prediction in zip(rows, predictions):
        gold = fmt.target(row)
        records.append(
            {
                "prompt": fmt.prompt(row),
                "prediction": prediction,
                "gold": gold,
                "answer": _jsonable(fmt.scorer.extract(prediction)),
                "gold_answer": _jsonable(fmt.scorer.extract(gold)),
                "correct": fmt.scorer.correct(prediction, gold),
            }
        )
    n = len(records)
    return {"accuracy": sum(r["correct"] for r in records) / n if n else 0.0, "n": n}, records


def _jsonable(answer):
    return answer if answer is None or isinstance(answer, str) else str(answer)


def write_predictions(path: str, records: list[dict]) -> None:
    from c3a.io import atomic_write_text

    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


# -- c3a sft --------------------------------------------------------------------------------------------
def add_sft_arguments(parser: argparse.ArgumentParser) -> None:
    from c3a.experiments.train import add_method_arguments, add_training_arguments

    parser.add_argument("--model", required=True, help="hub id or local folder of a causal language model")
    parser.add_argument("--data", required=True, help="hub dataset id, local dataset folder, or a JSON/JSONL/CSV/Parquet file")
    parser.add_argument("--data-config", help="the hub dataset's configuration (e.g. 'main' for openai/gsm8k)")
    parser.add_argument("--format", required=True, choices=list(FORMATS), help="prompt template, fields and answer check")
    parser.add_argument("--eval-data", help="evaluate on this dataset instead (its test split, else its only split), e.g. MATH after MetaMathQA")
    parser.add_argument("--eval-data-config")
    parser.add_argument("--method", required=True, choices=list(METHODS))
    parser.add_argument("--out", help="output folder (default: c3a-sft/<format>/<method>/seed<seed>)")
    add_method_arguments(parser)
    add_training_arguments(parser, epochs=1, batch_size=4, head=False)
    data = parser.add_argument_group("data and evaluation")
    data.add_argument("--max-length", type=positive_int, default=1024, help="tokens per training example (prompt + answer), longer ones are cut")
    data.add_argument("--max-train-samples", type=positive_int, help="train on at most this many rows")
    data.add_argument("--validation-size", type=positive_int, help="rows carved from train for the validation loss when there is no validation split (default: 5%%, at most 200)")
    data.add_argument("--eval-samples", type=positive_int, help="score at most this many test rows; the hold-out size when there is no test split (default: all; hold-out 10%%, at most 500)")
    data.add_argument("--max-new-tokens", type=positive_int, default=512, help="generation length limit per answer")
    parser.epilog = "--bf16 also loads the model's weights in bfloat16 (C³A kernels and PEFT's LoRA weights stay fp32)."


def _load_model(name: str, bf16: bool):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(name)
    if tokenizer.eos_token_id is None:
        raise ValueError(f"{name}: the tokenizer has no EOS token; answers need one to end")
    if tokenizer.pad_token is None:  # Llama has none; padded positions are masked anyway
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(name, dtype=torch.bfloat16 if bf16 else torch.float32)
    model.config.use_cache = False  # training; generation turns it back on
    return tokenizer, model


def run_sft(args: argparse.Namespace) -> int:
    from transformers import DataCollatorForSeq2Seq, set_seed

    from c3a.experiments.methods import build_method, trainable_parameters
    from c3a.experiments.train import (
        end_distributed, fit, method_options, name_as_given, results_record, train_config, write_results,
    )
    from c3a.paper_models import resolve_model

    fmt = FORMATS[args.format]
    out = args.out or os.path.join("c3a-sft", args.format, args.method, f"seed{args.seed}")
    set_seed(args.seed)  # before the model: adapters are initialised from it
    eval_raw = load_source(args.eval_data, args.eval_data_config) if args.eval_data else None
    splits = make_splits(
        load_source(args.data, args.data_config), fmt, args.seed, eval_raw, args.eval_samples, args.validation_size, args.max_train_samples
    )
    tokenizer, model = _load_model(resolve_model(args.model), args.bf16)
    model = name_as_given(model, args.model)
    model = build_method(model, args.method, method_options(args, head=[]))  # the LM head is pretrained: no task head
    if trainable_parameters(model) == 0:  # e.g. bitfit on a model without biases (Llama)
        raise ValueError(f"method {args.method!r} leaves no trainable parameter in {args.model}")
    tokenizer.padding_side = "right"
    data = {name: tokenize(splits[name], tokenizer, fmt, args.max_length) for name in ("train", "validation")}

    config = train_config(
        args,
        os.path.join(out, "trainer"),
        logging_strategy="steps",
        logging_steps=0.01,  # a fraction of all steps: a 100-point loss curve
        **_group_by_length(),
    )
    result = fit(
        model,
        data["train"],
        data["validation"],
        config=config,
        head=[],
        metric="loss",
        greater_is_better=False,
        compute_metrics=None,  # the Trainer then computes the loss only, no logits kept
        data_collator=DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100),
    )

    model.config.use_cache = True
    accelerator = result.trainer.accelerator
    start = time.perf_counter()
    test = splits["test"]
    prompts = [fmt.prompt(row) for row in test]
    predictions = generate(
        model, tokenizer, prompts, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, accelerator=accelerator
    )
    metrics, records = score(fmt, test, predictions)
    eval_seconds = time.perf_counter() - start
    if result.trainer.is_world_process_zero():
        write_predictions(os.path.join(out, "predictions.jsonl"), records)
        results = results_record(
            args, result, task=args.format, main_metric="accuracy", trainable_params=trainable_parameters(model),
            test=metrics,  # generation accuracy on the held-out split, under the key the shared report reads
            samples={"train": len(data["train"]), "validation": len(data["validation"]), "test": len(test)},
            config=dict(lr=config.lr, weight_decay=config.weight_decay, out=out),
            eval=metrics,  # the same, as the schema names it
            data=args.data, eval_data=args.eval_data, eval_seconds=eval_seconds,
        )
        write_results(os.path.join(out, "results.json"), results)
        print(
            f"{args.format} {args.method} seed {args.seed}: validation loss {result.best['loss']:.4f}, "
            f"test accuracy {metrics['accuracy']:.4f} on {metrics['n']} -> {out}/results.json, {out}/predictions.jsonl"
        )
    end_distributed(result.trainer)
    return 0


def _group_by_length() -> dict:
    """Batches of similar lengths (less padding): ``train_sampling_strategy`` in recent transformers,
    ``group_by_length`` before."""
    from dataclasses import fields

    from transformers import TrainingArguments

    names = {f.name for f in fields(TrainingArguments)}
    return {"train_sampling_strategy": "group_by_length"} if "train_sampling_strategy" in names else {"group_by_length": True}
