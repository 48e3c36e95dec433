"""sluice's shared model code: Qwen2-Audio in Flax and everything the stage scripts share.

Module map (a batch goes manifest -> processor -> qwen2_audio -> loss):
  manifest.py    read / validate / atomically write manifest JSONL rows
  processor.py   audio loading, Whisper log-mel features, Qwen2 tokenizer, chat prompt
  answer.py      the SLU target as compact JSON, and a parser that never raises
  config.py      Qwen2AudioConfig (reads/writes transformers' config.json), presets
  qwen2_audio.py the Flax model: audio_tower, multi_modal_projector, language_model, KV-cache decode
  sharding.py    the named mesh (data / fsdp / tensor) and the logical-axis table
  checkpoint.py  Hugging Face checkpoint directory <-> Flax parameters
  generate.py    jit-compiled greedy and beam search (transformers' generate semantics) over the KV cache
"""
import os

# transformers prints "PyTorch was not found..." on import when torch is absent. We use only its tokenizer,
# config and file utilities and never need torch at run time, so that advice is noise on every run of ours.
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
