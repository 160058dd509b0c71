"""Recipes: the typed schema (`schema`), reading and validating a recipe file (`loading`), and the checks
that need the model or the machine (`checks`). Everything public is importable from here."""
from finetune.config.checks import check_against_model, check_environment, folder_problem
from finetune.config.loading import (
    MAX_RECIPE_BYTES,
    MAX_YAML_DEPTH,
    MAX_YAML_VALUES,
    apply_override,
    load_recipe,
    load_yaml,
    parse_recipe,
    resolve_raw,
    resolved_dict,
)
from finetune.config.schema import (
    AUGMENT_FIELDS,
    LOGGER_PACKAGES,
    AugmentConfig,
    DataConfig,
    EvaluationConfig,
    Logger,
    Metric,
    MixupConfig,
    ModelConfig,
    OptimizerConfig,
    OutputConfig,
    Precision,
    RandomErasingConfig,
    Recipe,
    ScheduleConfig,
    StageConfig,
    TrainingConfig,
)

__all__ = [
    "check_against_model", "check_environment", "folder_problem",
    "MAX_RECIPE_BYTES", "MAX_YAML_DEPTH", "MAX_YAML_VALUES", "apply_override", "load_recipe", "load_yaml",
    "parse_recipe", "resolve_raw", "resolved_dict",
    "AUGMENT_FIELDS", "LOGGER_PACKAGES", "AugmentConfig", "DataConfig", "EvaluationConfig", "Logger", "Metric",
    "MixupConfig", "ModelConfig", "OptimizerConfig", "OutputConfig", "Precision", "RandomErasingConfig", "Recipe",
    "ScheduleConfig", "StageConfig", "TrainingConfig",
]
