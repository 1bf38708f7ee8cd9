"""Model cards that carry the unlearning report, and the Hub: repo creation before training, upload after it."""

from __future__ import annotations

import glob
import json
import os
from typing import Optional

from .errors import UserInputError
from .fileio import atomic_write_json, atomic_write_text  # re-exported: the scripts import them from here
from .outputs import MANIFEST_NAME, run_files


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
    into: Optional[str] = None,
    pipeline_class: str = "StableDiffusionPipeline",
) -> str:
    """Write `README.md` in `output_dir`: what was forgotten, how, and the measured effect.

    `into` writes the card into another folder (the scripts' staging folder) while its loading example still
    names `output_dir` (or `repo_id`). `pipeline_class` is the plain diffusers pipeline of a text-to-image
    model (its loading example and tags).

    Example:
        >>> write_model_card("out", report, base_model="my-org/ddpm-digits")  # doctest: +SKIP
    """
    from diffusers.utils.hub_utils import MODEL_CARD_TEMPLATE_PATH, populate_model_card
    from huggingface_hub import ModelCard, ModelCardData

    method = report["method"]
    items = report.get("forget_items", [])
    if text_to_image:
        loading = (
            f"```python\nfrom diffusers import {pipeline_class}\n\n"
            f"pipe = {pipeline_class}.from_pretrained({base_model!r})\n"
            f"pipe.load_lora_weights({(repo_id or output_dir)!r})\n```"
            if is_adapter
            else f"```python\nfrom diffusers import {pipeline_class}\n\npipe = {pipeline_class}.from_pretrained({(repo_id or output_dir)!r})\n```"
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
    quantized = ""
    settings = report.get("bnb_quantization")
    if settings:  # --bnb_quantization_config_path: the base the adapter was trained on
        bits = f"a 4-bit {settings.get('bnb_4bit_quant_type', '').upper()}" if settings.get("load_in_4bit") else "an 8-bit"
        quantized = (
            f"\nTrained on {bits} bitsandbytes-quantised base (`{json.dumps(settings, sort_keys=True)}`); "
            "the adapter loads into the unquantised base as below.\n"
        )
    copies = ""
    detector = report.get("copy_detector")
    if detector:  # --copy_detector: what the memorization rate counted as a copy
        copies = (
            f"\nCopy detection: `{detector.get('name')}`, threshold {_format(detector.get('threshold'))} "
            f"({detector.get('threshold_units')}).\n"
        )
    verdict = ""
    if report.get("verdict"):  # what was and was not shown, with the thresholds (diffusers_unlearn/verdict.py)
        from .verdict import verdict_table

        verdict = (
            "\n## Verdict\n\nEach claim is judged from the same evaluation before and after unlearning; the thresholds "
            "are the `--verdict_*` flags of the training script (docs/metrics.md, \"The verdict\").\n\n"
            + verdict_table(report["verdict"]) + "\n"
        )
    gallery = ""
    for caption, file_name in (images or {}).items():
        gallery += f"\n**{caption}**\n\n![{caption}](./{file_name})\n"
    description = f"""
# Unlearned {'LoRA adapter' if is_adapter else 'model'}: {method} on {base_model}

This {'adapter' if is_adapter else 'model'} removes {len(items)} training item(s) from `{base_model}` with the
`{method}` objective of [diffusers-unlearn](https://pypi.org/project/diffusers-unlearn/).
Trained for {report.get('max_train_steps', '?')} steps (seed {report.get('seed')}) in {_format(report.get('wall_seconds'))} s.
{verdict}
## Measured effect (same sampling seeds before and after)

{metrics_table(report)}
{copies}{per_prompt}
Forgotten items (SHA-256 of the decoded pixels): {', '.join(i['sha256'][:16] + '…' for i in items[:10])}

Hyperparameters: `{json.dumps(report.get('hyperparameters', {}), sort_keys=True)}`
{quantized}{gallery}
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
        tags += ["stable-diffusion-xl" if "XL" in pipeline_class else "stable-diffusion", "text-to-image"]
    card = populate_model_card(card, tags=tags)
    path = os.path.join(into or output_dir, "README.md")
    atomic_write_text(path, str(card))
    return path


def check_hub_arguments(report_to: str, hub_token: Optional[str]) -> None:
    """Refuse `--hub_token` with a wandb tracker: the scripts log their arguments as the tracker's config, so
    the token would be stored in the wandb run. Log in with `hf auth login` instead (as diffusers' scripts say)."""
    if hub_token and report_to in ("wandb", "all"):
        raise UserInputError(
            f"--hub_token cannot be combined with --report_to {report_to}: the token would be logged to wandb with "
            "the run's arguments. Log in with `hf auth login` (or set HF_TOKEN) and drop --hub_token."
        )


_HTTP_LIBRARIES = {"requests", "urllib3", "httpx", "httpx2", "httpcore"}


def create_hub_repo(repo_id: str, token: Optional[str]) -> str:
    """Create the Hub model repo `repo_id` if it does not exist and return its full id ("user/name").

    The scripts call it before any training (as diffusers' scripts do), so a bad token or repo id fails at once;
    the error becomes a `UserInputError`.
    """
    from huggingface_hub import create_repo
    from huggingface_hub.errors import HFValidationError, HfHubHTTPError

    try:
        return create_repo(repo_id=repo_id, exist_ok=True, token=token).repo_id
    except Exception as error:
        # A bad id, a bad or missing token, HF_HUB_OFFLINE or no network: the user's to fix, not bugs. The
        # offline and missing-token errors are OSErrors; connection errors come from the HTTP library that this
        # huggingface_hub version uses.
        user_side = isinstance(error, (HFValidationError, HfHubHTTPError, OSError))
        if not user_side and type(error).__module__.partition(".")[0] not in _HTTP_LIBRARIES:
            raise
        raise UserInputError(
            f"--push_to_hub: cannot create or open the Hub repo {repo_id!r}: {str(error).rstrip('.')}. Check "
            "--hub_model_id and --hub_token (or `hf auth login`), and that the Hub can be reached."
        ) from None


def push_folder(output_dir: str, repo_id: str, token: Optional[str], commit_message: str) -> list[str]:
    """Upload the finished run in `output_dir` to the existing Hub repo `repo_id` (see `create_hub_repo`) and
    return the uploaded paths.

    Only the files of the run's manifest are uploaded (adapter or pipeline, report, card, sample grids): never
    checkpoints, logs, the lock, or staging and temporary files. Upload checkpoints yourself if you want them
    on the Hub (`hf upload <repo> <output_dir>/checkpoint-<step> checkpoint-<step>`).
    """
    from huggingface_hub import upload_folder

    entries = run_files(output_dir)
    if not entries:
        raise UserInputError(f"{output_dir} holds no finished run to upload (no {MANIFEST_NAME}).")
    paths = []
    for name in entries:
        full = os.path.join(output_dir, name)
        if os.path.isdir(full):
            for root, _, files in os.walk(full):
                paths += [os.path.relpath(os.path.join(root, f), output_dir).replace(os.sep, "/") for f in files]
        else:
            paths.append(name)
    paths.sort()
    upload_folder(
        repo_id=repo_id,
        folder_path=output_dir,
        commit_message=commit_message,
        # Exact paths (glob characters escaped): upload_folder matches allow_patterns with fnmatch.
        allow_patterns=[glob.escape(path) for path in paths],
        token=token,
    )
    return paths


__all__ = [
    "atomic_write_json",
    "atomic_write_text",
    "check_hub_arguments",
    "create_hub_repo",
    "metrics_table",
    "prompt_table",
    "push_folder",
    "write_model_card",
]
