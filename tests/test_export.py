"""A `hf/` export is a checkpoint directory like the hub's Qwen/Qwen2-Audio-7B-Instruct: transformers' AutoProcessor
and Qwen2AudioForConditionalGeneration load it, and their greedy decoding of it equals infer.py's.

The export is built as train.py builds it from the `tiny` preset (real vocabulary): save_hf with the directory
holding the tokenizer.json it trained with. Weights are re-drawn at 0.2 std so the next-token distributions are
peaked (the 0.02 init is nearly uniform over 156k tokens, where float noise could flip a greedy choice).
"""
import json
import subprocess

import numpy as np
import pytest
from tokenizers import AddedToken, Tokenizer
from tokenizers.models import BPE
from transformers import AutoProcessor, Qwen2AudioForConditionalGeneration, WhisperFeatureExtractor

import infer
from model import processor as P
from model.checkpoint import checkpoint_layout, save_hf
from model.config import get_config

SPEECH = "wake me up at seven am"
TRANSCRIPT = "what is the weather like in paris tomorrow"


def tiny_params(hf_config: dict, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    params: dict = {}
    for leaf in checkpoint_layout(hf_config):
        node = params
        for key in leaf.path[:-1]:
            node = node.setdefault(key, {})
        node[leaf.path[-1]] = (0.2 * rng.standard_normal(leaf.flax_shape)).astype(np.float32)
    return params


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(hf_config, params, a directory holding only the tokenizer.json train.py writes for a preset)."""
    root = tmp_path_factory.mktemp("tiny")
    hf_config = get_config("tiny").to_hf_dict()
    P.load_tokenizer().save(str(root / "tokenizer.json"))
    return hf_config, tiny_params(hf_config), root


@pytest.fixture(scope="module")
def export(tiny, tmp_path_factory):
    hf_config, params, tokenizer_dir = tiny
    return save_hf(params, hf_config, tmp_path_factory.mktemp("run") / "hf", extra_files_from=tokenizer_dir)


@pytest.fixture(scope="module")
def speech_wav(tmp_path_factory):
    wav = tmp_path_factory.mktemp("audio") / "alarm.wav"
    subprocess.run(["espeak-ng", "-w", str(wav), SPEECH], check=True, capture_output=True)
    return wav


def chat(content: list[dict]) -> list[dict]:
    return [{"role": "system", "content": P.SYSTEM}, {"role": "user", "content": content}]


AUDIO_MESSAGES = chat([{"type": "audio", "audio_url": "alarm.wav"}, {"type": "text", "text": P.INSTRUCTION}])
TEXT_MESSAGES = chat([{"type": "text", "text": f"{TRANSCRIPT}\n{P.INSTRUCTION}"}])


def test_tiny_preset_export_holds_the_files_of_the_hub_checkpoint(export):
    assert sorted(p.name for p in export.iterdir()) == [
        "chat_template.jinja", "config.json", "generation_config.json", "model.safetensors",
        "preprocessor_config.json", "tokenizer.json", "tokenizer_config.json"]


def test_autoprocessor_loads_the_export_with_our_features_tokens_and_prompt(export, speech_wav):
    proc = AutoProcessor.from_pretrained(export)
    assert type(proc).__name__ == "Qwen2AudioProcessor"
    # The feature extractor is Whisper's 128-bin front end, the one model/processor.py reimplements.
    assert proc.feature_extractor.to_dict() == WhisperFeatureExtractor(feature_size=128,
                                                                       return_attention_mask=True).to_dict()
    tok = proc.tokenizer
    assert {t: tok.convert_tokens_to_ids(t) for t in P.SPECIAL_TOKENS} == P.SPECIAL_TOKENS
    assert tok.all_special_ids and set(tok.all_special_ids) <= set(P.SPECIAL_TOKENS.values())
    assert (tok.eos_token, tok.pad_token, tok.bos_token) == (P.IM_END, P.ENDOFTEXT, None)
    # The exported chat template is Qwen2AudioProcessor's own and renders exactly the prompts we train and
    # decode with.
    default_template = type(proc).default_chat_template.fget(proc)
    assert (export / "chat_template.jinja").read_text() == proc.chat_template == default_template
    assert proc.apply_chat_template(AUDIO_MESSAGES, add_generation_prompt=True, tokenize=False) == \
        P.build_prompt(None, audio=True)
    assert proc.apply_chat_template(TEXT_MESSAGES, add_generation_prompt=True, tokenize=False) == \
        P.build_prompt(TRANSCRIPT, audio=False)

    wave = P.load_audio(speech_wav)
    prompt = P.build_prompt(None, audio=True)
    ref = proc(text=prompt, audio=[wave], sampling_rate=P.SAMPLE_RATE)
    features, n_frames = P.log_mel_features(wave, out_frames=P.CHUNK_FRAMES)
    assert int(ref["feature_attention_mask"][0].sum()) == n_frames
    assert list(ref["input_ids"][0]) == P.encode_prompt(P.load_tokenizer(), prompt, P.num_audio_tokens(n_frames))
    np.testing.assert_allclose(ref["input_features"][0], features, atol=1e-4, rtol=0)


@pytest.mark.slow
def test_transformers_greedy_on_the_export_equals_infer_py_on_text_and_speech(export, speech_wav, tmp_path):
    import torch
    manifest = tmp_path / "test.jsonl"
    rows = [{"id": "speech", "lang": "en", "text": SPEECH, "audio": str(speech_wav), "scenario": "alarm",
             "action": "set", "entities": []},
            {"id": "text", "lang": "en", "text": TRANSCRIPT, "audio": None, "scenario": "weather",
             "action": "query", "entities": []}]
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "pred.jsonl"
    infer.main(infer.Args(model=str(export.parent), manifest=str(manifest), out=str(out), num_beams=1,
                          max_new_tokens=8, batch_size=1, dtype="float32"))
    ours = {r["id"]: r["generated"] for r in map(json.loads, out.read_text().splitlines())}

    # The way the hub model is used: processor + model from the directory, generate() with its defaults.
    proc = AutoProcessor.from_pretrained(export)
    model = Qwen2AudioForConditionalGeneration.from_pretrained(export).eval()
    assert model.generation_config.do_sample is False and model.generation_config.num_beams == 1
    ids = P.special_ids(P.load_tokenizer(export))
    assert model.generation_config.eos_token_id == [ids.im_end, ids.endoftext] == [151645, 151643]
    assert model.generation_config.pad_token_id == ids.pad == 151643
    theirs = {}
    for row_id, messages, audio in (("speech", AUDIO_MESSAGES, [P.load_audio(speech_wav)]),
                                    ("text", TEXT_MESSAGES, None)):
        prompt = proc.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        inputs = proc(text=prompt, audio=audio, sampling_rate=P.SAMPLE_RATE, return_tensors="pt")
        with torch.no_grad():
            ids = model.generate(**inputs, max_new_tokens=8)
        theirs[row_id] = proc.decode(ids[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert theirs == ours
    assert all(len(text) > 0 for text in ours.values())  # a random model still says something


def test_files_a_source_checkpoint_has_are_copied_and_only_the_missing_ones_generated(tiny, tmp_path):
    hf_config, params, tokenizer_dir = tiny
    source = tmp_path / "source"
    source.mkdir()
    (source / "tokenizer.json").write_bytes((tokenizer_dir / "tokenizer.json").read_bytes())
    sampling = {"do_sample": True, "temperature": 0.7, "top_p": 0.5, "eos_token_id": [151645, 151643]}
    (source / "generation_config.json").write_text(json.dumps(sampling))
    (source / "chat_template.json").write_text(json.dumps({"chat_template": "{{ messages }}"}))
    out = save_hf(params, hf_config, tmp_path / "hf", extra_files_from=source)
    for name in ("tokenizer.json", "generation_config.json", "chat_template.json"):
        assert (out / name).read_bytes() == (source / name).read_bytes(), name
    assert not (out / "chat_template.jinja").exists()  # the source's template is the one transformers must use
    assert (out / "preprocessor_config.json").is_file() and (out / "tokenizer_config.json").is_file()


def test_export_without_a_tokenizer_stays_a_bare_weights_directory(tiny, tmp_path):
    hf_config, params, _ = tiny
    out = save_hf(params, hf_config, tmp_path / "hf")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]


def compact_tokenizer_dir(path):
    """A checkpoint's own small vocabulary: two tokens, then the six special tokens at ids 2..7."""
    path.mkdir()
    tok = Tokenizer(BPE({"a": 0, "b": 1}, []))
    tok.add_special_tokens([AddedToken(t, special=True) for t in P.SPECIAL_TOKENS])
    tok.save(str(path / "tokenizer.json"))
    return path


def test_a_compact_vocabulary_gets_its_own_special_token_ids_in_the_generated_files(tiny, tmp_path):
    # a miniature checkpoint with a trimmed vocabulary runs through the same code: ids come from its tokenizer
    hf_config, params, _ = tiny
    source = compact_tokenizer_dir(tmp_path / "source")
    out = save_hf(params, {**hf_config, "audio_token_index": 5}, tmp_path / "hf", extra_files_from=source)
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert {d["content"]: int(i) for i, d in config["added_tokens_decoder"].items()} == {
        "<|endoftext|>": 2, "<|im_start|>": 3, "<|im_end|>": 4, "<|AUDIO|>": 5, "<|audio_bos|>": 6, "<|audio_eos|>": 7}
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [4, 2] and generation["pad_token_id"] == 2


def test_a_config_whose_audio_token_is_not_the_tokenizers_is_refused_before_anything_is_written(tiny, tmp_path):
    hf_config, params, _ = tiny
    source = compact_tokenizer_dir(tmp_path / "source")  # <|AUDIO|> is 5; the config says 151646
    with pytest.raises(ValueError, match=r"audio_token_index is 151646, but the tokenizer's <\|AUDIO\|> is 5"):
        save_hf(params, hf_config, tmp_path / "hf", extra_files_from=source)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["source"]


def test_a_missing_extra_files_directory_is_an_error_not_a_bare_export(tiny, tmp_path):
    hf_config, params, _ = tiny
    with pytest.raises(FileNotFoundError, match=r"extra_files_from: .*/no_such_dir is not a directory"):
        save_hf(params, hf_config, tmp_path / "hf", extra_files_from=tmp_path / "no_such_dir")
    assert list(tmp_path.iterdir()) == []
