"""Evaluation and held-out windows are spread over the documents of their split: the default 32 × 512 evaluation
windows come from every held-out wiki_sample article (they all used to fall in one), and the held-out calibration
windows never overlap a calibration window or an evaluation article. Located here by decoding each window and finding
its text in the split, independently of the token offsets the pipeline places them with."""
import pytest
import torch

from conftest import smollm2_tokenizer
from qllm_pipeline.data.corpora import corpus_windows, document_token_starts, load_corpus, split_documents, tokenize
from qllm_pipeline.data.windows import calibration_starts, evaluation_windows, heldout_windows, spread_grid_windows


@pytest.fixture(scope="module")
def tokenizer():
    return smollm2_tokenizer()


def articles():
    """wiki_sample's articles, split as the corpus splits them (the split's documents, independently of Corpus)."""
    import qllm_pipeline.data.corpora as corpora

    path, version = corpora._wiki_fixture()
    return split_documents(corpora._cached_articles(path, f"wiki parse v{corpora.PARSE_VERSION}, gensim {version}",
                                                    corpora._parse_wiki))


def documents_of(windows, tokenizer, text: str, documents: list[str]) -> list[set[int]]:
    """For each window: the documents its text overlaps, found by searching the decoded window in `text`."""
    spans, at = [], 0
    for doc in documents:
        spans.append((at, at + len(doc)))
        at += len(doc) + 2  # the corpus joins documents with a blank line
    out = []
    for window in windows:
        decoded = tokenizer.decode(window[1:-1])  # inner tokens: the edges may split a character
        start = text.find(decoded)
        assert start >= 0 and text.find(decoded, start + 1) < 0  # found, once
        out.append({i for i, (a, b) in enumerate(spans) if a < start + len(decoded) and start < b})
    return out


def test_the_default_evaluation_windows_come_from_every_held_out_article(tokenizer):
    corpus = load_corpus("wiki_sample")
    _, evals = articles()
    windows = corpus_windows(tokenizer, corpus, 512, 32)
    assert windows.shape == (32, 512)
    found = documents_of(windows, tokenizer, corpus.eval_text, evals)
    assert set().union(*found) == set(range(len(evals))) and len(evals) == 21
    # on the protocol's grid, non-overlapping, in text order
    tokens = tokenize(tokenizer, corpus.eval_text)
    grid = tokens[: tokens.numel() // 512 * 512].view(-1, 512)
    rows = [next(j for j in range(len(grid)) if torch.equal(grid[j], w)) for w in windows]
    assert rows == sorted(set(rows))
    # the first 32 grid windows (the windows before) all sit in one article
    assert len(set().union(*documents_of(grid[:32], tokenizer, corpus.eval_text, evals))) == 1


def test_all_windows_when_max_windows_is_null(tokenizer):
    corpus = load_corpus("lee_news")
    tokens = tokenize(tokenizer, corpus.eval_text)
    every = corpus_windows(tokenizer, corpus, 256, None)
    assert torch.equal(every, tokens[: tokens.numel() // 256 * 256].view(-1, 256))


def test_fewer_windows_than_documents_spread_over_the_documents():
    docs = [i * 1000 for i in range(20)]  # 20 documents of 1000 tokens, windows of 100: 200 on the grid
    chosen = spread_grid_windows(20_000, 100, 5, docs)
    assert len(chosen) == 5 and len({j * 100 // 1000 for j in chosen}) == 5  # five different documents
    assert min(chosen) < 400 // 100 * 10 and max(chosen) > 160  # from the first fifth to the last
    assert spread_grid_windows(20_000, 100, 5, None) == [20, 60, 100, 140, 180]  # no documents: evenly
    assert evaluation_windows(torch.arange(20_000), 100, 5).tolist() == [list(range(j * 100, j * 100 + 100))
                                                                         for j in (20, 60, 100, 140, 180)]


def test_held_out_windows_avoid_calibration_windows_and_evaluation_articles(tokenizer):
    corpus = load_corpus("wiki_sample")
    calib_articles, _ = articles()
    tokens = tokenize(tokenizer, corpus.calib_text)
    starts = calibration_starts(tokens.numel(), 16, 512, seed=0)
    docs = document_token_starts(tokenizer, corpus.calib_text, corpus.calib_docs)
    held = heldout_windows(tokens, starts, 512, 512, 32, docs)
    assert held.shape == (32, 512)
    taken = [(s, s + 512) for s in starts]
    grid = tokens[: tokens.numel() // 512 * 512].view(-1, 512)
    for w in held:
        j = next(j for j in range(len(grid)) if torch.equal(grid[j], w))
        assert not any(a < (j + 1) * 512 and j * 512 < b for a, b in taken)
    found = documents_of(held, tokenizer, corpus.calib_text, calib_articles)
    assert len(set().union(*found)) >= 32  # spread: a different article for each window (85 to choose from)
    for w in held:  # and none of it is evaluation text
        assert corpus.eval_text.find(tokenizer.decode(w[1:-1])) < 0
