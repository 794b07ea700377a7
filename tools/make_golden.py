"""Build golden merge outputs with mergekit 0.1.5, so tests can compare bigmerge without mergekit.

Usage::

    python tools/make_golden.py [--mergekit PATH/TO/mergekit-yaml] [--setup] [--verify-repeat]

mergekit lives in its own virtual environment (its pins clash with bigmerge's). Without
``--mergekit`` the script uses, in order: ``$MERGEKIT_PYTHON``'s directory/mergekit-yaml,
``.mkvenv/bin/mergekit-yaml`` in the repository, ``mergekit-yaml`` on PATH. ``--setup`` creates
``.mkvenv`` when it is missing, which is the same as::

    python3 -m venv .mkvenv && .mkvenv/bin/pip install torch==2.13.0 mergekit==0.1.5

What it does: builds the tiny fixture families with ``tools/toy_models.make_family`` in a
temporary directory, renders each config template (``{base}``, ``{ft1}``, ... placeholders;
no other braces, so ``str.format(**paths)`` works too), runs ``mergekit-yaml CONFIG OUT
--copy-tokenizer --no-cuda --random-seed 0 --quiet`` on CPU, and writes into ``tests/golden/``:

    configs/NAME.yaml     the config template
    NAME.safetensors      every output tensor in one file, in mergekit's output dtype
    resolved/NAME.json    per tensor, what mergekit resolved: compute dtype, out dtype, the
                          weight/density/... of every input after gradients and filters, and
                          for magnitude (TIES) sparsification the top-k boundary (see below)
    MANIFEST.json         per config: mergekit and torch versions, the family arguments, the
                          sha256 of every fixture file the config reads, the output's sha256,
                          dtypes and config.json dtype, and a summary of top-k boundary ties

The ``resolved`` data comes from a read-only probe: mergekit-yaml runs inside a small wrapper
that records the arguments of ``MergeMethod._execute_resolved`` (the call every merge goes
through) and then lets mergekit continue unchanged. ``--verify-repeat`` runs every config a
second time with the plain ``mergekit-yaml`` and checks the tensors are bit-identical.

What mergekit 0.1.5 does, as observed with these fixtures (torch 2.13.0, transformers 5.23, CPU):

- Output dtype: ``out_dtype`` if set; else ``dtype`` if set (``dtype: float32`` on bfloat16
  sources writes float32: task_arithmetic_bf16_to_fp32); else the promoted dtype of the
  sources. Every output tensor has that dtype, norms included. The output config.json carries
  it as ``"dtype"`` (transformers 5 spelling, no ``torch_dtype``); the rest of config.json is
  the base model's (or the first model's, without base_model).
- Compute dtype (``compute_dtype`` in resolved/): ``dtype`` if set, else the promoted source
  dtype. ``task_arithmetic``/``ties`` do their arithmetic in it (``dtype: bfloat16`` means
  bf16 arithmetic: ties_bf16_native). The ``linear`` kernel, per its source, always
  accumulates in float32 (float64 for float64 inputs) and casts back to the compute dtype.
- Names: output tensors keep the sources' names exactly (model.embed_tokens.weight,
  model.layers.N.*, model.norm.weight, lm_head.weight); nothing renamed, added or dropped.
  One ``model.safetensors`` at these sizes (``--out-shard-size`` defaults to 5B parameters),
  plus config.json and the base's tokenizer files.
- Tied embeddings (family C: ``tie_word_embeddings: true``, no ``lm_head.weight`` in the
  sources): no ``lm_head.weight`` in the output either (38 tensors; lm_head is optional in
  mergekit's Llama definition) and config.json keeps ``tie_word_embeddings: true``.
- Gradients: layer i of L gets the list interpolated linearly at i/(L-1) of its length, as a
  Python float ([0.2, 0.8, 0.5] over 4 layers: 0.2, 0.6, 0.7000000000000001, 0.5). Tensors
  outside the layers (embeddings, final norm, lm_head) get the list's *first* value.
  Filters match by substring of the tensor name; a filter's value may itself be a gradient;
  the entry without ``filter`` applies to the rest. resolved/NAME.json has every value.
- TIES top-k (``sparsify.magnitude``) is ``torch.argsort(|delta|.float(), descending=True)[:k]``
  with ``k = max(1, int(density * numel))``, delta computed in the compute dtype. That sort
  is not stable: among elements whose ``|delta|`` equals the k-th largest, which ones are
  kept is up to torch's sort (not the lowest indices). The float32 fixtures have no such ties
  at the boundary; with bfloat16 sources they are everywhere (ties_bf16: 30 of 39 tensors,
  ~14,400 tied elements dropped). ``resolved/NAME.json`` gives per tensor and input
  ``threshold``, ``n_at`` (elements at it) and ``kept_at`` (how many of those were kept), and
  the manifest's ``topk_boundary`` lists where ``n_at > kept_at``, so a comparison can allow
  exactly the positions whose |delta| equals a threshold to differ.
- Timing: 6-10 s per config on 2 CPU cores, nearly all start-up (importing transformers and
  mergekit); the tensors themselves take well under a second.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))

from toy_models import GENERATOR_VERSION, family_files, make_family, sha256_file  # noqa: E402

GOLDEN = REPO / "tests" / "golden"
MKVENV = REPO / ".mkvenv"
MERGEKIT_PIN = "mergekit==0.1.5"
TORCH_PIN = "torch==2.13.0"

# Fixture families: keyword arguments of make_family (all tiny, so every golden file stays small).
FAMILIES: dict[str, dict[str, Any]] = {
    "A": {"preset": "tiny", "dtype": "float32", "n_finetunes": 2, "sharded": False, "seed": 0, "tied": False},
    "B": {"preset": "tiny", "dtype": "bfloat16", "n_finetunes": 3, "sharded": True, "seed": 0, "tied": False},
    "C": {"preset": "tiny", "dtype": "bfloat16", "n_finetunes": 2, "sharded": False, "seed": 0, "tied": True},
    # vocabularies that differ: ft1 adds two tokens, ft2 one of them (for tokenizer_source)
    "D": {
        "preset": "tiny",
        "dtype": "float32",
        "n_finetunes": 2,
        "sharded": False,
        "seed": 0,
        "tied": False,
        "extra_tokens": {"ft1": ["<|a|>", "<|b|>"], "ft2": ["<|a|>"]},
    },
}


@dataclass(frozen=True)
class GoldenCase:
    name: str
    family: str
    yaml: str  # block-style YAML with {base}/{ftN} placeholders and no other braces


CASES: tuple[GoldenCase, ...] = (
    GoldenCase(
        "linear_fp32",
        "A",
        """\
merge_method: linear
models:
  - model: {ft1}
    parameters:
      weight: 0.7
  - model: {ft2}
    parameters:
      weight: 0.5
""",
    ),
    GoldenCase(
        "linear_gradient_filter",
        "A",
        """\
merge_method: linear
models:
  - model: {ft1}
    parameters:
      weight: [0.2, 0.8, 0.5]
  - model: {ft2}
    parameters:
      weight:
        - filter: self_attn
          value: 0.9
        - filter: mlp
          value: [0.1, 0.6]
        - value: 0.4
parameters:
  normalize: false
""",
    ),
    GoldenCase(
        "task_arithmetic_fp32",
        "A",
        """\
merge_method: task_arithmetic
base_model: {base}
models:
  - model: {ft1}
    parameters:
      weight: 0.6
  - model: {ft2}
    parameters:
      weight: 0.4
""",
    ),
    GoldenCase(
        "task_arithmetic_lambda_normalize",
        "A",
        """\
merge_method: task_arithmetic
base_model: {base}
models:
  - model: {ft1}
    parameters:
      weight: 0.6
  - model: {ft2}
    parameters:
      weight: 0.4
parameters:
  lambda: 0.8
  normalize: true
""",
    ),
    GoldenCase(
        "ties_fp32",
        "A",
        """\
merge_method: ties
base_model: {base}
models:
  - model: {ft1}
    parameters:
      density: 0.5
      weight: 0.6
  - model: {ft2}
    parameters:
      density: 0.3
      weight: 0.5
""",
    ),
    GoldenCase(
        "ties_gradient",
        "A",
        """\
merge_method: ties
base_model: {base}
models:
  - model: {ft1}
    parameters:
      density: [0.2, 0.9]
      weight: 0.7
  - model: {ft2}
    parameters:
      density: 0.5
      weight:
        - filter: mlp
          value: 0.8
        - value: 0.3
""",
    ),
    GoldenCase(
        "ties_rescale",
        "A",
        """\
merge_method: ties
base_model: {base}
models:
  - model: {ft1}
    parameters:
      density: 0.4
      weight: 0.5
  - model: {ft2}
    parameters:
      density: 0.6
      weight: 0.5
parameters:
  rescale: true
""",
    ),
    GoldenCase(
        "linear_bf16",
        "B",
        """\
merge_method: linear
models:
  - model: {ft1}
    parameters:
      weight: 1.0
  - model: {ft2}
    parameters:
      weight: 0.5
  - model: {ft3}
    parameters:
      weight: 0.25
dtype: float32
out_dtype: bfloat16
""",
    ),
    GoldenCase(
        "task_arithmetic_bf16_to_fp32",
        "B",
        """\
merge_method: task_arithmetic
base_model: {base}
models:
  - model: {ft1}
    parameters:
      weight: 0.5
  - model: {ft2}
    parameters:
      weight: 0.3
  - model: {ft3}
    parameters:
      weight: 0.2
dtype: float32
""",
    ),
    GoldenCase(
        "ties_bf16",
        "B",
        """\
merge_method: ties
base_model: {base}
models:
  - model: {ft1}
    parameters:
      density: 0.4
      weight: 0.5
  - model: {ft2}
    parameters:
      density: 0.5
      weight: 0.4
  - model: {ft3}
    parameters:
      density: 0.6
      weight: 0.3
dtype: float32
out_dtype: bfloat16
""",
    ),
    GoldenCase(
        "ties_bf16_native",
        "B",
        """\
merge_method: ties
base_model: {base}
models:
  - model: {ft1}
    parameters:
      density: 0.4
      weight: 0.5
  - model: {ft2}
    parameters:
      density: 0.5
      weight: 0.4
  - model: {ft3}
    parameters:
      density: 0.6
      weight: 0.3
dtype: bfloat16
""",
    ),
    GoldenCase(
        "task_arithmetic_tied",
        "C",
        """\
merge_method: task_arithmetic
base_model: {base}
models:
  - model: {ft1}
    parameters:
      weight: 0.7
  - model: {ft2}
    parameters:
      weight: 0.3
dtype: float32
out_dtype: bfloat16
""",
    ),
    # Layer surgery (slices): output layers are the slices' layer ranges in order.
    GoldenCase(
        "passthrough_frankenmerge_fp32",
        "A",
        """\
merge_method: passthrough
slices:
  - sources:
      - model: {ft1}
        layer_range: [0, 2]
  - sources:
      - model: {base}
        layer_range: [1, 4]
        parameters:
          scale:
            - filter: o_proj
              value: 0.5
            - value: 1.0
""",
    ),
    GoldenCase(
        "passthrough_upscale_bf16",
        "B",
        """\
merge_method: passthrough
dtype: bfloat16
slices:
  - sources:
      - model: {base}
        layer_range: [0, 3]
  - sources:
      - model: {ft3}
        layer_range: [1, 4]
""",
    ),
    GoldenCase(
        "linear_slices_gradient",
        "A",
        """\
merge_method: linear
parameters:
  normalize: true
slices:
  - sources:
      - model: {ft1}
        layer_range: [0, 2]
        parameters:
          weight: [0.2, 0.8]
      - model: {ft2}
        layer_range: [1, 3]
    parameters:
      weight:
        - filter: mlp
          value: 0.6
        - value: [0.3, 0.9]
  - sources:
      - model: {base}
        layer_range: [2, 4]
      - model: {ft1}
        layer_range: [2, 4]
        parameters:
          weight: 0.25
    parameters:
      weight: 0.5
""",
    ),
    GoldenCase(
        "ties_slices_bf16",
        "B",
        """\
merge_method: ties
base_model: {base}
slices:
  - sources:
      - model: {base}
        layer_range: [0, 4]
      - model: {ft1}
        layer_range: [0, 4]
        parameters:
          density: 0.6
          weight: [0.3, 1.0]
      - model: {ft2}
        layer_range: [0, 4]
        parameters:
          density: 0.4
          weight: 0.5
""",
    ),
    GoldenCase(
        "slerp_fp32",
        "A",
        """\
merge_method: slerp
base_model: {base}
models:
  - model: {base}
  - model: {ft1}
parameters:
  t: 0.3
""",
    ),
    GoldenCase(
        "slerp_gradient_bf16",
        "B",
        """\
merge_method: slerp
base_model: {ft2}
models:
  - model: {base}
  - model: {ft2}
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5
""",
    ),
    GoldenCase(
        "slerp_slices_fp32",
        "A",
        """\
merge_method: slerp
base_model: {ft1}
slices:
  - sources:
      - model: {ft1}
        layer_range: [0, 4]
      - model: {ft2}
        layer_range: [0, 4]
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5
""",
    ),
    GoldenCase(
        "nuslerp_fp32",
        "A",
        """\
merge_method: nuslerp
models:
  - model: {ft1}
    parameters:
      weight: 0.4
  - model: {ft2}
    parameters:
      weight: 0.6
""",
    ),
    GoldenCase(
        "nuslerp_base_row_wise",
        "A",
        """\
merge_method: nuslerp
base_model: {base}
models:
  - model: {ft1}
    parameters:
      weight: [0.2, 0.8]
  - model: {ft2}
    parameters:
      weight: 0.5
parameters:
  nuslerp_flatten: false
  nuslerp_row_wise: true
""",
    ),
    GoldenCase(
        "nuslerp_rows_bf16",
        "B",
        """\
merge_method: nuslerp
base_model: {base}
models:
  - model: {ft1}
    parameters:
      weight:
        - filter: mlp
          value: 0.7
        - value: 0.3
  - model: {ft3}
    parameters:
      weight: 0.5
parameters:
  nuslerp_flatten: false
dtype: float32
out_dtype: bfloat16
""",
    ),
    GoldenCase(
        "multislerp_fp32",
        "A",
        """\
merge_method: multislerp
models:
  - model: {ft1}
    parameters:
      weight: 0.6
  - model: {ft2}
    parameters:
      weight: 0.4
""",
    ),
    GoldenCase(
        "multislerp_base_bf16",
        "B",
        """\
merge_method: multislerp
base_model: {base}
models:
  - model: {ft1}
    parameters:
      weight: [0.2, 0.6]
  - model: {ft2}
    parameters:
      weight: 0.5
  - model: {ft3}
    parameters:
      weight:
        - filter: self_attn
          value: 0.9
        - value: 0.3
dtype: float32
out_dtype: bfloat16
""",
    ),
    GoldenCase(
        "karcher_fp32",
        "A",
        """\
merge_method: karcher
models:
  - model: {base}
  - model: {ft1}
  - model: {ft2}
""",
    ),
    GoldenCase(
        "karcher_bf16",
        "B",
        """\
merge_method: karcher
models:
  - model: {ft1}
  - model: {ft2}
  - model: {ft3}
parameters:
  max_iter: 4
  tol: 1.0e-6
dtype: float32
out_dtype: bfloat16
""",
    ),
    GoldenCase(
        "model_stock_fp32",
        "A",
        """\
merge_method: model_stock
base_model: {base}
models:
  - model: {ft1}
  - model: {ft2}
""",
    ),
    GoldenCase(
        "model_stock_filter_wise",
        "A",
        """\
merge_method: model_stock
base_model: {base}
models:
  - model: {ft1}
  - model: {ft2}
parameters:
  filter_wise: true
""",
    ),
    GoldenCase(
        "model_stock_bf16",
        "B",
        """\
merge_method: model_stock
base_model: {base}
models:
  - model: {ft1}
  - model: {ft2}
  - model: {ft3}
dtype: float32
out_dtype: bfloat16
""",
    ),
    GoldenCase(
        "nuslerp_bf16_native",
        "B",
        """\
merge_method: nuslerp
base_model: {base}
models:
  - model: {ft1}
    parameters:
      weight: 0.6
  - model: {ft2}
    parameters:
      weight: 0.4
""",
    ),
    GoldenCase(
        "multislerp_bf16_native",
        "B",
        """\
merge_method: multislerp
models:
  - model: {ft1}
    parameters:
      weight: 0.7
  - model: {ft2}
    parameters:
      weight: 0.3
""",
    ),
    GoldenCase(
        "karcher_bf16_native",
        "B",
        """\
merge_method: karcher
models:
  - model: {ft1}
  - model: {ft2}
""",
    ),
    GoldenCase(
        "model_stock_bf16_native",
        "B",
        """\
merge_method: model_stock
base_model: {base}
models:
  - model: {ft1}
  - model: {ft2}
  - model: {ft3}
""",
    ),
    GoldenCase(
        "nearswap_fp32",
        "A",
        """\
merge_method: nearswap
base_model: {base}
models:
  - model: {base}
  - model: {ft1}
parameters:
  t:
    - filter: mlp
      value: [0.001, 0.004]
    - value: 0.002
""",
    ),
    GoldenCase(
        "nearswap_bf16",
        "B",
        """\
merge_method: nearswap
base_model: {base}
models:
  - model: {base}
  - model: {ft2}
parameters:
  t: 0.002
dtype: bfloat16
""",
    ),
    GoldenCase(
        "breadcrumbs_fp32",
        "A",
        """\
merge_method: breadcrumbs
base_model: {base}
models:
  - model: {ft1}
    parameters:
      density: 0.5
      gamma: 0.05
      weight: 0.6
  - model: {ft2}
    parameters:
      density: 0.3
      gamma: 0.1
      weight: 0.5
""",
    ),
    GoldenCase(
        "breadcrumbs_gradient_rescale",
        "A",
        """\
merge_method: breadcrumbs
base_model: {base}
models:
  - model: {ft1}
    parameters:
      density: [0.2, 0.9]
      gamma: 0.02
      weight: 0.7
  - model: {ft2}
    parameters:
      density: 0.6
      gamma:
        - filter: mlp
          value: 0.3
        - value: 0.01
      weight:
        - filter: self_attn
          value: 0.8
        - value: 0.4
parameters:
  rescale: true
  lambda: 0.9
""",
    ),
    GoldenCase(
        "breadcrumbs_ties_fp32",
        "A",
        """\
merge_method: breadcrumbs_ties
base_model: {base}
models:
  - model: {ft1}
    parameters:
      density: 0.4
      gamma: 0.05
      weight: 0.6
  - model: {ft2}
    parameters:
      density: [0.3, 0.7]
      gamma: 0.2
      weight: 0.5
parameters:
  normalize: true
""",
    ),
    GoldenCase(
        "breadcrumbs_ties_bf16",
        "B",
        """\
merge_method: breadcrumbs_ties
base_model: {base}
models:
  - model: {ft1}
    parameters:
      density: 0.4
      weight: 0.5
  - model: {ft2}
    parameters:
      density: 0.5
      gamma: 0.1
      weight: 0.4
  - model: {ft3}
    parameters:
      density: 0.6
      gamma: 0.03
      weight: 0.3
dtype: float32
out_dtype: bfloat16
""",
    ),
    GoldenCase(
        "breadcrumbs_ties_bf16_native",
        "B",
        """\
merge_method: breadcrumbs_ties
base_model: {base}
models:
  - model: {ft1}
    parameters:
      density: 0.5
      gamma: 0.05
      weight: 0.5
  - model: {ft2}
    parameters:
      density: 0.4
      weight: 0.4
  - model: {ft3}
    parameters:
      density: 0.6
      gamma: 0.1
      weight: 0.3
parameters:
  rescale: true
dtype: bfloat16
""",
    ),
    GoldenCase(
        "sce_bf16_native",
        "C",
        """\
merge_method: sce
base_model: {base}
models:
  - model: {ft1}
  - model: {ft2}
dtype: bfloat16
""",
    ),
    # Random operators: one fine-tune each, so that the test can read the kept elements and
    # the rescale factor of mergekit's draws from its output and compare them in distribution.
    GoldenCase(
        "dare_linear_fp32",
        "A",
        """\
merge_method: dare_linear
base_model: {base}
models:
  - model: {ft1}
    parameters:
      density: 0.3
      weight: 0.8
""",
    ),
    GoldenCase(
        "dare_ties_fp32",
        "A",
        """\
merge_method: dare_ties
base_model: {base}
models:
  - model: {ft2}
    parameters:
      density: [0.6, 0.2]
      weight: 0.7
""",
    ),
    GoldenCase(
        "della_fp32",
        "A",
        """\
merge_method: della
base_model: {base}
models:
  - model: {ft1}
    parameters:
      density: 0.4
      epsilon: 0.2
      weight: 0.7
""",
    ),
    GoldenCase(
        "della_linear_bf16",
        "B",
        """\
merge_method: della_linear
base_model: {base}
models:
  - model: {ft3}
    parameters:
      density: 0.5
      weight: 0.6
dtype: float32
""",
    ),
    GoldenCase(
        "sce_fp32",
        "A",
        """\
merge_method: sce
base_model: {base}
models:
  - model: {ft1}
  - model: {ft2}
parameters:
  select_topk: [0.3, 0.7]
""",
    ),
    GoldenCase(
        "sce_all_fp32",
        "A",
        """\
merge_method: sce
base_model: {base}
models:
  - model: {ft1}
  - model: {ft2}
""",
    ),
    GoldenCase(
        "sce_bf16",
        "B",
        """\
merge_method: sce
base_model: {base}
models:
  - model: {ft1}
  - model: {ft2}
  - model: {ft3}
dtype: float32
out_dtype: bfloat16
""",
    ),
    # Vocabularies that differ (family D): the union tokenizer, and embedding rows for tokens a
    # model lacks (the base's, else the only model's that has it, else the average).
    GoldenCase(
        "union_linear",
        "D",
        """\
merge_method: linear
tokenizer_source: union
models:
  - model: {base}
    parameters:
      weight: 0.2
  - model: {ft1}
    parameters:
      weight: 0.5
  - model: {ft2}
    parameters:
      weight: 0.3
""",
    ),
    GoldenCase(
        "union_task_arithmetic",
        "D",
        """\
merge_method: task_arithmetic
base_model: {base}
tokenizer_source: union
models:
  - model: {ft1}
    parameters:
      weight: 0.7
  - model: {ft2}
    parameters:
      weight: [0.2, 0.6]
""",
    ),
    GoldenCase(
        "tokenizer_base_linear",
        "D",
        """\
merge_method: linear
base_model: {ft2}
tokenizer_source: base
models:
  - model: {ft1}
    parameters:
      weight: 0.5
  - model: {ft2}
    parameters:
      weight: 0.5
""",
    ),
)

PLACEHOLDER = re.compile(r"\{(base|ft\d+)\}")


def placeholders(text: str) -> list[str]:
    """Model names a config template refers to, in order of first use."""
    return list(dict.fromkeys(PLACEHOLDER.findall(text)))


def render_config(text: str, paths: Mapping[str, str | Path]) -> str:
    """Substitute {base}/{ftN} with model paths (same result as text.format(**paths))."""
    return PLACEHOLDER.sub(lambda m: str(paths[m.group(1)]), text)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# Runs inside mergekit's venv: records what mergekit resolved for each output tensor, then
# lets the merge go on untouched. Arguments: LOG_PATH, then mergekit-yaml's own arguments.
PROBE = r"""
import json, sys
import torch
from mergekit.merge_methods import base as mm_base
from mergekit.scripts.run_yaml import main

log_path = sys.argv[1]
records = []
original = mm_base.MergeMethod._execute_resolved


def ident(x):
    model = getattr(x, "model", None)
    return str(getattr(model, "path", x))


def plain(v):
    if isinstance(v, mm_base.PerInputValues):
        return {ident(k): plain(val) for k, val in v.items()}
    if isinstance(v, (bool, int, float, str)) or v is None:
        return v
    return repr(v)


def boundary(delta, density):
    # Mirrors mergekit.sparsify.magnitude: k = max(1, int(density * numel)), rank by |delta| as float32.
    n = delta.numel()
    if density >= 1 or density <= 0 or n == 0:
        return None
    k = max(1, int(density * n))
    w = delta.abs().reshape(-1).float()
    v = torch.topk(w, k).values[-1]
    above = int((w > v).sum())
    return {"k": k, "numel": n, "threshold": float(v), "n_above": above, "n_at": int((w == v).sum()), "kept_at": k - above}


def probe(self, groups, parameters, *, dtype=None, out_dtype=None, batch_options=None):
    from mergekit.merge_methods.dtype import promoted_dtype
    for group, params in zip(groups, parameters):
        compute = dtype or (promoted_dtype(group) if group.entries else None)
        rec = {
            "tensor": group.metadata.name,
            "method": self.spec.name,
            "inputs": [ident(e.id) for e in group.entries],
            "base": next((ident(e.id) for e in group.entries if e.is_base), None),
            "input_dtypes": sorted({str(e.tensor.dtype).removeprefix("torch.") for e in group.entries}),
            "compute_dtype": str(compute).removeprefix("torch.") if compute is not None else None,
            "out_dtype": str(out_dtype).removeprefix("torch.") if out_dtype is not None else None,
            "params": {k: plain(v) for k, v in params.items()},
        }
        sparsify = getattr(self, "sparsification_method", None)
        if sparsify is not None and str(getattr(sparsify, "value", sparsify)) == "magnitude" and group.base:
            base = group.base.tensor.to(compute)
            rec["topk"] = {
                ident(e.id): boundary(e.tensor.to(compute) - base, float(params["density"][e.id]))
                for e in group.non_base
            }
        records.append(rec)
    return original(self, groups, parameters, dtype=dtype, out_dtype=out_dtype, batch_options=batch_options)


mm_base.MergeMethod._execute_resolved = probe
sys.argv = ["mergekit-yaml", *sys.argv[2:]]
try:
    main()
finally:
    with open(log_path, "w") as fh:
        json.dump(records, fh)
"""


def find_mergekit(explicit: str | None, *, setup: bool) -> Path:
    """mergekit-yaml: --mergekit, then $MERGEKIT_PYTHON's bin dir, then .mkvenv, then PATH."""
    if explicit:
        path = Path(explicit)
        if not path.is_file():
            raise SystemExit(f"--mergekit {explicit}: no such file")
        return path
    candidates = []
    if os.environ.get("MERGEKIT_PYTHON"):
        candidates.append(Path(os.environ["MERGEKIT_PYTHON"]).parent / "mergekit-yaml")
    candidates.append(MKVENV / "bin" / "mergekit-yaml")
    for c in candidates:
        if c.is_file():
            return c
    if setup:
        return setup_mkvenv()
    on_path = shutil.which("mergekit-yaml")
    if on_path:
        return Path(on_path)
    raise SystemExit(
        "mergekit-yaml not found. Create its venv with `python tools/make_golden.py --setup`, or:\n"
        f"  python3 -m venv .mkvenv && .mkvenv/bin/pip install {TORCH_PIN} {MERGEKIT_PIN}\n"
        "or pass --mergekit /path/to/mergekit-yaml (or set MERGEKIT_PYTHON)."
    )


def setup_mkvenv() -> Path:
    print(f"creating {MKVENV} with {TORCH_PIN} {MERGEKIT_PIN}", file=sys.stderr)
    subprocess.run([sys.executable, "-m", "venv", str(MKVENV)], check=True)
    pip = [str(MKVENV / "bin" / "python"), "-m", "pip", "install", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, TORCH_PIN, MERGEKIT_PIN], check=True)
    return MKVENV / "bin" / "mergekit-yaml"


def mergekit_env() -> dict[str, str]:
    env = dict(os.environ)
    # Offline and on CPU: the fixtures are local paths and goldens must not depend on a GPU.
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", CUDA_VISIBLE_DEVICES="", TOKENIZERS_PARALLELISM="false")
    return env


def mergekit_versions(python: Path) -> dict[str, str]:
    code = (
        "import importlib.metadata as m, json;"
        "print(json.dumps({p: m.version(p) for p in ('mergekit', 'torch', 'transformers', 'safetensors')}))"
    )
    out = subprocess.run([str(python), "-c", code], check=True, capture_output=True, text=True, env=mergekit_env())
    return json.loads(out.stdout)


MERGEKIT_ARGS = ["--copy-tokenizer", "--no-cuda", "--random-seed", "0", "--quiet", "--no-write-model-card"]


def run_mergekit(mergekit: Path, config: Path, out: Path, *, probe_log: Path | None) -> float:
    python = mergekit.parent / "python"
    if probe_log is not None:
        probe = out.parent / "probe.py"
        probe.write_text(PROBE)
        cmd = [str(python), str(probe), str(probe_log), str(config), str(out), *MERGEKIT_ARGS]
    else:
        cmd = [str(mergekit), str(config), str(out), *MERGEKIT_ARGS]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=mergekit_env())
    if proc.returncode != 0:
        raise SystemExit(f"mergekit failed on {config.name} ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return time.perf_counter() - t0


def load_output(out: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(out.glob("*.safetensors")):
        part = load_file(str(f))
        dup = set(part) & set(tensors)
        if dup:
            raise SystemExit(f"{out}: tensor(s) {sorted(dup)} in more than one shard")
        tensors.update(part)
    return dict(sorted(tensors.items()))


def same_bits(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return list(a) == list(b) and all(
        a[k].dtype == b[k].dtype
        and a[k].shape == b[k].shape
        and torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8))
        for k in a
    )


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def summarize_resolved(records: list[dict[str, Any]], names: Mapping[str, str]) -> dict[str, Any]:
    """Probe records keyed by tensor, with model paths replaced by their placeholder names."""

    def rename(x: Any) -> Any:
        if isinstance(x, str):
            return names.get(x, x)
        if isinstance(x, list):
            return [rename(v) for v in x]
        if isinstance(x, dict):
            return {names.get(k, k): rename(v) for k, v in x.items()}
        return x

    out: dict[str, Any] = {}
    for rec in records:
        rec = rename(rec)
        out[rec.pop("tensor")] = rec
    return dict(sorted(out.items()))


def topk_boundary_summary(resolved: Mapping[str, Any]) -> dict[str, Any]:
    """Tensors/inputs where mergekit's unstable sort had to choose among tied magnitudes."""
    ambiguous: dict[str, dict[str, int]] = {}
    for tensor, rec in resolved.items():
        for model, b in (rec.get("topk") or {}).items():
            # Ties at a zero threshold do not matter: a zero delta contributes nothing either way.
            if b and b["threshold"] > 0 and b["n_at"] > b["kept_at"]:
                ambiguous.setdefault(tensor, {})[model] = b["n_at"] - b["kept_at"]
    return {
        "tensors_with_ambiguous_ties": len(ambiguous),
        "dropped_tied_elements": sum(sum(v.values()) for v in ambiguous.values()),
        "ambiguous": ambiguous,
    }


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mergekit", help="path to mergekit-yaml (its venv's python must sit next to it)")
    ap.add_argument("--setup", action="store_true", help=f"create .mkvenv ({TORCH_PIN} {MERGEKIT_PIN}) if missing")
    ap.add_argument("--out", default=str(GOLDEN), help="golden directory (default tests/golden)")
    ap.add_argument(
        "--verify-repeat", action="store_true", help="rerun each config with plain mergekit-yaml and compare"
    )
    ap.add_argument("--keep-temp", action="store_true", help="keep the fixtures and raw mergekit outputs")
    ap.add_argument(
        "--only",
        nargs="+",
        metavar="NAME",
        help="(re)build only these cases (names or prefixes, e.g. slerp); the manifest keeps the others",
    )
    a = ap.parse_args(argv)
    cases = [c for c in CASES if not a.only or any(c.name == o or c.name.startswith(o) for o in a.only)]
    if a.only and not cases:
        raise SystemExit(f"--only {' '.join(a.only)}: no such case")

    mergekit = find_mergekit(a.mergekit, setup=a.setup)
    versions = mergekit_versions(mergekit.parent / "python")
    print(f"mergekit {versions['mergekit']} (torch {versions['torch']}) at {mergekit}")
    golden = Path(a.out)
    (golden / "configs").mkdir(parents=True, exist_ok=True)
    (golden / "resolved").mkdir(parents=True, exist_ok=True)

    tmp = Path(tempfile.mkdtemp(prefix="bigmerge-golden-"))
    previous = golden / "MANIFEST.json"
    old_configs = json.loads(previous.read_text())["configs"] if a.only and previous.exists() else {}
    manifest: dict[str, Any] = {
        "about": "golden outputs of mergekit-yaml on tools/toy_models.py fixtures; rebuild with tools/make_golden.py",
        "mergekit": versions,
        "mergekit_args": MERGEKIT_ARGS,
        "families": {},
        "configs": {k: v for k, v in old_configs.items() if k in {c.name for c in CASES}},
    }
    try:
        families: dict[str, dict[str, Path]] = {}
        for fam, kwargs in FAMILIES.items():
            families[fam] = make_family(tmp / "fixtures" / fam, **kwargs)
            manifest["families"][fam] = {
                "args": kwargs,
                "generator_version": GENERATOR_VERSION,
                "torch": torch.__version__,
                "sha256": {rel: sha256_file(p) for rel, p in family_files(families[fam])},
            }
        for case in cases:
            paths = families[case.family]
            used = placeholders(case.yaml)
            rendered = render_config(case.yaml, paths)
            if rendered != case.yaml.format(**{k: str(v) for k, v in paths.items()}):
                raise SystemExit(f"{case.name}: template must not contain braces other than placeholders")
            work = tmp / "runs" / case.name
            work.mkdir(parents=True)
            cfg = work / "config.yaml"
            cfg.write_text(rendered)
            log = work / "probe.json"
            seconds = run_mergekit(mergekit, cfg, work / "out", probe_log=log)
            tensors = load_output(work / "out")
            if a.verify_repeat:
                run_mergekit(mergekit, cfg, work / "out2", probe_log=None)
                if not same_bits(tensors, load_output(work / "out2")):
                    raise SystemExit(f"{case.name}: a second (unprobed) mergekit run gave different tensors")
            out_cfg = json.loads((work / "out" / "config.json").read_text())
            names = {str(p): name for name, p in paths.items()}
            resolved = summarize_resolved(json.loads(log.read_text()), names)

            (golden / "configs" / f"{case.name}.yaml").write_text(case.yaml)
            target = golden / f"{case.name}.safetensors"
            # One metadata key only: safetensors writes its metadata map in random (Rust HashMap)
            # order, so several keys would make the file bytes differ from run to run.
            save_file(tensors, str(target), metadata={"format": "pt"})
            target.chmod(0o644)  # safetensors creates 0600 files
            write_json(golden / "resolved" / f"{case.name}.json", resolved)
            fixture_sha = manifest["families"][case.family]["sha256"]
            entry: dict[str, Any] = {
                "family": case.family,
                "family_args": FAMILIES[case.family],
                "mergekit_version": versions["mergekit"],
                "models": used,
                "config": f"configs/{case.name}.yaml",
                "config_sha256": sha256_bytes(case.yaml.encode()),
                "fixture_sha256": {rel: h for rel, h in fixture_sha.items() if rel.split("/")[0] in used},
                "output": {
                    "file": target.name,
                    "sha256": sha256_file(target),
                    "n_tensors": len(tensors),
                    "dtypes": dict(Counter(dtype_name(t.dtype) for t in tensors.values())),
                    "config_dtype": out_cfg.get("dtype", out_cfg.get("torch_dtype")),
                    "tie_word_embeddings": out_cfg.get("tie_word_embeddings"),
                    "has_lm_head": "lm_head.weight" in tensors,
                    "files": sorted(p.name for p in (work / "out").iterdir()),
                },
                "compute_dtypes": sorted({r["compute_dtype"] for r in resolved.values() if r["compute_dtype"]}),
            }
            if any("topk" in r for r in resolved.values()):
                entry["topk_boundary"] = topk_boundary_summary(resolved)
            manifest["configs"][case.name] = entry
            ties = entry.get("topk_boundary", {}).get("dropped_tied_elements")
            print(
                f"{case.name:34s} family {case.family}  {seconds:5.1f} s  {len(tensors)} tensors "
                f"{entry['output']['dtypes']}  config dtype {entry['output']['config_dtype']}"
                + (f"  top-k boundary ties dropped: {ties}" if ties is not None else "")
            )
    finally:
        if a.keep_temp:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    if a.only:
        # Several people may build different cases at once: merge into the manifest as it is
        # now, and leave every other case's files alone.
        if previous.exists():
            current = json.loads(previous.read_text())["configs"]
            manifest["configs"] = {**current, **{c.name: manifest["configs"][c.name] for c in cases}}
    else:
        # Drop goldens of configs that no longer exist, so the directory matches the manifest.
        keep = {c.name for c in CASES}
        for pattern in ("*.safetensors", "configs/*.yaml", "resolved/*.json"):
            for f in golden.glob(pattern):
                if f.name.split(".")[0] not in keep:
                    f.unlink()
    write_json(golden / "MANIFEST.json", manifest)
    total = sum(f.stat().st_size for f in golden.rglob("*") if f.is_file())
    print(f"wrote {golden} ({total / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
