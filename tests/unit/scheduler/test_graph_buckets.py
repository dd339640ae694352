"""CUDA-graph bucket clustering: which short prefills share a padded graph step."""

from __future__ import annotations

import pytest

from scheduler.cost_model import CostModel
from scheduler.graph_buckets import GraphBuckets, parse_grid
from traces.errors import ConfigError

GRID = GraphBuckets((8, 16, 32, 64, 128, 256), (1, 2, 4, 8), max_padding_ratio=0.25)


def members(groups, lengths):
    return [sorted(lengths[i] for i in g.indices) for g in groups]


def test_buckets_round_up_to_the_captured_shapes():
    assert [GRID.length_bucket(n) for n in (1, 8, 9, 100, 256, 257)] == [8, 8, 16, 128, 256, None]
    assert [GRID.batch_bucket(n) for n in (1, 3, 5, 8, 9)] == [1, 4, 8, 8, None]


def test_similar_lengths_share_one_graph_group_padded_to_its_shape():
    lengths = [60, 62, 58, 64]
    (g,) = GRID.plan(lengths)
    assert g.cuda_graph and (g.padded_tokens, g.padded_batch) == (64, 4)
    assert g.real_tokens == 244 and g.shape_tokens == 256
    assert g.padding_ratio == pytest.approx(12 / 256)


def test_the_padding_cap_splits_dissimilar_lengths_and_over_cap_groups_run_eager():
    lengths = [10, 12, 120, 125, 200]
    groups = GRID.plan(lengths)
    graph = [g for g in groups if g.cuda_graph]
    eager = [g for g in groups if not g.cuda_graph]
    for g in graph:
        assert g.padding_ratio <= 0.25
    # 10 alone pads to 16 (37.5%) and with 12 to (16, 2) (31%): over the cap, eager.
    # 12 alone pads to 16 (25%); 120 and 125 share (128, 2); 200 pads to 256 (22%).
    assert members(graph, lengths) == [[12], [120, 125], [200]]
    assert members(eager, lengths) == [[10]]
    assert eager[0].padded_batch == 0 and eager[0].padding_ratio == 0.0


def test_prefills_longer_than_the_grid_and_batches_past_its_largest_size_are_handled():
    lengths = [300, 64, 64, 64, 64, 64, 64, 64, 64, 64]
    groups = GRID.plan(lengths)
    graph = [g for g in groups if g.cuda_graph]
    assert [len(g.indices) for g in graph] == [8, 1]  # the largest captured batch is 8
    assert sorted(lengths[i] for i in groups[-1].indices) == [300]
    assert not groups[-1].cuda_graph
    assert sorted(i for g in groups for i in g.indices) == list(range(10))


def test_with_a_cost_model_graphs_are_kept_only_where_they_are_estimated_faster():
    cm = CostModel.from_names("qwen2.5-32b", "h200")

    def step(news, cached, graph):
        return cm.prefill_time_s(news, cached, cuda_graph=graph)

    grid = GraphBuckets(max_padding_ratio=0.5)
    # Memory-bound: 4 x 16 padded tokens cost the same weight read; the graph saves launches.
    small = [14, 15, 16, 13]
    (g,) = grid.plan(small, None, step)
    assert g.cuda_graph
    assert step([16] * 4, [0] * 4, True) < step(small, [0] * 4, False)
    # Compute-bound: padding 4 x 129 tokens to 4 x 256 costs more than launches save.
    big = [129, 130, 131, 140]
    (g,) = grid.plan(big, None, step)
    assert not g.cuda_graph and g.real_tokens == sum(big)
    assert step([256] * 4, [0] * 4, True) > step(big, [0] * 4, False)
    # Two graph steps cost a weight read more than one eager step of everything.
    mixed = [14, 15, 200, 210]
    groups = grid.plan(mixed, None, step)
    assert len(groups) == 1 and not groups[0].cuda_graph


def test_grid_axes_and_ratio_are_checked():
    assert parse_grid("8, 16,32", "graph_lengths") == (8, 16, 32)
    with pytest.raises(ConfigError, match="graph_lengths: expected positive, strictly increasing"):
        parse_grid("16,8", "graph_lengths")
    with pytest.raises(ConfigError, match="graph_batch_sizes: expected comma-separated"):
        GraphBuckets(batch_sizes="1,two")
    with pytest.raises(ConfigError, match=r"max_padding_ratio: expected a number in \[0, 1\)"):
        GraphBuckets(max_padding_ratio=1.0)
    assert GRID.plan([]) == []
