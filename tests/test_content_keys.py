"""Cache keys follow content: the texts and windows actually used and the model's weights, not config names."""
import pytest

from conftest import read_results, run_cli, tiny_overrides

RTN = "pipeline.stages=[calibrate,collect_activations,fuse,evaluate]"


def rows(run_dir):
    return {row["stage"]: row for row in read_results(run_dir)["stages"]}


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    """Three files cut from the embedded Wikipedia sample: a calibration text and two different evaluation texts."""
    from qllm_pipeline.data.corpora import load_corpus

    corpus = load_corpus("wiki_sample")
    d = tmp_path_factory.mktemp("texts")
    half = len(corpus.eval_text) // 2
    (d / "calib.txt").write_text(corpus.calib_text[:200_000])
    (d / "a.txt").write_text(corpus.eval_text[:half])
    (d / "b.txt").write_text(corpus.eval_text[half:])
    return d


def job(tiny_model_dir, tmp_path, run, calib, evalf, *extra):
    args = [*tiny_overrides(tiny_model_dir, tmp_path / "cache", tmp_path / run), RTN, "data=text_files",
            f"data.calib_path={calib}", f"data.eval_path={evalf}", "eval.datasets=[text_files]", *extra]
    proc = run_cli(args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return read_results(tmp_path / run)


def test_a_new_evaluation_file_recomputes_exactly_its_rows(tiny_model_dir, tmp_path, texts):
    first = job(tiny_model_dir, tmp_path, "a", texts / "calib.txt", texts / "a.txt")
    second = job(tiny_model_dir, tmp_path, "b", texts / "calib.txt", texts / "b.txt")
    r = rows(tmp_path / "b")
    # calibration and quantization are reused: the calibration text did not change
    assert r["calibrate"]["cached"] == 1 and r["calibrate"]["computed"] == 0
    assert r["fuse"]["computed"] == 0 and r["fuse"]["cached"] == 3
    # both rows of the table (fp and rtn) belong to file b: computed, not reused from file a
    assert r["evaluate"]["computed"] == 2 and r["evaluate"]["cached"] == 0
    a, b = first["ppl"]["text_files"], second["ppl"]["text_files"]
    assert a["fp"] != b["fp"] and a["rtn"] != b["rtn"]
    # file a again: every row from the cache, the same numbers
    again = job(tiny_model_dir, tmp_path, "a2", texts / "calib.txt", texts / "a.txt")
    assert rows(tmp_path / "a2")["evaluate"]["cached"] == 2 and again["ppl"] == first["ppl"]


def test_same_names_other_content_recomputes(tiny_model_dir, tmp_path, texts):
    calib = tmp_path / "calib.txt"
    calib.write_text((texts / "calib.txt").read_text())
    job(tiny_model_dir, tmp_path, "one", calib, texts / "a.txt")
    calib.write_text((texts / "calib.txt").read_text()[50_000:])  # same path, other text
    job(tiny_model_dir, tmp_path, "two", calib, texts / "a.txt")
    r = rows(tmp_path / "two")
    assert r["calibrate"]["computed"] == 1 and r["fuse"]["computed"] == 3
    assert r["evaluate"]["cached"] == 1 and r["evaluate"]["computed"] == 1  # fp on file a is the same row; rtn is new
    # the model's weights changed under the same model.path and model.name: nothing is reused
    from safetensors.torch import load_file, save_file

    weights = tiny_model_dir / "model.safetensors"
    original = weights.read_bytes()
    try:
        tensors = load_file(str(weights))
        name = next(k for k in tensors if k.endswith("mlp.down_proj.weight"))
        tensors[name] = tensors[name] * 1.5
        save_file(tensors, str(weights), metadata={"format": "pt"})
        job(tiny_model_dir, tmp_path, "three", calib, texts / "a.txt")
    finally:
        weights.write_bytes(original)
    r = rows(tmp_path / "three")
    assert r["calibrate"]["computed"] == 1 and r["fuse"]["computed"] == 3 and r["evaluate"]["computed"] == 2


def test_a_process_reloads_weights_replaced_under_the_same_path(tmp_path):
    """load_model is memoized for the jobs of a multirun, keyed by the weights' content: the same weights give the
    same object; new weights at the same path are loaded, not the remembered ones."""
    import torch

    from conftest import tiny_model
    from qllm_pipeline.core.cache import artifact_key
    from qllm_pipeline.core.identity import model_identity
    from qllm_pipeline.model.model_loading import ModelSource, load_model

    tiny_model(seed=1).save_pretrained(tmp_path / "m")
    source = ModelSource(name="tiny", path=str(tmp_path / "m"))

    def identity():
        return artifact_key("model_identity", 1, model_identity(source, tmp_path / "digests"))

    first = load_model(source, identity())
    assert load_model(source, identity()) is first
    tiny_model(seed=2).save_pretrained(tmp_path / "m")
    second = load_model(source, identity())
    name = "model.embed_tokens.weight"  # in the skeleton: the blocks stream from the files
    assert not torch.equal(first.state_dict()[name], second.state_dict()[name])
    assert torch.equal(second.state_dict()[name], tiny_model(seed=2).state_dict()[name])
