"""Mask construction by pattern: unstructured, N:M (skip / pad fallback), channel, and pattern parsing."""

from __future__ import annotations

import itertools
import re

import pytest
import torch

from ptsparse.errors import ConfigError
from ptsparse.patterns import NM, Channel, Unstructured, parse_pattern


def random_scores(*shape: int, seed: int = 0) -> torch.Tensor:
    """Distinct non-negative scores (continuous random values never tie)."""
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


def input_groups(shape: torch.Size, m: int):
    """Yields index tuples of every group of m consecutive inputs at a fixed (out, *kernel) position.

    The last group may be partial (fewer than m real inputs). Written with plain loops, independently of
    the implementation's movedim/reshape.
    """
    out, inputs, *kernel = shape
    for o in range(out):
        for position in itertools.product(*(range(k) for k in kernel)):
            for start in range(0, inputs, m):
                yield [(o, i, *position) for i in range(start, min(start + m, inputs))]


def check_group(scores: torch.Tensor, mask: torch.Tensor, group, keep: int) -> None:
    values = [float(scores[index]) for index in group]
    kept = [bool(mask[index]) for index in group]
    assert sum(kept) == keep, f"group {group[0]}: kept {sum(kept)}, expected {keep}"
    highest = sorted(range(len(group)), key=lambda j: values[j], reverse=True)[:keep]
    assert {j for j in range(len(group)) if kept[j]} == set(highest)


# unstructured -------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(8, 16), (4, 3, 3, 3), (5, 2, 7)])
@pytest.mark.parametrize("fraction", [0.0, 0.3, 0.5, 0.9, 1.0])
def test_unstructured_prunes_exactly_the_lowest(shape, fraction):
    scores = random_scores(*shape)
    prune = round(fraction * scores.numel())
    mask = Unstructured().mask(scores, prune)
    assert mask.shape == scores.shape and mask.dtype == torch.bool
    assert int((~mask).sum()) == prune
    lowest = set(torch.argsort(scores.flatten())[:prune].tolist())
    assert set((~mask).flatten().nonzero().flatten().tolist()) == lowest


def test_unstructured_ties_prune_earlier_positions_first():
    scores = torch.zeros(3, 4)
    mask = Unstructured().mask(scores, 5)
    assert (~mask).flatten().tolist() == [True] * 5 + [False] * 7


def test_unstructured_ties_among_partial_equal_scores():
    scores = torch.tensor([[1.0, 0.5, 0.5, 2.0], [0.5, 3.0, 0.5, 0.1]])
    # 0.1 first, then the 0.5s in flat order: (0,1), (0,2), (1,0), (1,2)
    mask = Unstructured().mask(scores, 3)
    expected = torch.ones(2, 4, dtype=torch.bool)
    expected[1, 3] = expected[0, 1] = expected[0, 2] = False
    assert torch.equal(mask, expected)


def test_unstructured_is_deterministic_on_constant_scores():
    scores = torch.ones(16, 16, 3, 3)
    first = Unstructured().mask(scores, 1000)
    second = Unstructured().mask(scores.clone(), 1000)
    assert torch.equal(first, second)
    assert not first.flatten()[:1000].any() and first.flatten()[1000:].all()


# N:M --------------------------------------------------------------------------------------------

NM_CASES = [(2, 4), (1, 4), (4, 8), (1, 2)]
NM_SHAPES = [(6, 16), (4, 8, 3, 3), (3, 16, 1, 1), (2, 8, 2, 3)]


@pytest.mark.parametrize("n, m", NM_CASES)
@pytest.mark.parametrize("shape", NM_SHAPES)
def test_nm_keeps_the_n_highest_of_every_input_channel_group(n, m, shape):
    pattern = NM(n, m)
    scores = random_scores(*shape, seed=n * 10 + m)
    mask = pattern.mask(scores)
    assert mask.shape == scores.shape and mask.dtype == torch.bool
    groups = list(input_groups(scores.shape, m))
    assert len(groups) == scores.numel() // m
    for group in groups:
        check_group(scores, mask, group, n)
    assert pattern.prune_count(scores.shape) == int((~mask).sum()) == scores.numel() * (m - n) // m


def test_nm_groups_run_along_input_channels_not_kernel():
    """2:4 on a conv whose input channels carry the signal: kept weights follow the channel ranking."""
    out, inputs, kh, kw = 2, 4, 3, 3
    # Score grows with the input channel index and is the same at every kernel position, so the groups
    # along input channels keep channels 2 and 3 everywhere; groups along the kernel would not.
    scores = torch.arange(inputs, dtype=torch.float32).view(1, inputs, 1, 1).expand(out, inputs, kh, kw)
    mask = NM(2, 4).mask(scores.contiguous())
    assert not mask[:, :2].any()
    assert mask[:, 2:].all()


def test_nm_linear_groups_are_consecutive_inputs_of_a_row():
    scores = torch.tensor([[4.0, 3.0, 2.0, 1.0, 1.0, 2.0, 3.0, 4.0]])
    mask = NM(2, 4).mask(scores)
    assert mask.tolist() == [[True, True, False, False, False, False, True, True]]


def test_nm_ties_keep_earlier_positions():
    mask = NM(2, 4).mask(torch.zeros(2, 8))
    assert mask.tolist() == [[True, True, False, False] * 2] * 2


def test_nm_checks_the_prune_count():
    pattern = NM(2, 4)
    scores = random_scores(4, 8)
    assert int((~pattern.mask(scores, prune=16)).sum()) == 16
    with pytest.raises(ValueError, match="16"):
        pattern.mask(scores, prune=15)


@pytest.mark.parametrize("shape", [(4, 6), (4, 10, 3, 3), (8, 5)])
def test_nm_skip_leaves_non_multiple_layer_dense(shape):
    pattern = NM(2, 4, "skip")
    scores = random_scores(*shape)
    assert not pattern.eligible(torch.Size(shape))
    assert pattern.prune_count(torch.Size(shape)) == 0
    mask = pattern.mask(scores)
    assert mask.shape == scores.shape and mask.all()


@pytest.mark.parametrize("n, m, inputs", [(2, 4, 6), (2, 4, 7), (2, 4, 5), (1, 4, 6), (4, 8, 11), (4, 8, 13),
                                          (1, 2, 5)])
@pytest.mark.parametrize("kernel", [(), (3, 3)])
def test_nm_pad_partial_group_keeps_min_n_r(n, m, inputs, kernel):
    pattern = NM(n, m, "pad")
    shape = torch.Size((3, inputs, *kernel))
    scores = random_scores(*shape, seed=inputs)
    mask = pattern.mask(scores)
    rest = inputs % m
    for group in input_groups(shape, m):
        keep = n if len(group) == m else min(n, rest)
        check_group(scores, mask, group, keep)
    positions = shape.numel() // inputs
    expected = positions * ((inputs // m) * (m - n) + max(0, rest - n))
    assert pattern.prune_count(shape) == expected == int((~mask).sum())


def test_nm_pad_with_negative_scores_still_keeps_real_weights():
    """Virtual padding ranks below every real score, even negative ones."""
    scores = -torch.arange(1.0, 7.0).view(1, 6)  # -1 .. -6; partial group holds -5, -6
    mask = NM(2, 4, "pad").mask(scores)
    assert mask.tolist() == [[True, True, False, False, True, True]]


def test_nm_pad_layer_that_is_a_multiple_matches_skip():
    scores = random_scores(4, 8, 3, 3)
    assert torch.equal(NM(2, 4, "pad").mask(scores), NM(2, 4, "skip").mask(scores))


@pytest.mark.parametrize("fallback", ["skip", "pad"])
@pytest.mark.parametrize("n, m", NM_CASES)
def test_nm_depthwise_is_never_eligible(fallback, n, m):
    pattern = NM(n, m, fallback)
    shape = torch.Size((16, 1, 3, 3))  # depthwise: one input channel per group
    assert not pattern.eligible(shape)
    assert pattern.prune_count(shape) == 0
    assert pattern.mask(random_scores(*shape)).all()


@pytest.mark.parametrize("fallback", ["skip", "pad"])
def test_nm_stem_with_fewer_inputs_than_m_is_never_eligible(fallback):
    for inputs in (1, 3):
        shape = torch.Size((8, inputs, 3, 3))
        pattern = NM(2, 4, fallback)
        assert not pattern.eligible(shape)
        assert pattern.prune_count(shape) == 0
        assert pattern.mask(random_scores(*shape)).all()


def test_nm_name_and_unit():
    assert NM(2, 4).name == "2:4"
    assert NM(2, 4).unit_size(torch.Size((8, 8))) == 1


# channel --------------------------------------------------------------------------------------------

def test_channel_prunes_rows_with_lowest_summed_score():
    scores = torch.tensor([
        [1.0, 1.0, 1.0],   # 3
        [5.0, 0.0, 0.0],   # 5
        [0.0, 0.5, 0.5],   # 1 (lowest)
        [0.0, 0.0, 9.0],   # 9 (highest)
        [2.0, 0.0, 0.0],   # 2
    ])
    mask = Channel().mask(scores, 2 * 3)
    assert mask.shape == scores.shape
    assert mask.all(1).tolist() == [True, True, False, True, False]
    assert (mask.all(1) | ~mask.any(1)).all()  # every row is all kept or all pruned


def test_channel_on_conv_zeros_whole_filters():
    scores = random_scores(6, 2, 3, 3)
    scores[4] *= 0.01
    scores[1] *= 0.02
    pattern = Channel()
    assert pattern.unit_size(scores.shape) == 18
    mask = pattern.mask(scores, 2 * 18)
    assert int((~mask).sum()) == 36
    pruned = [c for c in range(6) if not mask[c].any()]
    assert pruned == [1, 4]
    assert all(mask[c].all() for c in range(6) if c not in pruned)
    sums = scores.flatten(1).sum(1)
    assert set(pruned) == set(torch.argsort(sums)[:2].tolist())


def test_channel_rounds_prune_count_down_to_whole_channels():
    scores = random_scores(5, 4)
    mask = Channel().mask(scores, 7)  # one channel of 4, not two
    assert int((~mask).sum()) == 4


def test_channel_ties_prune_earlier_channels():
    mask = Channel().mask(torch.ones(4, 3), 6)
    assert mask.all(1).tolist() == [False, False, True, True]


# parse_pattern --------------------------------------------------------------------------------------

def test_channel_multiple_prunes_channels_in_groups_where_the_width_allows():
    pattern = Channel(multiple=4)
    assert pattern.unit_size(torch.Size([16, 2, 3, 3])) == 4 * 18
    assert pattern.unit_size(torch.Size([10, 6])) == 6  # 10 channels: not a multiple of 4, single channels
    scores = torch.arange(16 * 18, dtype=torch.float32).view(16, 2, 3, 3)
    keep = pattern.mask(scores, 7 * 18)  # 7 channels' worth rounds down to one group of 4
    assert keep.flatten(1).all(1).tolist() == [False] * 4 + [True] * 12
    assert pattern.pruned_channels(9 * 18, scores.shape) == 8


def test_parse_pattern_valid():
    assert parse_pattern("unstructured") == Unstructured()
    assert parse_pattern("channel") == Channel()
    assert parse_pattern("2:4") == NM(2, 4, "skip")
    assert parse_pattern("1:4", "pad") == NM(1, 4, "pad")
    assert parse_pattern(" 4 : 8 ") == NM(4, 8, "skip")


@pytest.mark.parametrize("spec", ["4:4", "5:4", "0:4", "2:0", "garbage", "2-4", "2:4:8", "", "a:b", "-1:4",
                                  "Unstructured"])
def test_parse_pattern_rejects_bad_spec(spec):
    with pytest.raises(ConfigError, match=re.escape(repr(spec))):
        parse_pattern(spec)


@pytest.mark.parametrize("spec", [24, None, 2.4])
def test_parse_pattern_rejects_non_strings(spec):
    with pytest.raises(ConfigError, match=re.escape(repr(spec))):
        parse_pattern(spec)


@pytest.mark.parametrize("fallback", ["zero", "", "PAD"])
def test_parse_pattern_rejects_bad_fallback(fallback):
    with pytest.raises(ConfigError, match=re.escape(repr(fallback))):
        parse_pattern("2:4", fallback)
