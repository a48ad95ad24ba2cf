"""The DFlash drafter: public checkpoint format, cache/training paths agree, engine use."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from dflash_core.api import build_engine
from dflash_core.drafter import DFlashDrafter, DrafterConfig, LocalDraftBackend, build_target_layer_ids
from dflash_core.engine import EngineConfig
from dflash_core.models.config import ModelConfig
from dflash_core.sampling import SamplingParams


def test_layer_id_rule():
    assert build_target_layer_ids(36, 5) == [1, 9, 17, 25, 33]  # Qwen3-8B, as published
    assert build_target_layer_ids(30, 1) == [15]
    assert all(0 <= i < 3 for i in build_target_layer_ids(3, 2))


def published_config(hidden=64, heads=4, kv=2, head_dim=16, layers=2, target_layers=6, vocab=512):
    """config.json in the shape of the published z-lab Qwen3 DFlash drafters."""
    return {
        "architectures": ["DFlashDraftModel"],
        "auto_map": {"AutoModel": "dflash.DFlashDraftModel"},
        "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 151643, "eos_token_id": 151645,
        "head_dim": head_dim, "hidden_act": "silu", "hidden_size": hidden, "initializer_range": 0.02,
        "intermediate_size": 2 * hidden, "max_position_embeddings": 40960, "max_window_layers": layers,
        "model_type": "qwen3", "num_attention_heads": heads, "num_hidden_layers": layers,
        "num_key_value_heads": kv, "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000,
        "sliding_window": None, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "transformers_version": "4.57.1", "use_cache": True, "use_sliding_window": False, "vocab_size": vocab,
        "block_size": 16, "num_target_layers": target_layers,
        "dflash_config": {"mask_token_id": 7, "target_layer_ids": build_target_layer_ids(target_layers, 3)},
    }


def published_state_dict(cfg: dict, seed=0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    H, D, I = cfg["hidden_size"], cfg["head_dim"], cfg["intermediate_size"]
    nh, nkv, K = cfg["num_attention_heads"], cfg["num_key_value_heads"], len(cfg["dflash_config"]["target_layer_ids"])
    shapes = {"fc.weight": (H, K * H), "hidden_norm.weight": (H,), "norm.weight": (H,)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (H,), p + "post_attention_layernorm.weight": (H,),
            p + "self_attn.q_proj.weight": (nh * D, H), p + "self_attn.k_proj.weight": (nkv * D, H),
            p + "self_attn.v_proj.weight": (nkv * D, H), p + "self_attn.o_proj.weight": (H, nh * D),
            p + "self_attn.q_norm.weight": (D,), p + "self_attn.k_norm.weight": (D,),
            p + "mlp.gate_proj.weight": (I, H), p + "mlp.up_proj.weight": (I, H), p + "mlp.down_proj.weight": (H, I),
        })
    return {k: ((1 + 0.1 * torch.randn(s, generator=g)) if k.endswith("norm.weight") else
                0.05 * torch.randn(s, generator=g)).to(torch.bfloat16) for k, s in shapes.items()}


def tiny_qwen3_folder(tmp_path, vocab=512, layers=6):
    from transformers import Qwen3Config, Qwen3ForCausalLM
    cfg = Qwen3Config(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                      tie_word_embeddings=False, rope_theta=1000000.0)
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(cfg)
    with torch.no_grad():
        model.lm_head.weight.mul_(20)  # peaked logits: varied greedy text
    out = tmp_path / "qwen3-tiny"
    model.save_pretrained(str(out))
    return out


def draft_once(drafter: DFlashDrafter, seed=0):
    """Append 12 context tokens of random features to slot 1, draft one block."""
    g = torch.Generator().manual_seed(seed)
    c = drafter.config
    backend = LocalDraftBackend(drafter, max_slots=2, capacity=64)
    feats = torch.randn(12, len(c.target_layer_ids) * c.hidden_size, generator=g)
    emb = torch.randn(1, c.block_size, c.hidden_size, generator=g)
    return backend.draft(torch.full((12,), 1), torch.arange(12), feats, torch.tensor([1]), emb,
                         torch.arange(12, 12 + c.block_size)[None])


def test_public_format_loads_and_round_trips(tmp_path):
    cfg = published_config()
    folder = tmp_path / "z-lab-style"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(cfg))
    sd = published_state_dict(cfg)
    save_file(sd, str(folder / "model.safetensors"))
    d = DFlashDrafter.load(folder)
    assert d.config.target_layer_ids == cfg["dflash_config"]["target_layer_ids"]
    assert d.config.mask_token_id == 7 and d.config.block_size == 16 and d.config.rope_theta == 1e6
    assert torch.equal(d.state_dict()["layers.1.mlp.up_proj.weight"], sd["layers.1.mlp.up_proj.weight"].float())
    h = draft_once(d)
    assert h.shape == (1, 16, 64) and torch.isfinite(h).all()
    # save -> load gives the same drafts, and the same file format
    d.save(tmp_path / "resaved")
    d2 = DFlashDrafter.load(tmp_path / "resaved")
    assert torch.equal(draft_once(d2), h)
    saved = json.loads((tmp_path / "resaved" / "config.json").read_text())
    assert saved["dflash_config"] == cfg["dflash_config"] and saved["architectures"] == ["DFlashDraftModel"]
    from safetensors import safe_open
    with safe_open(str(tmp_path / "resaved" / "model.safetensors"), "pt") as f:
        assert set(f.keys()) == set(sd)
    # the optional drafting vocabulary travels beside the public files
    d.config.draft_vocab = [1, 5, 9]
    d.save(tmp_path / "with-vocab")
    assert DFlashDrafter.load(tmp_path / "with-vocab").config.draft_vocab == [1, 5, 9]
    assert "draft_vocab" not in json.loads((tmp_path / "with-vocab" / "config.json").read_text())
    d.config.draft_vocab = None
    # a bf16 save keeps the published dtype
    d.save(tmp_path / "bf16", dtype=torch.bfloat16)
    with safe_open(str(tmp_path / "bf16" / "model.safetensors"), "pt") as f:
        assert f.get_tensor("fc.weight").dtype == torch.bfloat16
    assert torch.equal(draft_once(DFlashDrafter.load(tmp_path / "bf16")), h)  # weights were bf16-exact


def test_public_drafter_runs_lossless_on_a_qwen3_target(tmp_path):
    tfolder = tiny_qwen3_folder(tmp_path)
    cfg = published_config(target_layers=6, vocab=512)
    dfolder = tmp_path / "drafter"
    dfolder.mkdir()
    (dfolder / "config.json").write_text(json.dumps(cfg))
    save_file(published_state_dict(cfg), str(dfolder / "model.safetensors"))
    prompts = [[1, 2, 3], [40, 41, 42, 43, 44, 45], [300]]
    p = SamplingParams(max_new_tokens=24, ignore_eos=True)
    spec, _ = build_engine(str(tfolder), str(dfolder), EngineConfig(max_slots=3, max_seq_len=64, block_size=16),
                           tokenizer=False)
    ar, _ = build_engine(str(tfolder), None, EngineConfig(max_slots=3, max_seq_len=64, block_size=1), tokenizer=False)
    a, b = spec.generate(prompts, p), ar.generate(prompts, p)
    assert [x.token_ids for x in a] == [y.token_ids for y in b]
    assert a[0].stats.num_draft_tokens > 0 and b[0].stats.num_draft_tokens == 0
    # and transformers' own greedy decoding agrees
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(str(tfolder)).eval()
    for ids, res in zip(prompts, a):
        y = hf.generate(torch.tensor([ids]), max_new_tokens=24, min_new_tokens=24, do_sample=False, pad_token_id=0)
        assert y[0, len(ids):].tolist() == res.token_ids


def test_drafter_that_does_not_fit_the_target_is_refused(tmp_path):
    from dflash_core.models.loader import ModelLoadError
    tfolder = tiny_qwen3_folder(tmp_path)
    cfg = published_config(hidden=32, head_dim=8, target_layers=6)
    dfolder = tmp_path / "wrong"
    dfolder.mkdir()
    (dfolder / "config.json").write_text(json.dumps(cfg))
    save_file(published_state_dict(cfg), str(dfolder / "model.safetensors"))
    with pytest.raises(ModelLoadError, match="does not fit"):
        build_engine(str(tfolder), str(dfolder), EngineConfig(max_seq_len=64), tokenizer=False)
    with pytest.raises(ModelLoadError):
        build_engine(str(tfolder), str(tmp_path / "missing"), EngineConfig(max_seq_len=64), tokenizer=False)


def test_training_forward_equals_cached_forward():
    """forward_blocks (training: mask, no cache) == append_context + forward_cached."""
    tcfg = ModelConfig(vocab_size=128, hidden_size=48, intermediate_size=96, num_layers=8, num_heads=6,
                       num_kv_heads=2, head_dim=8)
    d = DFlashDrafter.from_target(tcfg, num_layers=2, block_size=8, mask_token_id=3, num_features=3, seed=2)
    g = torch.Generator().manual_seed(0)
    C, B, Fdim = 20, 8, 3 * 48
    feats = torch.randn(1, C, Fdim, generator=g)
    anchors = [5, 13]
    emb = torch.randn(1, 2 * B, 48, generator=g)
    pos = torch.cat([torch.arange(a, a + B) for a in anchors])[None]
    mask = torch.zeros(1, 2 * B, C + 2 * B, dtype=torch.bool)
    for j, a in enumerate(anchors):
        mask[0, j * B:(j + 1) * B, :a] = True
        mask[0, j * B:(j + 1) * B, C + j * B:C + (j + 1) * B] = True
    with torch.no_grad():
        train_h = d.forward_blocks(emb, pos, feats, torch.arange(C)[None], mask)
    for j, a in enumerate(anchors):
        cache = d.new_cache(1, 64)
        d.append_context(cache, torch.zeros(a, dtype=torch.int64), torch.arange(a), feats[0, :a])
        h = d.forward_cached(cache, torch.tensor([0]), emb[:, j * B:(j + 1) * B], pos[:, j * B:(j + 1) * B])
        torch.testing.assert_close(h, train_h[:, j * B:(j + 1) * B], rtol=1e-5, atol=1e-5)


def test_config_errors():
    with pytest.raises(ValueError, match="dflash_config"):
        DrafterConfig.from_json({"hidden_size": 8, "num_attention_heads": 2})
    with pytest.raises(ValueError, match="block_size"):
        DrafterConfig(hidden_size=8, intermediate_size=8, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=4,
                      vocab_size=10, num_target_layers=4, target_layer_ids=[1], mask_token_id=0, block_size=1)


def test_context_kv_from_the_context_weights_alone():
    """What a disaggregated target streams: the drafter's context K/V computed from its
    context weights alone (fc, hidden norm, k/v projections) equal the full drafter's, and
    writing them fills the cache exactly as appending the features does."""
    from dflash_core.api import tiny_random_config
    for dtype in (torch.float32, torch.bfloat16):
        d = DFlashDrafter.from_target(tiny_random_config(), num_layers=2, block_size=8, mask_token_id=3,
                                      num_features=3, seed=3).to(dtype=dtype).pack_weights()
        c = d.config
        state = d.context_state()
        assert 0 < sum(v.numel() for v in state.values()) < sum(p.numel() for p in d.parameters())
        ctx = DFlashDrafter.context_only(c, state, dtype=dtype)
        g = torch.Generator().manual_seed(0)
        feats = torch.randn(7, len(c.target_layer_ids) * c.hidden_size, generator=g).to(dtype)
        kv = ctx.context_kv(feats)
        assert kv.shape == (7, c.num_layers, 2, c.num_kv_heads, c.head_dim)
        assert kv.shape[1:].numel() == d.context_kv_dim
        assert torch.equal(kv, d.context_kv(feats))
        slots, pos = torch.tensor([0, 0, 0, 1, 1, 1, 1]), torch.tensor([0, 1, 2, 0, 1, 2, 3])
        a, b = d.new_cache(2, 16), d.new_cache(2, 16)
        d.append_context(a, slots, pos, feats)
        d.write_context(b, slots, pos, kv)
        assert torch.equal(a.lens, b.lens) and a.lens.tolist() == [3, 4]
        for i in range(c.num_layers):
            assert torch.equal(a.k[i], b.k[i]) and torch.equal(a.v[i], b.v[i])
        with pytest.raises(ValueError, match="do not fit"):
            DFlashDrafter.context_only(c, {"nope.weight": torch.zeros(1)})
