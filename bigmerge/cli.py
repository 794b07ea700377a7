"""The `bigmerge` command: merge, plan, verify, methods."""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import sys
import traceback

from bigmerge import __version__
from bigmerge.errors import BigmergeError

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """'32M', '1.5G', '512MiB', '4096' -> bytes (K/M/G/T are powers of 1024)."""
    m = _SIZE.match(text)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 4096, 32M, 1.5G)")
    mult = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}[m.group(2).lower()]
    return int(float(m.group(1)) * mult)


def _merge_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--block-size",
        type=parse_size,
        default="32M",
        help="target bytes per block per source (default 32M); never depends on the number of ranks",
    )
    p.add_argument(
        "--seed", type=int, default=None, help="seed of random operators (default: the config's seed, else 0)"
    )
    p.add_argument("--prefetch", type=int, default=2, help="blocks read ahead of the one being merged (default 2)")
    p.add_argument(
        "--cache-size",
        type=parse_size,
        default="512M",
        help="per-rank memory for keeping a tensor's blocks between statistic passes (default 512M); a larger "
        "tensor is spilled to local scratch or read again (--spill)",
    )
    p.add_argument(
        "--spill",
        choices=("auto", "always", "never"),
        default="auto",
        help="a tensor over --cache-size between statistic passes: written once to local scratch "
        "($BIGMERGE_SPILL_DIR, else $TMPDIR) and read back from there (always), read from its sources again "
        "(never), or auto (default): spilled when a source is on object storage or a network file system, "
        "read again when all are on local disks (a local re-read costs no more than reading the spill back)",
    )


def parse_count(text: str) -> int:
    """mergekit's parameter counts: '5B' = 5e9, '500M', '20K' (powers of 1000), or an integer."""
    m = re.fullmatch(r"\s*(\d+)\s*([kmb]?)\s*", text, re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"not a parameter count: {text!r} (examples: 5B, 500M, 1000000)")
    return int(m.group(1)) * {"": 1, "k": 10**3, "m": 10**6, "b": 10**9}[m.group(2).lower()]


# mergekit-yaml's options that mean nothing here: accepted, one line says so (docs/mergekit-cli.md)
MERGEKIT_IGNORED = {
    "allow_crimes": "sources of different architectures are still refused (bigmerge merges tensor by tensor)",
    "unsafe_truncate_embeddings": "embeddings are never truncated; give a tokenizer_source to merge vocabularies",
    "transformers_cache": "nothing is downloaded; sources are paths or fsspec URLs",
    "lora_merge_cache": "LoRA adapters are applied block by block as the sources are read; nothing is cached",
    "lora_merge_dtype": "LoRA adapters are added in each base checkpoint's own dtype, as PEFT's merge_and_unload does",
    "low_cpu_memory": "memory is bounded by blocks, whatever the model's size",
    "clone_tensors": "every output tensor is written from its own buffer",
    "trust_remote_code": "bigmerge never runs a model's code",
    "lazy_unpickle": "pickle checkpoints load only with --allow-bin, through torch.load(weights_only=True)",
    "safe_serialization": "the output is always safetensors",
    "read_to_gpu": "sources are read into host memory; --device cuda computes on the GPU",
    "multi_gpu": "run one rank per GPU under mpirun with --device cuda",
    "num_threads": "each rank takes its share of the node's cores",
    "async_write": "writes always overlap the merge",
    "write_threads": "writes always overlap the merge",
    "verbosity": "bigmerge prints its progress unless --quiet",
}


def _mergekit_flag(name: str) -> str:
    return "-v" if name == "verbosity" else f"--{name.replace('_', '-')}"


def _mergekit_args(m: argparse.ArgumentParser) -> None:
    """mergekit-yaml's command-line options, so that its command lines run unchanged."""
    g = m.add_argument_group(
        "mergekit-yaml options",
        "accepted so that mergekit command lines run unchanged (docs/mergekit-cli.md): --cuda, --no-cuda, "
        "--out-shard-size, --copy-tokenizer, --random-seed and --write-model-card map to bigmerge's settings; "
        "these mean nothing here and print one line saying why: "
        + ", ".join(_mergekit_flag(n) for n in MERGEKIT_IGNORED)
        + " (and their --no- forms)",
    )
    flag = argparse.BooleanOptionalAction
    g.add_argument(
        "--cuda",
        action=flag,
        default=None,
        help="--cuda: --device auto (the GPU; without one, the CPU, said in one line: the same tensors); "
        "--no-cuda: --device cpu",
    )
    g.add_argument("--gpu-rich", action="store_true", default=None, help="as --cuda")
    g.add_argument(
        "--out-shard-size",
        type=parse_count,
        default=None,
        metavar="COUNT",
        help="parameters per output file, mergekit's unit (5B: 5e9 parameters); sets --shard-size to COUNT "
        "times the output dtype's bytes",
    )
    g.add_argument("--copy-tokenizer", action=flag, default=None, help="--no-copy-tokenizer: no tokenizer files in OUT")
    g.add_argument("--random-seed", type=int, default=None, metavar="N", help="as --seed N")
    g.add_argument("--write-model-card", action=flag, default=None, help="--no-write-model-card: no README.md in OUT")
    for name in (
        "allow_crimes",
        "unsafe_truncate_embeddings",
        "low_cpu_memory",
        "clone_tensors",
        "trust_remote_code",
        "lazy_unpickle",
        "safe_serialization",
        "read_to_gpu",
        "multi_gpu",
        "async_write",
    ):
        g.add_argument(f"--{name.replace('_', '-')}", action=flag, default=None, help=argparse.SUPPRESS)
    for name in ("transformers_cache", "lora_merge_cache", "lora_merge_dtype", "write_threads"):
        g.add_argument(f"--{name.replace('_', '-')}", default=None, help=argparse.SUPPRESS)
    g.add_argument("--num-threads", "-j", dest="num_threads", default=None, help=argparse.SUPPRESS)
    g.add_argument("-v", "--verbose", dest="verbosity", action="count", default=None, help=argparse.SUPPRESS)


def mergekit_options(args: argparse.Namespace) -> list[str]:
    """Fold mergekit's options into bigmerge's (args changed in place); one note per option that
    means nothing here or that changes what it does."""
    from bigmerge.errors import ConfigError

    notes: list[str] = []
    for name, why in MERGEKIT_IGNORED.items():
        value = getattr(args, name, None)
        if name == "safe_serialization":  # on in mergekit by default: only asking for pickles is news
            if value is False:
                notes.append(f"mergekit option --no-safe-serialization means nothing here ({why}); ignored")
        elif value not in (None, False, 0):
            notes.append(f"mergekit option {_mergekit_flag(name)} means nothing here ({why}); ignored")
    cuda = True if args.gpu_rich else args.cuda
    if cuda is not None:
        if args.device not in (None, "cuda", "auto") if cuda else args.device not in (None, "cpu"):
            raise ConfigError(f"--{'cuda' if cuda else 'no-cuda'} and --device {args.device} disagree; give one")
        args.device = args.device or ("auto" if cuda else "cpu")
        if cuda and args.device == "auto":
            import torch

            if not torch.cuda.is_available():
                # mergekit would fail on its first tensor; a script written for a GPU box still runs here
                notes.append("--cuda: no CUDA GPU is visible here; computing on the CPU (the same tensors)")
    args.device = args.device or "cpu"
    if args.out_shard_size is not None and args.shard_size is not None:
        raise ConfigError("--shard-size (bytes) and --out-shard-size (parameters) both given; give one")
    if args.random_seed is not None:
        if args.seed is not None and args.seed != args.random_seed:
            raise ConfigError(f"--seed {args.seed} and --random-seed {args.random_seed} disagree; give one")
        args.seed = args.random_seed
    return notes


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bigmerge",
        description="Merge large language-model checkpoints across the ranks of a cluster "
        "(run under mpirun for many ranks; without it, one process).",
    )
    parser.add_argument("--version", action="version", version=f"bigmerge {__version__}")
    # the deepspeed launcher puts --local_rank=N before the command (`deepspeed --module bigmerge dam ...`)
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True)

    m = sub.add_parser("merge", help="merge the models of CONFIG into a Hugging Face checkpoint at OUT")
    m.add_argument("config", help="merge config (YAML; mergekit's configs are read as is)")
    m.add_argument("out", help="output directory: a local path or an fsspec URL such as s3://bucket/model")
    _merge_args(m)
    m.add_argument("--shard-size", type=parse_size, default=None, help="largest output safetensors file (default 5G)")
    m.add_argument(
        "--writer",
        choices=("auto", "direct", "zarr"),
        default="auto",
        help="direct: blocks written in place into the output files (a local or mounted OUT); zarr: through an "
        "intermediate zarr store, then exported (object storage). auto (default): direct for a local OUT "
        "without --store, else zarr (also to resume an interrupted zarr merge in OUT)",
    )
    m.add_argument(
        "--buffered-writes",
        action="store_true",
        help="the direct writer writes through the page cache only (by default page-aligned blocks go to the "
        "device with O_DIRECT where the file system takes it: no copy into the cache, no cached output)",
    )
    m.add_argument(
        "--store", default=None, help="where the intermediate zarr store lives (default OUT/.bigmerge-store.zarr)"
    )
    m.add_argument(
        "--keep-store", action="store_true", help="keep the zarr store (or the direct writer's journal) after export"
    )
    m.add_argument(
        "--intermediate-dir",
        default=None,
        help="multi-document configs (mergekit-multi): keep each named merge here as DIR/NAME (default: in "
        "scratch beside OUT, OUT.bigmerge-stages/, removed once the final merge is done)",
    )
    m.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a finished merge, or a partial merge of another config, at OUT",
    )
    m.add_argument("--io-threads", type=int, default=4, help="threads reading source bytes (default 4)")
    m.add_argument("--quiet", action="store_true", help="no progress output; errors still print")
    m.add_argument(
        "--allow-bin",
        action="store_true",
        help="accept pickle checkpoints (pytorch_model*.bin): loaded with torch.load(weights_only=True) and "
        "converted to safetensors under OUT/.bigmerge-bin-cache first (removed after the merge)",
    )
    m.add_argument(
        "--verify-sources",
        choices=("stat", "hash"),
        default="stat",
        help="how a resume knows the sources did not change: stat (default: size, mtime and inode; ETag and version "
        "on object storage) or hash (also a CRC-32C of every source byte, read once more at the start of each run)",
    )
    m.add_argument(
        "--allow-nonfinite",
        action="store_true",
        help="merge sources that hold NaN or Inf values (by default the first one found is an error)",
    )
    m.add_argument(
        "--device",
        choices=("cpu", "cuda", "auto"),
        default=None,
        help="where the operators compute: cpu (default), cuda (each rank its node-local GPU; an error without one), auto (the GPU if there is one)",
    )

    _mergekit_args(m)

    p = sub.add_parser(
        "plan",
        help="show what a merge would read, write and need, reading no tensor data",
        description="Show a merge's blocks, bytes per rank and estimated time and memory, reading only headers. "
        "Without a config, --params/--models/--method estimate a merge of that size: "
        "bigmerge plan --params 70B --models 3 --method ties --nodes 8 --ranks-per-node 8",
    )
    p.add_argument("config", nargs="?", help="merge config (leave out with --params)")
    _merge_args(p)
    p.add_argument(
        "--world-size", "-n", type=int, default=None, help="ranks to plan for (default nodes x ranks-per-node)"
    )
    est = p.add_argument_group("estimate (the model: docs/performance.md)")
    est.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    est.add_argument("--ranks-per-node", type=int, default=None, help="ranks per node (default: -n, or 1)")
    est.add_argument("--cores-per-node", type=int, default=None, help="cores per node (default: this machine's)")
    est.add_argument(
        "--read-gbps", type=float, default=2.0, help="read bandwidth per node from the sources, GB/s (default 2)"
    )
    est.add_argument(
        "--write-gbps", type=float, default=1.0, help="write bandwidth per node to the output, GB/s (default 1)"
    )
    est.add_argument(
        "--writer",
        choices=("direct", "zarr"),
        default="direct",
        help="direct (a local or mounted output: each byte written once; default) or zarr (object storage: twice)",
    )
    est.add_argument("--params", default=None, help="without a config: parameters per model, e.g. 70B")
    est.add_argument("--models", type=int, default=2, help="without a config: number of source models (default 2)")
    est.add_argument("--method", default="linear", help="without a config: merge_method (default linear)")
    p.add_argument("--json", action="store_true", help="print the whole plan as JSON")
    p.add_argument("--tensors", action="store_true", help="list every tensor with its blocks")

    me = sub.add_parser("methods", help="list every merge method with its parameters")
    me.add_argument("--markdown", action="store_true", help="one Markdown table (the README's operator table)")

    st = sub.add_parser(
        "stats",
        help="compute the data statistics of fisher / regmean for each source model",
        description="Run each model (a local Hugging Face checkpoint) on a small jsonl data set (a 'text' field per "
        "line) and write DIR/<model-name>/fisher.safetensors (--kind fisher: diagonal Fisher, the model's tensor "
        "names) or DIR/<model-name>/gram.safetensors (--kind regmean: each linear layer's input Gram matrix, under "
        "the linear weight's name). <model-name> is the last component of the model's path. Then merge with "
        "'merge_method: fisher' (or regmean) and 'parameters: {statistics_dir: DIR}', or give a model its own file "
        "with its parameter 'statistics: PATH'.",
    )
    st.add_argument("models", nargs="+", metavar="CONFIG_OR_MODELS", help="a merge config (its models) or model paths")
    st.add_argument("--kind", choices=("fisher", "regmean"), required=True, help="which statistics")
    st.add_argument(
        "--data", nargs="+", required=True, metavar="DATA.jsonl", help="one jsonl file for all models, or one per model"
    )
    st.add_argument("--out", required=True, metavar="DIR", help="directory to write DIR/<model-name>/<file> into")
    st.add_argument("--max-examples", type=int, default=256, help="examples read from each data file (default 256)")
    st.add_argument("--max-length", type=int, default=512, help="tokens per example, truncated (default 512)")
    st.add_argument("--device", choices=("cpu", "cuda", "auto"), default="cpu", help="where the models run")
    st.add_argument("--quiet", action="store_true")

    e = sub.add_parser(
        "eval",
        help="score models with lm-eval (the zoo's tasks or lm-eval's own): a table, JSON, Markdown and a PNG chart",
    )
    e.add_argument("models", nargs="+", metavar="MODEL", help="local Hugging Face checkpoint directories")
    e.add_argument("--tasks", default="zoo", help="zoo (all zoo tasks), or names such as zoo_add,zoo_rev (default zoo)")
    e.add_argument("--limit", type=float, default=None, help="items per task (an int), or a fraction below 1")
    e.add_argument("--out", default=None, metavar="DIR", help="write DIR/eval.json, eval.md and eval.png")
    e.add_argument("--batch-size", type=int, default=64)
    e.add_argument("--device", default="cpu", help="torch device (default cpu)")
    e.add_argument("--dtype", default="float32", help="load dtype (default float32)")
    e.add_argument("--quiet", action="store_true", help="print only the table")
    e.add_argument(
        "--backend",
        choices=("hf", "vllm", "command"),
        default="hf",
        help="hf (this process, default), vllm (lm-eval's vLLM model), or command (--command, per model)",
    )
    e.add_argument("--model-args", default=None, help="hf/vllm: more lm-eval model arguments, k=v,k=v")
    e.add_argument(
        "--command",
        dest="eval_command",
        default=None,
        help="--backend command: the template ({model}, {eval_args}, ...)",
    )
    e.add_argument("--timeout", type=float, default=None, help="--backend command: seconds per attempt")
    e.add_argument("--retries", type=int, default=0, help="--backend command: attempts after a failed one")

    d = sub.add_parser(
        "dam",
        help="train DAM merge coefficients (DeepSpeed ZeRO-3), write them and a merge config",
        description="Train DAM coefficients (W = sum_i W_i diag(f(c_i)) per linear layer) by distilling each source "
        "model on its own data into the merged model; launch under deepspeed, torchrun or mpirun for several processes. "
        "Writes OUTPUT/coefficients/*.safetensors and OUTPUT/merge.yaml (merge_method: dam); see configs/dam/zoo.yaml. "
        "`bigmerge dam logits CONFIG` first writes every source's top-k logits into a data set (loss.teacher: dataset).",
    )
    d.add_argument(
        "config",
        metavar="[logits] CONFIG",
        help="DAM config (YAML); `logits CONFIG`: compute each source's top-k teacher logits into the data set "
        "(loss.dataset, default OUTPUT/teacher-logits), resumable, before training",
    )
    d.add_argument("config_after_logits", nargs="?", default=None, help=argparse.SUPPRESS)
    d.add_argument("--merge", metavar="OUT", default=None, help="then merge into OUT with the written merge.yaml")
    d.add_argument("--overwrite", action="store_true", help="--merge: replace a finished merge at OUT")
    d.add_argument("--restart", action="store_true", help="ignore checkpoints in the output directory")
    d.add_argument("--dry-run", action="store_true", help="check the config and sources; print memory per process")
    d.add_argument(
        "--world-size", "-n", "--gpus", type=int, default=None, help="--dry-run: processes (GPUs) to plan for"
    )
    d.add_argument(
        "--gpu-memory", type=float, default=None, metavar="GB", help="--dry-run: memory per GPU (default 80)"
    )
    d.add_argument(
        "--arch",
        default=None,
        help="--dry-run: plan for a known architecture (llama-3-70b, llama-3-8b, mistral-7b) instead of reading "
        "the sources, which need not be on this machine",
    )
    d.add_argument(
        "--examples-per-shard",
        type=int,
        default=16,
        metavar="N",
        help="logits: examples per zarr shard of a new data set (one writer each; a rerun redoes unfinished ones)",
    )
    d.add_argument("--quiet", action="store_true")

    se = sub.add_parser(
        "search",
        help="search merge coefficients (CMA-ES, greedy soup) against lm-eval scores; write the best config",
        description="Search the parameters of a merge (weights of a pool, or per-layer-group weights and densities) "
        "with CMA-ES or greedy soup against a weighted macro-average of lm-eval tasks; every evaluation is journaled "
        "and a rerun resumes. Writes OUT/best.yaml (for bigmerge merge), history, Pareto front, plots. "
        "See configs/recycle-zoo.yaml.",
    )
    se.add_argument("config", help="search config (YAML)")
    se.add_argument("--out", default=None, help="result directory (a rerun on it resumes from its journal)")
    se.add_argument("--workers", type=int, default=None, help="worker processes scoring candidates (default: config)")
    se.add_argument("--mode", choices=("auto", "memory", "disk"), default=None, help="where candidates are merged")
    se.add_argument("--overwrite", action="store_true", help="discard a previous search at OUT and start afresh")
    se.add_argument("--quiet", action="store_true")
    sest = se.add_argument_group("--estimate: the whole search's time and bytes, before launching it")
    sest.add_argument("--estimate", action="store_true", help="print the estimate and exit (reads only headers)")
    sest.add_argument("--nodes", type=int, default=1, help="merge nodes (default 1)")
    sest.add_argument("--ranks-per-node", type=int, default=1, help="ranks per node (default 1)")
    sest.add_argument("--cores-per-node", type=int, default=None, help="cores per node (default: this machine's)")
    sest.add_argument("--read-gbps", type=float, default=2.0, help="read GB/s per node from the sources (default 2)")
    sest.add_argument("--write-gbps", type=float, default=1.0, help="write GB/s per node to scratch (default 1)")
    sest.add_argument(
        "--params", default=None, help="parameters per checkpoint (e.g. 100B) when headers are out of reach"
    )
    sest.add_argument(
        "--eval-seconds", type=float, default=None, help="one candidate's scoring (default: measured in OUT's journal)"
    )

    v = sub.add_parser("verify", help="re-check every tensor of a finished merge against its manifest")
    v.add_argument("out")
    v.add_argument("--quiet", action="store_true")
    return parser


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} TB"


def _cluster(args: argparse.Namespace) -> tuple[int, object]:
    from bigmerge.errors import ConfigError
    from bigmerge.planning.estimate import Cluster

    rpn = args.ranks_per_node or (max(1, (args.world_size or 1) // args.nodes) if args.world_size else 1)
    world = args.world_size or args.nodes * rpn
    if world != args.nodes * rpn or min(args.nodes, rpn, world) < 1:
        raise ConfigError(f"--world-size {world} is not --nodes {args.nodes} x --ranks-per-node {rpn}")
    cores = args.cores_per_node or os.cpu_count() or 1
    return world, Cluster(args.nodes, rpn, cores, args.read_gbps, args.write_gbps, args.writer)


def cmd_plan(args: argparse.Namespace) -> int:
    from bigmerge.errors import ConfigError
    from bigmerge.merge import MergeOptions, plan_merge
    from bigmerge.planning.config import load_config
    from bigmerge.planning.estimate import estimate_model, estimate_plan, parse_count

    world, cluster = _cluster(args)
    if args.config is None:
        if args.params is None:
            raise ConfigError(
                "give a config, or --params (with --models and --method) to estimate a merge of that size"
            )
        try:
            params = parse_count(args.params)
        except ValueError:
            raise ConfigError(f"--params {args.params!r}: expected a count such as 70B, 8e9 or 1.5T") from None
        from bigmerge.ops import get_op

        get_op(args.method)  # an unknown method is a clear error
        e = estimate_model(args.method, params, args.models, cluster, block_bytes=args.block_size)  # type: ignore[arg-type]
        print(f"method        {args.method}; {args.models} models of {params / 1e9:g}B parameters (bf16)")
        print(f"cluster       {cluster}")
        twice = " (store) + the same (export)" if args.writer == "zarr" else " (once: direct writer)"
        print(f"to read       {_human(e.bytes_read)}; to write {_human(e.bytes_written)}{twice}")
        print(f"estimate      {e.describe()}")
        return 0
    cfg = load_config(args.config)
    plan, _ = plan_merge(cfg, world, MergeOptions(block_bytes=args.block_size, seed=args.seed))
    if args.json:
        print(json.dumps(json.loads(plan.to_json()), indent=1))
        return 0
    read = sum(t.in_bytes() for t in plan.tensors)
    write = sum(t.out_bytes() for t in plan.tensors)
    blocks = sum(t.n_blocks for t in plan.tensors)
    per_rank = plan.rank_bytes()
    mean = sum(per_rank) / len(per_rank)
    peak = plan.peak_memory_estimate(args.prefetch, args.cache_size)
    est = estimate_plan(plan, cluster, prefetch=args.prefetch, cache_bytes=args.cache_size, spill=args.spill)  # type: ignore[arg-type]
    for w in plan.warnings:
        print(f"warning: {w}")
    print(f"method        {plan.merge_method}")
    print(
        f"models        {len(plan.models)}"
        + "".join(f"\n  {'base ' if i == plan.base_index else '     '}{r}" for i, r in enumerate(plan.models))
    )
    print(f"compute dtype {plan.compute_dtype}; output dtypes {', '.join(sorted({t.out_dtype for t in plan.tensors}))}")
    print(f"tensors       {len(plan.tensors)}")
    print(f"blocks        {blocks} (block size {_human(plan.block_bytes)} per source)")
    print(f"to read       {_human(read)}")
    print(f"to write      {_human(write)} (store) + {_human(write)} (export)")
    print(f"world size    {plan.world_size}")
    counts = [0] * plan.world_size
    for t in plan.tensors:
        for o in t.owners:
            counts[o] += 1
    if plan.world_size <= 16:
        for r, b in enumerate(per_rank):
            print(f"  rank {r:<4d} {counts[r]:6d} blocks {_human(b):>10}")
    else:
        lo, hi = (
            min(range(plan.world_size), key=per_rank.__getitem__),
            max(range(plan.world_size), key=per_rank.__getitem__),
        )
        print(
            f"  least: rank {lo} {counts[lo]} blocks {_human(per_rank[lo])}; most: rank {hi} {counts[hi]} blocks {_human(per_rank[hi])}"
        )
    print(f"imbalance     {max(per_rank) / mean if mean else 1.0:.3f} (max/mean bytes per rank)")
    print(f"peak memory   ~{_human(peak)} per rank (estimate)")
    print(f"estimate      {est.describe()}")
    print(f"              on {cluster}")
    if args.tensors:
        for t in plan.tensors:
            print(
                f"  {t.name} {t.shape} {t.out_dtype} blocks={t.n_blocks}x{t.block_rows} rows owners={sorted(set(t.owners))}"
            )
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from bigmerge.engine.comm import get_comm
    from bigmerge.merge import MergeOptions, run_merge

    if not gc.isenabled():  # entry() turned it off for the imports (torch's alone: ~0.4 s of collections)
        gc.freeze()  # what the imports made stays out of every later collection
        gc.enable()

    notes = mergekit_options(args)
    if get_comm().rank == 0:
        for note in notes:
            print(f"bigmerge: {note}", file=sys.stderr, flush=True)
    opts = MergeOptions(
        block_bytes=args.block_size,
        shard_bytes=args.shard_size if args.shard_size is not None else parse_size("5G"),
        shard_params=args.out_shard_size,
        copy_tokenizer=args.copy_tokenizer is not False,
        write_card=args.write_model_card is not False,
        cache_bytes=args.cache_size,
        spill=args.spill,
        io_threads=args.io_threads,
        prefetch=args.prefetch,
        seed=args.seed,
        store=args.store,
        direct_io=not args.buffered_writes,
        writer=args.writer,
        overwrite=args.overwrite,
        keep_store=args.keep_store,
        quiet=args.quiet,
        device=args.device,
        allow_nonfinite=args.allow_nonfinite,
        allow_bin=args.allow_bin,
        verify_sources=args.verify_sources,
        intermediate_dir=args.intermediate_dir,
    )
    run_merge(args.config, args.out, get_comm(), opts)
    return 0


def methods_markdown() -> str:
    """Every operator as one Markdown table row: name, summary, base model, parameters."""
    from bigmerge.ops import REGISTRY

    rows = ["| `merge_method` | what it does | base model | parameters (default) |", "|---|---|---|---|"]
    for name in sorted(REGISTRY):
        op = REGISTRY[name]
        summary = (op.__doc__ or "").strip().splitlines()[0].rstrip(".") if op.__doc__ else ""
        params = []
        for p in op.params:
            where = "" if p.scope == "shared" else " per model"
            dflt = (
                "required"
                if p.required
                else repr(p.default).lower()
                if isinstance(p.default, bool)
                else repr(p.default)
            )
            params.append(f"`{p.name}`{where} ({dflt})")
        rand = "; random, seeded" if op.random else ""
        rows.append(f"| `{name}` | {summary}{rand} | {op.base} | {', '.join(params) or '—'} |")
    return "\n".join(rows)


def cmd_methods(args: argparse.Namespace) -> int:
    from bigmerge.ops import REGISTRY

    if args.markdown:
        print(methods_markdown())
        return 0
    for name in sorted(REGISTRY):
        op = REGISTRY[name]
        summary = (op.__doc__ or "").strip().splitlines()[0] if op.__doc__ else ""
        print(f"{name}: {summary}")
        print(f"  base model: {op.base}; at least {op.min_models} model(s){'; random (seeded)' if op.random else ''}")
        for p in op.params:
            where = {"shared": "global", "input": "per model", "non_base": "per model, not the base"}[p.scope]
            dflt = "required" if p.required else f"default {p.default!r}"
            print(f"  {p.name:<24} {p.type.__name__:<6} {where:<24} {dflt:<16} {p.doc}")
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    from bigmerge.stats import StatsOptions, compute_statistics, resolve_models

    opts = StatsOptions(args.max_examples, args.max_length, args.device, args.quiet)
    compute_statistics(resolve_models(args.models), args.kind, args.data, args.out, opts)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from bigmerge.eval.harness import run_cli

    return run_cli(args)


def cmd_dam(args: argparse.Namespace) -> int:
    from bigmerge.dam.train import DamOptions, run_dam

    if args.config_after_logits is not None:
        if args.config != "logits":
            from bigmerge.errors import ConfigError

            raise ConfigError(f"bigmerge dam: one config, not {args.config!r} and {args.config_after_logits!r}")
        from bigmerge.dam.logits import LogitsOptions, run_logits

        return run_logits(args.config_after_logits, LogitsOptions(args.quiet, args.examples_per_shard))
    opts = DamOptions(
        args.merge, args.restart, args.quiet, args.dry_run, args.overwrite, args.world_size, args.gpu_memory, args.arch
    )
    return run_dam(args.config, opts)


def cmd_search(args: argparse.Namespace) -> int:
    from bigmerge.engine.comm import get_comm
    from bigmerge.errors import ConfigError
    from bigmerge.search.run import SearchOptions, run_search

    if args.workers is not None and args.workers < 1:
        raise ConfigError(f"--workers must be at least 1, not {args.workers}")
    if args.estimate:
        return _search_estimate(args)
    if args.out is None:
        raise ConfigError("bigmerge search: --out DIR is required (the results and the journal go there)")
    run_search(args.config, args.out, get_comm(), SearchOptions(args.overwrite, args.quiet, args.workers, args.mode))
    return 0


def _search_estimate(args: argparse.Namespace) -> int:
    from pathlib import Path

    from bigmerge.errors import ConfigError
    from bigmerge.planning.estimate import Cluster, parse_count
    from bigmerge.search.config import load_search_config
    from bigmerge.search.estimate import estimate_search

    cfg = load_search_config(args.config)
    if min(args.nodes, args.ranks_per_node) < 1:
        raise ConfigError("--nodes and --ranks-per-node must be at least 1")
    cores = args.cores_per_node or os.cpu_count() or 1
    cluster = Cluster(args.nodes, args.ranks_per_node, cores, args.read_gbps, args.write_gbps, "direct")
    params = None
    if args.params is not None:
        try:
            params = parse_count(args.params)
        except ValueError:
            raise ConfigError(f"--params {args.params!r}: expected a count such as 100B, 8e9 or 1.5T") from None
    journal = Path(args.out) / "history.jsonl" if args.out else None
    e = estimate_search(cfg, cluster, params=params, eval_seconds=args.eval_seconds, journal=journal)
    print(f"search        {args.config}: {cfg.optimizer.name}, {cfg.fitness.backend.type} backend")
    print(
        f"cluster       {args.nodes} node(s) x {args.ranks_per_node} rank(s), {cores} cores/node, "
        f"read {args.read_gbps:g} GB/s, write {args.write_gbps:g} GB/s per node"
    )
    print(e.describe())
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from bigmerge.output.export import verify
    from bigmerge.storage.fs import location

    report: list[str] = []
    n = verify(location(args.out), report=report)
    if not args.quiet:
        print(f"bigmerge: verified {n} tensors in {args.out} against its manifest:")
        for line in report:
            print(f"  {line}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler = {
        "merge": cmd_merge,
        "plan": cmd_plan,
        "verify": cmd_verify,
        "methods": cmd_methods,
        "eval": cmd_eval,
        "stats": cmd_stats,
        "search": cmd_search,
        "dam": cmd_dam,
    }[args.command]
    from bigmerge.engine.comm import get_comm, launched_by_mpi

    # under mpirun a failing rank aborts the job: the others may wait on it in a collective (dam: ZeRO-3's)
    comm = get_comm() if args.command in ("merge", "search", "dam") and launched_by_mpi() else None
    global _EXIT_NOW
    _EXIT_NOW = args.command == "merge"
    try:
        return handler(args)
    except BigmergeError as exc:
        collective = bool(getattr(exc, "collective", False))
        if comm is None or comm.rank == 0 or not collective:
            one_line = " ".join(str(exc).splitlines())  # the contract: one line, whatever a library said
            print(f"bigmerge: error: {one_line}", file=sys.stderr, flush=True)
        if comm is not None and comm.size > 1 and not collective:
            comm.abort(exc.exit_code)  # the other ranks may be waiting on this one
        return exc.exit_code
    except KeyboardInterrupt:
        if comm is not None and comm.size > 1:
            comm.abort(130)
        return 130
    except Exception:  # noqa: BLE001 - a bug: show it, and never leave other ranks hanging
        rank = f"[rank {comm.rank}] " if comm is not None else ""
        print(f"bigmerge: {rank}internal error:\n{traceback.format_exc()}", file=sys.stderr, flush=True)
        if comm is not None and comm.size > 1:
            comm.abort(1)
        return 1


_EXIT_NOW = False  # set by main for commands whose every resource is closed when they return


def entry() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # OpenMP threads (numba's parallel kernels, torch) sleep between parallel regions instead
    # of spinning: the reader and writer threads need those cycles (linear on 4 x 1 GB: 4.3 s
    # of user CPU -> 2.8 s). Read when the OpenMP runtime loads, so before torch is imported.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    # numpy's and scipy's own OpenBLAS start a thread per core that spins at load, taking
    # cycles from the imports (~0.3 s of CPU a run); nothing here needs their threaded BLAS
    # (the operators run on torch and numba)
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    if sys.argv[1:2] == ["merge"]:
        gc.disable()  # cmd_merge turns it back on once the heavy imports are done
    rc = main()
    if _EXIT_NOW and os.environ.get("BIGMERGE_SLOW_EXIT") != "1":
        # A merge has closed its files, joined its threads and flushed its output by now;
        # what is left is the interpreter's teardown of torch and numba: about a second.
        sys.stdout.flush()
        sys.stderr.flush()
        mpi = sys.modules.get("mpi4py.MPI")
        if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():
            mpi.Finalize()
        os._exit(rc)
    sys.exit(rc)


if __name__ == "__main__":
    entry()
