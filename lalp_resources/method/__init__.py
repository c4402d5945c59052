"""The LALP method itself, with no Dagster import: segmentation rules, windows, tokenization
rules, answer verification, aggregation, ranking and selection. Its definition is docs/method.md."""
