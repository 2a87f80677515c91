"""The real ChatGLM tokenizer files: where they are found, and how they are fetched.

The tests (and anyone who wants the official vocabularies without the 6B weights) need just the
SentencePiece models and `tokenizer_config.json` of THUDM/chatglm-6b, chatglm2-6b and chatglm3-6b,
laid out as `<folder>/chatglm-6b/ice_text.model`, `<folder>/chatglm2-6b/tokenizer.model`, ...
`find_tokenizers_dir` looks in `$CHATGLM_TOKENIZERS_DIR`, then in the user cache
(`$XDG_CACHE_HOME/chatglm_ptuning/tokenizers`, default `~/.cache/...`), then downloads the six
files from the Hugging Face Hub into that cache. Downloads are pinned to the Hub commits below and
every file is checked against its sha256 (the same values the official repos' Git-LFS pointers
record), so a tokenizer never changes under the tests.

CLI:
    python -m chatglm_ptuning.tokenizer_files fetch [--dest DIR]   download into the cache (or DIR)
    python -m chatglm_ptuning.tokenizer_files where                print the folder found; no download
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ENV_VAR = "CHATGLM_TOKENIZERS_DIR"
FETCH_COMMAND = "python -m chatglm_ptuning.tokenizer_files fetch"
PROBE_TIMEOUT_S = 10.0  # one HEAD request before downloading: fail fast where the Hub is unreachable


@dataclass(frozen=True)
class HubTokenizer:
    """One tokenizer folder: its Hub repository, the commit pinned, and file name -> sha256."""

    repo_id: str
    revision: str
    files: tuple[tuple[str, str], ...]


# Revisions: commits of the official repos whose files carry exactly these hashes.
TOKENIZERS: dict[str, HubTokenizer] = {
    "chatglm-6b": HubTokenizer(
        "THUDM/chatglm-6b",
        "8b7d33596d18c5e83e2da052d05ca4db02e60620",  # 2023-09-04 "Update README"; ice_text.model unchanged since 2023-04-06
        (
            ("ice_text.model", "5e974d9a69c242ce014c88c2b26089270f6198f3c0b700a887666cd3e816f17e"),
            ("tokenizer_config.json", "5bcca050afbbd7e3a3a1224b6c0019eff0dbc9548580637adaafc27a26e4fb0a"),
        ),
    ),
    "chatglm2-6b": HubTokenizer(
        "THUDM/chatglm2-6b",
        "8fd7fba285f7171d3ae7ea3b35c53b6340501ed1",  # 2023-09-08 "Merge branch 'classifier'"
        (
            ("tokenizer.model", "e7dc4c393423b76e4373e5157ddc34803a0189ba96b21ddbb40269d31468a6f2"),
            ("tokenizer_config.json", "5e27c433028fe5e26fd98e82a1069fca50f0b69717576eb013b4b80a98ba8992"),
        ),
    ),
    "chatglm3-6b": HubTokenizer(
        "THUDM/chatglm3-6b",
        "e46a14881eae613281abbd266ee918e93a56018f",  # 2023-11-09 "Add encode_special_tokens option"
        (
            ("tokenizer.model", "e7dc4c393423b76e4373e5157ddc34803a0189ba96b21ddbb40269d31468a6f2"),  # = ChatGLM2's
            ("tokenizer_config.json", "5cfb2d80badae9a152ed0c44293fd592774ecaebc593271a6b02413d7afa24a4"),
        ),
    ),
}


class TokenizerFilesNotFound(FileNotFoundError):
    """No complete, checksum-correct set of tokenizer files could be found or fetched."""


class TokenizerDownloadError(OSError):
    """The Hub could not be reached, or served files that do not match the pinned checksums."""


def user_cache_dir() -> Path:
    """`$XDG_CACHE_HOME/chatglm_ptuning/tokenizers` (default `~/.cache/chatglm_ptuning/tokenizers`)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "chatglm_ptuning" / "tokenizers"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def problems(folder: Path) -> list[str]:
    """What is wrong with `folder` as a tokenizers folder: missing files and sha256 mismatches (empty: usable)."""
    found = []
    for name, spec in TOKENIZERS.items():
        for file, expected in spec.files:
            path = folder / name / file
            if not path.is_file():
                found.append(f"{name}/{file} is missing")
            elif (actual := _sha256(path)) != expected:
                found.append(f"{path}: sha256 {actual}, expected {expected} ({spec.repo_id} @ {spec.revision[:7]})")
    return found


def download_tokenizers(dest: Path, endpoint: str | None = None, timeout: float = PROBE_TIMEOUT_S) -> Path:
    """Download the pinned files from the Hub into `dest/<name>/`, each checked against its sha256.

    Nothing is written to `dest` unless all six files arrived intact. `endpoint` overrides the Hub
    address (huggingface_hub's `HF_ENDPOINT` otherwise); `HF_HUB_OFFLINE=1` stops before any request.
    Raises TokenizerDownloadError saying why.
    """
    import huggingface_hub

    if huggingface_hub.is_offline_mode():
        raise TokenizerDownloadError("HF_HUB_OFFLINE is set")
    first = next(iter(TOKENIZERS.values()))
    url = huggingface_hub.hf_hub_url(first.repo_id, first.files[0][0], revision=first.revision, endpoint=endpoint)
    try:  # one quick request: hf_hub_download itself retries an unreachable host for about a minute per file
        huggingface_hub.get_hf_file_metadata(url, timeout=timeout)
    except Exception as err:  # the HTTP library (httpx or httpx2) and its errors vary with huggingface_hub's version
        raise TokenizerDownloadError(f"the Hub did not answer for {url}: {type(err).__name__}: {err}") from None
    with tempfile.TemporaryDirectory(prefix="chatglm-tokenizers-") as staging:
        for name, spec in TOKENIZERS.items():
            for file, expected in spec.files:
                try:
                    path = Path(
                        huggingface_hub.hf_hub_download(
                            spec.repo_id, file, revision=spec.revision, local_dir=Path(staging) / name,
                            endpoint=endpoint, etag_timeout=timeout,
                        )
                    )
                except Exception as err:  # as above
                    raise TokenizerDownloadError(f"{spec.repo_id}/{file}: {type(err).__name__}: {err}") from None
                if (actual := _sha256(path)) != expected:
                    raise TokenizerDownloadError(
                        f"{spec.repo_id}/{file} @ {spec.revision}: sha256 {actual}, expected {expected}"
                    )
        for name, spec in TOKENIZERS.items():
            (dest / name).mkdir(parents=True, exist_ok=True)
            for file, _ in spec.files:
                shutil.move(Path(staging) / name / file, dest / name / file)
    return dest


def _not_found_message(cache: Path, download_error: str | None) -> str:
    tried = f"downloading them from the Hugging Face Hub failed ({download_error})" if download_error else "no download was tried"
    return (
        f"real ChatGLM tokenizer files not found: ${ENV_VAR} is not set, {cache} does not hold them, and {tried}. "
        f"Run `{FETCH_COMMAND}` where huggingface.co is reachable, or set {ENV_VAR} to a folder holding "
        "chatglm-6b/, chatglm2-6b/ and chatglm3-6b/"
    )


def find_tokenizers_dir(download: bool = True) -> Path:
    """The folder holding chatglm-6b/, chatglm2-6b/ and chatglm3-6b/ with checksum-correct files.

    `$CHATGLM_TOKENIZERS_DIR` when set (an error if it is incomplete: no silent fallback), else the
    user cache, else (with `download`) a download into the cache. Raises TokenizerFilesNotFound
    with one message saying which command fetches the files or which variable to set.
    """
    explicit = os.environ.get(ENV_VAR)
    if explicit:
        folder = Path(explicit).expanduser().resolve()
        if found := problems(folder):
            raise TokenizerFilesNotFound(
                f"${ENV_VAR}={explicit} is not a tokenizers folder: {'; '.join(found)}. Point it at the folder "
                f"holding chatglm-6b/, chatglm2-6b/ and chatglm3-6b/, or unset it and run `{FETCH_COMMAND}`"
            )
        return folder
    cache = user_cache_dir()
    found = problems(cache)
    if not found:
        return cache
    if not download:
        raise TokenizerFilesNotFound(_not_found_message(cache, None))
    try:
        download_tokenizers(cache)
    except TokenizerDownloadError as err:
        raise TokenizerFilesNotFound(_not_found_message(cache, str(err))) from None
    return cache


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m chatglm_ptuning.tokenizer_files", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    fetch = commands.add_parser("fetch", help="download the pinned tokenizer files (sha256 checked)")
    fetch.add_argument("--dest", type=Path, default=None, help=f"target folder (default: {user_cache_dir()})")
    commands.add_parser("where", help="print the tokenizers folder found ($CHATGLM_TOKENIZERS_DIR or the cache)")
    args = parser.parse_args(argv)
    if args.command == "where":
        try:
            print(find_tokenizers_dir(download=False))
        except TokenizerFilesNotFound as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
        return 0
    dest = (args.dest or user_cache_dir()).expanduser().resolve()
    try:
        if problems(dest):
            download_tokenizers(dest)
    except TokenizerDownloadError as err:
        print(f"error: could not fetch the tokenizer files into {dest}: {err}", file=sys.stderr)
        return 1
    print(dest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
