"""What spin keeps on disk, and how it is written and read back.

- `files`: atomic writes and the run directory's Parquet files;
- `rundir`: the run directory's layout and its lock;
- `journal`: the step journal, steps.jsonl;
- `models`: Hugging Face model directories (load, save, check, pin a hub revision);
- `gguf_import`: a GGUF file as a model directory (`spin import-gguf`);
- `provenance`: a model directory's fingerprint.
"""
