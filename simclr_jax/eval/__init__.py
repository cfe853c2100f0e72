"""Evaluation of a pretrained encoder: the evaluation job and its evaluators (linear probe, kNN,
fine-tuning), the one sharded inference helper, evaluation during pretraining, feature extraction
and pictures."""
