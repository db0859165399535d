import pytest

from spin_core.config import (
    ConfigError,
    SpinConfig,
    deepspeed_config,
    load_config,
    result_changing_differences,
    schedule_at,
)


def _write(tmp_path, text):
    path = tmp_path / "spin.yaml"
    path.write_text(text)
    return path


def test_defaults_follow_the_paper():
    cfg = SpinConfig()
    assert cfg.training.beta == 0.1
    assert cfg.training.optimizer == "rmsprop"
    assert cfg.training.weight_decay == 0.0
    assert cfg.training.warmup_ratio == 0.1
    assert cfg.training.num_epochs == 2
    assert cfg.training.global_batch_size == 64
    assert (cfg.training.max_length, cfg.training.max_prompt_length) == (1024, 512)
    assert cfg.data.num_prompts == 50_000
    assert cfg.data.history == 1
    assert cfg.generation.max_new_tokens == 256
    assert [schedule_at(cfg.training.learning_rate, i) for i in range(4)] == [
        5e-7,
        5e-7,
        1e-7,
        1e-7,
    ]


def test_every_field_is_documented():
    def walk(model):
        for name, field in model.model_fields.items():
            assert field.description, f"{model.__name__}.{name} has no description"
            annotation = field.annotation
            if isinstance(annotation, type) and hasattr(annotation, "model_fields"):
                walk(annotation)

    walk(SpinConfig)


@pytest.mark.parametrize(
    "text, message",
    [
        ("training:\n  betaa: 0.1\n", "training.betaa: unknown key"),
        ("surprise: {}\n", "surprise: unknown key"),
        ("training:\n  beta: 0\n", "beta must be > 0, got 0"),
        ("training:\n  beta: [0.1, -1]\n", "beta must be > 0, got -1"),
        ("training:\n  learning_rate: -1e-5\n", "learning_rate must be > 0"),
        (
            "run:\n  iterations: 0\n",
            "run.iterations: Input should be greater than or equal to 1 (got 0)",
        ),
        (
            "data:\n  num_prompts: 0\n",
            "data.num_prompts: Input should be greater than or equal to 1",
        ),
        ("data:\n  num_prompts: many\n", "data.num_prompts: Input should be a valid integer"),
        (
            "training:\n  max_length: 256\n  max_prompt_length: 512\n",
            "max_prompt_length (512) must be smaller than max_length (256)",
        ),
        (
            "training:\n  global_batch_size: 64\n  micro_batch_size: 3\n",
            "global_batch_size (64) must be divisible by micro_batch_size × num_processes (3 × 1)",
        ),
        (
            "training:\n  global_batch_size: 64\n  micro_batch_size: 8\n  gradient_accumulation_steps: 4\n"
            "  num_processes: 1\n",
            "global_batch_size (64) must equal micro_batch_size × gradient_accumulation_steps",
        ),
        (
            "data:\n  prompt_column: q\n",
            "prompt_column and data.response_column must be set together",
        ),
        ("- a\n- b\n", "expected a mapping"),
        ("training: [\n", "not valid YAML"),
    ],
)
def test_bad_config_names_the_field(tmp_path, text, message):
    with pytest.raises(ConfigError) as info:
        load_config(_write(tmp_path, text))
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml: config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_overrides_are_validated_like_the_file(tmp_path):
    path = _write(tmp_path, "training:\n  beta: 0.5\n")
    cfg = load_config(
        path, ["training.beta=[0.2, 0.1]", "run.iterations=5", "data.drop_identical=false"]
    )
    assert cfg.training.beta == [0.2, 0.1]
    assert schedule_at(cfg.training.beta, 7) == 0.1
    assert cfg.run.iterations == 5
    assert cfg.data.drop_identical is False
    with pytest.raises(ConfigError, match="training.nope: unknown key"):
        load_config(path, ["training.nope=1"])
    with pytest.raises(ConfigError, match="run.iterations: Input should be greater"):
        load_config(path, ["run.iterations=0"])
    with pytest.raises(ConfigError, match="expected key.sub=value"):
        load_config(path, ["run.iterations"])


def test_yaml_round_trip():
    cfg = load_config(None, ["training.learning_rate=[1e-5, 1e-6]", "model.name_or_path=/m"])
    again = SpinConfig.model_validate(__import__("yaml").safe_load(cfg.dump_yaml()))
    assert again == cfg


def test_deepspeed_passthrough_is_merged_over_generated():
    cfg = load_config(
        None,
        [
            "training.zero_stage=3",
            "training.num_processes=8",
            "training.deepspeed={zero_optimization: {offload_optimizer: {device: cpu}}, gradient_clipping: 0.5}",
        ],
    )
    ds = deepspeed_config(cfg.training, bf16=True)
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["offload_optimizer"] == {"device": "cpu"}
    assert ds["gradient_clipping"] == 0.5
    assert ds["bf16"]["enabled"] is True
    assert ds["train_batch_size"] == 64
    assert ds["gradient_accumulation_steps"] == 1  # 8 ranks × 8 pairs


def test_result_changing_differences_ignore_logging_fields():
    old = SpinConfig()
    new = old.model_copy(deep=True)
    new.training.save_steps = 7
    new.run.sample_rows = 3
    assert result_changing_differences(old, new) == []
    new.training.beta = 0.5
    assert result_changing_differences(old, new) == ["training.beta"]


def test_shipped_configs_validate_and_the_paper_recipe_matches_the_paper():
    demo = load_config("configs/demo.yaml")
    assert demo.uses_toy() and demo.run.iterations >= 3 and demo.run.baseline == "sft"
    paper = load_config("configs/zephyr-7b-ultrachat.yaml")
    assert paper.model.name_or_path == "alignment-handbook/zephyr-7b-sft-full"
    assert paper.data.dataset == "HuggingFaceH4/ultrachat_200k" and paper.data.num_prompts == 50_000
    assert paper.training.beta == 0.1 and paper.training.optimizer == "rmsprop"
    assert [schedule_at(paper.training.learning_rate, t) for t in range(4)] == [
        5e-7,
        5e-7,
        1e-7,
        1e-7,
    ]
    assert (paper.training.num_epochs, paper.training.global_batch_size) == (2, 64)
    assert (paper.training.max_length, paper.training.max_prompt_length) == (1024, 512)
    assert paper.training.zero_stage == 3 and paper.model.precision == "bf16"
    assert paper.run.baseline == "none"


def test_zero_stage_defaults_to_what_the_ranks_can_use():
    assert SpinConfig().training.zero_stage == 0  # one rank: nothing to shard
    paper = load_config(None, ["training.num_processes=8"])  # 8 × 8 = 64: no accumulation
    assert paper.training.zero_stage == 3
    # 2 ranks accumulating 4 micro-batches: ZeRO-3 too (the engine's forward accumulates)
    assert load_config(None, ["training.num_processes=2"]).training.zero_stage == 3


def test_overrides_fill_an_unset_optional_section():
    """--set training.lora.r=8 works whether the config omits lora or dumps it as null."""
    from spin_core.config import apply_overrides, validate_config

    cfg = load_config("configs/demo.yaml", ["training.lora.r=8"])
    assert cfg.training.lora.r == 8 and cfg.training.lora.alpha == 32.0
    dumped = load_config("configs/demo.yaml").model_dump(mode="json")
    assert dumped["training"]["lora"] is None
    again = validate_config(apply_overrides(dumped, ["training.lora.r=8"]))
    assert again.training.lora == cfg.training.lora
