"""Compile bigmerge's numba kernels into their on-disk cache, so no merge pays for it.

A fresh install used to pay numba's compilation on its first merge (65 s for a 4-layer toy TIES
merge against 5.4 s cached). tools/setup_env.sh runs this once after installing: it merges a
small generated family (bfloat16 and float32 sources, tensors large enough for the kernels'
threaded variants) with every golden config (tests/golden/configs: every operator, its dtype
variants, slices and gradients), each as one block per tensor and as many blocks (the
statistics rounds), in one process. The kernels take their sources in 8 slots
(ops/kernels.slots), so these merges also cover every other number of models up to 8.

The cache is numba's: NUMBA_CACHE_DIR if set (set it the same at run time), else the
package's __pycache__. Run it again after changing a kernel. Concurrent runs are safe (the
compile lock in ops/kernels.py). Usage: .venv/bin/python tools/warm_kernels.py [--quiet]
[--first METHODS --first-done FILE] (FILE is created once the kernels of METHODS are cached: the
quickstart waits for it before its merge, while the rest compiles on the side).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "tests" / "golden" / "configs"
LAYERS = 4
HIDDEN = 64
INTERMEDIATE = 128
BIG = (1024, 512)  # layer 0's up_proj: 2-4 sources of it are over a million elements (threaded kernels)


def _family(root: Path, dtype: torch.dtype, n_finetunes: int) -> dict[str, Path]:
    g = torch.Generator().manual_seed(0)
    shapes = {
        "model.embed_tokens.weight": (260, HIDDEN),
        "lm_head.weight": (260, HIDDEN),
        "model.norm.weight": (HIDDEN,),
    }
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[f"{p}self_attn.{name}.weight"] = (HIDDEN, HIDDEN)
        shapes[f"{p}mlp.gate_proj.weight"] = (INTERMEDIATE, HIDDEN)
        shapes[f"{p}mlp.up_proj.weight"] = BIG if i == 0 else (INTERMEDIATE, HIDDEN)
        shapes[f"{p}mlp.down_proj.weight"] = (HIDDEN, INTERMEDIATE)
        shapes[f"{p}input_layernorm.weight"] = (HIDDEN,)
        shapes[f"{p}post_attention_layernorm.weight"] = (HIDDEN,)
    base = {k: torch.randn(s, generator=g) * 0.02 for k, s in shapes.items()}
    config = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "num_hidden_layers": LAYERS,
        "hidden_size": HIDDEN,
        "intermediate_size": INTERMEDIATE,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "vocab_size": 260,
        "tie_word_embeddings": False,
    }
    out = {}
    for j in range(n_finetunes + 1):
        name = "base" if j == 0 else f"ft{j}"
        tensors = base if j == 0 else {k: v + 0.002 * torch.randn(v.shape, generator=g) for k, v in base.items()}
        d = root / name
        d.mkdir(parents=True)
        save_file({k: v.to(dtype).contiguous() for k, v in tensors.items()}, str(d / "model.safetensors"))
        (d / "config.json").write_text(json.dumps(config))
        out[name] = d
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument(
        "--first", default="", help="comma-separated methods whose configs go first (what a merge about to run needs)"
    )
    ap.add_argument("--first-done", type=Path, default=None, help="create this file once the --first configs are done")
    args = ap.parse_args(argv)
    from bigmerge.engine.comm import SerialComm
    from bigmerge.merge import MergeOptions, run_merge

    t0 = time.perf_counter()
    done = failed = 0
    with tempfile.TemporaryDirectory(prefix="bigmerge-warm-") as tmp:
        root = Path(tmp)
        families = {"bf16": _family(root / "bf16", torch.bfloat16, 3), "fp32": _family(root / "fp32", torch.float32, 3)}
        first = tuple(m for m in args.first.split(",") if m)
        for cfg in sorted(CONFIGS.glob("*.yaml"), key=lambda p: (not p.stem.startswith(first or ("",)), p.stem)):
            if args.first_done and not (first and cfg.stem.startswith(first)):
                args.first_done.touch()  # every config of the --first methods has been merged
                args.first_done = None
            for fam_name, fam in families.items():
                for blocks in ("one", "many") if fam_name == "bf16" else ("one",):
                    text = cfg.read_text().format(**{k: str(v) for k, v in fam.items()})
                    path = root / f"{cfg.stem}-{fam_name}-{blocks}.yaml"
                    path.write_text(text)
                    opts = MergeOptions(quiet=True, block_bytes=(32 << 20) if blocks == "one" else (64 << 10))
                    opts.cache_bytes = 0 if blocks == "many" else opts.cache_bytes  # the spill's passes too
                    try:
                        run_merge(str(path), str(root / "out" / path.stem), SerialComm(), opts)
                        done += 1
                    except Exception as exc:  # a config this family cannot serve (a tokenizer): skip it
                        failed += 1
                        if not args.quiet:
                            print(
                                f"warm_kernels: {path.stem} skipped: {str(exc).splitlines()[0][:160]}", file=sys.stderr
                            )
    if args.first_done:
        args.first_done.touch()
    print(
        f"warm_kernels: numba kernels compiled and cached in {time.perf_counter() - t0:.0f} s "
        f"({done} merges, {failed} skipped)",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
