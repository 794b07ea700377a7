"""The config reads mergekit's YAML and resolves parameters as mergekit does."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import TypeAdapter

from bigmerge.config import evaluate_setting, load_config, parse_config
from bigmerge.errors import ConfigError

FLOAT = TypeAdapter(float).validate_python

MERGEKIT_TIES = """
models:
  - model: psmathur/orca_mini_v3_13b
    parameters:
      density: [1, 0.7, 0.1] # density gradient
      weight: 1.0
  - model: garage-bAInd/Platypus2-13B
    parameters:
      density: 0.5
      weight: [0, 0.3, 0.7, 1] # weight gradient
  - model: WizardLM/WizardMath-13B-V1.0
    parameters:
      density: 0.33
      weight:
        - filter: mlp
          value: 0.5
        - value: 0
merge_method: ties
base_model: TheBloke/Llama-2-13B-fp16
parameters:
  normalize: true
  int8_mask: true
dtype: float16
"""


def test_reads_mergekit_example(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text(MERGEKIT_TIES)
    cfg = load_config(p)
    assert cfg.merge_method == "ties"
    assert cfg.model_refs()[-1] == "TheBloke/Llama-2-13B-fp16"
    assert len(cfg.model_refs()) == 4


@pytest.mark.parametrize(
    "data,needle",
    [
        ({"merge_method": "linear", "models": [{"model": "a"}], "bogus": 1}, "unknown key 'bogus'"),
        ({"merge_method": "linear", "models": [{"model": "a", "weight": 1}]}, "unknown key 'models[0].weight'"),
        ({"models": [{"model": "a"}]}, "missing required key 'merge_method'"),
        ({"merge_method": "linear", "models": [{"model": "a"}], "dtype": "float8"}, "dtype"),
        ({"merge_method": "linear"}, "exactly one of 'models' or 'slices'"),
        ([1, 2], "expected a mapping"),
    ],
)
def test_bad_configs_name_the_key(data: object, needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(data, "cfg.yaml")
    msg = str(err.value)
    assert needle in msg and "cfg.yaml" in msg and "\n" not in msg


def test_yaml_syntax_error(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("merge_method: [linear\nmodels: x")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(p)


def test_gradient_interpolates_like_mergekit() -> None:
    assert evaluate_setting("x", [0.0, 1.0], 0.5, FLOAT) == 0.5
    assert evaluate_setting("x", [0.0, 0.3, 0.7, 1.0], 1 / 3, FLOAT) == pytest.approx(0.3)
    assert evaluate_setting("x", [0.0, 0.3, 0.7, 1.0], 0.5, FLOAT) == pytest.approx(0.5)
    assert evaluate_setting("x", [0.2, 0.8], 1.0, FLOAT) == pytest.approx(0.8)
    assert evaluate_setting("x", 0.4, 0.9, FLOAT) == 0.4


def test_filters_first_match_and_fallback() -> None:
    cfg = parse_config(
        {
            "merge_method": "linear",
            "models": [{"model": "a"}],
            "parameters": {
                "weight": [{"filter": "mlp", "value": 0.5}, {"filter": "attn", "value": [0.0, 1.0]}, {"value": 0.1}]
            },
        }
    )
    setting = cfg.parameters["weight"]
    assert evaluate_setting("model.layers.0.mlp.up_proj.weight", setting, 0.3, FLOAT) == 0.5
    assert evaluate_setting("model.layers.0.self_attn.q_proj.weight", setting, 0.25, FLOAT) == 0.25
    assert evaluate_setting("model.norm.weight", setting, 0.0, FLOAT) == 0.1


def test_no_match_without_fallback_is_none() -> None:
    cfg = parse_config(
        {
            "merge_method": "linear",
            "models": [{"model": "a"}],
            "parameters": {"weight": [{"filter": "mlp", "value": 1}]},
        }
    )
    assert evaluate_setting("model.norm.weight", cfg.parameters["weight"], 0, FLOAT) is None
