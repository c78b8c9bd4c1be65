"""The second offline corpus: gensim's Lee news stories, split by story into calibration and evaluation text, and a
run that calibrates on wiki_sample and evaluates on both."""
from conftest import read_results, run_cli, tiny_overrides
from qllm_pipeline.data.corpora import load_corpus, split_documents


def test_lee_news_is_split_by_story():
    corpus = load_corpus("lee_news")
    calib, evals = corpus.calib_text.split("\n\n"), corpus.eval_text.split("\n\n")
    assert (len(calib), len(evals)) == (235, 58)  # 293 distinct stories (of 300 lines), every fifth held out
    assert not set(calib) & set(evals)
    assert evals[0].startswith("Six midwives have been suspended at Wollongong Hospital")  # the 5th story: real text
    assert split_documents(list("abcdefghij")) == (list("abcdfghi"), ["e", "j"])


def test_a_run_evaluates_on_both_corpora(tiny_model_dir, tmp_path):
    run = tmp_path / "run"
    proc = run_cli([*tiny_overrides(tiny_model_dir, tmp_path / "cache", run), "method=rtn",
                    "eval.datasets=[wiki_sample,lee_news]"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    ppl = read_results(run)["ppl"]
    assert set(ppl) == {"wiki_sample", "lee_news"}
    assert ppl["lee_news"]["fp"] != ppl["wiki_sample"]["fp"]  # another text
    assert set(read_results(run)["ppl_ci"]["lee_news"]) == {"rtn"}
