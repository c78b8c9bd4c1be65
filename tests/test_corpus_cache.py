"""Parsed corpora are kept on disk between processes, keyed by the source file's bytes and the parser's identity: a
second process skips the parse, and a changed file, parser or a damaged entry is parsed again."""
import bz2

import pytest

from qllm_pipeline.data import corpora as data


@pytest.fixture
def corpus_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("QLLM_PIPELINE_CORPUS_CACHE", str(tmp_path / "corpora"))
    return tmp_path / "corpora"


def counting_parser(calls: list):
    def parse(path):
        calls.append(path)
        return bz2.decompress(path.read_bytes()).decode().split("\n\n")
    return parse


def test_a_parse_is_reused_until_the_file_or_the_parser_changes(tmp_path, corpus_cache):
    source = tmp_path / "pages.bz2"
    source.write_bytes(bz2.compress(b"first article\n\nsecond article"))
    calls = []
    parse = counting_parser(calls)
    assert data._cached_articles(source, "parser v1", parse) == ["first article", "second article"]
    assert data._cached_articles(source, "parser v1", parse) == ["first article", "second article"]
    assert len(calls) == 1 and len(list(corpus_cache.iterdir())) == 1  # hit: no parse, no temporary left behind
    data._cached_articles(source, "parser v2", parse)
    assert len(calls) == 2  # another parser (version, gensim) misses
    source.write_bytes(bz2.compress(b"edited article"))
    assert data._cached_articles(source, "parser v1", parse) == ["edited article"]
    assert len(calls) == 3  # another file misses: never stale


def test_a_damaged_entry_is_parsed_again_and_an_unwritable_cache_only_costs_the_parse(tmp_path, corpus_cache, monkeypatch):
    source = tmp_path / "pages.bz2"
    source.write_bytes(bz2.compress(b"only article"))
    calls = []
    parse = counting_parser(calls)
    data._cached_articles(source, "p", parse)
    (entry,) = corpus_cache.iterdir()
    entry.write_text('{"not": "a list"')
    assert data._cached_articles(source, "p", parse) == ["only article"] and len(calls) == 2
    assert data._cached_articles(source, "p", parse) == ["only article"] and len(calls) == 2  # rewritten whole
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    monkeypatch.setenv("QLLM_PIPELINE_CORPUS_CACHE", str(blocker / "corpora"))  # below a file: cannot be created
    assert data._cached_articles(source, "p", parse) == ["only article"] and len(calls) == 3


def test_a_second_read_of_the_wiki_sample_does_not_parse(monkeypatch):
    """Read through the user's cache (filled now or by any earlier process), then with the parser forbidden: the same
    text, split into calibration and evaluation articles."""
    data._wiki_sample.cache_clear()
    first = data._wiki_sample()
    data._wiki_sample.cache_clear()

    def no_parse(path):
        raise AssertionError("parsed again although the cache holds this file")

    monkeypatch.setattr(data, "_parse_wiki", no_parse)
    try:
        assert data._wiki_sample() == first
    finally:
        data._wiki_sample.cache_clear()
    assert len(first.eval_text) > 100_000 and first.calib_text[:200] != first.eval_text[:200]


def test_token_ids_are_cached_by_the_texts_and_the_tokenizers_content(tiny_model_dir, tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    text = data.load_corpus("wiki_sample").eval_text[:20_000]
    plain = data.tokenize(tokenizer, text)
    cached = data.tokenize(tokenizer, text, tmp_path / "tokens")
    assert cached.dtype == plain.dtype and cached.tolist() == plain.tolist()
    (entry,) = (tmp_path / "tokens").iterdir()

    calls = []
    real = data._tokenize
    monkeypatch.setattr(data, "_tokenize", lambda tok, t: calls.append(t) or real(tok, t))
    assert data.tokenize(AutoTokenizer.from_pretrained(tiny_model_dir), text, tmp_path / "tokens").equal(plain)
    assert calls == []  # another object of the same tokenizer: read back
    data.tokenize(tokenizer, text[:10_000], tmp_path / "tokens")
    other = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert data.tokenize(other, text, tmp_path / "tokens").equal(plain) and len(calls) == 1
    other.add_tokens(["Alabama"])  # changed in place, after a use: another vocabulary, other ids for the same text
    changed = data.tokenize(other, text, tmp_path / "tokens")
    assert len(calls) == 2 and not changed.equal(plain) and len(list((tmp_path / "tokens").iterdir())) == 3
    entry.write_bytes(b"damaged")
    assert data.tokenize(tokenizer, text, tmp_path / "tokens").equal(plain) and len(calls) == 3


def test_a_new_artifact_cache_reuses_the_token_ids(tiny_model_dir, tmp_path, corpus_cache, monkeypatch):
    """Token ids depend on the text and the tokenizer only, so they live beside the parsed corpora: a run with another
    `pipeline.cache_dir` tokenizes nothing again (and the artifact cache holds no token ids)."""
    from conftest import read_results, run_cli, tiny_overrides

    calls = []
    real = data._tokenize
    monkeypatch.setattr(data, "_tokenize", lambda tok, t: calls.append(len(t)) or real(tok, t))
    settings = ["method=rtn", "eval.datasets=[wiki_sample,calib_heldout]"]
    first = run_cli([*tiny_overrides(tiny_model_dir, tmp_path / "cache_a", tmp_path / "a"), *settings])
    assert first.returncode == 0, first.stderr[-3000:]
    assert len(calls) == 2  # the calibration text (calibrate, calib_heldout) and wiki_sample's held-out articles
    second = run_cli([*tiny_overrides(tiny_model_dir, tmp_path / "cache_b", tmp_path / "b"), *settings])
    assert second.returncode == 0, second.stderr[-3000:]
    assert len(calls) == 2 and read_results(tmp_path / "b")["ppl"] == read_results(tmp_path / "a")["ppl"]
    assert len(list((corpus_cache / "tokens").glob("*.safetensors"))) == 4  # each text's ids and its documents' token starts
    assert not any("tokens" in p.name for p in (tmp_path / "cache_b").rglob("*"))
