"""The GPT and its sampler: KV cache equals recompute, masking, guidance, completion, optimizer groups."""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from models.gpt import GPT, GPT_PRESETS, make_condition_tokens
from vqgpt.sampling import filter_logits, sample_tokens

CONFIG = dataclasses.replace(GPT_PRESETS["tiny"], codebook_size=50, n_classes=3, tokens_per_image=16)


@pytest.fixture(scope="module")
def model() -> GPT:
    torch.manual_seed(0)
    return GPT(CONFIG).eval()


def seeded(seed=7):
    return torch.Generator().manual_seed(seed)


def test_token_layout_and_weight_tying(model):
    assert CONFIG.start_token == 53 and CONFIG.vocab_size == 54
    assert model.head.weight.data_ptr() == model.token_embedding.weight.data_ptr()
    cond = make_condition_tokens(torch.tensor([0, 2]), 50, 3, 0.0)
    assert cond.tolist() == [50, 52]   # classes sit above the codebook, never on code 0
    dropped = make_condition_tokens(torch.tensor([0, 2] * 500), 50, 3, 0.5, seeded())
    assert 0.4 < (dropped == 53).float().mean() < 0.6
    assert make_condition_tokens(None, 50, 3, 0.0, batch_size=2).tolist() == [53, 53]


def test_loss_is_cross_entropy(model):
    idx = torch.randint(0, 50, (2, 16))
    logits, loss = model(idx, idx)
    assert logits.shape == (2, 16, 54)
    assert loss.item() == pytest.approx(F.cross_entropy(logits.view(-1, 54), idx.view(-1)).item(), rel=1e-6)


def test_kv_cache_logits_equal_full_forward(model):
    idx = torch.cat([torch.tensor([[51], [53]]), torch.randint(0, 50, (2, 15))], dim=1)
    with torch.no_grad():
        full, _ = model(idx)
        cache = model.new_cache()
        prefill, _ = model(idx[:, :5], cache=cache)     # several positions at once
        steps = [model(idx[:, p:p + 1], cache=cache)[0] for p in range(5, 16)]
    torch.testing.assert_close(torch.cat([prefill, *steps], dim=1), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("options", [dict(temperature=0), dict(temperature=1.0), dict(top_k=10, top_p=0.8),
                                     dict(cfg_scale=2.5, labels=True)])
def test_kv_cache_sampling_equals_recompute(model, options):
    options = dict(options)
    if options.pop("labels", False):
        options["labels"] = torch.tensor([0, 1, 2, 0])
    fast = sample_tokens(model, 4, generator=seeded(), **options)
    slow = sample_tokens(model, 4, generator=seeded(), use_kv_cache=False, **options)
    assert torch.equal(fast, slow)


def test_ids_outside_the_codebook_are_never_sampled():
    torch.manual_seed(0)
    model = GPT(CONFIG).eval()
    favour_conditioning_ids = torch.zeros(54)
    favour_conditioning_ids[50:] = 100.0
    hook = model.head.register_forward_hook(lambda module, inputs, output: output + favour_conditioning_ids)
    logits, _ = model(torch.full((1, 1), 53))
    assert logits[0, -1].argmax() >= 50   # the model itself would predict a class/start id
    tokens = sample_tokens(model, 8, labels=torch.tensor([0, 1, 2, 0, 1, 2, 0, 1]), cfg_scale=2.0,
                           generator=seeded(), temperature=2.0)
    assert tokens.max() < 50 and tokens.min() >= 0
    hook.remove()


def test_guidance_scale_one_is_plain_conditional(model):
    labels = torch.tensor([2, 1, 0])
    plain = sample_tokens(model, 3, labels=labels, generator=seeded(3))
    scale_one = sample_tokens(model, 3, labels=labels, cfg_scale=1.0, generator=seeded(3))
    guided = sample_tokens(model, 3, labels=labels, cfg_scale=4.0, generator=seeded(3))
    assert torch.equal(plain, scale_one) and not torch.equal(plain, guided)


def test_completion_keeps_the_given_rows_bit_for_bit(model):
    prefix = torch.randint(0, 50, (3, 8))
    tokens = sample_tokens(model, 3, prefix=prefix, generator=seeded())
    assert torch.equal(tokens[:, :8], prefix) and tokens.shape == (3, 16)


def test_top_k_one_is_greedy_and_top_p_keeps_the_nucleus(model):
    greedy = sample_tokens(model, 2, temperature=0)
    assert torch.equal(sample_tokens(model, 2, top_k=1, generator=seeded()), greedy)
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = torch.isfinite(filter_logits(logits, 1.0, None, 0.7))
    assert kept.tolist() == [[True, True, False, False]]
    assert torch.isfinite(filter_logits(logits, 1.0, None, 0.01)).tolist() == [[True, False, False, False]]


def test_optimizer_groups_split_decay_and_no_decay(model):
    optimizer = model.configure_optimizer(0.1, 1e-3, (0.9, 0.95), "cpu")
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    grouped = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert grouped == {id(p) for p in model.parameters()}
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(grouped)


def test_preset_sizes():
    counts = {name: GPT(config).num_params() / 1e6 for name, config in GPT_PRESETS.items()}
    print("GPT parameters (M):", counts)
    assert GPT_PRESETS["g256"].n_layer == 8 and GPT_PRESETS["g256"].n_embd == 512
    assert 24 < counts["g256"] < 28 and 80 < counts["seed"] < 95 and counts["tiny"] < 1.5
