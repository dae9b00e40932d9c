"""A fixed-staleness OPD trainer in one process, on the pipeline's real code paths.

The full pipeline (`asyncopd run`) yields a *distribution* of staleness under a bound; the study
needs staleness fixed: at rollout batch t (the student after t batches), the rollouts come from
the student of version max(0, t - s). A version is one rollout batch, on which the trainer takes
`learner.mini_batches` optimizer steps with π_prox fixed for the batch (the paper code counts
versions the same way). `StalenessHarness` builds that from the project's own parts:

- generation: `TransformersEngine` holding a second copy of the student, with the support the
  configured estimator needs (`rollout.main.support_for`: student top-K or N MC draws with
  their behaviour log-probs) and the run's sampling (`rollout.main.sampling_from_config`);
- scoring: `TeacherScorer` with the pipeline's teacher top-K and tail (`teacher.main`);
- training: the real `Trainer` with `OPDLoss`, built from the config by `trainer_from_config`
  exactly as the learner service builds its own;
- weights: a ring of the last s + 1 student snapshots (`SnapshotRing`), loaded into the engine
  through `Engine.load_weights` exactly as a weight update reaches a rollout replica;
- accuracy: `asyncopd.evaluation.greedy.evaluate` (greedy) on a fixed test subset;
- closeness to the teacher: the dense KL(π‖p) over the full vocabulary on a fixed held-out set
  of the teacher's sampled responses to test prompts (`held_out`), chunked over positions.

Prompts go through the student's chat template when the task asks for one
(`task.chat_template`, as the cache and the evaluator format them).

The version each step's rollouts were generated with is read back from the rollouts themselves
(`Rollout.versions`, stamped by the engine), so `CellResult.behaviour_versions` is a
measurement, not a restatement of the formula. So is the drift: for estimators that record
log μ, `metrics["drift"]` holds per batch the mean (log π_θ/μ)² over the first mini-batch's
samples, measured by the loss before any update on that batch — the staleness in log-ratio
units rather than versions. Same config (seed included) => same result.

It knows the project's model/engine/scorer/trainer classes; it knows nothing of Redis, gRPC,
plots or the study's plan.
"""

from __future__ import annotations

import dataclasses
import random
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from asyncopd.cache.prompts import PromptCatalog
from asyncopd.config import RunConfig
from asyncopd.evaluation.greedy import evaluate
from asyncopd.lab.study.held_out import held_out_stats, sample_held_out
from asyncopd.learner.trainer import trainer_from_config
from asyncopd.models.chat import prompt_formatter
from asyncopd.models.loading import check_same_tokenizer, load_model, load_tokenizer
from asyncopd.opd import estimator_spec
from asyncopd.records import Prompt, Rollout, ScoredSample
from asyncopd.rollout.main import sampling_from_config, support_for
from asyncopd.rollout.sampling import Sampling
from asyncopd.rollout.transformers_engine import TransformersEngine
from asyncopd.tasks import PromptItem, load_task
from asyncopd.teacher.main import teacher_topk
from asyncopd.teacher.scorer import TeacherScorer

Weights = list[tuple[str, Tensor]]

HELD_OUT_SEED = 7_919
"""Sampling seed of the held-out set: fixed, so every cell of a config (any seed) sees the same sequences."""


def behaviour_version(step: int, staleness: int) -> int:
    """The student version that generates the rollouts of learner step `step` (0-based)."""
    if step < 0 or staleness < 0:
        raise ValueError(f"step ({step}) and staleness ({staleness}) must be >= 0")
    return max(0, step - staleness)


class SnapshotRing:
    """The last `staleness + 1` student weight snapshots, keyed by version."""

    def __init__(self, staleness: int) -> None:
        if staleness < 0:
            raise ValueError(f"staleness must be >= 0, got {staleness}")
        self.staleness = staleness
        self._snapshots: dict[int, Weights] = {}

    def push(self, version: int, named_tensors: Iterable[tuple[str, Tensor]]) -> None:
        """Keep a detached copy of the weights of `version`; forget what no later step needs."""
        if self._snapshots and version <= max(self._snapshots):
            raise ValueError(f"snapshot versions must increase: got {version} after {max(self._snapshots)}")
        self._snapshots[version] = [(name, t.detach().clone()) for name, t in named_tensors]
        for old in [v for v in self._snapshots if v < version - self.staleness]:
            del self._snapshots[old]

    def versions(self) -> list[int]:
        return sorted(self._snapshots)

    def for_step(self, step: int) -> tuple[int, Weights]:
        """(version, weights) that generate the rollouts of learner step `step`."""
        version = behaviour_version(step, self.staleness)
        if version not in self._snapshots:
            raise KeyError(f"step {step} needs version {version}; the ring holds {self.versions()}")
        return version, self._snapshots[version]


@dataclass
class StudyModels:
    """What every cell of one config shares: tokenizer, teacher scorer, test items, train items,
    and the held-out sequences of the dense KL.

    Built once per process (`load_study_models`); the student is loaded fresh for every cell.
    """

    tokenizer: PreTrainedTokenizerBase
    teacher: PreTrainedModel
    scorer: TeacherScorer
    test_items: list[PromptItem]
    train_items: list[PromptItem]
    held_out: list[Rollout] = field(default_factory=list)


def _tokenize(tokenizer: PreTrainedTokenizerBase) -> Callable[[str], list[int]]:
    def tokenize(text: str) -> list[int]:
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    return tokenize


def load_study_models(config: RunConfig, test_size: int, held_out_size: int = 0) -> StudyModels:
    """The teacher (after the pipeline's tokenizer check), the test subset, the train prompts
    (both through the student's chat template when the task asks for it) and `held_out_size`
    teacher samples on the first test prompts."""
    tokenizer = load_tokenizer(config.models.student)
    check_same_tokenizer(tokenizer, load_tokenizer(config.models.teacher))
    teacher = load_model(config.models.teacher, config.models.dtype, config.teacher.device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    scorer = TeacherScorer(teacher, "study-teacher", config.teacher.max_batch_tokens, pad_id=int(pad))
    chat = prompt_formatter(config.models.student, config.task)
    test = list(load_task(config.task, "test", chat))
    train_items = list(load_task(config.task, "train", chat))
    held_out: list[Rollout] = []
    if held_out_size > 0:
        catalog = PromptCatalog(test[:held_out_size], _tokenize(tokenizer), int(teacher.config.vocab_size), seed=0)
        prompts = [catalog.prompt(pos, "", 0) for pos in range(min(held_out_size, len(test)))]
        engine = TransformersEngine(teacher, tokenizer, "study-held-out", max_model_len=config.rollout.max_model_len)
        sampling = dataclasses.replace(sampling_from_config(config), seed=HELD_OUT_SEED)
        held_out = sample_held_out(engine, prompts, sampling)
    return StudyModels(tokenizer, teacher, scorer, test[:test_size], train_items, held_out)


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


@dataclass
class CellResult:
    """One trained cell: its accuracy, per-step KL and the versions its rollouts came from."""

    staleness: int
    seed: int
    steps: int
    accuracy: float
    kl: list[float]
    behaviour_versions: list[int]
    learner_versions: list[int]
    seconds: float
    eval_seconds: float
    metrics: dict[str, list[float]] = field(default_factory=dict)
    held_out: dict[str, float] = field(default_factory=dict)
    """`held_out_stats` of the trained student (`reverse_kl` = dense KL(π‖p)); empty without a held-out set."""


class StalenessHarness:
    """Trains one fresh student with every step's rollouts exactly `staleness` versions old."""

    def __init__(self, config: RunConfig, staleness: int, shared: StudyModels) -> None:
        if config.learner.mini_batches > config.learner.batch_size:
            raise ValueError(
                f"learner.mini_batches={config.learner.mini_batches} > learner.batch_size="
                f"{config.learner.batch_size}: every optimizer step needs at least one rollout"
            )
        self.config = config
        self.mini_batches = config.learner.mini_batches
        self.staleness = staleness
        self.shared = shared
        seed_everything(config.seed)
        mc = config.models
        tokenizer = shared.tokenizer
        self.pad_id = int(tokenizer.pad_token_id or 0)
        student = load_model(mc.student, mc.dtype, config.learner.device)
        # kinds that need dense teacher logits train against the shared (frozen) teacher
        teacher = shared.teacher if estimator_spec(config.loss.kind).needs_teacher_logits else None
        self.trainer = trainer_from_config(config, student, pad_id=self.pad_id, teacher=teacher)
        engine_model = load_model(mc.student, mc.dtype, config.rollout.device)
        self.engine = TransformersEngine(
            engine_model, tokenizer, "study-rollout", max_model_len=config.rollout.max_model_len
        )
        self.ring = SnapshotRing(staleness)
        self.ring.push(self.version, self.trainer.named_weights())
        vocab = int(student.config.vocab_size)

        # the cache's prompt catalog, its epoch shuffle seeded by the cell's seed
        self.catalog = PromptCatalog(shared.train_items, _tokenize(tokenizer), vocab, seed=config.seed)
        self.support_kind, self.support_k = support_for(config.loss)
        self.teacher_topk = teacher_topk(config)
        self.teacher_tail = config.teacher.tail and self.teacher_topk > 0
        self.sampling = sampling_from_config(config)

    @property
    def version(self) -> int:
        """Rollout batches trained so far (the trainer counts optimizer steps: mini_batches per batch)."""
        return self.trainer.version // self.mini_batches

    def prompts(self, step: int) -> list[Prompt]:
        """The batch of step `step`: consecutive positions of the catalog, as the cache hands them out."""
        size = self.config.learner.batch_size
        return [self.catalog.prompt(pos, "", self.version) for pos in range(step * size, (step + 1) * size)]

    def rollouts(self, step: int) -> list[Rollout]:
        """Generate step `step`'s rollouts with the ring's version max(0, step - s)."""
        version, weights = self.ring.for_step(step)
        if self.engine.version != version:
            self.engine.load_weights(version, weights)
        return self.engine.generate(self.prompts(step), self.sampling_for(step), self.support_kind, self.support_k)

    def sampling_for(self, step: int) -> Sampling:
        """The run's sampling with a distinct, nonzero seed per (cell seed, step): reruns draw the same tokens."""
        return dataclasses.replace(self.sampling, seed=1 + self.config.seed * 1_000_003 + step)

    def score(self, rollouts: Sequence[Rollout]) -> list[ScoredSample]:
        scores = self.shared.scorer.score(rollouts, self.teacher_topk, self.teacher_tail)
        return [ScoredSample(r, s) for r, s in zip(rollouts, scores, strict=True)]

    def evaluate(self) -> tuple[float, float]:
        """(greedy test accuracy, seconds) of the learner's current student."""
        model = self.trainer.model
        result = evaluate(
            model,  # type: ignore[arg-type]
            self.shared.tokenizer,
            self.shared.test_items,
            self.config.rollout.sampling.max_tokens,
        )
        return result.accuracy, result.seconds

    def held_out(self) -> dict[str, float]:
        """Dense KL(π‖p) of the learner's current student on the shared held-out set ({} without one)."""
        if not self.shared.held_out:
            return {}
        return held_out_stats(self.trainer.model, self.shared.teacher, self.shared.held_out)

    def run(self, steps: int, *, evaluate_at_end: bool = True) -> CellResult:
        start = time.perf_counter()
        kl: list[float] = []
        behaviour: list[int] = []
        learner: list[int] = []
        metrics: dict[str, list[float]] = {}
        for step in range(steps):
            if self.trainer.version != step * self.mini_batches:
                raise AssertionError(f"learner at optimizer step {self.trainer.version} at batch {step}")
            rollouts = self.rollouts(step)
            versions = {int(v) for r in rollouts for v in r.versions}
            if len(versions) != 1:
                raise AssertionError(f"step {step}: rollouts carry several versions {sorted(versions)}")
            behaviour.append(versions.pop())
            learner.append(self.version)
            every = self.trainer.train(self.score(rollouts))
            if len(every) != self.mini_batches:
                raise AssertionError(f"batch {step}: {len(every)} optimizer steps, expected {self.mini_batches}")
            stats = every[-1]
            self.ring.push(self.version, self.trainer.named_weights())
            if "log_ratio_sq_mean" in every[0].metrics:
                metrics.setdefault("drift", []).append(float(every[0].metrics["log_ratio_sq_mean"]))
            kl.append(float(stats.metrics.get("kl", float("nan"))))
            for name in ("ratio_mean", "clipped_fraction", "masked_fraction"):
                if name in stats.metrics:
                    metrics.setdefault(name, []).append(float(stats.metrics[name]))
            metrics.setdefault("grad_norm", []).append(stats.grad_norm)
        train_seconds = time.perf_counter() - start
        accuracy, eval_seconds = self.evaluate() if evaluate_at_end else (float("nan"), 0.0)
        held_out = self.held_out() if evaluate_at_end else {}
        return CellResult(
            staleness=self.staleness,
            seed=self.config.seed,
            steps=steps,
            accuracy=accuracy,
            kl=kl,
            behaviour_versions=behaviour,
            learner_versions=learner,
            seconds=train_seconds,
            eval_seconds=eval_seconds,
            metrics=metrics,
            held_out=held_out,
        )
