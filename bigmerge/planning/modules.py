"""The modules of multimodal architectures, for mergekit's `modules:` form.

mergekit 0.1.5 cuts a multimodal checkpoint into modules (a text decoder, a vision tower, a
projector), each with its own tensor names, its own layers and its own layer count in
config.json, and merges each module from the sources and parameters the config gives it
(every module with the one top-level merge_method). This is bigmerge's own table of those
modules for the architectures mergekit knows with several modules and that are in common use;
the names are the ones their hub checkpoints carry, which are mergekit's.

A module is the tensors whose names start with one of its prefixes. Its layers are the
tensors its layer pattern matches (group 1: the layer index); the layer count comes from a
config.json key (dotted: `text_config.num_hidden_layers`), else from the names. `post` names
the tensors after the layers (final norms, the LM head): a module merged in slices takes them
from its last slice, the other tensors outside the layers from its first, as mergekit.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from bigmerge.errors import ConfigError, SourceError


@dataclass(frozen=True)
class ModuleTable:
    prefixes: tuple[str, ...]
    layers: str | None = None  # regex on the full name; group 1 is the layer index
    # config.json keys of the layer count, the first one present counts (dotted: nested configs)
    layers_keys: tuple[str, ...] = ()
    post: tuple[str, ...] = ()  # prefixes of the tensors after the layers
    # tensors outside the layers that mergekit plans twice, at t = 0 and t = 1, keeping either
    twice: tuple[str, ...] = ()

    def owns(self, name: str) -> bool:
        return name.startswith(self.prefixes)

    def layer_of(self, name: str) -> int | None:
        m = re.search(self.layers, name) if self.layers else None
        return int(m.group(1)) if m else None

    def with_layer(self, name: str, layer: int) -> str:
        m = re.search(self.layers or "$^", name)
        assert m is not None
        return f"{name[: m.start(1)]}{layer}{name[m.end(1) :]}"

    def is_post(self, name: str) -> bool:
        return name.startswith(self.post)

    def position(self, name: str, n_layers: int) -> float:
        """t for gradients, as mergekit's plan gives it with one slice over the module's layers:
        layer i of n at i/(n-1), tensors outside the layers at 0."""
        i = self.layer_of(name)
        if i is None:
            return 0.0
        return i / (n_layers - 1) if n_layers > 1 else 1.0

    def planned_twice(self, name: str) -> bool:
        return bool(self.twice) and name.startswith(self.twice)

    def layers_key(self, config: dict[str, Any] | None) -> str | None:
        """The config.json key that holds this module's layer count in `config`, if any."""
        return next((k for k in self.layers_keys if isinstance(config_value(config, k), int)), None)

    def num_layers(self, config: dict[str, Any] | None, names: list[str]) -> int:
        """The module's layer count: its config.json key, else one more than the highest index."""
        key = self.layers_key(config)
        if key is not None:
            return int(config_value(config, key))
        indices = [i for i in (self.layer_of(n) for n in names) if i is not None]
        return max(indices) + 1 if indices else 0


def config_value(config: dict[str, Any] | None, key: str) -> Any:
    """config.json's value at a dotted key (`text_config.num_hidden_layers`), or None."""
    obj: Any = config
    for part in key.split("."):
        if not isinstance(obj, dict) or part not in obj:
            return None
        obj = obj[part]
    return obj


def set_config_value(config: dict[str, Any], key: str, value: Any) -> None:
    """Set config.json's value at a dotted key; the nested objects must exist."""
    *parents, last = key.split(".")
    obj = config
    for part in parents:
        obj = obj[part]
    obj[last] = value


def update_config(config: dict[str, Any], updates: dict[str, Any]) -> None:
    """Apply a plan's config.json updates; a dotted key is a nested one (a module's layer count)."""
    for key, value in updates.items():
        set_config_value(config, key, value)


def _decoder(root: str, lm_head: str, *keys: str) -> ModuleTable:
    """A text decoder with the Llama layout under `root` (`language_model.model.`, `model.`)."""
    return ModuleTable(
        prefixes=(f"{root}embed_tokens.", f"{root}layers.", f"{root}norm.", lm_head),
        layers=rf"^{re.escape(root)}layers\.(\d+)\.",
        layers_keys=keys,
        post=(f"{root}norm.", lm_head),
    )


_PROJECTOR = ModuleTable(prefixes=("multi_modal_projector.",))

_QWEN2_VL = {
    # Qwen2-VL's hub config.json keeps the text decoder's sizes at its top level
    "text_decoder": _decoder("model.", "lm_head.", "text_config.num_hidden_layers", "num_hidden_layers"),
    "vision_tower": ModuleTable(
        prefixes=("visual.patch_embed.", "visual.blocks."),
        layers=r"^visual\.blocks\.(\d+)\.",
        layers_keys=("vision_config.depth",),
    ),
    # mergekit lists the merger's MLP as two "layers" whose names carry no index: each tensor is
    # planned twice, at t = 0 and t = 1, and which one it writes varies from tensor to tensor
    # (seen with a gradient on the projector); here once, at t = 0, with a warning if t matters
    "multi_modal_projector": ModuleTable(prefixes=("visual.merger.",), twice=("visual.merger.mlp.",)),
}

_QWEN3_VL = {
    "text_decoder": _decoder("model.language_model.", "lm_head.", "text_config.num_hidden_layers"),
    "vision_tower": ModuleTable(
        prefixes=("model.visual.patch_embed.", "model.visual.pos_embed.", "model.visual.blocks."),
        layers=r"^model\.visual\.blocks\.(\d+)\.",
        layers_keys=("vision_config.depth",),
    ),
    "multi_modal_projector": ModuleTable(
        prefixes=("model.visual.merger.", "model.visual.deepstack_merger_list."),
        layers=r"^model\.visual\.deepstack_merger_list\.(\d+)\.",
    ),
}

# config.json's `architectures[0]` -> its modules, named as mergekit names them
ARCHITECTURES: dict[str, dict[str, ModuleTable]] = {
    "Gemma3ForConditionalGeneration": {
        "text_decoder": _decoder("language_model.model.", "language_model.lm_head.", "text_config.num_hidden_layers"),
        "vision_tower": ModuleTable(
            prefixes=("vision_tower.vision_model.",),
            layers=r"^vision_tower\.vision_model\.encoder\.layers\.(\d+)\.",
            layers_keys=("vision_config.num_hidden_layers",),
            post=("vision_tower.vision_model.post_layernorm.",),
        ),
        "multi_modal_projector": _PROJECTOR,
    },
    "Mistral3ForConditionalGeneration": {
        "text_decoder": _decoder("language_model.model.", "language_model.lm_head.", "text_config.num_hidden_layers"),
        "vision_tower": ModuleTable(
            prefixes=("vision_tower.",),
            layers=r"^vision_tower\.transformer\.layers\.(\d+)\.",
            layers_keys=("vision_config.num_hidden_layers",),
        ),
        "multi_modal_projector": _PROJECTOR,
    },
    "Llama4ForConditionalGeneration": {
        "text_decoder": _decoder("language_model.model.", "language_model.lm_head.", "text_config.num_hidden_layers"),
        "vision_model": ModuleTable(
            prefixes=("vision_model.",),
            layers=r"^vision_model\.model\.layers\.(\d+)\.",
            layers_keys=("vision_config.num_hidden_layers",),
            post=("vision_model.layernorm_post.", "vision_model.vision_adapter."),
        ),
        "multi_modal_projector": _PROJECTOR,
    },
    "Qwen2VLForConditionalGeneration": _QWEN2_VL,
    "Qwen2_5_VLForConditionalGeneration": _QWEN2_VL,
    "Qwen3VLForConditionalGeneration": _QWEN3_VL,
    "Qwen3VLMoeForConditionalGeneration": _QWEN3_VL,
}


def architecture_of(config: dict[str, Any] | None, where: str) -> str:
    archs = (config or {}).get("architectures")
    if not isinstance(archs, list) or len(archs) != 1 or not isinstance(archs[0], str):
        raise SourceError(
            f"{where}: config.json names no single architecture ('architectures'), which the modules form needs"
        )
    return archs[0]


def module_tables(arch: str, given: list[str], where: str) -> dict[str, ModuleTable]:
    """The modules of `arch`; a one-line ConfigError for an architecture bigmerge has no table
    of, a module name it lacks, or a module of it the config leaves out (mergekit would write a
    checkpoint without that module's tensors)."""
    table = ARCHITECTURES.get(arch)
    if table is None:
        known = ", ".join(sorted(ARCHITECTURES))
        raise ConfigError(
            f"{where}: bigmerge does not know the modules of architecture {arch!r} (it knows those of {known}); "
            "a one-module model takes the plain models/slices form"
        )
    for name in given:
        if name not in table:
            raise ConfigError(
                f"{where}: modules.{name}: architecture {arch} has no module {name!r} "
                f"(its modules: {', '.join(sorted(table))})"
            )
    missing = sorted(set(table) - set(given))
    if missing:
        raise ConfigError(
            f"{where}: modules: architecture {arch}'s module(s) {', '.join(repr(m) for m in missing)} not given; "
            "every module needs its models or slices (mergekit would leave their tensors out of the output)"
        )
    return table


def split_by_module(table: dict[str, ModuleTable], names: list[str], where: str) -> dict[str, list[str]]:
    """Every tensor name under the one module that owns it; a name in no module or in two is an error."""
    out: dict[str, list[str]] = {m: [] for m in table}
    for name in names:
        owners = [m for m, t in table.items() if t.owns(name)]
        if len(owners) != 1:
            what = "no module" if not owners else f"two modules ({', '.join(owners)})"
            raise SourceError(
                f"{where}: tensor {name!r} belongs to {what} of the architecture "
                f"(modules: {', '.join(f'{m} = {table[m].prefixes[0]}...' for m in table)})"
            )
        out[owners[0]].append(name)
    return out
