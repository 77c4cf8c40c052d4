"""`hub@<name>` stage: one pinned snapshot of a Hugging Face hub repository, as a DVC output.

    python -m stages.hub --name phi3 --out data/hub/phi3 --metrics metrics/hub/phi3.json

A base model or a dataset from the hub enters the pipeline here: params.yaml `hub.<name>` names
the repository and its revision, this stage downloads that snapshot, and `finetune.base_model`
or an expert's `dataset` points into `data/hub/<name>`. DVC then tracks the download like any
other output: it is cached, runs once per revision, and every stage reading it depends on it.
A user who exports HF_HUB_OFFLINE=1 gets the snapshot from the local Hugging Face cache instead (air-gapped machines).
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from pipeline.atomic import atomic_dir, write_json
from pipeline.settings.base import InputError
from pipeline.settings.hub import HubSource
from pipeline.stage import configure_environment, start

log = logging.getLogger("stages.hub")


def link_or_copy(source: Path, target: Path) -> None:
    """Hard-link a file of the hub cache into the output (no second copy of a large model), else copy."""
    try:
        os.link(source, target)
    except OSError:  # another file system, or links not allowed
        shutil.copy2(source, target)


def download(source: HubSource, out_dir: Path, cache_dir: Path | None = None) -> dict[str, Any]:
    """Fetch the snapshot into the hub cache, then place its files in `out_dir`; return what was fetched."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import filter_repo_objects

    log.info("fetching %s %s at revision %s", source.repo_type, source.repo_id, source.revision)
    snapshot = Path(
        snapshot_download(
            repo_id=source.repo_id,
            repo_type=source.repo_type,
            revision=source.revision,
            allow_patterns=source.allow_patterns,
            cache_dir=cache_dir,
        )
    )
    # filtered here too: a snapshot already in the cache can hold more than allow_patterns names
    names = [str(p.relative_to(snapshot)) for p in snapshot.rglob("*") if p.is_file() and p.name != ".gitattributes"]
    files = [snapshot / name for name in sorted(filter_repo_objects(names, allow_patterns=source.allow_patterns))]
    if not files:
        raise InputError(
            f"hub snapshot of {source.repo_id} at {source.revision} has no files matching "
            f"allow_patterns {source.allow_patterns}"
        )
    with atomic_dir(out_dir) as tmp:
        for path in files:
            target = tmp / path.relative_to(snapshot)
            target.parent.mkdir(parents=True, exist_ok=True)
            link_or_copy(path.resolve(), target)  # cache snapshots are symlinks to blobs
    # the snapshot folder is named after the commit the revision resolved to
    summary = {"repo_id": source.repo_id, "revision": source.revision, "commit": snapshot.name,
               "files": len(files), "megabytes": round(sum(p.stat().st_size for p in files) / 2**20, 3)}  # fmt: skip
    log.info("%s: %d files, %.1f MB, commit %s", source.repo_id, summary["files"], summary["megabytes"], snapshot.name)
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--name", required=True, help="a key of params.yaml `hub`")
    parser.add_argument("--out", type=Path, required=True, help="output folder (the snapshot's files)")
    parser.add_argument("--metrics", type=Path, required=True, help="JSON naming the commit that was fetched")
    args = parser.parse_args(argv)
    source = start(f"hub@{args.name}").hub[args.name]
    configure_environment(hub_access=True)
    write_json(args.metrics, download(source, args.out))


if __name__ == "__main__":
    main()
