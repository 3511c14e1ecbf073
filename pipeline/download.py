"""Fetching the real checkpoints from the Hugging Face hub into the layout `pipeline.checkpoints`
reads (resumable: files already there are not fetched again), then checking that layout."""

from pathlib import Path

from pipeline.checkpoints import LM_PREFIX, CheckpointError, Checkpoints, discover

MAIN_REPO = "ACE-Step/Ace-Step1.5"  # acestep-v15-turbo/, vae/, Qwen3-Embedding-0.6B/, acestep-5Hz-lm-1.7B/
MAIN_DIT = "acestep-v15-turbo"
SEPARATE_REPOS = {
    "acestep-5Hz-lm-0.6B": "ACE-Step/acestep-5Hz-lm-0.6B",
    "acestep-5Hz-lm-4B": "ACE-Step/acestep-5Hz-lm-4B",
    "acestep-v15-base": "ACE-Step/acestep-v15-base",
    "acestep-v15-sft": "ACE-Step/acestep-v15-sft",
    "acestep-v15-turbo-shift1": "ACE-Step/acestep-v15-turbo-shift1",
    "acestep-v15-turbo-shift3": "ACE-Step/acestep-v15-turbo-shift3",
    "acestep-v15-turbo-continuous": "ACE-Step/acestep-v15-turbo-continuous",
    # The XL DiTs (about 4 B parameters in the decoder; weights sharded into model-0000X-of-00004.safetensors
    # with a model.safetensors.index.json, which pipeline.checkpoints reads).
    "acestep-v15-xl-base": "ACE-Step/acestep-v15-xl-base",
    "acestep-v15-xl-sft": "ACE-Step/acestep-v15-xl-sft",
    "acestep-v15-xl-turbo": "ACE-Step/acestep-v15-xl-turbo",
}


def download_models(target: Path, extra: list[str] = ()) -> Checkpoints:
    """The main repository into `target`, each extra model into `target/<name>`; then the layout check:
    CheckpointError when a shared component, or a DiT just fetched, is incomplete (discover() itself
    only sets an incomplete DiT folder aside)."""
    unknown = sorted(set(extra) - set(SEPARATE_REPOS))
    if unknown:
        raise ValueError(f"unknown model(s) {', '.join(unknown)}; available: {', '.join(sorted(SEPARATE_REPOS))}")
    from huggingface_hub import snapshot_download  # network access happens here only

    target.mkdir(parents=True, exist_ok=True)
    snapshot_download(MAIN_REPO, local_dir=target)
    for name in extra:
        snapshot_download(SEPARATE_REPOS[name], local_dir=target / name)
    found = discover(target)
    fetched = [name for name in (MAIN_DIT, *extra) if not name.startswith(LM_PREFIX)]
    problems = []
    for name in dict.fromkeys(fetched):
        if name in found.incomplete:
            problems.extend(found.incomplete[name])
        elif name not in found.dits:  # not even a DiT config.json (model_type "acestep") arrived
            problems.append(f"{target / name / 'config.json'} is missing or not a DiT config")
    if problems:
        raise CheckpointError("incomplete checkpoints:\n  " + "\n  ".join(problems))
    return found
