"""Task sources beyond GSM8K files: key mapping, sample limits, graders per task, the generated
math set, Hugging Face datasets (through `datasets`, offline from a local directory), and the
student's chat template applied to prompts."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from asyncopd.config.model import TaskConfig
from asyncopd.models.chat import chat_formatter, prompt_formatter
from asyncopd.tasks import MissingExtraError, get_grader, load_task, mathset

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
MATH_SMALL = ROOT / "assets" / "math-small.jsonl"

DEEPMATH_STYLE = [
    {"problem": "What is 1/4 + 1/4?", "final_answer": "\\frac{1}{2}", "uid": "a"},
    {"problem": "Angle of 45 degrees in radians?", "final_answer": "\\frac{\\pi}{4}", "uid": "b"},
    {"problem": "2 + 2?", "final_answer": 4, "uid": "c"},
]


def _write_jsonl(path: Path, records: list[dict[str, object]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_committed_math_set_is_the_generators_output() -> None:
    lines = MATH_SMALL.read_text().splitlines()
    assert [json.loads(line) for line in lines] == mathset.generate()
    assert len(lines) == mathset.DEFAULT_SIZE
    answers = [json.loads(line)["answer"] for line in lines]
    assert any("\\frac" in a for a in answers) and any("\\pi" in a for a in answers)
    assert any("\\sqrt" in a for a in answers)


def test_math_set_loads_with_the_math_grader_and_its_answers_grade_correct() -> None:
    pytest.importorskip("math_verify")
    config = TaskConfig(name="jsonl", source=str(MATH_SMALL), grader="math", max_samples=30, test_size=12)
    train, test = load_task(config, "train"), load_task(config, "test")
    assert len(train) == 30 and len(test) == 12
    assert {it.grader for it in train} == {"math"}
    grader = get_grader("math")
    assert all(grader.score(f"... so \\boxed{{{it.answer}}}", it.answer) == 1.0 for it in train)
    assert sum(grader.score("\\boxed{0}", it.answer) for it in train) < len(train)


def test_key_mapping_and_symbolic_answers(tmp_path: Path) -> None:
    pytest.importorskip("math_verify")
    path = _write_jsonl(tmp_path / "deep.jsonl", DEEPMATH_STYLE)
    config = TaskConfig(
        name="jsonl",
        source=str(path),
        prompt_key="problem",
        answer_key="final_answer",
        id_key="uid",
        grader="math",
        prompt_template="Problem: {question}\nAnswer:",
    )
    dataset = load_task(config, "train")
    assert [it.prompt_id for it in dataset] == ["a", "b", "c"]
    assert [it.answer for it in dataset] == ["\\frac{1}{2}", "\\frac{\\pi}{4}", "4"]
    assert dataset[0].prompt == "Problem: What is 1/4 + 1/4?\nAnswer:"
    # The same symbolic answers are refused by the numeric grader, with the record named.
    with pytest.raises(ValueError, match=r"record 0.*'final_answer'.*be a number"):
        load_task(config.model_copy(update={"grader": "gsm8k"}), "train")
    with pytest.raises(ValueError, match=r"'prompt'.*task\.prompt_key"):
        load_task(config.model_copy(update={"prompt_key": "prompt"}), "train")


def test_gsm8k_grader_accepts_bare_numbers_and_auto_picks_it_for_files(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "n.jsonl", [{"question": "q", "answer": "1,200"}, {"question": "r", "answer": 3}])
    dataset = load_task(TaskConfig(name="jsonl", source=str(path)), "train")
    assert [(it.answer, it.grader) for it in dataset] == [("1200", "gsm8k"), ("3", "gsm8k")]


def test_math_task_without_math_verify_fails_at_load_naming_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "math_verify", None)
    config = TaskConfig(name="jsonl", source=str(MATH_SMALL), grader="math")
    with pytest.raises(MissingExtraError, match=r"asyncopd\[math\]"):
        load_task(config, "train")


def test_hf_dataset_from_a_local_directory_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("datasets")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    data = tmp_path / "my-math"
    data.mkdir()
    _write_jsonl(data / "train.jsonl", [*DEEPMATH_STYLE, *DEEPMATH_STYLE[:1]])
    _write_jsonl(data / "test.jsonl", DEEPMATH_STYLE[1:])
    config = TaskConfig(
        name="hf",
        source=str(data),
        prompt_key="problem",
        answer_key="final_answer",
        id_key="uid",
        grader="gsm8k",
        max_samples=1,
        test_size=1,
    )
    with pytest.raises(ValueError, match="record 0"):  # \\frac{\\pi}{4} is not a number
        load_task(config, "test")
    train = load_task(config.model_copy(update={"grader": "toy"}), "train")
    assert [it.prompt_id for it in train] == ["a"] and train.name == "my-math-train"
    test = load_task(config.model_copy(update={"grader": "toy", "test_size": 5}), "test")
    assert [it.prompt_id for it in test] == ["b", "c"]
    with pytest.raises(ValueError, match=r"no split 'validation'"):
        load_task(config.model_copy(update={"eval_split": "validation"}), "test")


def test_hf_dataset_without_the_datasets_library_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(MissingExtraError, match=r"asyncopd\[data\]"):
        load_task(TaskConfig(name="hf", source="openai/gsm8k", subset="main"), "train")


# A Qwen3-style template: system turn, user turn, generation prompt; enable_thinking=false
# writes the empty think block, as Qwen3's own template does.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}"
    "{% endif %}"
)


def _chat_model_dir(tmp_path: Path, template: str | None = CHAT_TEMPLATE) -> Path:
    """A character-level tokenizer with Qwen3's chat special tokens, saved as a model directory."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = sorted({chr(c) for c in range(32, 127)} | {"\n"})
    vocab = {"<unk>": 0, **{c: i + 1 for i, c in enumerate(chars)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<|im_end|>")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<think>", "</think>"]})
    if template is not None:
        tokenizer.chat_template = template
    out = tmp_path / "chat-model"
    tokenizer.save_pretrained(out)
    return out


def test_chat_template_wraps_prompts_with_system_turn_and_thinking_off(tmp_path: Path) -> None:
    pytest.importorskip("math_verify")
    model = _chat_model_dir(tmp_path)
    task = TaskConfig(
        name="jsonl",
        source=str(MATH_SMALL),
        grader="math",
        chat_template=True,
        enable_thinking=False,
        system_prompt="Be brief.",
        max_samples=2,
    )
    fmt = prompt_formatter(str(model), task)
    assert fmt is not None
    dataset = load_task(task, "train", fmt)
    question = json.loads(MATH_SMALL.read_text().splitlines()[0])["question"]
    assert dataset[0].prompt == (
        f"<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n{question}<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n\n</think>\n\n"
    )
    # Thinking left to the template, no system prompt: only the user turn and the generation prompt.
    plain = prompt_formatter(str(model), task.model_copy(update={"enable_thinking": None, "system_prompt": None}))
    assert plain is not None and plain("hi") == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    # Tokenized as the cache does (no added special tokens), the template's markers are single ids.
    from asyncopd.models.loading import load_tokenizer

    tokenizer = load_tokenizer(str(model))
    ids = tokenizer(dataset[0].prompt, add_special_tokens=False)["input_ids"]
    start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert ids.count(start) == 3 and ids[0] == start
    assert ids == tokenizer.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": question}],
        tokenize=True,
        add_generation_prompt=True,
        enable_thinking=False,
        return_dict=False,
    )


def test_chat_template_is_off_by_default_and_required_when_on(tmp_path: Path) -> None:
    assert prompt_formatter("assets/toy-student", TaskConfig()) is None
    task = TaskConfig(chat_template=True, test_size=3)
    with pytest.raises(ValueError, match="format_prompt"):
        load_task(task, "test")
    with pytest.raises(ValueError, match="has no chat template"):
        chat_formatter(object(), model="toy")
    toy = load_task(task, "test", lambda text: f"[{text}]")
    assert all(it.prompt.startswith("[Q:") and it.prompt.endswith("]") for it in toy)
