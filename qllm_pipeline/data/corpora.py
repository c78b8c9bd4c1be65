"""Text corpora for calibration and perplexity, and the windows cut from them.

- `wiki_sample` (offline default): the 106 English Wikipedia articles (206 pages minus redirects) that the PyPI package
  `gensim` ships as a test fixture (`gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2`).
  Markup is stripped with gensim's own `filter_wiki`. Every fifth article goes to the evaluation split, the rest to
  calibration, so calibration and evaluation windows never share text.
- `wikitext2`, `c4`: the standard hub datasets through `datasets` (need hub access), with the usual GPTQ/QLLM protocol.
"""
from __future__ import annotations

import bz2
import functools
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from qllm_pipeline.core.cache import sha256_file, write_file_atomically
from qllm_pipeline.core.errors import PipelineError
from qllm_pipeline.core.identity import text_digest

log = logging.getLogger(__name__)

WIKI_FIXTURE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
LEE_FIXTURE = "lee_background.cor"
EVAL_EVERY = 5  # every fifth article (story) of an offline corpus is held out for evaluation


@dataclass
class Corpus:
    name: str
    calib_text: str
    eval_text: str
    source: str
    # where each document starts in the text (character offsets), or None for a text without document boundaries
    calib_docs: list[int] | None = None
    eval_docs: list[int] | None = None

    @classmethod
    def of_documents(cls, name: str, calib: list[str], evals: list[str], source: str, sep: str = "\n\n") -> "Corpus":
        """The two splits' documents joined by `sep`, each document's start kept."""
        return cls(name, sep.join(calib), sep.join(evals), source, _starts(calib, sep), _starts(evals, sep))


def _starts(documents: list[str], sep: str) -> list[int]:
    out, at = [], 0
    for doc in documents:
        out.append(at)
        at += len(doc) + len(sep)
    return out


PARSE_VERSION = 1  # bump when _parse_wiki changes: the parsed-text cache is keyed by it


def corpus_cache_dir() -> Path:
    """Where parsed corpora are kept between processes: $QLLM_PIPELINE_CORPUS_CACHE, else the user's cache directory."""
    explicit = os.environ.get("QLLM_PIPELINE_CORPUS_CACHE")
    if explicit:
        return Path(explicit)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "qllm_pipeline" / "corpora"


def token_cache_dir() -> Path:
    """Where a text's token ids (and its documents' token starts) are kept: beside the parsed corpora, not in an
    artifact cache, because they are keyed by the text's and the tokenizer's content alone; every run and every
    `pipeline.cache_dir` then shares them (a new cache directory would otherwise tokenize the corpus again)."""
    return corpus_cache_dir() / "tokens"


def _gensim_fixture(name: str, corpus: str) -> tuple[Path, str]:
    """A text gensim ships in its test data, and gensim's version, found without importing gensim (1 s)."""
    spec = importlib.util.find_spec("gensim")
    if spec is None or spec.origin is None:
        raise PipelineError(f"data={corpus} needs the PyPI package gensim (it ships the text): pip install gensim")
    path = Path(spec.origin).parent / "test" / "test_data" / name
    if not path.exists():
        raise PipelineError(f"gensim does not ship {name} any more; reinstall with pip install 'gensim>=4.3,<5'")
    return path, importlib.metadata.version("gensim")


def _wiki_fixture() -> tuple[Path, str]:
    return _gensim_fixture(WIKI_FIXTURE, "wiki_sample")


def _parse_wiki(path: Path) -> list[str]:
    """The fixture's articles as plain text: gensim's filter_wiki, redirects dropped, blank runs collapsed."""
    from gensim.corpora.wikicorpus import extract_pages, filter_wiki

    articles = []
    with bz2.open(path) as fh:
        for _title, markup, _pageid in extract_pages(fh):
            text = filter_wiki(markup)
            if text.lstrip().upper().startswith("#REDIRECT"):
                continue
            text = re.sub(r"'{2,}", "", text)  # bold/italic quotes that filter_wiki keeps
            text = re.sub(r"\n\s*\n+", "\n\n", text).strip()
            if text:
                articles.append(text)
    return articles


def _cached_articles(path: Path, parser_id: str, parse) -> list[str]:
    """`parse(path)`, kept on disk under a key of the file's bytes and the parser's identity, so every process after
    the first skips the parse (5 s for the wiki sample). An unreadable entry is parsed again; an unwritable cache
    directory only costs the parse."""
    key = hashlib.sha256(f"{sha256_file(path)}|{parser_id}".encode()).hexdigest()[:20]
    entry = corpus_cache_dir() / f"{path.name}.{key}.json"
    try:
        articles = json.loads(entry.read_text(encoding="utf-8"))
        if isinstance(articles, list) and all(isinstance(a, str) for a in articles):
            return articles
    except (OSError, ValueError):
        pass
    articles = parse(path)
    if not write_file_atomically(entry, lambda tmp: tmp.write_text(json.dumps(articles), encoding="utf-8")):
        log.debug("parsed corpus not cached: %s is not writable", entry.parent)
    return articles


@functools.lru_cache(maxsize=1)  # once per process (calibrate, its cache key and evaluate all read it)
def _wiki_sample() -> Corpus:
    path, gensim_version = _wiki_fixture()
    articles = _cached_articles(path, f"wiki parse v{PARSE_VERSION}, gensim {gensim_version}", _parse_wiki)
    calib, evals = split_documents(articles)
    return Corpus.of_documents("wiki_sample", calib, evals, f"gensim test fixture {WIKI_FIXTURE}")


def split_documents(documents: list[str], every: int = EVAL_EVERY) -> tuple[list[str], list[str]]:
    """Every `every`-th document held out for evaluation, the rest for calibration: split by document, so no
    document lends text to both sides."""
    calib = [d for i, d in enumerate(documents) if i % every != every - 1]
    return calib, [d for i, d in enumerate(documents) if i % every == every - 1]


@functools.lru_cache(maxsize=1)
def _lee_news() -> Corpus:
    """The Lee news corpus gensim ships (300 lines: 293 distinct Australian news stories of 2001): another register
    than Wikipedia, for evaluating on text no setting was chosen on."""
    path, _ = _gensim_fixture(LEE_FIXTURE, "lee_news")
    lines = (line.strip() for line in path.read_text(encoding="utf-8", errors="replace").splitlines())
    stories = list(dict.fromkeys(line for line in lines if line))  # 7 lines repeat a story: each kept once, on one side
    calib, evals = split_documents(stories)
    return Corpus.of_documents("lee_news", calib, evals, f"gensim test fixture {LEE_FIXTURE}")


def _hub(name: str, loader):
    try:
        return loader()
    except Exception as exc:  # datasets raises many types when offline
        raise PipelineError(
            f"could not load the {name} dataset from the hub ({type(exc).__name__}); "
            "without hub access use data=wiki_sample / eval.datasets=[wiki_sample]"
        ) from exc


@functools.lru_cache(maxsize=1)  # loaded once per process: at start (checked) and by the stages
def _wikitext2() -> Corpus:
    from datasets import load_dataset

    train = _hub("wikitext2", lambda: load_dataset("wikitext", "wikitext-2-raw-v1", split="train"))
    test = _hub("wikitext2", lambda: load_dataset("wikitext", "wikitext-2-raw-v1", split="test"))
    return Corpus("wikitext2", "\n\n".join(train["text"]), "\n\n".join(test["text"]), "hub: wikitext/wikitext-2-raw-v1")


@functools.lru_cache(maxsize=1)
def _c4() -> Corpus:
    from datasets import load_dataset

    train = _hub(
        "c4",
        lambda: load_dataset("allenai/c4", data_files={"train": "en/c4-train.00000-of-01024.json.gz"}, split="train"),
    )
    val = _hub(
        "c4",
        lambda: load_dataset("allenai/c4", data_files={"validation": "en/c4-validation.00000-of-00008.json.gz"}, split="validation"),
    )
    # GPTQ/QLLM protocol: the first 1100 validation documents joined by spaces.
    return Corpus("c4", "\n\n".join(train["text"][:20000]), " ".join(val["text"][:1100]), "hub: allenai/c4 en shards")


def _text_files(calib_path: str | None = None, eval_path: str | None = None, **_) -> Corpus:
    """Your own plain-text files (UTF-8): one for calibration, one for evaluation."""
    texts = []
    for key, path in (("data.calib_path", calib_path), ("data.eval_path", eval_path)):
        if not path or not Path(path).is_file():
            raise PipelineError(f"{key}={path} is not a readable file; point it at a UTF-8 text file")
        texts.append(Path(path).read_text(encoding="utf-8"))
    return Corpus("text_files", texts[0], texts[1], f"files {calib_path}, {eval_path}", [0], [0])


CORPORA = {"wiki_sample": _wiki_sample, "lee_news": _lee_news, "wikitext2": _wikitext2, "c4": _c4,
           "text_files": _text_files}


def load_corpus(name: str, options: dict | None = None) -> Corpus:
    """`options` are the data group's settings (used by text_files for its paths)."""
    if name not in CORPORA:
        raise PipelineError(f"unknown corpus '{name}'; choose one of {sorted(CORPORA)}")
    if name == "text_files":
        return _text_files(**(options or {}))
    return CORPORA[name]()


def tokenize(tokenizer, text: str, cache_dir: Path | None = None) -> torch.Tensor:
    """The text's token ids (no special tokens). With `cache_dir`, kept there under a key of the text's and the
    tokenizer's content, so a run after the first reads them (the calibration text takes seconds to tokenize)."""
    if cache_dir is None:
        return _tokenize(tokenizer, text)
    from safetensors.torch import load_file, save_file

    key = hashlib.sha256(f"{tokenizer_digest(tokenizer)}|{text_digest(text)}".encode())
    path = Path(cache_dir) / f"{key.hexdigest()[:32]}.safetensors"
    try:
        return load_file(str(path))["input_ids"]
    except Exception:  # noqa: BLE001 - absent or damaged: tokenize again (and rewrite it)
        pass
    ids = _tokenize(tokenizer, text)
    if not write_file_atomically(path, lambda tmp: save_file({"input_ids": ids}, str(tmp))):
        log.debug("token ids not cached: %s is not writable", path.parent)
    return ids


def _tokenize(tokenizer, text: str) -> torch.Tensor:
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def tokenizer_digest(tokenizer) -> str:
    """What the tokenizer is now: its full serialization (vocabulary, merges, added tokens, normalizer) for a fast
    tokenizer, else its class and vocabulary. Computed each time (40 ms), so a tokenizer changed in place misses."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        content = backend.to_str()
    else:
        content = type(tokenizer).__name__ + json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(content.encode()).hexdigest()


def document_token_starts(tokenizer, text: str, char_starts: list[int] | None, cache_dir: Path | None = None) -> list[int] | None:
    """The token index at which each document of `text` starts (its first token whose characters reach into it), as
    `tokenize(tokenizer, text)` cuts it; None for a text without document boundaries. Kept beside the token ids."""
    if char_starts is None:
        return None
    if len(char_starts) <= 1:
        return [0] * len(char_starts)
    from safetensors.torch import load_file, save_file

    key = hashlib.sha256(f"{tokenizer_digest(tokenizer)}|{text_digest(text)}|{char_starts}".encode())
    path = Path(cache_dir) / f"{key.hexdigest()[:32]}.docs.safetensors" if cache_dir is not None else None
    if path is not None:
        try:
            return load_file(str(path))["doc_starts"].tolist()
        except Exception:  # noqa: BLE001 - absent or damaged: compute again
            pass
    if not getattr(tokenizer, "is_fast", False):
        raise PipelineError(f"{type(tokenizer).__name__} gives no character offsets; a fast tokenizer is needed to place "
                            "windows on documents")
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    token_ends = torch.tensor([end for _, end in offsets])
    starts = torch.searchsorted(token_ends, torch.tensor(char_starts), right=True)
    if path is not None and not write_file_atomically(path, lambda tmp: save_file({"doc_starts": starts}, str(tmp))):
        log.debug("document starts not cached: %s is not writable", path.parent)
    return starts.tolist()


def corpus_windows(tokenizer, corpus: Corpus, seq_len: int, max_windows: int | None,
                   cache_dir: Path | None = None) -> torch.Tensor:
    """The evaluation windows of a corpus's test split, as the pipeline evaluates them (before any BOS): every caller
    that compares with the pipeline's numbers takes them from here."""
    from qllm_pipeline.data.windows import evaluation_windows

    tokens = tokenize(tokenizer, corpus.eval_text, cache_dir)
    docs = document_token_starts(tokenizer, corpus.eval_text, corpus.eval_docs, cache_dir)
    return evaluation_windows(tokens, seq_len, max_windows, docs)
