"""`c3a sft`: answer extraction and scoring, data plumbing, and end-to-end runs on a tiny random Llama."""

import json
import random
from fractions import Fraction
from pathlib import Path

import pytest
from datasets import Dataset, DatasetDict

from c3a.cli import main
from conftest import grouped_by_length, write_tiny_llama
from c3a.experiments.answers import (
    SCORERS,
    gsm8k_answer,
    last_boxed,
    math_answer,
    math_equal,
    normalize_mr,
    normalize_sql,
    parse_number,
)
from c3a.experiments.answers import slot_f1
from c3a.experiments.instruct import FORMATS, generate, make_splits, prompt_text, score, tokenize

GSM8K_SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k" / "train_sample.jsonl"


# -- answers ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text, number",
    [
        ("Natalia sold 48+24 = 72 clips.\n#### 72", 72),
        ("#### 1,234", 1234),
        ("She earned $<<0.2*50=10>>10.\n#### $10", 10),
        ("#### 5.0", 5),
        ("#### -3", -3),
        ("#### 12.50.", Fraction(25, 2)),
        ("10 - 3 = 7, so 7 apples remain", 7),  # no ####: the last number; "- 3" after a digit is subtraction
        ("Total: 3,500 dollars, or $3,500.", 3500),
        ("#### 7\nThe answer is: 8", 7),  # after #### wins over the last number
        ("The temperature fell to -12 degrees", -12),
        ("no number here", None),
    ],
)
def test_gsm8k_answer(text, number):
    assert gsm8k_answer(text) == number


def test_parse_number_is_strict():
    assert parse_number("$1,000.00") == 1000 and parse_number("3/4") == Fraction(3, 4) and parse_number("7.") == 7
    assert parse_number("12,34") is None and parse_number("x") is None and parse_number("1/0") is None


def test_gsm8k_real_sample_golds():
    if not GSM8K_SAMPLE.is_file():
        pytest.skip(f"shared data absent: {GSM8K_SAMPLE}")
    rows = [json.loads(line) for line in GSM8K_SAMPLE.read_text().splitlines()]
    fmt, scorer = FORMATS["gsm8k"], SCORERS["gsm8k"]
    assert len(rows) == 300
    for row in rows:
        number = gsm8k_answer(row["answer"])
        assert number is not None and number == int(row["answer"].rsplit("####", 1)[1].replace(",", ""))
        assert scorer.correct(row["answer"], row["answer"])
        assert scorer.correct(fmt.target(row), row["answer"])  # calculator annotations removed: same number
        assert "<<" not in fmt.target(row)
        wrong = row["answer"].rsplit("####", 1)[0] + f"#### {number + 1}"
        assert not scorer.correct(wrong, row["answer"])


def test_last_boxed_nested_and_last():
    assert last_boxed(r"so $\boxed{\frac{1}{2}}$.") == r"\frac{1}{2}"
    assert last_boxed(r"\boxed{1} then \boxed{x^{2}+\sqrt{y_{1}}}") == r"x^{2}+\sqrt{y_{1}}"
    assert last_boxed(r"\fbox{42}") == "42"
    assert last_boxed(r"\boxed 5$") == "5"
    assert last_boxed(r"cut off \boxed{\frac{1}{2") is None
    assert last_boxed("no box") is None


@pytest.mark.parametrize(
    "prediction, gold, correct",
    [
        (r"... \boxed{\dfrac{1}{2}}", r"The answer is $\boxed{\frac12}$.", True),
        (r"\boxed{0.5}", r"\boxed{\frac{1}{2}}", True),  # numerically equal
        (r"\boxed{-\frac{3}{4}}", r"\boxed{-0.75}", True),
        (r"\boxed{\left( 3, \frac{\pi}{2} \right)}", r"\boxed{(3,\frac{\pi}{2})}", True),
        (r"\boxed{90^\circ}", r"\boxed{90}", True),
        (r"\boxed{10.}", r"\boxed{10}", True),
        (r"\boxed{10,000}", r"\boxed{10000}", True),
        ("Simplify.\nThe answer is: 7", r"\boxed{7}", True),  # MetaMathQA's ending
        (r"\boxed{1,2}", r"\boxed{12}", False),  # a list of two answers is not twelve
        (r"\boxed{\frac{1}{3}}", r"\boxed{0.33}", False),
        (r"\boxed{x+1}", r"\boxed{x-1}", False),
        ("no final answer", r"\boxed{3}", False),
    ],
)
def test_math_scoring(prediction, gold, correct):
    assert SCORERS["math"].correct(prediction, gold) is correct


def test_math_answer_normalises():
    assert math_answer(r"\boxed{ \left[ 1, 2 \right) }") == "[1,2)"
    assert math_answer(r"\boxed{\tfrac{3}{4}\!}") == r"\frac{3}{4}"
    assert math_equal(r"\frac{6}{8}", "0.75") and not math_equal(r"\frac{a}{b}", "1")


def test_sql_and_viggo_exact_match():
    sql = SCORERS["sql"]
    gold = 'SELECT COUNT(*) FROM head WHERE name = "John Smith"'
    assert sql.correct('select count ( * )  from head\twhere name="John Smith";', gold)
    assert sql.correct("SELECT COUNT(*) FROM head WHERE name = 'JOHN SMITH'", gold)  # case and quote style fold
    assert not sql.correct("SELECT COUNT(*) FROM head WHERE name = 'John Smyth'", gold)
    assert not sql.correct("SELECT COUNT(*) FROM head WHERE name = John Smith", gold)  # an unquoted value is not a literal
    assert normalize_sql('''x = "it's" AND y = "a""b"''') == normalize_sql("""x = 'it''s' and y = 'a"b'""")
    assert not sql.correct("SELECT COUNT(*) FROM head", gold)
    assert normalize_sql("SELECT a FROM t;\nextra text") == "select a from t"
    mr = "inform(name[Tomb Raider], release_year[2013], rating[good])"
    assert SCORERS["mr"].correct("inform( name[Tomb Raider] , release_year[2013], rating[good])\n\nmore", mr)
    assert not SCORERS["mr"].correct("inform(name[tomb raider], release_year[2013], rating[good])", mr)
    assert normalize_mr("") == "" and not SCORERS["mr"].correct("", "")  # an empty generation is wrong


# -- data -------------------------------------------------------------------------------------------------
def test_formats_read_their_datasets_fields():
    math = FORMATS["metamath"].check(Dataset.from_dict({"problem": ["1+1?"], "solution": [r"$\boxed{2}$"]}), "MATH")
    assert math.column_names == ["query", "response"]
    assert "1+1?" in FORMATS["metamath"].prompt(math[0])
    with pytest.raises(ValueError, match=r"fields \['context'\] missing"):
        FORMATS["sql"].check(Dataset.from_dict({"question": ["q"], "answer": ["a"]}), "train")
    row = {"instruction": "Add.", "input": "", "output": "2"}
    assert "Input" not in FORMATS["alpaca"].prompt(row) and "Input" in FORMATS["alpaca"].prompt({**row, "input": "1+1"})


def _gsm8k_rows(n, seed=0):
    """GSM8K-shaped rows whose answers are all ``#### 7``: a tiny model learns that in a few epochs, and the
    questions hold no 7 for a last-number fallback to find."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        question = f"Tom has {rng.randint(1, 6)} apples and gets some more. How many apples?"
        rows.append({"idx": i, "question": question, "answer": "#### 7"})
    return rows


def test_make_splits_protocol():
    fmt = FORMATS["gsm8k"]
    raw = DatasetDict(train=Dataset.from_list(_gsm8k_rows(60)))
    splits = make_splits(raw, fmt, eval_samples=10)
    assert [len(splits[s]) for s in ("train", "validation", "test")] == [48, 2, 10]  # validation: 5% of 50
    parts = [set(splits[s]["idx"]) for s in ("train", "validation", "test")]
    assert set().union(*parts) == set(range(60)) and sum(map(len, parts)) == 60  # disjoint, nothing lost
    assert splits["test"]["idx"] != list(range(50, 60))  # a random hold-out, not the last rows
    again = make_splits(raw, fmt, eval_samples=10)  # the same rows every time: runs and methods stay paired
    assert all(again[s]["idx"] == splits[s]["idx"] for s in ("train", "validation", "test"))
    # --validation-samples: a fixed random subset of a given validation split
    given = DatasetDict(train=raw["train"], validation=raw["train"].select(range(30)))
    capped = make_splits(given, fmt, eval_samples=5, validation_samples=4)["validation"]["idx"]
    assert len(capped) == 4 and capped != [0, 1, 2, 3] and set(capped) < set(range(30))
    assert make_splits(given, fmt, eval_samples=5, validation_samples=4)["validation"]["idx"] == capped
    # a test split is used as given (at most --eval-samples rows); a validation split too
    given = DatasetDict(train=raw["train"], validation=raw["train"].select(range(3)), test=raw["train"].select(range(20)))
    splits = make_splits(given, fmt, eval_samples=5)
    assert [len(splits[s]) for s in ("train", "validation", "test")] == [60, 3, 5]
    # a separate evaluation source (MATH after MetaMathQA) with its own field names
    metamath = DatasetDict(train=Dataset.from_dict({"query": ["q"] * 30, "response": ["The answer is: 1"] * 30}))
    math = DatasetDict(test=Dataset.from_dict({"problem": ["p", "p"], "solution": [r"\boxed{1}", r"\boxed{\frac{1}{2}}"]}))
    splits = make_splits(metamath, FORMATS["metamath"], eval_raw=math)
    assert splits["test"].column_names == ["query", "response"] and len(splits["test"]) == 2
    # a reference without an answer stops everything before training
    bad = DatasetDict(train=raw["train"], test=Dataset.from_dict({"question": ["q"], "answer": ["no number"]}))
    with pytest.raises(ValueError, match="reference answer"):
        make_splits(bad, fmt)


class _CharTokenizer:
    """Stand-in tokenizer: one id per character, BOS 1 prepended, EOS 2."""

    eos_token_id = 2

    def __call__(self, texts, add_special_tokens=True):
        return {"input_ids": [([1] if add_special_tokens else []) + [ord(c) for c in t] for t in texts]}


def test_tokenize_masks_the_prompt_and_ends_with_eos():
    fmt = FORMATS["sql"]
    row = {"question": "How many?", "context": "CREATE TABLE t (a INT)", "answer": "SELECT COUNT(*) FROM t"}
    data = tokenize(Dataset.from_list([row]), _CharTokenizer(), fmt, max_length=1000)
    prompt, answer = [1] + [ord(c) for c in fmt.prompt(row)], [ord(c) for c in row["answer"]] + [2]
    assert data[0]["input_ids"] == prompt + answer
    assert data[0]["labels"] == [-100] * len(prompt) + answer
    cut = tokenize(Dataset.from_list([row]), _CharTokenizer(), fmt, max_length=len(prompt) + 3)
    assert cut[0]["labels"] == [-100] * len(prompt) + answer[:3]
    with pytest.raises(ValueError, match="at least --max-length"):
        tokenize(Dataset.from_list([row]), _CharTokenizer(), fmt, max_length=len(prompt))


def test_score_counts_and_records():
    fmt = FORMATS["gsm8k"]
    rows = _gsm8k_rows(3)
    metrics, records = score(fmt, rows, ["#### 7", "so 7.", "#### 8"])
    assert metrics == {"accuracy": pytest.approx(2 / 3), "n": 3}
    assert [r["correct"] for r in records] == [True, True, False]
    assert records[2]["answer"] == "8" and records[2]["gold_answer"] == "7" and records[0]["prompt"] == fmt.prompt(rows[0])


# -- end to end -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    """A 2-layer random Llama (hidden 32) with a byte-level BPE tokenizer trained on the test data, and a
    GSM8K-style JSONL of :func:`_gsm8k_rows`."""
    root = tmp_path_factory.mktemp("sft")
    rows = _gsm8k_rows(48)
    (root / "gsm8k.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    fmt = FORMATS["gsm8k"]
    write_tiny_llama(root / "model", [fmt.prompt(r) + fmt.target(r) for r in rows])
    return root


def _sft(root, out, *extra):
    argv = ["sft", "--model", str(root / "model"), "--data", str(root / "gsm8k.jsonl"), "--format", "gsm8k",
            "--batch-size", "8", "--eval-samples", "6", "--out", str(out), *extra]  # fmt: skip
    assert main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    predictions = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    return results, predictions


def test_sft_learns_the_answer_format(tiny_llama, tmp_path):
    """Full fine-tuning learns to answer `#### 7` and stop (EOS): masking, generation and scoring agree."""
    results, predictions = _sft(tiny_llama, tmp_path, "--method", "full", "--lr", "1e-2", "--epochs", "6", "--max-new-tokens", "24")
    assert results["test"] == results["eval"] == {"accuracy": 1.0, "n": 6}
    assert len(predictions) == 6 and all(p["correct"] and p["answer"] == "7" for p in predictions)
    assert all(p["prediction"] == "#### 7" for p in predictions)  # stopped at EOS, well before 24 tokens
    assert results["samples"] == {"train": 40, "validation": 2, "test": 6}
    losses = [row["train_loss"] for row in results["history"] if "train_loss" in row]
    assert len(losses) == 30 and losses[-1] < losses[0]  # a loss every step (30 steps), falling
    steps = results["step_seconds"]  # one wall time per optimizer step, within the training's
    assert len(steps) == 30 and all(s > 0 for s in steps) and sum(steps) < results["train_seconds"]
    validation = [row["validation"]["loss"] for row in results["history"] if "validation" in row]
    assert len(validation) == 6 and results["validation"]["loss"] == min(validation)


def test_sft_c3a_with_gradient_checkpointing(tiny_llama, tmp_path):
    results, predictions = _sft(
        tiny_llama, tmp_path, "--method", "c3a", "--block-size", "8", "--epochs", "2", "--gradient-checkpointing", "--max-new-tokens", "4"
    )
    assert results["trainable_params"] == 2 * (32 * 32 + 16 * 32) // 8  # q_proj 32→32, v_proj 32→16 (2 KV heads)
    first, second = [row["validation"]["loss"] for row in results["history"] if "validation" in row]
    assert second < first  # the adapters get gradients through the checkpointed layers
    assert results["test"]["accuracy"] == sum(p["correct"] for p in predictions) / len(predictions)
    for key in ("peak_memory_bytes", "memory_kind", "train_seconds", "eval_seconds", "config"):
        assert key in results


def test_sft_saves_an_adapter_that_reproduces_its_predictions(tiny_llama, tmp_path):
    """--save-adapter writes PEFT's adapter-only checkpoint of the weights that were scored: the base model plus
    that adapter, loaded as any PEFT user would, decodes exactly the recorded predictions."""
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from c3a.experiments.instruct import generate

    results, predictions = _sft(tiny_llama, tmp_path, "--method", "c3a", "--block-size", "8", "--lr", "1",
                                "--max-new-tokens", "6", "--save-adapter")  # fmt: skip
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    kernels = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert len(kernels) == 4 and all(k.abs().max() > 0 for k in kernels.values())  # q, v of 2 layers, trained from 0
    assert results["config"]["save_adapter"] is True
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama / "model")
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    base = AutoModelForCausalLM.from_pretrained(tiny_llama / "model")
    prompts = [p["prompt"] for p in predictions]
    ids = tokenizer(prompts[:1], return_tensors="pt").input_ids
    with torch.no_grad():
        before = base(ids).logits
        model = PeftModel.from_pretrained(base, tmp_path / "adapter")
        assert (model(ids).logits - before).abs().max() > 1e-3  # the adapter is loaded and changes the model
    again = generate(model, tokenizer, prompts, batch_size=32, max_new_tokens=6)
    assert again == [p["prediction"] for p in predictions]


def test_sft_lora_max_steps(tiny_llama, tmp_path):
    results, _ = _sft(tiny_llama, tmp_path, "--method", "lora", "--rank", "4", "--dropout", "0.05", "--max-steps", "2", "--max-new-tokens", "4")
    assert results["trainable_params"] == 2 * 4 * ((32 + 32) + (32 + 16))
    assert results["history"][-1]["epoch"] < 1 and "validation" in results["history"][-1]  # validated at the stop


def test_sft_two_processes_share_generation(tiny_llama, tmp_path):
    """Under torchrun the processes split the test set (5 rows: uneven shares) and the predictions file still has
    every row once, in order."""
    import os
    import socket
    import subprocess
    import sys

    from datasets import load_dataset

    argv = ["--model", str(tiny_llama / "model"), "--data", str(tiny_llama / "gsm8k.jsonl"), "--format", "gsm8k",
            "--method", "lora", "--rank", "4", "--max-steps", "2", "--batch-size", "2", "--eval-samples", "5",
            "--max-new-tokens", "4", "--out", str(tmp_path)]  # fmt: skip
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(port), "-m", "c3a.cli", "sft", *argv]  # fmt: skip
    done = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    predictions = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    raw = load_dataset("json", data_files={"train": str(tiny_llama / "gsm8k.jsonl")})
    test = make_splits(raw, FORMATS["gsm8k"], eval_samples=5)["test"]
    assert [p["prompt"] for p in predictions] == [FORMATS["gsm8k"].prompt(row) for row in test]
    assert json.loads((tmp_path / "results.json").read_text())["test"]["n"] == 5


def test_sft_methods_with_nothing_to_train_stop_clearly(tiny_llama, tmp_path):
    with pytest.raises(ValueError, match="no trainable parameter"):  # Llama has no biases
        _sft(tiny_llama, tmp_path, "--method", "bitfit")
    with pytest.raises(ValueError, match="head modules"):  # the LM head is not a new task head
        _sft(tiny_llama, tmp_path, "--method", "head")


def test_generate_with_a_tokenizer_that_emits_token_type_ids(tiny_llama):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama / "model")
    tokenizer.model_input_names = ["input_ids", "token_type_ids", "attention_mask"]  # as BERT-style tokenizers do
    assert "token_type_ids" in tokenizer(["a"])
    model = AutoModelForCausalLM.from_pretrained(tiny_llama / "model")
    texts = generate(model, tokenizer, ["Question: 1 + 1?", "Q"], batch_size=2, max_new_tokens=3)
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)


# -- real-format rows, chat prompts, stops, slot F1 -------------------------------------------------------
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
REAL_ROWS = {  # the first row of each shared file, as its README describes the schema (used when it is absent)
    "gsm8k": {"question": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
              "How many clips did Natalia sell altogether in April and May?",
              "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips "
              "altogether in April and May.\n#### 72"},
    "viggo": {"meaning_representation": "inform(name[Dirt: Showdown], release_year[2012], esrb[E 10+ (for Everyone 10 "
              "and Older)], genres[driving/racing, sport], platforms[PlayStation, Xbox, PC], available_on_steam[no], "
              "has_linux_release[no], has_mac_release[no])",
              "target": "Dirt: Showdown from 2012 is a sport racing game for the PlayStation, Xbox, PC rated E 10+ (for "
              "Everyone 10 and Older). It's not available on Steam, Linux, or Mac."},
    "sql": {"question": "Tell me what the notes are for South Australia",
            "context": "table 1-1000181-1, columns: State/territory, Text/background colour, Format, Current slogan, "
            "Current series, Notes",
            "answer": "SELECT Notes FROM 1-1000181-1 WHERE Current slogan = 'SOUTH AUSTRALIA'"},
}  # fmt: skip


def _real_row(name: str) -> dict:
    path = SHARED / name / "train.jsonl"
    if path.is_file():
        with open(path) as f:
            return json.loads(f.readline())
    return REAL_ROWS[name]


class _ChatTokenizer(_CharTokenizer):
    """One id per character, with a chat template that wraps the user turn."""

    chat_template = "{{ messages }}"

    def apply_chat_template(self, messages, tokenize, add_generation_prompt):
        assert not tokenize and add_generation_prompt and [m["role"] for m in messages] == ["user"]
        return f"<user>{messages[0]['content']}</user><assistant>"


@pytest.mark.parametrize("name", ["gsm8k", "viggo", "sql"])
@pytest.mark.parametrize("chat", [False, True])
def test_real_rows_through_prompt_mask_and_scorer(name, chat):
    """A real row of each Table-3 dataset: the prompt (plain or chat) is masked, the answer + EOS is learned, and
    the reference scores as right while a one-slot/one-token change scores as wrong."""
    fmt, row = FORMATS[name], _real_row(name)
    tokenizer = _ChatTokenizer()
    data = tokenize(Dataset.from_list([row]), tokenizer, fmt, max_length=4096, chat=chat)[0]
    prompt = prompt_text(fmt, row, tokenizer if chat else None)
    assert prompt.startswith("<user>") == chat and fmt.prompt(row) in prompt
    n = len(prompt) + (0 if chat else 1)  # plain prompts get the tokenizer's BOS, chat prompts carry their own
    assert data["input_ids"][:n] == ([] if chat else [1]) + [ord(c) for c in prompt]
    assert data["labels"][:n] == [-100] * n
    assert data["labels"][n:] == [ord(c) for c in fmt.target(row)] + [2]
    gold = fmt.target(row)
    assert fmt.scorer.correct(gold, gold) and fmt.scorer.correct(gold + "\nmore text", gold)  # a trailing line never counts
    wrong = {"gsm8k": gold.replace("#### 72", "#### 73"), "viggo": gold.replace("[2012]", "[2013]"),
             "sql": gold.replace("Notes", "Format", 1)}[name]  # fmt: skip
    assert not fmt.scorer.correct(wrong, gold)
    assert fmt.max_new_tokens > len(gold.split())  # room for the answer


def test_slot_f1_gives_partial_credit():
    gold = "inform(name[Tomb Raider], rating[good], genres[action, adventure])"
    assert slot_f1([gold], [gold]) == 1.0
    one_wrong = "inform(name[Tomb Raider], rating[poor], genres[action, adventure])"  # 3 of 4 slots (act included)
    assert slot_f1([one_wrong], [gold]) == pytest.approx(0.75)
    assert slot_f1(["request(name[Tomb Raider])"], [gold]) == pytest.approx(2 * 1 / (2 + 4))
    assert slot_f1(["inform( name[ Tomb  Raider ] )"], ["inform(name[Tomb Raider])"]) == 1.0  # spacing never counts
    assert slot_f1(["", gold], [gold, gold]) == pytest.approx(2 * 4 / (4 + 8))  # micro-averaged over rows
    metrics, _ = score(FORMATS["viggo"], [{"target": "s", "meaning_representation": gold}], [one_wrong])
    assert metrics == {"accuracy": 0.0, "n": 1, "slot_f1": pytest.approx(0.75)}


def test_generate_stops_at_a_stop_string(tiny_llama):
    """A one-line format's generation ends at the line break (not kept), whatever the model writes after it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama / "model")
    model = AutoModelForCausalLM.from_pretrained(tiny_llama / "model")
    free = generate(model, tokenizer, ["Tom has"], batch_size=1, max_new_tokens=12)[0]
    assert len(free) > 0
    stop = free.strip()[:1] or free[:1]  # a character the model is known to write: cut right before it
    cut = generate(model, tokenizer, ["Tom has"], batch_size=1, max_new_tokens=12, stop=(stop,))[0]
    assert cut == free[: free.index(stop)]


# -- sft-suite ----------------------------------------------------------------------------------------------
def test_sft_suite_selects_on_validation_loss_resumes_and_reports(tiny_llama, tmp_path, capsys):
    """The suite runner serves sft as it serves glue: a LoRA lr grid chosen on the lowest validation loss of the
    selection seed, the other seed at the chosen point only, the untuned floor beside it; a rerun trains nothing;
    --report-only writes the same tables."""
    out = tmp_path / "grid"
    argv = ["sft-suite", "--model", str(tiny_llama / "model"), "--tasks", "gsm8k", "--methods", "none",
            "lora:rank=4:lr=1e-4,3e-2", "--seeds", "0", "1", "--select-seeds", "0", "--extend-edges", "0",
            "--task-options", f"gsm8k:data={tiny_llama / 'gsm8k.jsonl'}:eval-samples=4", "--max-steps", "3",
            "--batch-size", "8", "--max-new-tokens", "3", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    row = out / "gsm8k" / "lora_rank_4_lr_1e-4_3e-2"
    losses = {lr: json.loads((row / f"lr={lr}" / "seed0" / "results.json").read_text())["validation"]["loss"]
              for lr in ("1e-4", "3e-2")}  # fmt: skip
    chosen = min(losses, key=losses.get)
    assert sorted(p.name for p in row.iterdir()) == ["lr=1e-4", "lr=3e-2"]
    assert [p.name for p in (row / f"lr={chosen}").iterdir() if p.name.startswith("seed")].count("seed1") == 1
    other = "3e-2" if chosen == "1e-4" else "1e-4"
    assert not (row / f"lr={other}" / "seed1").exists()  # test is read at the chosen point only
    floor = json.loads((out / "gsm8k" / "none" / "seed0" / "results.json").read_text())
    assert floor["trainable_params"] == 0 and floor["history"][0]["validation"]["loss"] == floor["validation"]["loss"]
    selection = json.loads((out / "selection.json").read_text())["gsm8k/lora:rank=4:lr=1e-4,3e-2"]
    assert selection["chosen"] == f"lr={chosen}"
    assert selection["validation_means"] == {f"lr={lr}": pytest.approx(-loss) for lr, loss in losses.items()}
    table = (out / "table.md").read_text()
    assert "Instruction tuning" in table and "| none |" in table and "lowest mean validation loss" in table
    capsys.readouterr()
    assert main(argv) == 0  # resumed: every cell done before
    assert capsys.readouterr().out.count("done before, skipped") == 5
    (out / "table.md").unlink()
    assert main([*argv, "--report-only"]) == 0
    assert (out / "table.md").read_text() == table
    # a cell from before an option existed (its record lacks it) is reused while the option is left off ...
    cell = out / "gsm8k" / "none" / "seed0" / "results.json"
    record = json.loads(cell.read_text())
    del record["config"]["save_adapter"]
    cell.write_text(json.dumps(record))
    capsys.readouterr()
    assert main(argv) == 0
    assert capsys.readouterr().out.count("done before, skipped") == 5
    with pytest.raises(ValueError, match=r"run with other settings.*save_adapter: None → True"):
        main([*argv, "--save-adapter"])  # ... but not when asked for: the cell saved nothing


def test_a_local_folder_reads_exactly_its_split_files(tmp_path):
    """GSM8K's shared folder holds train.jsonl and train_sample.jsonl (its first 300 rows): only the split files
    count, so the sample is not trained on twice (or carved into the test hold-out)."""
    from c3a.experiments.instruct import load_source

    rows = _gsm8k_rows(5)
    for name, part in [("train.jsonl", rows[:3]), ("train_sample.jsonl", rows[:1]), ("test.jsonl", rows[3:])]:
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in part))
    raw = load_source(str(tmp_path))
    assert {split: raw[split]["idx"] for split in raw} == {"train": [0, 1, 2], "test": [3, 4]}
    (tmp_path / "test.jsonl").write_text('{"idx": 5, "question": "q"}\n{"idx": 6\n')
    with pytest.raises(ValueError, match=r"test\.jsonl:2: not valid JSON"):  # a bad row named by file and line
        load_source(str(tmp_path))


def test_sft_leaves_no_empty_folder(tiny_llama, tmp_path):
    _sft(tiny_llama, tmp_path, "--method", "lora", "--rank", "4", "--max-steps", "1", "--max-new-tokens", "2")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["predictions.jsonl", "results.json"]


def test_sft_refuses_to_write_into_its_inputs(tiny_llama, tmp_path):
    before = sorted(p.name for p in (tiny_llama / "model").iterdir())
    for out in (tiny_llama / "model", tiny_llama / "model" / "run", tiny_llama / "gsm8k.jsonl"):
        with pytest.raises(ValueError, match="would write over the input"):
            _sft(tiny_llama, out, "--method", "lora", "--max-steps", "1")
    assert sorted(p.name for p in (tiny_llama / "model").iterdir()) == before


def test_sft_eval_data_is_the_test_set(tiny_llama, tmp_path):
    """--eval-data replaces the test split: its rows are answered and scored, and train keeps all its rows but
    the validation slice."""
    rows = [{"question": f"Ann has {n} pears. How many?", "answer": f"#### {n}"} for n in (2, 3, 4, 5)]
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    results, predictions = _sft(tiny_llama, tmp_path / "out", "--method", "lora", "--rank", "4", "--max-steps", "1",
                                "--max-new-tokens", "2", "--eval-data", str(tmp_path / "eval.jsonl"))  # fmt: skip
    assert results["samples"] == {"train": 46, "validation": 2, "test": 4}  # 48 rows, 5% (2) carved for validation
    assert [p["gold"] for p in predictions] == [r["answer"] for r in rows]
    assert results["eval_data"] == str(tmp_path / "eval.jsonl") and results["test"]["n"] == 4


def test_sft_grad_accum_takes_fewer_optimizer_steps(tiny_llama, tmp_path, fit_trainer_args):
    seen = fit_trainer_args
    results, _ = _sft(tiny_llama, tmp_path, "--method", "lora", "--rank", "4", "--epochs", "1", "--grad-accum", "5",
                      "--max-new-tokens", "2")  # fmt: skip
    assert seen[0].gradient_accumulation_steps == 5
    losses = [row["train_loss"] for row in results["history"] if "train_loss" in row]
    assert len(losses) == 40 // (8 * 5)  # one logged loss per optimizer step: 40 rows, batches of 8, 5 per step
    assert len(results["step_seconds"]) == len(losses)  # a step's clock spans its accumulated batches


def test_sft_always_groups_by_length(tiny_llama, tmp_path, fit_trainer_args):
    """sft batches prompts of similar length with or without --group-by-length (answers are short, prompts vary)."""
    seen = fit_trainer_args
    for flag in ([], ["--group-by-length"]):
        _sft(tiny_llama, tmp_path / str(len(flag)), "--method", "lora", "--rank", "4", "--max-steps", "1",
             "--max-new-tokens", "2", *flag)  # fmt: skip
    assert [grouped_by_length(args) for args in seen] == [True, True]
