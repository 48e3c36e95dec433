"""model/qwen2_audio.py against transformers' PyTorch Qwen2AudioForConditionalGeneration (fp32, CPU).

One tiny random model with odd shapes (text hidden 84, 6 heads / 2 kv heads = 3 groups, head_dim 14,
intermediate 100, vocab 1000; audio d_model 80, 5 heads, ffn 96, 2 layers each) is built in torch and converted
to our parameter tree by a small local helper (the real converter is model/checkpoint.py).
"""
import dataclasses
import functools
import json

import flax.linen as nn
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from model import processor as P
from model import qwen2_audio as qa
from model.config import PRESETS, AudioConfig, ConfigError, Qwen2AudioConfig, TextConfig, get_config
from model.sharding import LOGICAL_AXIS_RULES, batch_sharding, make_mesh, param_shardings

AUDIO_ID = 997
N_FRAMES = 3000  # transformers' Qwen2Audio only accepts 30 s of mel frames
TOL = 1e-4

CONFIG = Qwen2AudioConfig(
    audio=AudioConfig(d_model=80, encoder_layers=2, encoder_attention_heads=5, encoder_ffn_dim=96, num_mel_bins=128,
                      max_source_positions=1500),
    text=TextConfig(vocab_size=1000, hidden_size=84, intermediate_size=100, num_hidden_layers=2,
                    num_attention_heads=6, num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=10000.0,
                    max_position_embeddings=512),
    audio_token_index=AUDIO_ID,
)


# One jitted forward for every test: eager Flax is slow, and calls with equal shapes share a compilation.
fwd = jax.jit(qa.forward, static_argnames=("config", "dtype", "remat_policy"))


def torch_to_flax(state_dict, config):
    """HF state_dict -> our pinned tree (Dense kernels transposed, Conv1d [out,in,k] -> [k,in,out], layers stacked)."""
    sd = {k: v.detach().float().numpy() for k, v in state_dict.items()}

    def stack(prefix, n, leaf, transpose):
        arrs = [sd[f"{prefix}.{i}.{leaf}"] for i in range(n)]
        return np.stack([a.T if transpose else a for a in arrs])

    def layer_tree(prefix, n, spec):
        tree = {}
        for path, (leaf, transpose) in spec.items():
            node = tree
            *parents, last = path.split("/")
            for p in parents:
                node = node.setdefault(p, {})
            node[last] = stack(prefix, n, leaf, transpose)
        return tree

    a, t = "model.audio_tower", "model.language_model"
    audio_spec = {}
    for m, has_bias in [("q_proj", True), ("k_proj", False), ("v_proj", True), ("out_proj", True)]:
        audio_spec[f"self_attn/{m}/kernel"] = (f"self_attn.{m}.weight", True)
        if has_bias:
            audio_spec[f"self_attn/{m}/bias"] = (f"self_attn.{m}.bias", False)
    for m in ("fc1", "fc2"):
        audio_spec[f"{m}/kernel"] = (f"{m}.weight", True)
        audio_spec[f"{m}/bias"] = (f"{m}.bias", False)
    for m in ("self_attn_layer_norm", "final_layer_norm"):
        audio_spec[f"{m}/scale"] = (f"{m}.weight", False)
        audio_spec[f"{m}/bias"] = (f"{m}.bias", False)
    text_spec = {"input_layernorm/scale": ("input_layernorm.weight", False),
                 "post_attention_layernorm/scale": ("post_attention_layernorm.weight", False),
                 "self_attn/o_proj/kernel": ("self_attn.o_proj.weight", True)}
    for m in ("q_proj", "k_proj", "v_proj"):
        text_spec[f"self_attn/{m}/kernel"] = (f"self_attn.{m}.weight", True)
        text_spec[f"self_attn/{m}/bias"] = (f"self_attn.{m}.bias", False)
    for m in ("gate_proj", "up_proj", "down_proj"):
        text_spec[f"mlp/{m}/kernel"] = (f"mlp.{m}.weight", True)
    params = {
        "audio_tower": {
            "conv1": {"kernel": sd[f"{a}.conv1.weight"].transpose(2, 1, 0), "bias": sd[f"{a}.conv1.bias"]},
            "conv2": {"kernel": sd[f"{a}.conv2.weight"].transpose(2, 1, 0), "bias": sd[f"{a}.conv2.bias"]},
            "embed_positions": {"embedding": sd[f"{a}.embed_positions.weight"]},
            "layers": layer_tree(f"{a}.layers", config.audio.encoder_layers, audio_spec),
            "layer_norm": {"scale": sd[f"{a}.layer_norm.weight"], "bias": sd[f"{a}.layer_norm.bias"]},
        },
        "multi_modal_projector": {"linear": {"kernel": sd["model.multi_modal_projector.linear.weight"].T,
                                             "bias": sd["model.multi_modal_projector.linear.bias"]}},
        "language_model": {
            "embed_tokens": {"embedding": sd[f"{t}.embed_tokens.weight"]},
            "layers": layer_tree(f"{t}.layers", config.text.num_hidden_layers, text_spec),
            "norm": {"scale": sd[f"{t}.norm.weight"]},
        },
        "lm_head": {"kernel": sd["lm_head.weight"].T},
    }
    return jax.tree_util.tree_map(jnp.asarray, params)


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    hf_config = transformers.Qwen2AudioConfig.from_dict(CONFIG.to_hf_dict())
    hf_config._attn_implementation = "eager"
    hf_config.text_config._attn_implementation = "eager"
    hf_config.audio_config._attn_implementation = "eager"
    model = transformers.Qwen2AudioForConditionalGeneration(hf_config).eval()
    with torch.no_grad():  # give norms and biases non-trivial values so a mix-up cannot hide
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    params = torch_to_flax(model.state_dict(), CONFIG)
    return model, params


def n_audio_tokens(frames):
    return int(P.num_audio_tokens(np.asarray(frames)))


def make_prompt(rng, n_audio, n_before=5, n_after=7):
    ids = list(rng.integers(0, 990, n_before)) + [AUDIO_ID] * n_audio + list(rng.integers(0, 990, n_after))
    return np.asarray(ids, np.int64)


def torch_logits(model, ids, mask, features=None, feature_mask=None):
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    with torch.no_grad():
        out = model(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask),
                    position_ids=torch.as_tensor(positions),
                    input_features=None if features is None else torch.as_tensor(features),
                    feature_attention_mask=None if feature_mask is None else torch.as_tensor(feature_mask))
    return out.logits.numpy()


def max_diff_on(a, b, mask):
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))[np.asarray(mask, bool)]))


def random_features(rng, batch):
    # Random values on ALL 3000 frames: padding frames are garbage the masks must hide, not zeros.
    return rng.standard_normal((batch, 128, N_FRAMES)).astype(np.float32)


# ---------------------------------------------------------------------------------------------------------------
# Forward parity
# ---------------------------------------------------------------------------------------------------------------

def test_text_only_prompt_logits_match_transformers(models):
    model, params = models
    rng = np.random.default_rng(1)
    ids = rng.integers(0, 990, (2, 13))
    mask = np.ones_like(ids)
    ours = fwd(params, CONFIG, jnp.asarray(ids), jnp.asarray(mask))
    ref = torch_logits(model, ids, mask)
    assert ours.shape == ref.shape == (2, 13, 1000)
    assert ours.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(ours), ref, atol=TOL, rtol=0)


def test_audio_prompt_with_bucketed_features_matches_full_30s_reference(models):
    model, params = models
    rng = np.random.default_rng(2)
    frames, bucket = 150, 200
    feats = random_features(rng, 1)
    ids = make_prompt(rng, n_audio_tokens(frames))[None]
    mask = np.ones_like(ids)
    fmask = (np.arange(N_FRAMES) < frames)[None].astype(np.int64)
    ref = torch_logits(model, ids, mask, feats, fmask)
    ours = fwd(params, CONFIG, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(feats[:, :, :bucket]),
                      jnp.asarray([frames]))
    np.testing.assert_allclose(np.asarray(ours), ref, atol=TOL, rtol=0)


def test_right_padded_batch_mixing_two_clips_and_a_text_only_row_matches_reference(models):
    model, params = models
    rng = np.random.default_rng(3)
    frames, bucket = [96, 187], 200
    rows = [make_prompt(rng, n_audio_tokens(frames[0]), 3, 9), make_prompt(rng, n_audio_tokens(frames[1]), 6, 4),
            rng.integers(0, 990, 11)]
    S = max(len(r) for r in rows)
    ids = np.zeros((3, S), np.int64)
    mask = np.zeros((3, S), np.int64)
    for b, r in enumerate(rows):
        ids[b, : len(r)], mask[b, : len(r)] = r, 1
    feats = random_features(rng, 2)
    fmask = (np.arange(N_FRAMES)[None] < np.asarray(frames)[:, None]).astype(np.int64)
    ref = torch_logits(model, ids, mask, feats, fmask)  # torch gets one feature row per audio
    our_feats = np.concatenate([feats[:, :, :bucket], np.zeros((1, 128, bucket), np.float32)])
    ours = fwd(params, CONFIG, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(our_feats),
                      jnp.asarray(frames + [0]))
    assert max_diff_on(ours, ref, mask) <= TOL


def test_bucketed_encoder_equals_3000_frame_encoder_at_every_real_token_of_a_3s_clip(models):
    model, params = models
    rng = np.random.default_rng(4)
    frames, bucket = 300, 304  # 3 s; the conv kernels read frame 300, so the bucket keeps it
    feats = random_features(rng, 1)
    captured = {}

    def keep_output(module, args, out):
        captured["h"] = out.last_hidden_state.detach().numpy()

    hook = model.model.audio_tower.register_forward_hook(keep_output)
    ids = make_prompt(rng, n_audio_tokens(frames))[None]
    try:
        torch_logits(model, ids, np.ones_like(ids), feats, (np.arange(N_FRAMES) < frames)[None].astype(np.int64))
    finally:
        hook.remove()
    encoder = qa.AudioEncoder(CONFIG)
    ours = jax.jit(encoder.apply)({"params": params["audio_tower"]}, jnp.asarray(feats[:, :, :bucket]),
                                  jnp.asarray([frames]))
    n = n_audio_tokens(frames)
    assert n == 75 and ours.shape == (1, bucket // 4, 80) and captured["h"].shape == (1, 750, 80)
    np.testing.assert_allclose(np.asarray(ours[:, :n]), captured["h"][:, :n], atol=TOL, rtol=0)


def test_audio_token_count_mismatch_is_a_clear_error(models):
    _, params = models
    ids = make_prompt(np.random.default_rng(5), 10)[None]
    with pytest.raises(ValueError, match="do not match"):
        qa.forward(params, CONFIG, jnp.asarray(ids), jnp.ones(ids.shape, jnp.int32),
                   jnp.zeros((1, 128, 100)), jnp.asarray([100]))  # 100 frames -> 25 tokens, not 10


# ---------------------------------------------------------------------------------------------------------------
# KV-cache decoding
# ---------------------------------------------------------------------------------------------------------------

def test_cached_decoding_of_16_tokens_equals_uncached_forward_on_left_padded_batch(models):
    _, params = models
    rng = np.random.default_rng(6)
    frames, bucket, steps = 120, 128, 16
    rows = [make_prompt(rng, n_audio_tokens(frames), 4, 5), rng.integers(0, 990, 8)]  # audio row, text-only row
    S = max(len(r) for r in rows)
    ids = np.zeros((2, S), np.int32)
    mask = np.zeros((2, S), np.int32)
    for b, r in enumerate(rows):  # left padding
        ids[b, S - len(r):], mask[b, S - len(r):] = r, 1
    feats = np.concatenate([rng.standard_normal((1, 128, bucket)), np.zeros((1, 128, bucket))]).astype(np.float32)
    lengths = np.asarray([frames, 0])

    cache = qa.init_cache(CONFIG, 2, S + steps, jnp.float32)
    prefill = jax.jit(functools.partial(qa.prefill, config=CONFIG))
    logits, cache = prefill(params, input_ids=jnp.asarray(ids), attention_mask=jnp.asarray(mask),
                            input_features=jnp.asarray(feats), feature_lengths=jnp.asarray(lengths), cache=cache)
    step = jax.jit(functools.partial(qa.decode_step, config=CONFIG))
    tokens, step_logits = [], []
    tok = jnp.argmax(logits[:, -1], axis=-1)
    for _ in range(steps):
        tokens.append(tok)
        out, cache = step(params, tokens=tok, cache=cache)
        step_logits.append(out)
        tok = jnp.argmax(out, axis=-1)

    full_ids = np.concatenate([ids, np.stack(tokens, 1)], axis=1)
    full_mask = np.concatenate([mask, np.ones((2, steps), np.int32)], axis=1)
    full = fwd(params, CONFIG, jnp.asarray(full_ids), jnp.asarray(full_mask), jnp.asarray(feats),
                      jnp.asarray(lengths))
    assert max_diff_on(logits, full[:, :S], mask) <= TOL  # prefill logits
    diffs = [float(jnp.max(jnp.abs(step_logits[i] - full[:, S + i]))) for i in range(steps)]
    assert max(diffs) <= TOL, diffs
    assert int(cache["index"]) == S + steps
    np.testing.assert_array_equal(np.asarray(cache["pos"]), mask.sum(1) + steps)


# ---------------------------------------------------------------------------------------------------------------
# bf16, sharding, the empty-audio row, remat
# ---------------------------------------------------------------------------------------------------------------

def _audio_batch(seed=7):
    rng = np.random.default_rng(seed)
    frames, bucket = 100, 100
    rows = [make_prompt(rng, n_audio_tokens(frames), 3, 4), rng.integers(0, 990, 7)]
    S = max(len(r) for r in rows)
    ids, mask = np.zeros((4, S), np.int32), np.zeros((4, S), np.int32)
    for b in range(4):
        r = rows[b % 2]
        ids[b, : len(r)], mask[b, : len(r)] = r, 1
    feats = rng.standard_normal((4, 128, bucket)).astype(np.float32)
    lengths = np.asarray([frames, 0, frames, 0])
    return tuple(jnp.asarray(x) for x in (ids, mask, feats, lengths))


def test_bf16_forward_is_close_to_fp32(models):
    _, params = models
    ids, mask, feats, lengths = _audio_batch()
    ref = fwd(params, CONFIG, ids, mask, feats, lengths)
    bf16_params = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), params)
    out = fwd(bf16_params, CONFIG, ids, mask, feats, lengths, dtype=jnp.bfloat16)
    assert out.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(out)))
    valid = np.asarray(mask, bool)
    rel = max_diff_on(out, ref, valid) / float(jnp.max(jnp.abs(ref)))
    # Measured 0.8% (bf16 keeps 8 mantissa bits: 0.4% per rounding); 3% still catches a wrong cast or path.
    print(f"bf16 vs fp32: max |dlogit| / max |logit| = {rel:.4f}")
    assert rel < 0.03, rel


def test_sharded_forward_on_2x2x2_mesh_equals_unsharded_and_params_are_sharded(models):
    _, params = models
    assert len(jax.devices()) == 8
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    shardings = param_shardings(mesh, qa.abstract_params(CONFIG))
    sharded = jax.device_put(params, shardings)
    ids, mask, feats, lengths = _audio_batch()
    ref = fwd(params, CONFIG, ids, mask, feats, lengths)

    fn = jax.jit(lambda p, i, m, f, n: qa.forward(p, CONFIG, i, m, f, n),
                 in_shardings=(shardings,) + (batch_sharding(mesh),) * 4)
    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_AXIS_RULES):
        out = fn(sharded, ids, mask, feats, lengths)
    assert max_diff_on(out, ref, mask) <= TOL

    q = sharded["language_model"]["layers"]["self_attn"]["q_proj"]["kernel"]  # [layers, embed, heads]
    assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    assert q.addressable_shards[0].data.shape == (2, 42, 42)
    emb = sharded["language_model"]["embed_tokens"]["embedding"]  # [vocab, embed]
    assert emb.addressable_shards[0].data.shape == (500, 42)
    fc1 = sharded["audio_tower"]["layers"]["fc1"]["kernel"]  # [layers, audio_embed, audio_mlp]
    assert fc1.addressable_shards[0].data.shape == (2, 40, 48)


def test_make_mesh_rejects_sizes_that_do_not_divide_the_devices():
    assert make_mesh(data=2, fsdp=-1, tensor=2).shape == {"data": 2, "fsdp": 2, "tensor": 2}
    with pytest.raises(ValueError, match="does not divide"):
        make_mesh(data=3, fsdp=-1)


def test_zero_length_audio_row_gives_finite_logits(models):
    _, params = models
    ids, mask, feats, lengths = _audio_batch()  # rows 1 and 3: feature_lengths 0, every audio key masked
    logits = fwd(params, CONFIG, ids, mask, feats, lengths)
    assert bool(jnp.all(jnp.isfinite(logits)))
    # Those text-only rows are unaffected by the (fully masked) encoder run: same logits as a text-only batch.
    text_only = fwd(params, CONFIG, ids[1::2], mask[1::2])
    assert max_diff_on(logits[1::2], text_only, mask[1::2]) <= 1e-5


@pytest.mark.slow
def test_zero_length_audio_row_gives_finite_gradients(models):
    _, params = models
    ids, mask, feats, lengths = _audio_batch()

    def loss(p):
        logits = qa.forward(p, CONFIG, ids, mask, feats, lengths, remat_policy="dots")
        return jnp.sum(jax.nn.log_softmax(logits)[..., 0] * mask)

    value, grads = jax.jit(jax.value_and_grad(loss))(params)
    assert np.isfinite(float(value))
    bad = [jax.tree_util.keystr(k) for k, g in jax.tree_util.tree_leaves_with_path(grads)
           if not bool(jnp.all(jnp.isfinite(g)))]
    assert not bad, bad
    assert float(jnp.sum(jnp.abs(grads["audio_tower"]["conv1"]["kernel"]))) > 0  # the encoder did get gradients


@pytest.mark.slow
def test_remat_policies_give_the_same_gradients_as_no_remat(models):
    _, params = models
    ids, mask, feats, lengths = _audio_batch()

    def grads(policy):
        def loss(p):
            logits = qa.forward(p, CONFIG, ids, mask, feats, lengths, remat_policy=policy)
            return jnp.sum(jax.nn.log_softmax(logits)[..., 0] * mask)
        return jax.jit(jax.grad(loss))(params)

    ref = grads("none")
    for policy in ("full", "dots"):
        diff = jax.tree_util.tree_map(lambda a, b: float(jnp.max(jnp.abs(a - b))), grads(policy), ref)
        assert max(jax.tree_util.tree_leaves(diff)) <= 1e-5, policy
    with pytest.raises(ValueError, match="remat_policy"):
        qa.forward(params, CONFIG, ids, mask, feats, lengths, remat_policy="some")


@pytest.mark.parametrize("lm_head_chunk", [qa.LM_HEAD_CHUNK, 96], ids=["one-chunk", "chunked"])
def test_answer_loss_gradients_match_torch_autograd_for_every_parameter(models, monkeypatch, lm_head_chunk):
    # The training loss's gradient, against the reference's autograd: the convolutions' kernel gradients (a matmul
    # over shifted copies here, conv1d's backward there) and the target logit's (a select here, a scatter there);
    # "chunked": the LM head fused with the cross-entropy over 10 chunks of 96 columns and one of 40, as a 156k
    # vocabulary takes it.
    import train
    monkeypatch.setattr(qa, "LM_HEAD_CHUNK", lm_head_chunk)
    model, params = models
    rng = np.random.default_rng(7)
    frames, bucket = 301, 304
    feats = random_features(rng, 1)
    ids = np.concatenate([make_prompt(rng, n_audio_tokens(frames)), rng.integers(0, 990, 6)])[None]
    S = ids.shape[1]
    answer = np.arange(S - 7, S - 1)[None]  # the positions predicting the last 6 tokens
    mb = {"targets": jnp.asarray(np.roll(ids, -1, axis=1), jnp.int32), "answer_index": jnp.asarray(answer, jnp.int32),
          "loss_mask": jnp.asarray((np.arange(S) >= S - 7) & (np.arange(S) < S - 1), jnp.float32)[None]}

    mb.update(input_ids=jnp.asarray(ids, jnp.int32), attention_mask=jnp.ones(ids.shape, jnp.int32),
              input_features=jnp.asarray(feats[:, :, :bucket]), feature_lengths=jnp.asarray([frames]))

    def loss(p):
        return train.answer_loss(p, CONFIG, mb, jnp.float32, "none")[0]

    ours = jax.jit(jax.grad(loss))(params)
    out = model(input_ids=torch.as_tensor(ids), attention_mask=torch.ones(ids.shape, dtype=torch.long),
                input_features=torch.as_tensor(feats),
                feature_attention_mask=torch.as_tensor((np.arange(N_FRAMES) < frames)[None].astype(np.int64)))
    ref_loss = torch.nn.functional.cross_entropy(out.logits[0, answer[0]], torch.as_tensor(ids[0, answer[0] + 1]),
                                                 reduction="sum")
    # the encoder's positions are not trained there (requires_grad False), nor here (train.ALWAYS_FROZEN)
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    grads = dict(zip(trained, torch.autograd.grad(ref_loss, list(trained.values()))))
    ref = torch_to_flax({n: grads.get(n, torch.zeros_like(p)) for n, p in model.named_parameters()}, CONFIG)
    assert float(loss(params)) == pytest.approx(ref_loss.item(), rel=1e-5)
    trained_grads, _ = train.split_params(ours, train.ALWAYS_FROZEN)
    for path, g in jax.tree_util.tree_leaves_with_path(trained_grads):
        r = functools.reduce(lambda node, key: node[key.key], path, ref)
        scale = float(jnp.max(jnp.abs(r)))
        assert scale > 0, jax.tree_util.keystr(path)  # every parameter gets a gradient from this row
        assert float(jnp.max(jnp.abs(g - r))) <= 1e-5 * scale, jax.tree_util.keystr(path)


def _head_case(rng, rows=(2, 7), hidden=24, vocab=1003):
    h = rng.standard_normal((*rows, hidden)).astype(np.float32)
    kernel = (0.3 * rng.standard_normal((hidden, vocab))).astype(np.float32)
    targets = rng.integers(0, vocab, rows)
    targets[0, :3] = (0, vocab - 1, 96 * 10 + 5)  # the first column, the last, one in the partial last chunk
    mask = (rng.random(rows) < 0.8).astype(np.float32)
    return h, kernel, targets, mask


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_lm_head_loss_over_vocabulary_chunks_is_torchs_cross_entropy_with_its_gradients(monkeypatch, dtype, tol):
    # 1,003 columns in chunks of 96: ten full ones and a partial one of 43; targets at both ends and in the last.
    monkeypatch.setattr(qa, "LM_HEAD_CHUNK", 96)
    h, kernel, targets, mask = _head_case(np.random.default_rng(0))
    loss = lambda h_, k_: qa.lm_head_nll(h_, k_, jnp.asarray(targets), jnp.asarray(mask), dtype)
    value, (dh, dkernel) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(jnp.asarray(h), jnp.asarray(kernel))
    th, tk = torch.tensor(h, requires_grad=True), torch.tensor(kernel, requires_grad=True)
    ce = torch.nn.functional.cross_entropy((th @ tk).reshape(-1, kernel.shape[1]), torch.as_tensor(targets).reshape(-1),
                                           reduction="none")
    ref = (ce * torch.as_tensor(mask).reshape(-1)).sum()
    ref.backward()
    assert float(value) == pytest.approx(ref.item(), rel=tol)
    for ours, theirs in ((dh, th.grad), (dkernel, tk.grad)):
        scale = float(theirs.abs().max())
        assert float(jnp.max(jnp.abs(ours.astype(jnp.float32) - theirs.numpy()))) <= tol * scale


def test_lm_head_loss_over_vocabulary_chunks_never_holds_a_row_of_all_the_logits(monkeypatch):
    # The point of the chunks: no array of the loss or its gradient spans the vocabulary but the kernel and its
    # gradient ([H, V]); the plain path's logits and softmax ([rows, V]) are what this would catch.
    h, kernel, targets, mask = _head_case(np.random.default_rng(1))
    args = jnp.asarray(h), jnp.asarray(kernel)

    def widest_but_the_kernel(chunk):
        monkeypatch.setattr(qa, "LM_HEAD_CHUNK", chunk)
        loss = lambda h_, k_: qa.lm_head_nll(h_, k_, jnp.asarray(targets), jnp.asarray(mask), jnp.float32)
        jaxpr = jax.make_jaxpr(jax.value_and_grad(loss, argnums=(0, 1)))(*args)
        widths = set()

        def walk(jp):
            for eqn in jp.eqns:
                for var in eqn.outvars:
                    shape = getattr(var.aval, "shape", ())
                    if shape and shape != kernel.shape:
                        widths.add(shape[-1])
                for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                    walk(sub)
        walk(jaxpr.jaxpr)
        return max(widths)

    assert widest_but_the_kernel(qa.LM_HEAD_CHUNK) == kernel.shape[1]  # one chunk: the plain head holds them all
    assert widest_but_the_kernel(96) == 96


@pytest.mark.parametrize("stride", [1, 2])
def test_conv3_is_flax_conv_bit_for_bit_so_inference_is_unchanged(stride):
    x = jax.random.normal(jax.random.key(0), (2, 37, 11))
    variables = qa.Conv3(5, stride, "mel").init(jax.random.key(1), x)
    params = nn.meta.unbox(variables["params"])
    ours = qa.Conv3(5, stride, "mel").apply({"params": params}, x)
    np.testing.assert_array_equal(ours, nn.Conv(5, (3,), strides=(stride,), padding=((1, 1),)).apply(
        {"params": params}, x))


def test_target_logits_and_their_gradient_equal_a_gather_bit_for_bit():
    logits = jax.random.normal(jax.random.key(0), (3, 5, 37))
    targets = jax.random.randint(jax.random.key(1), (3, 5), 0, 37)
    weights = jax.random.normal(jax.random.key(2), (3, 5))
    gather = lambda x: jnp.take_along_axis(x, targets[..., None], axis=-1)[..., 0]
    np.testing.assert_array_equal(qa.target_logits(logits, targets), gather(logits))
    np.testing.assert_array_equal(jax.grad(lambda x: jnp.sum(qa.target_logits(x, targets) * weights))(logits),
                                  jax.grad(lambda x: jnp.sum(gather(x) * weights))(logits))


# ---------------------------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------------------------

def test_config_round_trips_through_transformers_config():
    hf = transformers.Qwen2AudioConfig.from_dict(CONFIG.to_hf_dict())
    assert Qwen2AudioConfig.from_hf_dict(json.loads(hf.to_json_string())) == CONFIG


def test_sparse_real_7b_config_json_gives_the_7b_preset_shapes(tmp_path):
    # The real Qwen2-Audio-7B-Instruct config.json omits hidden_size, layers, heads: transformers' defaults apply.
    sparse = {"architectures": ["Qwen2AudioForConditionalGeneration"], "model_type": "qwen2_audio",
              "audio_token_index": 151646, "ignore_index": -100,
              "audio_config": {"model_type": "qwen2_audio_encoder", "num_mel_bins": 128, "encoder_layers": 32,
                               "encoder_attention_heads": 20, "encoder_ffn_dim": 5120, "d_model": 1280},
              "text_config": {"model_type": "qwen2", "bos_token_id": 151643, "eos_token_id": 151645,
                              "intermediate_size": 11008, "max_position_embeddings": 8192, "rms_norm_eps": 1e-05,
                              "vocab_size": 156032}}
    (tmp_path / "config.json").write_text(json.dumps(sparse))
    ours = get_config(str(tmp_path))
    hf = transformers.Qwen2AudioConfig.from_dict(sparse)
    for f in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "vocab_size",
              "intermediate_size", "rms_norm_eps", "max_position_embeddings"):
        assert getattr(ours.text, f) == getattr(hf.text_config, f), f
    assert ours.text.rope_theta == hf.text_config.rope_parameters["rope_theta"]
    assert dataclasses.replace(ours.text, pad_token_id=None) == dataclasses.replace(PRESETS["7b"].text,
                                                                                   pad_token_id=None)
    assert ours.audio == PRESETS["7b"].audio
    hash(Qwen2AudioConfig.from_hf_dict({**sparse, "text_config": {**sparse["text_config"], "eos_token_id": [1, 2]}}))


def test_config_errors_name_the_file_and_field(tmp_path):
    bad = CONFIG.to_hf_dict()
    bad["text_config"]["hidden_size"] = "84"
    (tmp_path / "config.json").write_text(json.dumps(bad))
    with pytest.raises(ConfigError, match=r"config\.json.*text_config\.hidden_size"):
        Qwen2AudioConfig.from_pretrained(str(tmp_path))
    del bad["audio_config"]
    with pytest.raises(ConfigError, match="audio_config"):
        Qwen2AudioConfig.from_hf_dict(bad, source="x/config.json")
    with pytest.raises(ConfigError, match="divisible"):
        dataclasses.replace(CONFIG, text=dataclasses.replace(CONFIG.text, num_key_value_heads=4)).validate()


def test_processor_features_of_an_exactly_3s_clip_give_the_reference_encoder_output_at_every_token(models):
    # End to end through our feature extractor: a clip whose frames fill whole buckets (300 frames) must still
    # give the 30 s reference's last audio token, which needs the padding frames just past the clip.
    from transformers import WhisperFeatureExtractor

    from model import processor as P

    model, params = models
    t = np.arange(48000) / 16000
    wave = (0.3 * np.sin(2 * np.pi * (200 + 300 * t) * t) + 0.05 * np.random.default_rng(9).standard_normal(48000))
    wave = wave.astype(np.float32)
    feats, frames = P.log_mel_features(wave)
    ref = WhisperFeatureExtractor(feature_size=128)(wave, sampling_rate=16000, padding="max_length",
                                                  return_attention_mask=True, return_tensors="np")
    assert frames == 300 == int(ref["attention_mask"].sum())
    with torch.no_grad():
        ref_mask = torch.as_tensor(ref["attention_mask"])
        lengths = model.model.audio_tower._get_feat_extract_output_lengths(ref_mask.sum(-1))[0]
        key_ok = (torch.arange(1500)[None] < lengths[:, None])
        bias = torch.where(key_ok, 0.0, torch.finfo(torch.float32).min)[:, None, None, :]
        expected = model.model.audio_tower(torch.as_tensor(ref["input_features"]), attention_mask=bias)
    expected = expected.last_hidden_state.numpy()
    ours = jax.jit(qa.AudioEncoder(CONFIG).apply)({"params": params["audio_tower"]}, jnp.asarray(feats[None]),
                                                  jnp.asarray([frames]))
    n = n_audio_tokens(frames)
    np.testing.assert_allclose(np.asarray(ours[:, :n]), expected[:, :n], atol=TOL, rtol=0)
