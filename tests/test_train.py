"""train.py end to end on a tiny Qwen2-Audio (real vocabulary, real tokenizer, real demo audio) on 8 CPU devices.

The model directory is built the way a user's would be: random parameters exported with model/checkpoint.py's
save_hf plus tokenizer.json, then passed as --model DIR. Each test trains a few steps; the slow ones (several
compilations or subprocesses) are marked.
"""
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

import train
from model import processor as P
from model.answer import render_answer
from model.checkpoint import load_hf, save_hf
from model.config import AudioConfig, Qwen2AudioConfig, TextConfig
from model.qwen2_audio import init_params

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "data" / "demo" / "train.jsonl"

# Every dimension divisible by 8 so the (8 fsdp) and (2 x 2 x 2) meshes split parameters evenly.
TINY = Qwen2AudioConfig(
    audio=AudioConfig(d_model=16, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=32),
    text=TextConfig(vocab_size=156032, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                    num_attention_heads=2, num_key_value_heads=2, rms_norm_eps=1e-5, max_position_embeddings=2048,
                    bos_token_id=151643, eos_token_id=151645, pad_token_id=151643),
)


def demo_rows(n_text, n_speech):
    rows = [json.loads(line) for line in DEMO.read_text().splitlines() if line.strip()]
    text = [r for r in rows if r["audio"] is None][:n_text]
    speech = [r for r in rows if r["audio"] is not None][:n_speech]
    for r in speech:
        r["audio"] = str(DEMO.parent / r["audio"])
    return text + speech


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    if not DEMO.exists():
        pytest.skip("data/demo/train.jsonl is missing (made by prepare.py)")
    root = tmp_path_factory.mktemp("train")
    tok_dir = root / "tok"
    tok_dir.mkdir()
    P.load_tokenizer().save(str(tok_dir / "tokenizer.json"))
    model_dir = root / "model"
    save_hf(init_params(TINY, jax.random.PRNGKey(0)), TINY.to_hf_dict(), model_dir, extra_files_from=tok_dir)
    manifest = root / "train.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in demo_rows(12, 4)))
    return {"root": root, "model": model_dir, "manifest": manifest}


def run(setup, run_dir, *flags):
    """train.train() in this process (8 CPU devices); returns its summary (losses, final params)."""
    args = train.parse_args(["--model", str(setup["model"]), "--train-manifest", str(setup["manifest"]),
                             "--run-dir", str(run_dir), "--dev-manifest", "none", "--no-progress",
                             "--peak-lr", "1e-3", "--seed", "0", *flags])
    return train.train(args)


def direct_plan(setup, global_batch):
    """A one-epoch direct plan of the setup's manifest with every recording, and its rows by id."""
    args = train.parse_args(["--model", str(setup["model"]), "--train-manifest", str(setup["manifest"]),
                             "--scheme", "direct", "--speech-fraction", "1.0", "--epochs", "1"])
    sources, manifests = train.load_sources(args)
    return train.build_plan(args, sources, manifests, global_batch), [{r["id"]: r for r in m} for m in manifests]


def leaves(tree):
    return {jax.tree_util.keystr(p): np.asarray(jax.device_get(x)) for p, x in jax.tree_util.tree_leaves_with_path(tree)}


# --- batches -------------------------------------------------------------------------------------------------------

def test_loss_covers_exactly_the_answer_json_and_its_im_end():
    tok = P.load_tokenizer()
    text_row, speech_row = demo_rows(1, 1)
    batch = train.collate([train.make_example(text_row, tok), train.make_example(speech_row, tok), None], 512, 400)
    for i, row in enumerate((text_row, speech_row)):
        labelled = batch["targets"][i][batch["loss_mask"][i] > 0].tolist()
        assert tok.decode(labelled, skip_special_tokens=False) == \
            render_answer(row["scenario"], row["action"], row["entities"]) + "<|im_end|>"
        # the target of position t is the input token at t+1 (next-token prediction)
        n = int(batch["attention_mask"][i].sum())
        assert batch["targets"][i][:n - 1].tolist() == batch["input_ids"][i][1:n].tolist()
    # the speech row's prompt holds one <|AUDIO|> per encoder output of its clip; the transcript row none
    n_frames = int(batch["feature_lengths"][1])
    assert n_frames == P.log_mel_features(P.load_audio(speech_row["audio"]))[1] > 0
    assert int((batch["input_ids"][1] == 151646).sum()) == P.num_audio_tokens(n_frames)
    assert int((batch["input_ids"][0] == 151646).sum()) == 0
    # transcript and padding rows: zero features, length 0; padding rows carry no loss
    assert batch["feature_lengths"][[0, 2]].tolist() == [0, 0] and not batch["input_features"][[0, 2]].any()
    assert batch["loss_mask"][2].sum() == 0


def test_first_step_loss_equals_transformers_loss_with_labels_on_the_answer(setup, tmp_path):
    # Before the first update the parameters are the checkpoint's, so the step's loss must be transformers'
    # Qwen2AudioForConditionalGeneration loss on the same rows with labels = the answer tokens (else -100).
    torch = pytest.importorskip("torch")
    from transformers import Qwen2AudioForConditionalGeneration
    out = run(setup, tmp_path / "ref", "--scheme", "text-only", "--epochs", "1", "--per-device-batch", "16",
              "--grad-accum", "1", "--fsdp", "1", "--max-steps", "1", "--no-export")
    tok = P.load_tokenizer()
    rows = [r for r in demo_rows(12, 0)]
    batch = train.collate([train.make_example(r, tok) for r in rows], 256, None)
    labels = np.full(batch["input_ids"].shape, -100, np.int64)
    labels[:, 1:] = np.where(batch["loss_mask"][:, :-1] > 0, batch["input_ids"][:, 1:], -100)
    model = Qwen2AudioForConditionalGeneration.from_pretrained(setup["model"], torch_dtype=torch.float32).eval()
    with torch.no_grad():
        ref = model(input_ids=torch.tensor(batch["input_ids"], dtype=torch.long),
                    attention_mask=torch.tensor(batch["attention_mask"], dtype=torch.long),
                    labels=torch.tensor(labels)).loss.item()
    assert out["losses"][0] == pytest.approx(ref, abs=1e-4)


# --- what is trained ---------------------------------------------------------------------------------------------

def test_text_only_leaves_encoder_and_projector_bit_identical_and_direct_changes_them(setup, tmp_path):
    _, initial = load_hf(setup["model"], dtype=np.float32)
    for scheme in ("text-only", "direct"):
        out = run(setup, tmp_path / scheme, "--scheme", scheme, "--speech-fraction", "1.0", "--epochs", "1",
                  "--per-device-batch", "4", "--grad-accum", "2", "--max-steps", "2", "--fsdp", "1")
        before, after = leaves(initial), leaves(out["params"])
        audio = [k for k in before if k.startswith("['audio_tower']") or k.startswith("['multi_modal_projector']")]
        text = [k for k in before if k not in audio]
        assert audio and text
        changed_audio = [k for k in audio if not np.array_equal(before[k], after[k])]
        changed_text = [k for k in text if not np.array_equal(before[k], after[k])]
        assert changed_text, scheme  # the decoder trains in every scheme
        if scheme == "text-only":
            assert changed_audio == [], changed_audio
            assert out["n_speech_seen"] == 0
            # no optimizer state for the frozen parameters: Adam's 2 moments per trainable parameter (+ counters)
            cfg = json.loads((tmp_path / scheme / "config.json").read_text())
            n_audio = sum(after[k].size for k in audio)
            assert cfg["frozen_params"] == n_audio and cfg["trainable_params"] == sum(after[k].size for k in text)
            assert 0 <= out["opt_state_size"] - 2 * cfg["trainable_params"] < 16
        else:
            assert out["n_speech_seen"] > 0  # 2 steps x 8 rows from 12 transcripts + 4 recordings
            assert "['multi_modal_projector']['linear']['kernel']" in changed_audio
            assert any(k.startswith("['audio_tower']['layers']") for k in changed_audio)
            # the sinusoidal position table stays out of training, as transformers' requires_grad_(False) keeps it
            assert "['audio_tower']['embed_positions']['embedding']" not in changed_audio


def boundary_run(setup, run_dir, *flags):
    """Curriculum, 2 epochs of 8-row steps on one device: epoch 1 = 12 transcripts (steps 1-2), epoch 2 = 12
    transcripts + 4 recordings x 2 (steps 3-5). Stopped at the phase boundary (after step 2)."""
    return run(setup, run_dir, "--scheme", "curriculum", "--speech-fraction", "1.0", "--epochs", "2",
               "--per-device-batch", "8", "--grad-accum", "1", "--fsdp", "1", "--max-steps", "2", *flags)


def test_curriculum_transcript_epochs_leave_the_audio_path_bit_identical_even_with_weight_decay(setup, tmp_path):
    # epochs 1..E-1 are text-only training: no gradient, no optimizer state and no weight decay for the audio path
    _, initial = load_hf(setup["model"], dtype=np.float32)
    out = boundary_run(setup, tmp_path / "c", "--weight-decay", "0.1")
    before, after = leaves(initial), leaves(out["params"])
    audio = [k for k in before if k.startswith(("['audio_tower']", "['multi_modal_projector']"))]
    assert audio and all(np.array_equal(before[k], after[k]) for k in audio)
    assert not np.array_equal(before["['lm_head']['kernel']"], after["['lm_head']['kernel']"])
    assert 0 <= out["opt_state_size"] - 2 * sum(after[k].size for k in before if k not in audio) < 16


def test_curriculum_carry_ablation_keeps_one_adamw_over_every_parameter_but_the_position_table(setup, tmp_path):
    # --curriculum-optimizer carry: the audio path is trainable (optimizer state, weight decay) from step 1
    _, initial = load_hf(setup["model"], dtype=np.float32)
    out = boundary_run(setup, tmp_path / "c", "--weight-decay", "0.1", "--curriculum-optimizer", "carry")
    before, after = leaves(initial), leaves(out["params"])
    embed = "['audio_tower']['embed_positions']['embedding']"
    kernel = "['multi_modal_projector']['linear']['kernel']"
    assert not np.array_equal(before[kernel], after[kernel])  # no recording yet: weight decay moved it
    assert np.array_equal(before[embed], after[embed])
    assert 0 <= out["opt_state_size"] - 2 * sum(after[k].size for k in before if k != embed) < 16


def test_curriculum_last_epoch_starts_a_fresh_adamw_for_the_language_model_and_the_audio_tower(setup, tmp_path):
    # The paper's last epoch is a new training run: its first update must be the one a freshly constructed AdamW
    # (zero moments, step 0) makes from the phase-boundary parameters. No warmup, so that update is not zero.
    import jax.numpy as jnp
    import optax
    from model.config import get_config
    flags = ("--last-epoch-warmup-ratio", "0")
    boundary = boundary_run(setup, tmp_path / "c", *flags)["params"]
    after = run(setup, tmp_path / "c", "--scheme", "curriculum", "--speech-fraction", "1.0", "--epochs", "2",
                "--per-device-batch", "8", "--grad-accum", "1", "--fsdp", "1", "--max-steps", "3", *flags)
    assert after["resumed_from"] == 2 and after["n_speech_seen"] > 0
    # the reference: step 3's rows, the loss gradient at the boundary parameters, one step of a new optax AdamW
    args = train.parse_args(["--model", str(setup["model"]), "--train-manifest", str(setup["manifest"]),
                             "--scheme", "curriculum", "--speech-fraction", "1.0", "--epochs", "2",
                             "--per-device-batch", "8", "--grad-accum", "1", "--peak-lr", "1e-3", *flags])
    sources, manifests = train.load_sources(args)
    plan = train.build_plan(args, sources, manifests, 8)
    loader = train.StepLoader(plan, [{r["id"]: r for r in m} for m in manifests], P.load_tokenizer(), 1, 8,
                              slice(0, 8))
    mb = {k: jnp.asarray(v[0]) for k, v in loader(2).items()}
    assert int(mb["feature_lengths"].astype(bool).sum()) > 0  # the step has recordings: the audio tower learns
    trainable, frozen = train.split_params(boundary, train.ALWAYS_FROZEN)
    config = get_config(str(setup["model"]))

    def loss(tr):
        total, n = train.answer_loss(train.merge_params(frozen, tr), config, mb, jnp.float32, "none")
        return total / n

    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-3 * 3 / 5))
    updates, _ = tx.update(jax.grad(loss)(trainable), tx.init(trainable), trainable)
    want, before, got = leaves(optax.apply_updates(trainable, updates)), leaves(trainable), leaves(after["params"])
    for part in ("['language_model']", "['lm_head']", "['audio_tower']['layers']", "['multi_modal_projector']"):
        keys = [k for k in want if k.startswith(part)]
        assert keys and any(not np.array_equal(got[k], before[k]) for k in keys), part
        for k in keys:
            np.testing.assert_allclose(got[k], want[k], atol=2e-6, rtol=0, err_msg=k)
    embed = "['audio_tower']['embed_positions']['embedding']"
    assert np.array_equal(leaves(after["params"])[embed], leaves(boundary)[embed])


def test_epoch_end_evaluation_decodes_transcripts_and_recordings_as_infer_py_does(setup, tmp_path):
    # the dev numbers are infer.py's greedy answers scored by score.py: same prompts, features, buckets, tokens
    import jax.numpy as jnp
    import infer
    from model.config import get_config
    from score import score_rows
    rows = [json.loads(line) for line in setup["manifest"].read_text().splitlines()]
    text, speech = [r for r in rows if r["audio"] is None][:5], [r for r in rows if r["audio"]][:3]
    tok, config = P.load_tokenizer(setup["model"]), get_config(str(setup["model"]))
    _, params = load_hf(setup["model"], dtype=np.float32)
    evaluator = train.Evaluator(text, speech, tok, config, jnp.float32, 6, str(setup["manifest"]))
    result = evaluator(params)
    manifest = tmp_path / "dev.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in text + speech))
    infer.main(infer.Args(model=str(setup["model"]), manifest=str(manifest), out=str(tmp_path / "p.jsonl"),
                          num_beams=1, max_new_tokens=6, batch_size=8))
    theirs = {r["id"]: r for r in map(json.loads, (tmp_path / "p.jsonl").read_text().splitlines())}
    for name, subset in (("text", text), ("speech", speech)):
        ours = evaluator.predictions(params, evaluator.items[name])
        assert {i: r["generated"] for i, r in ours.items()} == {r["id"]: theirs[r["id"]]["generated"] for r in subset}
    assert result["dev_rows"] == 5 and result["dev_speech_rows"] == 3
    assert result["dev_intent_acc"] == score_rows(text, theirs)["intent_acc"]
    assert result["dev_speech_slu_f1"] == score_rows(speech, theirs)["slu_f1"]


def test_resume_with_another_result_setting_is_refused_and_leaves_config_json_untouched(setup, tmp_path):
    flags = ("--scheme", "text-only", "--epochs", "1", "--per-device-batch", "4", "--grad-accum", "1", "--fsdp", "1")
    run(setup, tmp_path / "r", *flags, "--max-steps", "1")
    record = (tmp_path / "r" / "config.json").read_bytes()
    with pytest.raises(train.InputError, match=r"--remat 'none' -> 'full'; --weight-decay 0\.0 -> 0\.1"):
        run(setup, tmp_path / "r", *flags, "--weight-decay", "0.1", "--remat", "full")
    assert (tmp_path / "r" / "config.json").read_bytes() == record
    # flags that only say how the run goes may change; the record keeps the history
    out = run(setup, tmp_path / "r", *flags, "--max-steps", "2", "--save-every", "7")
    assert out["resumed_from"] == 1 and out["steps"] == 2
    history = json.loads((tmp_path / "r" / "config.json").read_text())["history"]
    assert history == [{"resumed_at_step": 1, "changed": {"max_steps": [1, 2], "save_every": [200, 7]}}]
    record = json.loads((tmp_path / "r" / "hf" / "training_run.json").read_text())
    assert record["finished"] is False and (record["steps"], record["planned_steps"]) == (2, 3)


def test_a_finished_run_keeps_its_export_not_its_optimizer_checkpoints_and_a_rerun_does_nothing(setup, tmp_path):
    # a finished 7B run would otherwise keep ~100 GB of parameters + Adam moments per checkpoint, twice
    flags = ("--scheme", "text-only", "--epochs", "1", "--global-batch", "16", "--per-device-batch", "16",
             "--fsdp", "1")
    out = run(setup, tmp_path / "r", *flags)
    assert out["finished"] and not (tmp_path / "r" / "checkpoints").exists()
    assert (tmp_path / "r" / "hf" / "model.safetensors").is_file() and (tmp_path / "r" / "metrics.jsonl").is_file()
    (tmp_path / "r" / train.REMOVING / "1").mkdir(parents=True)  # as a kill during the removal leaves it
    again = run(setup, tmp_path / "r", *flags)  # nothing to resume from, nothing to redo
    assert again["already_finished"] and again["losses"] == []
    assert not (tmp_path / "r" / train.REMOVING).exists()  # the rerun finished removing it
    with pytest.raises(train.InputError, match=r"this finished run was made with other settings: --epochs 1 -> 2"):
        run(setup, tmp_path / "r", *flags[:3], "2", *flags[4:])
    kept = run(setup, tmp_path / "k", *flags, "--keep-optimizer-state")
    assert kept["finished"] and (tmp_path / "k" / "checkpoints" / "1").is_dir()


def test_a_run_is_tied_to_its_models_contents_not_its_path(setup, tmp_path):
    # a rebuilt `mini` or a re-downloaded checkpoint keeps its path: a finished run must not pass for its result
    import shutil
    flags = ("--scheme", "text-only", "--epochs", "1", "--global-batch", "16", "--per-device-batch", "16",
             "--fsdp", "1")
    first, copy = tmp_path / "first", tmp_path / "copy"
    shutil.copytree(setup["model"], first)
    assert run({**setup, "model": first}, tmp_path / "r", *flags)["finished"]
    shutil.copytree(first, copy)  # the same model elsewhere (another checkout, another disk): the same run
    assert run({**setup, "model": copy}, tmp_path / "r", *flags)["already_finished"]
    save_hf(init_params(TINY, jax.random.PRNGKey(1)), TINY.to_hf_dict(), first, extra_files_from=setup["model"])
    with pytest.raises(train.InputError, match=r"this finished run was made with other settings: --model 'sha256:"):
        run({**setup, "model": first}, tmp_path / "r", *flags)


def test_a_run_made_at_its_models_default_epoch_count_is_not_resumed_once_that_default_changes(setup, tmp_path):
    # no --epochs: the model directory's finetune_defaults.epochs decides, and the run records the number it trained
    import shutil
    flags = ("--scheme", "text-only", "--global-batch", "16", "--per-device-batch", "16", "--fsdp", "1")
    model = tmp_path / "model"
    shutil.copytree(setup["model"], model)
    (model / "pretraining.json").write_text(json.dumps({"finetune_defaults": {"epochs": 1}}))
    out = run({**setup, "model": model}, tmp_path / "r", *flags)
    assert out["finished"] and len(out["losses"]) == 1  # 12 transcripts, batch 16: one step per epoch
    assert json.loads((tmp_path / "r" / "config.json").read_text())["settings"]["epochs"] == 1
    (model / "pretraining.json").write_text(json.dumps({"finetune_defaults": {"epochs": 2}}))
    with pytest.raises(train.InputError, match=r"made with other settings: .*--epochs 1 -> 2"):
        run({**setup, "model": model}, tmp_path / "r", *flags)


def test_a_run_is_tied_to_the_dtype_it_computed_in_not_to_how_dtype_was_written(setup, tmp_path):
    # on a CPU --dtype auto is float32: a finished float32 run is the same run; bfloat16 is another computation
    flags = ("--scheme", "text-only", "--epochs", "1", "--global-batch", "16", "--per-device-batch", "16",
             "--fsdp", "1")
    assert run(setup, tmp_path / "r", *flags, "--dtype", "float32")["finished"]
    assert run(setup, tmp_path / "r", *flags, "--dtype", "auto")["already_finished"]
    with pytest.raises(train.InputError, match=r"compute dtype \(--dtype on this backend\) 'float32' -> 'bfloat16'"):
        run(setup, tmp_path / "r", *flags, "--dtype", "bfloat16")


def test_a_run_recorded_with_dtype_as_written_by_an_older_train_py_still_matches():
    old = {"dtype": "float32", "compute_dtype": "float32", "epochs": 1}
    train.refuse_other_settings("RUN", old, {"compute_dtype": "float32", "epochs": 1}, "unused")
    with pytest.raises(train.InputError, match=r"compute dtype \(--dtype on this backend\) 'float32' -> 'bfloat16'"):
        train.refuse_other_settings("RUN", old, {"compute_dtype": "bfloat16", "epochs": 1}, "unused")


def test_a_run_recorded_with_its_models_path_by_an_older_train_py_still_matches_that_path(tmp_path, capsys):
    old, new = {"model": str(tmp_path), "epochs": 1}, {"model": "sha256:0123", "epochs": 1}
    train.refuse_other_settings("RUN", dict(old), new, str(tmp_path))  # the same directory: taken as it is now
    assert "records its model by path" in capsys.readouterr().err
    with pytest.raises(train.InputError, match=r"--model '/elsewhere' -> 'sha256:0123'"):
        train.refuse_other_settings("RUN", {**old, "model": "/elsewhere"}, new, str(tmp_path))


def test_the_export_is_written_in_the_source_checkpoints_dtype(setup, tmp_path):
    # Qwen2-Audio-7B-Instruct ships bfloat16 weights: its fine-tuned export is bfloat16 too (half the disk)
    from safetensors import safe_open
    _, params = load_hf(setup["model"], dtype=np.float32)
    source = tmp_path / "bf16"
    save_hf(params, {**TINY.to_hf_dict(), "dtype": "bfloat16"}, source, extra_files_from=setup["model"])
    args = train.parse_args(["--model", str(source), "--train-manifest", str(setup["manifest"]), "--run-dir",
                             str(tmp_path / "r"), "--dev-manifest", "none", "--no-progress", "--peak-lr", "1e-3",
                             "--scheme", "text-only", "--epochs", "1", "--global-batch", "16",
                             "--per-device-batch", "16", "--fsdp", "1"])
    out = train.train(args)
    with safe_open(str(tmp_path / "r" / "hf" / "model.safetensors"), "np") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    assert json.loads((tmp_path / "r" / "hf" / "config.json").read_text())["dtype"] == "bfloat16"
    # and the bfloat16 weights are the trained float32 ones, rounded
    _, exported = load_hf(tmp_path / "r" / "hf", dtype=np.float32)
    lm_head = np.asarray(out["params"]["lm_head"]["kernel"])
    np.testing.assert_array_equal(exported["lm_head"]["kernel"], lm_head.astype(jax.numpy.bfloat16).astype(np.float32))


def test_bad_recordings_are_all_reported_with_manifest_line_before_any_model_work(setup, tmp_path):
    import soundfile as sf
    good = demo_rows(0, 1)[0]
    sf.write(tmp_path / "short.wav", np.zeros(96, np.float32), 16000)   # 6 ms: no audio token
    sf.write(tmp_path / "empty.wav", np.zeros(0, np.float32), 16000)
    (tmp_path / "corrupt.wav").write_bytes(b"RIFF not really a wave file")
    bad = {"short": "short.wav", "empty": "empty.wav", "corrupt": "corrupt.wav", "missing": "missing.wav"}
    rows = demo_rows(2, 0) + [good] + [{**good, "id": name, "audio": str(tmp_path / f)} for name, f in bad.items()]
    manifest = tmp_path / "bad.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = train.parse_args(["--model", str(setup["model"]),
                             "--train-manifest", str(manifest), "--scheme", "direct", "--speech-fraction", "1.0",
                             "--run-dir", str(tmp_path / "run"), "--dev-manifest", "none", "--fsdp", "1"])
    with pytest.raises(train.InputError) as err:
        train.train(args)
    message = str(err.value)
    for line, (name, reason) in enumerate(zip(bad, ("too short", "no samples", "cannot be decoded",
                                                    "file not found")), start=4):
        assert f"{manifest}:{line}: {name}: {reason}" in message, message
    assert "4 of the 5 recordings" in message and not (tmp_path / "run" / "checkpoints").exists()


def test_recordings_longer_than_30_s_are_counted_and_recorded_in_config_json(setup, tmp_path, capsys):
    # cut to 30 s as the reference's processor does: the run's record says which answers saw part of their audio
    import soundfile as sf
    sf.write(tmp_path / "long.wav", np.zeros(16000 * 31, np.float32), 16000)
    good = demo_rows(0, 1)[0]
    rows = demo_rows(2, 0) + [good, {**good, "id": "long", "audio": str(tmp_path / "long.wav")}]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = train.parse_args(["--model", str(setup["model"]), "--train-manifest", str(manifest), "--scheme", "direct",
                             "--speech-fraction", "1.0", "--run-dir", str(tmp_path / "run"), "--dev-manifest", "none",
                             "--fsdp", "1", "--global-batch", "4", "--per-device-batch", "4", "--max-steps", "1",
                             "--no-export", "--no-progress"])
    summary = train.train(args)
    assert summary["recordings_over_30s"] == 1
    assert json.loads((tmp_path / "run" / "config.json").read_text())["recordings_over_30s"] == ["long"]
    assert "1 of the recordings are longer than 30 s" in capsys.readouterr().out


def test_7b_preset_without_random_init_exits_2_naming_the_fix_and_allocates_nothing(tmp_path):
    # peak memory of this program alone: VmHWM (ru_maxrss would include the forking test process's pages)
    probe = ("import re, runpy, sys; sys.argv = ['train.py', '--model', '7b', '--run-dir', %r]\n"
             "try:\n    runpy.run_path('train.py', run_name='__main__')\n"
             "finally:\n    print('maxrss_kb', re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read())[1],"
             " file=sys.stderr)" % str(tmp_path / "run"))
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "Hugging Face Qwen2-Audio directory" in out.stderr and "--random-init" in out.stderr
    assert int(out.stderr.split("maxrss_kb")[1].split()[0]) < 2_000_000  # 8.4 B fp32 parameters would be 34 GB
    assert not (tmp_path / "run").exists()


def test_padding_to_the_step_shape_buckets_leaves_the_loss_unchanged(setup):
    # padded positions carry no loss and are masked out of attention: bucketing only costs compute
    import jax.numpy as jnp
    from model.config import get_config
    _, params = load_hf(setup["model"], dtype=np.float32)
    config, tok = get_config(str(setup["model"])), P.load_tokenizer()
    examples = [train.make_example(r, tok) for r in demo_rows(2, 2)]
    tokens = max(len(e.ids) for e in examples)
    frames = max(e.features.shape[1] for e in examples if e.features is not None)
    answer = max(len(e.ids) - e.n_prompt for e in examples)
    tight = train.collate(examples, tokens, frames, answer)
    seq_len, n_frames = train.step_shape(tokens, frames)
    assert (seq_len, n_frames) != (tokens, frames)
    padded = train.collate(examples + [None], seq_len, n_frames, 64)
    losses = [train.answer_loss(params, config, {k: jnp.asarray(v) for k, v in b.items()}, jnp.float32, "none")
              for b in (tight, padded)]
    assert float(losses[0][1]) == float(losses[1][1]) > 0  # the same answer tokens
    assert float(losses[1][0]) == pytest.approx(float(losses[0][0]), rel=1e-5)


def test_device_features_from_waveforms_give_the_host_features_loss_and_gradients(setup):
    # --audio-features device: the host sends the decoded clips, the step computes log_mel_jnp; same rows, same
    # shapes, the loss and gradients of the float64 host features to float32 rounding.
    import jax.numpy as jnp
    from model.config import get_config
    _, params = load_hf(setup["model"], dtype=np.float32)
    plan, rows = direct_plan(setup, 8)
    step = next(s for s in range(plan.total_steps) if train.StepLoader(plan, rows, P.load_tokenizer(), 2, 4,
                                                                        slice(0, 4)).counts(s)[1])
    batches = {on: train.StepLoader(plan, rows, P.load_tokenizer(), 2, 4, slice(0, 4), device_features=on)(step)
               for on in (False, True)}
    host, device = batches[False], batches[True]
    assert "input_features" in host and "input_waveforms" not in host
    assert "input_waveforms" in device and "input_features" not in device
    assert device["input_waveforms"].shape[-1] == host["input_features"].shape[-1] * P.HOP_LENGTH
    for k in ("input_ids", "feature_lengths", "answer_index", "loss_mask"):
        assert np.array_equal(host[k], device[k]), k
    config = get_config(str(setup["model"]))
    grad = jax.jit(jax.value_and_grad(lambda p, mb: train.answer_loss(p, config, mb, jnp.float32, "none")[0]))
    for a in range(2):
        (lh, gh), (ld, gd) = [grad(params, {k: jnp.asarray(v[a]) for k, v in b.items()}) for b in (host, device)]
        np.testing.assert_allclose(float(ld), float(lh), rtol=1e-6)
        want, got = leaves(gh), leaves(gd)
        for k in want:
            np.testing.assert_allclose(got[k], want[k], rtol=1e-3, atol=1e-6, err_msg=k)


def grads_out_step(config, trainable, frozen, batch, skip_audio_tower=False):
    """train.make_train_step with an 'optimizer' whose new state is the step's gradient (divided as the step divides
    it), so that the gradient itself can be compared; -> (gradient leaves, loss, the step's jaxpr as text)."""
    import jax.numpy as jnp
    import optax
    keep = optax.GradientTransformation(lambda p: jax.tree.map(jnp.zeros_like, p),
                                        lambda g, s, p=None: (jax.tree.map(jnp.zeros_like, g), g))
    step = train.make_train_step(config, keep, jnp.float32, "none", skip_audio_tower=skip_audio_tower)
    inputs = (trainable, frozen, keep.init(trainable), {k: jnp.asarray(v) for k, v in batch.items()})
    _, grads, metrics = jax.jit(step)(*inputs)
    return leaves(grads), float(metrics["loss"]), str(jax.make_jaxpr(step)(*inputs))


def mixed_step(setup, group):
    """A direct step of 16 rows (4 recordings) in 4 micro-batches of 4, as drawn or grouped."""
    plan, rows = direct_plan(setup, 16)
    loader = train.StepLoader(plan, rows, P.load_tokenizer(), 4, 4, slice(0, 4), group_recordings=group)
    return loader, loader(0)


def test_a_micro_batch_of_transcripts_skips_the_audio_tower_with_the_same_loss_and_gradient(setup):
    # the step without the skip (every micro-batch through the audio tower) is the reference
    from model.config import get_config
    config = get_config(str(setup["model"]))
    _, params = load_hf(setup["model"], dtype=np.float32)
    trainable, frozen = train.split_params(params, train.ALWAYS_FROZEN)
    _, batch = mixed_step(setup, group=True)
    assert batch["feature_lengths"].any(axis=1).tolist() == [True, False, False, False]
    (want, want_loss, plain), (got, got_loss, skipping) = (grads_out_step(config, trainable, frozen, batch, skip)
                                                           for skip in (False, True))
    assert " cond[" in skipping and " cond[" not in plain
    assert got_loss == want_loss  # to the bit
    assert any(k.startswith("['audio_tower']") and np.abs(v).max() > 0 for k, v in got.items())
    for k in want:  # measured: equal to the bit but for 617 of the embedding table's 2.5M entries (3e-8 of 0.22:
        # XLA sums its scatter-add in another order)
        np.testing.assert_allclose(got[k], want[k], rtol=0, atol=1e-6 * np.abs(want[k]).max(), err_msg=k)


def test_grouped_recordings_fill_the_first_micro_batches_with_the_same_rows_loss_and_gradient(setup):
    # --group-recordings: the step's 4 recordings share one micro-batch instead of spreading over several
    from model.config import get_config
    config = get_config(str(setup["model"]))
    _, params = load_hf(setup["model"], dtype=np.float32)
    trainable, frozen = train.split_params(params, train.ALWAYS_FROZEN)
    (drawn_loader, drawn), (grouped_loader, grouped) = mixed_step(setup, False), mixed_step(setup, True)
    assert drawn["feature_lengths"].any(axis=1).sum() > 1 and grouped["feature_lengths"].any(axis=1).sum() == 1
    order = grouped_loader.step_order(0)
    assert sorted(order) == sorted(drawn_loader.step_order(0)) and len(order) == 16
    is_recording = [grouped_loader.rows[m][i]["audio"] is not None for m, i in order]
    assert is_recording == [True] * 4 + [False] * 12
    drawn_order = drawn_loader.step_order(0)  # each group keeps its drawn order
    assert order == [k for k in drawn_order if k in order[:4]] + [k for k in drawn_order if k not in order[:4]]
    (g_drawn, l_drawn, _), (g_grouped, l_grouped, _) = (grads_out_step(config, trainable, frozen, b)
                                                        for b in (drawn, grouped))
    assert l_grouped == pytest.approx(l_drawn, rel=1e-6)
    for k in g_drawn:  # the same sum in another order
        np.testing.assert_allclose(g_grouped[k], g_drawn[k], rtol=1e-4, atol=1e-7, err_msg=k)


def test_grouped_recordings_train_on_a_sharded_mesh_with_the_losses_of_the_rows_as_drawn(setup, tmp_path):
    # one recording in 8 rows, 2 micro-batches of 4 rows on 4 devices: grouped, its micro-batch comes first and the
    # other skips the audio tower (a predicate over a sharded batch)
    common = ("--scheme", "direct", "--speech-fraction", "0.25", "--epochs", "1", "--per-device-batch", "1",
              "--grad-accum", "2", "--fsdp", "4", "--global-batch", "8")
    drawn = run(setup, tmp_path / "drawn", *common, "--group-recordings", "no")
    grouped = run(setup, tmp_path / "grouped", *common, "--group-recordings", "yes")
    assert grouped["finished"] and grouped["n_speech_seen"] == drawn["n_speech_seen"] == 1
    np.testing.assert_allclose(grouped["losses"], drawn["losses"], rtol=1e-5)


def test_device_features_train_on_a_sharded_mesh_with_the_losses_of_host_features(setup, tmp_path):
    # one recording in 16 rows, 2 micro-batches of 4 rows on 4 devices: its step has a micro-batch without audio
    # (and devices without audio), which must carry the same arrays as the one with it
    common = ("--scheme", "direct", "--speech-fraction", "0.25", "--epochs", "1", "--per-device-batch", "1",
              "--grad-accum", "2", "--fsdp", "4", "--global-batch", "8")
    host = run(setup, tmp_path / "host", *common)
    device = run(setup, tmp_path / "device", *common, "--audio-features", "device")
    assert device["n_speech_seen"] == 1 and device["step_shapes"] == host["step_shapes"]
    np.testing.assert_allclose(device["losses"], host["losses"], rtol=1e-5)
    settings = [json.loads((tmp_path / d / "config.json").read_text())["settings"]["audio_features"]
                for d in ("host", "device")]
    assert settings == ["host", "device"]  # auto is host on this CPU; the resolved value is what a resume checks


def test_a_second_run_with_the_same_shapes_compiles_nothing_and_reports_shapes_and_padding(setup, tmp_path):
    flags = ("--scheme", "direct", "--speech-fraction", "1.0", "--epochs", "1", "--per-device-batch", "8",
             "--grad-accum", "1", "--fsdp", "1", "--max-steps", "1", "--compilation-cache", str(tmp_path / "cache"))
    first = run(setup, tmp_path / "a", *flags)
    second = run(setup, tmp_path / "b", *flags)
    assert first["compiled"] > 0 and first["compile_seconds"] > 0
    assert second["compiled"] == 0 and second["cache_hits"] > 0, second
    assert first["losses"] == second["losses"]
    row = json.loads((tmp_path / "a" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["step_shapes"] == [tuple(row["shape"])] == [train.step_shape(*row["shape"])]  # a bucketed shape
    assert 0 < row["padding"] < 1 and first["padding"] == row["padding"]


# --- sharding, accumulation ----------------------------------------------------------------------------------------

@pytest.mark.slow
def test_three_step_losses_agree_on_8_fsdp_2x2x2_and_one_device_and_params_are_sharded(setup, tmp_path):
    # One command, --global-batch 8, on three meshes: the accumulation is derived from it (8 devices x 1 row x 1,
    # 4 data-parallel devices x 1 row x 2, 1 device x 2 rows x 4), so the optimizer steps are the same.
    common = ("--scheme", "direct", "--speech-fraction", "1.0", "--epochs", "2", "--max-steps", "3",
              "--global-batch", "8")
    a = run(setup, tmp_path / "fsdp8", *common, "--fsdp", "8", "--per-device-batch", "1")
    b = run(setup, tmp_path / "mesh222", *common, "--data-parallel", "2", "--fsdp", "2", "--tensor-parallel", "2",
            "--per-device-batch", "1")
    c = run(setup, tmp_path / "single", *common, "--fsdp", "1", "--per-device-batch", "2")
    configs = [json.loads((tmp_path / d / "config.json").read_text()) for d in ("fsdp8", "mesh222", "single")]
    assert [(c["global_batch"], c["grad_accum"]) for c in configs] == [(8, 1), (8, 2), (8, 4)]
    assert len(a["losses"]) == 3
    np.testing.assert_allclose(a["losses"], c["losses"], atol=1e-4, rtol=0)
    np.testing.assert_allclose(b["losses"], c["losses"], atol=1e-4, rtol=0)
    assert a["losses"][2] != a["losses"][0]  # the parameters did move between steps
    # really sharded: the embedding is split over the devices, not replicated
    emb_a = a["params"]["language_model"]["embed_tokens"]["embedding"]
    emb_b = b["params"]["language_model"]["embed_tokens"]["embedding"]
    assert len(emb_a.sharding.device_set) == 8 and emb_a.addressable_shards[0].data.shape[1] == 16 // 8
    assert emb_b.addressable_shards[0].data.shape == (156032 // 2, 16 // 2)  # vocab over tensor, embed over fsdp
    q = b["params"]["language_model"]["layers"]["self_attn"]["q_proj"]["kernel"]
    assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")


# --- checkpoints -------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_resumed_run_equals_an_uninterrupted_one_and_exports_hf(setup, tmp_path):
    common = ("--scheme", "curriculum", "--speech-fraction", "0.5", "--epochs", "2", "--per-device-batch", "1",
              "--grad-accum", "1", "--fsdp", "8")  # 12 rows + 2*2 speech: 2 + 2 steps
    full = run(setup, tmp_path / "full", *common)
    first = run(setup, tmp_path / "resumed", *common, "--max-steps", "1")  # "killed" after step 1's checkpoint
    assert first["steps"] == 1 and not first["finished"]
    # a run stopped by --max-steps still exports the model it has (grids and demos decode it) ...
    early, at_step_1 = leaves(load_hf(tmp_path / "resumed" / "hf")[1]), leaves(first["params"])
    assert early.keys() == at_step_1.keys() and all(np.array_equal(early[k], at_step_1[k]) for k in early)
    second = run(setup, tmp_path / "resumed", *common)
    assert second["resumed_from"] == 1 and len(full["losses"]) == 4
    assert first["losses"] + second["losses"] == full["losses"]  # bit-identical losses
    want, got = leaves(full["params"]), leaves(second["params"])
    assert want.keys() == got.keys() and all(np.array_equal(want[k], got[k]) for k in want)
    metrics = [json.loads(l) for l in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    assert {"step", "epoch", "loss", "lr", "n_text", "n_speech", "tokens", "seconds"} <= set(metrics[0])
    # ... and the resumed run replaces that export with the final parameters and the tokenizer
    _, exported = load_hf(tmp_path / "resumed" / "hf")
    exp = leaves(exported)
    assert all(np.array_equal(exp[k], want[k]) for k in want)
    assert (tmp_path / "resumed" / "hf" / "tokenizer.json").exists()


def test_non_finite_loss_stops_with_a_clear_message_and_keeps_the_last_good_checkpoint(setup, tmp_path):
    with pytest.raises(FloatingPointError, match=r"non-finite loss .* step (\d+).*Last good checkpoint: .*checkpoints"):
        run(setup, tmp_path / "nan", "--scheme", "text-only", "--epochs", "1", "--per-device-batch", "1",
            "--grad-accum", "1", "--fsdp", "1", "--save-every", "1", "--peak-lr", "1e38", "--warmup-ratio", "0")
    steps = sorted(int(p.name) for p in (tmp_path / "nan" / "checkpoints").iterdir() if p.name.isdigit())
    metrics = [json.loads(l) for l in (tmp_path / "nan" / "metrics.jsonl").read_text().splitlines()]
    assert steps and steps[-1] == len(metrics)  # the last checkpoint is the last finite step
    assert all(math.isfinite(m["loss"]) for m in metrics)


def test_a_torn_last_metrics_line_is_dropped_with_a_warning_so_the_run_resumes(tmp_path, capsys):
    # a kill while a metrics row was being written leaves half a line; resuming must not fail on it
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
    train.RunDir(tmp_path, train.Args(), is_main=True).trim_metrics(1)
    assert metrics.read_text() == '{"step": 1, "loss": 2.0}\n'
    assert "metrics.jsonl:3: dropped a torn last line" in capsys.readouterr().err
    metrics.write_text('{"step": 1, "lo\n{"step": 2, "loss": 1.5}\n')  # not the last line: not a kill
    with pytest.raises(train.InputError, match=r"metrics.jsonl:1: not a JSON object"):
        train.RunDir(tmp_path, train.Args(), is_main=True).trim_metrics(2)


# --- multi-host ---------------------------------------------------------------------------------------------------

def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def run_one_and_two_processes(flags: list[str], tmp_path) -> None:
    """The train.py command `flags` as one process on 4 CPU devices (tmp_path/one) and as two processes of 2 devices
    each through jax.distributed (tmp_path/two); both must exit 0."""
    base = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "JAX_PLATFORMS": "cpu", "TOKENIZERS_PARALLELISM": "false",
            "JAX_DEFAULT_MATMUL_PRECISION": "highest", "HOME": os.environ.get("HOME", "/tmp")}
    one = subprocess.run([sys.executable, *flags, "--run-dir", str(tmp_path / "one")], cwd=REPO, timeout=600,
                         env={**base, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"},
                         capture_output=True, text=True)
    assert one.returncode == 0, one.stderr[-3000:]
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, *flags, "--run-dir", str(tmp_path / "two")], cwd=REPO,
                              env={**base, "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
                                   "JAX_COORDINATOR_ADDRESS": f"localhost:{port}", "JAX_NUM_PROCESSES": "2",
                                   "JAX_PROCESS_ID": str(i)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(o[1][-3000:] for o in outs)


@pytest.mark.slow
def test_two_process_distributed_run_has_the_losses_evaluation_and_export_of_one_process(setup, tmp_path):
    flags = ["train.py", "--model", str(setup["model"]), "--train-manifest", str(setup["manifest"]),
             "--dev-manifest", str(setup["manifest"]), "--eval-max-rows", "3", "--no-progress", "--peak-lr", "1e-3", "--scheme", "direct",
             "--speech-fraction", "1.0", "--epochs", "1", "--per-device-batch", "1", "--grad-accum", "2",
             "--max-steps", "2", "--save-every", "0"]
    run_one_and_two_processes(flags, tmp_path)
    losses = lambda d: [json.loads(l)["loss"] for l in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
    config = json.loads((tmp_path / "two" / "config.json").read_text())
    assert config["processes"] == 2 and config["devices"] == 4
    assert len(losses("one")) == 2
    np.testing.assert_allclose(losses("two"), losses("one"), atol=1e-5, rtol=0)
    # The epoch-end evaluation (the run's one epoch ends at step 2) runs on both processes with global params.
    evals = {d: [json.loads(l) for l in (tmp_path / d / "metrics.jsonl").read_text().splitlines()][-1]
             for d in ("one", "two")}
    assert evals["one"]["dev_rows"] == evals["two"]["dev_rows"] == 3
    assert evals["two"]["dev_loss"] == pytest.approx(evals["one"]["dev_loss"], abs=1e-5)
    assert evals["two"]["dev_intent_acc"] == evals["one"]["dev_intent_acc"]
    assert evals["one"]["dev_speech_rows"] == evals["two"]["dev_speech_rows"] == 3  # the recordings decoded too
    for key in ("dev_slu_f1", "dev_speech_intent_acc", "dev_speech_slu_f1"):
        assert evals["two"][key] == evals["one"][key], key
    # The export gathers each tensor across the two processes; process 0 writes the same model as one process.
    from safetensors.numpy import load_file
    exported = {d: load_file(str(tmp_path / d / "hf" / "model.safetensors")) for d in ("one", "two")}
    assert sorted(exported["two"]) == sorted(exported["one"])
    for name, value in exported["one"].items():
        np.testing.assert_allclose(exported["two"][name], value, atol=1e-5, rtol=0, err_msg=name)


@pytest.mark.slow
def test_two_process_run_with_a_frozen_teacher_and_device_features_has_the_losses_of_one_process(setup, tmp_path):
    # p = 0.25: one recording, so in its step one host's rows have audio and the other's none: both must send the
    # same arrays (waveforms, teacher rows) for the global batch to exist
    flags = ["train.py", "--model", str(setup["model"]), "--train-manifest", str(setup["manifest"]),
             "--dev-manifest", "none", "--no-progress", "--peak-lr", "1e-3", "--scheme", "direct",
             "--speech-fraction", "0.25", "--epochs", "1", "--per-device-batch", "1", "--grad-accum", "2",
             "--max-steps", "2", "--save-every", "0", "--distill-weight", "1", "--distill-teacher", "frozen",
             "--audio-features", "device"]
    run_one_and_two_processes(flags, tmp_path)
    rows = {d: [json.loads(line) for line in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
            for d in ("one", "two")}
    assert sum(r["n_speech"] for r in rows["one"]) == 1 and len(rows["two"]) == 2
    np.testing.assert_allclose([r["loss"] for r in rows["two"]], [r["loss"] for r in rows["one"]], atol=1e-5, rtol=0)
    kl = {d: [r.get("distill_kl") for r in rows[d]] for d in rows}
    assert [k is None for k in kl["two"]] == [k is None for k in kl["one"]] and any(k is not None for k in kl["one"])
    np.testing.assert_allclose([k for k in kl["two"] if k is not None], [k for k in kl["one"] if k is not None],
                               rtol=1e-3)


# --- it learns ---------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_tiny_preset_learns_demo_rows_loss_falls_far_below_chance(setup, tmp_path):
    # the default model (the randomly initialised `tiny` preset) at its default learning rate, 36 small steps
    args = train.parse_args(["--model", "tiny", "--train-manifest", str(setup["manifest"]), "--dev-manifest", "none",
                             "--run-dir", str(tmp_path / "learn"), "--no-progress", "--scheme", "text-only",
                             "--epochs", "12", "--per-device-batch", "1", "--grad-accum", "1", "--fsdp", "4",
                             "--save-every", "0", "--no-export"])
    losses = train.train(args)["losses"]
    assert losses[0] == pytest.approx(math.log(156032), abs=0.5)  # a random model: uniform over the vocabulary
    assert np.mean(losses[-3:]) < 0.5 * losses[0], losses


# --- ahead-of-time compilation for a TPU slice ---------------------------------------------------------------------

def test_aot_topology_compiles_this_runs_train_step_for_v5p_8_without_weights_or_audio(setup, tmp_path, capsys,
                                                                                        monkeypatch):
    pytest.importorskip("libtpu")
    def refuse(*args, **kwargs):
        raise AssertionError("--aot-topology loaded weights or decoded audio")
    monkeypatch.setattr(train, "load_model", refuse)
    monkeypatch.setattr(P, "load_audio", refuse)
    status = train.main(["--model", "tiny", "--train-manifest", str(setup["manifest"]), "--scheme", "direct",
                         "--speech-fraction", "1.0", "--global-batch", "16", "--aot-topology", "v5p-8"])
    report = json.loads(capsys.readouterr().out)
    assert status == 0 and report["fits"] and report["topology"] == "v5p-8" and report["chips"] == 4
    assert report["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1}  # --fsdp -1: every chip of the slice
    assert report["workload"]["grad_accum"] == 2  # 16 rows = 2 per chip x 4 chips x 2
    # the shape of the run's largest step: its longest row, in train.py's buckets
    monkeypatch.undo()
    tok = P.load_tokenizer()
    rows = demo_rows(12, 4)
    longest = max(len(train.make_example(r, tok).ids) for r in rows)
    frames = max(train.make_example(r, tok).features.shape[1] for r in rows if r["audio"])
    seq_len, n_frames = train.step_shape(longest, frames)
    assert (report["workload"]["seq_len"], report["workload"]["audio_frames"]) == (seq_len, n_frames)
    assert 0 < report["memory_per_chip_gib"]["total"] < 1 and report["arguments_per_chip_gib"]["opt_state"] > 0


def test_aot_of_a_frozen_teacher_gap_run_runs_no_model_and_compiles_the_teacher_and_waveforms(setup, tmp_path, capsys,
                                                                                               monkeypatch):
    # --subset-selection gap would need the reference model: AOT compiles for every recording the subset could take
    pytest.importorskip("libtpu")
    def refuse(*args, **kwargs):
        raise AssertionError("--aot-topology ran a model or decoded audio")
    for name in ("load_model", "gap_scores", "gap_rankings"):
        monkeypatch.setattr(train, name, refuse)
    monkeypatch.setattr(P, "load_audio", refuse)
    status = train.main(["--model", "tiny", "--train-manifest", str(setup["manifest"]), "--scheme", "direct",
                         "--speech-fraction", "0.25", "--global-batch", "16", "--aot-topology", "v5p-8",
                         "--subset-selection", "gap", "--gap-speech", "unused.jsonl", "--distill-weight", "1",
                         "--distill-teacher", "frozen"])
    report = json.loads(capsys.readouterr().out)
    assert status == 0 and report["fits"]
    args = report["arguments_per_chip_gib"]
    # the teacher: a copy of the model in the compute dtype (bfloat16 on a TPU), half the float32 master weights
    assert args["teacher"] == pytest.approx((args["trainable"] + args["frozen"]) / 2, abs=1e-3)  # GiB, 3 decimals
    assert report["workload"]["audio_frames"] is not None  # the whole manifest's recordings: an upper bound


def test_an_unknown_aot_topology_exits_2_with_one_line_naming_the_known_ones():
    out = subprocess.run([sys.executable, "train.py", "--model", "tiny", "--aot-topology", "v9-99"],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    assert "train.py: error:" in out.stderr and "unknown TPU topology" in out.stderr and "v5p-8" in out.stderr


@pytest.mark.slow
def test_aot_7b_step_that_cannot_fit_a_v5e_8_exits_3_naming_what_to_change(tmp_path):
    # parameters replicated on every chip (data parallelism only): 8.4 B x 12 bytes of weights and Adam moments
    pytest.importorskip("libtpu")
    out = subprocess.run([sys.executable, "train.py", "--model", "7b", "--aot-topology", "v5e-8", "--data-parallel",
                          "8", "--fsdp", "1", "--global-batch", "16", "--aot-seq-len", "256"],
                         cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 3, out.stderr[-2000:]
    report = json.loads(out.stdout)
    assert report["fits"] is False and report["memory_per_chip_gib"]["total"] > report["hbm_per_chip_gib"]
    assert "does not fit on v5e-8" in out.stderr and "opt_state" in out.stderr and "raise --fsdp" in out.stderr
