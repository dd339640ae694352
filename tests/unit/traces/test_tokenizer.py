"""The shared tokenizer: counts every component agrees on, and texts of an exact length."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from traces.errors import ConfigError
from traces.tokenizer import VOCAB_SIZE, HFTokenizer, WordTokenizer, load_tokenizer, render_chat


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 3000), st.integers(0, 2**31))
def test_a_text_of_length_n_has_n_tokens_and_is_the_same_for_a_seed(n, seed):
    tok = WordTokenizer()
    text = tok.text_of_length(n, seed)
    assert tok.count(text) == n == len(tok.encode(text))
    assert text == tok.text_of_length(n, seed)


def test_seeds_give_different_texts_and_ids_round_trip():
    tok = WordTokenizer()
    a, b = tok.text_of_length(64, 1), tok.text_of_length(64, 2)
    assert a != b
    ids = tok.encode(a)
    assert all(0 <= i < VOCAB_SIZE for i in ids)
    assert tok.decode(ids) == a


def test_any_text_counts_one_token_per_word_with_stable_ids():
    tok = WordTokenizer()
    text = "Hello, world!  Ünïcode\tand\nnewlines"
    assert tok.count(text) == 5
    ids = tok.encode(text)
    assert ids == WordTokenizer().encode(text)
    assert all(i >= VOCAB_SIZE for i in ids)  # none is a vocabulary word
    assert tok.count(tok.decode(ids)) == 5


def test_chat_messages_render_as_role_lines():
    text = render_chat(
        [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "hi there"}]},
        ]
    )
    assert text == "system: be brief\nuser: hi there"
    with pytest.raises(ConfigError, match=r"messages\[0\]"):
        render_chat([{"content": "no role"}])


def _tiny_tokenizer_json(path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    words = [f"w{i}" for i in range(200)]
    tok.train_from_iterator(
        [" ".join(words)] * 3, trainers.WordLevelTrainer(special_tokens=["[UNK]"])
    )
    tok.save(str(path))
    return path


def test_a_tokenizer_json_counts_as_its_model_does_and_builds_exact_texts(tmp_path):
    path = _tiny_tokenizer_json(tmp_path / "tokenizer.json")
    tok = load_tokenizer(path)
    assert isinstance(tok, HFTokenizer) and tok.name == str(path)
    assert tok.count("w1 w2 w3") == 3
    for n in (0, 1, 17, 300):
        assert tok.count(tok.text_of_length(n, seed=n)) == n
    assert load_tokenizer(tmp_path).name == str(path)  # a folder holding tokenizer.json


def test_a_missing_or_broken_tokenizer_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_tokenizer(tmp_path / "nope.json")
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match=r"not a tokenizer\.json"):
        load_tokenizer(bad)
    assert isinstance(load_tokenizer(None), WordTokenizer)
