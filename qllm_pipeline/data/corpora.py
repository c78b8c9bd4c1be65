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
TOKENS_DIR = ".tokens"  # token ids kept in the artifact cache (hidden: not a stage's artifacts)


@dataclass
class Corpus:
    name: str
    calib_text: str
    eval_text: str
    source: str


PARSE_VERSION = 1  # bump when _parse_wiki changes: the parsed-text cache is keyed by it


def corpus_cache_dir() -> Path:
    """Where parsed corpora are kept between processes: $QLLM_PIPELINE_CORPUS_CACHE, else the user's cache directory."""
    explicit = os.environ.get("QLLM_PIPELINE_CORPUS_CACHE")
    if explicit:
        return Path(explicit)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "qllm_pipeline" / "corpora"


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
    return Corpus("wiki_sample", "\n\n".join(calib), "\n\n".join(evals), f"gensim test fixture {WIKI_FIXTURE}")


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
    return Corpus("lee_news", "\n\n".join(calib), "\n\n".join(evals), f"gensim test fixture {LEE_FIXTURE}")


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
    return Corpus("text_files", texts[0], texts[1], f"files {calib_path}, {eval_path}")


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


def calibration_windows(tokens: torch.Tensor, n_samples: int, seq_len: int, seed: int) -> torch.Tensor:
    """`n_samples` windows of `seq_len` tokens at seeded random starts (the GPTQ/QLLM calibration protocol)."""
    if n_samples <= 0 or seq_len <= 1:
        raise PipelineError(f"calibrate.n_samples={n_samples} and calibrate.seq_len={seq_len} must be positive (seq_len >= 2)")
    if tokens.numel() <= seq_len:
        raise PipelineError(
            f"the calibration text has {tokens.numel()} tokens, too few for calibrate.seq_len={seq_len}; "
            "use a longer corpus or a smaller seq_len"
        )
    starts = calibration_starts(tokens.numel(), n_samples, seq_len, seed)
    return torch.stack([tokens[s : s + seq_len] for s in starts])


def calibration_starts(n_tokens: int, n_samples: int, seq_len: int, seed: int) -> list[int]:
    """The seeded start positions `calibration_windows` draws."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, n_tokens - seq_len, (n_samples,), generator=gen).tolist()


HELDOUT = "calib_heldout"  # eval.datasets entry: held-out windows of the calibration split (for choosing settings)


def heldout_windows(tokens: torch.Tensor, calib_starts: list[int], calib_len: int, seq_len: int, max_windows: int | None) -> torch.Tensor:
    """Non-overlapping windows of the calibration text that overlap no calibration window, taken from the end of the
    text backwards: a development set drawn from the calibration split, so settings can be chosen without ever
    looking at the evaluation text."""
    taken = sorted((s, s + calib_len) for s in calib_starts)
    out, end = [], tokens.numel()
    while end - seq_len >= 0 and (not max_windows or len(out) < int(max_windows)):
        start = end - seq_len
        if any(a < end and start < b for a, b in taken):
            end -= seq_len
            continue
        out.append(tokens[start:end])
        end = start
    if not out:
        raise PipelineError(f"no held-out calibration window of eval.seq_len={seq_len} tokens is left; lower it")
    return torch.stack(out[::-1])


def window_bos(config, tokenizer) -> int | None:
    """The token each window must start with for this model's family (Gemma: BOS), or None."""
    from qllm_pipeline.model.arch import family_of

    if not family_of(config).bos_per_window:
        return None
    if tokenizer.bos_token_id is None:
        raise PipelineError(f"{config.model_type} models expect each window to start with BOS, and the tokenizer has none")
    return int(tokenizer.bos_token_id)


def start_with(windows: torch.Tensor, token: int | None) -> torch.Tensor:
    """Each window with `token` in front and its last token dropped (same length, the same text positions), or the
    windows as they are when `token` is None."""
    if token is None:
        return windows
    return torch.cat([torch.full_like(windows[:, :1], token), windows[:, :-1]], dim=1)


def evaluation_windows(tokens: torch.Tensor, seq_len: int, max_windows: int | None = None) -> torch.Tensor:
    """Non-overlapping windows of `seq_len` over the concatenated test text (the standard perplexity protocol)."""
    n = tokens.numel() // seq_len
    if n == 0:
        raise PipelineError(
            f"the evaluation text has {tokens.numel()} tokens, fewer than eval.seq_len={seq_len}; use a longer corpus or a smaller seq_len"
        )
    if max_windows:
        n = min(n, int(max_windows))
    return tokens[: n * seq_len].view(n, seq_len)
