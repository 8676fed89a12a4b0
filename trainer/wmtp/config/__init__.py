"""The two YAML documents a run is made of, as pydantic models, and how they are read.

`Config` describes the environment (where models, data and checkpoints live, MLflow, devices); `Recipe`
describes the experiment (algorithm, loss, data mix, optimiser). Both forbid unknown keys, and every error
names the file, the dotted field path and what is allowed. The operator imports this package (and
`wmtp.contract`) alone from the trainer: nothing here needs torch.
"""

from wmtp.config.documents import (
    MAX_DOCUMENT_BYTES,
    MAX_MESSAGE,
    MAX_NODES,
    ConfigError,
    clip,
    format_validation_error,
    parse_yaml,
    read_document,
    redact_uri,
    substitute_env,
)
from wmtp.config.environment import (
    CheckpointPaths,
    Config,
    Devices,
    DistributedSettings,
    FSDPSettings,
    MLflowSettings,
    ModelPaths,
    Paths,
    S3Settings,
)
from wmtp.config.loading import (
    check_compatible,
    checkpoint_root,
    config_hash,
    flatten,
    load,
    load_config,
    load_recipe,
    parse_config,
    parse_recipe,
)
from wmtp.config.recipe import (
    CheckpointingSection,
    CriticSection,
    DataSection,
    DatasetFormat,
    DataSource,
    LossSection,
    ModelSection,
    OptimSection,
    Recipe,
    Rho1Section,
    RunSection,
    TrainSection,
)

__all__ = [
    "MAX_DOCUMENT_BYTES",
    "MAX_MESSAGE",
    "MAX_NODES",
    "CheckpointPaths",
    "CheckpointingSection",
    "Config",
    "ConfigError",
    "CriticSection",
    "DataSection",
    "DataSource",
    "DatasetFormat",
    "Devices",
    "DistributedSettings",
    "FSDPSettings",
    "LossSection",
    "MLflowSettings",
    "ModelPaths",
    "ModelSection",
    "OptimSection",
    "Paths",
    "Recipe",
    "Rho1Section",
    "RunSection",
    "S3Settings",
    "TrainSection",
    "check_compatible",
    "checkpoint_root",
    "clip",
    "config_hash",
    "flatten",
    "format_validation_error",
    "load",
    "load_config",
    "load_recipe",
    "parse_config",
    "parse_recipe",
    "parse_yaml",
    "read_document",
    "redact_uri",
    "substitute_env",
]
