"""Log-mel features computed in batches on the training device, with an on-disk cache.

On a small CPU the STFT dominates training time, so the deterministic part of the
features (log-mel + per-clip normalisation) is computed once per feature config and
cached; only the cheap random parts (SpecAugment) run per batch. Waveform-level
augmentation changes the STFT input, so when it is on the train split recomputes the
log-mel per batch from the waveforms instead.

Modules (import from them directly; this package re-exports nothing):
    transforms: the torch modules LogMel, SpecAugment and WaveformAugment.
    cache: cached_logmel, the locked on-disk log-mel cache keyed by feature_fingerprint.
    pipeline: FeaturePipeline, which yields FeatureBatch batches of one split on the device.
"""
