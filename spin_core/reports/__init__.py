"""What a run tells its user: reports, statistics, comparisons, tracking, checks.

- `report`: metrics.parquet, report.md and its plots;
- `significance`: paired tests and bootstrap intervals between models;
- `compare` and `compare_report`: SPIN against SFT over seeds (`spin compare`);
- `tracking`: MLflow and Weights & Biases;
- `preflight`: `spin check`, the pre-flight of a config;
- `status`: `spin status`, where a run stands after the fact.
"""
