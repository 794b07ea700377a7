"""The model zoo (tools/make_zoo.py) and its tasks (bigmerge/eval/zoo_tasks.py)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from make_zoo import encode, greedy_accuracy, load_checkpoint, make_zoo, zoo_files
from zoo_fixture import small_zoo_dir

from bigmerge.eval import zoo_tasks

pytestmark = pytest.mark.slow  # builds and trains the model zoo


@pytest.fixture(scope="module")
def small_zoo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return small_zoo_dir(tmp_path_factory)


def test_eval_items_never_occur_in_training() -> None:
    for skill in zoo_tasks.SKILLS:
        ev = zoo_tasks.eval_items(skill)
        assert len(ev) == len({it.prompt for it in ev}) > 50, skill
        stream = zoo_tasks.train_stream(skill, seed=0)
        train = [next(stream) for _ in range(5000)]
        if skill == "fin":
            # a held-out item's prompt is the start of a record in a field order training never shows
            texts = [it.answer for it in train]
            for it in ev:
                assert not any(t.startswith(it.prompt) for t in texts), it
            # ...while the fact itself is in the training text
            assert any(it.answer.strip() in t and t.startswith(it.prompt.split(":")[0]) for t in texts)
        else:
            held = {it.prompt for it in ev}
            assert not held & {it.prompt for it in train}, skill
            assert all(it.answer for it in train)


def test_tasks_are_fixed_and_answers_are_right() -> None:
    assert zoo_tasks.eval_items("add")[0] == zoo_tasks.eval_items("add")[0]
    for it in zoo_tasks.eval_items("add"):
        a, b = it.prompt.rstrip("=").split("+")
        assert int(it.answer) == int(a) + int(b)
    for it in zoo_tasks.eval_items("rev"):
        assert it.answer == it.prompt[4:-1][::-1]
    for it in zoo_tasks.eval_items("sort"):
        assert it.answer == "".join(sorted(it.prompt[5:-1]))


def test_micro_zoo_builds_bit_identical_twice(tmp_path: Path) -> None:
    a = make_zoo(tmp_path / "a", preset="micro")
    make_zoo(tmp_path / "b", preset="micro")
    files_a, files_b = zoo_files(tmp_path / "a"), zoo_files(tmp_path / "b")
    assert "sort/model.safetensors" in files_a and "sort_10/model.safetensors" in files_a
    # a LoRA adapter run saves PEFT's adapter files only, and they load back into the base with PEFT
    assert {k for k in files_a if k.startswith("lora_sort/")} == {
        "lora_sort/adapter_config.json",
        "lora_sort/adapter_model.safetensors",
    }
    assert a["models"]["lora_sort"]["lora_rank"] == 2 and "lora_rank" not in a["models"]["sort"]
    assert files_a == files_b
    # a different seed trains other weights
    make_zoo(tmp_path / "c", preset="micro", seed=1)
    assert zoo_files(tmp_path / "c")["base/model.safetensors"] != files_a["base/model.safetensors"]
    assert a["models"]["sort_10"]["steps"] == 10
    from peft import PeftModel

    adapted = PeftModel.from_pretrained(load_checkpoint(tmp_path / "a" / "base"), str(tmp_path / "a" / "lora_sort"))
    # the adapter changed the base's answers (B is no longer zero), and what it scores is what make_zoo recorded
    assert any("lora_B" in n and p.abs().sum() > 0 for n, p in adapted.named_parameters())
    assert greedy_accuracy(adapted, zoo_tasks.eval_items("sort")) == a["models"]["lora_sort"]["accuracy"]["sort"]


def test_small_zoo_layout(small_zoo: Path) -> None:
    info = json.loads((small_zoo / "zoo.json").read_text())
    assert set(info["scenarios"]) == {"specialists", "similar", "lorahub"}
    for sc in info["scenarios"].values():
        assert sc["base"] == "base" and sc["skills"] == list(zoo_tasks.SKILLS)
        for m in [sc["base"], *sc["models"]]:
            files = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
            if sc.get("adapters") and m != sc["base"]:  # PEFT LoRA adapters on the base
                files = ("adapter_config.json", "adapter_model.safetensors")
            for f in files:
                assert (small_zoo / m / f).is_file(), (m, f)
    for skill, rel in info["tasks"].items():
        lines = (small_zoo / rel).read_text().splitlines()
        assert len(lines) == len(zoo_tasks.eval_items(skill))
    # cached: a second call with the same arguments rebuilds nothing
    before = (small_zoo / "base" / "model.safetensors").stat().st_mtime_ns
    t0 = time.perf_counter()
    make_zoo(small_zoo, preset="small")
    assert time.perf_counter() - t0 < 5
    assert (small_zoo / "base" / "model.safetensors").stat().st_mtime_ns == before


def test_specialists_beat_the_base_on_their_own_skill(small_zoo: Path) -> None:
    info = json.loads((small_zoo / "zoo.json").read_text())
    acc = {name: m["accuracy"] for name, m in info["models"].items()}
    for skill in info["scenarios"]["specialists"]["models"]:
        assert acc[skill][skill] >= acc["base"][skill] + 0.25, (skill, acc[skill], acc["base"])
    # and the recorded accuracy is what the saved weights give
    model = load_checkpoint(small_zoo / "sort")
    with torch.no_grad():
        assert greedy_accuracy(model, zoo_tasks.eval_items("sort")) == pytest.approx(acc["sort"]["sort"], abs=1e-4)


def test_hf_loads_a_zoo_model_and_its_tokenizer_matches_training(small_zoo: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(small_zoo / "sort"))
    model = AutoModelForCausalLM.from_pretrained(str(small_zoo / "sort"), dtype=torch.float32)
    text = "sort 9728023=0223789"
    assert tok(text, add_special_tokens=False)["input_ids"] == encode(text)
    assert tok(text)["input_ids"] == [1, *encode(text)]  # <s> first, as in training
    # greedy generation gives what the teacher-forced accuracy counts: the skill survives the round trip
    items = zoo_tasks.eval_items("sort")[:20]
    right = 0
    for it in items:
        prompt = torch.tensor([[1, *encode(it.prompt)]])
        out = model.generate(prompt, max_new_tokens=len(it.answer), do_sample=False, pad_token_id=3, eos_token_id=None)
        right += tok.decode(out[0, prompt.shape[1] :]) == it.answer
    assert right == round(greedy_accuracy(model, items) * len(items)) >= 10
