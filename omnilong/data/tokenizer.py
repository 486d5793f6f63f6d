"""Loading a tokenizer from a local directory (nothing is downloaded, no remote code)."""

from pathlib import Path


def load_tokenizer(path: str | Path):
    """The transformers tokenizer saved in ``path`` (a model or tokenizer directory).

    Raises:
        FileNotFoundError: ``path`` has no tokenizer files.
    """
    from transformers import AutoTokenizer

    path = Path(path)
    if not (path / "tokenizer.json").is_file() and not (path / "tokenizer_config.json").is_file():
        raise FileNotFoundError(
            f"no tokenizer in {path} (expected tokenizer.json / tokenizer_config.json); "
            "set `tokenizer_dir` in the config to a directory that has one"
        )
    return AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
