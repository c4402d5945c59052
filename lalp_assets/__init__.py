"""LALP asset graph. Kept import-light: the Dagster `Definitions` live in `lalp_assets.definitions`,
so the pure modules here (segmentation, windows, aggregation) import without Dagster."""
