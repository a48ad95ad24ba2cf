"""The own decoder matches transformers' implementation (same weights, fp32)."""
import pytest
import torch

from dflash_core.models import Decoder, ModelConfig

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
            rms_norm_eps=1e-6, rope_theta=10000.0)


def _hf_model(family):
    import transformers as tf
    torch.manual_seed(0)
    if family == "llama":
        cfg = tf.LlamaConfig(**TINY, tie_word_embeddings=True,
                             rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                           "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
        m = tf.LlamaForCausalLM(cfg)
    elif family == "qwen2":
        m = tf.Qwen2ForCausalLM(tf.Qwen2Config(**TINY, tie_word_embeddings=False))
    else:
        m = tf.Qwen3ForCausalLM(tf.Qwen3Config(**TINY, tie_word_embeddings=False))
    m.eval()
    # make norms non-trivial so a missing norm would show
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "norm" in n or "bias" in n:
                p.add_(0.1 * torch.randn_like(p))
    return m


def _own_from_hf(m):
    cfg = ModelConfig.from_hf(m.config.to_dict())
    own = Decoder(cfg).eval()
    own.load_hf_state_dict(m.state_dict())
    return own


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_logits_match_transformers(family):
    m = _hf_model(family)
    own = _own_from_hf(m)
    assert own.config.qk_norm == (family == "qwen3")
    assert own.config.attention_bias == (family == "qwen2")
    torch.manual_seed(1)
    ids = torch.randint(0, 128, (2, 40))
    with torch.no_grad():
        ref = m(ids).logits
    cache = own.new_cache(max_slots=4, capacity=128)
    hidden, _ = own(ids, cache, torch.tensor([3, 1]), torch.zeros(2, dtype=torch.long))
    got = own.logits(hidden)
    rel = (got - ref).norm() / ref.norm()
    assert rel < 1e-4, rel


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_incremental_decode_matches_full_forward(family):
    """Prefill part of a row, then feed the rest in ragged chunks: same logits as one pass."""
    m = _hf_model(family)
    own = _own_from_hf(m)
    torch.manual_seed(2)
    ids = torch.randint(0, 128, (1, 30))
    with torch.no_grad():
        ref = m(ids).logits[0]
    cache = own.new_cache(max_slots=2, capacity=64)
    slot = torch.tensor([1])
    outs, pos = [], 0
    for n in (7, 1, 16, 6):
        h, _ = own(ids[:, pos:pos + n], cache, slot, torch.tensor([pos]))
        outs.append(own.logits(h)[0])
        pos += n
    got = torch.cat(outs)
    assert ((got - ref).norm() / ref.norm()) < 1e-4


def test_ragged_batch_equals_rows_alone():
    m = _hf_model("qwen2")
    own = _own_from_hf(m)
    torch.manual_seed(3)
    lens = [5, 12, 9]
    cache = own.new_cache(max_slots=3, capacity=64)
    rows = [torch.randint(0, 128, (n,)) for n in lens]
    # prefill each row alone at its own length, then one batched 4-token step
    for r, row in enumerate(rows):
        own(row[None], cache, torch.tensor([r]), torch.tensor([0]))
    step = torch.randint(0, 128, (3, 4))
    h, _ = own(step, cache, torch.arange(3), torch.tensor(lens))
    batched = own.logits(h)
    for r, row in enumerate(rows):
        with torch.no_grad():
            ref = m(torch.cat([row, step[r]])[None]).logits[0, -4:]
        assert ((batched[r] - ref).norm() / ref.norm()) < 1e-4


def test_capture_layers_are_layer_outputs():
    m = _hf_model("llama")
    own = _own_from_hf(m)
    ids = torch.randint(0, 128, (1, 10))
    with torch.no_grad():
        hs = m(ids, output_hidden_states=True).hidden_states
    cache = own.new_cache(1, 32)
    _, feats = own(ids, cache, torch.tensor([0]), torch.tensor([0]), capture_layers=[0, 2])
    # HF hidden_states[i + 1] is the output of decoder layer i (the last one is normed)
    assert torch.allclose(feats[..., :64], hs[1], atol=1e-5)
    assert feats.shape == (1, 10, 128)
    _, feats1 = own(ids, own.new_cache(1, 32), torch.tensor([0]), torch.tensor([0]), capture_layers=[1])
    assert torch.allclose(feats1, hs[2], atol=1e-5)
