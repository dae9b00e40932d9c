"""The cache serves a math task the way a real run configures it: the generated math set, the
`math` grader, and the student's chat template (thinking off) applied before tokenizing — the
prompts a rollout replica acquires are the template's token ids and carry symbolic answers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from asyncopd.cache.main import start_cache
from asyncopd.tasks import get_grader
from asyncopd.wire.cache_client import CacheClient
from asyncopd.wire.rpc import channel
from test_cache_harness import make_config, unique_prefix, wipe

pytestmark = pytest.mark.service

ROOT = Path(__file__).resolve().parents[2]
MATH_SMALL = ROOT / "assets" / "math-small.jsonl"
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}"
    "{% endif %}"
)


def chat_student(directory: Path) -> Path:
    """A student directory with a character tokenizer, Qwen3's chat markers and a chat template."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = sorted({chr(c) for c in range(32, 127)} | {"\n"})
    backend = Tokenizer(models.WordLevel({"<unk>": 0, **{c: i + 1 for i, c in enumerate(chars)}}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<|im_end|>")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<think>", "</think>"]})
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(directory)
    (directory / "config.json").write_text(json.dumps({"model_type": "qwen3", "vocab_size": len(tokenizer)}))
    return directory


def test_cache_hands_out_chat_templated_math_prompts(tmp_path: Path) -> None:
    pytest.importorskip("math_verify")
    student = chat_student(tmp_path / "student")
    config = make_config(
        unique_prefix("chat"),
        **{
            "models.student": str(student),
            "task.name": "jsonl",
            "task.source": str(MATH_SMALL),
            "task.grader": "math",
            "task.max_samples": 12,
            "task.chat_template": True,
            "task.enable_thinking": False,
        },
    )
    cache = start_cache(config, "cache-chat", serve_metrics=False)  # the configured task, tokenizer and template
    ch = channel(cache.address)
    try:
        prompts, _, _ = CacheClient(ch, timeout_s=30.0).acquire_prompts("r0", 4)
    finally:
        ch.close()
        cache.stop(grace=0.5)
        wipe(config.redis.url, config.redis.key_prefix)
    assert len(prompts) == 4
    from asyncopd.models.loading import load_tokenizer

    tokenizer = load_tokenizer(str(student))
    records = {r["id"]: r for r in map(json.loads, MATH_SMALL.read_text().splitlines()[:12])}
    grader = get_grader("math")
    for p in prompts:
        record = records[p.prompt_id]
        expected = f"<|im_start|>user\n{record['question']}<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
        assert p.task.prompt_text == expected
        templated = tokenizer.apply_chat_template(
            [{"role": "user", "content": record["question"]}],
            tokenize=True,
            add_generation_prompt=True,
            enable_thinking=False,
            return_dict=False,
        )
        assert p.prompt_ids.tolist() == templated
        assert int(p.prompt_ids[0]) == tokenizer.convert_tokens_to_ids("<|im_start|>")
        assert p.task.task == "math" and p.task.answer == record["answer"]
        assert grader.score(f"so \\boxed{{{record['answer']}}}", p.task.answer) == 1.0
