"""The config reads mergekit's YAML and resolves parameters as mergekit does."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import TypeAdapter

from bigmerge.errors import ConfigError
from bigmerge.planning.config import evaluate_setting, load_config, parse_config

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
        ({"merge_method": "linear"}, "exactly one of 'models', 'slices' or 'modules'"),
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


def test_a_config_that_is_not_utf8_text_is_refused_by_name(tmp_path: Path) -> None:
    """A binary file, or a config saved in Latin-1, given as the config: one line naming the
    file and the first byte that is not UTF-8 (it was a UnicodeDecodeError traceback)."""
    p = tmp_path / "c.yaml"
    p.write_bytes("merge_method: linear\nmodels:\n  - model: /m/caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError) as err:
        load_config(p)
    msg = str(err.value)
    assert str(p) in msg and "not UTF-8" in msg and "line 3" in msg and "\n" not in msg


def test_a_checkpoint_given_as_the_config_is_not_read_whole(tmp_path: Path) -> None:
    """A 64 GiB file (sparse) named as the config, as a user who swapped the arguments would:
    refused after reading at most MAX_CONFIG_BYTES + 1 bytes, not read into memory."""
    from bigmerge.planning import config

    p = tmp_path / "model.safetensors"
    with open(p, "wb") as f:
        f.truncate(64 << 30)
    with pytest.raises(ConfigError, match="not a merge config"):
        load_config(p)
    text = "merge_method: linear\nmodels:\n  - model: /m\n"
    ok = tmp_path / "ok.yaml"
    ok.write_text(text + "#" * (config.MAX_CONFIG_BYTES - len(text)))
    cfg, got = config.load_config_and_text(ok)
    assert cfg.merge_method == "linear" and got.startswith(text) and len(got) == config.MAX_CONFIG_BYTES


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


# -- fuzzing: any config, valid YAML or not, ends in our own error type or a plan -----------

_scalar = st.one_of(
    st.floats(0, 1),
    st.booleans(),
    st.integers(-3, 3),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(["", "mlp", "*", "self_attn", "float32", "bf16", "union", "base"]),
)
_value = st.recursive(
    _scalar,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.sampled_from(["filter", "value", "weight", "x"]), inner, max_size=3),
    ),
    max_leaves=8,
)
_param_value = st.one_of(
    st.floats(0, 1),
    st.floats(0, 1),
    st.lists(st.floats(-0.5, 1.5), min_size=1, max_size=4),
    st.lists(st.fixed_dictionaries({"filter": st.sampled_from(["mlp", "attn", "*", "nope"]), "value": _scalar})),
    st.booleans(),
    _value,
)


def _params(method: str) -> st.SearchStrategy[dict[str, object]]:
    from bigmerge.ops import REGISTRY

    names = [p.name for p in REGISTRY[method].params] if method in REGISTRY else []
    return st.dictionaries(st.sampled_from(names * 4 + ["weight", "bogus"]), _param_value, max_size=4)


@st.composite
def _configs(draw: st.DrawFn) -> object:
    from bigmerge.ops import REGISTRY

    models = draw(st.lists(st.sampled_from(["base", "ft1", "ft2", "ft2", "missing"]), min_size=1, max_size=3))
    method = draw(st.sampled_from(sorted(REGISTRY) + ["nope"]))
    cfg: dict[str, object] = {
        "merge_method": method,
        "models": [{"model": f"@{m}", "parameters": draw(_params(method))} for m in models],
    }
    if draw(st.booleans()):
        cfg["base_model"] = draw(st.sampled_from(["@base", "@ft1", "@missing"]))
    if draw(st.booleans()):
        cfg["parameters"] = draw(_params(method))
    for key in ("dtype", "out_dtype", "tokenizer_source", "slices", "extra_key"):
        if draw(st.integers(0, 11)) == 0:
            cfg[key] = draw(_value)
    return cfg if draw(st.integers(0, 19)) else draw(_value)


@pytest.fixture(scope="module")
def fuzz_family(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from helpers import synthetic_family

    fam = synthetic_family(tmp_path_factory.mktemp("fuzz"))
    fam["missing"] = fam["base"].parent / "missing"
    return fam


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=_configs())
def test_fuzz_config_and_plan_raise_only_our_errors(data: object, fuzz_family: dict[str, Path]) -> None:
    from bigmerge.errors import BigmergeError
    from bigmerge.merge import MergeOptions, plan_merge

    text = yaml.safe_dump(data)
    for k, v in fuzz_family.items():
        text = text.replace("@" + k, str(v))
    try:
        cfg = parse_config(yaml.safe_load(text), "fuzz.yaml")
        plan_merge(cfg, 2, MergeOptions(block_bytes=256))
    except BigmergeError:
        pass


def test_modules_form_of_a_one_module_model_is_the_plain_form() -> None:
    """mergekit's `modules:` form: the module `default` (every decoder-only model) reads as the
    plain form, its parameters ranked between the models' and the global ones."""
    data = {
        "merge_method": "linear",
        "parameters": {"normalize": False, "weight": 0.1},
        "modules": {
            "default": {
                "models": [{"model": "a", "parameters": {"weight": 0.7}}, {"model": "b"}],
                "parameters": {"weight": 0.3},
            }
        },
    }
    cfg = parse_config(data, "cfg.yaml")
    assert cfg.modules is None and [m.model for m in cfg.models or []] == ["a", "b"]
    assert cfg.parameters == {"normalize": False, "weight": 0.3}
    assert cfg.model_parameters("a") == {"weight": 0.7}


def test_several_modules_stay_modules_with_every_source_referenced() -> None:
    """Several modules (a multimodal model) are kept for the plan, which merges each on its own;
    the config's sources are every module's models and slices, then the base."""
    data = {
        "merge_method": "slerp",
        "base_model": "base",
        "parameters": {"t": 0.5},
        "modules": {
            "text_decoder": {
                "slices": [
                    {"sources": [{"model": "base", "layer_range": [0, 2]}, {"model": "b", "layer_range": [0, 2]}]}
                ]
            },
            "vision_tower": {"models": [{"model": "a"}, {"model": "base"}], "parameters": {"t": 0.1}},
        },
    }
    cfg = parse_config(data, "cfg.yaml")
    assert cfg.modules is not None and sorted(cfg.modules) == ["text_decoder", "vision_tower"]
    assert cfg.model_refs() == ["base", "b", "a"]


@pytest.mark.parametrize(
    "modules,needle",
    [
        ({"default": {"parameters": {"weight": 1}}}, "modules.default names no models"),
        (
            {"text_decoder": {"models": []}, "vision_tower": {"models": [{"model": "a"}]}},
            "modules.text_decoder names no",
        ),
        (
            {
                "text_decoder": {
                    "models": [{"model": "a"}],
                    "slices": [{"sources": [{"model": "a", "layer_range": [0, 1]}]}],
                }
            },
            "modules.text_decoder: give either 'models' or 'slices', not both",
        ),
        ({"default": {"models": [{"model": "a"}], "colour": 1}}, "unknown key 'modules.default.colour'"),
        (
            {
                "text_decoder": {"models": [{"model": "a"}, {"model": "a"}]},
                "vision_tower": {"models": [{"model": "b"}]},
            },
            "model 'a' is listed twice in modules.text_decoder.models",
        ),
    ],
)
def test_modules_that_cannot_merge_are_one_line(modules: dict, needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config({"merge_method": "linear", "modules": modules}, "cfg.yaml")
    assert needle in str(err.value) and "\n" not in str(err.value)
