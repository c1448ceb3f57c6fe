"""Instruction tuning (the paper's Table 3): `c3a sft` fine-tunes a causal LM with one method of the registry
and scores it by greedy generation.

Protocol: train on the train split with the loss on the answer tokens only (the prompt is masked), for
``--epochs`` (the paper: one). The validation split (the dataset's own, else a slice carved from train) gives a
teacher-forced loss every epoch over at most ``--validation-samples`` rows; the epoch with the lowest is kept,
and a suite chooses hyperparameters by it (smooth where exact-match accuracy on a few hundred rows moves in
steps of whole answers, and cheap: no generation). Then the test split (``--eval-data``, else the dataset's test
split, else a hold-out of train) is answered by batched greedy decoding and each answer checked by the format's
scorer (:mod:`c3a.experiments.answers`). Carved splits use a fixed seed, so every run and method sees the same
rows; the run's ``--seed`` drives initialisation and data order.

Prompts: a model whose tokenizer has a chat template gets each prompt as one user turn of that template, in
training and evaluation alike (``--prompt-style``); others get the plain prompt text.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

from c3a.argtypes import nonnegative_int, positive_int
from c3a.experiments.answers import SCORERS, Scorer, slot_f1
from c3a.experiments.jsonl import read_jsonl
from c3a.experiments.methods import METHODS


# -- formats --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Format:
    columns: tuple[str, ...]  # fields every row needs
    prompt: Callable[[dict], str]  # the text the model continues
    target: Callable[[dict], str]  # what it learns to write; also the reference its answers are checked against
    scorer: Scorer
    max_new_tokens: int  # generation limit: above the longest reference answer (in SmolLM2/Llama tokens)
    data: tuple[str, Optional[str]]  # the hub dataset (id, configuration) when --data is not given
    stop: tuple[str, ...] = ()  # text that ends an answer besides EOS (one-line answers: a line break)
    aliases: dict[str, str] = field(default_factory=dict)  # other datasets' names for the fields
    metrics: tuple[str, ...] = ()  # test metrics beside accuracy (:data:`EXTRA_METRICS`)

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
        lambda r: "Solve the math word problem step by step. End with a line '#### <number>' that gives the final "
        f"answer.\n\nQuestion: {r['question']}\nAnswer:\n",
        # calculator annotations (<<48/2=24>>) are not prose; they never change the final number
        lambda r: re.sub(r"<<[^<>]*>>", "", r["answer"]),
        SCORERS["gsm8k"],
        max_new_tokens=384,  # GSM8K train answers: 342 tokens at most, 221 at the 99th percentile
        data=("openai/gsm8k", "main"),
    ),
    "metamath": Format(
        ("query", "response"),
        lambda r: f"Solve the problem step by step.\n\n### Problem:\n{r['query']}\n\n### Solution:\n",
        lambda r: r["response"],
        SCORERS["math"],
        max_new_tokens=768,
        data=("meta-math/MetaMathQA", None),
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
        max_new_tokens=128,  # ViGGO train: 79 tokens at most
        data=("GEM/viggo", None),
        stop=("\n",),
        metrics=("slot_f1",),
    ),
    "sql": Format(
        ("question", "context", "answer"),
        lambda r: f"Write one SQL query that answers the question.\n\n### Tables:\n{r['context']}\n\n### Question:\n{r['question']}\n\n### SQL:\n",
        lambda r: r["answer"],
        SCORERS["sql"],
        max_new_tokens=128,  # the WikiSQL rows: 92 tokens at most
        data=("b-mc2/sql-create-context", None),
        stop=("\n",),
    ),
    "alpaca": Format(("instruction", "input", "output"), _alpaca_prompt, lambda r: r["output"], SCORERS["text"],
                     max_new_tokens=512, data=("tatsu-lab/alpaca", None)),
}
# Test metrics beyond accuracy: name → (predictions, references) → value.
EXTRA_METRICS: dict[str, Callable[[list[str], list[str]], float]] = {"slot_f1": slot_f1}
CARVE_SEED = 0  # validation and test rows carved from train: the same for every run


# -- data -----------------------------------------------------------------------------------------------
_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


SPLITS = ("train", "validation", "test")


def load_source(source: str, config: Optional[str] = None):
    """``DatasetDict`` from a hub id; from a local folder holding ``train``/``validation``/``test`` files (JSON,
    JSONL, CSV or Parquet: exactly those, so a ``train_sample.jsonl`` beside them is not read as more training
    rows), else any folder ``datasets.load_dataset`` reads; or from one local file, which becomes ``train``."""
    from datasets import DatasetDict, load_dataset

    if os.path.isdir(source):
        files = {split: path for split in SPLITS for ext in _FILE_BUILDERS
                 if os.path.isfile(path := os.path.join(source, split + ext))}  # fmt: skip
        if files:
            return DatasetDict({split: load_source(path)["train"] for split, path in files.items()})
    if os.path.isfile(source):
        builder = _FILE_BUILDERS.get(os.path.splitext(source)[1].lower())
        if builder is None:
            raise ValueError(f"{source}: data files must be one of {', '.join(_FILE_BUILDERS)}")
        if builder == "json" and source.lower().endswith(".jsonl"):  # bad rows named by file and line
            from datasets import Dataset

            return DatasetDict(train=Dataset.from_list(read_jsonl(source)))
        from datasets.utils import logging as datasets_logging

        bars = datasets_logging.is_progress_bar_enabled()
        datasets_logging.disable_progress_bar()  # one local file: a "generating split" bar says nothing
        try:
            return load_dataset(builder, data_files={"train": source})
        except Exception as e:  # datasets wraps the parser's error in DatasetGenerationError: say the parser's
            cause = e
            while cause.__cause__ is not None:
                cause = cause.__cause__
            reason = " ".join(str(cause).split()) or type(cause).__name__
            raise ValueError(f"{source}: not a readable {builder.upper()} data file ({reason})") from e
        finally:
            if bars:
                datasets_logging.enable_progress_bar()
    return load_dataset(source, config)


def _only_split(raw, name: str):
    """The evaluation split of a separate evaluation source: its test split, else its single split."""
    if "test" in raw:
        return raw["test"]
    if len(raw) == 1:
        return next(iter(raw.values()))
    raise ValueError(f"{name} has splits {list(raw)} and none is called 'test'")


def _carve(dataset, n: int, what: str):
    if not 0 < n < len(dataset):
        raise ValueError(f"{what}: {n} rows must be between 1 and {len(dataset) - 1} (train has {len(dataset)} rows)")
    parts = dataset.train_test_split(test_size=n, seed=CARVE_SEED)
    return parts["train"], parts["test"]


def make_splits(raw, fmt: Format, eval_raw=None, eval_samples=None, validation_size=None, max_train_samples=None,
                validation_samples=None):
    """``train``, ``validation`` and ``test`` (module docstring); all rows in ``fmt``'s fields. Rows carved from
    train (test first, then validation) are the same for every call; ``validation_samples`` caps the validation
    split to a fixed random subset, ``eval_samples`` the test split to its first rows."""
    if "train" not in raw:
        raise ValueError(f"the data needs a 'train' split; it has {list(raw)}")
    train = raw["train"]
    if eval_raw is not None:
        test = _only_split(eval_raw, "--eval-data")
    elif "test" in raw:
        test = raw["test"]
    else:
        train, test = _carve(train, eval_samples or min(500, len(train) // 10), "test hold-out (--eval-samples)")
    if eval_samples is not None:
        test = test.select(range(min(eval_samples, len(test))))
    if "validation" in raw:
        validation = raw["validation"]
    else:
        size = validation_size or max(1, min(200, len(train) // 20))
        train, validation = _carve(train, size, "validation (--validation-size)")
    if validation_samples is not None and validation_samples < len(validation):
        validation = validation.shuffle(seed=CARVE_SEED).select(range(validation_samples))
    if max_train_samples is not None:
        train = train.select(range(min(max_train_samples, len(train))))
    splits = {name: fmt.check(split, name) for name, split in [("train", train), ("validation", validation), ("test", test)]}
    golds = [fmt.scorer.extract(fmt.target(row)) for row in splits["test"]]
    bad = [i for i, gold in enumerate(golds) if gold is None or gold == ""]
    if bad:  # a reference without an answer would count as a wrong prediction: stop before training
        raise ValueError(f"test: {len(bad)} reference answer(s) hold no answer this format can read, e.g. row {bad[0]}")
    return splits


def prompt_text(fmt: Format, row: dict, tokenizer=None) -> str:
    """The text the model continues: ``fmt``'s prompt, as one user turn of ``tokenizer``'s chat template when a
    tokenizer is given (``None``: the plain prompt)."""
    if tokenizer is None:
        return fmt.prompt(row)
    return tokenizer.apply_chat_template([{"role": "user", "content": fmt.prompt(row)}], tokenize=False,
                                         add_generation_prompt=True)


def _rows(batch: dict) -> list[dict]:
    return [dict(zip(batch, values)) for values in zip(*batch.values())]


def tokenize(dataset, tokenizer, fmt: Format, max_length: int, chat: bool = False):
    """``input_ids`` = prompt + answer + EOS, cut at ``max_length``; ``labels`` the same with the prompt
    masked (-100). Rows whose prompt fills ``max_length`` (no answer token left) are dropped. ``chat``: prompts
    in the tokenizer's chat template (:func:`prompt_text`), which already holds the special tokens it needs."""

    def encode(batch):
        rows = _rows(batch)
        texts = [prompt_text(fmt, r, tokenizer if chat else None) for r in rows]
        prompts = tokenizer(texts, add_special_tokens=not chat)["input_ids"]
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
def generate(model, tokenizer, prompts: list[str], *, batch_size: int, max_new_tokens: int, accelerator=None,
             stop: tuple[str, ...] = (), add_special_tokens: bool = True) -> list[str]:
    """Greedy continuations of ``prompts``, in order, each ending at EOS, at a ``stop`` string (cut off, not
    kept) or after ``max_new_tokens``. Under several processes each generates its share and all get the whole
    list back."""
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
                          return_token_type_ids=False, add_special_tokens=add_special_tokens).to(device)  # fmt: skip
        with torch.no_grad():
            output = model.generate(
                **batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                **({"stop_strings": list(stop), "tokenizer": tokenizer} if stop else {}),
            )
        texts += [_cut(text, stop) for text in
                  tokenizer.batch_decode(output[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)]
    pairs = list(zip(mine, texts))
    result = dict(gather_object(pairs) if shared else pairs)
    return [result[i] for i in range(len(prompts))]


def _cut(text: str, stop: tuple[str, ...]) -> str:
    """``text`` up to the first ``stop`` string in it."""
    ends = [i for i in (text.find(s) for s in stop) if i >= 0]
    return text[: min(ends)] if ends else text


def score(fmt: Format, rows, predictions: list[str], prompts: Optional[list[str]] = None) -> tuple[dict, list[dict]]:
    """Accuracy (and ``fmt.metrics``) over ``rows`` and one record per row (the prompt as the model saw it,
    prediction, gold, extracted answers, correct)."""
    records = []
    prompts = prompts or [fmt.prompt(row) for row in rows]
    for row, prediction, prompt in zip(rows, predictions, prompts):
        gold = fmt.target(row)
        records.append(
            {
                "prompt": prompt,
                "prediction": prediction,
                "gold": gold,
                "answer": _jsonable(fmt.scorer.extract(prediction)),
                "gold_answer": _jsonable(fmt.scorer.extract(gold)),
                "correct": fmt.scorer.correct(prediction, gold),
            }
        )
    n = len(records)
    metrics = {"accuracy": sum(r["correct"] for r in records) / n if n else 0.0, "n": n}
    for name in fmt.metrics:
        metrics[name] = EXTRA_METRICS[name]([r["prediction"] for r in records], [r["gold"] for r in records])
    return metrics, records


def _jsonable(answer):
    return answer if answer is None or isinstance(answer, str) else str(answer)


def write_predictions(path: str, records: list[dict]) -> None:
    from c3a.io import atomic_write_text

    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


# -- c3a sft --------------------------------------------------------------------------------------------
SETTING = "causal-lm"  # the registry's defaults for instruction tuning (:meth:`Method.defaults`)
PROMPT_STYLES = ("auto", "chat", "plain")


def add_shared_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `c3a sft` that `c3a sft-suite` passes on to every cell."""
    from c3a.experiments.options import add_method_arguments, add_save_adapter_argument, add_training_arguments
    from c3a.paper_models import MODEL_SHORTCUTS

    parser.add_argument("--model", required=True,
                        help=f"hub id or local folder of a causal language model, or a shortcut: {', '.join(MODEL_SHORTCUTS)}")
    parser.add_argument("--prompt-style", choices=PROMPT_STYLES, default="auto",
                        help="chat: each prompt as a user turn of the tokenizer's chat template; plain: the prompt "
                        "text alone; auto (default): chat when the tokenizer has a template")
    add_method_arguments(parser, SETTING)
    add_training_arguments(parser, epochs=1, batch_size=8, head=False, seed=False)
    data = parser.add_argument_group("data and evaluation")
    data.add_argument("--max-length", type=positive_int, default=1024, help="tokens per training example (prompt + answer), longer ones are cut (default 1024)")
    data.add_argument("--max-train-samples", type=positive_int, help="train on at most this many rows (default: all)")
    data.add_argument("--validation-size", type=positive_int, help="rows carved from train for validation when there is no validation split (default: 5%%, at most 200)")
    data.add_argument("--validation-samples", type=positive_int, default=200, help="validation loss over at most this many rows, a fixed random subset (default 200)")
    data.add_argument("--eval-samples", type=positive_int, help="score at most this many test rows; the hold-out size when there is no test split (default: all; hold-out 10%%, at most 500)")
    data.add_argument("--generation-batch-size", type=positive_int, default=32, help="prompts per batch of greedy decoding (default 32; the validation loss uses --batch-size, so that peak memory is training's)")
    data.add_argument("--max-new-tokens", type=positive_int, help="generation length limit per answer (default: the format's, above its longest reference)")
    add_save_adapter_argument(parser)


def add_sft_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--format", required=True, choices=list(FORMATS), help="prompt template, fields and answer check")
    parser.add_argument("--data", help="hub dataset id, local dataset folder, or a JSON/JSONL/CSV/Parquet file (default: the format's hub dataset)")
    parser.add_argument("--data-config", help="the hub dataset's configuration (e.g. 'main' for openai/gsm8k)")
    parser.add_argument("--eval-data", help="evaluate on this dataset instead (its test split, else its only split), e.g. MATH after MetaMathQA")
    parser.add_argument("--eval-data-config", help="the --eval-data hub dataset's configuration")
    parser.add_argument("--method", required=True, choices=list(METHODS), help="the fine-tuning method (the registry's)")
    parser.add_argument("--seed", type=nonnegative_int, default=0, help="initialisation and data order")
    parser.add_argument("--out", help="output folder (default: c3a-sft/<format>/<method>/seed<seed>)")
    add_shared_arguments(parser)
    lrs = ", ".join(f"{name} {METHODS[name].defaults(SETTING).lr:g}" for name in ("c3a", "lora"))
    parser.epilog = (f"Defaults are the registry's causal-LM setting (the method options above; learning rates {lrs}). "
                     "--bf16 also loads the model's weights in bfloat16 (C³A kernels and PEFT's LoRA weights stay fp32).")


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


def _chat(style: str, tokenizer, model_name: str) -> bool:
    if style == "chat" and not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"--prompt-style chat: {model_name}'s tokenizer has no chat template")
    return style == "chat" or (style == "auto" and bool(getattr(tokenizer, "chat_template", None)))


def run_sft(args: argparse.Namespace) -> int:
    from transformers import DataCollatorForSeq2Seq, set_seed

    from c3a.experiments.methods import build_method, trainable_parameters
    from c3a.experiments.train import (
        end_distributed, fit, method_options, name_as_given, results_record, save_adapter, train_config, write_results,
    )
    from c3a.hub import check_data_source, check_model_source, loading
    from c3a.io import check_outputs_apart, check_writable
    from c3a.paper_models import resolve_model

    fmt = FORMATS[args.format]
    method = METHODS[args.method]
    out = args.out or os.path.join("c3a-sft", args.format, args.method, f"seed{args.seed}")
    max_new_tokens = args.max_new_tokens or fmt.max_new_tokens
    check_outputs_apart({"--out": out}, {"--data": args.data, "--eval-data": args.eval_data, "--model": args.model})
    check_writable("--out", out)
    data, data_config = (args.data, args.data_config) if args.data else fmt.data
    check_data_source(data, "--data" if args.data else f"--format {args.format}'s dataset")
    if args.eval_data:
        check_data_source(args.eval_data, "--eval-data")
    path = resolve_model(args.model)
    check_model_source(path)
    set_seed(args.seed)  # before the model: adapters are initialised from it
    with loading("--eval-data", args.eval_data):
        eval_raw = load_source(args.eval_data, args.eval_data_config) if args.eval_data else None
    with loading("--data", data):
        raw = load_source(data, data_config)
    splits = make_splits(raw, fmt, eval_raw, args.eval_samples, args.validation_size, args.max_train_samples,
                         args.validation_samples)
    with loading("--model", args.model):
        tokenizer, model = _load_model(path, args.bf16)
    chat = _chat(args.prompt_style, tokenizer, args.model)
    model = name_as_given(model, args.model)
    model = build_method(model, args.method, method_options(args, [], SETTING))  # the LM head is pretrained: no task head
    if method.trains and trainable_parameters(model) == 0:  # e.g. bitfit on a model without biases (Llama)
        raise ValueError(f"method {args.method!r} leaves no trainable parameter in {args.model}")
    tokenizer.padding_side = "right"
    encoded = {name: tokenize(splits[name], tokenizer, fmt, args.max_length, chat) for name in ("train", "validation")}

    config = train_config(
        args,
        os.path.join(out, "trainer"),
        SETTING,
        logging_strategy="steps",
        logging_steps=0.01,  # a fraction of all steps: a 100-point loss curve
        **_group_by_length(),
    )
    result = fit(
        model,
        encoded["train"],
        encoded["validation"],
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
    prompts = [prompt_text(fmt, row, tokenizer if chat else None) for row in test]
    predictions = generate(model, tokenizer, prompts, batch_size=args.generation_batch_size, max_new_tokens=max_new_tokens,
                           accelerator=accelerator, stop=fmt.stop, add_special_tokens=not chat)  # fmt: skip
    metrics, records = score(fmt, test, predictions, prompts)
    eval_seconds = time.perf_counter() - start
    if result.trainer.is_world_process_zero():
        write_predictions(os.path.join(out, "predictions.jsonl"), records)
        results = results_record(
            args, result, task=args.format, main_metric="accuracy", trainable_params=trainable_parameters(model),
            test=metrics,  # generation accuracy on the held-out split, under the key the shared report reads
            samples={"train": len(encoded["train"]), "validation": len(encoded["validation"]), "test": len(test)},
            config=dict(lr=config.lr, weight_decay=config.weight_decay, out=out),
            select={"metric": "loss", "greater_is_better": False},  # what chooses epochs and grid points
            eval=metrics,  # the same, as the schema names it
            # what the defaults resolved to (beside config, which keeps the options as given)
            prompt="chat" if chat else "plain", max_new_tokens=max_new_tokens, data=data, data_config=data_config,
            eval_data=args.eval_data, eval_seconds=eval_seconds,
        )
        if args.save_adapter:  # before results.json: a finished run has both
            save_adapter(model, out)
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


# -- c3a sft-suite --------------------------------------------------------------------------------------
FORMAT_TITLES = {"gsm8k": "GSM8K", "metamath": "MATH", "viggo": "ViGGO", "sql": "SQL", "alpaca": "Alpaca"}


def _experiment():
    from c3a.experiments.suite import Experiment

    from c3a.experiments.methods import default_methods

    return Experiment("sft", "Instruction tuning", {name: FORMAT_TITLES[name] for name in FORMATS}, "--format",
                      add_sft_arguments, add_shared_arguments, default_methods=default_methods("sft"),
                      setting=SETTING, selects_by_loss=True,
                      extra_columns={"ViGGO slot F1": ("viggo", "slot_f1")})  # fmt: skip


def add_sft_suite_arguments(parser: argparse.ArgumentParser) -> None:
    from c3a.experiments.suite import add_suite_arguments

    add_suite_arguments(parser, _experiment())
    parser.epilog = ("Each format's data comes from its hub dataset unless a --task-options entry names it, e.g. "
                     "viggo:data=viggo/train.jsonl:eval-data=viggo/validation.jsonl.")


def run_sft_suite(args: argparse.Namespace) -> int:
    from c3a.experiments.suite import run_suite

    return run_suite(args, _experiment())
