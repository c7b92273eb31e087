"""Sources -> documents, and windows: pure functions, no model."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from knnstore import InputError, SourceOptions
from knnstore.ingest import iter_documents, scan, windows

WIKI = """\
 
 = Homarus gammarus = 
 
 Homarus gammarus is a species of clawed lobster . 
 
 = = Description = = 
 
 It may grow to a length of 60 cm . 
 
 = Ode to a Nightingale = 
 
 It is a poem by John Keats . 
"""


@pytest.mark.parametrize("n,window,stride", [(1, 4, 2), (10, 4, 2), (10, 4, 4), (100, 16, 12), (17, 16, 1), (5, 16, 12)])
def test_windows_keep_every_position_once_with_left_context(n, window, stride):
    kept = []
    for begin, end, keep_from in windows(n, window, stride):
        assert end - begin <= window
        assert begin <= keep_from <= end
        if begin > 0:  # after the first window, every kept key saw window - stride tokens
            assert keep_from - begin >= window - stride
        kept += range(keep_from, end)
    assert kept == list(range(n))


def test_windows_of_an_empty_document_are_none():
    assert list(windows(0, 8, 4)) == []


def test_directory_gives_one_document_per_text_file_and_reports_skipped_files(tmp_path, text_dir):
    (text_dir / "image.txt").write_bytes(b"\x89PNG\x00\x00binary")
    (text_dir / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (text_dir / "empty.md").write_text("  \n")
    (text_dir / "ignored.csv").write_text("a,b")
    skipped = []
    docs = list(iter_documents([text_dir], SourceOptions(), skipped))
    assert [d.title for d in docs] == ["a", "b", "c"]
    assert [d.ordinal for d in docs] == [0, 1, 2]
    reasons = {p.rsplit("/", 1)[-1]: why for p, why in skipped}
    assert reasons["image.txt"] == "binary"
    assert reasons["latin1.txt"].startswith("not UTF-8")
    assert reasons["empty.md"] == "empty"
    assert "ignored.csv" not in reasons


def test_split_on_heading_gives_one_document_per_wikitext_article(tmp_path):
    path = tmp_path / "wiki.txt"
    path.write_text(WIKI)
    docs = list(iter_documents([path], SourceOptions(split_on_heading=True)))
    assert [d.title for d in docs] == ["Homarus gammarus", "Ode to a Nightingale"]
    assert "Description" in docs[0].text and "Keats" not in docs[0].text
    assert docs[1].source.endswith("wiki.txt:10")
    whole = list(iter_documents([path], SourceOptions()))
    assert len(whole) == 1 and whole[0].text == WIKI


def test_jsonl_keeps_other_fields_as_metadata(tmp_path):
    path = tmp_path / "d.jsonl"
    rows = [{"text": "first doc", "title": "One", "id": "x1", "year": 2020}, {"body": "2", "text": "second"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    docs = list(iter_documents([path], SourceOptions()))
    assert [d.text for d in docs] == ["first doc", "second"]
    assert docs[0].title == "One" and docs[0].source.endswith("#x1")
    assert docs[0].meta == {"title": "One", "id": "x1", "year": 2020}
    assert docs[1].meta == {"body": "2"} and docs[1].source.endswith("d.jsonl:2")


def test_parquet_rows_are_documents_with_a_configurable_text_column(tmp_path):
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"content": ["alpha beta", "gamma"], "n": [1, 2]}), path)
    docs = list(iter_documents([path], SourceOptions(text_field="content")))
    assert [d.text for d in docs] == ["alpha beta", "gamma"]
    assert docs[1].meta == {"n": 2}


def test_hugging_face_dataset_saved_to_disk_is_read(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"text": ["one two", "three"], "label": [0, 1]}).save_to_disk(tmp_path / "ds")
    docs = list(iter_documents([tmp_path / "ds"], SourceOptions()))
    assert [d.text for d in docs] == ["one two", "three"] and docs[0].meta == {"label": 0}


@pytest.mark.parametrize("name,content,message", [
    ("bad.jsonl", '{"text": "ok"}\n{"text": broken\n', "bad.jsonl:2: malformed JSON"),
    ("nofield.jsonl", '{"body": "x"}\n', "no 'text' field"),
    ("list.jsonl", '[1, 2]\n', "expected a JSON object"),
    ("bin.txt", b"\x00\x01\x02", "binary"),
    ("latin.txt", "caf\xe9".encode("latin-1"), "not UTF-8"),
])
def test_bad_files_named_directly_are_errors_that_say_which_file(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    with pytest.raises(InputError, match=message.replace("(", r"\(")) as info:
        list(iter_documents([path], SourceOptions()))
    assert name in str(info.value)


def test_parquet_without_the_text_column_names_the_columns(tmp_path):
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"body": ["x"]}), path)
    with pytest.raises(InputError, match="no column 'text' \\(columns: body\\)"):
        list(iter_documents([path], SourceOptions()))


def test_scan_refuses_an_empty_corpus_and_a_missing_path(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(InputError, match="the corpus is empty"):
        scan([str(tmp_path / "empty.txt")], SourceOptions(), lambda t: t.split())
    with pytest.raises(InputError, match="no such file or directory"):
        scan([str(tmp_path / "missing.txt")], SourceOptions(), lambda t: t.split())


def test_scan_counts_documents_and_tokens_and_honours_max_documents(text_dir):
    result = scan([str(text_dir)], SourceOptions(max_documents=2), lambda t: t.split())
    assert result.n_documents == 2
    assert result.n_tokens == 9 * 6 + 10 * 8
