"""Building the wide world's models: the compact training loss is exactly the full-vocabulary
model's, and the expanded 151,936-row model gives the distribution that was trained."""

from __future__ import annotations

import math

import pytest
import torch
from asyncopd.lab.toytrain import wide
from asyncopd.models.chat import chat_formatter
from asyncopd.models.qwen_tokenizer import QWEN3_EMBEDDING_ROWS, build_qwen3_tokenizer
from asyncopd.tasks import get_grader
from asyncopd.tasks.wide import task as wide_task

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def built():  # type: ignore[no-untyped-def]
    tokenizer = build_qwen3_tokenizer()
    corpus = wide.build_corpus(tokenizer, chat_formatter(tokenizer, enable_thinking=False), 12, seed=3)
    settings = wide.WideSettings(role="student", steps=3, batch_size=4, hidden_size=64, soft_targets=True)
    compact, _history = wide.train_compact(settings, corpus, tokenizer, log=lambda _line: None)
    return tokenizer, corpus, compact, wide.expand(compact, settings, corpus.used_ids, tokenizer)


def test_corpus_rows_are_graded_correct_and_long(built) -> None:  # type: ignore[no-untyped-def]
    tokenizer, corpus, _compact, _full = built
    for row in range(corpus.input_ids.shape[0]):
        keep = corpus.labels[row] != -100
        response_ids = corpus.used_ids[corpus.labels[row][keep]].tolist()
        assert response_ids[-1] == tokenizer.eos_token_id == 151645
        assert len(response_ids) >= 256
        text = tokenizer.decode(response_ids[:-1])
        prompt = tokenizer.decode(corpus.used_ids[corpus.input_ids[row][~keep & (corpus.attention_mask[row] > 0)]])
        assert prompt.startswith("<|im_start|>user\n") and prompt.endswith("</think>\n\n")
        assert get_grader("wide").score(text, prompt.split(" ")[-1].split("<")[0]) == 1.0
    # a free choice is marked where an animal follows an animal, and the marked rows are the graph's
    assert int((corpus.after >= 0).sum()) == corpus.input_ids.shape[0] * wide_task.RESPONSE_STEPS
    assert torch.allclose(corpus.transition[corpus.transition.sum(-1) > 0].sum(-1), torch.tensor(1.0))


def test_expanded_model_gives_the_trained_distribution(built) -> None:  # type: ignore[no-untyped-def]
    _tokenizer, corpus, compact, full = built
    assert full.config.vocab_size == QWEN3_EMBEDDING_ROWS and not full.config.tie_word_embeddings
    ids = corpus.input_ids[:2]
    with torch.no_grad():
        small = compact(input_ids=ids).logits
        big = full(input_ids=corpus.used_ids[ids]).logits
    other = QWEN3_EMBEDDING_ROWS - corpus.compact_size
    small_logp = torch.log_softmax(torch.cat([small, torch.full((*small.shape[:-1], 1), math.log(other))], -1), -1)
    big_logp = torch.log_softmax(big.double(), -1)  # float64: sums over 151,855 rows stay exact enough
    # the task's rows, and every other row at logit 0
    assert torch.allclose(big_logp[..., corpus.used_ids].float(), small_logp[..., :-1], atol=1e-4)
    rest = torch.ones(QWEN3_EMBEDDING_ROWS, dtype=torch.bool)
    rest[corpus.used_ids] = False
    assert torch.all(big[..., rest] == 0)
    assert torch.allclose(torch.logsumexp(big_logp[..., rest], -1).float(), small_logp[..., -1], atol=1e-4)
    # and the compact loss is the full model's cross-entropy on the response tokens
    labels = corpus.labels[:2]
    full_ce = torch.nn.functional.cross_entropy(
        big[:, :-1].reshape(-1, QWEN3_EMBEDDING_ROWS),
        torch.where(labels[:, 1:] >= 0, corpus.used_ids[labels[:, 1:].clamp(min=0)], -100).reshape(-1),
        ignore_index=-100,
    )
    assert float(wide.compact_loss(small, labels, other)) == pytest.approx(float(full_ce), rel=1e-5)
