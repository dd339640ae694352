"""Length classification: uncached tokens, static and adaptive (cost-model) thresholds."""

from __future__ import annotations

import dataclasses

import pytest

from scheduler.cost_model import CostModel
from scheduler.length import LengthClassifier, RooflineTerms, crossover_tokens
from tests.unit.scheduler.policy_fakes import FakeInstance, req
from traces.errors import ConfigError


class CachingInstance(FakeInstance):
    """A fake instance holding the first ``blocks`` blocks of every request."""

    def __init__(self, instance_id: int = 0, blocks: int = 0, **kw):
        super().__init__(instance_id, **kw)
        self.blocks = blocks

    def cached_prefix_blocks(self, request) -> int:
        return min(self.blocks, len(request.prefix_hashes or ()))


def test_uncached_tokens_subtract_the_prefix_the_instance_holds():
    r = req(hashes=range(20), block=16)  # 320 tokens
    assert LengthClassifier.uncached_tokens(r, CachingInstance(blocks=0)) == (320, 0)
    assert LengthClassifier.uncached_tokens(r, CachingInstance(blocks=15)) == (80, 240)
    assert LengthClassifier.uncached_tokens(r, None) == (320, 0)
    # A fully cached prompt still computes one token.
    assert LengthClassifier.uncached_tokens(r, CachingInstance(blocks=20)) == (1, 320)
    # No hashes: nothing can be cached.
    assert LengthClassifier.uncached_tokens(req(prompt=300), CachingInstance(blocks=5)) == (300, 0)


def test_static_threshold_classifies_by_uncached_tokens_inclusive():
    c = LengthClassifier(256)
    long_prompt = req(hashes=range(40), block=16)  # 640 tokens
    assert c.classify(long_prompt, CachingInstance(blocks=0)) == (False, 640, 0)
    assert c.classify(long_prompt, CachingInstance(blocks=24)) == (True, 256, 384)
    assert not c.is_short(257)
    with pytest.raises(ConfigError, match="threshold_tokens: expected an integer >= 1; got 0"):
        LengthClassifier(0)


def test_adaptive_threshold_is_the_crossover_of_compute_and_memory_time():
    cm = CostModel.from_names("qwen2.5-32b", "h200")
    terms = RooflineTerms.from_coefficients(cm.coefficients)

    def comp(n, h):
        return terms.a * n * (n + 2 * h) + terms.b * n + terms.e

    def mem(n, h):
        return terms.w + terms.c * n + terms.d * h

    c = LengthClassifier(adaptive=True, cost=cm)
    previous = None
    for h in (0, 1024, 8192, 32768):
        n = c.threshold_for(h)
        assert comp(n, h) >= mem(n, h) > comp(n - 1, h)
        if previous is not None:
            assert n < previous  # attention over a longer prefix makes compute win sooner
        previous = n
    # It is the cost model's own crossover (one definition).
    for h in (0, 4096):
        assert terms.crossover_tokens(h) == cm.prefill_crossover_tokens(h)


def test_adaptive_threshold_follows_new_coefficients():
    cm = CostModel.from_names("qwen2.5-32b", "h200")
    c = LengthClassifier(adaptive=True, cost=cm)
    before = c.threshold_for(0)
    # A calibration finds the weights stream twice as slowly: more prompts are memory-bound.
    cm.coefficients = dataclasses.replace(
        cm.coefficients, weight_read_s=2 * cm.coefficients.weight_read_s
    )
    after = c.threshold_for(0)
    assert after > 1.8 * before
    assert after == crossover_tokens(cm, 0)


def test_adaptive_threshold_without_a_cost_model_is_refused():
    with pytest.raises(ConfigError, match="adaptive threshold needs a cost model"):
        LengthClassifier(adaptive=True).threshold_for(0)

    class Opaque:
        pass

    with pytest.raises(ConfigError, match="Opaque has neither coefficients"):
        crossover_tokens(Opaque())
