"""The model card (README.md) and recipe written beside every merged checkpoint.

The hub builds a model's lineage from the card's front matter (`base_model:`), as it does for
mergekit's cards. What a source becomes there, and in the body, is fixed here:

- a hub id (`org/name`, no scheme, not a path that exists here) stays as is, and is listed under
  `base_model`;
- a local path or a URL (s3://bucket/team/alice/ckpt) becomes its last component only (`ckpt`):
  directories and buckets name people and machines, and a card is meant to be published. Such
  sources are not listed under `base_model` (the hub would reject or mislink them).

The config itself is written beside the weights as given (`bigmerge_config.yaml`, byte for
byte), so the merge can be rerun: it keeps the paths the user wrote.

A config written by `bigmerge search` (best.yaml) or `bigmerge dam` (merge.yaml) carries how good
its merge is, and how that was measured, in comment lines that begin with ``#:`` (markdown); the
card shows them under "How good it is". They travel with the file, so `bigmerge merge best.yaml`
anywhere gives a card with the search's scores.
"""

from __future__ import annotations

import os
import re
from typing import Any

import yaml

CARD_NAME = "README.md"
CONFIG_NAME = "bigmerge_config.yaml"
CARD_NAMES = (CARD_NAME, CONFIG_NAME)  # what every merge writes beside the weights
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


def hub_id(source: str) -> str | None:
    """The source's hub id when it is one (org/name, no scheme, not an existing local path)."""
    if "://" in source or not _HUB_ID.match(source) or os.path.exists(source):
        return None
    return source


def public_name(source: str) -> str:
    """What a card shows for a source: a hub id as is, else the last component of its path or URL
    (of each part of mergekit's BASE+ADAPTER)."""
    if "+" in source:
        return "+".join(public_name(part) for part in source.split("+"))
    found = hub_id(source)
    if found:
        return found
    return source.rstrip("/").rsplit("/", 1)[-1] or source


RESULTS_PREFIX = "#:"


def results_from_config(config_text: str) -> str | None:
    """The ``#:`` comment lines of a config (its results, in markdown), or None when it has none."""
    lines = [
        ln[len(RESULTS_PREFIX) :].removeprefix(" ") for ln in config_text.splitlines() if ln.startswith(RESULTS_PREFIX)
    ]
    return "\n".join(lines).strip() or None


def results_comment(markdown: str) -> str:
    """``markdown`` as ``#:`` comment lines, for the head of a config file."""
    return "".join(f"{RESULTS_PREFIX} {ln}".rstrip() + "\n" for ln in markdown.strip().splitlines())


def render_card(
    *,
    method: str,
    sources: list[str],
    base: str | None,
    config_text: str,
    pins: dict[str, str] | None = None,
    parameters: dict[str, Any] | None = None,
    results: str | None = None,
    version: str = "",
) -> str:
    """README.md: hub front matter (base_model, library_name, tags) and a body with the recipe."""
    # BASE+ADAPTER: both parts belong to the lineage
    ids = [h for h in (hub_id(p) for s in ([base] if base else []) + sources for p in s.split("+")) if h]
    front: dict[str, Any] = {}
    if ids:
        front["base_model"] = list(dict.fromkeys(ids))
    front["library_name"] = "transformers"
    front["tags"] = ["merge", "bigmerge", method]
    lines = ["---", yaml.safe_dump(front, sort_keys=False).rstrip(), "---", ""]
    title = f"A {method} merge" + (f" onto {public_name(base)}" if base else "")
    lines += [f"# {title}", "", f"Merged with [bigmerge]{f' {version}' if version else ''} (`merge_method: {method}`)."]
    lines += ["", "## Sources", ""]
    for s in ([base] if base else []) + [s for s in sources if s != base]:
        role = " (base)" if s == base else ""
        pin = f" — `{pins[s]}`" if pins and s in pins else ""
        lines.append(f"- {public_name(s)}{role}{pin}")
    if parameters:
        lines += ["", "## Parameters", "", "```yaml", yaml.safe_dump(parameters, sort_keys=True).rstrip(), "```"]

    def redact(text: str) -> str:
        for s in sorted(set(([base] if base else []) + sources), key=len, reverse=True):
            if not hub_id(s):
                text = text.replace(s, public_name(s))
        return text

    if results:
        lines += ["", "## How good it is", "", redact(results).rstrip()]
    # the results are shown above: the config's block leaves their comment lines out
    redacted = redact("".join(ln for ln in config_text.splitlines(True) if not ln.startswith(RESULTS_PREFIX)))
    lines += [
        "",
        "## Configuration",
        "",
        f"As given (`{CONFIG_NAME}` beside the weights holds it byte for byte;",
        "here paths and URLs are cut to their last component):",
        "",
        "```yaml",
        redacted.rstrip(),
        "```",
        "",
    ]
    return "\n".join(lines)
