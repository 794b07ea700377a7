"""Multi-document configs (mergekit-multi): merges in order, a later one reading an earlier one.

Each merge is a whole bigmerge merge (OUT guard, record, lock); the final output must be
bit-identical to running the merges one by one by hand; intermediates live in scratch beside OUT
and are removed after, or are kept with --intermediate-dir; the same on 2 ranks and on S3.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from helpers import assert_bit_identical, bigmerge, load_output, merge_tensors, synthetic_family
from test_mpi import mpirun
from test_s3 import s3_env, s3_family  # noqa: F401 - pytest fixtures

from bigmerge.errors import ConfigError
from bigmerge.planning.config import load_yaml_documents
from bigmerge.planning.stages import plan_stages

# the shape of mergekit's docs/multimerge.md example: a linear merge, a SLERP onto it, a final
# TIES with it as a source (unnamed: the final output)
MULTI = """\
name: first-merge
merge_method: linear
models:
  - model: {base}
  - model: {ft1}
parameters:
  weight: 0.5
---
name: second-merge
merge_method: slerp
base_model: first-merge
models:
  - model: first-merge
  - model: {ft2}
parameters:
  t: 0.3
---
merge_method: ties
base_model: {base}
models:
  - model: second-merge
    parameters:
      density: 0.6
      weight: 0.5
  - model: {ft1}
    parameters:
      density: 0.8
      weight: 0.5
dtype: float32
"""


@pytest.fixture(scope="module")
def fam(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return synthetic_family(tmp_path_factory.mktemp("stages"), n=2, rows=40)


def _fmt(text: str, paths: dict[str, Path] | dict[str, str]) -> str:
    return text.format(**{k: str(v) for k, v in paths.items()})


def test_order_names_and_outputs() -> None:
    text = (
        "name: a\nmerge_method: linear\nmodels:\n  - model: b\n  - model: x\n---\n"
        "name: unused\nmerge_method: linear\nmodels:\n  - model: y\n  - model: z\n---\n"
        "name: b\nmerge_method: linear\nmodels:\n  - model: y\n  - model: z\n---\n"
        "merge_method: slerp\nbase_model: a\nmodels:\n  - model: a\n  - model: x\n"
    )
    docs = load_yaml_documents(text, "m.yaml")
    stages = plan_stages(docs, "m.yaml", "/o/out", None)
    # dependency order (b before a), the unnamed merge is the final one, an unneeded one skipped
    assert [(s.name, s.out, s.final) for s in stages] == [
        ("b", "/o/out.bigmerge-stages/b", False),
        ("a", "/o/out.bigmerge-stages/a", False),
        (None, "/o/out", True),
    ]
    assert stages[1].config["models"][0]["model"] == "/o/out.bigmerge-stages/b"
    assert stages[2].config["base_model"] == "/o/out.bigmerge-stages/a"
    assert "name" not in stages[1].config
    # kept intermediates: every merge runs (file order among the ready ones)
    kept = plan_stages(docs, "m.yaml", "s3://bkt/out", "s3://bkt/inter/")
    assert [(s.name, s.out) for s in kept] == [
        ("unused", "s3://bkt/inter/unused"),
        ("b", "s3://bkt/inter/b"),
        ("a", "s3://bkt/inter/a"),
        (None, "s3://bkt/out"),
    ]
    # all named: the last one in the file is the final output (unused: not needed by it)
    named = plan_stages(docs[1:3], "m.yaml", "/o/out", None)
    assert [(s.name, s.out, s.final) for s in named] == [("b", "/o/out", True)]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("merge_method: linear\n---\nmerge_method: linear\n", "more than one document without a name"),
        ("name: a\nmerge_method: linear\n---\nname: a\nmerge_method: linear\n", "two merges are named 'a'"),
        ("name: a\nbase_model: a\nmerge_method: linear\n---\nmerge_method: linear\n", "merge 'a' names itself"),
        (
            "name: a\nbase_model: b\nmerge_method: linear\n---\nname: b\nbase_model: a\nmerge_method: linear\n"
            "---\nmerge_method: linear\n",
            "name each other in a cycle",
        ),
        ("name: ../x\nmerge_method: linear\n---\nmerge_method: linear\n", "names a directory"),
        ("name: a\nbase_model: b\nmerge_method: linear\n---\nname: b\nmerge_method: linear\n", "the final merge"),
        ("- 1\n---\nmerge_method: linear\n", "document 1: expected a mapping"),
    ],
)
def test_bad_multi_document_configs(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        plan_stages(load_yaml_documents(text, "m.yaml"), "m.yaml", "/o/out", None)


def _by_hand(fam: dict[str, Path], tmp_path: Path) -> dict[str, torch.Tensor]:
    """The three merges run one by one, each naming the previous output's path."""
    docs = list(yaml.safe_load_all(_fmt(MULTI, fam)))
    first, second = tmp_path / "hand-first", tmp_path / "hand-second"
    for doc, out in ((docs[0], first), (docs[1], second), (docs[2], tmp_path / "hand-final")):
        doc.pop("name", None)
        text = yaml.safe_dump(doc).replace("first-merge", str(first)).replace("second-merge", str(second))
        merge_tensors(text, out, block_bytes=512)  # in this process: three fewer interpreter starts
    return load_output(tmp_path / "hand-final")


def test_stages_equal_merging_by_hand_and_scratch_is_removed(fam: dict[str, Path], tmp_path: Path) -> None:
    cfg = tmp_path / "multi.yaml"
    cfg.write_text(_fmt(MULTI, fam))
    out = tmp_path / "final"
    proc = bigmerge("merge", str(cfg), str(out), "--block-size", "512")
    assert proc.returncode == 0, proc.stderr
    assert "merge 'first-merge' (1 of 3)" in proc.stderr and "the final merge (3 of 3)" in proc.stderr
    assert_bit_identical(load_output(out), _by_hand(fam, tmp_path))
    assert (out / "bigmerge-manifest.json").exists()
    assert not (tmp_path / "final.bigmerge-stages").exists()  # scratch: removed once the final merge is done
    recipe = (out / "bigmerge_config.yaml").read_text()
    assert "final.bigmerge-stages/second-merge" in recipe  # the final merge's recipe, its source resolved
    assert bigmerge("verify", str(out)).returncode == 0


def test_intermediates_kept_and_reused(fam: dict[str, Path], tmp_path: Path) -> None:
    cfg = tmp_path / "multi.yaml"
    cfg.write_text(_fmt(MULTI, fam))
    inter = tmp_path / "inter"
    args = ["merge", str(cfg), str(tmp_path / "final"), "--block-size", "512", "--intermediate-dir", str(inter)]
    proc = bigmerge(*args)
    assert proc.returncode == 0, proc.stderr
    for name in ("first-merge", "second-merge"):
        assert (inter / name / "bigmerge-manifest.json").exists()
        assert bigmerge("verify", str(inter / name)).returncode == 0
    # a rerun reuses the finished intermediates (mergekit-multi's lazy mode); the final OUT is
    # finished too, so it needs --overwrite like any other merge
    again = bigmerge(*args, "--overwrite")
    assert again.returncode == 0, again.stderr
    assert again.stderr.count("reused") == 2


def test_an_intermediate_in_a_foreign_folder_is_refused(fam: dict[str, Path], tmp_path: Path) -> None:
    """The OUT guard holds for intermediates: a folder holding someone else's files is not written."""
    cfg = tmp_path / "multi.yaml"
    cfg.write_text(_fmt(MULTI, fam))
    inter = tmp_path / "inter"
    (inter / "first-merge").mkdir(parents=True)
    (inter / "first-merge" / "model.safetensors").write_bytes(b"not ours")
    proc = bigmerge(
        "merge", str(cfg), str(tmp_path / "final"), "--intermediate-dir", str(inter), "--overwrite", "--quiet"
    )
    assert proc.returncode != 0
    assert len(proc.stderr.strip().splitlines()) == 1 and "which bigmerge did not write" in proc.stderr
    assert (inter / "first-merge" / "model.safetensors").read_bytes() == b"not ours"
    assert not (tmp_path / "final").exists()


def test_a_stage_may_not_write_into_a_source(fam: dict[str, Path], tmp_path: Path) -> None:
    """An intermediate directory inside a source model is refused before anything is written."""
    cfg = tmp_path / "multi.yaml"
    cfg.write_text(_fmt(MULTI, fam))
    proc = bigmerge("merge", str(cfg), str(tmp_path / "final"), "--intermediate-dir", str(fam["ft2"] / "x"), "--quiet")
    assert proc.returncode != 0
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not (fam["ft2"] / "x").exists()


@pytest.mark.mpi
@pytest.mark.s3
def test_stages_on_2_ranks_to_s3_match_local(
    s3_env: dict[str, str],  # noqa: F811
    s3_family: tuple[dict[str, Path], dict[str, str]],  # noqa: F811
    tmp_path: Path,
) -> None:
    import s3fs

    local, remote = s3_family
    c_local = tmp_path / "local.yaml"
    c_local.write_text(_fmt(MULTI, local))
    c_s3 = tmp_path / "s3.yaml"
    c_s3.write_text(_fmt(MULTI, remote))
    bigmerge("merge", str(c_local), str(tmp_path / "ref"), "--block-size", "300", "--quiet", check=True)
    proc = mpirun(2, "merge", str(c_s3), "s3://out-bkt/multi", "--block-size", "300", "--quiet", env=s3_env)
    assert proc.returncode == 0, proc.stderr
    fs = s3fs.S3FileSystem(endpoint_url=s3_env["AWS_ENDPOINT_URL"], skip_instance_cache=True)
    fs.get("out-bkt/multi", str(tmp_path / "got"), recursive=True)
    assert not fs.exists("out-bkt/multi.bigmerge-stages")  # scratch on S3, removed too
    assert_bit_identical(load_output(tmp_path / "ref"), load_output(tmp_path / "got"))


def test_unneeded_merges_are_skipped_and_plan_says_what_runs_them(fam: dict[str, Path], tmp_path: Path) -> None:
    cfg = tmp_path / "multi.yaml"
    extra = "name: unused\nmerge_method: linear\nmodels:\n  - model: {ft1}\n  - model: {ft2}\n---\n"
    cfg.write_text(_fmt(extra + MULTI, fam))
    proc = bigmerge("merge", str(cfg), str(tmp_path / "final"), "--block-size", "4096")
    assert proc.returncode == 0, proc.stderr
    assert "does not need 'unused': not merged" in proc.stderr
    plan = bigmerge("plan", str(cfg))
    assert plan.returncode == 2 and "several YAML documents" in plan.stderr
    assert len(plan.stderr.strip().splitlines()) == 1
