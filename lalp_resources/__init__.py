"""What touches the outside world: the student model and scoring engine, the DuckDB warehouse,
trace sources, the segmentation endpoint and the Great Expectations suites. The Dagster
`ConfigurableResource` wrappers live in `lalp_resources.resources`; the other modules import
without Dagster."""
