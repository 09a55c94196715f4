"""The readers of web and table sources, without Ray: WARC/WET crawls written by warcio, HTML files, what
extraction keeps, the language label, CSV/TSV/Parquet tables (the whole curate over a crawl, on Ray:
test_curate.py)."""

import bz2
import json
from collections import Counter
from io import BytesIO
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from warcio.warcwriter import WARCWriter

from conftest import GERMAN, PEOPLE, TINY, WIKI, crawl_responses, site_page
from pipeline.config import ConfigError, ImageTextConfig, TableConfig, load_config
from pipeline.curate.language import language_batch
from pipeline.curate.read import ReadOptions, expand_inputs, file_records
from pipeline.curate.records import record, table
from pipeline.curate.web import extract_batch
from pipeline.sample_data import write_warc


def read(path) -> list[dict]:
    return list(file_records(str(path), ReadOptions()))


def test_every_record_of_a_crawl_is_a_page_or_a_reject_with_its_reason_and_ids_are_the_crawls(tmp_path):
    responses = crawl_responses()
    rows = read(write_warc(tmp_path / "crawl.warc.gz", responses))
    assert len(rows) == 1 + 2 * len(responses)  # warcinfo, then a request and a response per URL
    assert Counter(r["reason"] for r in rows) == {
        "": len(responses) - 2,
        "WARC request record, not a response": len(responses),
        "WARC warcinfo record, not a response": 1,
        "non-HTML response (image/png)": 1,
        "HTTP status 404": 1,
    }
    pages = [r for r in rows if not r["reason"]]
    assert all(r["html"].startswith("<html>") and r["text"] == "" for r in pages)  # extract fills text
    meta = json.loads(pages[0]["meta"])
    assert meta == {"url": "http://site.example/a0.html", "date": "2026-01-01T00:00:00Z", "content_type": "text/html"}
    # the id is the record's WARC-Record-ID: the same page in another file, among other pages, keeps it
    alone = read(write_warc(tmp_path / "part.warc.gz", responses[3:5]))
    assert {r["id"] for r in alone if not r["reason"]} <= {r["id"] for r in pages}
    assert all(r["id"].startswith("<urn:uuid:") for r in rows)


def test_extraction_keeps_the_article_without_markup_navigation_or_scripts(tmp_path):
    rows = read(write_warc(tmp_path / "crawl.warc.gz", crawl_responses()))
    plain = record("doc", text="a document of a jsonl file", source="x.jsonl")
    out = extract_batch(table([*rows, plain])).to_pandas().set_index("id")
    assert "html" not in out.columns
    kept = out[out["reason"] == ""]
    for text in kept["text"]:
        assert "<" not in text and "tracker" not in text and "color: red" not in text
        assert not {"Home", "Archive", "Imprint", "Privacy"} & set(text.split())
    english = kept[kept["source"].str.endswith(".warc.gz")]
    languages = Counter(json.loads(m)["language"] for m in english["meta"])
    assert languages == {"en": len(english) - 1, "de": 1}
    assert GERMAN.split(".")[0] in " ".join(english["text"])
    (empty,) = out[out["reason"] == "no text extracted from HTML"].itertuples()
    assert empty.step == "extract" and empty.raw.startswith("<html>")  # the page is in rejected/ to look at
    assert out.loc["doc", "text"] == "a document of a jsonl file" and out.loc["doc", "reason"] == ""


def test_a_page_in_a_charset_its_server_made_up_is_decoded_by_detection(tmp_path):
    body = "<html><body><p>Caf\u00e9 cr\u00e8me, na\u00efve fa\u00e7ade.</p></body></html>".encode()
    rows = read(
        write_warc(tmp_path / "c.warc.gz", [("http://x.example/", "200 OK", "text/html; charset=utf-99", body)])
    )
    (page,) = [r for r in rows if r["html"]]
    assert extract_batch(table([page]))["text"].to_pylist() == ["Caf\u00e9 cr\u00e8me, na\u00efve fa\u00e7ade."]


def test_a_wet_file_is_text_already(tmp_path):
    path = tmp_path / "crawl.wet.gz"
    with path.open("wb") as fh:
        writer = WARCWriter(fh, gzip=True)
        for url, text in (("http://a.example/", "Plain text the crawler extracted."), ("http://b.example/", " ")):
            writer.write_record(
                writer.create_warc_record(
                    url, "conversion", payload=BytesIO(text.encode()), warc_content_type="text/plain"
                )
            )
    first, second = read(path)
    assert first["text"] == "Plain text the crawler extracted." and first["html"] == ""
    assert json.loads(first["meta"])["url"] == "http://a.example/" and second["reason"] == "empty text"


def test_a_damaged_crawl_keeps_what_came_before_the_damage(tmp_path):
    whole = write_warc(tmp_path / "crawl.warc.gz", crawl_responses()).read_bytes()
    garbage = tmp_path / "garbage.warc.gz"
    garbage.write_bytes(whole + b"\x1f\x8b\x08\x00 not gzip")
    rows = read(garbage)
    assert rows[-1]["reason"].startswith("unreadable file after 23 records: ") and len(rows) == 24
    cut = tmp_path / "cut.warc.gz"  # a download that stopped halfway: the last page is partial
    cut.write_bytes(whole[: len(whole) // 2])
    last = read(cut)[-1]
    assert last["reason"] == "payload does not match its WARC-Payload-Digest (truncated or corrupt)"
    headless = tmp_path / "headless.warc"
    headless.write_bytes(b"WARC/1.0\r\nWARC-Type: response\r\nContent-Length: 0\r\n\r\n\r\n\r\n")
    (row,) = read(headless)
    assert row["reason"] == "response without HTTP headers" and row["id"] == f"{headless}#0"


def test_a_folder_of_html_pages_is_read_as_pages(tmp_path):
    (tmp_path / "site" / "deep").mkdir(parents=True)
    (tmp_path / "site" / "deep" / "one.html").write_bytes(site_page(["A paragraph of the page."]))
    (tmp_path / "site" / "two.htm").write_bytes(site_page(["Another paragraph."]))
    files = expand_inputs([str(tmp_path / "site")])
    rows = [row for f in files for row in read(f)]
    assert [json.loads(r["meta"])["url"] for r in rows] == [f"file://{f}" for f in files]
    assert extract_batch(table(rows))["text"].to_pylist() == ["A paragraph of the page.", "Another paragraph."]


def test_the_language_filter_labels_every_document_and_keeps_the_listed_languages():
    english = "The cat sits on the warm roof in the morning and looks down into the garden for a long time."
    rows = [
        record("en", text=english),
        record("de", text=GERMAN),
        record("labelled", text=GERMAN, meta=json.dumps({"language": "en"})),  # a reader's label stands
        record("gone", text=GERMAN, reason="too short", step="filters"),
    ]
    out = language_batch(pd.DataFrame(rows), ["en"]).set_index("id")
    assert [json.loads(m).get("language") for m in out["meta"][:3]] == ["en", "de", "en"]
    assert out.loc["de", "reason"] == "language de not in en" and out.loc["de", "step"] == "language"
    assert out.loc["en", "reason"] == "" and out.loc["labelled", "reason"] == ""
    assert out.loc["gone", "reason"] == "too short" and out.loc["gone", "meta"] == ""


def test_each_table_row_is_a_document_written_by_the_template(tmp_path):
    path = tmp_path / "people.csv"
    path.write_text(PEOPLE)
    table = TableConfig(template="{name} was born in {year} and worked on {field}.")
    rows = list(file_records(str(path), ReadOptions(table=table)))
    assert len(rows) == 4  # three data rows and one malformed line: every line accounted for
    bad, ada, alan, grace = rows
    assert bad["reason"] == "malformed CSV line: 2 fields, the header has 3" and bad["raw"] == "broken,line"
    assert bad["id"] == f"{path}:line5"
    assert ada["text"] == "Ada Lovelace was born in 1815 and worked on mathematics." and ada["reason"] == ""
    assert json.loads(alan["meta"]) == {"schema": "name: string, year: int64, field: string", "row": 1}
    assert grace["reason"] == "row has no value for year (data.table.template)" and "Grace Hopper" in grace["raw"]
    plain = list(file_records(str(path), ReadOptions()))  # no template: a line per column
    assert plain[1]["text"] == "name: Ada Lovelace\nyear: 1815\nfield: mathematics"
    assert plain[3]["text"] == "name: Grace Hopper\nfield: compilers" and plain[3]["reason"] == ""


def test_a_table_becomes_markdown_tables_of_rows_per_document(tmp_path):
    path = tmp_path / "people.tsv"
    path.write_text(PEOPLE.replace(",", "\t").replace("computing", "computing | logic").replace("broken\tline\n", ""))
    rows = list(file_records(str(path), ReadOptions(table=TableConfig(mode="table", rows_per_document=2))))
    assert [r["id"] for r in rows] == [f"{path}:0-2", f"{path}:2-3"]
    assert rows[0]["text"] == (
        "| name | year | field |\n|---|---|---|\n"
        "| Ada Lovelace | 1815 | mathematics |\n| Alan Turing | 1912 | computing \\| logic |"
    )
    assert rows[1]["text"].endswith("| Grace Hopper |  | compilers |")
    assert json.loads(rows[1]["meta"])["rows"] == [2, 3]


def test_parquet_is_read_as_a_table_when_asked(tmp_path):
    path = tmp_path / "people.parquet"
    pq.write_table(pa.table({"name": ["Ada"], "year": [1815]}), path)
    (as_table,) = file_records(str(path), ReadOptions(table=TableConfig(template="{name}, {year}", parquet=True)))
    assert as_table["text"] == "Ada, 1815"
    (as_records,) = file_records(str(path), ReadOptions())  # the default: records with a text field
    assert as_records["reason"] == "missing text field 'text'"


def test_a_template_that_names_no_column_is_refused_when_the_config_is_read():
    with pytest.raises(ConfigError, match=r"must name columns in braces"):
        load_config(TINY, ["data.table.template='no columns here'"])
    with pytest.raises(ConfigError, match=r"expected '}' before end of string"):
        load_config(TINY, ["data.table.template='{name'"])


def test_a_mediawiki_dump_gives_articles_as_plain_text_and_the_other_pages_as_rejects(tmp_path):
    path = tmp_path / "testwiki-pages-articles.xml.bz2"
    path.write_bytes(bz2.compress(WIKI.encode()))
    rows = {r["id"]: r for r in file_records(str(path), ReadOptions())}
    assert list(rows) == [f"testwiki:{n}" for n in (7, 8, 9, 10, 11)]  # the site and page id: stable
    ada = rows["testwiki:7"]
    assert ada["reason"] == "" and json.loads(ada["meta"]) == {
        "title": "Ada Lovelace",
        "page_id": "7",
        "timestamp": "2026-01-02T03:04:05Z",
    }
    assert ada["text"].startswith("Ada Lovelace was an English mathematician. She wrote\nabout the Analytical Engine.")
    assert "She was born in London." in ada["text"]
    for markup in ("{{", "[[", "'''", "<ref", "Notes", "comment", "cell one", "portrait", "Category", "de:", "1815"):
        assert markup not in ada["text"], markup
    assert [rows[f"testwiki:{n}"]["reason"] for n in (8, 9, 10, 11)] == [
        "redirect to Ada Lovelace",
        "namespace 1 (Talk), not an article",
        "namespace 10 (Template), not an article",
        "no text after removing wiki markup",
    ]


def test_an_xml_file_that_is_no_dump_is_one_reject(tmp_path):
    path = tmp_path / "other.xml"
    path.write_text("<rss><channel><title>feed</title></channel></rss>")
    (row,) = file_records(str(path), ReadOptions())
    assert row["reason"] == "unreadable file: not a MediaWiki dump (its root element is <rss>)"
    cut = tmp_path / "cut.xml"
    cut.write_text(WIKI[: WIKI.index("<page><title>Talk")])
    *pages, last = file_records(str(cut), ReadOptions())
    assert len(pages) == 2 and last["reason"].startswith("unreadable file after 2 records: no element found")


def test_a_folder_of_captioned_images_gives_pairs_and_rejects_the_images_it_cannot_use(tmp_path):
    from PIL import Image

    folder = tmp_path / "photos"
    folder.mkdir()
    Image.new("RGB", (32, 16), "red").save(folder / "red.jpg")
    (folder / "red.txt").write_text("A red rectangle, twice as wide as it is tall.\n")
    Image.new("L", (8, 8)).save(folder / "dark.PNG")
    (folder / "dark.json").write_text(json.dumps({"caption": "A small dark square."}))
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (folder / "broken.txt").write_text("A picture that cannot be opened.")
    Image.new("RGB", (4, 4)).save(folder / "silent.png")  # no caption beside it
    (folder / "notes.txt").write_text("A text file of the folder that is no caption.")
    files = expand_inputs([str(folder)])
    assert [Path(f).name for f in files] == ["broken.jpg", "dark.PNG", "notes.txt", "red.jpg", "silent.png"]
    rows = {Path(r["id"]).name: r for f in files for r in read(f)}
    red = json.loads(rows["red.jpg"]["meta"])["image"]
    assert rows["red.jpg"]["text"] == "A red rectangle, twice as wide as it is tall."
    assert (red["width"], red["height"], red["format"]) == (32, 16, "JPEG") and len(red["sha256"]) == 64
    assert rows["dark.PNG"]["text"] == "A small dark square." and rows["notes.txt"]["reason"] == ""
    assert rows["broken.jpg"]["reason"].startswith("unreadable image: cannot identify image file")
    assert rows["silent.png"]["reason"] == "image without a caption"


def test_laion_style_records_are_pairs_with_their_image_checked_or_referenced(tmp_path):
    from PIL import Image

    Image.new("RGB", (10, 10), "blue").save(tmp_path / "blue.png")
    records = [
        {"id": "web", "caption": "A photo on the web.", "url": "http://img.example/1.jpg"},
        {"id": "local", "caption": "A blue square.", "path": "blue.png"},
        {"id": "gone", "caption": "A file that is not there.", "path": "missing.png"},
        {"id": "nowhere", "caption": "No image at all."},
        {"id": "mute", "url": "http://img.example/2.jpg"},
    ]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    opts = ReadOptions(image_text=ImageTextConfig(records=True, template="instruction"))
    rows = {r["id"]: r for r in file_records(str(path), opts)}
    assert rows["web"]["text"] == (
        "[TASK] image captioning\n[INPUT] <image:http://img.example/1.jpg>\n[OUTPUT] A photo on the web."
    )
    assert json.loads(rows["local"]["meta"])["image"]["path"] == str(tmp_path / "blue.png")
    assert rows["local"]["text"].endswith("[OUTPUT] A blue square.") and rows["local"]["reason"] == ""
    assert rows["gone"]["reason"] == "missing image file (No such file or directory)"
    assert rows["nowhere"]["reason"] == "no image: neither 'url' nor 'path' is set"
    assert rows["mute"]["reason"] == "image without a caption" and rows["mute"]["raw"]
