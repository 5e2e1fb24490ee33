"""Curriculum learning: order training from simple to complex by a per-sequence score.

Pipeline: a profiling pass (`tools/profile_curriculum.py`, `profile_scores` here) runs a
checkpoint over the training samples and scores each sequence (adaptive gating: share of
tokens that took two or more experts, averaged over MoE layers; DynaMoE: mean difficulty
level); the scores file records them with their provenance; `CurriculumOrder` turns them into
an order of the training samples; `curriculum_source` wraps a dataset into the trainer's
`BatchSource`.

Resumption is exact because the order is a pure function of (scores, mode, window, seed)
and the trainer's BatchSource is a pure function of the global sample position: position p
always reads dataset sample `order[p]`, whatever the data-parallel size or restart point.

Scores file (`.json`, or `.npz` for large runs; same fields): format tag, version, `metric`,
`indices` (dataset sample indices, unique, >= 0), `scores` (finite floats, same length) and a
free-form `provenance` dict (checkpoint, data, sequence length, sample count, ...).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Sequence

import numpy as np

FORMAT = "megatron-dynamoe-curriculum-scores"
VERSION = 1
MODES = ("window", "global")


class CurriculumError(ValueError):
    """A scores file or a curriculum setting is unusable (reported as one line by tools)."""


@dataclass
class CurriculumScores:
    """Per-sample difficulty scores: `indices[i]` (dataset sample) has `scores[i]`."""

    indices: np.ndarray
    scores: np.ndarray
    metric: str
    provenance: Dict = field(default_factory=dict)

    def __post_init__(self):
        self.indices = np.asarray(self.indices)
        self.scores = np.asarray(self.scores)
        if self.indices.ndim != 1 or self.scores.ndim != 1:
            raise CurriculumError("indices and scores must be 1-D lists")
        if len(self.indices) != len(self.scores):
            raise CurriculumError(f"{len(self.indices)} indices but {len(self.scores)} scores")
        if len(self.indices) == 0:
            raise CurriculumError("the scores file scores no sample")
        if not np.issubdtype(self.indices.dtype, np.integer):
            raise CurriculumError(f"indices must be integers, got {self.indices.dtype}")
        if not np.issubdtype(self.scores.dtype, np.number):
            raise CurriculumError(f"scores must be numbers, got {self.scores.dtype}")
        self.indices = self.indices.astype(np.int64)
        self.scores = self.scores.astype(np.float64)
        if self.indices.min() < 0:
            raise CurriculumError(f"negative sample index {int(self.indices.min())}")
        if len(np.unique(self.indices)) != len(self.indices):
            raise CurriculumError("sample indices are not unique")
        bad = ~np.isfinite(self.scores)
        if bad.any():
            raise CurriculumError(f"score of sample {int(self.indices[bad][0])} is not finite")
        if not isinstance(self.metric, str) or not self.metric:
            raise CurriculumError("the scores file names no metric")
        if not isinstance(self.provenance, dict):
            raise CurriculumError("provenance must be a JSON object")


def save_scores(path: str, scores: CurriculumScores) -> None:
    """Write `scores` to `path` (.json or .npz) atomically (temporary file, then rename)."""
    from megatron_dynamoe.utils.outputs import atomic_file

    if not path.endswith((".json", ".npz")):
        raise CurriculumError(f"{path}: name a .json or .npz scores file")
    header = dict(format=FORMAT, version=VERSION, metric=scores.metric,
                  provenance=scores.provenance)
    with atomic_file(path) as tmp:
        if path.endswith(".json"):
            with open(tmp, "w") as f:
                json.dump(dict(header, indices=scores.indices.tolist(),
                               scores=scores.scores.tolist()), f)
        else:
            with open(tmp, "wb") as f:
                np.savez(f, indices=scores.indices, scores=scores.scores,
                         header=np.array(json.dumps(header)))


def load_scores(path: str) -> CurriculumScores:
    """Read and validate a scores file; CurriculumError names what is wrong."""
    if not os.path.isfile(path):
        raise CurriculumError(f"scores file {path!r} does not exist (write it with "
                              f"tools/profile_curriculum.py)")
    try:
        if path.endswith(".npz"):
            with np.load(path, allow_pickle=False) as data:
                raw = json.loads(str(data["header"]))
                raw.update(indices=data["indices"], scores=data["scores"])
        else:
            with open(path) as f:
                raw = json.load(f)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CurriculumError(f"{path} is not a readable scores file: {e}") from e
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise CurriculumError(f"{path} is not a curriculum scores file (format {FORMAT!r})")
    if raw.get("version") != VERSION:
        raise CurriculumError(f"{path} has version {raw.get('version')}, this code reads "
                              f"version {VERSION}")
    missing = [k for k in ("metric", "indices", "scores") if k not in raw]
    if missing:
        raise CurriculumError(f"{path} lacks {missing}")
    try:
        return CurriculumScores(np.asarray(raw["indices"]), np.asarray(raw["scores"]),
                                raw["metric"], raw.get("provenance", {}))
    except CurriculumError as e:
        raise CurriculumError(f"{path}: {e}") from e


class CurriculumOrder:
    """Training order of the scored samples, from simple (low score) to complex.

    Modes (ties are broken by sample index, so the order is deterministic):
    - 'window': the uncurriculated order (`scores.indices` as given, normally the dataset's
      own shuffled order) is cut into consecutive windows of `window` samples and each
      window is sorted by ascending score: every window goes from simple to complex and the
      data mix across windows is unchanged.
    - 'global': all samples sorted by ascending score, then shuffled (seeded by `seed`)
      within consecutive windows of `window` samples, so the run goes from simple to complex
      overall while each window (e.g. a global batch) mixes samples of similar difficulty.
    """

    def __init__(self, scores: CurriculumScores, window: int, mode: str = "window",
                 seed: int = 0):
        if mode not in MODES:
            raise CurriculumError(f"curriculum mode {mode!r}: choose one of {MODES}")
        if window < 1:
            raise CurriculumError(f"curriculum window must be >= 1, got {window}")
        self.scores, self.window, self.mode, self.seed = scores, int(window), mode, int(seed)
        idx, val = scores.indices, scores.scores
        if mode == "window":
            parts = []
            for start in range(0, len(idx), self.window):
                i, v = idx[start:start + self.window], val[start:start + self.window]
                parts.append(i[np.lexsort((i, v))])
            order = np.concatenate(parts)
        else:
            order = idx[np.lexsort((idx, val))]
            rng = np.random.Generator(np.random.PCG64(self.seed))
            for start in range(0, len(order), self.window):
                order[start:start + self.window] = rng.permutation(
                    order[start:start + self.window])
        self.order = order

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, position: int) -> int:
        """Dataset sample index trained at global sample position `position`."""
        if not 0 <= position < len(self.order):
            raise CurriculumError(f"sample position {position} is beyond the {len(self.order)} "
                                  f"scored samples: profile as many samples as the run trains "
                                  f"(train_iters x global_batch_size)")
        return int(self.order[position])

    def check_covers(self, num_positions: int, dataset_size: int) -> None:
        """Raise unless the order covers positions [0, num_positions) with samples that
        exist in a dataset of `dataset_size` samples."""
        if num_positions > len(self.order):
            raise CurriculumError(f"the run trains {num_positions} samples but the scores file "
                                  f"scores {len(self.order)}: profile the same dataset and "
                                  f"sample count as the run")
        if int(self.order.max()) >= dataset_size:
            raise CurriculumError(f"scored sample {int(self.order.max())} does not exist in the "
                                  f"dataset of {dataset_size} samples: profile this dataset")


def curriculum_source(get_sample: Callable[[int], Dict], order: CurriculumOrder,
                      collate: Optional[Callable[[Sequence[Dict]], Dict]] = None):
    """The trainer's BatchSource in curriculum order: `source(position, micro_batch_size)`
    collates samples order[position], ..., order[position + micro_batch_size - 1] (a pure
    function of the position, hence exact resumption). `get_sample` is e.g. a dataset's
    `__getitem__`; `collate` defaults to `data.sampling.collate_samples`."""
    if collate is None:
        from megatron_dynamoe.data.sampling import collate_samples as collate

    def source(position: int, micro_batch_size: int) -> Dict:
        return collate([get_sample(order[p]) for p in range(position,
                                                            position + micro_batch_size)])

    return source


# ---- profiling ------------------------------------------------------------------------------
def sequence_scores(model) -> np.ndarray:
    """Per-sequence scores [b] of the model's last forward, averaged over its MoE layers:
    the share of tokens that took two or more experts (adaptive routers), or the mean
    difficulty level (DynaMoE layers; their statistics cover the whole micro-batch, so
    profile them one sequence per forward)."""
    import torch

    from megatron_dynamoe.adaptive.provider import adaptive_layers
    from megatron_dynamoe.dynamoe.control import dynamoe_layers

    # Per-layer scores are computed where the statistics live and copied to the host once.
    per_layer = []
    for layer in adaptive_layers(model):
        experts = layer.router.last_stats["experts_per_token"]               # [s, b]
        per_layer.append((experts >= 2).double().mean(dim=0))
    for layer in dynamoe_layers(model):
        counts = layer.last_stats["level_counts"].double()
        levels = torch.arange(1, len(counts) + 1, dtype=torch.float64, device=counts.device)
        per_layer.append(((counts * levels).sum() / counts.sum()).reshape(1))
    if not per_layer:
        raise CurriculumError("the model has no adaptive-gating or DynaMoE layer to profile")
    host = torch.cat(per_layer).cpu().numpy()
    sizes = np.cumsum([len(p) for p in per_layer])[:-1]
    return np.mean(np.stack(np.split(host, sizes)), axis=0)


def profile_scores(model, batches: Iterable[Dict], metric: str, indices: Sequence[int],
                   provenance: Optional[Dict] = None) -> CurriculumScores:
    """Run `model` (eval mode, no gradients) over `batches`, whose sequences are the dataset
    samples `indices` in order, and score each sequence with `sequence_scores`."""
    import torch

    values: List[float] = []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in batches:
                model(batch["tokens"], batch["position_ids"], batch["attention_mask"])
                batch_scores = sequence_scores(model)
                if len(batch_scores) != batch["tokens"].shape[0]:
                    raise CurriculumError("DynaMoE statistics cover a whole micro-batch: "
                                          "profile with one sequence per batch")
                values.extend(batch_scores.tolist())
    finally:
        model.train(was_training)
    if len(values) != len(indices):
        raise CurriculumError(f"{len(values)} sequences were scored for {len(indices)} indices")
    return CurriculumScores(np.asarray(indices), np.asarray(values), metric, provenance or {})
