"""The family layout descriptions (qllm_pipeline/model/arch.py) against the transformers blocks they describe: every
projection listed once, each point's norm really produces its projections' input, the readers and writers of the
residual stream, and one error line for a family without a description."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import FAMILY_CONFIGS, tiny_model
from qllm_pipeline.core.errors import PipelineError
from qllm_pipeline.model import arch

# One tiny random model per described family (new families add theirs to conftest.FAMILY_CONFIGS).
BUILDERS = {family: (lambda family=family: tiny_model(layers=2, family=family)) for family in FAMILY_CONFIGS}


@pytest.fixture(params=sorted(arch.FAMILIES))
def family_and_model(request):
    assert request.param in BUILDERS, f"family {request.param} has no tiny model in tests/test_arch.py"
    return arch.FAMILIES[request.param], BUILDERS[request.param]()


def test_every_family_has_a_tiny_model_and_the_three_points():
    assert set(BUILDERS) == set(arch.FAMILIES)
    for family in arch.FAMILIES.values():
        assert tuple(p.name for p in family.points) == arch.POINT_NAMES


def test_the_layout_lists_every_projection_once(family_and_model):
    family, model = family_and_model
    block = arch.decoder_layers(model)[0]
    assert arch.family_of(model) is family and arch.block_family(block) is family
    linears = {name for name, m in block.named_modules() if isinstance(m, nn.Linear)}
    assert sorted(family.linears) == sorted(linears) and len(set(family.linears)) == len(family.linears)
    # every point is one of the input groups; the writers and readers are projections of the block
    assert all(p.linears in family.input_groups for p in family.points)
    assert set(family.writers) | set(family.readers) <= linears and not set(family.writers) & set(family.readers)
    assert arch.embeddings(model) is model.get_input_embeddings()
    assert isinstance(arch.final_norm(model), nn.Module) and isinstance(arch.rotary_embedding(model), nn.Module)


def test_each_point_norm_produces_its_projections_input(family_and_model):
    family, model = family_and_model
    block = arch.decoder_layers(model)[0]
    seen: dict[str, torch.Tensor] = {}
    hooks = [block.get_submodule(n).register_forward_hook(lambda m, a, out, n=n: seen.__setitem__(n, out))
             for n in family.norms]
    hooks += [block.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: seen.__setitem__(n, a[0]))
              for n in family.linears]
    with torch.no_grad():
        model(torch.randint(0, model.config.vocab_size, (1, 8)))
    for h in hooks:
        h.remove()
    for point in family.points:
        inputs = [seen[n] for n in point.linears]
        assert all(torch.equal(inputs[0], x) for x in inputs)  # the group reads one input
        if point.norm is not None:
            assert torch.equal(seen[point.norm], inputs[0]), point.name


def test_an_undescribed_family_is_one_error_naming_the_described_ones():
    config = type("Config", (), {"model_type": "gpt2"})()
    with pytest.raises(PipelineError) as err:
        arch.family_of(config)
    assert str(err.value) == (f"model=the model is a 'gpt2' model; qllm-pipeline quantizes {', '.join(arch.FAMILIES)} "
                              f"models only (model_type in {list(arch.FAMILIES)})")
    with pytest.raises(PipelineError, match="is not the decoder block of a supported family"):
        arch.block_family(nn.Linear(2, 2))
