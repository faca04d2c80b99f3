"""Evaluation without CLIP: a pixel-analysis judge of shapes images (judge), its shape classifier
(classifier), and the `unclip eval` run that generates, judges and aggregates (report)."""
