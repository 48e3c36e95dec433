"""Pretrain the miniature Qwen2-Audio from random weights, on a corpus this script synthesises.

    python pretrain.py --out runs/pretrain        # corpus, tokenizer, two phases, OUT/hf (resumable: rerun it)
    python pretrain.py --out runs/pretrain --hf-out models/mini    # rebuild the shipped miniature (`--model mini`)
    python pretrain.py --recognise mini --manifest data/demo/devel.jsonl  # how well a model hears those recordings

Stages, each cached in OUT and skipped when its output exists (a rerun resumes where a killed run stopped):
  1. sentences   OUT/corpus/sentences.jsonl: data/pretrain/corpus.json's templates filled with slot values, plus
                 "word strings" (random sequences of the domain's words). A sentence equal to a demo utterance
                 (data/demo/*.jsonl, every split) is dropped, so the demo's devel/test texts are never seen.
  2. audio       OUT/corpus/features.npz: each sentence spoken once by espeak-ng (a random voice and speed of its
                 language), as Whisper log-mel features.
  3. tokenizer   OUT/tokenizer/tokenizer.json: a byte-level BPE with Qwen2's pre-tokenizer, all 256 bytes (any
                 text still tokenizes), merges learned on the corpus text, the six special tokens appended.
  4. listen      OUT/listen.msgpack (every --save-every steps): the model (MINI_AUDIO and MINI_TEXT below, its
                 vocabulary and special ids from the tokenizer) from random weights; only the alignment loss below,
                 on recordings: the audio path learns to recognise speech first, as Qwen2-Audio starts from a
                 Whisper encoder trained on speech recognition.
  5. chat        OUT/chat.msgpack: the tasks below plus the alignment loss, every parameter trained.
  6. export      OUT/hf (or --hf-out): a Hugging Face directory (config.json, model.safetensors, tokenizer,
                 processor files) that transformers' Qwen2AudioForConditionalGeneration and model/checkpoint.py
                 load, with pretraining.json (this run's figures, and the fine-tuning defaults train.py takes).

The tasks. Every example is a Qwen2-Audio chat: the user turn is either a recording (audio modality) or the
sentence's text (text modality), followed by an instruction; the loss is on the assistant's answer. The same
instructions are asked in both modalities with the same answers, so the decoder is trained to treat the
projected audio as it treats the text it transcribes: that is what lets a text-only fine-tune transfer to speech
(the premise of the paper, which Qwen2-Audio's multi-task pretraining provides at scale).
  repeat      "Repeat the utterance."  -> the sentence (audio: speech recognition; text: copying)
  language    "Which language is this?" -> English / French
  first, last "What is the first (last) word?" -> that word
  count       "How many words are there?" -> the number, in digits
  continue    (text only) the first words of a sentence, "Continue the text." -> the rest (language modelling)
The alignment loss, on every recording: CTC between the projected audio tokens, read against the decoder's input
embedding table (logits = audio @ embed_tokens.T), and the sentence's text tokens. It pulls each projected audio
token towards the embedding of the text token it sounds like, so that the audio path speaks the text path's
language, and it gives the audio tower a gradient that does not wait for the decoder to learn to attend to it
(900 chat steps without it left a decoder that ignores the audio: held-out WER 1.34). It adds no parameter: the
exported model is a plain Qwen2-Audio.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import random
import re
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent
SPEC = REPO / "data" / "pretrain" / "corpus.json"
DEMO_DIR = REPO / "data" / "demo"
DEMO_SPLITS = ("train", "devel", "test")

# (name, instruction, modalities it is asked in, share of the examples of each modality)
TASKS = (
    ("repeat", "Repeat the utterance.", {"audio": 0.5, "text": 0.2}),
    ("language", "Which language is this?", {"audio": 0.1, "text": 0.1}),
    ("first", "What is the first word?", {"audio": 0.13, "text": 0.1}),
    ("last", "What is the last word?", {"audio": 0.13, "text": 0.1}),
    ("count", "How many words are there?", {"audio": 0.14, "text": 0.1}),
    ("continue", "Continue the text.", {"text": 0.4}),
)
# The miniature: Qwen2-Audio's architecture at 4.7M parameters (18 MiB in float32), so a CPU fine-tunes it in minutes.
# Its vocabulary size and special ids are not here: they are the trained tokenizer's (model_config).
MINI_AUDIO = dict(d_model=128, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=512, num_mel_bins=128,
                  max_source_positions=1500)
MINI_TEXT = dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=2048)
AUDIO_SHARE = 0.6  # of the examples of a batch; the rest are text-modality examples
# What train.py uses when fine-tuning the miniature with no --peak-lr / --global-batch (written into its
# pretraining.json): the paper's 5e-6 at batch 128 is a 7B model's; a 4.7M-parameter model needs a larger rate and
# more steps. Batch 4 gives the demo's 3 text-only epochs 237 steps; at batch 16 (60 steps) dev intent accuracy on
# transcripts stayed 0.0-0.3 at peak 1e-3 or 2e-3, at batch 4 it reached 0.78 (README, "The pretrained miniature").
# 3 epochs do not converge it: the oracle's test intent accuracy was 61.0 +- 15.1% at 3, 87.3 +- 3.5% at 5 and
# 89.0 +- 4.1% at 6 (5 seeds; docs/EXPERIMENTS.md section 4), so 5.
FINETUNE_DEFAULTS = {"peak_lr": 1e-3, "global_batch": 4, "epochs": 5}
HELDOUT = 32  # sentences per language kept out of training: the speech-recognition check at the end
CTC_WEIGHT = 1.0  # of the alignment loss (per audio token: starts near ln(vocab), as the answer loss does)
SYNTH_THREADS = 2  # espeak-ng processes at a time


class InputError(ValueError):
    """Bad input found before any long work: main() prints it and exits 2."""


# ----------------------------------------------------------------------------------------------------------------
# 1. Sentences


def normalise(text: str) -> str:
    """The form in which sentences are compared with the demo's: lower case, single spaces."""
    return " ".join(text.lower().split())


def load_spec(path: Path) -> dict:
    """The corpus spec, with every field pretrain.py reads checked (file: field: what was expected)."""
    from prepare import template_slots
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{path}: not found") from None
    except json.JSONDecodeError as e:
        raise InputError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from None
    for key, kind in (("seed", int), ("sentences_per_language", int), ("word_string_share", float),
                      ("word_string_length", list), ("tokenizer_vocab_size", int), ("speeds", list),
                      ("languages", dict), ("general_text", list)):
        if not isinstance(spec.get(key), (int, float) if kind is float else kind):
            raise InputError(f"{path}: field {key!r} must be {kind.__name__}, got {spec.get(key)!r}")
    if spec["tokenizer_vocab_size"] < 256 + 1:
        raise InputError(f"{path}: tokenizer_vocab_size must exceed 256 (the byte alphabet)")
    for lang, ls in spec["languages"].items():
        for key in ("name", "voices", "values", "templates"):
            if key not in ls:
                raise InputError(f"{path}: languages.{lang}.{key} is missing")
        for k, template in enumerate(ls["templates"]):
            for slot in template_slots(template):
                if slot not in ls["values"]:
                    raise InputError(f"{path}: languages.{lang}.templates[{k}] {template!r} uses {{{slot}}}, "
                                     f"which languages.{lang}.values lacks")
    return spec


def demo_texts(demo_dir: Path) -> set[str]:
    """The normalised text of every demo utterance, all splits: the sentences pretraining must not contain."""
    texts = set()
    for split in DEMO_SPLITS:
        path = demo_dir / f"{split}.jsonl"
        if not path.is_file():
            raise InputError(f"{path}: not found (the demo corpus is needed to exclude its utterances)")
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    texts.add(normalise(json.loads(line)["text"]))
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise InputError(f"{path}:{lineno}: expected a JSON object with a 'text' field") from None
    return texts


def lexicon(lang_spec: dict, demo_lang_spec: dict | None) -> list[str]:
    """The words of a language's templates and slot values, the demo domain's included (sorted: deterministic)."""
    words = set()
    for source in (lang_spec, demo_lang_spec or {}):
        templates = source.get("templates", [])
        templates = [t for ts in templates.values() for t in ts] if isinstance(templates, dict) else templates
        for text in [re.sub(r"\{\w+\}", " ", t) for t in templates] + \
                    [v for vs in source.get("values", {}).values() for v in vs]:
            words.update(text.split())
    return sorted(words)


def build_sentences(spec: dict, excluded: set[str], demo_spec: dict | None, per_language: int) -> list[dict]:
    """Distinct sentences per language, seeded: template fillings, then word strings up to `per_language`.
    Any sentence in `excluded` (normalised) is rejected, whatever produced it."""
    from prepare import template_slots
    rng = random.Random(spec["seed"])
    lo, hi = spec["word_string_length"]
    out = []
    for lang, ls in spec["languages"].items():
        seen: set[str] = set()

        def add(text: str, source: str) -> None:
            key = normalise(text)
            if key not in seen and key not in excluded:
                seen.add(key)
                out.append({"lang": lang, "text": text, "source": source})

        n_templates = round(per_language * (1 - spec["word_string_share"]))
        for _ in range(50 * n_templates):  # rejection sampling of distinct fillings
            if len(seen) >= n_templates:
                break
            template = rng.choice(ls["templates"])
            add(template.format(**{s: rng.choice(ls["values"][s]) for s in template_slots(template)}),
                "template")
        words = lexicon(ls, (demo_spec or {}).get("languages", {}).get(lang))
        for _ in range(50 * per_language):
            if len(seen) >= per_language:
                break
            add(" ".join(rng.choice(words) for _ in range(rng.randint(lo, hi))), "words")
    return out


# ----------------------------------------------------------------------------------------------------------------
# 2. Audio


def synthesise(sentences: list[dict], spec: dict, seed: int) -> list[np.ndarray]:
    """Log-mel features [128, T] (float16, T the 1 s bucket) of each sentence spoken once with espeak-ng."""
    from model import processor as P
    from prepare import speak
    from concurrent.futures import ThreadPoolExecutor
    rng = random.Random(seed)
    for s in sentences:  # drawn first, in order: the same voices whatever the threads do
        s["voice"] = rng.choice(spec["languages"][s["lang"]]["voices"])
        s["speed"] = rng.choice(spec["speeds"])

    def one(s):
        features, n_frames = P.log_mel_features(speak(s["text"], s["voice"], s["speed"], P.SAMPLE_RATE))
        s["n_frames"] = int(n_frames)
        return features.astype(np.float16)

    with ThreadPoolExecutor(SYNTH_THREADS) as pool:  # espeak-ng runs as a subprocess: threads overlap it
        return list(pool.map(one, sentences))


# ----------------------------------------------------------------------------------------------------------------
# 3. Tokenizer


def train_tokenizer(texts: list[str], vocab_size: int):
    """Byte-level BPE on `texts` with Qwen2's normaliser and pre-tokenizer; ids 0..255 are the 256 byte tokens, then
    the merges, then the special tokens in Qwen2-Audio's order (<|endoftext|> first)."""
    from tokenizers import AddedToken, Tokenizer, pre_tokenizers, trainers
    from tokenizers.models import BPE
    from model import processor as P
    tok = P._qwen2_pipeline(Tokenizer(BPE(fuse_unk=False)))
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())  # all 256 bytes, so nothing is ever unknown
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=alphabet, show_progress=False,
                                  special_tokens=[])
    tok.train_from_iterator(texts, trainer)
    missing = [c for c in alphabet if tok.token_to_id(c) is None]
    if missing:
        raise RuntimeError(f"the trained tokenizer lacks {len(missing)} byte tokens")
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in P.SPECIAL_TOKENS])
    return tok


def tokenizer_texts(spec: dict, sentences: list[dict]) -> list[str]:
    """What the BPE merges are learned on: the sentences, the general text, every prompt the model will read
    (chat frame, task instructions, the SLU instruction and answer keys of the fine-tune)."""
    from model import processor as P
    from model.answer import render_answer
    frame = P.build_prompt(None, audio=True).replace(P.AUDIO_BOS + P.AUDIO_TOKEN + P.AUDIO_EOS, "")
    for t in P.SPECIAL_TOKENS:
        frame = frame.replace(t, " ")
    extra = [frame, P.INSTRUCTION, render_answer("weather", "query", [{"type": "place", "filler": "paris"}])]
    extra += [instruction for _, instruction, _ in TASKS] + [ls["name"] for ls in spec["languages"].values()]
    return [s["text"] for s in sentences] + spec["general_text"] + extra * 20


# ----------------------------------------------------------------------------------------------------------------
# 4. Examples and training


def model_config(tok):
    """The miniature's architecture (MINI_AUDIO, MINI_TEXT) with the tokenizer's vocabulary size and special ids."""
    from model import processor as P
    from model.config import AudioConfig, Qwen2AudioConfig, TextConfig
    ids = P.special_ids(tok)
    text = TextConfig(**MINI_TEXT, vocab_size=tok.get_vocab_size(), bos_token_id=None, eos_token_id=ids.im_end,
                      pad_token_id=ids.pad)
    return Qwen2AudioConfig(audio=AudioConfig(**MINI_AUDIO), text=text, audio_token_index=ids.audio)


def task_answer(task: str, text: str, lang_name: str, rng: random.Random) -> tuple[str | None, str]:
    """(the text shown in the user turn, or None for the sentence / its recording; the answer) of one task."""
    words = text.split()
    if task == "repeat":
        return None, text
    if task == "language":
        return None, lang_name
    if task == "first":
        return None, words[0]
    if task == "last":
        return None, words[-1]
    if task == "count":
        return None, str(len(words))
    if task == "continue":
        cut = rng.randint(1, max(1, len(words) - 1))
        return " ".join(words[:cut]), " ".join(words[cut:])
    raise ValueError(f"unknown task {task!r}")


def make_example(sentence: dict, features: np.ndarray | None, task: str, tok, spec: dict, rng: random.Random):
    """One chat example (train.Example): the recording (features given) or a text, the task's instruction, its
    answer and <|im_end|>."""
    from model import processor as P
    from train import Example, encode_text
    instruction = next(ins for name, ins, _ in TASKS if name == task)
    shown, answer = task_answer(task, sentence["text"], spec["languages"][sentence["lang"]]["name"], rng)
    if features is not None:
        n_frames = sentence["n_frames"]
        prompt = P.encode_prompt(tok, P.build_prompt(None, audio=True, instruction=instruction),
                                 n_audio_tokens=P.num_audio_tokens(n_frames))
        feats = features.astype(np.float32)
    else:
        prompt = P.encode_prompt(tok, P.build_prompt(shown or sentence["text"], audio=False,
                                                     instruction=instruction))
        feats, n_frames = None, 0
    ids = list(prompt) + encode_text(tok, answer) + [P.special_ids(tok).im_end]
    return Example(ids, len(prompt), feats, int(n_frames))


def draw_batch(step: int, seed: int, batch: int, train_idx: list[int], sentences, feats, tok, spec):
    """(examples, the text spoken in each example's recording or None) of optimizer step `step`: a function of
    (seed, step) alone, so a resumed run sees the same batches as an uninterrupted one."""
    rng = random.Random(f"{seed}-{step}")
    n_audio = round(batch * AUDIO_SHARE)
    out, spoken = [], []
    for j in range(batch):
        modality = "audio" if j < n_audio else "text"
        tasks = [(name, shares[modality]) for name, _, shares in TASKS if modality in shares]
        task = rng.choices([t for t, _ in tasks], weights=[w for _, w in tasks])[0]
        i = rng.choice(train_idx)
        if task == "continue" and len(sentences[i]["text"].split()) < 2:
            task = "repeat"
        out.append(make_example(sentences[i], feats[i] if modality == "audio" else None, task, tok, spec, rng))
        spoken.append(sentences[i]["text"] if modality == "audio" else None)
    return out, spoken


def collate_batch(examples, spoken, tok, pad_id: int, answer_len: int) -> dict:
    """train.collate's arrays plus the CTC targets: ctc_labels [B, answer_len] (the spoken text's tokens) and
    ctc_label_paddings (1 past them, and on rows without a recording)."""
    from model.processor import audio_bucket, seq_bucket
    from train import collate
    seq_len = seq_bucket(max(len(ex.ids) for ex in examples))
    frames = max([ex.features.shape[1] for ex in examples if ex.features is not None], default=0)
    n_frames = audio_bucket(frames) if frames else None
    out = collate(examples, seq_len, n_frames, min(answer_len, seq_len), pad_id=pad_id)
    return {**out, **ctc_targets(spoken, tok, answer_len)}


def ctc_targets(texts: list[str | None], tok, label_len: int) -> dict:
    """ctc_labels [B, label_len] (the token ids of each spoken text) and ctc_label_paddings (1 past them, and on the
    rows whose text is None: no recording, no alignment loss)."""
    labels = np.zeros((len(texts), label_len), np.int32)
    paddings = np.ones((len(texts), label_len), np.float32)
    for r, text in enumerate(texts):
        if text is not None:
            ids = tok.encode(text, add_special_tokens=False).ids
            labels[r, :len(ids)], paddings[r, :len(ids)] = ids, 0.0
    return {"ctc_labels": labels, "ctc_label_paddings": paddings}


def alignment_logits(params, config, features, feature_lengths):
    """[B, T_audio, V]: the projected audio tokens read against the decoder's input embedding table."""
    from model.qwen2_audio import AudioEncoder, Projector
    audio = AudioEncoder(config).apply({"params": params["audio_tower"]}, features, feature_lengths)
    audio = Projector(config).apply({"params": params["multi_modal_projector"]}, audio)
    return audio @ params["language_model"]["embed_tokens"]["embedding"].T


def alignment_loss(params, config, batch, blank_id: int):
    """CTC of the spoken text under audio-token logits read against the input embeddings (see the docstring):
    (summed over the recordings, their audio-token count)."""
    import jax.numpy as jnp
    import optax
    from model.processor import num_audio_tokens
    logits = alignment_logits(params, config, batch["input_features"], batch["feature_lengths"])
    n_audio = jnp.maximum(num_audio_tokens(batch["feature_lengths"]), 0)
    logit_paddings = (jnp.arange(logits.shape[1])[None] >= n_audio[:, None]).astype(jnp.float32)
    per_row = optax.ctc_loss(logits, logit_paddings, batch["ctc_labels"], batch["ctc_label_paddings"],
                             blank_id=blank_id)
    has_audio = batch["feature_lengths"] > 0
    return jnp.sum(jnp.where(has_audio, per_row, 0.0)), jnp.sum(1.0 - logit_paddings)


def make_step(config, tx, blank_id: int):
    import jax
    import jax.numpy as jnp
    import optax
    from train import answer_loss

    @jax.jit
    def step(params, opt_state, batch):
        def loss_fn(p):
            total, count = answer_loss(p, config, batch, jnp.float32, "none")
            ctc, n_audio = alignment_loss(p, config, batch, blank_id)
            answer, align = total / jnp.maximum(count, 1.0), ctc / jnp.maximum(n_audio, 1.0)
            return answer + CTC_WEIGHT * align, (answer, align)
        (_, (answer, align)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, answer, align, optax.global_norm(grads)

    return step


def draw_listen(step: int, seed: int, batch: int, train_idx: list[int]) -> list[int]:
    """The sentences of listening step `step` (a function of seed and step alone, as draw_batch)."""
    rng = random.Random(f"{seed}-listen-{step}")
    return [rng.choice(train_idx) for _ in range(batch)]


def collate_listen(idx: list[int], sentences, feats, tok, label_len: int) -> dict:
    """Recordings and the token ids of what they say (the arrays alignment_loss reads)."""
    from model.processor import audio_bucket
    T = audio_bucket(max(feats[i].shape[1] for i in idx))
    features = np.zeros((len(idx), 128, T), np.float32)
    for r, i in enumerate(idx):
        features[r, :, :feats[i].shape[1]] = feats[i]
    return {"input_features": features,
            "feature_lengths": np.array([sentences[i]["n_frames"] for i in idx], np.int32),
            **ctc_targets([sentences[i]["text"] for i in idx], tok, label_len)}


def make_listen_step(config, tx, blank_id: int):
    """The listening phase's step: the alignment loss alone (only the audio tower, the projector and the input
    embeddings get gradients), as Qwen2-Audio starts from a Whisper encoder already trained to recognise speech."""
    import jax
    import jax.numpy as jnp
    import optax

    @jax.jit
    def step(params, opt_state, batch):
        def loss_fn(p):
            ctc, n_audio = alignment_loss(p, config, batch, blank_id)
            return ctc / jnp.maximum(n_audio, 1.0)
        align, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, jnp.float32(0), align, optax.global_norm(grads)

    return step


def train_phase(name: str, steps: int, make_batch, make_fn, params, state_path: Path, settings: dict, args):
    """Run one phase (its own AdamW and schedule) from its last checkpoint in state_path, saving every
    --save-every steps and at the end. Returns (params, log), or (params, None) when state_path was written with
    other settings (the error is printed)."""
    import jax
    from flax import serialization
    from model.manifest import atomic_write
    tx = make_optimizer(steps, args.peak_lr)
    opt_state = tx.init(params)
    start, log = 0, []
    if state_path.is_file():
        state = serialization.msgpack_restore(state_path.read_bytes())
        if json.loads(state["settings"]) != settings:
            print(f"pretrain.py: error: {state_path}: was written with {state['settings']}, this run asks for "
                  f"{json.dumps(settings)}; use another --out", file=sys.stderr)
            return params, None
        params = serialization.from_state_dict(params, state["params"])
        opt_state = serialization.from_state_dict(opt_state, state["opt_state"])
        start, log = int(state["step"]), json.loads(state["log"])
        if start < steps:
            print(f"pretrain.py: {name}: resuming at step {start}", flush=True)

    def save(step):
        blob = serialization.msgpack_serialize({
            "params": serialization.to_state_dict(params), "opt_state": serialization.to_state_dict(opt_state),
            "step": step, "log": json.dumps(log), "settings": json.dumps(settings)})
        atomic_write(state_path, lambda tmp: Path(tmp).write_bytes(blob))

    step_fn = make_fn(tx)
    t0, window = time.time(), []
    for step in range(start, steps):
        params, opt_state, loss, align, gnorm = step_fn(params, opt_state, make_batch(step))
        window.append((float(loss), float(align)))
        if (step + 1) % 25 == 0 or step + 1 == steps:
            loss, align = np.mean(window, axis=0)
            log.append({"phase": name, "step": step + 1, "loss": float(loss), "alignment_loss": float(align),
                        "seconds": round(time.time() - t0, 1)})
            print(f"{name} step {step + 1}/{steps} loss {loss:.3f} alignment {align:.3f} "
                  f"grad_norm {float(gnorm):.2f} ({time.time() - t0:.0f} s)", flush=True)
            window = []
        if (step + 1) % args.save_every == 0 and step + 1 < steps:
            save(step + 1)
    if start < steps:
        save(steps)
    jax.block_until_ready(params)
    return params, log


def make_optimizer(steps: int, peak_lr: float):
    import optax
    warmup = max(1, min(200, steps // 10))
    schedule = optax.warmup_cosine_decay_schedule(0.0, peak_lr, warmup, max(steps, warmup + 1), peak_lr * 0.05)
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, b2=0.98, weight_decay=0.01))


# ----------------------------------------------------------------------------------------------------------------
# 5. Evaluation: speech recognition on held-out sentences


def recording_batches(sentences, feats, idx: list[int], batch: int):
    """(ids, features [b, 128, T], feature_lengths [b]) of the recordings of sentences[idx], `batch` at a time, T the
    longest of all (one shape for every batch: one compilation); the last batch is filled up with the first
    recordings, so a caller keeps the first len(idx) of its outputs."""
    T = max(feats[i].shape[1] for i in idx)
    for start in range(0, len(idx), batch):
        chunk = idx[start:start + batch] + idx[:batch - len(idx[start:start + batch])]
        x = np.zeros((len(chunk), 128, T), np.float32)
        for r, i in enumerate(chunk):
            x[r, :, :feats[i].shape[1]] = feats[i]
        yield chunk, x, np.array([sentences[i]["n_frames"] for i in chunk], np.int32)


def transcribe(params, config, tok, sentences, feats, idx: list[int], batch: int = 32) -> list[str]:
    """Greedy "Repeat the utterance." answers for the recordings of sentences[idx] (model/generate.py)."""
    import jax.numpy as jnp
    from model import processor as P
    from model.generate import greedy_search
    ids_of = P.special_ids(tok)
    prompt = P.build_prompt(None, audio=True, instruction=TASKS[0][1])
    prompts = {i: P.encode_prompt(tok, prompt, n_audio_tokens=P.num_audio_tokens(sentences[i]["n_frames"]))
               for i in idx}
    S = max(len(p) for p in prompts.values())  # one shape for every chunk: one compilation
    out = []
    for chunk, x, lengths in recording_batches(sentences, feats, idx, batch):
        ids = np.full((len(chunk), S), ids_of.pad, np.int32)
        mask = np.zeros((len(chunk), S), np.int32)
        for r, p in enumerate(prompts[i] for i in chunk):
            ids[r, S - len(p):], mask[r, S - len(p):] = p, 1  # left padding
        gen = greedy_search(params, config, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(x),
                            jnp.asarray(lengths), max_new_tokens=48, eos_ids=ids_of.eos, pad_id=ids_of.pad,
                            dtype=jnp.float32)
        tokens, n = np.asarray(gen.tokens), np.asarray(gen.lengths)
        out += [tok.decode(tokens[r, :n[r]].tolist(), skip_special_tokens=True).strip() for r in range(len(chunk))]
    return out[:len(idx)]


def ctc_read(params, config, tok, sentences, feats, idx: list[int], batch: int = 32) -> list[str]:
    """What the audio path hears without the decoder: the greedy path of the alignment loss's logits (projected audio
    tokens against the input embeddings; the most likely token per audio token, repeats merged, CTC's blank
    <|endoftext|> dropped), for the recordings of sentences[idx]."""
    import jax
    import jax.numpy as jnp
    from model import processor as P
    best_tokens = jax.jit(lambda x, lengths: jnp.argmax(alignment_logits(params, config, x, lengths), axis=-1))

    blank, out = P.special_ids(tok).pad, []
    for _, x, lengths in recording_batches(sentences, feats, idx, batch):
        best = np.asarray(best_tokens(jnp.asarray(x), jnp.asarray(lengths)))
        for r, n_frames in enumerate(lengths):
            path = best[r, :int(P.num_audio_tokens(n_frames))]
            ids = [int(t) for k, t in enumerate(path) if (k == 0 or t != path[k - 1]) and t != blank]
            out.append(tok.decode(ids, skip_special_tokens=True).strip())
    return out[:len(idx)]


def recognise(model: str, manifest: str, max_rows: int | None) -> dict:
    """--recognise: how well a model's audio path hears a manifest's recordings, before any fine-tuning. Text-only
    training can only carry over to speech that the model recognises, so this is the first thing to measure of a
    pretraining: word error rates of the "Repeat the utterance." answers (audio path and decoder) and of ctc_read
    (audio path alone)."""
    from model.checkpoint import load_hf
    from model.config import Qwen2AudioConfig, resolve_model
    from model.manifest import read_manifest
    from model import processor as P
    model_dir = resolve_model(model)
    hf_config, params = load_hf(model_dir)
    config, tok = Qwen2AudioConfig.from_hf_dict(hf_config), P.load_tokenizer(model_dir)
    rows = [r for r in read_manifest(manifest, check_audio_exists=True) if r["audio"] is not None][:max_rows]
    if not rows:
        raise InputError(f"{manifest}: no recordings (rows with audio) to recognise")
    sentences, feats = [], []
    for r in rows:
        features, n_frames = P.log_mel_features(P.load_audio(r["audio"]))
        sentences.append({"text": r["text"], "n_frames": int(n_frames)})
        feats.append(features)
    idx, refs = list(range(len(rows))), [r["text"] for r in rows]
    hyps, reads = transcribe(params, config, tok, sentences, feats, idx), ctc_read(params, config, tok, sentences,
                                                                                   feats, idx)
    return {"model": model, "manifest": manifest, "recordings": len(rows),
            "wer": round(word_error_rate(refs, hyps), 4),
            "exact": round(float(np.mean([normalise(a) == normalise(b) for a, b in zip(refs, hyps)])), 4),
            "ctc_wer": round(word_error_rate(refs, reads), 4),
            "examples": [{"text": a, "repeat": b, "ctc": c} for a, b, c in list(zip(refs, hyps, reads))[:5]]}


def word_error_rate(refs: list[str], hyps: list[str]) -> float:
    """Word-level Levenshtein distance summed over the pairs, over the reference word count."""
    errors = words = 0
    for ref, hyp in zip(refs, hyps):
        r, h = ref.split(), hyp.split()
        d = list(range(len(h) + 1))
        for i in range(1, len(r) + 1):
            prev, d[0] = d[0], i
            for j in range(1, len(h) + 1):
                prev, d[j] = d[j], min(d[j] + 1, d[j - 1] + 1, prev + (r[i - 1] != h[j - 1]))
        errors, words = errors + d[len(h)], words + len(r)
    return errors / max(words, 1)


# ----------------------------------------------------------------------------------------------------------------
# Driver


def parse_args(argv):
    p = argparse.ArgumentParser(prog="pretrain.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", help="run directory (corpus cache, state, hf/ export); rerun resumes")
    p.add_argument("--hf-out", default=None,
                   help="where the Hugging Face directory goes (default OUT/hf; models/mini is the shipped one)")
    p.add_argument("--spec", default=str(SPEC), help="corpus spec (default data/pretrain/corpus.json)")
    p.add_argument("--demo-dir", default=str(DEMO_DIR), help="the demo corpus whose utterances are excluded")
    p.add_argument("--listen-steps", type=int, default=3000,
                   help="steps of the listening phase (the alignment loss alone, on recordings)")
    p.add_argument("--listen-batch", type=int, default=32, help="recordings per listening step")
    p.add_argument("--steps", type=int, default=1000, help="steps of the chat phase (the tasks + alignment)")
    p.add_argument("--batch", type=int, default=16, help="examples per chat step")
    p.add_argument("--peak-lr", type=float, default=2e-3)
    p.add_argument("--save-every", type=int, default=100, help="steps between resumable checkpoints")
    p.add_argument("--sentences-per-language", type=int, default=None,
                   help="override the spec's count (a shortened run, e.g. the tests)")
    p.add_argument("--seed", type=int, default=0, help="parameter init and batch draws")
    p.add_argument("--recognise", metavar="MODEL", default=None,
                   help="instead of pretraining: how well MODEL (a directory or 'mini') recognises --manifest's "
                        "recordings; prints one JSON object (word error rates of 'Repeat the utterance.' and of the "
                        "audio path alone)")
    p.add_argument("--manifest", default=None, help="--recognise: the manifest whose recordings are heard")
    p.add_argument("--max-rows", type=int, default=None, help="--recognise: the first N recordings only")
    args = p.parse_args(argv)
    if args.recognise is not None and args.manifest is None:
        p.error("--recognise needs --manifest (whose recordings to recognise)")
    if args.max_rows is not None and args.max_rows < 1:
        p.error(f"--max-rows must be >= 1, got {args.max_rows}")
    if args.recognise is None and args.out is None:
        p.error("--out is required (or --recognise MODEL --manifest M)")
    if args.listen_steps < 0:
        p.error(f"--listen-steps must be >= 0, got {args.listen_steps}")
    for name in ("steps", "batch", "listen_batch", "save_every"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.sentences_per_language is not None and args.sentences_per_language < 4:
        p.error(f"--sentences-per-language must be >= 4 (a quarter is held out), got {args.sentences_per_language}")
    return args


def fingerprint(spec: dict, per_language: int, demo: set[str]) -> str:
    """What the cached corpus depends on; a different one means the cache is stale."""
    blob = json.dumps([spec, per_language, sorted(demo)], sort_keys=True, ensure_ascii=False).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def build_corpus(out: Path, spec: dict, per_language: int, demo: set[str], demo_spec: dict | None):
    """Stages 1-2, cached in OUT/corpus (rebuilt when the spec, count or demo texts change)."""
    from model.manifest import atomic_write, atomic_write_text
    corpus = out / "corpus"
    key = fingerprint(spec, per_language, demo)
    sentences_path, feats_path = corpus / "sentences.jsonl", corpus / "features.npz"
    if sentences_path.is_file() and feats_path.is_file():
        rows = [json.loads(line) for line in sentences_path.read_text(encoding="utf-8").splitlines()]
        if rows and rows[0].get("fingerprint") == key:
            with np.load(feats_path) as z:
                flat, offsets = z["features"], z["offsets"]
            feats = [flat[:, offsets[k]:offsets[k + 1]] for k in range(len(rows) - 1)]
            return rows[1:], feats
    t0 = time.time()
    sentences = build_sentences(spec, demo, demo_spec, per_language)
    print(f"pretrain.py: {len(sentences)} sentences; speaking them with espeak-ng ...", flush=True)
    feats = synthesise(sentences, spec, spec["seed"])
    offsets = np.cumsum([0] + [f.shape[1] for f in feats])

    def write_npz(tmp):
        with open(tmp, "wb") as f:
            np.savez(f, features=np.concatenate(feats, axis=1), offsets=offsets)
    atomic_write(feats_path, write_npz)
    header = {"fingerprint": key, "sentences": len(sentences)}
    atomic_write_text(sentences_path, "".join(json.dumps(r, ensure_ascii=False) + "\n"
                                              for r in [header] + sentences))
    print(f"pretrain.py: corpus built in {time.time() - t0:.0f} s", flush=True)
    return sentences, feats


def split_heldout(sentences: list[dict]) -> tuple[list[int], list[int]]:
    """(train, held-out) indices: HELDOUT sentences of each language (a quarter of a smaller corpus)."""
    held = []
    for lang in dict.fromkeys(s["lang"] for s in sentences):
        of_lang = [i for i, s in enumerate(sentences) if s["lang"] == lang]
        n = min(HELDOUT, len(of_lang) // 4)
        held += of_lang[::len(of_lang) // n][:n]  # spread out: templates and word strings alike
    held_set = set(held)
    return [i for i in range(len(sentences)) if i not in held_set], held


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.recognise is not None:
        from model.config import ConfigError
        from model.manifest import ManifestError
        try:
            print(json.dumps(recognise(args.recognise, args.manifest, args.max_rows), indent=1, ensure_ascii=False))
            return 0
        except (InputError, ManifestError, ConfigError, FileNotFoundError) as e:
            print(f"pretrain.py: error: {e}", file=sys.stderr)
            return 2
    try:
        spec = load_spec(Path(args.spec))
        demo = demo_texts(Path(args.demo_dir))
    except InputError as e:
        print(f"pretrain.py: error: {e}", file=sys.stderr)
        return 2
    demo_templates = Path(args.demo_dir) / "templates.json"
    demo_spec = json.loads(demo_templates.read_text(encoding="utf-8")) if demo_templates.is_file() else None
    per_language = args.sentences_per_language or spec["sentences_per_language"]
    out = Path(args.out)
    t_start = time.time()

    sentences, feats = build_corpus(out, spec, per_language, demo, demo_spec)
    train_idx, held_idx = split_heldout(sentences)

    import jax
    from tokenizers import Tokenizer
    from model import processor as P
    from model.checkpoint import save_hf
    from model.manifest import atomic_write_text
    from model.processor import round_up
    from model.qwen2_audio import init_params

    tok_path = out / "tokenizer" / "tokenizer.json"
    if tok_path.is_file():
        tok = Tokenizer.from_file(str(tok_path))
    else:
        tok = train_tokenizer(tokenizer_texts(spec, sentences), spec["tokenizer_vocab_size"])
        atomic_write_text(tok_path, tok.to_str())
    config = model_config(tok)
    ids_of = P.special_ids(tok)
    longest = max(len(tok.encode(s["text"], add_special_tokens=False).ids) for s in sentences)
    answer_len = round_up(longest + 1, 16)

    settings = {"batch": args.batch, "peak_lr": args.peak_lr, "seed": args.seed, "listen_batch": args.listen_batch,
                "corpus": fingerprint(spec, per_language, demo)}
    params = init_params(config, jax.random.PRNGKey(args.seed))
    blank = ids_of.pad  # <|endoftext|> never occurs in a transcript: CTC's blank

    def listen_batch(step):
        return collate_listen(draw_listen(step, args.seed, args.listen_batch, train_idx), sentences, feats, tok,
                              answer_len)

    def chat_batch(step):
        examples, spoken = draw_batch(step, args.seed, args.batch, train_idx, sentences, feats, tok, spec)
        return collate_batch(examples, spoken, tok, ids_of.pad, answer_len)

    phases = [("listen", args.listen_steps, listen_batch, lambda tx: make_listen_step(config, tx, blank)),
              ("chat", args.steps, chat_batch, lambda tx: make_step(config, tx, blank))]
    log = []
    for name, steps, make_batch, make_fn in phases:
        if steps:
            params, phase_log = train_phase(name, steps, make_batch, make_fn, params, out / f"{name}.msgpack",
                                            {**settings, "steps": steps}, args)
            if phase_log is None:
                return 2
            log += phase_log

    hyps = transcribe(params, config, tok, sentences, feats, held_idx)
    refs = [sentences[i]["text"] for i in held_idx]
    wer = word_error_rate(refs, hyps)
    exact = float(np.mean([normalise(r) == normalise(h) for r, h in zip(refs, hyps)]))
    meta = {"listen_steps": args.listen_steps, "listen_batch": args.listen_batch, "steps": args.steps,
            "batch": args.batch, "sentences": len(sentences), "heldout": len(held_idx),
            "heldout_wer": round(wer, 4), "heldout_exact": round(exact, 4), "final_loss": log[-1]["loss"],
            "seconds_this_run": round(time.time() - t_start, 1), "examples": list(zip(refs, hyps))[:6]}
    hf_out = Path(args.hf_out) if args.hf_out else out / "hf"
    record = {**{k: v for k, v in meta.items() if k not in ("examples", "seconds_this_run")},
              "command": "python pretrain.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "finetune_defaults": FINETUNE_DEFAULTS}
    save_hf(params, config.to_hf_dict(), hf_out, extra_files_from=tok_path.parent,
            extra_json={"pretraining.json": record})
    atomic_write_text(out / "meta.json", json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
    print(f"pretrain.py: held-out speech recognition WER {wer:.3f}, exact {exact:.3f}; wrote {hf_out} "
          f"({time.time() - t_start:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
