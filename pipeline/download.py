"""Fetching the real checkpoints from the Hugging Face hub into the layout `pipeline.checkpoints`
reads (resumable: files already there are not fetched again), then checking that layout."""

from pathlib import Path

from pipeline.checkpoints import Checkpoints, discover

MAIN_REPO = "ACE-Step/Ace-Step1.5"  # acestep-v15-turbo/, vae/, Qwen3-Embedding-0.6B/, acestep-5Hz-lm-1.7B/
SEPARATE_REPOS = {
    "acestep-5Hz-lm-0.6B": "ACE-Step/acestep-5Hz-lm-0.6B",
    "acestep-5Hz-lm-4B": "ACE-Step/acestep-5Hz-lm-4B",
    "acestep-v15-base": "ACE-Step/acestep-v15-base",
    "acestep-v15-sft": "ACE-Step/acestep-v15-sft",
    "acestep-v15-turbo-shift1": "ACE-Step/acestep-v15-turbo-shift1",
    "acestep-v15-turbo-shift3": "ACE-Step/acestep-v15-turbo-shift3",
    "acestep-v15-turbo-continuous": "ACE-Step/acestep-v15-turbo-continuous",
}


def download_models(target: Path, extra: list[str] = ()) -> Checkpoints:
    """The main repository into `target`, each extra model into `target/<name>`; then the layout check."""
    from huggingface_hub import snapshot_download  # network access happens here only

    unknown = sorted(set(extra) - set(SEPARATE_REPOS))
    if unknown:
        raise ValueError(f"unknown model(s) {', '.join(unknown)}; available: {', '.join(sorted(SEPARATE_REPOS))}")
    target.mkdir(parents=True, exist_ok=True)
    snapshot_download(MAIN_REPO, local_dir=target)
    for name in extra:
        snapshot_download(SEPARATE_REPOS[name], local_dir=target / name)
    return discover(target)
