"""Model cards that carry the unlearning report, atomic file writes, and Hub upload."""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any, Optional


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write a text file so that readers see either the old file or the complete new one."""
    path = os.fspath(path)
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_write_json(path: str | os.PathLike, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def _format(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def metrics_table(report: dict) -> str:
    """A markdown table of the before/after metrics in an unlearning report."""
    before, after = report["metrics"]["before"], report["metrics"]["after"]
    keys = [k for k in before if k in after and not isinstance(before[k], (dict, list))]
    lines = ["| metric | before | after |", "|---|---|---|"]
    lines += [f"| {key} | {_format(before[key])} | {_format(after[key])} |" for key in keys]
    return "\n".join(lines)


def prompt_table(per_prompt: dict) -> str:
    """A markdown table of per-prompt metrics: {prompt: {metric: {"before": v, "after": v}}}."""
    metrics = sorted({m for row in per_prompt.values() for m in row})
    header = " | ".join(f"{m} before | {m} after" for m in metrics)
    lines = [f"| prompt | {header} |", "|---" * (1 + 2 * len(metrics)) + "|"]
    for prompt, row in per_prompt.items():
        cells = " | ".join(f"{_format(row.get(m, {}).get('before'))} | {_format(row.get(m, {}).get('after'))}" for m in metrics)
        lines.append(f"| {prompt} | {cells} |")
    return "\n".join(lines)


def write_model_card(
    output_dir: str,
    report: dict,
    base_model: str,
    repo_id: Optional[str] = None,
    images: Optional[dict[str, str]] = None,
    is_adapter: bool = True,
    text_to_image: bool = False,
) -> str:
    """Write `README.md` in `output_dir`: what was forgotten, how, and the measured effect.

    Example:
        >>> write_model_card("out", report, base_model="my-org/ddpm-digits")  # doctest: +SKIP
    """
    from diffusers.utils.hub_utils import MODEL_CARD_TEMPLATE_PATH, populate_model_card
    from huggingface_hub import ModelCard, ModelCardData

    method = report["method"]
    items = report.get("forget_items", [])
    if text_to_image:
        loading = (
            "```python\nfrom diffusers import StableDiffusionPipeline\n\n"
            f"pipe = StableDiffusionPipeline.from_pretrained({base_model!r})\n"
            f"pipe.load_lora_weights({(repo_id or output_dir)!r})\n```"
            if is_adapter
            else f"```python\nfrom diffusers import StableDiffusionPipeline\n\npipe = StableDiffusionPipeline.from_pretrained({(repo_id or output_dir)!r})\n```"
        )
    else:
        loading = (
            "```python\nfrom diffusers_unlearn.pipelines import UnlearnDDPMPipeline\n\n"
            f"pipe = UnlearnDDPMPipeline.from_pretrained({base_model!r})\n"
            f"pipe.load_unlearning_adapter({(repo_id or output_dir)!r})\n```"
            if is_adapter
            else f"```python\nfrom diffusers import DiffusionPipeline\n\npipe = DiffusionPipeline.from_pretrained({(repo_id or output_dir)!r})\n```"
        )
    per_prompt = ""
    if report.get("per_prompt"):
        per_prompt = "\n### Per prompt\n\n" + prompt_table(report["per_prompt"]) + "\n"
    gallery = ""
    for caption, file_name in (images or {}).items():
        gallery += f"\n**{caption}**\n\n![{caption}](./{file_name})\n"
    description = f"""
# Unlearned {'LoRA adapter' if is_adapter else 'model'}: {method} on {base_model}

This {'adapter' if is_adapter else 'model'} removes {len(items)} training item(s) from `{base_model}` with the
`{method}` objective of [diffusers-unlearn](https://pypi.org/project/diffusers-unlearn/).
Trained for {report.get('max_train_steps', '?')} steps (seed {report.get('seed')}) in {_format(report.get('wall_seconds'))} s.

## Measured effect (same sampling seeds before and after)

{metrics_table(report)}
{per_prompt}
Forgotten items (SHA-256 of the decoded pixels): {', '.join(i['sha256'][:16] + '…' for i in items[:10])}

Hyperparameters: `{json.dumps(report.get('hyperparameters', {}), sort_keys=True)}`
{gallery}
## How to use

{loading}
"""
    # diffusers' load_or_create_model_card only accepts a repo id (a local folder fails validation,
    # and offline a repo id cannot be resolved), so the card is built from diffusers' template here.
    card = ModelCard.from_template(
        card_data=ModelCardData(license="apache-2.0", library_name="diffusers", inference=True, base_model=base_model),
        template_path=MODEL_CARD_TEMPLATE_PATH,
        model_description=description,
    )
    tags = ["diffusers", "unlearning", f"unlearning-{method}", method]
    if is_adapter:
        tags.insert(1, "lora")
    if text_to_image:
        tags += ["stable-diffusion", "text-to-image"]
    card = populate_model_card(card, tags=tags)
    path = os.path.join(output_dir, "README.md")
    atomic_write_text(path, str(card))
    return path


def push_folder(output_dir: str, repo_id: Optional[str], token: Optional[str], commit_message: str) -> str:
    """Create the repo if needed and upload the output folder (checkpoints excluded)."""
    from huggingface_hub import create_repo, upload_folder

    repo_id = create_repo(repo_id or os.path.basename(os.path.abspath(output_dir)), exist_ok=True, token=token).repo_id
    upload_folder(
        repo_id=repo_id,
        folder_path=output_dir,
        commit_message=commit_message,
        ignore_patterns=["step_*", "epoch_*", "checkpoint-*", ".tmp-*"],
        token=token,
    )
    return repo_id
