"""Qwen2-Audio (audio encoder + projector + Qwen2 decoder) in Flax linen, numerically matching transformers'
`Qwen2AudioForConditionalGeneration` in float32.

Reads top to bottom: small building blocks (norms, rotary), the audio tower, the Qwen2 decoder, the full model,
then the functional API the stage scripts call (init_params, abstract_params, forward, init_cache, prefill,
decode_step).

Two deliberate departures from the reference, both exact at every position that matters:
  * Bucketed audio encoder. The reference always encodes 3000 mel frames (30 s). Here input_features are
    [B, n_mels, T] with T any multiple of 4 (the caller pads the real frames to a bucket), and `feature_lengths`
    masks the padded frames as keys, exactly as the reference masks its padding. Every real audio token equals
    the reference's 3000-frame output, provided the frames just past the real ones are the same padding frames
    the reference sees (the conv kernels reach 2 frames past the last real one; cutting the reference's
    features to the bucket, or computing the features on the waveform padded to the bucket, gives that).
  * Masks use a large finite negative (finfo.min), never -inf: a fully masked row (feature_lengths 0, or a
    left-padding query) gets a uniform softmax instead of NaN, so it cannot poison gradients.

Logical axis names on parameters (mapped to mesh axes by model/sharding.py's LOGICAL_AXIS_RULES):
  text:  "vocab", "embed" (hidden), "mlp" (intermediate), "heads" (nH*hd, flattened), "kv_heads" (nKV*hd), "norm"
  audio: "audio_embed" (d_model), "audio_mlp" (ffn), "audio_heads" (d_model split in heads, flattened),
         "audio_conv_in" (conv2 input channels), "mel", "conv_width", "audio_pos", "audio_norm"
  both stacks: "layers" (the leading axis of the scanned layer parameters)
Activations are constrained at layer boundaries to ("batch", "length", "embed") / ("batch", "audio_length",
"audio_embed"); these constraints are no-ops unless a mesh and logical_axis_rules are active.
"""
from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from model.config import Qwen2AudioConfig
from model.processor import num_audio_tokens

Array = jax.Array

# Rematerialisation policies for the scanned layers ("none" = no remat: fastest, most memory).
REMAT_POLICIES = {
    "full": None,  # save nothing inside a layer; recompute it all in the backward pass
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # keep projection/MLP matmul outputs
}

INIT = nn.initializers.normal(stddev=0.02)  # transformers' initializer_range


def _dense(features: int, names: tuple[str, str], use_bias: bool, dtype, param_dtype, name: str) -> nn.Dense:
    """nn.Dense with a [in, out] kernel carrying logical axis names (bias gets the output name)."""
    return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, name=name,
                    kernel_init=nn.with_logical_partitioning(INIT, names),
                    bias_init=nn.with_logical_partitioning(nn.initializers.zeros, names[1:]))


def _layer_norm(eps: float, dtype, param_dtype, name: str) -> nn.LayerNorm:
    # use_fast_variance=False: two-pass variance as torch.nn.LayerNorm (E[x^2]-E[x]^2 loses digits).
    return nn.LayerNorm(epsilon=eps, dtype=dtype, param_dtype=param_dtype, use_fast_variance=False, name=name,
                        scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("audio_norm",)),
                        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("audio_norm",)))


def _masked_softmax(scores: Array, allowed: Array) -> Array:
    """Softmax over the last axis in float32 where `allowed` is False gets finfo.min (finite: no NaN rows)."""
    scores = jnp.where(allowed, scores.astype(jnp.float32), jnp.finfo(jnp.float32).min)
    return jax.nn.softmax(scores, axis=-1)


def _scanned(layer_cls, remat_policy: str, length: int, in_axes):
    """Stack `length` copies of a layer with nn.scan (compile time independent of depth), optionally remat'd."""
    if remat_policy != "none":
        if remat_policy not in REMAT_POLICIES:
            raise ValueError(f"remat_policy must be one of none, {', '.join(REMAT_POLICIES)}; got {remat_policy!r}")
        layer_cls = nn.remat(layer_cls, policy=REMAT_POLICIES[remat_policy], prevent_cse=False)
    return nn.scan(layer_cls, variable_axes={"params": 0}, split_rngs={"params": True}, in_axes=in_axes,
                   length=length, metadata_params={nn.PARTITION_NAME: "layers"})


# ---------------------------------------------------------------------------------------------------------------
# Audio tower (Whisper-style encoder, transformers' Qwen2AudioEncoder)
# ---------------------------------------------------------------------------------------------------------------

class AudioAttention(nn.Module):
    config: Qwen2AudioConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, key_valid: Array) -> Array:
        a = self.config.audio
        d, nh = a.d_model, a.encoder_attention_heads
        hd = d // nh
        B, T, _ = x.shape
        dense = functools.partial(_dense, dtype=self.dtype, param_dtype=self.param_dtype)
        # The reference scales q (bias included) BEFORE the matmul; keep that order.
        q = dense(d, ("audio_embed", "audio_heads"), True, name="q_proj")(x) * (hd ** -0.5)
        k = dense(d, ("audio_embed", "audio_heads"), False, name="k_proj")(x)  # no bias, as Whisper
        v = dense(d, ("audio_embed", "audio_heads"), True, name="v_proj")(x)
        q, k, v = (t.reshape(B, T, nh, hd) for t in (q, k, v))
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
        probs = _masked_softmax(scores, key_valid[:, None, None, :]).astype(self.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(B, T, d)
        return dense(d, ("audio_heads", "audio_embed"), True, name="out_proj")(out)


class AudioEncoderLayer(nn.Module):
    """Pre-LN transformer layer. Scanned: __call__(carry, broadcast) -> (carry, None)."""
    config: Qwen2AudioConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, key_valid: Array):
        a = self.config.audio
        dense = functools.partial(_dense, dtype=self.dtype, param_dtype=self.param_dtype)
        ln = functools.partial(_layer_norm, a.layer_norm_eps, self.dtype, self.param_dtype)
        x = nn.with_logical_constraint(x, ("batch", "audio_length", "audio_embed"))
        h = ln(name="self_attn_layer_norm")(x)
        x = x + AudioAttention(self.config, self.dtype, self.param_dtype, name="self_attn")(h, key_valid)
        h = ln(name="final_layer_norm")(x)
        h = nn.gelu(dense(a.encoder_ffn_dim, ("audio_embed", "audio_mlp"), True, name="fc1")(h), approximate=False)
        x = x + dense(a.d_model, ("audio_mlp", "audio_embed"), True, name="fc2")(h)
        x = nn.with_logical_constraint(x, ("batch", "audio_length", "audio_embed"))
        return x, None


def _conv3(x: Array, kernel: Array, stride: int) -> Array:
    """Conv1d with kernel 3 and padding 1 (transformers' conv1 / conv2): x [B, T, in], kernel [3, in, out]."""
    return jax.lax.conv_general_dilated(x, kernel, (stride,), ((1, 1),), dimension_numbers=("NWC", "WIO", "NWC"))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def conv3(x: Array, kernel: Array, stride: int) -> Array:
    """_conv3 whose kernel gradient is one matmul over the three shifted copies of the input (im2col): XLA's CPU
    convolution computes it an order of magnitude slower (bench.py step). The forward is XLA's convolution, so
    inference gives the same numbers as nn.Conv."""
    return _conv3(x, kernel, stride)


def _conv3_fwd(x, kernel, stride):
    return _conv3(x, kernel, stride), (x, kernel)


def _conv3_bwd(stride, res, g):
    x, kernel = res
    t_out = g.shape[1]
    padded = jnp.pad(x, ((0, 0), (1, 1), (0, 0)))
    # output t reads inputs t * stride - 1 .. t * stride + 1: tap j is the padded input from j, every stride-th
    taps = [padded[:, j: j + stride * (t_out - 1) + 1: stride] for j in range(3)]
    patches = jnp.concatenate(taps, axis=-1)  # [B, t_out, 3 * in], tap-major as the kernel
    d_kernel = jnp.einsum("btk,bto->ko", patches, g).reshape(kernel.shape)
    # the convolution is linear in x: its transpose, with no forward pass traced (unused for conv1: XLA drops it)
    d_x = jax.linear_transpose(lambda x: _conv3(x, kernel, stride), x)(g)[0]
    return d_x, d_kernel


conv3.defvjp(_conv3_fwd, _conv3_bwd)


class Conv3(nn.Module):
    """nn.Conv(kernel_size 3, padding 1) with its parameters (kernel [3, in, out], bias [out]), computed by conv3."""
    features: int
    stride: int
    in_name: str  # the input channels' logical axis
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """x [B, T, in] -> [B, ceil(T / stride), out]."""
        kernel = self.param("kernel", nn.with_logical_partitioning(INIT, ("conv_width", self.in_name, "audio_embed")),
                            (3, x.shape[-1], self.features), self.param_dtype)
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("audio_embed",)),
                          (self.features,), self.param_dtype)
        return conv3(x.astype(self.dtype), kernel.astype(self.dtype), self.stride) + bias.astype(self.dtype)


class AudioEncoder(nn.Module):
    config: Qwen2AudioConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    remat_policy: str = "none"

    @nn.compact
    def __call__(self, input_features: Array, feature_lengths: Array) -> Array:
        """input_features [B, n_mels, T] (T a multiple of 4), feature_lengths [B] -> [B, T // 4, d_model]."""
        a = self.config.audio
        B, n_mels, T = input_features.shape
        if n_mels != a.num_mel_bins:
            raise ValueError(f"input_features has {n_mels} mel bins, the audio config expects {a.num_mel_bins}")
        if T % 4 or T // 2 > a.max_source_positions:
            raise ValueError(f"input_features has {T} frames: expected a multiple of 4 and at most "
                             f"{2 * a.max_source_positions} (pad the real frames to a bucket)")

        x = jnp.transpose(input_features, (0, 2, 1)).astype(self.dtype)  # channels-last, as flax convs
        x = nn.gelu(Conv3(a.d_model, 1, "mel", self.dtype, self.param_dtype, name="conv1")(x), approximate=False)
        x = nn.gelu(Conv3(a.d_model, 2, "audio_conv_in", self.dtype, self.param_dtype, name="conv2")(x),
                    approximate=False)  # [B, T/2, d]
        # Learned positions (the reference adds all 1500; a bucket of T frames uses the first T/2).
        embed_positions = nn.Embed(a.max_source_positions, a.d_model, dtype=self.dtype, param_dtype=self.param_dtype,
                                   embedding_init=nn.with_logical_partitioning(INIT, ("audio_pos", "audio_embed")),
                                   name="embed_positions")
        x = x + embed_positions(jnp.arange(T // 2))[None]

        # Keys past the real frames are masked, exactly as the reference masks its padding to 3000 frames.
        valid_after_conv = (feature_lengths - 1) // 2 + 1
        key_valid = jnp.arange(T // 2)[None, :] < valid_after_conv[:, None]
        layers = _scanned(AudioEncoderLayer, self.remat_policy, a.encoder_layers, (nn.broadcast,))
        x, _ = layers(self.config, self.dtype, self.param_dtype, name="layers")(x, key_valid)

        x = x.reshape(B, T // 4, 2, a.d_model).mean(axis=2)  # AvgPool1d(2, stride 2)
        return _layer_norm(a.layer_norm_eps, self.dtype, self.param_dtype, "layer_norm")(x)


# ---------------------------------------------------------------------------------------------------------------
# Qwen2 decoder (transformers' Qwen2Model)
# ---------------------------------------------------------------------------------------------------------------

class RMSNorm(nn.Module):
    eps: float
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)), (x.shape[-1],),
                           self.param_dtype)
        # As the reference: statistics in float32, cast back to the input dtype, then multiply by the weight.
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (scale.astype(self.dtype) * x32.astype(x.dtype)).astype(self.dtype)


def rotary_cos_sin(positions: Array, head_dim: int, theta: float) -> tuple[Array, Array]:
    """cos, sin [B, S, head_dim] for integer positions [B, S] (HF layout: the two halves repeat the freqs)."""
    inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rotary(x: Array, cos: Array, sin: Array) -> Array:
    """x [B, S, heads, hd]; HF's rotate_half convention (first half <-> second half, not interleaved)."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    cos, sin = cos[:, :, None, :].astype(x.dtype), sin[:, :, None, :].astype(x.dtype)
    return x * cos + rotated * sin


class TextAttention(nn.Module):
    """Qwen2 GQA attention: q/k/v with bias, o_proj without; query head h reads kv head h // (nH / nKV), as HF's
    repeat_kv. layer_cache is None (keys are this call's tokens) or {"k", "v": [B, max_len, nKV, hd]}: this call's
    keys are written at slot `write_index` and the queries attend over the whole cache. `allowed` [B, 1, 1, S, T]
    says which key slot each query may see (causal + padding)."""
    config: Qwen2AudioConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, layer_cache, cos, sin, allowed, write_index):
        t = self.config.text
        nh, nkv, hd = t.num_attention_heads, t.num_key_value_heads, t.head_dim
        B, S, H = x.shape
        dense = functools.partial(_dense, dtype=self.dtype, param_dtype=self.param_dtype)
        q = dense(nh * hd, ("embed", "heads"), True, name="q_proj")(x).reshape(B, S, nh, hd)
        k = dense(nkv * hd, ("embed", "kv_heads"), True, name="k_proj")(x).reshape(B, S, nkv, hd)
        v = dense(nkv * hd, ("embed", "kv_heads"), True, name="v_proj")(x).reshape(B, S, nkv, hd)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if layer_cache is not None:
            k_all = jax.lax.dynamic_update_slice(layer_cache["k"], k.astype(layer_cache["k"].dtype),
                                                 (0, write_index, 0, 0))
            v_all = jax.lax.dynamic_update_slice(layer_cache["v"], v.astype(layer_cache["v"].dtype),
                                                 (0, write_index, 0, 0))
            layer_cache = {"k": k_all, "v": v_all}
            k, v = k_all.astype(self.dtype), v_all.astype(self.dtype)
        q = q.reshape(B, S, nkv, nh // nkv, hd)
        # HF scales the scores after the matmul (the audio tower scales q before it).
        scores = jnp.einsum("bsngd,btnd->bngst", q, k, preferred_element_type=jnp.float32) * (hd ** -0.5)
        probs = _masked_softmax(scores, allowed).astype(self.dtype)
        out = jnp.einsum("bngst,btnd->bsngd", probs, v).reshape(B, S, nh * hd)
        return dense(H, ("heads", "embed"), False, name="o_proj")(out), layer_cache


class MLP(nn.Module):
    config: Qwen2AudioConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        t = self.config.text
        dense = functools.partial(_dense, dtype=self.dtype, param_dtype=self.param_dtype)
        gate = dense(t.intermediate_size, ("embed", "mlp"), False, name="gate_proj")(x)
        up = dense(t.intermediate_size, ("embed", "mlp"), False, name="up_proj")(x)
        return dense(t.hidden_size, ("mlp", "embed"), False, name="down_proj")(nn.silu(gate) * up)


class DecoderLayer(nn.Module):
    """Pre-RMSNorm Qwen2 layer. Scanned: __call__(carry x, per-layer cache, *broadcast) -> (x, per-layer cache)."""
    config: Qwen2AudioConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, layer_cache, cos, sin, allowed, write_index):
        eps = self.config.text.rms_norm_eps
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        h = RMSNorm(eps, self.dtype, self.param_dtype, name="input_layernorm")(x)
        h, layer_cache = TextAttention(self.config, self.dtype, self.param_dtype, name="self_attn")(
            h, layer_cache, cos, sin, allowed, write_index)
        x = x + h
        h = RMSNorm(eps, self.dtype, self.param_dtype, name="post_attention_layernorm")(x)
        x = x + MLP(self.config, self.dtype, self.param_dtype, name="mlp")(h)
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        return x, layer_cache


class TextModel(nn.Module):
    config: Qwen2AudioConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    remat_policy: str = "none"

    def setup(self):
        t = self.config.text
        self.embed_tokens = nn.Embed(
            t.vocab_size, t.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype,
            embedding_init=nn.with_logical_partitioning(INIT, ("vocab", "embed")))
        in_axes = (0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast)
        self.layers = _scanned(DecoderLayer, self.remat_policy, t.num_hidden_layers, in_axes)(
            self.config, self.dtype, self.param_dtype)
        self.norm = RMSNorm(t.rms_norm_eps, self.dtype, self.param_dtype)

    def embed(self, input_ids: Array) -> Array:
        return self.embed_tokens(input_ids)

    def __call__(self, x, positions, allowed, cache, write_index):
        cos, sin = rotary_cos_sin(positions, self.config.text.head_dim, self.config.text.rope_theta)
        x, cache = self.layers(x, cache, cos, sin, allowed, write_index)
        return self.norm(x), cache


# ---------------------------------------------------------------------------------------------------------------
# The full model
# ---------------------------------------------------------------------------------------------------------------

class Projector(nn.Module):
    config: Qwen2AudioConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        return _dense(self.config.text.hidden_size, ("audio_embed", "embed"), True, self.dtype, self.param_dtype,
                      name="linear")(x)


class Qwen2AudioForConditionalGeneration(nn.Module):
    config: Qwen2AudioConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    remat_policy: str = "none"

    @nn.compact
    def __call__(self, input_ids, attention_mask, input_features=None, feature_lengths=None, positions=None,
                 cache=None, logits_at=None, hidden_only=False):
        """Returns (logits [B, S, V] float32, updated cache or None).

        logits_at [B, A] (optional): compute logits only at these positions -> [B, A, V]. Training needs them
        only where an answer token is predicted; with a 156k vocabulary the full [B, S, V] logits would dominate
        the step's time and memory. hidden_only: return the final normed hidden states [B, S or A, H] instead of
        logits, for lm_head_nll (the LM head fused with the cross-entropy).

        input_ids already contain one <|AUDIO|> per audio output token (the caller expanded them); row b's k-th
        audio token takes audio output k of row b. With `cache`, this call's tokens are appended at the cache's
        write index and attend over everything cached so far (prefill and decode are both this path).
        """
        cfg = self.config
        B, S = input_ids.shape
        attention_mask = attention_mask.astype(jnp.int32)
        lm = TextModel(cfg, self.dtype, self.param_dtype, self.remat_policy, name="language_model")
        x = lm.embed(input_ids)

        if input_features is not None:
            if feature_lengths is None:
                raise ValueError("input_features given without feature_lengths (valid mel frames per row)")
            audio = AudioEncoder(cfg, self.dtype, self.param_dtype, self.remat_policy, name="audio_tower")(
                input_features, feature_lengths)
            audio = Projector(cfg, self.dtype, self.param_dtype, name="multi_modal_projector")(audio)
            # Static-shape scatter: the k-th audio token of a row gathers audio output k of that row.
            is_audio = input_ids == cfg.audio_token_index
            k = jnp.clip(jnp.cumsum(is_audio, axis=1) - 1, 0, audio.shape[1] - 1)
            gathered = jnp.take_along_axis(audio, k[:, :, None], axis=1)
            x = jnp.where(is_audio[:, :, None], gathered.astype(x.dtype), x)

        # Query / key slots: without a cache, slot = index in this call; with one, slots are cache positions.
        if cache is None:
            write_index = jnp.zeros((), jnp.int32)
            key_valid, pos0 = attention_mask, jnp.zeros((B,), jnp.int32)
            key_slots = jnp.arange(S)
        else:
            write_index = cache["index"]
            key_valid = jax.lax.dynamic_update_slice(cache["mask"], attention_mask, (0, write_index))
            pos0 = cache["pos"]
            key_slots = jnp.arange(cache["mask"].shape[1])
        q_slots = write_index + jnp.arange(S)
        allowed = (key_slots[None, :] <= q_slots[:, None])[None] & (key_valid[:, None, :] > 0)  # [B, S, T]
        allowed = allowed[:, None, None]  # broadcast over kv heads and groups
        if positions is None:
            # Left padding does not shift a row's positions: count only its real tokens.
            positions = pos0[:, None] + jnp.maximum(jnp.cumsum(attention_mask, axis=1) - 1, 0)

        layer_cache = None if cache is None else {"k": cache["k"], "v": cache["v"]}
        h, layer_cache = lm(x, positions, allowed, layer_cache, write_index)
        if logits_at is not None:
            h = jnp.take_along_axis(h, logits_at[:, :, None], axis=1)
        out = h if hidden_only else _dense(cfg.text.vocab_size, ("embed", "vocab"), False, self.dtype,
                                           self.param_dtype, name="lm_head")(h).astype(jnp.float32)
        if cache is None:
            return out, None
        new_cache = {"k": layer_cache["k"], "v": layer_cache["v"], "mask": key_valid,
                     "index": write_index + S, "pos": pos0 + jnp.sum(attention_mask, axis=1)}
        return out, new_cache


# ---------------------------------------------------------------------------------------------------------------
# Functional API
# ---------------------------------------------------------------------------------------------------------------

def _dummy_inputs(config: Qwen2AudioConfig):
    return (jnp.zeros((1, 1), jnp.int32), jnp.ones((1, 1), jnp.int32),
            jnp.zeros((1, config.audio.num_mel_bins, 4), jnp.float32), jnp.ones((1,), jnp.int32))


def init_params(config: Qwen2AudioConfig, rng: Array, param_dtype=jnp.float32) -> dict:
    """Random parameters (transformers' init: normal(0.02) weights, zero biases, unit norms), plain arrays."""
    model = Qwen2AudioForConditionalGeneration(config, param_dtype=param_dtype)
    return nn.unbox(jax.jit(model.init)(rng, *_dummy_inputs(config))["params"])


def abstract_params(config: Qwen2AudioConfig, param_dtype=jnp.float32) -> dict:
    """ShapeDtypeStruct tree boxed in nn.Partitioned (logical axis names), for computing shardings."""
    model = Qwen2AudioForConditionalGeneration(config, param_dtype=param_dtype)
    return jax.eval_shape(model.init, jax.random.PRNGKey(0), *_dummy_inputs(config))["params"]


def forward(params, config: Qwen2AudioConfig, input_ids, attention_mask, input_features=None, feature_lengths=None,
            positions=None, *, dtype=jnp.float32, remat_policy: str = "none", logits_at=None,
            hidden_only: bool = False) -> Array:
    """Logits [B, S, V] (float32), or [B, A, V] at the positions `logits_at` [B, A]; with hidden_only, the final
    hidden states [B, S or A, H] that the LM head would read (for lm_head_nll).
    input_features=None: a text-only batch (the encoder is skipped)."""
    _check_audio_tokens(config, input_ids, input_features, feature_lengths)
    model = Qwen2AudioForConditionalGeneration(config, dtype=dtype, remat_policy=remat_policy)
    out, _ = model.apply({"params": params}, input_ids, attention_mask, input_features, feature_lengths,
                         positions, None, logits_at, hidden_only)
    return out


# KV cache. A plain dict pytree; its batch axis differs per leaf (beam search reorders with jnp.take):
CACHE_BATCH_AXIS = {"k": 1, "v": 1, "mask": 0, "index": None, "pos": 0}


@jax.custom_vjp
def target_logits(logits: Array, targets: Array) -> Array:
    """logits[..., targets]: the logit of each target token, for a cross-entropy. Its gradient is a compare-and-
    select, which XLA fuses with the softmax's gradient; jax's own gradient of the gather is a scatter into a
    zero array of the logits' shape and a copy of it (a tenth of the tiny preset's SLU step: bench.py step).
    The same numbers either way."""
    return jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]


def _target_logits_bwd(res, g):
    targets, shape = res
    vocab = jax.lax.broadcasted_iota(jnp.int32, shape, len(shape) - 1)
    return jnp.where(vocab == targets[..., None], g[..., None], 0.0), None


target_logits.defvjp(lambda logits, targets: (target_logits(logits, targets), (targets, logits.shape)),
                     _target_logits_bwd)


def token_nll(logits: Array, targets: Array, mask: Array) -> Array:
    """sum over the masked positions of the cross-entropy of fp32 logits [..., V] at targets [...]."""
    return jnp.sum((jax.nn.logsumexp(logits, axis=-1) - target_logits(logits, targets)) * mask)


# The LM head fused with the cross-entropy (lm_head_nll): vocabulary columns per chunk. A vocabulary of at most this
# many columns takes the plain path (the module's lm_head, then token_nll): the miniature's 1,667 do, so its
# numbers are those of an ordinary LM head to the bit.
LM_HEAD_CHUNK = 16384


def lm_head_logits(h: Array, kernel: Array, dtype) -> Array:
    """fp32 logits of hidden states h [..., H] through the LM head `kernel` [H, V]: the module's own lm_head."""
    dense = _dense(kernel.shape[1], ("embed", "vocab"), False, dtype, kernel.dtype, name="lm_head")
    return dense.apply({"params": {"kernel": kernel}}, h).astype(jnp.float32)


def lm_head_nll(h: Array, kernel: Array, targets: Array, mask: Array, dtype) -> Array:
    """token_nll(lm_head_logits(h, kernel, dtype), targets, mask), without ever holding all of the logits when the
    vocabulary is larger than LM_HEAD_CHUNK: the forward keeps a running max and sum of exponentials over chunks of
    the vocabulary (each chunk's logits are made and dropped); the backward makes each chunk's logits again and
    turns them into that chunk's softmax gradient, its share of dL/dh and its columns of dL/dkernel. One matmul more
    than autodiff (4 instead of 3), but on a CPU a chunk's logits stay in cache instead of a [rows, 156k] array
    going to memory 4-5 times (bench.py step), and on an accelerator the [rows, V] fp32 logits and their gradient
    are never in memory at once. The same numbers to float32 rounding (tests/test_model.py, against torch)."""
    if kernel.shape[1] <= LM_HEAD_CHUNK:
        return token_nll(lm_head_logits(h, kernel, dtype), targets, mask)
    return _chunked_nll(h.reshape(-1, h.shape[-1]), targets.reshape(-1).astype(jnp.int32),
                        mask.reshape(-1).astype(jnp.float32), kernel, jnp.dtype(dtype), LM_HEAD_CHUNK)


def _over_vocab_chunks(add_chunk, vocab: int, chunk: int, carry):
    """carry through add_chunk(carry, start, width) for each chunk of the vocabulary's columns: the full chunks in a
    loop, then the partial last one (its own static width) if there is one."""
    n_full, rest = divmod(vocab, chunk)
    carry = jax.lax.fori_loop(0, n_full, lambda k, c: add_chunk(c, k * chunk, chunk), carry)
    return add_chunk(carry, n_full * chunk, rest) if rest else carry


def _chunk_logits(h, kernel, start, width, dtype):
    """fp32 logits [N, width] of the vocabulary columns [start, start + width), computed as the lm_head does."""
    cols = jax.lax.dynamic_slice_in_dim(kernel, start, width, axis=1)
    return jnp.dot(h.astype(dtype), cols.astype(dtype)).astype(jnp.float32), cols


def _chunked_logz_and_target(h, targets, kernel, dtype, chunk):
    """Per row: log-sum-exp of its logits and the logit of its target, one vocabulary chunk at a time."""
    def add_chunk(carry, start, width):
        running_max, sum_exp, target = carry
        logits, _ = _chunk_logits(h, kernel, start, width, dtype)
        new_max = jnp.maximum(running_max, jnp.max(logits, axis=-1))
        sum_exp = sum_exp * jnp.exp(running_max - new_max) + jnp.sum(jnp.exp(logits - new_max[:, None]), axis=-1)
        local = targets - start
        here = (local >= 0) & (local < width)
        picked = jnp.take_along_axis(logits, jnp.clip(local, 0, width - 1)[:, None], axis=-1)[:, 0]
        return new_max, sum_exp, target + jnp.where(here, picked, 0.0)

    rows = h.shape[0]
    carry = (jnp.full((rows,), -jnp.inf, jnp.float32), jnp.zeros((rows,), jnp.float32), jnp.zeros((rows,), jnp.float32))
    running_max, sum_exp, target = _over_vocab_chunks(add_chunk, kernel.shape[1], chunk, carry)
    return running_max + jnp.log(sum_exp), target


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _chunked_nll(h, targets, mask, kernel, dtype, chunk):
    logz, target = _chunked_logz_and_target(h, targets, kernel, dtype, chunk)
    return jnp.sum((logz - target) * mask)


def _chunked_nll_fwd(h, targets, mask, kernel, dtype, chunk):
    logz, target = _chunked_logz_and_target(h, targets, kernel, dtype, chunk)
    return jnp.sum((logz - target) * mask), (h, targets, mask, kernel, logz)


def _chunked_nll_bwd(dtype, chunk, res, g):
    h, targets, mask, kernel, logz = res
    weight = (g * mask)[:, None]
    h_c = h.astype(dtype)

    def add_chunk(carry, start, width):
        dh, dkernel = carry
        logits, cols = _chunk_logits(h, kernel, start, width, dtype)
        vocab = jax.lax.broadcasted_iota(jnp.int32, logits.shape, 1) + start
        dlogits = ((jnp.exp(logits - logz[:, None]) - (vocab == targets[:, None])) * weight).astype(dtype)
        # dL/dh sums over the chunks: in float32, whatever the compute dtype, then rounded once
        dh = dh + jnp.dot(dlogits, cols.astype(dtype).T, preferred_element_type=jnp.float32)
        dcols = jnp.dot(h_c.T, dlogits).astype(kernel.dtype)
        return dh, jax.lax.dynamic_update_slice_in_dim(dkernel, dcols, start, axis=1)

    dh, dkernel = _over_vocab_chunks(add_chunk, kernel.shape[1], chunk,
                                     (jnp.zeros(h.shape, jnp.float32), jnp.zeros_like(kernel)))
    return dh.astype(h.dtype), None, None, dkernel


_chunked_nll.defvjp(_chunked_nll_fwd, _chunked_nll_bwd)


def init_cache(config: Qwen2AudioConfig, batch: int, max_len: int, dtype=jnp.float32) -> dict:
    """k, v [L, B, max_len, nKV, hd]; mask [B, max_len] (1 = a key written there is valid); index: next write slot
    (shared by all rows); pos [B]: the next rotary position of each row."""
    t = config.text
    shape = (t.num_hidden_layers, batch, max_len, t.num_key_value_heads, t.head_dim)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype), "mask": jnp.zeros((batch, max_len), jnp.int32),
            "index": jnp.zeros((), jnp.int32), "pos": jnp.zeros((batch,), jnp.int32)}


def prefill(params, config: Qwen2AudioConfig, input_ids, attention_mask, input_features, feature_lengths, cache, *,
            dtype=jnp.float32, hidden_only: bool = False):
    """Run the prompt (left padding is fine) through the model, filling the cache. -> (logits [B, S, V], cache),
    or with hidden_only the final hidden states [B, S, H] instead of logits.
    Writing past max_len is silently clipped by dynamic_update_slice: size the cache for prompt + new tokens."""
    _check_audio_tokens(config, input_ids, input_features, feature_lengths)
    model = Qwen2AudioForConditionalGeneration(config, dtype=dtype)
    return model.apply({"params": params}, input_ids, attention_mask, input_features, feature_lengths, None, cache,
                       None, hidden_only)


def decode_step(params, config: Qwen2AudioConfig, tokens, cache, *, dtype=jnp.float32, hidden_only: bool = False):
    """One new token per row -> (logits [B, V], cache), or with hidden_only its final hidden state [B, H]."""
    model = Qwen2AudioForConditionalGeneration(config, dtype=dtype)
    ids = tokens[:, None]
    out, cache = model.apply({"params": params}, ids, jnp.ones_like(ids, jnp.int32), None, None, None, cache, None,
                             hidden_only)
    return out[:, 0], cache


def _check_audio_tokens(config, input_ids, input_features, feature_lengths):
    """Outside jit, check each row's <|AUDIO|> count equals its audio output length (under jit: trust the caller)."""
    if isinstance(input_ids, jax.core.Tracer) or isinstance(feature_lengths, jax.core.Tracer):
        return
    counts = np.sum(np.asarray(input_ids) == config.audio_token_index, axis=1)
    if input_features is None:
        if counts.any():
            raise ValueError(f"input_ids hold <|AUDIO|> tokens (per row: {counts.tolist()}) but input_features is None")
        return
    if feature_lengths is None:
        raise ValueError("input_features given without feature_lengths (valid mel frames per row)")
    expected = np.asarray(num_audio_tokens(np.asarray(feature_lengths)))
    expected = np.maximum(expected, 0)
    if not np.array_equal(counts, expected):
        raise ValueError(f"<|AUDIO|> tokens per row {counts.tolist()} do not match the audio outputs per row "
                         f"{expected.tolist()} for feature_lengths {np.asarray(feature_lengths).tolist()}")
