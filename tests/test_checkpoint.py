"""model/checkpoint.py against transformers' own Qwen2AudioForConditionalGeneration and its save_pretrained.

Tiny random models with odd sizes (so a transposed or swapped axis shows up as a shape or value error),
2 layers per stack, every weight re-drawn at random (HF's init leaves norms at 1 and biases at 0, which would
hide a mix-up between layers or between scale and bias).
"""
import json
import os
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from safetensors import safe_open
from safetensors.numpy import save_file
from transformers import Qwen2AudioConfig, Qwen2AudioForConditionalGeneration

from model import checkpoint
from model.checkpoint import load_hf, save_hf

AUDIO_TOKEN = 103
N_MELS, D, FFN = 12, 20, 36
H, I, V = 24, 40, 104  # 3 query heads x 8, 1 kv head


def tiny_config() -> Qwen2AudioConfig:
    return Qwen2AudioConfig(
        audio_config=dict(d_model=D, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=FFN,
                          num_mel_bins=N_MELS, max_source_positions=1500),
        text_config=dict(hidden_size=H, intermediate_size=I, num_hidden_layers=2, num_attention_heads=3,
                         num_key_value_heads=1, vocab_size=V, max_position_embeddings=1024),
        audio_token_index=AUDIO_TOKEN,
    )


@pytest.fixture(scope="module")
def torch_model():
    torch.manual_seed(0)
    model = Qwen2AudioForConditionalGeneration(tiny_config()).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    return model


@pytest.fixture(scope="module")
def hf_dirs(torch_model, tmp_path_factory):
    """The same model written by save_pretrained three ways: one file, shards (+ index), bf16."""
    root = tmp_path_factory.mktemp("hf")
    torch_model.save_pretrained(root / "single")
    torch_model.save_pretrained(root / "sharded", max_shard_size="40KB")
    Qwen2AudioForConditionalGeneration.from_pretrained(root / "single", dtype=torch.bfloat16).save_pretrained(
        root / "bf16")
    (root / "single" / "tokenizer_config.json").write_text('{"model_max_length": 7}\n')
    return {name: root / name for name in ("single", "sharded", "bf16")}


def read_tensors(model_dir: Path) -> dict[str, np.ndarray]:
    files = sorted(model_dir.glob("*.safetensors"))
    out = {}
    for f in files:
        with safe_open(str(f), framework="numpy") as h:
            for k in h.keys():
                out[k] = h.get_tensor(k)
    return out


def assert_same_tensors(a: dict, b: dict):
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert a[k].shape == b[k].shape, k
        assert a[k].tobytes() == b[k].tobytes(), k


# ----------------------------------------------------------------------------------------------- round trips


def test_single_file_round_trip_is_bit_exact_with_save_pretrained(hf_dirs, tmp_path):
    config, params = load_hf(hf_dirs["single"])
    out = save_hf(params, config, tmp_path / "out", extra_files_from=hf_dirs["single"])
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors", "tokenizer_config.json"]
    assert_same_tensors(read_tensors(hf_dirs["single"]), read_tensors(out))
    assert json.loads((out / "config.json").read_text()) == json.loads((hf_dirs["single"] / "config.json").read_text())
    assert (out / "tokenizer_config.json").read_bytes() == (hf_dirs["single"] / "tokenizer_config.json").read_bytes()
    with safe_open(str(out / "model.safetensors"), framework="numpy") as h:
        assert h.metadata() == {"format": "pt"}  # transformers refuses files without a known format


def test_sharded_round_trip_is_bit_exact_and_index_matches_files(hf_dirs, tmp_path):
    assert (hf_dirs["sharded"] / "model.safetensors.index.json").is_file()
    config, params = load_hf(hf_dirs["sharded"])
    limit = 30_000
    out = save_hf(params, config, tmp_path / "out", max_shard_bytes=limit)
    original = read_tensors(hf_dirs["sharded"])
    assert_same_tensors(original, read_tensors(out))

    index = json.loads((out / "model.safetensors.index.json").read_text())
    shard_files = sorted(p.name for p in out.glob("*.safetensors"))
    n = len(shard_files)
    assert n > 2 and shard_files == [f"model-{k:05d}-of-{n:05d}.safetensors" for k in range(1, n + 1)]
    for f in shard_files:
        with safe_open(str(out / f), framework="numpy") as h:
            keys = list(h.keys())
            assert all(index["weight_map"][k] == f for k in keys)
            size = sum(h.get_tensor(k).nbytes for k in keys)
            assert size <= limit or len(keys) == 1  # only a single oversized tensor may exceed the limit
    assert sorted(index["weight_map"]) == sorted(original)
    # The same metadata transformers computes: parameter count and bytes of every saved tensor.
    reference_index = json.loads((hf_dirs["sharded"] / "model.safetensors.index.json").read_text())
    assert index["metadata"] == reference_index["metadata"]


def test_bf16_checkpoint_loads_as_bf16_and_round_trips_bit_exact(hf_dirs, tmp_path):
    config, params = load_hf(hf_dirs["bf16"])
    assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}
    out = save_hf(params, config, tmp_path / "out")
    assert_same_tensors(read_tensors(hf_dirs["bf16"]), read_tensors(out))


def test_dtype_argument_casts_like_torch(hf_dirs, torch_model):
    _, params = load_hf(hf_dirs["single"], dtype=jnp.bfloat16)
    got = np.asarray(params["language_model"]["layers"]["mlp"]["up_proj"]["kernel"][1])
    want = torch_model.model.language_model.layers[1].mlp.up_proj.weight.detach().to(torch.bfloat16).float().T
    assert got.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(got.astype(np.float32), want.numpy())


# --------------------------------------------------------------------------------- exported dir in transformers


def test_exported_dir_gives_the_same_logits_in_transformers(hf_dirs, torch_model, tmp_path):
    config, params = load_hf(hf_dirs["sharded"])
    out = save_hf(params, config, tmp_path / "out", max_shard_bytes=50_000)
    reloaded, info = Qwen2AudioForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    # from_pretrained silently random-initialises weights it cannot find: there must be none.
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    reloaded.eval()

    g = torch.Generator().manual_seed(1)
    text_ids = torch.randint(0, AUDIO_TOKEN, (1, 11), generator=g)
    # 3000 mel frames -> 1500 after the stride-2 conv -> 750 audio tokens after pooling.
    n_audio = 750
    audio_ids = torch.cat([text_ids[:, :3], torch.full((1, n_audio), AUDIO_TOKEN), text_ids[:, 3:]], dim=1)
    features = torch.randn(1, N_MELS, 3000, generator=g)
    with torch.no_grad():
        for model_kwargs in (dict(input_ids=text_ids),
                             dict(input_ids=audio_ids, input_features=features,
                                  feature_attention_mask=torch.ones(1, 3000, dtype=torch.long))):
            want = torch_model(**model_kwargs).logits
            got = reloaded(**model_kwargs).logits
            torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


# --------------------------------------------------------------------------------------------- pinned layout


def test_loaded_tree_follows_the_pinned_layout_and_computes_like_torch(hf_dirs, torch_model):
    _, params = load_hf(hf_dirs["single"])
    a, t = params["audio_tower"], params["language_model"]
    shapes = [
        (a["conv1"]["kernel"], (3, N_MELS, D)), (a["conv2"]["kernel"], (3, D, D)),
        (a["embed_positions"]["embedding"], (1500, D)),
        (a["layers"]["self_attn"]["k_proj"]["kernel"], (2, D, D)), (a["layers"]["fc1"]["kernel"], (2, D, FFN)),
        (a["layers"]["self_attn_layer_norm"]["scale"], (2, D)),
        (params["multi_modal_projector"]["linear"]["kernel"], (D, H)),
        (t["embed_tokens"]["embedding"], (V, H)), (t["layers"]["self_attn"]["k_proj"]["kernel"], (2, H, 8)),
        (t["layers"]["self_attn"]["o_proj"]["kernel"], (2, H, H)),
        (t["layers"]["mlp"]["down_proj"]["kernel"], (2, I, H)),
        (t["norm"]["scale"], (H,)), (params["lm_head"]["kernel"], (H, V)),
    ]
    for x, shape in shapes:
        assert x.shape == shape
    assert "bias" not in a["layers"]["self_attn"]["k_proj"] and "bias" not in t["layers"]["self_attn"]["o_proj"]

    tm = torch_model.model
    x = torch.randn(2, 17, N_MELS)
    # Flax Conv with the loaded [width, in, out] kernel == torch Conv1d (channels-first) on the same input.
    conv = nn.Conv(D, kernel_size=(3,), padding=1).apply({"params": a["conv1"]}, jnp.asarray(x.numpy()))
    want = tm.audio_tower.conv1(x.transpose(1, 2)).transpose(1, 2)
    np.testing.assert_allclose(np.asarray(conv), want.detach().numpy(), rtol=1e-5, atol=1e-5)
    # Dense with layer 1 of the stacked q_proj == torch layer 1 (not layer 0): the stacked axis is the layer.
    h = torch.randn(5, H)
    layer1 = jax.tree.map(lambda leaf: leaf[1], t["layers"]["self_attn"]["q_proj"])
    dense = nn.Dense(H).apply({"params": layer1}, jnp.asarray(h.numpy()))
    want = tm.language_model.layers[1].self_attn.q_proj(h)
    np.testing.assert_allclose(np.asarray(dense), want.detach().numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(a["layers"]["final_layer_norm"]["bias"][0]),
                                  tm.audio_tower.layers[0].final_layer_norm.bias.detach().numpy())
    np.testing.assert_array_equal(np.asarray(params["lm_head"]["kernel"]),
                                  torch_model.lm_head.weight.detach().numpy().T)


def test_every_torch_weight_lands_in_its_pinned_leaf_in_flax_axis_order(hf_dirs, torch_model):
    # The pinned tree mirrors the torch module names: drop transformers 5's "model." wrapper, stack
    # "layers.{i}", and name the tensor by module type (Flax Dense/Conv "kernel", Embed "embedding",
    # norms "scale"). The axis order also follows from the module type alone, not from our table.
    _, params = load_hf(hf_dirs["single"])
    covered = set()
    for name, w in torch_model.named_parameters():
        parts = name.removeprefix("model.").split(".")
        module = torch_model.get_submodule(name.rsplit(".", 1)[0])
        w = w.detach().numpy()
        if parts[-1] == "weight":
            if isinstance(module, torch.nn.Linear):
                parts[-1], w = "kernel", w.T
            elif isinstance(module, torch.nn.Conv1d):
                parts[-1], w = "kernel", w.transpose(2, 1, 0)
            elif isinstance(module, torch.nn.Embedding):
                parts[-1] = "embedding"
            else:
                assert "Norm" in type(module).__name__, name
                parts[-1] = "scale"
        layer = None
        if "layers" in parts:
            at = parts.index("layers")
            layer = int(parts.pop(at + 1))
        leaf = params
        for key in parts:
            leaf = leaf[key]
        leaf = np.asarray(leaf if layer is None else leaf[layer])
        np.testing.assert_array_equal(leaf, w, err_msg=name)
        covered.add(tuple(parts))
    every_leaf = {tuple(k.key for k in path) for path, _ in jax.tree_util.tree_leaves_with_path(params)}
    assert covered == every_leaf  # and no leaf of ours is made of something torch does not have


def test_checkpoint_with_inmemory_tensor_names_loads_to_the_same_params(hf_dirs, tmp_path):
    # save_pretrained (and the hub checkpoint Qwen/Qwen2-Audio-7B-Instruct) use audio_tower.*,
    # language_model.model.*, language_model.lm_head.weight; transformers 5's state_dict() uses model.*.
    on_disk = read_tensors(hf_dirs["single"])
    assert "language_model.lm_head.weight" in on_disk and "language_model.model.norm.weight" in on_disk
    renamed = {}
    for k, v in on_disk.items():
        if k.startswith("language_model.lm_head."):
            k = k.replace("language_model.lm_head.", "lm_head.")
        elif k.startswith("language_model.model."):
            k = k.replace("language_model.model.", "model.language_model.")
        else:
            k = "model." + k
        renamed[k] = v
    # The renamed set is exactly what transformers holds in memory, so this is the other real naming.
    assert sorted(renamed) == sorted(Qwen2AudioForConditionalGeneration(tiny_config()).state_dict())
    other = tmp_path / "inmemory"
    other.mkdir()
    (other / "config.json").write_bytes((hf_dirs["single"] / "config.json").read_bytes())
    save_file(renamed, str(other / "model.safetensors"), metadata={"format": "pt"})

    _, want = load_hf(hf_dirs["single"])
    _, got = load_hf(other)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    jax.tree.map(np.testing.assert_array_equal, got, want)


# -------------------------------------------------------------------------------------------------- bad input


def copy_dir(src: Path, dst: Path, drop: str | None = None, change: tuple | None = None) -> Path:
    dst.mkdir()
    (dst / "config.json").write_bytes((src / "config.json").read_bytes())
    tensors = read_tensors(src)
    if drop:
        del tensors[drop]
    if change:
        tensors[change[0]] = change[1]
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def test_missing_config_json_names_the_file(hf_dirs, tmp_path):
    d = copy_dir(hf_dirs["single"], tmp_path / "m")
    (d / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"m/config\.json"):
        load_hf(d)


def test_missing_weights_file_says_what_was_expected(hf_dirs, tmp_path):
    d = copy_dir(hf_dirs["single"], tmp_path / "m")
    (d / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors"):
        load_hf(d)


def test_missing_tensor_is_named(hf_dirs, tmp_path):
    d = copy_dir(hf_dirs["single"], tmp_path / "m", drop="language_model.model.layers.1.self_attn.v_proj.bias")
    with pytest.raises(KeyError, match=r"language_model\.model\.layers\.1\.self_attn\.v_proj\.bias"):
        load_hf(d)


def test_wrong_shape_names_tensor_and_both_shapes(hf_dirs, tmp_path):
    d = copy_dir(hf_dirs["single"], tmp_path / "m",
                 change=("audio_tower.layers.0.fc1.weight", np.zeros((FFN, D + 1), np.float32)))
    with pytest.raises(ValueError, match=r"audio_tower\.layers\.0\.fc1\.weight has shape \[36, 21\], "
                                         r"expected \[36, 20\]"):
        load_hf(d)


def test_unexpected_tensor_is_named(hf_dirs, tmp_path):
    d = copy_dir(hf_dirs["single"], tmp_path / "m",
                 change=("language_model.model.layers.2.input_layernorm.weight", np.ones(H, np.float32)))
    with pytest.raises(ValueError, match=r"unexpected.*layers\.2\.input_layernorm\.weight.*model\.safetensors"):
        load_hf(d)


# ---------------------------------------------------------------------------------------- sharded placement


def test_shardings_place_every_leaf_on_the_mesh(hf_dirs):
    assert jax.device_count() == 8
    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("layer", "model"))
    replicated = NamedSharding(mesh, P())
    config, host_params = load_hf(hf_dirs["single"])
    shardings = jax.tree.map(lambda _: replicated, host_params)
    # Stacked leaves split over their layer axis, the vocabulary over 'model': both spread the data out.
    for stack in (shardings["audio_tower"]["layers"], shardings["language_model"]["layers"]):
        stack.update(jax.tree.map(lambda _: NamedSharding(mesh, P("layer")), stack))
    shardings["language_model"]["embed_tokens"]["embedding"] = NamedSharding(mesh, P("model", None))
    shardings["lm_head"]["kernel"] = NamedSharding(mesh, P(None, "model"))

    _, params = load_hf(hf_dirs["single"], shardings=shardings)
    for got, want_sharding, want in zip(jax.tree.leaves(params), jax.tree.leaves(shardings),
                                        jax.tree.leaves(host_params)):
        assert got.sharding.is_equivalent_to(want_sharding, got.ndim)
        assert len(got.sharding.device_set) == 8
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    embed = params["language_model"]["embed_tokens"]["embedding"]
    assert {s.data.shape for s in embed.addressable_shards} == {(V // 4, H)}
    assert {s.data.shape[0] for s in params["audio_tower"]["layers"]["fc1"]["kernel"].addressable_shards} == {1}


# ------------------------------------------------------------------------------------------------ atomic save


def test_failed_export_leaves_the_existing_dir_intact_and_no_temp_dir(hf_dirs, tmp_path, monkeypatch):
    config, params = load_hf(hf_dirs["single"])
    out = tmp_path / "export"
    out.mkdir()
    (out / "old.txt").write_text("previous export")

    real_save_file, calls = checkpoint.save_file, []

    def save_file_that_fails_on_the_third_shard(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 3:
            raise OSError("disk full")
        real_save_file(tensors, filename, metadata=metadata)

    monkeypatch.setattr(checkpoint, "save_file", save_file_that_fails_on_the_third_shard)
    with pytest.raises(OSError, match="disk full"):
        save_hf(params, config, out, max_shard_bytes=30_000)
    assert len(calls) == 3
    assert sorted(os.listdir(tmp_path)) == ["export"]
    assert sorted(os.listdir(out)) == ["old.txt"] and (out / "old.txt").read_text() == "previous export"

    monkeypatch.setattr(checkpoint, "save_file", real_save_file)
    save_hf(params, config, out, max_shard_bytes=30_000)
    assert sorted(os.listdir(tmp_path)) == ["export"]  # the old copy set aside during the swap is gone too
    assert not (out / "old.txt").exists() and (out / "model.safetensors.index.json").is_file()
    assert_same_tensors(read_tensors(hf_dirs["single"]), read_tensors(out))


def test_hf_dir_loaded_by_load_hf_gives_transformers_logits_through_our_forward(hf_dirs, torch_model):
    # The whole path a user takes: save_pretrained directory -> load_hf -> our Flax forward, against torch.
    from model import qwen2_audio as qa
    from model.config import Qwen2AudioConfig as OurConfig

    hf_config, params = load_hf(hf_dirs["single"])
    config = OurConfig.from_hf_dict(hf_config)
    abstract = nn.meta.unbox(qa.abstract_params(config, jnp.float32))
    assert jax.tree_util.tree_structure(abstract) == jax.tree_util.tree_structure(params)
    assert jax.tree.leaves(jax.tree.map(lambda a, p: a.shape == p.shape, abstract, params)) == [True] * len(
        jax.tree.leaves(params))

    rng = np.random.default_rng(0)
    frames = 130
    n_audio = ((frames - 1) // 2 + 1 - 2) // 2 + 1
    ids = np.concatenate([rng.integers(0, 100, 4), [AUDIO_TOKEN] * n_audio, rng.integers(0, 100, 6)])[None]
    mask = np.ones_like(ids)
    feats = rng.standard_normal((1, N_MELS, 3000)).astype(np.float32)
    with torch.no_grad():
        ref = torch_model(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask),
                          input_features=torch.as_tensor(feats),
                          feature_attention_mask=torch.as_tensor((np.arange(3000) < frames)[None].astype(np.int64))
                          ).logits.numpy()
    fwd = jax.jit(qa.forward, static_argnames=("config", "dtype", "remat_policy"))
    ours = fwd(params, config, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(feats[:, :, :200]),
               jnp.asarray([frames]))
    np.testing.assert_allclose(np.asarray(ours), ref, atol=1e-4, rtol=0)


# ------------------------------------------------------------------- permissions, leftovers, extra JSON files


def disk_full(tensors, filename, metadata=None):
    """A save_file that fails like a full disk."""
    raise OSError("disk full")


def test_export_gets_the_umask_permissions_not_the_temp_dirs_0700(hf_dirs, tmp_path):
    config, params = load_hf(hf_dirs["single"])
    previous = os.umask(0o027)
    try:
        out = save_hf(params, config, tmp_path / "out")
    finally:
        os.umask(previous)
    assert out.stat().st_mode & 0o777 == 0o750  # readable by the group like a plain mkdir's folder
    assert {p.stat().st_mode & 0o777 for p in out.iterdir()} == {0o640}


def test_folders_a_killed_export_left_behind_are_removed_by_the_next_export(hf_dirs, tmp_path):
    # What save_hf's own mkdtemp calls leave when the process dies before its cleanup runs.
    config, params = load_hf(hf_dirs["single"])
    out = save_hf(params, config, tmp_path / "hf")
    half_written = Path(tempfile.mkdtemp(prefix=".hf.tmp-", dir=tmp_path))
    (half_written / "model.safetensors").write_bytes(b"partial")
    set_aside = Path(tempfile.mkdtemp(prefix=".hf.old-", dir=tmp_path))
    (set_aside / "hf").mkdir()
    # Not ours: another export's temp dir whose name begins like ours, and another export's leftovers.
    other_export = Path(tempfile.mkdtemp(prefix=".hf.tmp-x.tmp-", dir=tmp_path))
    other_name = Path(tempfile.mkdtemp(prefix=".hf2.tmp-", dir=tmp_path))
    save_hf(params, config, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["hf", other_export.name, other_name.name])
    assert_same_tensors(read_tensors(hf_dirs["single"]), read_tensors(out))


def test_an_export_killed_between_the_swap_renames_is_restored_when_the_next_export_fails(hf_dirs, tmp_path,
                                                                                         monkeypatch):
    # The swap renames hf -> .hf.old-*/hf, then the new temp dir -> hf: a kill in between leaves no hf at all.
    config, params = load_hf(hf_dirs["single"])
    set_aside = Path(tempfile.mkdtemp(prefix=".hf.old-", dir=tmp_path))
    save_hf(params, config, set_aside / "hf")
    (set_aside / "hf" / "marker.txt").write_text("the previous export")

    monkeypatch.setattr(checkpoint, "save_file", disk_full)
    with pytest.raises(OSError, match="disk full"):
        save_hf(params, config, tmp_path / "hf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]
    assert (tmp_path / "hf" / "marker.txt").read_text() == "the previous export"
    assert_same_tensors(read_tensors(hf_dirs["single"]), read_tensors(tmp_path / "hf"))


def test_extra_json_files_are_written_with_the_weights_and_replaced_only_with_them(hf_dirs, tmp_path, monkeypatch):
    config, params = load_hf(hf_dirs["single"])
    record = {"scheme": "direct", "steps": 3, "finished": True, "losses": [2.5, 1.25]}
    out = save_hf(params, config, tmp_path / "hf", extra_json={"training_run.json": record})
    assert json.loads((out / "training_run.json").read_text()) == record

    real_save_file = checkpoint.save_file
    monkeypatch.setattr(checkpoint, "save_file", disk_full)
    with pytest.raises(OSError, match="disk full"):
        save_hf(params, config, out, extra_json={"training_run.json": {**record, "steps": 4}})
    assert json.loads((out / "training_run.json").read_text()) == record  # no record without its weights

    monkeypatch.setattr(checkpoint, "save_file", real_save_file)
    save_hf(params, config, out, extra_json={"training_run.json": {**record, "steps": 4}})
    assert json.loads((out / "training_run.json").read_text())["steps"] == 4


@pytest.mark.parametrize("extra_json, message", [
    ({"config.json": {}}, r"'config\.json' is a file of the export itself"),
    ({"tokenizer_config.json": {}}, r"'tokenizer_config\.json' is a file of the export itself"),
    ({"../run.json": {}}, r"'\.\./run\.json' is not a plain file name ending in \.json"),
    ({"run.txt": {}}, r"'run\.txt' is not a plain file name"),
    ({"run.json": {"when": object()}}, r"extra_json\['run\.json'\]: not JSON-serialisable"),
], ids=["model_config", "tokenizer_config", "path", "not_json_name", "not_serialisable"])
def test_bad_extra_json_is_refused_before_anything_is_gathered_or_written(hf_dirs, tmp_path, monkeypatch,
                                                                          extra_json, message):
    config, params = load_hf(hf_dirs["single"])
    gathered = []
    monkeypatch.setattr(checkpoint, "host_array", lambda x: gathered.append(x))
    with pytest.raises(ValueError, match=message):
        save_hf(params, config, tmp_path / "hf", extra_json=extra_json)
    assert gathered == [] and list(tmp_path.iterdir()) == []
