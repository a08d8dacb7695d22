"""Errors shared by the trainers, and the one place pretrained weights are located on disk.

Every message names the offending path (or hub id, or metadata line) and says how to fix it:
these errors are shown to people running a study, not to the developer.

The harness never downloads anything. A pretrained component (text encoder, VAE) is either a
local directory or a hub id that is already in the Hugging Face cache; ``resolve_pretrained_dir``
turns either into a directory without touching the network.
"""

from __future__ import annotations

from pathlib import Path


class WeightsError(FileNotFoundError, ValueError):
    """Pretrained weights that are missing or malformed.

    A ``FileNotFoundError`` (the usual case: the path or hub id is not on this machine) and a
    ``ValueError`` (the files are there but corrupt or of the wrong architecture), so callers
    that catch either one see it.
    """


class DataError(ValueError):
    """A training data set that cannot be used; the message names the path or line and the fix."""


def _looks_like_local_path(path_or_id: str) -> bool:
    # Hub ids are "name" or "namespace/name"; anything else (absolute, relative with ./, ~,
    # more than one slash, backslashes) can only be meant as a path on this machine.
    return (
        path_or_id.startswith(("/", ".", "~"))
        or "\\" in path_or_id
        or path_or_id.count("/") > 1
        or path_or_id.strip() != path_or_id
        or not path_or_id
    )


def download_hint(repo_id: str, setting: str, subfolder: str | None = None) -> str:
    """The sentence every 'weights not found' message ends with: how to get them here."""
    include = f" --include '{subfolder}/*'" if subfolder else ""
    return (
        "download it on a machine with network access with "
        f"`hf download {repo_id}{include} --local-dir DIR`, copy DIR to this machine "
        f"and set {setting}: DIR"
    )


def resolve_pretrained_dir(
    path_or_id: str,
    *,
    what: str,
    setting: str,
    example_id: str,
    subfolder: str | None = None,
    subfolder_setting: str = "the subfolder setting",
) -> Path:
    """Directory holding the pretrained files for ``path_or_id`` (never downloads).

    Args:
        path_or_id: a local directory, or a hub id (``namespace/name``) already in the
            Hugging Face cache (``HF_HOME`` / ``HF_HUB_CACHE``).
        what: what is being loaded, for messages (e.g. ``"text encoder"``).
        setting: the config key the user should change (e.g. ``"text.path"``).
        example_id: hub id used in the fix hint when ``path_or_id`` is a local path.
        subfolder: optional folder inside the directory (e.g. ``"vae"`` of a pipeline).
        subfolder_setting: the config key holding ``subfolder``, for messages.

    Returns:
        The directory (``<dir>/<subfolder>`` when ``subfolder`` is given). It exists; whether it
        holds the right files is the caller's check.

    Raises:
        WeightsError: the path does not exist and it is not a cached hub id.
    """
    local = Path(path_or_id).expanduser()
    if local.exists():
        if not local.is_dir():
            raise WeightsError(
                f"{what} {path_or_id!r} is a file; {setting} must name a directory holding "
                "config.json and the weights (as written by save_pretrained)"
            )
        base = local.resolve()
    elif _looks_like_local_path(path_or_id):
        raise WeightsError(
            f"{what} directory {path_or_id!r} does not exist; "
            + download_hint(example_id, setting, subfolder)
        )
    else:
        # Imported here: only needed for hub ids, and huggingface_hub is slow to import.
        from huggingface_hub import constants, snapshot_download

        try:
            base = Path(snapshot_download(path_or_id, local_files_only=True))
        except (OSError, ValueError) as err:  # LocalEntryNotFoundError, HFValidationError
            raise WeightsError(
                f"{what} {path_or_id!r} is neither a local directory nor a model in the "
                f"Hugging Face cache ({constants.HF_HUB_CACHE}); the harness never downloads: "
                + download_hint(path_or_id, setting, subfolder)
            ) from err
    if subfolder:
        sub = base / subfolder
        if not sub.is_dir():
            raise WeightsError(
                f"{what} {path_or_id!r} has no subfolder {subfolder!r} ({sub} does not exist); "
                f"fix {subfolder_setting} or {download_hint(example_id, setting, subfolder)}"
            )
        return sub
    return base
