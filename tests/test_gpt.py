"""models/gpt.py and vqgpt/sampling.py: the loss, the KV cache, masking, guidance, completion, optimizer groups."""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from models.gpt import GPT, GPT_PRESETS, GPTConfig, make_condition_tokens
from vqgpt.sampling import filter_logits, guidance_scale, sample_tokens

CODEBOOK, CLASSES, LENGTH = 40, 3, 12
CONFIG = dataclasses.replace(GPT_PRESETS["tiny"], codebook_size=CODEBOOK, n_classes=CLASSES,
                             tokens_per_image=LENGTH, bias=True)
VOCAB = CODEBOOK + CLASSES + 1
START = CODEBOOK + CLASSES


@pytest.fixture(scope="module")
def model() -> GPT:
    torch.manual_seed(1)
    return GPT(CONFIG).eval()


def seeded(seed: int = 11) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_sequences(batch: int, generator: torch.Generator) -> torch.Tensor:
    """[cond, t0 .. t_{L-2}] with a class token or the start token in front."""
    cond = torch.tensor([CODEBOOK + 1, START, CODEBOOK, START])[:batch, None]
    return torch.cat([cond, torch.randint(0, CODEBOOK, (batch, LENGTH - 1), generator=generator)], dim=1)


def test_start_token_sits_above_codes_and_classes():
    for codebook_size, n_classes in [(40, 3), (256, 0), (1024, 10)]:
        config = GPTConfig(codebook_size=codebook_size, n_classes=n_classes, n_layer=1, n_head=1, n_embd=8)
        assert config.start_token == codebook_size + n_classes
        assert config.vocab_size == codebook_size + n_classes + 1
        assert config.start_token not in range(codebook_size)
    with pytest.raises(ValueError, match="multiple of n_head"):
        GPTConfig(n_embd=100, n_head=8)


def test_condition_tokens_and_label_dropout():
    labels = torch.tensor([0, 2, 1])
    assert make_condition_tokens(labels, CODEBOOK, CLASSES, 0.0).tolist() == [40, 42, 41]
    assert make_condition_tokens(None, CODEBOOK, CLASSES, 0.5, batch_size=2).tolist() == [START, START]
    many = torch.arange(3000) % CLASSES
    dropped = make_condition_tokens(many, CODEBOOK, CLASSES, 0.25, seeded())
    assert 0.22 < (dropped == START).float().mean() < 0.28
    assert torch.equal(dropped, make_condition_tokens(many, CODEBOOK, CLASSES, 0.25, seeded()))
    kept = dropped != START
    assert torch.equal(dropped[kept], many[kept] + CODEBOOK)


def test_forward_shapes_loss_and_weight_tying(model):
    idx = random_sequences(3, seeded())
    targets = torch.randint(0, CODEBOOK, (3, LENGTH), generator=seeded(2))
    logits, loss = model(idx, targets)
    assert logits.shape == (3, LENGTH, VOCAB)
    assert model(idx)[1] is None
    torch.testing.assert_close(loss, F.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1)))
    assert model.head.weight is model.token_embedding.weight
    assert model.head.weight.untyped_storage().data_ptr() == model.token_embedding.weight.untyped_storage().data_ptr()
    counted_once = sum(p.numel() for p in set(model.parameters()))
    assert model.num_params() == counted_once


def test_forward_rejects_more_positions_than_the_grid(model):
    with pytest.raises(ValueError, match="tokens_per_image"):
        model(torch.zeros(1, LENGTH + 1, dtype=torch.long))


@pytest.mark.parametrize("chunks", [[LENGTH], [1] * LENGTH, [5, 1, 1, 3, 2], [1, 4, 7]])
def test_kv_cache_logits_equal_full_forward(model, chunks):
    idx = random_sequences(4, seeded())
    with torch.no_grad():
        full, _ = model(idx)
        cache, pieces, start = model.new_cache(), [], 0
        for size in chunks:   # prefills of several positions, with and without a cached past, and single steps
            pieces.append(model(idx[:, start:start + size], cache=cache)[0])
            start += size
    assert cache.length == LENGTH
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=0, atol=1e-5)


def sample_both_ways(model, options: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """4 samples with the KV cache and 4 recomputing the prefix, same seed; `options` as the parametrisations give
    them (label lists, a prefix length)."""
    options = dict(options)
    if "labels" in options:
        options["labels"] = torch.tensor(options["labels"])
    if "prefix" in options:
        options["prefix"] = torch.randint(0, CODEBOOK, (4, options["prefix"]), generator=seeded(5))
    return (sample_tokens(model, 4, generator=seeded(), **options),
            sample_tokens(model, 4, generator=seeded(), use_kv_cache=False, **options))


@pytest.mark.parametrize("options", [
    dict(temperature=0),
    dict(temperature=1.0),
    dict(temperature=0.7, top_k=5),
    dict(temperature=1.3, top_p=0.8),
    dict(top_k=10, top_p=0.9),
    dict(labels=[0, 1, 2, 1], cfg_scale=3.0, top_k=20),
    dict(labels=[2, 2, 0, 1], prefix=5, top_p=0.95),
    dict(labels=[0, 1, 2, 0], cfg_scale=2.0, prefix=3, temperature=0),
])
def test_kv_cache_sampling_equals_recompute(model, options):
    with_cache, recomputed = sample_both_ways(model, options)
    assert with_cache.shape == (4, LENGTH) and with_cache.dtype == torch.long
    assert torch.equal(with_cache, recomputed)


def test_ids_above_the_codebook_are_never_sampled():
    torch.manual_seed(1)
    model = GPT(CONFIG).eval()
    prefer_conditioning = torch.zeros(VOCAB)
    prefer_conditioning[CODEBOOK:] = 50.0
    hook = model.head.register_forward_hook(lambda module, inputs, output: output + prefer_conditioning)
    try:
        logits, _ = model(random_sequences(4, seeded()))
        assert (logits.argmax(dim=-1) >= CODEBOOK).all()   # the model itself would pick class/start ids
        labels = torch.tensor([0, 1, 2, 0])
        for options in [dict(temperature=3.0), dict(temperature=0), dict(top_k=VOCAB), dict(top_p=1.0),
                        dict(labels=labels, cfg_scale=4.0, temperature=2.0)]:
            for use_kv_cache in (True, False):
                tokens = sample_tokens(model, 4, generator=seeded(), use_kv_cache=use_kv_cache, **options)
                assert tokens.min() >= 0 and tokens.max() < CODEBOOK, options
    finally:
        hook.remove()


def test_guidance_scale_one_is_conditional_sampling(model):
    labels = torch.tensor([2, 0, 1, 1])
    conditional = sample_tokens(model, 4, labels=labels, generator=seeded(3))
    scale_one = sample_tokens(model, 4, labels=labels, cfg_scale=1.0, generator=seeded(3))
    guided = sample_tokens(model, 4, labels=labels, cfg_scale=3.0, generator=seeded(3))
    assert torch.equal(conditional, scale_one)
    assert not torch.equal(conditional, guided)
    assert guided.min() >= 0 and guided.max() < CODEBOOK


def test_guidance_runs_conditional_and_unconditional_rows_in_one_batch(model):
    batch_sizes, first_tokens = [], []

    def record(module, inputs):
        batch_sizes.append(inputs[0].shape[0])
        if len(first_tokens) == 0:
            first_tokens.append(inputs[0][:, 0].clone())
    hook = model.register_forward_pre_hook(record)
    try:
        sample_tokens(model, 3, labels=torch.tensor([0, 1, 2]), cfg_scale=2.0, generator=seeded())
    finally:
        hook.remove()
    assert len(batch_sizes) == LENGTH and set(batch_sizes) == {6}   # one forward of 2n rows per token
    assert first_tokens[0].tolist() == [CODEBOOK, CODEBOOK + 1, CODEBOOK + 2, START, START, START]


def test_guidance_scale_zero_is_unconditional(model):
    labels = torch.tensor([0, 1, 2])
    unconditional = sample_tokens(model, 3, temperature=0)
    assert torch.equal(sample_tokens(model, 3, labels=labels, cfg_scale=0.0, temperature=0), unconditional)
    assert not torch.equal(sample_tokens(model, 3, labels=labels, temperature=0), unconditional)


def test_guidance_schedules_meet_constant_guidance_at_their_end_points(model):
    assert [guidance_scale(3.0, i, 5, "linear") for i in range(5)] == [1.0, 1.5, 2.0, 2.5, 3.0]
    assert [guidance_scale(3.0, i, 5, interval=2) for i in range(5)] == [3.0, 3.0, 1.0, 1.0, 1.0]
    labels = torch.tensor([2, 0, 1, 1])

    def draw(**options):
        return sample_tokens(model, 4, labels=labels, generator=seeded(3), **options)
    constant = draw(cfg_scale=3.0)
    assert torch.equal(draw(cfg_scale=3.0, cfg_interval=LENGTH), constant)   # every token inside the interval
    assert torch.equal(draw(cfg_scale=1.0, cfg_schedule="linear"), draw(cfg_scale=1.0))   # a ramp from 1 to 1
    ramp = draw(cfg_scale=3.0, cfg_schedule="linear")
    assert torch.equal(ramp[:, 0], draw(cfg_scale=1.0)[:, 0])   # the first token is drawn unguided
    assert torch.equal(ramp, draw(cfg_scale=3.0, cfg_schedule="linear", use_kv_cache=False))
    assert not torch.equal(ramp, constant) and not torch.equal(draw(cfg_scale=3.0, cfg_interval=2), constant)
    with pytest.raises(ValueError, match="cfg_schedule"):
        draw(cfg_scale=3.0, cfg_schedule="cosine")


def test_completion_keeps_the_given_rows_bit_for_bit(model):
    prefix = torch.randint(0, CODEBOOK, (4, 7), generator=seeded(9))
    for use_kv_cache in (True, False):
        tokens = sample_tokens(model, 4, prefix=prefix, labels=torch.tensor([0, 1, 2, 0]), cfg_scale=2.0,
                               generator=seeded(), use_kv_cache=use_kv_cache)
        assert torch.equal(tokens[:, :7], prefix)
        assert tokens[:, 7:].max() < CODEBOOK
    whole = torch.randint(0, CODEBOOK, (2, LENGTH), generator=seeded(9))
    assert torch.equal(sample_tokens(model, 2, prefix=whole), whole)


def test_top_k_one_is_greedy(model):
    greedy = sample_tokens(model, 4, temperature=0)
    assert torch.equal(sample_tokens(model, 4, temperature=None), greedy)
    assert torch.equal(sample_tokens(model, 4, top_k=1, temperature=1.5, generator=seeded()), greedy)
    labels = torch.tensor([2, 1, 0, 2])
    assert torch.equal(sample_tokens(model, 4, labels=labels, cfg_scale=2.0, top_k=1, generator=seeded()),
                       sample_tokens(model, 4, labels=labels, cfg_scale=2.0, temperature=0))


def test_fixed_seed_reproduces_and_sampling_restores_train_mode(model):
    model.train()
    try:
        first = sample_tokens(model, 4, generator=seeded(21))
        assert model.training
    finally:
        model.eval()
    assert torch.equal(first, sample_tokens(model, 4, generator=seeded(21)))
    assert not torch.equal(first, sample_tokens(model, 4, generator=seeded(22)))


def test_filter_logits_masks_top_k_and_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.04, 0.01]]))
    kept = lambda **options: torch.isfinite(filter_logits(logits, **options))[0].tolist()
    assert kept(num_valid=4) == [True, True, True, True, False]
    assert kept(top_k=2) == [True, True, False, False, False]
    assert kept(top_p=0.7) == [True, True, False, False, False]   # 0.5 < 0.7 <= 0.8
    assert kept(top_p=0.45) == [True, False, False, False, False]  # the top id alone is enough
    assert kept(top_p=0.01) == [True, False, False, False, False]
    assert kept(top_p=1.0) == [True] * 5
    scaled = filter_logits(logits, temperature=2.0)
    torch.testing.assert_close(scaled, (logits - logits.max()) / 2)   # the most likely at 0: same softmax
    # temperature flattens the distribution before the nucleus is chosen
    assert torch.isfinite(filter_logits(logits, 5.0, None, 0.7)).sum() > 2


def test_bad_sampling_options_are_rejected(model):
    with pytest.raises(ValueError, match="labels"):
        sample_tokens(model, 2, labels=torch.tensor([0, CLASSES]))
    with pytest.raises(ValueError, match="prefix"):
        sample_tokens(model, 2, prefix=torch.full((2, 3), CODEBOOK))
    with pytest.raises(ValueError, match="top_p"):
        sample_tokens(model, 2, top_p=0.0)


def test_optimizer_groups_split_decay_from_layernorm_and_bias(model):
    optimizer = model.configure_optimizer(0.1, 1e-3, (0.9, 0.95), "cpu")
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    names = {id(p): name for name, p in model.named_parameters()}
    decay_names = {names[id(p)] for p in decay["params"]}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    assert not any(".ln_" in name or name.startswith("ln_f") or name.endswith(".bias") for name in decay_names)
    assert "token_embedding.weight" in decay_names and "blocks.0.attn.qkv.weight" in decay_names
    assert "blocks.0.ln_1.weight" in no_decay_names and "blocks.0.attn.qkv.bias" in no_decay_names
    everything = [id(p) for group in optimizer.param_groups for p in group["params"]]
    assert len(everything) == len(set(everything)) and set(everything) == set(names)


def test_flops_per_token_is_six_n_plus_attention(model):
    matmul_params = model.num_params() - LENGTH * CONFIG.n_embd
    attention = 12 * CONFIG.n_layer * CONFIG.n_embd * LENGTH
    assert model.estimate_flops_per_token() == 6 * matmul_params + attention


def test_preset_parameter_counts():
    with torch.device("meta"):   # shapes only: no memory, no init time
        counts = {name: GPT(config).num_params() for name, config in GPT_PRESETS.items() if config.arch == "gpt2"}
    print("GPT parameters:", {name: f"{count / 1e6:.2f}M" for name, count in counts.items()})
    g256 = GPT_PRESETS["g256"]
    assert (g256.tokens_per_image, g256.n_layer, g256.n_head, g256.n_embd, g256.codebook_size) == (256, 8, 8, 512, 1024)
    for name in counts:   # GPT-2 without biases: 12 d^2 + two LayerNorm gains a block,
        config = GPT_PRESETS[name]
        d = config.n_embd                  # the final LayerNorm, token and position tables, the tied head
        expected = config.n_layer * (12 * d * d + 2 * d) + d + (config.vocab_size + config.tokens_per_image) * d
        assert not config.bias and counts[name] == expected, name


# LlamaGen's block: RMSNorm, SwiGLU, 2-D RoPE over a 4x4 grid; grouped key/value heads and QK-norm as options
LLAMA = dataclasses.replace(CONFIG, arch="llama", tokens_per_image=16, bias=False)
LLAMA_VARIANTS = {"llama": LLAMA, "llama-gqa-qknorm": dataclasses.replace(LLAMA, n_kv_head=2, qk_norm=True),
                  "llama-mqa": dataclasses.replace(LLAMA, n_kv_head=1),
                  "gpt2-gqa-qknorm": dataclasses.replace(CONFIG, n_kv_head=2, qk_norm=True, tokens_per_image=16)}


def trained_looking(config: GPTConfig, seed: int = 1) -> GPT:
    """A model with every weight random (LlamaGen's head starts at zero; norm gains at one)."""
    torch.manual_seed(seed)
    model = GPT(config).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.3)
    return model


@pytest.mark.parametrize("variant", LLAMA_VARIANTS)
@pytest.mark.parametrize("chunks", [[1] * 16, [5, 1, 1, 3, 6]])
def test_kv_cache_logits_equal_full_forward_under_rope_and_grouped_heads(variant, chunks):
    config = LLAMA_VARIANTS[variant]
    model = trained_looking(config)
    length = config.tokens_per_image
    cond = torch.tensor([CODEBOOK + 1, START, CODEBOOK, START])[:, None]
    idx = torch.cat([cond, torch.randint(0, CODEBOOK, (4, length - 1), generator=seeded())], dim=1)
    with torch.no_grad():
        full, _ = model(idx)
        cache, pieces, start = model.new_cache(), [], 0
        for size in chunks:
            pieces.append(model(idx[:, start:start + size], cache=cache)[0])
            start += size
    assert full.shape == (4, length, CODEBOOK if config.arch == "llama" else VOCAB)
    assert cache.kv.shape[3] == config.kv_heads   # the cache holds the shared heads only
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=0, atol=1e-4)


@pytest.mark.parametrize("variant", ["llama", "llama-gqa-qknorm"])
@pytest.mark.parametrize("options", [
    dict(temperature=1.0),
    dict(labels=[0, 1, 2, 1], cfg_scale=3.0, top_k=20),
    dict(labels=[0, 1, 2, 0], cfg_scale=2.0, prefix=3, temperature=0),
])
def test_kv_cache_sampling_equals_recompute_under_rope(variant, options):
    with_cache, recomputed = sample_both_ways(trained_looking(LLAMA_VARIANTS[variant]), options)
    assert torch.equal(with_cache, recomputed)
    assert with_cache.max() < CODEBOOK


def test_grid_rope_scores_depend_on_the_2d_offset_only_and_zero_the_condition():
    from models.gpt import grid_rotations, rotate
    side, head_dim = 5, 8
    table = grid_rotations(side, head_dim)   # (1 + 25, 4, 2)
    q, k = torch.randn(2, 1, 1, 1, head_dim).unbind(0)

    def score(cell_q, cell_k):   # (row, col) of each
        rows = [1 + cell_q[0] * side + cell_q[1], 1 + cell_k[0] * side + cell_k[1]]
        return (rotate(q, table[rows[0]:rows[0] + 1]) * rotate(k, table[rows[1]:rows[1] + 1])).sum()

    torch.testing.assert_close(score((3, 1), (1, 0)), score((4, 3), (2, 2)))   # same (2, 1) offset
    torch.testing.assert_close(score((2, 2), (2, 2)), (q * k).sum())            # no offset: no turn
    assert not torch.isclose(score((3, 1), (1, 0)), score((3, 1), (0, 1)))      # rows and columns differ
    assert torch.count_nonzero(rotate(q, table[:1])) == 0                        # the condition position


def test_llama_block_layout_and_options():
    model = GPT(dataclasses.replace(LLAMA, n_kv_head=2, qk_norm=True, drop_path=0.3, token_dropout=0.05))
    names = set(model.state_dict())
    assert "position_embedding.weight" not in names and "rotations" not in names   # rebuilt, not stored
    assert model.head.weight.data_ptr() != model.token_embedding.weight.data_ptr()
    assert model.blocks[0].attn.qkv.weight.shape == ((4 + 2 * 2) * 32, 128)
    assert model.blocks[0].mlp.gate.weight.shape == (512, 128)   # 2/3 of 4 x 128 is 341: up to 512
    assert "blocks.0.attn.q_norm.weight" in names and "blocks.0.ln_1.weight" in names
    assert model.dropout.p == 0.05 and GPT(LLAMA).dropout.p == LLAMA.dropout   # token dropout, else --dropout
    assert [block.drop_path for block in model.blocks] == pytest.approx([0.0, 0.1, 0.2, 0.3])
    attention = 12 * LLAMA.n_layer * LLAMA.n_embd * 16   # the head is a matmul, the token table a lookup
    assert model.estimate_flops_per_token() == 6 * (model.num_params() - VOCAB * 128) + attention


def test_drop_path_keeps_or_drops_whole_samples_and_is_off_in_eval():
    from models.gpt import drop_path
    torch.manual_seed(0)
    x = torch.ones(400, 3, 2)
    out = drop_path(x, 0.25, training=True)
    per_sample = out.flatten(1)
    assert set(per_sample.unique().tolist()) <= {0.0, torch.tensor(1 / 0.75).item()}
    assert torch.all(per_sample == per_sample[:, :1])   # one decision per sample
    assert 0.15 < (per_sample[:, 0] == 0).float().mean() < 0.35
    assert drop_path(x, 0.25, training=False) is x


@pytest.mark.parametrize("bad", [dict(arch="mamba"), dict(n_kv_head=3), dict(arch="llama", tokens_per_image=12),
                                 dict(arch="llama", n_embd=72, n_head=4), dict(drop_path=1.0),
                                 dict(token_dropout=-0.1)])
def test_bad_block_options_are_refused(bad):
    with pytest.raises(ValueError):
        dataclasses.replace(CONFIG, **bad)


def test_llamagen_presets_have_llamagens_parameter_counts():
    # LlamaGen's gpt.py counts every parameter of its Transformer: token and class tables, blocks, separate head
    published = {"B": 111e6, "L": 343e6, "XL": 775e6, "XXL": 1.4e9}
    for name, size in published.items():
        config = GPT_PRESETS[f"llamagen-{name}"]
        with torch.device("meta"):
            count = GPT(config).num_params()
        d, hidden = config.n_embd, config.mlp_hidden
        assert count == (config.n_layer * (4 * d * d + 3 * d * hidden + 2 * d) + d
                         + (config.codebook_size + config.n_classes + 1) * d + config.codebook_size * d), name
        digits = 2 if name == "XXL" else 3   # they print 1.4B and 111M, 343M, 775M
        assert float(f"{count:.{digits}g}") == size, (name, count)
