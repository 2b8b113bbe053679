import dataclasses
import threading

import numpy as np
import pytest
import torch
import torchaudio
from omegaconf import OmegaConf

from common.config import FeatureConfig, run_defaults
from trainable.features.cache import cached_logmel, feature_fingerprint
from trainable.features.pipeline import FeaturePipeline
from trainable.features.transforms import LogMel, SpecAugment, WaveformAugment

DEVICE_DATA_SHARE = run_defaults()["train"]["device_data_share"]  # the schema's

SAMPLE_RATE = 16000


@pytest.fixture(autouse=True)
def _single_thread():
    torch.set_num_threads(1)


def synth_waveforms(num_clips: int, num_samples: int = 4000, seed: int = 0) -> np.ndarray:
    """Tones at clip-specific pitches plus a little noise: distinct, non-silent spectra."""
    rng = np.random.default_rng(seed)
    t = np.arange(num_samples) / SAMPLE_RATE
    pitches = rng.uniform(100, 4000, size=(num_clips, 1))
    tones = 0.5 * np.sin(2 * np.pi * pitches * t)
    return (tones + 0.01 * rng.standard_normal((num_clips, num_samples))).astype(np.float32)


def no_masks(**overrides) -> FeatureConfig:
    return FeatureConfig(freq_masks=0, time_masks=0, **overrides)


@pytest.mark.parametrize(
    ("n_mels", "hop_length", "num_samples"),
    [(32, 160, 4000), (64, 160, 16000), (128, 256, 3000), (64, 100, 1234)],
)
def test_logmel_shapes(n_mels, hop_length, num_samples):
    cfg = FeatureConfig(n_mels=n_mels, hop_length=hop_length)
    out = LogMel(cfg)(torch.from_numpy(synth_waveforms(3, num_samples)))
    assert out.shape == (3, 1, n_mels, num_samples // hop_length + 1)
    assert out.shape[-1] == cfg.frames(num_samples)
    assert torch.isfinite(out).all()


def test_default_clip_gives_101_frames():
    out = LogMel(FeatureConfig())(torch.zeros(2, SAMPLE_RATE))
    assert out.shape == (2, 1, 64, 101)
    assert torch.isfinite(out).all()  # silent clips: log floor + eps keep them finite


@pytest.mark.parametrize(("normalize", "dims"), [("per_band", (-1,)), ("global", (-2, -1))])
def test_normalisation_standardises_each_clip(normalize, dims):
    out = LogMel(FeatureConfig(normalize=normalize))(torch.from_numpy(synth_waveforms(2)))
    std, mean = torch.std_mean(out, dim=dims, correction=0)
    assert torch.allclose(mean, torch.zeros_like(mean), atol=1e-4)
    assert torch.allclose(std, torch.ones_like(std), atol=1e-3)


def test_unnormalised_logmel_is_log_of_melspectrogram():
    cfg = FeatureConfig(normalize="none", log_floor=1e-4)
    waveforms = torch.from_numpy(synth_waveforms(2))
    reference = torchaudio.transforms.MelSpectrogram(
        sample_rate=SAMPLE_RATE, n_fft=1024, hop_length=160, f_min=20.0, f_max=8000.0, n_mels=64
    )(waveforms)
    expected = torch.log(torch.clamp(reference, min=1e-4)).unsqueeze(1)
    assert torch.allclose(LogMel(cfg)(waveforms), expected, atol=1e-5)


def test_spec_augment_is_identity_in_eval_and_masks_in_train():
    features = LogMel(FeatureConfig())(torch.from_numpy(synth_waveforms(4)))
    augment = SpecAugment(FeatureConfig(freq_mask_param=20, time_mask_param=30))
    assert torch.equal(augment.eval()(features), features)
    torch.manual_seed(0)
    masked = augment.train()(features)
    assert masked.shape == features.shape
    changed = masked != features
    assert changed.any()
    # masked cells hold the clip mean (0 for normalised features)
    clip_means = features.mean(dim=(-2, -1), keepdim=True).expand_as(features)
    assert torch.allclose(masked[changed], clip_means[changed], atol=1e-5)


def test_spec_augment_masks_are_per_example():
    one_clip = LogMel(FeatureConfig())(torch.from_numpy(synth_waveforms(1)))
    batch = one_clip.repeat(8, 1, 1, 1)
    torch.manual_seed(1)
    masked = SpecAugment(FeatureConfig(freq_mask_param=20, time_mask_param=30)).train()(batch)
    distinct_masks = {tuple((masked[i] != batch[i]).flatten().tolist()) for i in range(8)}
    assert len(distinct_masks) > 1


def masked_widths(augmented: torch.Tensor, original: torch.Tensor, axis: int) -> torch.Tensor:
    """Per example, how many whole mel rows (axis=-2) or frames (axis=-1) were masked."""
    changed = augmented != original
    return changed.all(dim=-1 if axis == -2 else -2).sum(dim=-1).flatten()


@pytest.mark.parametrize("axis", [-2, -1])
def test_spec_augment_mask_widths_match_torchaudio(axis):
    # one mask per example: width is uniform in [0, mask_param) for torchaudio's iid masks and ours
    batch = torch.randn(4000, 1, 64, 30)
    if axis == -2:
        ours = SpecAugment(FeatureConfig(freq_masks=1, freq_mask_param=8, time_masks=0))
        reference = torchaudio.transforms.FrequencyMasking(8, iid_masks=True)
    else:
        ours = SpecAugment(FeatureConfig(freq_masks=0, time_masks=1, time_mask_param=8))
        reference = torchaudio.transforms.TimeMasking(8, iid_masks=True)
    torch.manual_seed(0)
    augmented = ours.train()(batch)
    our_widths = masked_widths(augmented, batch, axis)
    reference_widths = masked_widths(reference(batch, mask_value=1e9), batch, axis)
    assert our_widths.max() == 7 == reference_widths.max()
    assert abs(our_widths.float().mean() - 3.5) < 0.15
    assert abs(reference_widths.float().mean() - 3.5) < 0.15
    # masks are whole mel rows (frequency masks) or whole frames (time masks)
    changed = augmented != batch
    whole_lines = changed.all(dim=-1 if axis == -2 else -2, keepdim=True)
    assert torch.equal(changed, whole_lines.expand_as(changed))


def test_spec_augment_clamps_masks_wider_than_the_clip():
    batch = torch.randn(64, 1, 16, 5)
    torch.manual_seed(0)
    masked = SpecAugment(FeatureConfig(freq_masks=0, time_masks=1, time_mask_param=50)).train()(batch)
    widths = masked_widths(masked, batch, -1)
    assert widths.max() <= 5 and widths.float().mean() > 1


def test_spec_augment_is_deterministic_under_manual_seed():
    features = LogMel(FeatureConfig())(torch.from_numpy(synth_waveforms(4)))
    augment = SpecAugment(FeatureConfig()).train()
    torch.manual_seed(123)
    first = augment(features)
    torch.manual_seed(123)
    second = augment(features)
    third = augment(features)
    assert torch.equal(first, second)
    assert not torch.equal(second, third)


def test_waveform_augment_gain_and_noise():
    waveforms = torch.from_numpy(synth_waveforms(16, 8000))
    gain = WaveformAugment(FeatureConfig(gain_db=6.0, normalize="none"))
    assert torch.equal(gain.eval()(waveforms), waveforms)
    ratio_db = 20 * torch.log10(gain.train()(waveforms).abs().amax(dim=1) / waveforms.abs().amax(dim=1))
    assert (ratio_db.abs() <= 6.0 + 1e-4).all()
    assert ratio_db.std() > 0.5  # a different gain per example

    noisy = WaveformAugment(FeatureConfig(noise_snr_db=10.0)).train()(waveforms)
    noise_power = (noisy - waveforms).pow(2).mean(dim=1)
    snr_db = 10 * torch.log10(waveforms.pow(2).mean(dim=1) / noise_power)
    assert torch.allclose(snr_db, torch.full_like(snr_db, 10.0), atol=0.5)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"n_mels": 256, "n_fft": 1024}, r"n_mels=256 is too high for n_fft=1024.*lower n_mels or raise n_fft"),
        ({"n_mels": 128, "n_fft": 512}, r"n_mels=128 is too high for n_fft=512"),
        ({"f_max": 9000.0}, r"f_max=9000.0 exceeds the Nyquist.*set f_max <= 8000"),
        ({"f_min": 8000.0}, r"f_min=8000.0 must be below f_max"),
        ({"hop_length": 0}, r"hop_length=0 must be a positive integer"),
        ({"n_fft": -1}, r"n_fft=-1 must be a positive integer"),
        ({"normalize": "dataset"}, r"normalize='dataset' must be one of"),
        ({"log_floor": 0.0}, r"log_floor=0.0 must be > 0"),
        ({"freq_mask_param": 100}, r"freq_mask_param=100 is wider than the mel axis"),
        ({"gain_db": -3.0}, r"gain_db=-3.0"),
        ({"gain_db": 3.0}, r"gain_db=3.0 has no effect with normalize='per_band'.*set gain_db=0 or normalize='none'"),
        ({"noise_snr_db": float("nan")}, r"noise_snr_db=nan"),
        ({"time_masks": 1.5}, r"time_masks=1.5 must be a non-negative integer"),
    ],
)
def test_invalid_configs_raise_clear_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        FeatureConfig(**overrides)


def test_from_mapping_accepts_omegaconf_and_rejects_unknown_keys():
    node = OmegaConf.create({"n_mels": 32, "hop_length": 320, "noise_snr_db": 20})
    cfg = FeatureConfig.from_mapping(node)
    assert (cfg.n_mels, cfg.hop_length, cfg.noise_snr_db) == (32, 320, 20)
    assert cfg.waveform_augmentation
    with pytest.raises(ValueError, match=r"unknown feature config key\(s\) \['n_mel'\]"):
        FeatureConfig.from_mapping({"n_mel": 32})
    with pytest.raises(ValueError, match="n_mels=256 is too high"):
        FeatureConfig.from_mapping({"n_mels": 256})


def test_fingerprint_ignores_augmentation_but_not_feature_params():
    base = FeatureConfig()
    assert feature_fingerprint("w1", base) == feature_fingerprint("w1", FeatureConfig(noise_snr_db=10.0, freq_masks=0))
    assert feature_fingerprint("w1", base) == feature_fingerprint("w1", FeatureConfig(f_min=20))
    assert feature_fingerprint("w1", base) != feature_fingerprint("w2", base)
    assert feature_fingerprint("w1", base) != feature_fingerprint("w1", FeatureConfig(n_mels=32))
    assert feature_fingerprint("w1", base) != feature_fingerprint("w1", FeatureConfig(normalize="global"))


@pytest.fixture
def logmel_calls(monkeypatch):
    """Counts LogMel forward calls, to tell cache hits from rebuilds."""
    calls = []
    original = LogMel.forward

    def counting_forward(self, waveforms):
        calls.append(len(waveforms))
        return original(self, waveforms)

    monkeypatch.setattr(LogMel, "forward", counting_forward)
    return calls


def test_cache_equals_direct_logmel_and_second_call_is_a_hit(tmp_path, logmel_calls):
    waveforms = synth_waveforms(7)
    cfg = FeatureConfig()
    first = cached_logmel(waveforms, "wave-a", cfg, tmp_path, "cpu", batch_size=3)
    assert logmel_calls == [3, 3, 1]
    direct = LogMel(cfg)(torch.from_numpy(waveforms))
    assert first.shape == (7, 1, 64, cfg.frames(4000)) and first.dtype == torch.float32
    assert torch.allclose(first, direct, atol=1e-5)

    (cache_file,) = tmp_path.iterdir()
    assert cache_file.name == f"logmel-{feature_fingerprint('wave-a', cfg)}.npy"
    mtime = cache_file.stat().st_mtime_ns
    logmel_calls.clear()
    second = cached_logmel(waveforms, "wave-a", FeatureConfig(noise_snr_db=10.0), tmp_path, "cpu")
    assert logmel_calls == []
    assert cache_file.stat().st_mtime_ns == mtime
    assert torch.equal(first, second)


def test_new_params_or_waveforms_get_their_own_cache_file(tmp_path):
    waveforms = synth_waveforms(3)
    cached_logmel(waveforms, "wave-a", FeatureConfig(), tmp_path, "cpu")
    fewer_mels = cached_logmel(waveforms, "wave-a", FeatureConfig(n_mels=32), tmp_path, "cpu")
    cached_logmel(synth_waveforms(3, seed=1), "wave-b", FeatureConfig(), tmp_path, "cpu")
    assert fewer_mels.shape[2] == 32
    assert len(list(tmp_path.glob("logmel-*.npy"))) == 3
    assert sorted(p.suffix for p in tmp_path.iterdir()) == [".npy"] * 3  # no temp files left behind


def test_failed_build_leaves_no_files(tmp_path, monkeypatch):
    def failing_forward(self, waveforms):
        raise RuntimeError("device lost")

    monkeypatch.setattr(LogMel, "forward", failing_forward)
    with pytest.raises(RuntimeError, match="device lost"):
        cached_logmel(synth_waveforms(3), "wave-a", FeatureConfig(), tmp_path, "cpu")
    assert list(tmp_path.iterdir()) == []


def test_concurrent_builders_agree_and_leave_one_file(tmp_path):
    waveforms = synth_waveforms(6)
    results, errors = [], []

    def build():
        try:
            results.append(cached_logmel(waveforms, "wave-a", FeatureConfig(), tmp_path, "cpu", batch_size=2))
        except Exception as error:  # surfaced by the assertion below
            errors.append(error)

    threads = [threading.Thread(target=build) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert all(torch.equal(result, results[0]) for result in results)
    assert [p.suffix for p in tmp_path.iterdir()] == [".npy"]


def test_cache_with_wrong_shape_is_rejected(tmp_path):
    cached_logmel(synth_waveforms(3), "wave-a", FeatureConfig(), tmp_path, "cpu")
    with pytest.raises(ValueError, match="does not identify these waveforms"):
        cached_logmel(synth_waveforms(4), "wave-a", FeatureConfig(), tmp_path, "cpu")


def make_pipeline(tmp_path, cfg: FeatureConfig, num_clips: int = 10) -> FeaturePipeline:
    labels = np.arange(num_clips) % 3 + 5
    return FeaturePipeline(synth_waveforms(num_clips), labels, "wave-a", cfg, "cpu", tmp_path, DEVICE_DATA_SHARE)


@pytest.mark.parametrize("train", [True, False])
def test_pipeline_yields_every_clip_once_with_its_label(tmp_path, train):
    pipeline = make_pipeline(tmp_path, FeatureConfig())
    batches = list(pipeline.batches(4, train=train, generator=torch.Generator().manual_seed(0)))
    assert [len(batch.indices) for batch in batches] == [4, 4, 2] == [len(b.features) for b in batches]
    indices = torch.cat([batch.indices for batch in batches])
    assert sorted(indices.tolist()) == list(range(10))
    assert indices.tolist() != list(range(10)) if train else indices.tolist() == list(range(10))
    labels = torch.cat([batch.labels for batch in batches])
    assert torch.equal(labels, indices % 3 + 5)
    assert all(batch.features.shape[1:] == (1, 64, 26) for batch in batches)
    assert pipeline.num_batches(4) == 3


def test_pipeline_drop_last(tmp_path):
    pipeline = make_pipeline(tmp_path, FeatureConfig())
    assert [len(b.indices) for b in pipeline.batches(4, train=True, drop_last=True)] == [4, 4]
    assert pipeline.num_batches(4, drop_last=True) == 2


def test_pipeline_features_are_the_cached_rows_without_augmentation(tmp_path):
    cfg = no_masks()
    pipeline = make_pipeline(tmp_path, cfg)
    cached = cached_logmel(pipeline.waveforms, "wave-a", cfg, tmp_path, "cpu")
    for train in (True, False):
        for batch in pipeline.batches(3, train=train, generator=torch.Generator().manual_seed(1)):
            assert torch.equal(batch.features, cached[batch.indices])


def test_pipeline_order_is_deterministic_under_a_generator_seed(tmp_path):
    pipeline = make_pipeline(tmp_path, FeatureConfig())

    def epoch(seed):
        torch.manual_seed(seed)  # SpecAugment draws from the global RNG
        batches = list(pipeline.batches(4, train=True, generator=torch.Generator().manual_seed(seed)))
        return torch.cat([b.indices for b in batches]), torch.cat([b.features for b in batches])

    first, again, other = epoch(7), epoch(7), epoch(8)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.equal(first[0], other[0])


def test_pipeline_eval_is_unaugmented_and_train_is_augmented(tmp_path):
    pipeline = make_pipeline(tmp_path, FeatureConfig())
    cached = cached_logmel(pipeline.waveforms, "wave-a", FeatureConfig(), tmp_path, "cpu")
    eval_features = torch.cat([b.features for b in pipeline.batches(4, train=False)])
    assert torch.equal(eval_features, cached)
    train_batch = next(pipeline.batches(10, train=True))
    assert not torch.equal(train_batch.features, cached[train_batch.indices])


def test_pipeline_with_waveform_augmentation_recomputes_train_batches(tmp_path, logmel_calls):
    cfg = no_masks(noise_snr_db=20.0)
    pipeline = make_pipeline(tmp_path, cfg)
    train_batches = list(pipeline.batches(4, train=True, generator=torch.Generator().manual_seed(0)))
    assert logmel_calls == [4, 4, 2]
    assert list(tmp_path.iterdir()) == []  # the train epoch never needed the cache
    clean = LogMel(cfg)(torch.from_numpy(pipeline.waveforms))
    for batch in train_batches:
        assert batch.features.shape == (len(batch.indices), 1, 64, 26)
        assert not torch.allclose(batch.features, clean[batch.indices], atol=1e-3)
    eval_features = torch.cat([b.features for b in pipeline.batches(4, train=False)])
    assert torch.allclose(eval_features, clean, atol=1e-5)


def test_pipeline_rejects_mismatched_inputs(tmp_path):
    with pytest.raises(ValueError, match="9 labels for 10 waveforms"):
        FeaturePipeline(synth_waveforms(10), np.zeros(9), "w", FeatureConfig(), "cpu", tmp_path, DEVICE_DATA_SHARE)
    with pytest.raises(ValueError, match="batch_size=0"):
        next(make_pipeline(tmp_path, FeatureConfig()).batches(0, train=False))


def test_config_is_immutable():
    with pytest.raises(dataclasses.FrozenInstanceError):
        FeatureConfig().n_mels = 32
