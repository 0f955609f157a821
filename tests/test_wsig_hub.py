"""`wsig` on the layouts the hub holds: tiny Hugging Face transformers models, saved as `save_pretrained` does.

The zoo's models have the names and shapes of torchvision and GPT-2; these are the other families a crawl
meets most (grouped-query attention, gated MLPs, encoder-decoders, vision transformers, modern CNNs): each
must hash, the same weights must give the same code, and a model of another seed must land far away.
"""

from __future__ import annotations

import pytest
import torch

from pipeline.hashing import get_spec
from pipeline.hashing.model import hash_model
from pipeline.search.hamming import distance
from pipeline.sources import resolve_model

transformers = pytest.importorskip("transformers")

SPEC = get_spec("wsig")
SMALL = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128,
         "vocab_size": 500}


def _families() -> dict[str, tuple[type, object]]:
    t = transformers
    return {
        "llama (grouped-query attention, gated MLP)": (
            t.LlamaForCausalLM, t.LlamaConfig(**SMALL, num_key_value_heads=2)),
        "bert": (t.BertModel, t.BertConfig(**SMALL)),
        "t5 (encoder-decoder)": (t.T5ForConditionalGeneration, t.T5Config(
            d_model=64, d_ff=128, num_layers=2, num_heads=4, d_kv=16, vocab_size=500)),
        "vit": (t.ViTForImageClassification, t.ViTConfig(
            hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, image_size=32,
            patch_size=8, num_labels=5)),
        "convnext": (t.ConvNextForImageClassification, t.ConvNextConfig(
            hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1], num_labels=5)),
        "gpt-neox (fused qkv)": (t.GPTNeoXForCausalLM, t.GPTNeoXConfig(**SMALL)),
    }


def _saved(tmp_path, name: str, model: torch.nn.Module):
    folder = tmp_path / name
    model.save_pretrained(folder)
    return hash_model(resolve_model(str(folder)), SPEC).code


@pytest.mark.parametrize("family", list(_families()))
def test_hub_families_hash_and_keep_homologs_apart(tmp_path, family):
    cls, config = _families()[family]
    torch.manual_seed(0)
    model = cls(config).eval()
    torch.manual_seed(1)
    other = cls(config).eval()
    first, again, homolog = _saved(tmp_path, "a", model), _saved(tmp_path, "b", model), _saved(tmp_path, "c", other)
    assert first.code == again.code and first.parts == again.parts
    assert first.parts  # per-block codes: the layers are grouped into blocks
    assert distance(first.code, homolog.code) > SPEC.thresholds.related


def test_a_llama_with_permuted_mlp_units_keeps_its_code(tmp_path):
    cls, config = _families()["llama (grouped-query attention, gated MLP)"]
    torch.manual_seed(0)
    model = cls(config).eval()
    copy = cls(config).eval()
    copy.load_state_dict(model.state_dict())
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for layer in copy.model.layers:  # the gated MLP's hidden units, in another order
            order = torch.randperm(config.intermediate_size, generator=gen)
            layer.mlp.gate_proj.weight.copy_(layer.mlp.gate_proj.weight[order])
            layer.mlp.up_proj.weight.copy_(layer.mlp.up_proj.weight[order])
            layer.mlp.down_proj.weight.copy_(layer.mlp.down_proj.weight[:, order])
        ids = torch.randint(0, config.vocab_size, (2, 12), generator=gen)
        assert torch.allclose(model(ids).logits, copy(ids).logits, atol=1e-5)  # the same function
    a, b = _saved(tmp_path, "orig", model), _saved(tmp_path, "perm", copy)
    assert distance(a.code, b.code) <= 8
