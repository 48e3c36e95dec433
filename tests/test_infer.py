"""model/generate.py and infer.py against transformers' own `generate` on tiny random Qwen2-Audio checkpoints.

The reference is Qwen2AudioForConditionalGeneration.generate (transformers 5.23, PyTorch, fp32) with
do_sample=False: num_beams=1 (greedy) and num_beams=3, length_penalty=1.0, early_stopping=False (beam search).
Our searches must give the same token ids. The small model of the search tests has a 512-token vocabulary
with its own eos ids; scaling the eos rows of its lm_head makes eos likely enough that beams finish early, the
early-stopping heuristic fires and an early hypothesis can win (the branches a beam search bug hides in).
"""
import contextlib
import gc
import hashlib
import io
import json
import subprocess
import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import soundfile
import torch
import tyro
from transformers import Qwen2AudioConfig as HFConfig
from transformers import Qwen2AudioForConditionalGeneration

import infer
from model import checkpoint, compilation, generate, processor, qwen2_audio, sharding
from model.answer import render_answer
from model.checkpoint import load_hf
from model.config import Qwen2AudioConfig

V, AUDIO_ID = 512, 511  # the small search-test model: its own vocabulary, audio token and eos ids
EOS, PAD = (509, 510), 510
N_MELS = 128


def hf_config(vocab: int, audio_id: int) -> HFConfig:
    return HFConfig(
        audio_config=dict(d_model=32, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=64,
                          num_mel_bins=N_MELS, max_source_positions=1500),
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=512),
        audio_token_index=audio_id)


def build_model(directory: Path, vocab: int = V, audio_id: int = AUDIO_ID, eos_scale: float = 1.0, seed: int = 0):
    """A random fp32 checkpoint written by save_pretrained: (torch model, our config, our params)."""
    torch.manual_seed(seed)
    model = Qwen2AudioForConditionalGeneration(hf_config(vocab, audio_id)).eval()
    with torch.no_grad():
        for p in model.parameters():  # larger than the 0.02 init so distributions are peaked, not near-uniform
            p.copy_(torch.randn_like(p) * 0.2)
        model.lm_head.weight[list(EOS)] *= eos_scale
    model.save_pretrained(directory)
    hf, params = load_hf(directory)
    return model, Qwen2AudioConfig.from_hf_dict(hf), params


@pytest.fixture(scope="module")
def eos_prone(tmp_path_factory):
    return build_model(tmp_path_factory.mktemp("eos_prone"), eos_scale=4.0)


@pytest.fixture(scope="module")
def eos_free(tmp_path_factory):
    return build_model(tmp_path_factory.mktemp("eos_free"), eos_scale=0.0)


def cut_at_eos(tokens, eos=EOS) -> list[int]:
    out = []
    for t in tokens:
        out.append(int(t))
        if t in eos:
            break
    return out


def reference(model, ids, n_frames=None, features=None, *, num_beams: int, max_new_tokens: int, eos=EOS, pad=PAD):
    """transformers' generate on one unpadded prompt: (new token ids up to the first eos, decoding steps run)."""
    kwargs = dict(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long))
    if features is not None:  # the reference always encodes 30 s; the mask says which frames are real
        kwargs["input_features"] = torch.tensor(features[None])
        kwargs["feature_attention_mask"] = (torch.arange(features.shape[-1]) < n_frames)[None].long()
    beam = dict(length_penalty=1.0, early_stopping=False) if num_beams > 1 else {}
    out = model.generate(**kwargs, **beam, do_sample=False, num_beams=num_beams, max_new_tokens=max_new_tokens,
                         eos_token_id=list(eos), pad_token_id=pad, return_dict_in_generate=True, output_scores=True)
    return cut_at_eos(out.sequences[0, len(ids):].tolist(), eos), len(out.scores)


def ours(config, params, rows, frames=None, n_frames=None, *, num_beams: int, max_new_tokens: int,
         batch_sharding=None):
    """Our search on a left-padded batch of prompts: new token ids of each row (eos included)."""
    width = max(len(r) for r in rows)
    ids = np.full((len(rows), width), PAD, np.int32)
    mask = np.zeros((len(rows), width), np.int32)
    for b, r in enumerate(rows):
        ids[b, width - len(r):], mask[b, width - len(r):] = r, 1
    put = (lambda x: jax.device_put(x, batch_sharding)) if batch_sharding is not None else jnp.asarray
    args = (params, config, put(ids), put(mask))
    if frames is not None:
        args += (jnp.asarray(frames), jnp.asarray(n_frames, jnp.int32))
    kwargs = dict(max_new_tokens=max_new_tokens, eos_ids=EOS, pad_id=PAD, dtype=jnp.float32)
    if num_beams == 1:
        out = generate.greedy_search(*args, **kwargs)
    else:
        out = generate.beam_search(*args, num_beams=num_beams, **kwargs)
    tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
    return [tokens[b, :lengths[b]].tolist() for b in range(len(rows))]


def text_prompts(n: int, length: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 500, size=(n, length)).tolist()


def audio_prompt(n_frames: int, seed: int):
    """(ids with the audio tokens expanded, 30 s of random 'features' for the reference)."""
    rng = np.random.default_rng(seed)
    n_audio = int(processor.num_audio_tokens(n_frames))
    ids = rng.integers(0, 500, size=4).tolist() + [AUDIO_ID] * n_audio + rng.integers(0, 500, size=5).tolist()
    return ids, rng.standard_normal((N_MELS, processor.CHUNK_FRAMES)).astype(np.float32)


# ---- greedy -------------------------------------------------------------------------------------------------------

def test_greedy_equals_transformers_on_text_prompts(eos_prone):
    model, config, params = eos_prone
    lengths = []
    for ids in text_prompts(3, 8, seed=1):
        expected, _ = reference(model, ids, num_beams=1, max_new_tokens=12)
        assert ours(config, params, [ids], num_beams=1, max_new_tokens=12) == [expected]
        lengths.append(len(expected))
    assert max(lengths) < 12  # each stopped at eos (the audio test below runs to max_new_tokens)


def test_greedy_equals_transformers_on_an_audio_prompt(eos_free):
    model, config, params = eos_free
    ids, features = audio_prompt(n_frames=150, seed=2)
    expected, _ = reference(model, ids, 150, features, num_beams=1, max_new_tokens=10)
    assert len(expected) == 10
    # We encode a 200-frame bucket (the reference's first 200 frames); the reference encodes all 3000.
    got = ours(config, params, [ids], features[None, :, :200], [150], num_beams=1, max_new_tokens=10)
    assert got == [expected]


# ---- beam search --------------------------------------------------------------------------------------------------

def test_beam_search_equals_transformers_when_hypotheses_end_in_eos(eos_prone):
    model, config, params = eos_prone
    lengths, steps = [], []
    for ids in text_prompts(5, 8, seed=3):
        expected, n_steps = reference(model, ids, num_beams=3, max_new_tokens=12)
        assert ours(config, params, [ids], num_beams=3, max_new_tokens=12) == [expected], ids
        lengths.append(len(expected))
        steps.append(n_steps)
    # The cases exercise the finished-hypothesis logic: answers ending in eos, and searches the early-stopping
    # heuristic ended before max_new_tokens.
    assert any(n < 12 for n in lengths) and any(s < 12 for s in steps), (lengths, steps)


def test_beam_search_equals_transformers_when_max_new_tokens_is_reached(eos_free):
    model, config, params = eos_free
    for ids in text_prompts(2, 8, seed=4):
        expected, n_steps = reference(model, ids, num_beams=3, max_new_tokens=12)
        assert len(expected) == 12 and n_steps == 12  # no eos: every hypothesis is cut at the limit
        assert ours(config, params, [ids], num_beams=3, max_new_tokens=12) == [expected]


def test_beam_search_equals_transformers_on_an_audio_prompt(eos_prone):
    model, config, params = eos_prone
    ids, features = audio_prompt(n_frames=150, seed=5)
    expected, _ = reference(model, ids, 150, features, num_beams=3, max_new_tokens=10)
    got = ours(config, params, [ids], features[None, :, :200], [150], num_beams=3, max_new_tokens=10)
    assert got == [expected]


@pytest.mark.slow
@pytest.mark.parametrize("num_beams", [1, 3])
def test_left_padded_batch_of_mixed_lengths_equals_each_row_alone(eos_prone, num_beams):
    _, config, params = eos_prone
    rows = [text_prompts(1, n, seed=10 + n)[0] for n in (5, 13, 9)]
    alone = [ours(config, params, [r], num_beams=num_beams, max_new_tokens=10)[0] for r in rows]
    assert ours(config, params, rows, num_beams=num_beams, max_new_tokens=10) == alone
    assert len({len(a) for a in alone}) > 1  # the rows finish at different steps


@pytest.mark.slow
def test_beam_search_on_a_data_fsdp_tensor_mesh_equals_one_device(eos_prone):
    _, config, params = eos_prone
    rows = [text_prompts(1, n, seed=20 + n)[0] for n in (6, 11, 8, 9)]
    expected = ours(config, params, rows, num_beams=3, max_new_tokens=8)
    mesh = sharding.make_mesh(2, 2, 2)
    placed = jax.device_put(params, sharding.param_shardings(mesh, qwen2_audio.abstract_params(config)))
    assert len(placed["lm_head"]["kernel"].sharding.device_set) == 8
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
        got = ours(config, placed, rows, num_beams=3, max_new_tokens=8, batch_sharding=sharding.batch_sharding(mesh))
    assert got == expected


def full_top_k(logits, run_scores, beams_to_keep):
    """The definition: top K of log_softmax + the beam's score over all k*V continuations of a row."""
    batch, k, vocab = logits.shape
    accumulated = jax.nn.log_softmax(logits, axis=-1) + run_scores[:, :, None]
    return jax.lax.top_k(accumulated.reshape(batch, k * vocab), beams_to_keep)


@pytest.mark.parametrize("vocab", [512, 1667, 5000])  # whole groups; a partial last group (the miniature's 1,667)
@pytest.mark.parametrize("ties", [False, True])
def test_grouped_top_continuations_are_the_full_top_k_even_with_ties_and_impossible_beams(vocab, ties):
    rng = np.random.default_rng(vocab)
    logits = rng.standard_normal((4, 3, vocab)).astype(np.float32) * 3
    if ties:  # many equal logits: the kept entries and their order must still be top_k's (lower index first)
        logits = np.round(logits)
    scores = rng.standard_normal((4, 3)).astype(np.float32)
    scores[0, 1:] = generate.NEG_INF  # the first step: only beam 0 is live
    scores[1, 2] = generate.NEG_INF   # a row with fewer live beams than k
    got = jax.jit(generate._top_continuations, static_argnums=2)(jnp.asarray(logits), jnp.asarray(scores), 6)
    expected = full_top_k(jnp.asarray(logits), jnp.asarray(scores), 6)
    assert vocab * 3 > 6 * generate.TOPK_GROUP  # the grouped path, not the fallback
    np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(expected[1]))
    np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(expected[0]))  # the same floats, bit for bit


def test_reordered_cache_takes_each_beam_from_its_source_beam_of_the_same_row():
    config = Qwen2AudioConfig.from_hf_dict(hf_config(V, AUDIO_ID).to_dict())
    batch, k = 3, 3
    cache = qwen2_audio.init_cache(config, batch * k, 7)
    cache = {name: (x if x.ndim == 0 else jnp.arange(x.size, dtype=x.dtype).reshape(x.shape))
             for name, x in cache.items()}
    source = np.array([[2, 0, 0], [1, 1, 2], [0, 2, 1]], np.int32)
    got = generate._reorder_cache(cache, jnp.asarray(source))
    flat = (np.arange(batch)[:, None] * k + source).reshape(-1)  # row b's beam j <- row b's beam source[b, j]
    for name, x in cache.items():
        axis = qwen2_audio.CACHE_BATCH_AXIS[name]
        want = np.asarray(x) if axis is None else np.take(np.asarray(x), flat, axis=axis)
        np.testing.assert_array_equal(np.asarray(got[name]), want, err_msg=name)


# ---- infer.py -----------------------------------------------------------------------------------------------------

REAL_VOCAB = 151936  # covers the real tokenizer's ids (151,649) so prompts come from processor.load_tokenizer


@pytest.fixture(scope="module")
def real_vocab_model(tmp_path_factory):
    """A tiny random checkpoint over the real Qwen2 vocabulary, its model directory, and a 3-row manifest.
    Its eos rows are zeroed, so no row ever ends: every generation runs to --max-new-tokens."""
    root = tmp_path_factory.mktemp("infer")
    model, _, _ = build_model(root / "hf", vocab=REAL_VOCAB, audio_id=processor.SPECIAL_TOKENS[processor.AUDIO_TOKEN],
                              eos_scale=0.0)
    wav = root / "alarm.wav"
    subprocess.run(["espeak-ng", "-w", str(wav), "wake me up at seven am"], check=True)
    # Manifest order differs from decoding order (audio rows first, then text rows by length).
    rows = [
        {"id": "t_long", "lang": "en", "text": "what is the weather going to be like in paris tomorrow morning",
         "audio": None, "scenario": "weather", "action": "query",
         "entities": [{"type": "place_name", "filler": "paris"}]},
        {"id": "s1", "lang": "en", "text": "wake me up at seven am", "audio": str(wav), "scenario": "alarm",
         "action": "set", "entities": [{"type": "time", "filler": "seven am"}]},
        {"id": "t_short", "lang": "en", "text": "play jazz", "audio": None, "scenario": "play", "action": "music",
         "entities": []},
    ]
    manifest = root / "test.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return model, root, manifest, rows


def reference_text(model, prompt: str, wav=None, *, num_beams: int, max_new_tokens: int) -> str:
    """What transformers generates for one manifest row, decoded with the special tokens removed."""
    tok = processor.load_tokenizer()
    special = processor.special_ids(tok)
    features = n_frames = None
    if wav is not None:
        features, n_frames = processor.log_mel_features(processor.load_audio(wav), out_frames=processor.CHUNK_FRAMES)
    ids = processor.encode_prompt(tok, prompt, None if wav is None else int(processor.num_audio_tokens(n_frames)))
    new, _ = reference(model, ids, n_frames, features, num_beams=num_beams, max_new_tokens=max_new_tokens,
                       eos=special.eos, pad=special.pad)
    return tok.decode(new, skip_special_tokens=True)


@pytest.mark.slow
def test_infer_writes_parsed_rows_in_manifest_order_and_matches_transformers(real_vocab_model, tmp_path):
    model, root, manifest, rows = real_vocab_model
    out = tmp_path / "preds.jsonl"
    summary = infer.main(infer.Args(model=str(root / "hf"), manifest=str(manifest), out=str(out), num_beams=3,
                                    max_new_tokens=6, batch_size=2, dtype="float32"))
    got = [json.loads(line) for line in out.read_text().splitlines()]
    assert [g["id"] for g in got] == [r["id"] for r in rows]
    for g in got:
        assert set(g) == {"id", "prompt", "generated", "scenario", "action", "entities", "parse_error"}
    # The speech row is decoded from its audio, the transcript rows from their text.
    assert processor.AUDIO_TOKEN in got[1]["prompt"] and rows[1]["text"] not in got[1]["prompt"]
    assert got[0]["prompt"] == processor.build_prompt(rows[0]["text"], audio=False)
    for g, row in zip(got, rows):
        assert g["generated"] == reference_text(model, g["prompt"], row["audio"], num_beams=3, max_new_tokens=6)
    # A random model does not answer in JSON: the raw text is kept, the error recorded and counted, no exception.
    assert all(g["parse_error"] for g in got) and summary["parse_failures"] == 3
    assert all(g["scenario"] == "" and g["entities"] == [] for g in got)
    assert not list(tmp_path.glob(".preds.jsonl*"))  # the temp file was renamed


@pytest.mark.slow
def test_infer_input_text_decodes_speech_rows_from_their_transcripts(real_vocab_model, tmp_path):
    model, root, manifest, rows = real_vocab_model
    out = tmp_path / "oracle.jsonl"
    infer.main(infer.Args(model=str(root), manifest=str(manifest), out=str(out), num_beams=1, max_new_tokens=5,
                          input="text", dtype="float32"))  # a run directory: its hf/ is used
    got = [json.loads(line) for line in out.read_text().splitlines()]
    assert got[1]["prompt"] == processor.build_prompt(rows[1]["text"], audio=False)
    assert got[1]["generated"] == reference_text(model, got[1]["prompt"], num_beams=1, max_new_tokens=5)


def test_an_answer_that_is_not_json_is_kept_with_its_parse_error():
    row = {"id": "x", "text": "t", "audio": None}
    out = infer.output_row(row, "PROMPT", 'sure! {"scenario": "alarm", "act')
    assert out["generated"] == 'sure! {"scenario": "alarm", "act' and out["prompt"] == "PROMPT"
    assert out["parse_error"] and out["action"] == "" and out["entities"] == []


def test_infer_command_line_flags():
    args = tyro.cli(infer.Args, args=["--model", "tiny", "--manifest", "m.jsonl", "--out", "p.jsonl",
                                      "--num-beams", "1", "--max-new-tokens", "32", "--batch-size", "4",
                                      "--input", "text", "--data-parallel", "2", "--fsdp", "2",
                                      "--tensor-parallel", "2"])
    assert (args.num_beams, args.max_new_tokens, args.batch_size, args.input) == (1, 32, 4, "text")
    assert (args.data_parallel, args.fsdp, args.tensor_parallel) == (2, 2, 2)


def test_infer_rejects_a_model_path_without_config(tmp_path):
    with pytest.raises(infer.InputError, match="no config.json"):
        infer.resolve_model_dir(str(tmp_path))


def test_a_train_run_directory_resolves_to_its_hf_export_even_with_its_own_config_json(tmp_path):
    # train.py writes RUN_DIR/config.json (its settings) beside RUN_DIR/hf/config.json (the model's).
    (tmp_path / "hf").mkdir()
    (tmp_path / "config.json").write_text('{"scheme": "direct"}')
    (tmp_path / "hf" / "config.json").write_text("{}")
    assert infer.resolve_model_dir(str(tmp_path)) == str(tmp_path / "hf")
    assert infer.resolve_model_dir(str(tmp_path / "hf")) == str(tmp_path / "hf")


# ---- infer.py: what the output records, and bad input found before the model is loaded ---------------------------

@pytest.fixture(scope="module")
def unfinished_run_decoded(real_vocab_model, tmp_path_factory):
    """infer.main with default settings (except a 2-token limit) on a train.py run directory whose export says
    the run was stopped at step 2 of 6: (summary, predictions path, its meta dict, stderr)."""
    _, root, manifest, _ = real_vocab_model
    run = tmp_path_factory.mktemp("run")
    (run / "config.json").write_text(json.dumps({"args": {"scheme": "direct"}}))  # train.py's settings file
    (run / "hf").mkdir()
    for f in (root / "hf").iterdir():
        (run / "hf" / f.name).symlink_to(f)
    (run / "hf" / checkpoint.TRAINING_RUN_FILE).write_text(json.dumps({"finished": False, "steps": 2, "planned_steps": 6}))
    out = run / "preds" / "pred.jsonl"  # a folder that does not exist yet is created
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        summary = infer.main(infer.Args(model=str(run), manifest=str(manifest), out=str(out), num_beams=1,
                                        max_new_tokens=2, input="text", batch_size=4))
    return summary, out, json.loads(infer.meta_path(str(out)).read_text()), stderr.getvalue()


def test_decoding_an_unfinished_run_warns_and_records_where_it_stopped(unfinished_run_decoded):
    _, out, meta, stderr = unfinished_run_decoded
    assert "stopped at step 2 of 6" in stderr
    assert (meta["finished"], meta["steps"], meta["planned_steps"]) == (False, 2, 6)
    assert meta["model_dir"].endswith("/hf") and meta["rows"] == 3


def test_the_decoding_reports_its_compilations_batch_shapes_and_padding(unfinished_run_decoded):
    # 3 text rows in one batch of 4 (the 4th repeats row 1): one batch shape, its program compiled or loaded from
    # the persistent cache; the padded share counts the repeated row and the left padding of the shorter prompts
    summary, _, meta, stderr = unfinished_run_decoded
    assert meta["batch_shapes"] == 1 and meta["compiled"] + meta["cache_hits"] >= 1
    assert 0.25 < meta["padding"] < 1 and summary["padding"] == meta["padding"]
    assert "1 batch shape(s)" in stderr and "padding" in stderr


def test_gc_paused_turns_the_collector_off_inside_and_restores_it_after_even_on_error():
    assert gc.isenabled()
    with pytest.raises(RuntimeError):
        with compilation.gc_paused():
            assert not gc.isenabled()
            raise RuntimeError("a failed compile")
    assert gc.isenabled()
    gc.disable()  # a caller that had it off keeps it off
    try:
        with compilation.gc_paused():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_infer_calls_each_batchs_search_with_the_collector_paused(real_vocab_model, tmp_path, monkeypatch):
    # The first call of a shape compiles its program: collections walking every live object slowed that by 20-30%.
    _, root, manifest, _ = real_vocab_model
    during, real_decoder = [], infer.decoder

    def recording_decoder(*args, **kwargs):
        search, static = real_decoder(*args, **kwargs)

        def recording_search(*a, **k):
            during.append(gc.isenabled())
            return search(*a, **k)
        return recording_search, static
    monkeypatch.setattr(infer, "decoder", recording_decoder)
    with contextlib.redirect_stderr(io.StringIO()):
        infer.main(infer.Args(model=str(root / "hf"), manifest=str(manifest), out=str(tmp_path / "pred.jsonl"),
                              num_beams=1, max_new_tokens=4, input="text"))
    assert during == [False] and gc.isenabled()  # 3 text rows: one batch


def test_the_meta_file_names_the_predictions_it_describes(unfinished_run_decoded):
    _, out, meta, _ = unfinished_run_decoded
    assert meta["predictions_sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()
    assert meta["decoding"]["num_beams"] == 1 and meta["decoding"]["max_new_tokens"] == 2


def test_rows_cut_at_max_new_tokens_are_counted_listed_and_reported(unfinished_run_decoded, real_vocab_model):
    summary, _, meta, stderr = unfinished_run_decoded
    ids = [r["id"] for r in real_vocab_model[3]]  # the model cannot emit eos: every row is cut
    assert meta["hit_max_new_tokens"] == summary["hit_max_new_tokens"] == 3
    assert meta["hit_max_new_tokens_ids"] == ids  # manifest order
    assert "3 of 3 row(s) hit --max-new-tokens 2" in stderr


def test_default_dtype_is_float32_on_a_cpu(unfinished_run_decoded):
    # XLA emulates bfloat16 on a CPU (slow, and greedy ties differ from the fp32 reference): train.py's auto rule.
    assert infer.Args(model="m", manifest="m", out="o").dtype == "auto"
    assert unfinished_run_decoded[2]["decoding"]["dtype"] == "float32"


def test_a_row_ending_in_eos_exactly_at_the_limit_is_not_cut():
    eos = (4, 2)  # a checkpoint's own <|im_end|>, <|endoftext|>
    assert infer.hit_limit([5, 6, 7], max_new_tokens=3, eos_ids=eos)
    assert not infer.hit_limit([5, 6, 4], max_new_tokens=3, eos_ids=eos)
    assert not infer.hit_limit([5, 2], max_new_tokens=3, eos_ids=eos)


def test_default_max_new_tokens_fits_the_longest_real_slurp_answer():
    # SLURP devel line 1881 (slurp_id 7104): the longest of the 5,007 devel/test gold answers, 75 tokens + <|im_end|>.
    persons = ("chris", "kimberly", "aaronson")
    answer = render_answer("calendar", "set", [{"type": "event_name", "filler": "brunch"},
                                               {"type": "date", "filler": "saturday"},
                                               {"type": "timeofday", "filler": "morning"},
                                               *({"type": "person", "filler": p} for p in persons)])
    needed = len(processor.load_tokenizer().encode(answer, add_special_tokens=False).ids) + 1  # + <|im_end|>
    assert needed == 76
    assert infer.Args(model="m", manifest="m", out="o").max_new_tokens >= needed


def test_a_model_directory_without_training_run_json_is_not_flagged(tmp_path, capsys):
    # A real Hugging Face checkpoint has no training_run.json: no warning, and the meta file records null.
    assert infer.read_training_run(str(tmp_path)) is None
    infer.warn_unfinished(str(tmp_path), None)
    infer.warn_unfinished(str(tmp_path), {"finished": True, "steps": 6, "planned_steps": 6})
    assert capsys.readouterr().err == ""


def test_a_training_run_json_with_a_wrong_field_is_an_input_error_naming_it(tmp_path):
    (tmp_path / checkpoint.TRAINING_RUN_FILE).write_text('{"finished": "no", "steps": 2, "planned_steps": 6}')
    with pytest.raises(infer.InputError, match=r"training_run.json: field 'finished': expected true or false"):
        infer.read_training_run(str(tmp_path))


def test_a_training_run_json_that_is_not_utf8_is_an_input_error_naming_it(tmp_path):
    (tmp_path / checkpoint.TRAINING_RUN_FILE).write_bytes(b'{"finished": "\xff"}')
    with pytest.raises(infer.InputError, match=r"training_run.json: not UTF-8 text \(byte 14\)"):
        infer.read_training_run(str(tmp_path))


def test_a_run_directory_without_an_export_says_the_run_has_no_export_yet(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"args": {"scheme": "direct"}, "plan_fingerprint": "x"}))
    with pytest.raises(infer.InputError, match="no export yet"):
        infer.resolve_model_dir(str(tmp_path))


@pytest.fixture
def no_model_load(monkeypatch):
    """Checks that an input error is found before the model is loaded (hours of work on a large test set)."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the input was checked")
    monkeypatch.setattr(infer, "load_model", refuse)


def text_manifest(path: Path) -> Path:
    path.write_text(json.dumps({"id": "t", "lang": "en", "text": "play jazz", "audio": None, "scenario": "play",
                                "action": "music", "entities": []}) + "\n")
    return path


@pytest.mark.parametrize("where", ["parent_is_a_file", "is_a_directory"])
def test_an_unwritable_out_fails_before_the_model_is_loaded(tmp_path, no_model_load, where):
    manifest = text_manifest(tmp_path / "m.jsonl")
    (tmp_path / "a_file").write_text("")
    out = {"parent_is_a_file": tmp_path / "a_file" / "pred.jsonl", "is_a_directory": tmp_path}[where]
    with pytest.raises(infer.InputError, match=f"--out {out}: "):
        infer.main(infer.Args(model="tiny", manifest=str(manifest), out=str(out)))


def test_clips_longer_than_30_s_are_counted_and_reported_before_decoding(tmp_path, no_model_load, capsys):
    # the reference cuts them to 30 s silently; a user must know how many answers saw only part of the audio
    soundfile.write(tmp_path / "long.wav", np.zeros(16000 * 31, np.float32), 16000)
    soundfile.write(tmp_path / "ok.wav", np.zeros(16000 * 29, np.float32), 16000)
    rows = [{"id": i, "lang": "en", "text": "wake me up", "audio": str(tmp_path / f"{i}.wav"), "scenario": "alarm",
             "action": "set", "entities": []} for i in ("long", "ok")]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(AssertionError, match="the model was loaded"):
        infer.main(infer.Args(model="tiny", manifest=str(manifest), out=str(tmp_path / "p.jsonl")))
    assert "1 of 2 recording(s) are longer than 30 s" in capsys.readouterr().err


def test_bad_audio_rows_are_all_reported_with_their_lines_before_the_model_is_loaded(tmp_path, no_model_load):
    garbage, short = tmp_path / "garbage.wav", tmp_path / "short.wav"
    garbage.write_bytes(b"not a wav file at all")
    soundfile.write(short, np.zeros(96, np.float32), 16000)  # 6 ms: zero audio tokens
    rows = [{"id": i, "lang": "en", "text": "wake me up", "audio": str(a), "scenario": "alarm", "action": "set",
             "entities": []} for i, a in (("g", garbage), ("ok", short), ("s", short))]
    rows[1]["audio"] = None
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(infer.InputError) as e:
        infer.main(infer.Args(model="tiny", manifest=str(manifest), out=str(tmp_path / "p.jsonl")))
    lines = str(e.value).splitlines()
    assert len(lines) == 2
    assert lines[0].startswith(f"{manifest}:1: id 'g': {garbage}: cannot be decoded")
    assert lines[1].startswith(f"{manifest}:3: id 's': {short}: too short") and "gives no audio token" in lines[1]


def test_bad_flags_are_an_input_error(tmp_path, no_model_load):
    manifest = text_manifest(tmp_path / "m.jsonl")
    with pytest.raises(infer.InputError, match="must be >= 1"):
        infer.main(infer.Args(model="tiny", manifest=str(manifest), out=str(tmp_path / "p.jsonl"), num_beams=0))
    with pytest.raises(infer.InputError, match="is the manifest being decoded"):
        infer.main(infer.Args(model="tiny", manifest=str(manifest), out=str(manifest)))


def test_the_command_line_prints_file_line_message_and_exits_2_on_bad_input(tmp_path):
    manifest = text_manifest(tmp_path / "m.jsonl")
    manifest.write_text(manifest.read_text() + "{not json\n")
    done = subprocess.run([sys.executable, str(Path(infer.__file__)), "--model", "tiny", "--manifest", str(manifest),
                           "--out", str(tmp_path / "p.jsonl")], capture_output=True, text=True)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith(f"infer.py: error: {manifest}:2: malformed JSON")
    assert "Traceback" not in done.stderr


# ---- --aot-topology: the decode compiled for a TPU slice (libtpu from requirements-test.txt) ----------------------

def speech_manifest(root: Path) -> Path:
    """Two clips at 22.05 kHz (resampled to 16 kHz by infer: the sample counts are not round) and a text row."""
    rows = []
    for name, seconds in (("short", 1.3), ("long", 7.21)):
        soundfile.write(root / f"{name}.wav", np.zeros(int(22050 * seconds), np.float32), 22050)
        rows.append({"id": name, "lang": "en", "text": "wake me up at seven am", "audio": str(root / f"{name}.wav"),
                     "scenario": "alarm", "action": "set", "entities": []})
    rows.append({"id": "t", "lang": "en", "text": "play some jazz " * 30, "audio": None, "scenario": "play",
                 "action": "music", "entities": []})
    manifest = root / "m.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return manifest


def test_audio_batches_of_one_audio_bucket_share_one_shape_whatever_their_clips(tmp_path):
    tok = infer.load_tokenizer(None)
    shapes = set()
    for seconds in (1.3, 2.2, 3.9):  # all in the 4 s bucket, three prompt lengths
        soundfile.write(tmp_path / "c.wav", np.zeros(int(16000 * seconds), np.float32), 16000)
        row = {"id": "c", "lang": "en", "text": "x", "audio": str(tmp_path / "c.wav")}
        items = infer.plan_rows([row], tok, use_audio=True, source="m.jsonl")
        batch = infer.make_batch(items, tok, 2, processor.special_ids(tok).pad)
        shapes.add((batch["input_ids"].shape, batch["input_features"].shape))
        assert batch["attention_mask"].sum() == 2 * infer.audio_prompt_tokens(tok, processor.num_frames(
            int(16000 * seconds)))  # the real prompt is all there, left-padded
    # one shape: the prompt of the longest clip the bucket holds (its 100 audio tokens and the instruction)
    assert shapes == {((2, infer.audio_prompt_tokens(tok, processor.AUDIO_BUCKETS[0])),
                       (2, N_MELS, processor.AUDIO_BUCKETS[0]))}


def test_aot_shape_is_the_shape_of_the_largest_batch_infer_builds(tmp_path):
    manifest = speech_manifest(tmp_path)
    tok = infer.load_tokenizer(None)
    args = infer.Args(model="tiny", manifest=str(manifest), aot_topology="v5p-8")
    items = infer.plan_rows(infer.read_manifest(str(manifest)), tok, use_audio=True, source=str(manifest))
    audio_batch = infer.make_batch([item for item in items if item["from_audio"]], tok, 2, processor.special_ids(tok).pad)
    assert infer.aot_shape(args, tok) == (audio_batch["input_ids"].shape[1], audio_batch["input_features"].shape[2])
    # --input text: every row is a text prompt, the longest one sets the columns
    text_items = infer.plan_rows(infer.read_manifest(str(manifest)), tok, use_audio=False, source=str(manifest))
    text_batch = infer.make_batch(text_items, tok, 3, processor.special_ids(tok).pad)
    args.input = "text"
    assert infer.aot_shape(args, tok) == (text_batch["input_ids"].shape[1], None)


def test_aot_topology_compiles_the_decode_for_v5p_8_without_weights_or_audio(tmp_path, monkeypatch, capsys):
    manifest = speech_manifest(tmp_path)
    def refuse(*args, **kwargs):
        raise AssertionError("--aot-topology loaded weights or audio")
    for module, name in ((infer, "load_model"), (checkpoint, "load_hf"), (processor, "load_audio"),
                         (processor, "log_mel_features")):
        monkeypatch.setattr(module, name, refuse)
    args = infer.Args(model="tiny", manifest=str(manifest), aot_topology="v5p-8", num_beams=1, batch_size=6,
                      max_new_tokens=8)
    with jax.default_matmul_precision("default"):  # as a real run compiles it, not conftest's "highest"
        status = infer.aot_main(args)
    report = json.loads(capsys.readouterr().out)
    assert status == 0 and report["fits"] is True
    assert (report["topology"], report["chips"], report["mesh"]) == ("v5p-8", 4, {"data": 4, "fsdp": 1, "tensor": 1})
    seq, frames = infer.aot_shape(args, infer.load_tokenizer(None))
    assert report["workload"] == {"model": "tiny", "num_beams": 1, "batch_size": 8, "rows_per_chip": 2,
                                  "prompt_tokens": seq, "audio_frames": frames, "max_new_tokens": 8,
                                  "dtype": "bfloat16"}
    # data parallel: every chip holds all the bf16 weights; each input is split over the 4 chips
    params = nn.unbox(qwen2_audio.abstract_params(infer.get_config("tiny"), jnp.bfloat16))
    n_params = sum(x.size for x in jax.tree_util.tree_leaves(params))
    assert report["arguments_per_chip_gib"]["params"] == round(2 * n_params / 2 ** 30, 3)
    assert report["arguments_per_chip_gib"]["input_features"] == round(2 * 128 * frames * 4 / 2 ** 30, 3)
    memory = report["memory_per_chip_gib"]
    assert 0 < memory["temporaries"] < memory["total"] <= report["hbm_per_chip_gib"]
    assert report["flops_per_chip"] > 0


def test_aot_decode_too_large_for_v5e_8_exits_3_and_says_to_lower_the_batch(tmp_path):
    done = subprocess.run([sys.executable, str(Path(infer.__file__)), "--model", "tiny", "--aot-topology", "v5e-8",
                           "--aot-seq-len", "4096", "--batch-size", "512", "--num-beams", "1",
                           "--max-new-tokens", "8"], capture_output=True, text=True)
    assert done.returncode == 3, done.stderr
    report = json.loads(done.stdout)
    assert report["fits"] is False and report["workload"]["rows_per_chip"] == 64
    assert report["memory_per_chip_gib"]["total"] > report["hbm_per_chip_gib"] == 15.75
    assert "infer.py: does not fit on v5e-8" in done.stderr
    assert "temporaries:" in done.stderr and "lower --batch-size" in done.stderr


@pytest.mark.slow
def test_aot_topology_compiles_the_beam_search_decode(capsys):
    args = infer.Args(model="tiny", aot_topology="v4-8", aot_seq_len=100, num_beams=3, batch_size=4,
                      max_new_tokens=8, fsdp=2)
    with jax.default_matmul_precision("default"):
        assert infer.aot_main(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["mesh"] == {"data": 2, "fsdp": 2, "tensor": 1} and report["workload"]["prompt_tokens"] == 128
    assert report["workload"]["audio_frames"] is None and report["fits"] is True


def test_an_aot_prompt_shorter_than_its_clip_is_an_input_error_before_compiling(monkeypatch):
    monkeypatch.setattr(infer.aot, "compile_report", lambda *a, **k: pytest.fail("compiled"))
    args = infer.Args(model="7b", aot_topology="v5p-8", aot_audio_seconds=30, aot_seq_len=512)
    with pytest.raises(infer.InputError, match=r"--aot-seq-len 512: the prompt of a 30 s clip has \d+ tokens "
                                               r"\(750 of them audio\)"):
        infer.aot_main(args)


def test_aot_flags_need_aot_topology_and_a_decoding_run_needs_manifest_and_out(tmp_path, no_model_load):
    with pytest.raises(infer.InputError, match="--aot-seq-len: only with --aot-topology"):
        infer.main(infer.Args(model="tiny", manifest="m.jsonl", out="p.jsonl", aot_seq_len=64))
    with pytest.raises(infer.InputError, match="--manifest and --out are required"):
        infer.main(infer.Args(model="tiny", manifest="m.jsonl"))
    with pytest.raises(infer.InputError, match="give the shapes to compile"):
        infer.aot_main(infer.Args(model="tiny", aot_topology="v5p-8"))
    with pytest.raises(infer.aot.AotError, match="unknown TPU topology"):
        infer.aot_main(infer.Args(model="tiny", aot_topology="v5p-6", aot_seq_len=64))


def test_the_weights_remedy_suggests_fsdp_unless_they_are_sharded_over_every_chip():
    devices, _ = infer.aot.topology_devices("v5p-8")
    data = infer.aot_remedies(sharding.make_mesh(4, 1, 1, devices=devices))["params"]
    assert "1/1 of the weights" in data and "--data-parallel 1 --fsdp -1" in data
    assert "a larger slice" in infer.aot_remedies(sharding.make_mesh(1, 2, 2, devices=devices))["params"]
