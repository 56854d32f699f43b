"""The simulated experimental designs: NSD's repeats in distinct sessions, THINGS' test images."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from brainldm.train.simulation import design as sim_design
from brainldm.train.simulation.simulate import NsdSimConfig, ThingsSimConfig

SMALL_NSD = NsdSimConfig(n_sessions=4, runs_per_session=3, n_unique_images=30, n_shared_images=6,
                         n_extra_images=10, n_repeats=3, n_subjects=3)
SMALL_THINGS = ThingsSimConfig(n_train_images=40, n_test_images=5, n_sessions=4, runs_per_session=2)


def test_session_schedule_spreads_each_item_over_distinct_balanced_sessions():
    sessions = sim_design.session_schedule(12, 3, 4, np.random.default_rng(0))
    assert [len(s) for s in sessions] == [9, 9, 9, 9]
    counts = np.bincount(np.concatenate(sessions), minlength=12)
    assert (counts == 3).all()
    for s in sessions:
        assert len(np.unique(s)) == len(s)  # never twice in one session


@pytest.mark.parametrize("n_items, n_repeats, n_sessions", [(10, 3, 4), (12, 5, 4)])
def test_session_schedule_rejects_impossible_designs(n_items, n_repeats, n_sessions):
    with pytest.raises(ValueError, match="n_sessions"):
        sim_design.session_schedule(n_items, n_repeats, n_sessions, np.random.default_rng(0))


def test_runs_and_trials_number_from_one_within_each_run():
    session, run, trial = sim_design.runs_and_trials([5, 4], 2)
    assert session.tolist() == [1, 1, 1, 1, 1, 2, 2, 2, 2]
    assert run.tolist() == [1, 1, 1, 2, 2, 1, 1, 2, 2]
    assert trial.tolist() == [1, 2, 3, 1, 2, 1, 2, 1, 2]


def test_nsd_design_and_repeats_agree():
    design = sim_design.nsd_design(SMALL_NSD, np.random.default_rng(1))
    n_list = SMALL_NSD.n_shared_images + SMALL_NSD.n_unique_images
    n_pool = n_list + SMALL_NSD.n_extra_images
    assert design.subjectim.shape == (SMALL_NSD.n_subjects, n_list)
    # Every subject's list starts with the shared images; ids are 1-based.
    assert (design.subjectim[:, :SMALL_NSD.n_shared_images] == design.sharedix).all()
    assert design.subjectim.min() >= 1 and design.subjectim.max() <= n_pool
    assert len(design.masterordering) == sum(design.trials_per_session) == n_list * SMALL_NSD.n_repeats
    seen, reps = sim_design.nsd_repeats(design, n_pool, SMALL_NSD.n_repeats)
    assert seen.sum(1).tolist() == [n_list] * SMALL_NSD.n_subjects
    # Subject 1's trial numbers of an image point back at that image in the master ordering.
    image = design.subjectim[0, 7] - 1
    trials = reps[0, image]
    assert (design.subjectim[0, design.masterordering[trials - 1] - 1] - 1 == image).all()
    assert (reps[seen == 0] == 0).all()


def test_nsd_design_rejects_empty_pools():
    with pytest.raises(ValueError, match="n_unique_images"):
        sim_design.nsd_design(replace(SMALL_NSD, n_unique_images=0), np.random.default_rng(0))


def test_things_design_shows_train_once_and_test_every_session():
    design = sim_design.things_design(SMALL_THINGS, np.random.default_rng(2))
    train = design.image[~design.is_test]
    assert sorted(train.tolist()) == list(range(SMALL_THINGS.n_train_images))
    for s in range(1, SMALL_THINGS.n_sessions + 1):
        shown = design.image[design.is_test & (design.session == s)]
        assert sorted(shown.tolist()) == list(range(40, 45))
    betas = np.arange(len(design.image), dtype=np.float32)[:, None] * np.ones((1, 3), np.float32)
    grouped = sim_design.repeats_of_test_images(betas, design)
    assert grouped.shape == (SMALL_THINGS.n_test_images, SMALL_THINGS.n_sessions, 3)
    # Row k holds image 40 + k's trials, in session order.
    trial_of = grouped[:, :, 0].astype(int)
    assert (design.image[trial_of] == (40 + np.arange(5))[:, None]).all()
    assert (np.diff(design.session[trial_of], axis=1) > 0).all()


def test_things_design_rejects_no_test_images():
    with pytest.raises(ValueError, match="test image"):
        sim_design.things_design(replace(SMALL_THINGS, n_test_images=0), np.random.default_rng(0))
