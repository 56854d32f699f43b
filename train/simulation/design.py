"""Experimental designs of the simulated subject: which image is shown in which session,
run and trial, following NSD's and THINGS-fMRI's own designs (docs/data-formats.md).

NSD: subject 1 sees shared + own images, each ``n_repeats`` times in distinct sessions,
ids 1-based as in ``nsd_expdesign.mat``. THINGS-fMRI: training images once, every test
image once per session. Pure functions of their configs and a generator; the file
writers live in :mod:`brainldm.train.simulation.simulate`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from brainldm.train.simulation.simulate import NsdSimConfig, ThingsSimConfig

TIE_BREAK = 0.5  # random jitter < 1 that only reorders sessions of equal free capacity


def session_schedule(n_items: int, n_repeats: int, n_sessions: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Spread ``n_repeats`` showings of each item over distinct sessions, balanced.

    Returns one shuffled (T / n_sessions,) int64 array of item indices per session.
    """
    total = n_items * n_repeats
    if n_repeats > n_sessions or total % n_sessions:
        raise ValueError(
            f"nsd: n_images x n_repeats = {total} must divide evenly into n_sessions={n_sessions} "
            f"(and n_repeats <= n_sessions)"
        )
    capacity = np.full(n_sessions, total // n_sessions)
    members: list[list[int]] = [[] for _ in range(n_sessions)]
    for item in rng.permutation(n_items):
        # Fullest-capacity sessions first (random tie-break) keeps every session fillable.
        chosen = np.argsort(-(capacity + rng.random(n_sessions) * TIE_BREAK), kind="stable")[:n_repeats]
        capacity[chosen] -= 1
        for s in chosen:
            members[s].append(int(item))
    return [rng.permutation(np.array(m, dtype=np.int64)) for m in members]


def runs_and_trials(n_per_session: list[int], runs_per_session: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """1-based session, run and trial-within-run of every trial, in presentation order."""
    session, run, trial = [], [], []
    for s, n in enumerate(n_per_session, start=1):
        for r, chunk in enumerate(np.array_split(np.arange(n), runs_per_session), start=1):
            session += [s] * len(chunk)
            run += [r] * len(chunk)
            trial += list(range(1, len(chunk) + 1))
    return np.array(session), np.array(run), np.array(trial)


@dataclass(frozen=True)
class NsdDesign:
    """NSD experimental design; all ids 1-based as in nsd_expdesign.mat."""

    subjectim: np.ndarray  # (n_subjects, n_list) int64 73k ids; first the shared images
    sharedix: np.ndarray  # (n_shared,) int64 73k ids
    masterordering: np.ndarray  # (T,) int64 index into a subject's list
    trials_per_session: list[int]


def nsd_design(c: NsdSimConfig, rng: np.random.Generator) -> NsdDesign:
    """Pool roles (shared / subject 1 / others), every subject's list and the master ordering."""
    n_list = c.n_shared_images + c.n_unique_images
    if min(c.n_shared_images, c.n_extra_images) < 0 or min(c.n_unique_images, c.n_subjects) < 1:
        raise ValueError(
            f"nsd: need n_shared_images, n_extra_images >= 0 and n_unique_images, n_subjects >= 1; got "
            f"{c.n_shared_images}, {c.n_extra_images}, {c.n_unique_images}, {c.n_subjects}"
        )
    roles = rng.permutation(n_list + c.n_extra_images)
    shared, others = np.sort(roles[: c.n_shared_images]), roles[c.n_shared_images :]
    # Subject 1 owns the first window of the non-shared pool; the others' windows rotate so all is seen.
    step = max(1, len(others) // c.n_subjects)
    windows = [others[(s * step + np.arange(c.n_unique_images)) % max(1, len(others))] for s in range(c.n_subjects)]
    subjectim = np.stack([np.concatenate([shared, rng.permutation(w)]) for w in windows]) + 1
    sessions = session_schedule(n_list, c.n_repeats, c.n_sessions, rng)
    return NsdDesign(subjectim.astype(np.int64), shared + 1, np.concatenate(sessions) + 1, [len(s) for s in sessions])


def nsd_repeats(design: NsdDesign, n_pool: int, n_repeats: int) -> tuple[np.ndarray, np.ndarray]:
    """Per subject and 73k image: shown at all (8, P) and its 1-based trial numbers (8, P, R), 0 = never."""
    n_subjects = design.subjectim.shape[0]
    seen = np.zeros((n_subjects, n_pool), dtype=np.int64)
    reps = np.zeros((n_subjects, n_pool, n_repeats), dtype=np.int64)
    for s in range(n_subjects):
        seen[s, design.subjectim[s] - 1] = 1
        image_of_trial = design.subjectim[s, design.masterordering - 1] - 1
        order = np.argsort(image_of_trial, kind="stable")  # each image's trials, ascending
        grouped = image_of_trial[order].reshape(-1, n_repeats)
        reps[s, grouped[:, 0]] = (order + 1).reshape(-1, n_repeats)
    return seen, reps


@dataclass(frozen=True)
class ThingsDesign:
    """Per-trial arrays in presentation order (T,): image row, train/test, 1-based session and run."""

    image: np.ndarray
    is_test: np.ndarray
    session: np.ndarray
    run: np.ndarray


def things_design(c: ThingsSimConfig, rng: np.random.Generator) -> ThingsDesign:
    """Training images once each, spread over sessions; every test image once per session.

    Image rows: 0..n_train-1 training, n_train.. test.
    """
    if min(c.n_train_images, c.n_test_images) < 1 or c.n_sessions < 1:
        raise ValueError(f"things: need >= 1 training image, test image and session; got {c}")
    train_session = rng.permutation(np.arange(c.n_train_images) * c.n_sessions // c.n_train_images)
    test_rows = c.n_train_images + np.arange(c.n_test_images)
    per_session = [
        rng.permutation(np.concatenate([np.flatnonzero(train_session == s), test_rows])) for s in range(c.n_sessions)
    ]
    session, run, _ = runs_and_trials([len(p) for p in per_session], c.runs_per_session)
    image = np.concatenate(per_session)
    return ThingsDesign(image=image, is_test=image >= c.n_train_images, session=session, run=run)


def repeats_of_test_images(betas: np.ndarray, design: ThingsDesign) -> np.ndarray:
    """Test trials grouped by image: (n_test, n_sessions, V) float32."""
    test = np.flatnonzero(design.is_test)
    order = test[np.lexsort((design.session[test], design.image[test]))]
    n_test = len(np.unique(design.image[test]))
    return betas[order].reshape(n_test, -1, betas.shape[1])
