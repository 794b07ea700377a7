"""The corpus: mergekit configs in the styles people publish, against mergekit 0.1.5's output.

tests/corpus/cases.yaml lists each config (tests/corpus/configs/NAME.yaml, a template) with the
stand-in family it runs on and where its style comes from; tools/make_golden.py --cases
tests/corpus ran each through mergekit once. Here every config runs unchanged through bigmerge:

- mergekit merged it: the same tensors, compared with test_vs_mergekit's rules (top-k ties and
  whole-tensor float statistics within their bounds); the random operators (DARE, DELLA) draw
  differently by design, so for them names, shapes, dtypes and the untouched tensors are compared
  (their draws are compared in distribution in test_vs_mergekit);
- mergekit refused it: bigmerge refuses it too, in one line, before writing anything.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from helpers import merge_tensors
from safetensors.torch import load_file
from test_vs_mergekit import compare_with_mergekit
from toy_models import make_family

from bigmerge.errors import BigmergeError

pytestmark = pytest.mark.slow  # ~45 merges and their comparisons

CORPUS = Path(__file__).parent / "corpus"
CASES = yaml.safe_load((CORPUS / "cases.yaml").read_text())["cases"]
MANIFEST = json.loads((CORPUS / "MANIFEST.json").read_text())
RANDOM = ("dare_", "della")


@pytest.fixture(scope="module")
def families(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Path]]:
    return {
        name: make_family(tmp_path_factory.mktemp(f"corpus{name}"), **fam["args"])
        for name, fam in MANIFEST["families"].items()
    }


def _render(name: str, fam: dict[str, Path]) -> str:
    return (CORPUS / "configs" / f"{name}.yaml").read_text().format(**{k: str(v) for k, v in fam.items()})


def test_corpus_is_complete() -> None:
    """Every case has its golden, and the corpus is the size the issue asks for."""
    assert sorted(CASES) == sorted(MANIFEST["configs"])
    assert len(CASES) >= 40
    merged = [n for n, e in MANIFEST["configs"].items() if "refused" not in e]
    assert len(merged) >= 30
    for n in merged:
        assert (CORPUS / f"{n}.safetensors").exists(), n
    total = sum(f.stat().st_size for f in CORPUS.rglob("*") if f.is_file())
    assert total < 5e6, f"the corpus holds {total / 1e6:.1f} MB; keep it under 5 MB"


def _refused(text: str, out: Path) -> str:
    with pytest.raises(BigmergeError) as info:
        merge_tensors(text, out, block_bytes=4096)
    msg = str(info.value)
    assert msg and "\n" not in msg, msg
    assert not (out / "model.safetensors.index.json").exists()
    return msg


@pytest.mark.parametrize("name", sorted(CASES))
def test_corpus_config(name: str, families: dict[str, dict[str, Path]], tmp_path: Path) -> None:
    entry = MANIFEST["configs"][name]
    fam = families[entry["family"]]
    text = _render(name, fam)
    out = tmp_path / "out"
    if "refused" in entry:  # mergekit refuses it: so does bigmerge, in one line
        _refused(text, out)
        return
    ours = merge_tensors(text, out, block_bytes=4096)
    theirs = load_file(str(CORPUS / f"{name}.safetensors"))
    resolved = json.loads((CORPUS / "resolved" / f"{name}.json").read_text())
    docs = list(yaml.safe_load_all(text))
    cfg = next((d for d in docs if "name" not in d), docs[-1])  # a multi-document config's final merge
    methods = [str(d["merge_method"]) for d in docs]
    # earlier merges carry their allowance into the final one's inputs: a spherical one's applies
    method = next((m for m in methods if m.endswith("slerp")), str(cfg["merge_method"]))
    if any(m.startswith(RANDOM) for m in methods):
        assert sorted(ours) == sorted(theirs)
        for tname, b in theirs.items():
            assert ours[tname].dtype == b.dtype and ours[tname].shape == b.shape, tname
        return
    padded = None
    if (cfg.get("tokenizer") or {}).get("pad_to_multiple_of"):
        vocab = json.loads((out / "tokenizer.json").read_text())
        padded = len(vocab["model"]["vocab"]) + sum(
            t["content"] not in vocab["model"]["vocab"] for t in vocab["added_tokens"]
        )
    compare_with_mergekit(method, ours, theirs, resolved, fam, entry["models"], padded)
    out_cfg = json.loads((out / "config.json").read_text())
    assert out_cfg["vocab_size"] == theirs["model.embed_tokens.weight"].shape[0]
    assert out_cfg["num_hidden_layers"] == 1 + max(
        int(k.split(".")[2]) for k in theirs if k.startswith("model.layers.")
    )
