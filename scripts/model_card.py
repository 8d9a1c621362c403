"""The model card of a `run_glue.py` run, and its upload with the adapter to the Hugging Face Hub (`check_hub_access`
and `upload` serve `pretrain.py --push-to-hub` too).

The card is `model_cards/sltrain_glue.md` filled by `huggingface_hub.ModelCard.from_template`: metadata
(`library_name`, `base_model`, `tags`, `datasets`, `metrics` and the measured values as `model-index`), the adapter
config, trainable parameters, the exact command and how to load it. `check_hub_access` runs before training and
turns a missing token or an unreachable Hub into one clear `HubError`; `upload` is the only network write.
"""

from __future__ import annotations

import json
import os
import shlex
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData, get_token
from huggingface_hub import constants as hub_constants
from huggingface_hub.errors import HfHubHTTPError, HFValidationError
from huggingface_hub.utils import validate_repo_id

TEMPLATE = Path(__file__).resolve().parent.parent / "model_cards" / "sltrain_glue.md"
METHOD_TITLES = {"sltrain": "SLTrain", "lora": "LoRA", "full": "full fine-tuning"}
# files of an output directory that are uploaded: adapter or model, tokenizer (its chat template: `*.jinja`; a
# sentencepiece or tiktoken vocabulary: `*.model`, `*.tiktoken`), card, summary; top level only (the patterns' `*` also
# matches `/`): the Trainer's checkpoints and a `--merge_to` dense model inside it stay local. The same kinds of files
# that an earlier upload left in the repository are deleted in the same commit (another method's, other shards;
# nested ones too, since `*` matches `/`)
UPLOADED = ["*.safetensors", "*.json", "*.txt", "*.jinja", "*.model", "*.tiktoken", "README.md"]
NOT_UPLOADED = ["*/*"]


class HubError(RuntimeError):
    """The Hub cannot be used: no token, a rejected token, offline, or unreachable."""


@dataclass(frozen=True)
class HubTarget:
    user: str
    repo_id: str
    token: str


@dataclass(frozen=True)
class HubFlags:
    """How a script spells its Hub flags, for the messages (the defaults: `run_glue.py`'s, the Trainer's)."""

    push: str = "--push_to_hub"
    model_id: str = "--hub_model_id"
    out_dir: str = "--output_dir"
    private: str = "--hub_private_repo"
    token: str | None = "--hub_token"  # None: the script takes the token from the login or HF_TOKEN alone


def no_such_folder(name: str) -> bool:
    """Whether `name`, a local folder or a Hub repository id, can only be a folder, and none is there: a Hub id is
    'name' or 'namespace/name' (`validate_repo_id` refuses a path such as '/runs/x' or './x/final')."""
    if Path(name).expanduser().exists():
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return True
    return False


def versions() -> dict[str, str]:
    result = {}
    for package in ("peft-sltrain", "peft", "transformers", "torch", "datasets"):
        try:
            result[package] = version(package)
        except PackageNotFoundError:
            pass
    return result


# -------------------------------------------------------------------------------------------------------- the card
# run_glue.py's `--quantize` choices as `BitsAndBytesConfig` arguments (here, so that the card shows how to load the
# base the same way). The task heads (`classifier`: BERT, RoBERTa, DeBERTa, ELECTRA; `score`: decoder models;
# DistilBERT's `pre_classifier`) stay unquantized: they are trained.
QUANTIZE = {"4bit": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}, "8bit": {"load_in_8bit": True}}
UNQUANTIZED_HEADS = ["classifier", "score", "pre_classifier"]


def without_folders(value):
    """`value` (a string, or a list or dict of them) with each absolute local path cut to its file or folder name, for
    what leaves the machine: a Hub repository shows no folder of the machine that trained (`--flag=PATH` too)."""
    if isinstance(value, dict):
        return {k: without_folders(v) for k, v in value.items()}
    if isinstance(value, list):
        return [without_folders(v) for v in value]
    if not isinstance(value, str):
        return value
    flag, sep, path = value.partition("=") if value.startswith("--") else ("", "", value)
    return flag + sep + Path(path).name if os.path.isabs(path) else value


def command_without_folders(command: str) -> str:
    """A shell command line with `without_folders` applied to each of its words."""
    return shlex.join(without_folders(shlex.split(command)))


def public_summary(summary: dict) -> dict:
    """`run_glue.py`'s summary as it is uploaded (summary.json and the card): local paths without their folders."""
    return {**without_folders(summary), "command": command_without_folders(summary["command"])}


def build_card(summary: dict, peft_config: dict | None, base_model: str, dataset_id: str, repo_id: str | None):
    """The `ModelCard` of a finished run (`summary` is what `run_glue.main` returns)."""
    from glue_tasks import get_task  # here: pretrain_card.py imports `versions` without GLUE's metric packages

    task, method = get_task(summary["task"]), summary["method"]
    on_glue = dataset_id == "nyu-mll/glue"
    results = {k.removeprefix("eval_"): v for k, v in summary["metrics"].items()}
    results = [(name, results[name]) for name in _metric_keys(task, results)]
    splits = {
        name: "validation_mismatched" if name.endswith("_mm") else task.validation_splits[0] for name, _ in results
    }
    eval_results = [
        EvalResult(
            task_type="text-classification",
            dataset_type=dataset_id,
            dataset_name=f"GLUE {task.name.upper()}" if on_glue else dataset_id,
            dataset_config=task.name if on_glue else None,
            dataset_split=splits[name],
            metric_type=name.removesuffix("_mm"),
            metric_value=value,
            metric_name=name,
        )
        for name, value in results
        if value is not None  # undefined (a correlation of constant predictions): no claim in the model index
    ]
    name = repo_id.split("/")[-1] if repo_id else f"{base_model.rstrip('/').split('/')[-1]}-{task.name}-{method}"
    subset = summary.get("eval_subset")  # `--max_eval_samples` cut a split: no model-index claim on the whole split
    data = ModelCardData(
        model_name=name,
        base_model=base_model,
        library_name="transformers" if method == "full" else "peft",
        pipeline_tag="text-classification",
        tags=[method, "peft-sltrain", "glue" if on_glue else "text-classification", task.name]
        + (["sltrain", "sparse-plus-low-rank"] if method == "sltrain" else []),
        datasets=[dataset_id],
        metrics=sorted({n.removesuffix("_mm") for n, _ in results}),
        eval_results=None if subset or not eval_results else eval_results,
    )
    if peft_config is not None:
        peft_config = {k: v for k, v in peft_config.items() if v is not None}
    # modules trained whole and saved besides the head (weights the base checkpoint lacks, e.g. BERT's pooler)
    heads = ("classifier", "score")  # what PEFT adds to `modules_to_save` for sequence classification
    also_saved = [m for m in (peft_config or {}).get("modules_to_save") or [] if m not in heads]
    return ModelCard.from_template(
        data,
        template_path=str(TEMPLATE),
        model_name=name,
        method=method,
        method_title=METHOD_TITLES[method],
        task_title=f"GLUE {task.name.upper()}" if on_glue else f"{dataset_id} (as GLUE {task.name.upper()})",
        dataset_id=dataset_id,
        eval_split_names=", ".join(dict.fromkeys(splits.values()))
        + (f"; the first {max(summary['eval_rows'].values())} rows only, `--max_eval_samples`" if subset else ""),
        results=results,
        metric_source=summary["metric_source"],
        trainable_params=summary["trainable_params"],
        base_params=summary["base_params"],
        trainable_percent=100 * summary["trainable_params"] / summary["base_params"],
        training_state_mib=summary["training_state_bytes"] / 2**20,
        peak_memory_mib=summary["peak_memory_bytes"] / 2**20,
        peak_memory_kind=summary["peak_memory_kind"],
        peft_config=json.dumps(peft_config, indent=2, sort_keys=True, default=_jsonable) if peft_config else None,
        hyperparameters=json.dumps(summary["hyperparameters"], indent=2),
        train_seconds=summary["train_seconds"],
        resumed_from=summary.get("resumed_from"),
        best_model=summary.get("best_model"),
        also_saved=also_saved,
        quantize=summary.get("quantize"),
        quantization_config=repr(QUANTIZE.get(summary.get("quantize"))),  # Python literals, for the loading code
        unquantized_modules=repr(summary.get("unquantized_modules") or UNQUANTIZED_HEADS),
        device=summary["device"],
        command=summary["command"],
        repo_id=repo_id or "path/to/this/directory",
        num_labels=task.num_labels,
        # the class names, as the script's own model and `--merge_to` export have them (not LABEL_0, ...)
        label_names=(f", id2label={task.id2label!r}, label2id={task.label2id!r}" if task.labels else ""),
        mismatched=", ignore_mismatched_sizes=True" if summary.get("ignore_mismatched_sizes") else "",
        versions=summary["versions"],
    )


def _metric_keys(task, results: dict) -> list[str]:
    """The task's GLUE metrics in the order the task lists them (MNLI: matched, then mismatched `_mm`)."""
    return [f"{m}{suffix}" for suffix in ("", "_mm") for m in task.metrics if f"{m}{suffix}" in results]


def _jsonable(value):
    return sorted(value) if isinstance(value, (set, frozenset)) else str(value)


# --------------------------------------------------------------------------------------------------------- the Hub
def check_hub_access(
    token: str | None,
    repo_id: str | None,
    default_name: str,
    flags: HubFlags = HubFlags(),
    private: bool | None = None,
) -> HubTarget:
    """Who we are on the Hub and where the upload goes (`repo_id`, or the user's `default_name`); a `HubError` where
    that cannot be known, or where the upload would certainly fail or go where it should not: a read-only token, a
    namespace that is neither the user nor one of their organizations, an existing public repository for a `private`
    upload. Uploads nothing."""
    push = f"`{flags.push}`"
    if hub_constants.HF_HUB_OFFLINE:
        raise HubError(f"{push} is impossible in offline mode (HF_HUB_OFFLINE=1); unset it or drop the flag.")
    token = token or get_token()
    if not token:
        how = f"set HF_TOKEN, or pass `{flags.token}`." if flags.token else "or set HF_TOKEN."
        raise HubError(f"{push} needs a Hugging Face token with write access: run `hf auth login`, {how}")
    api = HfApi(token=token)
    try:
        me = api.whoami()
    except HfHubHTTPError as error:
        status = getattr(error.response, "status_code", None)
        reason = "the token was rejected (401)" if status == 401 else f"{type(error).__name__}: {error}"
        raise HubError(f"{push}: the Hub at {api.endpoint} refused us: {reason}.") from None
    except Exception as error:  # the HTTP client's connection errors differ between huggingface_hub versions
        raise HubError(
            f"{push}: cannot reach the Hugging Face Hub at {api.endpoint} ({type(error).__name__}: "
            f"{error}); check the network, or drop the flag and upload later."
        ) from None
    user = me["name"]
    if ((me.get("auth") or {}).get("accessToken") or {}).get("role") == "read":  # (fine-grained ones: unchecked)
        raise HubError(f"{push}: the token is read-only; it needs write access (huggingface.co/settings/tokens).")
    if repo_id == "":
        raise HubError(
            f"{push}: `{flags.model_id}` is empty; give USER/NAME, or leave it out for {user}/{default_name}."
        )
    given, repo_id = repo_id is not None, repo_id or f"{user}/{default_name}"
    if "/" not in repo_id:  # the Hub creates NAME as USER/NAME: the card's code must name that
        repo_id = f"{user}/{repo_id}"
    named = f"`{flags.model_id}` {repo_id!r}" if given else f"{repo_id!r} (from `{flags.out_dir}`'s name)"
    try:  # a bad name would otherwise fail only at the upload, after training
        validate_repo_id(repo_id)
    except HFValidationError as error:
        fix = f"Pass a valid `{flags.model_id}`."
        raise HubError(f"{push}: {named} is no valid repository id: {error} {fix}") from None
    namespace, orgs = repo_id.split("/")[0], sorted(org["name"] for org in me.get("orgs") or ())
    if namespace != user and namespace not in orgs:  # (the upload would be refused, after training)
        raise HubError(
            f"{push}: {named} is in {namespace!r}, which is neither you ({user!r}) nor one of your organizations "
            f"({orgs or 'none'})."
        )
    if private:  # `create_repo(exist_ok=True)` leaves an existing repository as it is: a public one would stay so
        try:
            public = api.repo_exists(repo_id) and not api.repo_info(repo_id).private
        except Exception as error:  # whatever the HTTP client raises
            raise HubError(
                f"{push}: cannot tell whether {repo_id} is private ({type(error).__name__}: {error})."
            ) from None
        if public:
            raise HubError(
                f"{push}: {named} exists and is public, and `{flags.private}` asks for a private repository: make it "
                "private on the Hub first, or drop the flag."
            )
    return HubTarget(user=user, repo_id=repo_id, token=token)


def upload(
    folder: Path,
    target: HubTarget,
    private: bool | None = None,
    message: str = "Upload a scripts/run_glue.py run: adapter (or model), tokenizer, model card",
) -> str:
    """Create the repository if needed and upload the adapter (or model), tokenizer and card of `folder` (its top
    level) in one commit with `message`; returns the repository's URL."""
    api = HfApi(token=target.token)
    try:
        url = api.create_repo(target.repo_id, private=private, exist_ok=True)
        api.upload_folder(
            folder_path=str(folder),
            repo_id=target.repo_id,
            allow_patterns=UPLOADED,
            ignore_patterns=NOT_UPLOADED,
            commit_message=message,
            delete_patterns=UPLOADED,  # an earlier push's files (another method's, other shards) go in this commit
        )
    except KeyboardInterrupt:
        raise HubError(
            f"Uploading {folder} to {target.repo_id} was interrupted. Everything is saved locally in {folder}: upload "
            f"it later with `{upload_command(folder, target.repo_id)}`."
        ) from None
    except Exception as error:  # network or permission errors, whatever the HTTP client
        raise HubError(
            f"Uploading {folder} to {target.repo_id} failed ({type(error).__name__}: {error}); the repository may "
            f"exist now, empty or with an earlier upload's files. Everything is saved locally in {folder}: upload it "
            f"later with `{upload_command(folder, target.repo_id)}`."
        ) from None
    return str(url)


def upload_command(folder: Path, repo_id: str) -> str:
    """The `hf upload` command that uploads (and deletes) what `upload` would."""
    patterns = [f"--include={p}" for p in UPLOADED] + [f"--exclude={p}" for p in NOT_UPLOADED]
    patterns += [f"--delete={p}" for p in UPLOADED]
    return shlex.join(["hf", "upload", repo_id, str(folder), *patterns])
