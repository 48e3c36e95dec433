"""Greedy and beam-search decoding over the KV cache, jit-compiled with static shapes.

Both searches take a batch of LEFT-padded prompts (so every row's last prompt token sits in the last column and
the model's positions, cumsum(attention_mask)-1, are the same as for the row alone), prefill the cache once,
then run a `jax.lax.while_loop` of single-token decode steps that stops as soon as every row is finished, or at
`max_new_tokens`. All shapes are fixed by (batch, prompt length, max_new_tokens, num_beams), so a caller that
pads those to a few buckets compiles a few programs.

Beam search reproduces transformers 5.23 `generate(num_beams=k, do_sample=False)` token for token (the
vectorised `_beam_search` of generation/utils.py, which we follow step for step; the names in comments are
its names):
  * each step keeps the top K = max(2, 1 + #eos) * k continuations (`beams_to_keep`) of all k beams, ranked by
    the sum of token log-probs; the top k of them that are NOT eos (or at the length limit) run on;
  * a continuation that ends in eos is a finished hypothesis only if it is among the top k of the K; its score
    is sum_logprob / generated_length ** length_penalty, where generated_length counts the new tokens
    INCLUDING the eos (`cur_len + 1 - decoder_prompt_len`); the k best finished hypotheses are kept;
  * with early_stopping=False a row stops taking new hypotheses once all k slots are finished and the best
    running beam's sum_logprob / current_generated_length ** length_penalty is not above the worst finished
    score (the heuristic of transformers PR 20901; once a row has stopped it stays stopped);
  * at max_new_tokens every continuation counts as finished, so the top k of the last step fill the slots;
  * the returned sequence is the best finished hypothesis.
Greedy is transformers' greedy: argmax of the logits until an eos; finished rows are padded with `pad_id`.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from model import qwen2_audio
NEG_INF = -1.0e9  # transformers' "impossible" score; the same constant keeps ties and sums identical
TOPK_GROUP = 128  # vocabulary columns per group of the beam search's two-stage top K (_top_continuations)


class Generated(NamedTuple):
    tokens: jax.Array   # [B, max_new_tokens] int32: the new tokens, eos included, then pad_id
    lengths: jax.Array  # [B] int32: how many of them are real (eos included)


def _is_eos(tokens: jax.Array, eos_ids: tuple[int, ...]) -> jax.Array:
    return jnp.isin(tokens, jnp.asarray(eos_ids, jnp.int32))


def _prefill(params, config, input_ids, attention_mask, input_features, feature_lengths, max_new_tokens, dtype):
    """Run the prompt through the model once; return the final hidden state of its last position [B, H] (what the
    LM head reads to predict the first new token) and the filled cache.

    Hidden states, not logits: prefill's logits for every position ([B, S, V] float32, gigabytes for a batch of
    long audio prompts with a 156k vocabulary) would be unused, and the search loop applies the LM head itself.
    Left padding makes the last column a real token of every row.
    """
    batch, prompt_len = input_ids.shape
    cache = qwen2_audio.init_cache(config, batch, prompt_len + max_new_tokens, dtype)
    hidden, cache = qwen2_audio.prefill(params, config, input_ids, attention_mask, input_features, feature_lengths,
                                        cache, dtype=dtype, hidden_only=True)
    return hidden[:, -1], cache


def _lm_head(params, hidden: jax.Array, dtype) -> jax.Array:
    """fp32 next-token logits [N, V] of final hidden states [N, H] (the model's own LM head)."""
    return qwen2_audio.lm_head_logits(hidden, params["lm_head"]["kernel"], dtype)


# ---- greedy -----------------------------------------------------------------------------------------------------

class _GreedyState(NamedTuple):
    step: jax.Array       # number of tokens generated so far
    tokens: jax.Array     # [B, N]
    lengths: jax.Array    # [B]
    finished: jax.Array   # [B] bool
    cache: object


@functools.partial(jax.jit, static_argnames=("config", "max_new_tokens", "eos_ids", "pad_id", "dtype"))
def greedy_search(params, config, input_ids, attention_mask, input_features=None, feature_lengths=None, *,
                  max_new_tokens: int, eos_ids: tuple[int, ...], pad_id: int,
                  dtype=jnp.bfloat16) -> Generated:
    """Argmax decoding of left-padded prompts [B, S] until eos or max_new_tokens new tokens."""
    batch = input_ids.shape[0]
    hidden, cache = _prefill(params, config, input_ids, attention_mask, input_features, feature_lengths,
                             max_new_tokens, dtype)

    def pick(state: _GreedyState, logits: jax.Array) -> _GreedyState:
        token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        live = ~state.finished
        token = jnp.where(live, token, pad_id)
        tokens = state.tokens.at[:, state.step].set(token)
        return _GreedyState(step=state.step + 1, tokens=tokens,
                            lengths=state.lengths + live.astype(jnp.int32),
                            finished=state.finished | _is_eos(token, eos_ids), cache=state.cache)

    def body(state: _GreedyState) -> _GreedyState:
        last = state.tokens[:, state.step - 1]
        logits, cache = qwen2_audio.decode_step(params, config, last, state.cache, dtype=dtype)
        return pick(state._replace(cache=cache), logits.astype(jnp.float32))

    def running(state: _GreedyState) -> jax.Array:
        return (state.step < max_new_tokens) & ~jnp.all(state.finished)

    state = _GreedyState(step=jnp.int32(0), tokens=jnp.full((batch, max_new_tokens), pad_id, jnp.int32),
                         lengths=jnp.zeros((batch,), jnp.int32),
                         finished=jnp.zeros((batch,), bool), cache=cache)
    state = jax.lax.while_loop(running, body, pick(state, _lm_head(params, hidden, dtype)))
    return Generated(tokens=state.tokens, lengths=state.lengths)


# ---- beam search ------------------------------------------------------------------------------------------------

class _BeamState(NamedTuple):
    step: jax.Array            # number of tokens generated so far (cur_len - decoder_prompt_len)
    run_tokens: jax.Array      # [B, k, N] running beams' new tokens (pad_id beyond `step`)
    run_scores: jax.Array      # [B, k] their summed log-probs, best first
    run_source: jax.Array      # [B, k] which previous beam each running beam extends (for the cache)
    fin_tokens: jax.Array      # [B, k, N] finished hypotheses
    fin_lengths: jax.Array     # [B, k]
    fin_scores: jax.Array      # [B, k] length-penalised scores, best first; NEG_INF-ish in unused slots
    fin_filled: jax.Array      # [B, k] bool: the slot holds a real finished hypothesis (is_sent_finished)
    improvable: jax.Array      # [B] bool: is_early_stop_heuristic_unsatisfied
    all_hit_stop: jax.Array    # bool: every kept continuation hit eos/max length (no valid continuation)
    cache: object              # batch axis B*k, beam-major within a row
    hidden: jax.Array          # [B*k, H] the running beams' final hidden states: the LM head's input this step


def _per_beam(cache: dict, batch: int, k: int, fn) -> dict:
    """Apply fn to every batched cache leaf viewed as [..., B, k, ...] (its B*k rows split into row and beam).

    Beam bookkeeping then never crosses rows: the row axis keeps its data-parallel sharding and each device
    gathers among its own beams, where a jnp.take over the flat B*k axis could make XLA gather the whole cache.
    """
    out = {}
    for name, x in cache.items():
        axis = qwen2_audio.CACHE_BATCH_AXIS[name]
        if axis is None:  # shared by all rows (the write index)
            out[name] = x
            continue
        rows = x.reshape(x.shape[:axis] + (batch, -1) + x.shape[axis + 1:])
        out[name] = fn(rows, axis).reshape(x.shape[:axis] + (batch * k,) + x.shape[axis + 1:])
    return out


def _expand_cache(cache: dict, batch: int, k: int) -> dict:
    """[.., B, ..] -> [.., B*k, ..]: k copies of each row's prefilled cache (transformers prefills k copies)."""
    def copies(rows, axis):
        return jnp.broadcast_to(rows, rows.shape[:axis + 1] + (k,) + rows.shape[axis + 2:])
    return _per_beam(cache, batch, k, copies)


def _reorder_cache(cache: dict, source: jax.Array) -> dict:
    """Beam j of row b takes the cache of beam source[b, j] of the same row (transformers' reorder_cache)."""
    batch, k = source.shape
    # Per row, take whole beams: a gather of contiguous [T, heads, head_dim] slices with the row as a batch axis
    # (about 18x faster on a CPU than take_along_axis with an index per element, 2.9 -> 0.16 ms per step).
    def take(rows, axis):
        return jax.vmap(lambda beams, src: jnp.take(beams, src, axis=axis), in_axes=(axis, 0), out_axes=axis)(
            rows, source)
    return _per_beam(cache, batch, k, take)


def _gather(x: jax.Array, index: jax.Array) -> jax.Array:
    """x[b, index[b, j], ...] for x [B, n, ...] and index [B, m] (transformers' _gather_beams)."""
    index = index.reshape(index.shape + (1,) * (x.ndim - 2))
    return jnp.take_along_axis(x, index, axis=1)


def _top_continuations(logits: jax.Array, run_scores: jax.Array, beams_to_keep: int) -> tuple[jax.Array, jax.Array]:
    """(values, indices) [B, K] of jax.lax.top_k(log_softmax(logits) + run_scores, flattened to [B, k*V], K): the
    top K continuations of all beams by accumulated log-prob (_get_top_k_continuations), for logits [B, k, V].

    The same floats and indices (ties to the lower index, as top_k), without ranking all k*V of them: each beam's
    vocabulary is cut into groups of TOPK_GROUP columns, the K groups with the best maxima are kept, and the top K
    is taken among their K * TOPK_GROUP entries. That is exact: each group ranked above the group of a top-K entry
    holds an entry ranked above it, so at most K - 1 groups rank above it (a group's rank: the accumulated value of
    its maximum, then its position). Ranking 3 x 156k log-probs cost about 4x the LM head's matmul on a CPU
    (bench.py decode); the maxima per group are one pass over them, and give each beam's maximum.
    """
    batch, k, vocab = logits.shape
    scores = run_scores[:, :, None]

    def accumulated(x, beam_m, beam_logz, beam_score):  # jax.nn.log_softmax(x) + score, in its order of operations
        return ((x - beam_m) - beam_logz) + beam_score

    def log_sum_exp(m):  # jax.nn.log_softmax's shifted log-sum-exp, given the maximum m [B, k, 1]
        return jnp.log(jnp.sum(jnp.exp(logits - m), axis=-1, keepdims=True))

    if beams_to_keep * TOPK_GROUP >= k * vocab:  # too few columns for the groups to save anything
        m = jnp.max(logits, axis=-1, keepdims=True)
        return jax.lax.top_k(accumulated(logits, m, log_sum_exp(m), scores).reshape(batch, k * vocab), beams_to_keep)
    n_groups = -(-vocab // TOPK_GROUP)
    padded = jnp.pad(logits, ((0, 0), (0, 0), (0, n_groups * TOPK_GROUP - vocab)), constant_values=-jnp.inf)
    groups = padded.reshape(batch, k * n_groups, TOPK_GROUP)          # beam-major, as the flattened [B, k*V]
    group_max = jnp.max(padded.reshape(batch, k, n_groups, TOPK_GROUP), axis=-1)
    # Kept in memory ([B, k, V/128]): without the barrier XLA fuses the maxima into each of their users and reads
    # the logits once more for each (3 passes instead of 2; about 1 ms of a 10 ms step on a CPU, bench.py decode).
    group_max = jax.lax.optimization_barrier(group_max)
    m = jnp.max(group_max, axis=-1, keepdims=True)  # the beam's maximum, without another pass over its logits
    logz = log_sum_exp(m)
    group_key = accumulated(group_max, m, logz, scores)
    best = jnp.sort(jax.lax.top_k(group_key.reshape(batch, -1), beams_to_keep)[1], axis=-1)  # in column order
    beam = best // n_groups

    def per_group(x):  # a beam's [B, k, 1] statistic at each kept group -> [B, K, 1]
        return jnp.take_along_axis(x[:, :, 0], beam, axis=1)[:, :, None]
    candidates = accumulated(_gather(groups, best), per_group(m), per_group(logz), per_group(scores))
    values, position = jax.lax.top_k(candidates.reshape(batch, -1), beams_to_keep)
    group = jnp.take_along_axis(best, position // TOPK_GROUP, axis=1)
    column = (group % n_groups) * TOPK_GROUP + position % TOPK_GROUP
    return values, (group // n_groups) * vocab + column


def _beam_step(state: _BeamState, top_logprobs: jax.Array, top_index: jax.Array, *, vocab: int, num_beams: int,
               beams_to_keep: int, max_new_tokens: int, length_penalty: float,
               eos_ids: tuple[int, ...]) -> _BeamState:
    """One step of transformers' `_beam_search` loop body (c. to g.), given its top K continuations [B, K] (b.,
    _top_continuations: their accumulated log-probs, best first, and their indices into the k beams' vocabularies)."""
    batch = top_logprobs.shape[0]
    step = state.step

    top_source = top_index // vocab
    top_token = (top_index % vocab).astype(jnp.int32)
    top_tokens = _gather(state.run_tokens, top_source)
    top_tokens = jnp.where(jnp.arange(max_new_tokens) == step, top_token[:, :, None], top_tokens)

    # d. A continuation stops if it ends in eos or reaches the length limit (stopping_criteria).
    hits_stop = _is_eos(top_token, eos_ids) | (step + 1 >= max_new_tokens)

    # e. The k best continuations that did not stop run on (_get_running_beams_for_next_iteration).
    running_logprobs = top_logprobs + hits_stop.astype(jnp.float32) * NEG_INF
    next_index = jax.lax.top_k(running_logprobs, num_beams)[1]
    run_tokens = _gather(top_tokens, next_index)
    run_scores = _gather(running_logprobs, next_index)
    run_source = _gather(top_source, next_index)

    # f. Only stopped continuations among the top k can become finished hypotheses (_update_finished_beams).
    just_finished = hits_stop & (jnp.arange(beams_to_keep) < num_beams)[None, :]
    # length ** length_penalty of the new tokens (eos included), computed in float64 and rounded to float32
    # like transformers' Python-float divisor, so scores match bit for bit for any length_penalty.
    penalty = jnp.asarray(np.arange(1, max_new_tokens + 1, dtype=np.float64) ** length_penalty, jnp.float32)
    denominator = penalty[step]
    finished_scores = top_logprobs / denominator
    finished_scores = finished_scores + (~state.improvable)[:, None].astype(jnp.float32) * NEG_INF
    finished_scores = finished_scores + (~just_finished).astype(jnp.float32) * NEG_INF
    merged_scores = jnp.concatenate([state.fin_scores, finished_scores], axis=1)
    keep = jax.lax.top_k(merged_scores, num_beams)[1]
    fin_tokens = _gather(jnp.concatenate([state.fin_tokens, top_tokens], axis=1), keep)
    fin_lengths = _gather(jnp.concatenate(
        [state.fin_lengths, jnp.broadcast_to(step + 1, (batch, beams_to_keep))], axis=1), keep)
    fin_scores = _gather(merged_scores, keep)
    fin_filled = _gather(jnp.concatenate([state.fin_filled, just_finished], axis=1), keep)

    # g. Could the best running beam still beat the worst finished hypothesis? (_check_early_stop_heuristic,
    # early_stopping=False: it assumes the running beam ends at the current length.)
    best_running = run_scores[:, :1] / denominator
    worst_finished = jnp.where(fin_filled, jnp.min(fin_scores, axis=1, keepdims=True), NEG_INF)
    improvable = state.improvable & jnp.any(best_running > worst_finished, axis=1)

    # The cache and the hidden states are the loop body's: they follow the beams after this step.
    return state._replace(step=step + 1, run_tokens=run_tokens, run_scores=run_scores, run_source=run_source,
                          fin_tokens=fin_tokens, fin_lengths=fin_lengths, fin_scores=fin_scores,
                          fin_filled=fin_filled, improvable=improvable, all_hit_stop=jnp.all(hits_stop))


@functools.partial(jax.jit, static_argnames=("config", "num_beams", "max_new_tokens", "length_penalty",
                                             "eos_ids", "pad_id", "dtype"))
def beam_search(params, config, input_ids, attention_mask, input_features=None, feature_lengths=None, *,
                num_beams: int, max_new_tokens: int, length_penalty: float = 1.0,
                eos_ids: tuple[int, ...], pad_id: int, dtype=jnp.bfloat16) -> Generated:
    """transformers' beam search (early_stopping=False, no sampling) of left-padded prompts [B, S]."""
    batch = input_ids.shape[0]
    k = num_beams
    beams_to_keep = max(2, 1 + len(eos_ids)) * k
    hidden, cache = _prefill(params, config, input_ids, attention_mask, input_features, feature_lengths,
                             max_new_tokens, dtype)
    # transformers prefills the prompt k times; the k copies are identical, so prefill once and copy the cache.
    cache = _expand_cache(cache, batch, k)
    vocab = params["lm_head"]["kernel"].shape[-1]
    step_fn = functools.partial(_beam_step, vocab=vocab, num_beams=k, beams_to_keep=beams_to_keep,
                                max_new_tokens=max_new_tokens, length_penalty=length_penalty, eos_ids=eos_ids)

    def body(state: _BeamState) -> _BeamState:
        # One step from the beams' hidden states: the LM head and the top K continuations, the step's bookkeeping,
        # then the cache reordered to the beams that survived (reorder_cache) and their last token fed through the
        # decoder, for the next step's hidden states. The LM head and the top K thus appear once in the program
        # (the first step is this body too: prefill's state, only beam 0 live); after the last step the decoder
        # runs once for nothing.
        logits = _lm_head(params, state.hidden, dtype).reshape(batch, k, vocab)
        state = step_fn(state, *_top_continuations(logits, state.run_scores, beams_to_keep))
        cache = _reorder_cache(state.cache, state.run_source)
        last = state.run_tokens[:, :, state.step - 1].reshape(-1)
        hidden, cache = qwen2_audio.decode_step(params, config, last, cache, dtype=dtype, hidden_only=True)
        return state._replace(cache=cache, hidden=hidden)

    def running(state: _BeamState) -> jax.Array:
        # _beam_search_has_unfinished_sequences with early_stopping=False.
        return jnp.any(state.improvable) & ~state.all_hit_stop

    # Only beam 0 is live at the start (the others score NEG_INF), so the first step expands one prompt.
    state = _BeamState(
        step=jnp.int32(0),
        run_tokens=jnp.full((batch, k, max_new_tokens), pad_id, jnp.int32),
        run_scores=jnp.zeros((batch, k), jnp.float32).at[:, 1:].set(NEG_INF),
        run_source=jnp.zeros((batch, k), jnp.int32),
        fin_tokens=jnp.full((batch, k, max_new_tokens), pad_id, jnp.int32),
        fin_lengths=jnp.zeros((batch, k), jnp.int32),
        fin_scores=jnp.full((batch, k), NEG_INF, jnp.float32),
        fin_filled=jnp.zeros((batch, k), bool),
        improvable=jnp.ones((batch,), bool),
        all_hit_stop=jnp.bool_(False),
        cache=cache,
        hidden=jnp.repeat(hidden, k, axis=0))  # row b's k beams at rows b*k .. b*k + k - 1, as the cache
    state = jax.lax.while_loop(running, body, state)
    return Generated(tokens=state.fin_tokens[:, 0], lengths=state.fin_lengths[:, 0])
