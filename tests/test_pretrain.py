"""pretrain.py: the corpus never holds a demo devel/test utterance, the trimmed tokenizer still encodes any text, and
a shortened pretraining runs end to end into a directory that transformers and our Flax model load to equal logits."""
import json
import random
import subprocess
import sys
import unicodedata
from pathlib import Path

import numpy as np
import pytest

import pretrain as pt
from model import processor as P

REPO = Path(__file__).resolve().parent.parent


def demo_rows(split):
    return [json.loads(line) for line in (pt.DEMO_DIR / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def shipped_corpus():
    spec = pt.load_spec(pt.SPEC)
    demo_spec = json.loads((pt.DEMO_DIR / "templates.json").read_text(encoding="utf-8"))
    return spec, pt.build_sentences(spec, pt.demo_texts(pt.DEMO_DIR), demo_spec, spec["sentences_per_language"])


def test_shipped_corpus_holds_no_demo_devel_or_test_utterance(shipped_corpus):
    _, sentences = shipped_corpus
    heldout = {pt.normalise(r["text"]) for split in ("devel", "test") for r in demo_rows(split)}
    assert len(heldout) == 208  # devel 40, test 40 + 128 (templates.json's extra_test)
    assert not {pt.normalise(s["text"]) for s in sentences} & heldout


def test_shipped_corpus_speaks_every_word_of_the_demo_devel_and_test_utterances(shipped_corpus):
    # Sharing the domain's words is allowed (and needed: a word never heard cannot be recognised later).
    _, sentences = shipped_corpus
    heard = {w for s in sentences for w in s["text"].split()}
    words = {w for split in ("devel", "test") for r in demo_rows(split) for w in r["text"].split()}
    assert words - heard == set()


def test_a_template_that_would_produce_a_demo_utterance_never_yields_it():
    # The guarantee is the filter, not the templates: feed it the demo's own template and values.
    held = demo_rows("devel")[0]  # "tell me the forecast for paris sunday"
    assert held["text"] == "tell me the forecast for paris sunday"
    spec = {"seed": 1, "word_string_share": 0.0, "word_string_length": [3, 3],
            "languages": {"en": {"templates": ["tell me the forecast for {place} {date}"],
                                 "values": {"place": ["paris"], "date": ["sunday", "monday", "today"]}}}}
    sentences = pt.build_sentences(spec, pt.demo_texts(pt.DEMO_DIR), None, per_language=2)
    assert {s["text"] for s in sentences} == {"tell me the forecast for paris monday",
                                              "tell me the forecast for paris today"}
    assert pt.normalise("Tell me  the forecast for Paris SUNDAY") in pt.demo_texts(pt.DEMO_DIR)


def test_sentences_are_a_function_of_the_seed(shipped_corpus):
    spec, sentences = shipped_corpus
    again = pt.build_sentences(spec, pt.demo_texts(pt.DEMO_DIR), None, 50)
    assert [s["text"] for s in again] == [s["text"] for s in pt.build_sentences(spec, pt.demo_texts(pt.DEMO_DIR),
                                                                                None, 50)]
    assert len({s["text"] for s in sentences}) == len(sentences) == 2 * spec["sentences_per_language"]


def test_trained_tokenizer_encodes_any_text_and_appends_the_special_tokens_at_compact_ids(shipped_corpus):
    spec, sentences = shipped_corpus
    tok = pt.train_tokenizer(pt.tokenizer_texts(spec, sentences[:400]), 600)
    n_bpe = tok.get_vocab_size() - len(P.SPECIAL_TOKENS)
    assert 256 < n_bpe <= 600
    assert [P.token_id(tok, t) for t in P.SPECIAL_TOKENS] == list(range(n_bpe, n_bpe + 6))
    for text in ("Ça coûte 3 € — 東京 🙂", "schedule a meeting with hélène", "\n\t  x"):
        assert tok.decode(tok.encode(text, add_special_tokens=False).ids) == unicodedata.normalize("NFC", text)
    # a prompt's control tokens are single tokens, so the chat frame is the reference's
    ids = P.encode_prompt(tok, P.build_prompt(None, audio=True, instruction="Repeat the utterance."), 3)
    assert ids.count(P.special_ids(tok).audio) == 3 and ids.count(P.special_ids(tok).im_start) == 3
    # the learned merges make the domain's words short: under half a token per byte
    text = "tell me the forecast for paris"
    assert len(tok.encode(text, add_special_tokens=False).ids) <= len(text) // 2


def test_model_config_takes_vocabulary_and_special_ids_from_the_tokenizer(shipped_corpus):
    spec, sentences = shipped_corpus
    tok = pt.train_tokenizer(pt.tokenizer_texts(spec, sentences[:400]), 600)
    config = pt.model_config(tok)
    ids = P.special_ids(tok)
    assert config.text.vocab_size == tok.get_vocab_size()
    assert (config.audio_token_index, config.text.eos_token_id, config.text.pad_token_id) == (ids.audio, ids.im_end,
                                                                                             ids.pad)


def test_alignment_targets_are_the_spoken_text_and_rows_without_a_recording_add_no_loss(shipped_corpus):
    import jax
    from model.qwen2_audio import init_params
    spec, sentences = shipped_corpus
    tok = pt.train_tokenizer(pt.tokenizer_texts(spec, sentences[:400]), 600)
    config = pt.model_config(tok)
    rng = np.random.default_rng(0)
    sentence = {"lang": "en", "text": "wake me up at noon", "n_frames": 150}
    features = rng.standard_normal((128, 200)).astype(np.float16)
    audio_ex = pt.make_example(sentence, features, "repeat", tok, spec, random.Random(0))
    text_ex = pt.make_example(sentence, None, "count", tok, spec, random.Random(0))
    batch = pt.collate_batch([audio_ex, text_ex], [sentence["text"], None], tok, P.special_ids(tok).pad, 32)
    n = len(tok.encode(sentence["text"]).ids)
    assert batch["ctc_labels"][0, :n].tolist() == tok.encode(sentence["text"]).ids
    assert batch["ctc_label_paddings"][0].tolist() == [0.0] * n + [1.0] * (32 - n)
    assert batch["ctc_label_paddings"][1].min() == 1.0
    params = init_params(config, jax.random.PRNGKey(0))
    total, n_audio = pt.alignment_loss(params, config, batch, P.special_ids(tok).pad)
    assert n_audio == P.num_audio_tokens(150)  # the audio row's tokens only
    # near-uniform logits at init: about ln(vocab) per audio token
    assert abs(float(total) / float(n_audio) - np.log(config.text.vocab_size)) < 1.0


def test_the_shipped_miniature_is_what_pretrain_builds_from_the_shipped_spec(shipped_corpus):
    # models/mini is pretrain.py's export: the same tokenizer (trained on the same sentences) and config
    from model.config import Qwen2AudioConfig, SHIPPED
    spec, sentences = shipped_corpus
    tok = pt.train_tokenizer(pt.tokenizer_texts(spec, sentences), spec["tokenizer_vocab_size"])
    shipped = P.load_tokenizer(SHIPPED["mini"])
    assert tok.get_vocab() == shipped.get_vocab()
    assert pt.model_config(tok) == Qwen2AudioConfig.from_pretrained(SHIPPED["mini"])


def test_every_task_answer_is_read_off_the_sentence():
    rng = random.Random(0)
    text = "wake me up at seven am"
    assert pt.task_answer("repeat", text, "English", rng) == (None, text)
    assert pt.task_answer("language", text, "English", rng) == (None, "English")
    assert pt.task_answer("first", text, "English", rng) == (None, "wake")
    assert pt.task_answer("last", text, "English", rng) == (None, "am")
    assert pt.task_answer("count", text, "English", rng) == (None, "6")
    shown, rest = pt.task_answer("continue", text, "English", rng)
    assert f"{shown} {rest}" == text and shown and rest


def test_recognise_reads_each_recording_as_it_would_alone_and_scores_what_it_heard(tmp_path):
    # the batched, padded CTC read of 5 recordings (two buckets) equals reading each clip alone at its own length
    import jax.numpy as jnp
    from model.checkpoint import load_hf
    from model.config import SHIPPED, Qwen2AudioConfig
    from model.qwen2_audio import AudioEncoder, Projector
    rows = [r for r in demo_rows("devel") if r["audio"]][:5]
    manifest = tmp_path / "five.jsonl"
    manifest.write_text("".join(json.dumps({**r, "audio": str(pt.DEMO_DIR / r["audio"])}) + "\n" for r in rows))
    result = pt.recognise("mini", str(manifest), None)
    assert result["recordings"] == 5 and 0.0 < result["ctc_wer"] < 1.0
    hf_config, params = load_hf(SHIPPED["mini"])
    config, tok = Qwen2AudioConfig.from_hf_dict(hf_config), P.load_tokenizer(SHIPPED["mini"])
    alone = []
    for r in rows:
        feats, n = P.log_mel_features(P.load_audio(pt.DEMO_DIR / r["audio"]))
        audio = AudioEncoder(config).apply({"params": params["audio_tower"]}, jnp.asarray(feats[None]),
                                           jnp.asarray([n]))
        audio = Projector(config).apply({"params": params["multi_modal_projector"]}, audio)
        best = np.asarray(jnp.argmax(audio[0] @ params["language_model"]["embed_tokens"]["embedding"].T, -1))
        best = best[:P.num_audio_tokens(n)]
        alone.append(tok.decode([int(t) for k, t in enumerate(best) if (k == 0 or t != best[k - 1])
                                 and t != P.special_ids(tok).pad], skip_special_tokens=True).strip())
    assert [e["ctc"] for e in result["examples"]] == alone
    assert result["ctc_wer"] == round(pt.word_error_rate([r["text"] for r in rows], alone), 4)
    assert result["wer"] == round(pt.word_error_rate([r["text"] for r in rows],
                                                     [e["repeat"] for e in result["examples"]]), 4)


def test_recognise_without_recordings_exits_2_naming_the_manifest(tmp_path):
    manifest = tmp_path / "text.jsonl"
    manifest.write_text(json.dumps(demo_rows("devel")[0]) + "\n")
    r = subprocess.run([sys.executable, "pretrain.py", "--recognise", "mini", "--manifest", str(manifest)],
                       cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 2 and f"{manifest}: no recordings" in r.stderr


def test_word_error_rate_counts_substitutions_insertions_and_deletions():
    assert pt.word_error_rate(["a b c d"], ["a x c"]) == 2 / 4
    assert pt.word_error_rate(["a b", "c"], ["a b", "c d e"]) == 2 / 3


def test_bad_spec_exits_2_naming_the_file_and_field(tmp_path):
    bad = tmp_path / "corpus.json"
    spec = json.loads(pt.SPEC.read_text(encoding="utf-8"))
    spec["languages"]["en"]["templates"].append("call {nobody} now")
    bad.write_text(json.dumps(spec), encoding="utf-8")
    r = subprocess.run([sys.executable, "pretrain.py", "--out", str(tmp_path / "run"), "--spec", str(bad)],
                       cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 2
    assert f"{bad}: languages.en.templates[" in r.stderr and "{nobody}" in r.stderr
    assert not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("pretrain") / "run"
    cmd = [sys.executable, "pretrain.py", "--out", str(out), "--sentences-per-language", "16", "--listen-steps", "2",
           "--listen-batch", "4", "--steps", "3", "--batch", "4", "--save-every", "2"]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    return out, cmd


def assert_transformers_logits_equal_ours(hf, feats: np.ndarray, n: int, text: str) -> None:
    """transformers' Qwen2AudioForConditionalGeneration and our Flax model, loaded from the directory hf, give the
    same logits (1e-4) on a recording (log-mel feats, n real frames) asked to be repeated, and its transcript."""
    import jax.numpy as jnp
    import torch
    from transformers import Qwen2AudioForConditionalGeneration
    from model.checkpoint import load_hf
    from model.config import Qwen2AudioConfig
    from model.qwen2_audio import forward
    tok = P.load_tokenizer(hf)
    hf_config, params = load_hf(hf)
    config = Qwen2AudioConfig.from_hf_dict(hf_config)
    assert config.audio_token_index == P.special_ids(tok).audio  # the ids travel with the checkpoint
    assert config.text.vocab_size == tok.get_vocab_size()
    ids = P.encode_prompt(tok, P.build_prompt(None, audio=True, instruction="Repeat the utterance."),
                          P.num_audio_tokens(n)) + tok.encode(text).ids
    ids = np.asarray([ids])
    full = np.zeros((1, 128, 3000), np.float32)  # frames past the bucket are masked keys: any value will do
    full[:, :, :feats.shape[1]] = feats
    torch_model = Qwen2AudioForConditionalGeneration.from_pretrained(str(hf)).eval()
    with torch.no_grad():
        ref = torch_model(input_ids=torch.as_tensor(ids), attention_mask=torch.ones(ids.shape, dtype=torch.long),
                          input_features=torch.as_tensor(full),
                          feature_attention_mask=torch.as_tensor((np.arange(3000) < n)[None].astype(np.int64))
                          ).logits.numpy()
    ours = forward(params, config, jnp.asarray(ids), jnp.ones(ids.shape, jnp.int32), jnp.asarray(feats[None]),
                   jnp.asarray([n]))
    np.testing.assert_allclose(np.asarray(ours), ref, atol=1e-4, rtol=0)


@pytest.mark.slow
def test_short_pretraining_writes_a_checkpoint_transformers_loads_with_our_logits(short_run):
    out, _ = short_run
    # a real example of the run's corpus: a recording and what it says
    rows = [json.loads(line) for line in (out / "corpus" / "sentences.jsonl").read_text().splitlines()][1:]
    with np.load(out / "corpus" / "features.npz") as z:
        feats = z["features"][:, z["offsets"][0]:z["offsets"][1]].astype(np.float32)
    assert_transformers_logits_equal_ours(out / "hf", feats, rows[0]["n_frames"], rows[0]["text"])
    meta = json.loads((out / "meta.json").read_text())
    assert meta["steps"] == 3 and 0.0 <= meta["heldout_wer"] and len(meta["examples"]) > 0
    record = json.loads((out / "hf" / "pretraining.json").read_text())
    assert record["finetune_defaults"] == pt.FINETUNE_DEFAULTS and record["command"].startswith("python pretrain.py")


def test_the_shipped_miniature_loads_in_transformers_with_our_logits_on_a_demo_recording():
    from model.config import SHIPPED
    row = next(r for r in demo_rows("test") if r["audio"])
    feats, n = P.log_mel_features(P.load_audio(str(pt.DEMO_DIR / row["audio"])))
    assert_transformers_logits_equal_ours(SHIPPED["mini"], feats, int(n), row["text"])


def test_the_shipped_miniature_fits_the_repository_budget_and_states_its_finetuning_defaults():
    from model.config import SHIPPED
    assert sum(f.stat().st_size for f in SHIPPED["mini"].iterdir()) < 25 * 2**20
    record = json.loads((SHIPPED["mini"] / "pretraining.json").read_text())
    assert record["finetune_defaults"] == pt.FINETUNE_DEFAULTS
    assert record["command"] == "python pretrain.py --out runs/pretrain --hf-out models/mini"


@pytest.mark.slow
def test_rerun_with_other_settings_is_refused_naming_the_state_file(short_run):
    out, cmd = short_run
    r = subprocess.run(cmd[:-4] + ["--batch", "8", "--save-every", "2"], cwd=REPO, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 2
    assert f"{out / 'listen.msgpack'}: was written with" in r.stderr

